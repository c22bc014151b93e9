//! `foreman ui` over real HTTP against the real binary: the JSON API gives the CLI's answers, the
//! security headers and refusals (Host, cross-origin, read-only, token, proxy header), the event
//! stream's framing and its silence while nothing changes, keyset paging over 100,000 rows, and
//! bulk actions that apply to the frozen set of ids they were shown. `Ui` and `request` serve the
//! browser tests too.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Env, PATIENCE, stderr, wait_until};

/// A running `foreman ui`, stopped when dropped.
pub struct Ui {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its log (stderr), line by line.
    log: Arc<Mutex<Vec<String>>>,
}

impl Ui {
    /// Starts `foreman ui --bind 127.0.0.1:0 ARGS` in `env` and reads its URL, the first line it
    /// prints.
    pub fn start(env: &Env, args: &[&str]) -> Ui {
        Ui::start_bound(env, "127.0.0.1:0", args)
    }

    pub fn start_bound(env: &Env, bind: &str, args: &[&str]) -> Ui {
        let mut cmd = env.command(&["ui", "--bind", bind]);
        cmd.args(args);
        Ui::spawn(cmd)
    }

    /// Starts `cmd`, a `foreman … ui` command line, and reads its URL.
    pub fn spawn(mut cmd: Command) -> Ui {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn foreman ui");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stderr, sink) = (child.stderr.take().expect("piped stderr"), Arc::clone(&log));
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (send, lines) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = send.send(line);
        });
        let line = lines
            .recv_timeout(PATIENCE)
            .expect("foreman ui printed no URL");
        let addr = line
            .trim()
            .strip_prefix("http://")
            .and_then(|rest| rest.strip_suffix('/'))
            .unwrap_or_else(|| panic!("not a URL: {line:?}"))
            .to_owned();
        let addr = addr.replace("0.0.0.0", "127.0.0.1");
        Ui { child, addr, log }
    }

    /// Its log lines that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, &[], None)
    }

    pub fn get_json(&self, path: &str) -> Value {
        let response = self.get(path);
        assert_eq!(response.status, 200, "GET {path}: {}", response.body);
        response.json()
    }

    /// A POST as the dashboard's own page sends it.
    pub fn post(&self, path: &str, body: &Value) -> Response {
        let origin = format!("http://{}", self.addr);
        request(
            &self.addr,
            "POST",
            path,
            &[("Origin", &origin), ("Content-Type", "application/json")],
            Some(&body.to_string()),
        )
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request on a connection of its own (`Connection: close`); a `Host` header is
/// added unless `headers` has one.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        let _ = write!(head, "Host: {addr}\r\n");
    }
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let body = body.unwrap_or("");
    if method != "GET" {
        let _ = write!(head, "Content-Length: {}\r\n", body.len());
    }
    head.push_str("Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    // Read by the reply's own framing: a server may keep the connection open (chromedriver does).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let complete = |raw: &[u8]| -> bool {
        let text = String::from_utf8_lossy(raw);
        let Some((head, rest)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let head = head.to_ascii_lowercase();
        if let Some(length) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            return rest.len() >= length;
        }
        head.contains("transfer-encoding: chunked") && rest.ends_with("0\r\n\r\n")
    };
    while !complete(&raw) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{method} {path}: reading the reply: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        unchunk(rest)
    } else {
        rest.to_owned()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn unchunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

/// An open event stream: the frames `foreman ui` sends on `/api/events`.
struct Events {
    reader: BufReader<TcpStream>,
    /// A line read in part when a read timed out, and the frame read so far: the rest comes
    /// with the next read.
    line: Vec<u8>,
    event: String,
    data: String,
}

impl Events {
    fn open(ui: &Ui) -> (Events, String) {
        let mut stream = TcpStream::connect(&ui.addr).unwrap();
        write!(
            stream,
            "GET /api/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            ui.addr
        )
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        let deadline = Instant::now() + PATIENCE;
        while !head.ends_with("\r\n\r\n") && Instant::now() < deadline {
            let mut line = String::new();
            if reader.read_line(&mut line).is_ok() {
                head.push_str(&line);
            }
        }
        let events = Events {
            reader,
            line: Vec::new(),
            event: String::new(),
            data: String::new(),
        };
        (events, head)
    }

    /// The next `event: overview` frame's document, if one comes within `timeout`.
    fn next_overview(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            // A timeout leaves what it read in `self.line`: the rest of the line comes next.
            match self.reader.read_until(b'\n', &mut self.line) {
                Ok(0) => return None,
                Ok(_) if self.line.ends_with(b"\n") => {}
                Ok(_) | Err(_) => continue,
            }
            let whole = String::from_utf8(std::mem::take(&mut self.line)).expect("UTF-8");
            let line = whole.trim_end_matches('\n');
            if let Some(name) = line.strip_prefix("event: ") {
                name.clone_into(&mut self.event);
            } else if let Some(text) = line.strip_prefix("data: ") {
                self.data.push_str(text);
            } else if line.is_empty() {
                let data = std::mem::take(&mut self.data);
                if std::mem::take(&mut self.event) == "overview" {
                    return Some(serde_json::from_str(&data).expect("a frame's data is JSON"));
                }
            }
        }
        None
    }
}

fn health_json(env: &Env) -> Value {
    let out = env.run(&["health", "--json"]);
    serde_json::from_slice(&out.stdout).expect("health --json")
}

#[test]
fn the_api_gives_the_clis_answers_while_the_daemon_is_down() {
    let env = Env::new();
    env.init();
    env.ok(&["enqueue", "a", "[1]"]);
    env.ok(&["enqueue", "a", "[2]", "--delay", "1h"]);
    let ui = Ui::start(&env, &[]);
    let overview = ui.get_json("/api/overview");
    let health = health_json(&env);
    assert_eq!(overview["health"]["reason"], health["reason"]);
    assert_eq!(overview["health"]["reason"], "daemon_down");
    assert_eq!(overview["health"]["message"], health["message"]);
    let status: Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(overview["queue"]["total"], 2);
    for key in ["queued", "due", "delayed", "leased"] {
        assert_eq!(
            overview["queue"]["by_task"]["a"][key], status["queue"]["by_task"]["a"][key],
            "{key}"
        );
    }
    assert_eq!(overview["daemon"]["running"], false);
    // Every page is the shell; every page's twin answers.
    for page in [
        "/",
        "/tasks",
        "/tasks/1",
        "/dead",
        "/errors",
        "/schedules",
        "/daemons",
    ] {
        let response = ui.get(page);
        assert_eq!(response.status, 200, "{page}");
        assert!(response.body.contains("/assets/app.js"), "{page}");
    }
    for api in [
        "/api/stats?window=24h",
        "/api/tasks?state=queued",
        "/api/tasks/1",
        "/api/dead",
        "/api/errors",
        "/api/schedules",
        "/api/daemons",
    ] {
        ui.get_json(api);
    }
    let task = ui.get_json("/api/tasks/2");
    let show: Value = serde_json::from_str(&env.ok(&["show", "2", "--json"])).unwrap();
    assert_eq!(task["state"], show["state"], "foreman show's answer");
    assert_eq!(task["args"], json!([2]));
    assert_eq!(task["cancellable"], true);
    assert_eq!(ui.get("/api/tasks/99").status, 404);
    assert_eq!(ui.get("/nowhere").status, 404);
    let later = ui.get_json("/api/tasks?state=later");
    assert_eq!(later["tasks"].as_array().unwrap().len(), 1);
    assert_eq!(later["count"], json!({"count": 1, "more": false}));
    assert_eq!(ui.get("/api/tasks?state=bogus").status, 400);
}

#[test]
fn replies_carry_security_headers_and_foreign_requests_are_refused() {
    let env = Env::new();
    env.init();
    let ui = Ui::start(&env, &[]);
    let page = ui.get("/");
    let csp = page.header("Content-Security-Policy").unwrap_or_default();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(page.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(page.header("X-Frame-Options"), Some("DENY"));
    assert!(
        !page.body.contains("<script>"),
        "no inline script in the shell"
    );
    let asset = ui.get("/assets/app.js");
    let etag = asset.header("ETag").unwrap().to_owned();
    let cached = request(
        &ui.addr,
        "GET",
        "/assets/app.js",
        &[("If-None-Match", &etag)],
        None,
    );
    assert_eq!(cached.status, 304);
    // DNS rebinding: a page of another site reaching this port under its own name.
    let rebound = request(
        &ui.addr,
        "GET",
        "/api/overview",
        &[("Host", "evil.example:80")],
        None,
    );
    assert_eq!(rebound.status, 421, "{}", rebound.body);
    let localhost = request(
        &ui.addr,
        "GET",
        "/api/overview",
        &[("Host", &ui.addr.replace("127.0.0.1", "localhost"))],
        None,
    );
    assert_eq!(localhost.status, 200);
    let enqueue = json!({"name": "a"}).to_string();
    let post = |headers: &[(&str, &str)]| {
        request(&ui.addr, "POST", "/api/enqueue", headers, Some(&enqueue))
    };
    let json_type = ("Content-Type", "application/json");
    for (headers, status) in [
        (vec![json_type], 403),
        (vec![json_type, ("Origin", "http://evil.example")], 403),
        (vec![json_type, ("Sec-Fetch-Site", "cross-site")], 403),
        (
            vec![
                ("Content-Type", "text/plain"),
                ("Sec-Fetch-Site", "same-origin"),
            ],
            415,
        ),
    ] {
        let response = post(&headers);
        assert_eq!(response.status, status, "{headers:?}: {}", response.body);
    }
    assert_eq!(env.queued(), 0, "no refused POST enqueued anything");
    let ok = post(&[json_type, ("Sec-Fetch-Site", "same-origin")]);
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(env.queued(), 1);
    let origin: Option<String> = env
        .sql()
        .query_row("SELECT origin FROM foreman_task", [], |r| r.get(0))
        .unwrap();
    assert_eq!(origin.as_deref(), Some("ui"));
}

#[test]
fn read_only_opens_the_database_read_only_and_refuses_every_post() {
    let env = Env::new();
    env.init();
    let id: i64 = env.ok(&["enqueue", "a"]).trim().parse().unwrap();
    let ui = Ui::start(&env, &["--read-only"]);
    assert_eq!(ui.get_json("/api/overview")["ui"]["read_only"], true);
    for (path, body) in [
        ("/api/enqueue", json!({"name": "a"})),
        ("/api/tasks/cancel", json!({"ids": [id]})),
        ("/api/dead/purge", json!({"ids": [1], "confirm": "purge 1"})),
    ] {
        let response = ui.post(path, &body);
        assert_eq!(response.status, 403, "{path}: {}", response.body);
        assert!(response.body.contains("read-only"), "{}", response.body);
    }
    assert_eq!(env.queued(), 1);
    // Every descriptor it holds on the database file is read-only.
    let db = std::fs::canonicalize(&env.db).unwrap();
    let mut seen = 0;
    for fd in std::fs::read_dir(format!("/proc/{}/fd", ui.pid())).unwrap() {
        let fd = fd.unwrap();
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(db.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{}/fdinfo/{}",
            ui.pid(),
            fd.file_name().to_string_lossy()
        ))
        .unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        assert_eq!(flags & 0o3, 0, "opened for writing: {info}");
        seen += 1;
    }
    assert!(seen > 0, "the database is open");
}

#[test]
fn a_non_loopback_address_needs_a_token_and_the_token_is_checked() {
    let env = Env::new();
    env.init();
    let out = env.run(&["ui", "--bind", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs --token"), "{}", stderr(&out));
    let spaced = env.run(&["ui", "--bind", "0.0.0.0:0", "--token", "two words"]);
    assert_eq!(spaced.status.code(), Some(2), "{}", stderr(&spaced));
    let ui = Ui::start_bound(&env, "0.0.0.0:0", &["--token", "s3cret"]);
    assert_eq!(ui.get("/api/overview").status, 401);
    assert_eq!(ui.get("/").status, 401);
    let bearer = request(
        &ui.addr,
        "GET",
        "/api/overview",
        &[("Authorization", "Bearer s3cret")],
        None,
    );
    assert_eq!(bearer.status, 200);
    let wrong = request(
        &ui.addr,
        "GET",
        "/api/overview",
        &[("Authorization", "Bearer s3cre7")],
        None,
    );
    assert_eq!(wrong.status, 401);
    let link = ui.get("/tasks?token=s3cret&state=due");
    assert_eq!(link.status, 303);
    assert_eq!(link.header("Location"), Some("/tasks?state=due"));
    let cookie = link.header("Set-Cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap();
    // The redirect is built from the path as it came: an encoded line break stays encoded.
    let split = ui.get("/tasks%0d%0aSet-Cookie:%20x=1?token=s3cret");
    assert_eq!(split.status, 303);
    assert_eq!(
        split.header("Location"),
        Some("/tasks%0d%0aSet-Cookie:%20x=1")
    );
    assert!(
        split
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
            .count()
            == 1
    );
    let with_cookie = request(
        &ui.addr,
        "GET",
        "/api/overview",
        &[("Cookie", cookie)],
        None,
    );
    assert_eq!(with_cookie.status, 200);
    // An API client that sends the token itself needs no Origin (a browser never sends it for
    // another site).
    let post = request(
        &ui.addr,
        "POST",
        "/api/enqueue",
        &[
            ("Authorization", "Bearer s3cret"),
            ("Content-Type", "application/json"),
        ],
        Some(r#"{"name": "a"}"#),
    );
    assert_eq!(post.status, 200, "{}", post.body);
}

#[test]
fn the_proxys_user_is_required_logged_and_recorded_as_the_origin() {
    let env = Env::new();
    env.init();
    let ui = Ui::start(&env, &["--proxy-user-header", "X-Forwarded-User"]);
    assert_eq!(ui.get("/api/overview").status, 401);
    let origin = format!("http://{}", ui.addr);
    let response = request(
        &ui.addr,
        "POST",
        "/api/enqueue",
        &[
            ("X-Forwarded-User", "alice"),
            ("Origin", &origin),
            ("Content-Type", "application/json"),
        ],
        Some(r#"{"name": "a", "args": "[1]", "priority": 5}"#),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let (origin, priority): (String, i64) = env
        .sql()
        .query_row("SELECT origin, priority FROM foreman_task", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((origin.as_str(), priority), ("alice (ui)", 5));
}

#[test]
fn events_are_framed_follow_commits_and_stay_quiet_while_nothing_changes() {
    let env = Env::new();
    env.init();
    let ui = Ui::start(&env, &[]);
    let (mut events, head) = Events::open(&ui);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Type: text/event-stream"), "{head}");
    assert!(head.contains("Content-Security-Policy"), "{head}");
    let first = events.next_overview(PATIENCE).expect("a first snapshot");
    assert_eq!(first["queue"]["total"], 0);
    // Nothing changes: no snapshot is taken (and so no query is made) until something does.
    assert!(
        events.next_overview(Duration::from_millis(2500)).is_none(),
        "a snapshot while nothing changed"
    );
    env.ok(&["enqueue", "a", "--delay", "1h"]);
    let mut total = Value::Null;
    assert!(
        wait_until(PATIENCE, || {
            total = events
                .next_overview(Duration::from_secs(1))
                .map_or(Value::Null, |doc| doc["queue"]["total"].clone());
            total == 1
        }),
        "no snapshot with the new task: {total}"
    );
}

#[test]
fn tasks_page_by_keyset_over_100_000_rows_and_counts_stop_at_a_cap() {
    let env = Env::new();
    env.init();
    env.sql()
        .execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
             INSERT INTO foreman_task(id, task_name, args, run_after)
             SELECT i, CASE WHEN i = 7 THEN 'rare' ELSE 'bulk' END, '[' || i || ']', 4102444800 FROM n;",
        )
        .unwrap();
    let ui = Ui::start(&env, &[]);
    let first = ui.get_json("/api/tasks?limit=1000");
    assert_eq!(first["count"], json!({"count": 10000, "more": true}));
    let mut seen = Vec::with_capacity(100_000);
    let mut path = "/api/tasks?limit=1000".to_owned();
    loop {
        let page = ui.get_json(&path);
        seen.extend(
            page["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_i64().unwrap()),
        );
        match page["next_before"].as_i64() {
            Some(before) => path = format!("/api/tasks?limit=1000&before={before}"),
            None => break,
        }
    }
    let expected: Vec<i64> = (1..=100_000).rev().collect();
    assert!(
        seen == expected,
        "every id once, newest first ({} seen)",
        seen.len()
    );
    let rare = ui.get_json("/api/tasks?name=rare");
    assert_eq!(rare["tasks"][0]["id"], 7);
    assert_eq!(rare["count"], json!({"count": 1, "more": false}));
    let search = ui.get_json("/api/tasks?q=%5B99999%5D");
    assert_eq!(search["tasks"][0]["id"], 99_999);
}

fn bury(env: &Env, task_id: i64, name: &str) {
    env.sql()
        .execute(
            "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, reason, attempts) \
             VALUES (?1, ?2, '[1]', '{}', 'failed: ValueError: nope', 1)",
            rusqlite::params![task_id, name],
        )
        .unwrap();
}

#[test]
fn bulk_actions_apply_to_the_frozen_set_they_showed() {
    let env = Env::new();
    env.init();
    for task in 1..=3 {
        bury(&env, task, "mail");
    }
    bury(&env, 4, "other");
    let ui = Ui::start(&env, &[]);
    let shown = ui.get_json("/api/dead/ids?name=mail");
    assert_eq!(shown["ids"], json!([1, 2, 3]));
    // A dead letter that arrives after the user saw the count is not part of the action.
    bury(&env, 5, "mail");
    let requeued = ui.post("/api/dead/requeue", &json!({"ids": shown["ids"]}));
    assert_eq!(requeued.status, 200, "{}", requeued.body);
    assert_eq!(requeued.json()["done"], 3);
    let left: Vec<i64> = env
        .sql()
        .prepare("SELECT task_id FROM foreman_dead ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(left, [4, 5]);
    let origins: Vec<String> = env
        .sql()
        .prepare("SELECT origin FROM foreman_task ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(origins[0], "requeue of dead 1 (task 1) by ui");
    assert_eq!(origins.len(), 3);
    // A purge must be confirmed with its count typed, and takes exactly the ids given.
    let unconfirmed = ui.post(
        "/api/dead/purge",
        &json!({"ids": [4, 5], "confirm": "purge"}),
    );
    assert_eq!(unconfirmed.status, 400, "{}", unconfirmed.body);
    assert!(unconfirmed.body.contains("purge 2"), "{}", unconfirmed.body);
    let purged = ui.post(
        "/api/dead/purge",
        &json!({"ids": [4], "confirm": "purge 1"}),
    );
    assert_eq!(purged.json()["done"], 1);
    assert_eq!(
        ui.get_json("/api/dead")["count"],
        json!({"count": 1, "more": false})
    );
    // Cancel takes the queued ids it is given, each answered with the CLI's line.
    let queued = ui.get_json("/api/tasks/ids");
    assert_eq!(queued["ids"].as_array().unwrap().len(), 3);
    let cancelled = ui.post(
        "/api/tasks/cancel",
        &json!({"ids": [queued["ids"][0], 999]}),
    );
    let doc = cancelled.json();
    assert_eq!(doc["done"], 1);
    assert_eq!(doc["lines"][1], "no task 999");
    assert_eq!(env.queued(), 2);
}

#[test]
fn run_now_fires_a_schedule_through_its_firing_code() {
    let env = Env::new();
    env.config(
        "[tasks.report]\ncommand = [\"true\"]\n\n[schedules.nightly]\ntask = \"report\"\nargs = [\"all\"]\ncron = \"0 3 * * *\"\n",
    );
    env.init();
    let ui = Ui::start(&env, &[]);
    let listed = ui.get_json("/api/schedules");
    assert_eq!(listed["schedules"][0]["name"], "nightly");
    assert_eq!(listed["schedules"][0]["when"], "cron 0 3 * * *");
    let ran = ui.post("/api/schedules/run", &json!({"name": "nightly"}));
    assert_eq!(ran.status, 200, "{}", ran.body);
    let id = ran.json()["task_id"].as_i64().unwrap();
    let (name, args, origin): (String, String, String) = env
        .sql()
        .query_row(
            "SELECT task_name, args, origin FROM foreman_task WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((name.as_str(), args.as_str()), ("report", "[\"all\"]"));
    assert_eq!(origin, "schedule nightly, run now by ui");
    let after = ui.get_json("/api/schedules");
    assert_eq!(after["schedules"][0]["last_task_id"], id);
    assert_eq!(after["schedules"][0]["last_task_state"], "queued");
    assert_eq!(
        ui.post("/api/schedules/run", &json!({"name": "nope"}))
            .status,
        400
    );
}

crate::on_both! {
    /// The dashboard's own reads and actions, on SQLite and on PostgreSQL: counts, a search that
    /// looks in errors, dead letters paged, selected and requeued by who asked, a purge, failure
    /// groups, a schedule run now, and on PostgreSQL every daemon of the shared database.
    fn the_dashboard_reads_and_acts_the_same_on_both_backends(env: Env) {
        env.config(
            "[tasks.report]\ncommand = [\"true\"]\n\n[schedules.nightly]\ntask = \"report\"\ncron = \"0 3 * * *\"\n",
        );
        env.init();
        env.ok(&["enqueue", "a", "[1]"]);
        env.ok(&["enqueue", "a", "[2]", "--delay", "1h"]);
        for (task, name) in [(11, "mail"), (12, "mail"), (13, "mail"), (14, "other")] {
            env.rows(&format!(
                "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, reason, attempts) \
                 VALUES ({task}, '{name}', '[1]', '{{}}', 'failed: ValueError: nope {task}', 1)"
            ));
        }
        let ui = Ui::start(&env, &[]);
        let overview = ui.get_json("/api/overview");
        assert_eq!(overview["queue"]["total"], 2);
        assert_eq!(overview["dead"], 4);
        assert_eq!(overview["shared"], env.is_pg());
        let later = ui.get_json("/api/tasks?state=later");
        assert_eq!(later["count"], json!({"count": 1, "more": false}));
        let found = ui.get_json("/api/tasks?state=dead&q=nope%2013");
        assert_eq!(found["tasks"][0]["id"], 13, "a search looks in the reason");
        let dead = ui.get_json("/api/dead?limit=2");
        assert_eq!(dead["dead"].as_array().map(Vec::len), Some(2), "{dead}");
        let next = ui.get_json(&format!("/api/dead?limit=2&before={}", dead["next_before"]));
        assert_eq!(next["dead"].as_array().map(Vec::len), Some(2), "{next}");
        assert_eq!(dead["count"], json!({"count": 4, "more": false}));
        let errors = ui.get_json("/api/errors");
        assert!(errors.to_string().contains("ValueError"), "{errors}");
        let shown = ui.get_json("/api/dead/ids?name=mail");
        assert_eq!(shown["ids"].as_array().map(Vec::len), Some(3));
        let requeued = ui.post("/api/dead/requeue", &json!({"ids": shown["ids"]}));
        assert_eq!(requeued.json()["done"], 3, "{}", requeued.body);
        let origins = env.rows("SELECT origin FROM foreman_task WHERE task_name = 'mail'");
        assert_eq!(origins.len(), 3);
        assert!(
            origins
                .iter()
                .all(|o| o[0].as_deref().is_some_and(|o| o.ends_with("by ui"))),
            "{origins:?}"
        );
        let left = ui.get_json("/api/dead/ids");
        let purged = ui.post(
            "/api/dead/purge",
            &json!({"ids": left["ids"], "confirm": "purge 1"}),
        );
        assert_eq!(purged.json()["done"], 1, "{}", purged.body);
        assert_eq!(env.number("SELECT count(*) FROM foreman_dead"), 0);
        let ran = ui.post("/api/schedules/run", &json!({"name": "nightly"}));
        assert_eq!(ran.status, 200, "{}", ran.body);
        let id = ran.json()["task_id"].as_i64().unwrap();
        let origin = env.rows(&format!("SELECT origin FROM foreman_task WHERE id = {id}"));
        assert_eq!(
            origin[0][0].as_deref(),
            Some("schedule nightly, run now by ui")
        );
        let daemons = ui.get_json("/api/daemons");
        assert_eq!(daemons["shared"], env.is_pg());
    }
}

/// Waits for an overview event that `wanted` accepts; panics, with the last one seen and the
/// dashboard's log, after `PATIENCE`.
fn overview_where(
    events: &mut Events,
    ui: &Ui,
    what: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Some(doc) = events.next_overview(Duration::from_millis(500)) {
            if wanted(&doc) {
                return doc;
            }
            last = doc;
        }
    }
    panic!(
        "no overview event {what}; the last one: {last}; the dashboard's log:\n{}",
        ui.log_lines("").join("\n")
    );
}

/// The dashboard's connections as the server sees them: each backend's pid and when its state
/// last changed. A statement run on any of them (even `BEGIN`) moves its `state_change`; a
/// notification it receives does not.
fn backends(sql: &mut postgres::Client, application: &str) -> Vec<(i32, String)> {
    sql.query(
        "SELECT pid, state_change::text FROM pg_stat_activity \
         WHERE application_name = $1 ORDER BY pid",
        &[&application],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Notifications on `client`'s channels that came since the last call.
fn notified(client: &mut postgres::Client) -> usize {
    use postgres::fallible_iterator::FallibleIterator as _;
    client
        .notifications()
        .timeout_iter(Duration::from_millis(50))
        .count()
        .unwrap()
}

#[test]
fn on_postgresql_events_follow_notifications_and_no_query_is_made_while_nothing_changes() {
    let Some(env) = Env::pg() else { return };
    // The daemon beats every second; its task runs until the test creates `release`.
    env.config(
        "heartbeat = \"1s\"\n\n[tasks.hold]\ncommand = [\"sh\", \"-c\", \"while [ ! -e release ]; do sleep 0.05; done\"]\n",
    );
    // The dashboard's own staleness timer (six of its heartbeats) is an hour away: every event
    // after the first is one that a notification caused.
    std::fs::write(env.path("ui.toml"), "heartbeat = \"10m\"\n").unwrap();
    env.init();
    let daemon = env.daemon(&[]);
    let application = "foreman-ui-under-test";
    let url = format!(
        "{}&application_name={application}",
        env.pg.as_ref().unwrap().url()
    );
    let ui = Ui::spawn(env.command_without_db(&[
        "--db",
        &url,
        "--config",
        "ui.toml",
        "ui",
        "--bind",
        "127.0.0.1:0",
    ]));
    let mut sql = env.pg_sql();
    let mut heard = env.pg_sql();
    heard.batch_execute("LISTEN foreman_changed").unwrap();
    let (mut events, _) = Events::open(&ui);
    let first = events.next_overview(PATIENCE).expect("a first snapshot");
    assert_eq!(first["queue"]["total"], 0);

    // Nothing changes: the daemon beats, the dashboard asks nothing.
    let idle_backends = backends(&mut sql, application);
    assert!(
        idle_backends.len() >= 2,
        "the dashboard listens and reads: {idle_backends:?}"
    );
    let beat = || {
        env.number(
            "SELECT (extract(epoch FROM max(heartbeat_at)) * 1000)::int8 FROM foreman_daemon",
        )
    };
    let beat_before = beat();
    notified(&mut heard);
    assert!(
        events.next_overview(Duration::from_secs(4)).is_none(),
        "a snapshot while nothing changed"
    );
    assert!(beat() > beat_before, "the daemon beat meanwhile");
    assert_eq!(
        backends(&mut sql, application),
        idle_backends,
        "the dashboard's connections ran a statement while nothing changed"
    );
    assert_eq!(
        notified(&mut heard),
        0,
        "an idle daemon announced something"
    );

    // A task that nobody notified: the daemon finds it, and its heartbeat tells the dashboard
    // that it started, then that it ended.
    let id = env.insert("hold", "[]");
    let started = format!("SELECT count(*) FROM foreman_run WHERE task_id = {id}");
    assert!(
        wait_until(PATIENCE, || env.number(&started) == 1),
        "the daemon never started task {id}; its log:\n{}",
        daemon.log()
    );
    overview_where(&mut events, &ui, "with the task running", |doc| {
        doc["running"]
            .as_array()
            .is_some_and(|r| r.iter().any(|t| t["task_id"] == id))
    });
    assert_ne!(
        backends(&mut sql, application),
        idle_backends,
        "the measure sees the dashboard's reads"
    );
    std::fs::write(env.path("release"), b"").unwrap();
    overview_where(&mut events, &ui, "with the task ended", |doc| {
        doc["running"].as_array().is_some_and(Vec::is_empty) && doc["queue"]["total"] == 0
    });
    assert!(notified(&mut heard) > 0, "the daemon announced its work");

    // A producer's NOTIFY foreman: a task delayed an hour (no daemon claims it, none announces).
    sql.batch_execute(
        "INSERT INTO foreman_task(task_name, run_after) VALUES ('hold', now() + interval '1 hour'); \
         NOTIFY foreman",
    )
    .unwrap();
    overview_where(&mut events, &ui, "with the producer's task", |doc| {
        doc["queue"]["total"] == 1
    });
    assert_eq!(
        notified(&mut heard),
        0,
        "no daemon announced the producer's task"
    );

    // A daemon that stops says so.
    daemon.stop();
    overview_where(&mut events, &ui, "with the daemon stopped", |doc| {
        doc["daemons"][0]["stopped_at"].is_number()
    });
}

#[test]
fn on_postgresql_the_clis_changes_that_wake_no_daemon_reach_the_page() {
    let Some(env) = Env::pg() else { return };
    // No daemon, and the dashboard's periodic read an hour away: only notifications count.
    std::fs::write(env.path("ui.toml"), "heartbeat = \"10m\"\n").unwrap();
    env.init();
    let ui = Ui::start(&env, &["--config", "ui.toml"]);
    let (mut events, _) = Events::open(&ui);
    let first = events.next_overview(PATIENCE).expect("a first snapshot");
    assert_eq!(first["queue"]["total"], 0);
    // A delayed enqueue notifies no daemon; a cancel of a queued task neither.
    let delayed: i64 = env
        .ok(&["enqueue", "hold", "--delay", "1h"])
        .trim()
        .parse()
        .unwrap();
    overview_where(&mut events, &ui, "with the CLI's delayed task", |doc| {
        doc["queue"]["total"] == 1
    });
    env.ok(&["cancel", &delayed.to_string()]);
    overview_where(&mut events, &ui, "without the cancelled task", |doc| {
        doc["queue"]["total"] == 0
    });
}

#[test]
fn on_postgresql_without_listen_the_dashboard_polls_and_says_so_once() {
    let Some(env) = Env::pg() else { return };
    env.config("listen = false\n");
    env.init();
    let ui = Ui::start(&env, &[]);
    let (mut events, _) = Events::open(&ui);
    events.next_overview(PATIENCE).expect("a first snapshot");
    // Nobody notifies: the poll finds it.
    env.insert("a", "[]");
    overview_where(&mut events, &ui, "with the new task", |doc| {
        doc["queue"]["total"] == 1
    });
    // A second page, and the first closed: still said once.
    drop(events);
    let (mut again, _) = Events::open(&ui);
    again.next_overview(PATIENCE).expect("a snapshot");
    let said = ui.log_lines("listen = false: reading the overview every 2s");
    assert_eq!(said.len(), 1, "{said:?}");
}

#[test]
fn on_postgresql_a_lost_listen_connection_falls_back_to_polling_then_listens_again() {
    let Some(env) = Env::pg() else { return };
    env.init();
    let ui = Ui::start(&env, &[]);
    let (mut events, _) = Events::open(&ui);
    events.next_overview(PATIENCE).expect("a first snapshot");
    let mut sql = env.pg_sql();
    // The server ends the dashboard's LISTEN connection (a restart, a pooler, an operator).
    let ended: i64 = sql
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'foreman ui (listen)'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(ended, 1, "the dashboard's LISTEN connection, by its name");
    assert!(
        wait_until(PATIENCE, || !ui
            .log_lines("cannot LISTEN for changes")
            .is_empty()),
        "no warning"
    );
    // Meanwhile a change nobody notifies is found by polling.
    env.insert("a", "[]");
    overview_where(&mut events, &ui, "with the new task", |doc| {
        doc["queue"]["total"] == 1
    });
    assert!(
        wait_until(PATIENCE, || !ui.log_lines("LISTEN works again").is_empty()),
        "it never listened again"
    );
    assert_eq!(ui.log_lines("cannot LISTEN for changes").len(), 1);
    // Listening again: a producer's NOTIFY is heard.
    sql.batch_execute("INSERT INTO foreman_task(task_name) VALUES ('b'); NOTIFY foreman")
        .unwrap();
    overview_where(&mut events, &ui, "with the second task", |doc| {
        doc["queue"]["total"] == 2
    });
}
