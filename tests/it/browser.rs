//! The dashboard in a real headless Chromium, driven over WebDriver (chromedriver, spoken to with
//! the tests' own HTTP client): every page loads with no console error, a count changes live after
//! an enqueue without a reload, a click on Requeue puts a dead letter back in `foreman_task`, and a
//! task named `<script>…` is shown as those characters and runs nothing. It also takes the
//! screenshots in docs/images/ (written there with `FOREMAN_BLESS=1`).
//!
//! Without `chromium` and `chromedriver` the test says so and passes; `.ci/run` installs them and
//! sets `FOREMAN_BROWSER_TESTS=required`, which makes their absence a failure.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

use crate::support::{Env, PATIENCE, wait_until};
use crate::ui::{Ui, request};

const CHROMIUM_FLAGS: [&str; 12] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1280,960",
    "--force-device-scale-factor=1",
    "--hide-scrollbars",
];

/// A program on PATH (or at an absolute path), if it is there.
fn program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}

/// A chromedriver with one Chromium session, ended when dropped.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
    /// The browser's own profile, removed when the test ends.
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; `None` (with a notice) when they are not
    /// installed and not required.
    fn start() -> Option<Browser> {
        let required = std::env::var("FOREMAN_BROWSER_TESTS").is_ok_and(|v| v == "required");
        let chromium = program("chromium").or_else(|| program("chromium-browser"));
        let (Some(chromium), Some(driver)) = (chromium, program("chromedriver")) else {
            assert!(
                !required,
                "FOREMAN_BROWSER_TESTS=required, but chromium or chromedriver is missing (apt-get install chromium chromium-driver)"
            );
            eprintln!(
                "notice: skipping the browser tests: chromium and chromedriver are not installed \
                 (apt-get install chromium chromium-driver; .ci/run requires them)"
            );
            return None;
        };
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        // Owned at once, so that a failure from here on still ends the driver (and its browser).
        let mut browser = Browser {
            driver: child,
            addr: format!("127.0.0.1:{port}"),
            session: String::new(),
            profile: tempfile::tempdir().unwrap(),
        };
        let ready = wait_until(PATIENCE, || {
            std::net::TcpStream::connect(&browser.addr).is_ok()
                && request(&browser.addr, "GET", "/status", &[], None).json()["value"]["ready"]
                    == true
        });
        assert!(ready, "chromedriver did not get ready");
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!(
            "--user-data-dir={}",
            browser.profile.path().display()
        ));
        // Debian's Chromium opens a start page on the network otherwise, and the first
        // navigation waits for it.
        args.push("--no-default-browser-check".to_owned());
        args.push("about:blank".to_owned());
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let created = browser.call("POST", "/session", &capabilities);
        created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .clone_into(&mut browser.session);
        Some(browser)
    }

    /// A WebDriver command; returns its `value`.
    fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        let body = body.to_string();
        let body = (method != "GET").then_some(body.as_str());
        let response = request(
            &self.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            body,
        );
        assert!(
            response.status == 200,
            "WebDriver {method} {path}: {}",
            response.body
        );
        response.json()["value"].clone()
    }

    fn command(&self, method: &str, path: &str, body: &Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.command("POST", "/url", &json!({"url": url}));
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    fn eval(&self, script: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            &json!({"script": script, "args": []}),
        )
    }

    /// Polls `condition` (an expression) until it is true.
    fn wait_for(&self, condition: &str, what: &str) {
        let held = wait_until(PATIENCE, || {
            self.eval(&format!("return !!({condition});")) == true
        });
        let page = self.eval("return document.querySelector('main') ? document.querySelector('main').innerText.slice(0, 400) : ''");
        assert!(held, "{what}: `{condition}` never held; page: {page}");
    }

    /// Clicks the element `css` finds, as a user's mouse does; again if the page re-rendered it
    /// between the finding and the click.
    fn click(&self, css: &str) {
        let clicked = wait_until(PATIENCE, || {
            let found = self.command(
                "POST",
                "/element",
                &json!({"using": "css selector", "value": css}),
            );
            let Some(id) = found
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(Value::as_str)
            else {
                return false;
            };
            let path = format!("/session/{}/element/{id}/click", self.session);
            let response = request(
                &self.addr,
                "POST",
                &path,
                &[("Content-Type", "application/json")],
                Some("{}"),
            );
            response.status == 200
        });
        assert!(clicked, "could not click {css}");
    }

    /// The console's errors since the last call.
    fn console_errors(&self) -> Vec<String> {
        let entries = self.command("POST", "/se/log", &json!({"type": "browser"}));
        entries
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn screenshot(&self) -> Vec<u8> {
        let text = self.command("GET", "/screenshot", &json!({}));
        base64_decode(text.as_str().expect("base64 screenshot"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = request(&self.addr, "DELETE", &path, &[], None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => u32::from(c - b'A'),
        b'a'..=b'z' => u32::from(c - b'a') + 26,
        b'0'..=b'9' => u32::from(c - b'0') + 52,
        b'+' => 62,
        b'/' => 63,
        _ => 0,
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for chunk in clean.chunks(4) {
        let pad = chunk.iter().rev().take_while(|c| **c == b'=').count();
        let n = chunk.iter().fold(0u32, |n, c| (n << 6) | value(*c)) << (6 * (4 - chunk.len()));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad.min(2)]);
    }
    out
}

/// Per-minute figures for the last hour, as a busy daemon would have written them, so that the
/// charts have something to draw.
fn seed_figures(env: &Env) {
    let minute_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60;
    let minute_now = i64::try_from(minute_now).unwrap();
    let conn = env.sql();
    for back in 1..60i32 {
        let wave = (f64::from(back) / 6.0).sin();
        #[allow(clippy::cast_possible_truncation)] // Between 15 and 65.
        let done = (40.0 + 25.0 * wave) as i32;
        let failed = if back % 9 == 0 {
            3
        } else {
            i32::from(back % 4 == 0)
        };
        // Log-histogram buckets (4 a doubling from 100 µs): ~50 ms wall, ~3 ms wait.
        let wall =
            json!({"36": done / 2, "37": done / 3, "40": done - done / 2 - done / 3 + failed});
        let wait = json!({"17": done / 2, "20": done - done / 2 + failed - 2, (24 + back % 5).to_string(): 2});
        let ended = f64::from(done + failed);
        conn.execute(
            "INSERT INTO foreman_stat(minute, task_name, count, done, failed, wall_total, wall_max, \
             wait_total, wait_max, wall_hist, wait_hist) VALUES (?1, 'app.send_email', ?2, ?3, ?4, ?5, 0.3, ?6, 0.05, ?7, ?8)",
            rusqlite::params![
                minute_now - i64::from(back),
                done + failed,
                done,
                failed,
                0.05 * ended,
                0.003 * ended,
                wall.to_string(),
                wait.to_string()
            ],
        )
        .unwrap();
    }
}

fn save_screenshot(png: &[u8], name: &str, scratch: &Path) {
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{name}: not a real screenshot"
    );
    let bless = std::env::var_os("FOREMAN_BLESS").is_some();
    let dir = if bless {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/images")
    } else {
        scratch.to_path_buf()
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

const XSS_NAME: &str = "<script>window.foremanXss = 1</script>";
const XSS_IMG: &str = "<img src=x onerror=\"window.foremanXss = 2\">";

/// A page has rendered its data (and no error notice).
const RENDERED: &str =
    "document.querySelector('main h1, #verdict') && !document.querySelector('main .notice.bad')";

fn dead_count(env: &Env) -> i64 {
    env.sql()
        .query_row("SELECT count(*) FROM foreman_dead", [], |r| r.get(0))
        .unwrap()
}

/// A daemon that ran emails, failed resizes and buried two names made of markup; returns it
/// still running, with the id of a failed resize.
fn busy_database(env: &Env) -> (crate::support::Daemon, i64) {
    env.config(
        r#"
[tasks."app.send_email"]
command = ["sh", "-c", "sleep 0.02"]

[tasks."app.resize"]
command = ["sh", "-c", "echo 'ValueError: image too large' >&2; exit 1"]

[schedules.nightly_report]
task = "app.send_email"
args = ["ops@example.com"]
cron = "0 3 * * *"
"#,
    );
    env.init();
    seed_figures(env);
    let daemon = env.daemon(&[]);
    for i in 0..20 {
        env.ok(&[
            "enqueue",
            "app.send_email",
            &format!("[\"user{i}@example.com\"]"),
        ]);
    }
    for i in 0..3 {
        let args = format!("[\"photo{i}.jpg\"]");
        env.ok(&[
            "enqueue",
            "app.resize",
            &args,
            "--kwargs",
            "{\"width\": 4096}",
        ]);
    }
    for name in [XSS_NAME, XSS_IMG] {
        env.insert(name, "[\"<b>not bold</b>\"]");
    }
    env.touch_wakeup("browser-test");
    assert!(
        wait_until(PATIENCE, || dead_count(env) == 5 && env.queued() == 0),
        "tasks did not run"
    );
    let failed_task = env
        .sql()
        .query_row(
            "SELECT task_id FROM foreman_dead WHERE task_name = 'app.resize' ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    (daemon, failed_task)
}

/// Every page loads and renders with no console error.
fn every_page_loads_cleanly(browser: &Browser, ui: &Ui, failed_task: i64) {
    for page in [
        "/".to_owned(),
        "/tasks".to_owned(),
        format!("/tasks/{failed_task}"),
        "/tasks?state=history&name=app.resize".to_owned(),
        "/dead".to_owned(),
        "/errors".to_owned(),
        "/schedules".to_owned(),
        "/daemons".to_owned(),
    ] {
        browser.goto(&ui.url(&page));
        browser.wait_for(RENDERED, &page);
        let errors = browser.console_errors();
        assert!(errors.is_empty(), "{page}: console errors: {errors:?}");
    }
}

/// The overview (charts drawn, live) and a task's page.
fn take_screenshots(browser: &Browser, ui: &Ui, failed_task: i64) {
    let scratch = tempfile::tempdir().unwrap();
    browser.goto(&ui.url("/"));
    browser.wait_for("document.querySelectorAll('.uplot').length === 2", "charts");
    browser.wait_for(
        "document.getElementById('live').textContent === 'live'",
        "live",
    );
    save_screenshot(&browser.screenshot(), "overview.png", scratch.path());
    browser.goto(&ui.url(&format!("/tasks/{failed_task}")));
    browser.wait_for(RENDERED, "task page");
    save_screenshot(&browser.screenshot(), "task.png", scratch.path());
}

/// A count changes live after an enqueue, without a reload.
fn a_count_changes_live(browser: &Browser, ui: &Ui, env: &Env) {
    browser.goto(&ui.url("/"));
    browser.wait_for(
        "document.getElementById('live').textContent === 'live'",
        "live",
    );
    browser.wait_for("document.getElementById('queue-total')", "queue count");
    let loaded = browser.eval("return window.foremanLoadedAt;");
    let before = browser.eval("return document.getElementById('queue-total').textContent;");
    assert_eq!(before, "0");
    env.ok(&[
        "enqueue",
        "app.send_email",
        "[\"late@example.com\"]",
        "--delay",
        "1h",
    ]);
    browser.wait_for(
        "document.getElementById('queue-total').textContent === '1'",
        "live count",
    );
    assert_eq!(
        browser.eval("return window.foremanLoadedAt;"),
        loaded,
        "the page reloaded"
    );
}

/// A click on Requeue puts the dead letter back in foreman_task, with its origin.
fn requeue_by_click(browser: &Browser, ui: &Ui, env: &Env, failed_task: i64) {
    let dead_id: i64 = env
        .sql()
        .query_row(
            "SELECT id FROM foreman_dead WHERE task_id = ?1",
            [failed_task],
            |r| r.get(0),
        )
        .unwrap();
    let button = format!("tr[data-dead=\"{dead_id}\"] button.requeue");
    browser.goto(&ui.url("/dead"));
    browser.wait_for(&format!("document.querySelector('{button}')"), "dead row");
    browser.click(&button);
    browser.wait_for(
        "document.getElementById('dialog').open",
        "confirmation dialog",
    );
    browser.click("dialog button[type=submit]");
    browser.wait_for(
        "document.querySelector('dialog .result p')",
        "requeue result",
    );
    let origin = format!("requeue of dead {dead_id} (task {failed_task}) by ui");
    let back: i64 = env
        .sql()
        .query_row(
            "SELECT count(*) FROM foreman_task WHERE task_name = 'app.resize' AND origin = ?1",
            [&origin],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(back, 1, "no task with origin {origin:?}");
    assert_eq!(dead_count(env), 4);
    assert_eq!(
        browser.eval("return document.querySelector('dialog .result p').textContent;"),
        "Done: 1 of 1."
    );
}

/// Names holding markup are text: shown as those characters, and nothing runs.
fn markup_is_inert(browser: &Browser, ui: &Ui) {
    for page in ["/tasks?state=dead", "/dead", "/errors"] {
        browser.goto(&ui.url(page));
        browser.wait_for(RENDERED, page);
        let cells = browser.eval(
            "return [...document.querySelectorAll('td.name, td.err')].map((td) => td.textContent);",
        );
        let texts: Vec<&str> = cells
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for name in [XSS_NAME, XSS_IMG] {
            assert!(
                texts.iter().any(|t| t.contains(name)),
                "{page}: {name} not shown in {texts:?}"
            );
        }
        let elements = browser
            .eval("return document.querySelectorAll('main script, main img, main b').length;");
        assert_eq!(elements, 0, "{page}");
        assert_eq!(
            browser.eval("return window.foremanXss === undefined;"),
            true,
            "{page}: markup ran"
        );
    }
}

#[test]
fn the_dashboard_works_in_a_real_browser() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let env = Env::new();
    let (daemon, failed_task) = busy_database(&env);
    let ui = Ui::start(&env, &[]);
    every_page_loads_cleanly(&browser, &ui, failed_task);
    take_screenshots(&browser, &ui, failed_task);
    // The rest with the daemon down: the dashboard works without it, and rows stay put.
    daemon.stop();
    a_count_changes_live(&browser, &ui, &env);
    requeue_by_click(&browser, &ui, &env, failed_task);
    markup_is_inert(&browser, &ui);
    let errors = browser.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}
