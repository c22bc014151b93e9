//! Tidy tests: the docs and the public protocol agree with the code.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::support::Env;

fn repo_file(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

/// The user guide's pages (docs/guide/*.md) as one text: where a reader learns what a command does.
/// The generated docs/cli.md is left out, since it names every subcommand whatever the guide says.
fn user_guide() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/guide");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    pages.sort();
    assert!(!pages.is_empty(), "no pages in {}", dir.display());
    pages
        .iter()
        .map(|page| std::fs::read_to_string(page).unwrap())
        .collect()
}

#[test]
fn every_subcommand_is_documented_in_the_user_guide() {
    fn check(command: &clap::Command, name: &str, guide: &str) {
        for sub in command.get_subcommands() {
            let name = format!("{name} {}", sub.get_name());
            assert!(
                guide.contains(&name),
                "the user guide (docs/guide/*.md) does not document `{name}`"
            );
            check(sub, &name, guide);
        }
    }
    check(&foreman::cli::Cli::command(), "foreman", &user_guide());
}

#[test]
fn schema_sql_applied_by_hand_equals_what_init_creates() {
    let dump = |conn: &rusqlite::Connection| -> Vec<(String, String)> {
        conn.prepare("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let env = Env::new();
    env.init();
    let by_hand = rusqlite::Connection::open_in_memory().unwrap();
    by_hand.execute_batch(&repo_file("schema.sql")).unwrap();
    assert_eq!(dump(&env.sql()), dump(&by_hand));
    let version = |c: &rusqlite::Connection| {
        c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    assert_eq!(version(&env.sql()), version(&by_hand));
}

#[test]
fn the_plain_three_column_insert_keeps_working() {
    let env = Env::new();
    env.init();
    let conn = env.sql();
    conn.execute(
        "INSERT INTO foreman_task(task_name, args, kwargs) VALUES ('a', '[]', '{}')",
        [],
    )
    .unwrap();
    conn.execute("INSERT INTO foreman_task(task_name) VALUES ('b')", [])
        .unwrap();
    let (args, kwargs, created): (String, String, f64) = conn
        .query_row(
            "SELECT args, kwargs, created_at FROM foreman_task WHERE task_name = 'b'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((args.as_str(), kwargs.as_str()), ("[]", "{}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - created).abs() < 60.0,
        "created_at {created} is not a Unix time near {now}"
    );
}

/// The Markdown files a reader browses: every `*.md` outside hidden directories and `target/`.
fn markdown_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                markdown_files(&path, found);
            }
        } else if path.extension().is_some_and(|ext| ext == "md") {
            found.push(path);
        }
    }
}

/// The lines of a Markdown text outside fenced code blocks, with inline code spans removed: a
/// link or heading inside code is text, not markup.
fn prose_lines(text: &str) -> Vec<String> {
    let mut in_fence = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if !in_fence {
            let mut prose = String::new();
            for (i, part) in line.split('`').enumerate() {
                if i % 2 == 0 {
                    prose.push_str(part);
                }
            }
            lines.push(prose);
        }
    }
    lines
}

/// The anchors GitHub gives a file's headings: lowercase, punctuation dropped, spaces to hyphens,
/// and `-1`, `-2`… on repeats.
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        let hashes = line.len() - line.trim_start_matches('#').len();
        let title = &line[hashes..];
        if in_fence || !(1..=6).contains(&hashes) || !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .flat_map(char::to_lowercase)
            .collect();
        let mut anchor = slug.clone();
        let mut repeat = 0;
        while !seen.insert(anchor.clone()) {
            repeat += 1;
            anchor = format!("{slug}-{repeat}");
        }
    }
    seen
}

#[test]
fn markdown_links_point_to_files_and_headings_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    markdown_files(root, &mut files);
    assert!(files.iter().any(|f| f.ends_with("README.md")));
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(root).unwrap().display();
        for line in prose_lines(&text) {
            for piece in line.split("](").skip(1) {
                let Some(end) = piece.find(')') else { continue };
                let target = &piece[..end];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
                let linked = if path.is_empty() {
                    file.clone()
                } else {
                    file.parent().unwrap().join(path)
                };
                if !linked.exists() {
                    broken.push(format!("{shown}: ({target}): no file {path}"));
                } else if !anchor.is_empty()
                    && linked.extension().is_some_and(|ext| ext == "md")
                    && !anchors(&std::fs::read_to_string(&linked).unwrap()).contains(anchor)
                {
                    broken.push(format!("{shown}: ({target}): no heading #{anchor}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_are_the_ones_github_makes() {
    let text = "# Top\n## A sample foreman.toml\n```\n# not a heading\n```\n#nor this\n\
                ## Waiting for a task's outcome\n## foreman bench (in-process)\n## Top\n";
    let found = anchors(text);
    for anchor in [
        "top",
        "a-sample-foremantoml",
        "waiting-for-a-tasks-outcome",
        "foreman-bench-in-process",
        "top-1",
    ] {
        assert!(found.contains(anchor), "{anchor} not in {found:?}");
    }
    assert_eq!(found.len(), 5, "{found:?}");
}
