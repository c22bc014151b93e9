//! Tidy tests: the docs and the public protocol agree with the code.

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
