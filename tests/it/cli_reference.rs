//! docs/cli.md, the command-line reference, is the real binary's `--help` output: this test
//! regenerates it (`foreman --help`, then `foreman <subcommand> --help` for every subcommand that
//! output lists, nested ones included) and fails when the committed file differs, so the reference
//! cannot drift from the code. `FOREMAN_BLESS=1 cargo test --test it cli_reference` rewrites it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{BIN, stderr};

const REGENERATE: &str = "FOREMAN_BLESS=1 cargo test --test it cli_reference";

fn reference_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md")
}

/// `foreman ARGS --help`, run with an empty environment: clap prints the values of `FOREMAN_*`
/// variables it finds (`[env: FOREMAN_DB=/srv/q]`) and colours by `CLICOLOR_FORCE`, and neither
/// belongs in a document. Trailing spaces are dropped (clap pads blank lines of long help), so an
/// editor that strips them cannot make the file stale.
fn help(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--help")
        .env_clear()
        .env("COLUMNS", "100")
        .output()
        .expect("run foreman --help");
    assert!(
        out.status.success(),
        "foreman {} --help exited with {}: {}",
        args.join(" "),
        out.status,
        stderr(&out)
    );
    let text = String::from_utf8(out.stdout).expect("--help output is UTF-8");
    let mut lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines.join("\n")
}

/// The subcommands a help text lists under `Commands:`, without clap's own `help`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| *line != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        // Entries are indented by two spaces; a deeper indent continues a wrapped description.
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Every command path, depth first: `[]` (foreman itself), `["init"]`, …, `["dead"]`,
/// `["dead", "list"]`, … with its help text.
fn commands(path: &[String], out: &mut Vec<(Vec<String>, String)>) {
    let args: Vec<&str> = path.iter().map(String::as_str).collect();
    let text = help(&args);
    let subs = subcommands(&text);
    out.push((path.to_vec(), text));
    for sub in subs {
        let mut next = path.to_vec();
        next.push(sub);
        commands(&next, out);
    }
}

fn title(path: &[String]) -> String {
    std::iter::once("foreman")
        .chain(path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// GitHub's anchor for a heading made of lowercase words and hyphens.
fn anchor(title: &str) -> String {
    title.replace(' ', "-")
}

fn generate() -> String {
    let mut all = Vec::new();
    commands(&[], &mut all);
    let names: Vec<String> = all.iter().map(|(path, _)| title(path)).collect();
    for expected in ["foreman run", "foreman enqueue", "foreman dead list"] {
        assert!(
            names.iter().any(|n| n == expected),
            "`{expected}` was not found by parsing the `Commands:` sections of --help \
             (found: {names:?}); has clap's help layout changed?"
        );
    }
    let mut doc = String::new();
    doc.push_str("# Command-line reference\n\n");
    write!(
        doc,
        "<!-- Generated from the `foreman` binary's --help output by tests/it/cli_reference.rs.\n     \
         Do not edit: change the help text in the code, then run\n     {REGENERATE} -->\n\n"
    )
    .unwrap();
    doc.push_str(
        "Every subcommand's `--help`, as the binary prints it. Global options (`--db`, \
         `--wakeup-dir`,\n`--config`, `--pid-file`, `--log-level`) work before or after the \
         subcommand;\n`foreman help <subcommand>` prints the same as `foreman <subcommand> \
         --help`. The [user guide](README.md)\nexplains what the commands do.\n\n",
    );
    for name in &names {
        writeln!(doc, "- [{name}](#{})", anchor(name)).unwrap();
    }
    for (name, (_, text)) in names.iter().zip(&all) {
        write!(doc, "\n## {name}\n\n```text\n{text}\n```\n").unwrap();
    }
    doc
}

/// A line diff of the two texts (longest common subsequence; the file is a few hundred lines), as
/// `-` (the file) and `+` (--help) lines with two lines of context, at most 40 lines of it, so a
/// failure shows what changed without a diff tool.
fn excerpt(old: &str, new: &str) -> String {
    let old: Vec<&str> = old.lines().collect();
    let new: Vec<&str> = new.lines().collect();
    // common[i][j]: the longest common subsequence of old[i..] and new[j..].
    let mut common = vec![vec![0u32; new.len() + 1]; old.len() + 1];
    for i in (0..old.len()).rev() {
        for j in (0..new.len()).rev() {
            common[i][j] = if old[i] == new[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut lines: Vec<(char, &str)> = Vec::new();
    while i < old.len() || j < new.len() {
        if i < old.len() && j < new.len() && old[i] == new[j] {
            lines.push((' ', old[i]));
            (i, j) = (i + 1, j + 1);
        } else if i < old.len() && (j == new.len() || common[i + 1][j] >= common[i][j + 1]) {
            lines.push(('-', old[i]));
            i += 1;
        } else {
            lines.push(('+', new[j]));
            j += 1;
        }
    }
    let near_a_change = |k: usize| {
        lines[k.saturating_sub(2)..(k + 3).min(lines.len())]
            .iter()
            .any(|(sign, _)| *sign != ' ')
    };
    let mut text = String::new();
    let mut shown = 0;
    let mut skipped = false;
    for (k, (sign, line)) in lines.iter().enumerate() {
        if !near_a_change(k) {
            skipped = true;
            continue;
        }
        if shown == 40 {
            text.push_str("…\n");
            break;
        }
        if skipped && !text.is_empty() {
            text.push_str("…\n");
        }
        skipped = false;
        writeln!(text, "{sign} {line}").unwrap();
        shown += 1;
    }
    text
}

#[test]
fn docs_cli_md_is_the_binarys_help_output() {
    let path = reference_path();
    let fresh = generate();
    if std::env::var_os("FOREMAN_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write docs/cli.md");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "docs/cli.md is stale: it is not what the binary's --help prints now.\n\
         Regenerate it with `{REGENERATE}` and commit it.\n\n{}",
        excerpt(&committed, &fresh)
    );
}

#[test]
fn subcommands_are_read_from_the_commands_section() {
    let help = "Usage: x <COMMAND>\n\nCommands:\n  list     List them\n  \
                requeue  Queue them again, a description\n           wrapped onto a second line\n  \
                help     Print this message\n\nOptions:\n  -h, --help  Print help\n";
    assert_eq!(subcommands(help), ["list", "requeue"]);
    assert!(subcommands("Usage: x [OPTIONS]\n\nOptions:\n  -h, --help\n").is_empty());
}

#[test]
fn the_excerpt_shows_the_changed_lines() {
    let text = excerpt("a\nb\nc\nd\ne\nf\ng\nh\n", "a\nb\nC\nd\ne\nf\ng\nh\nI\n");
    assert_eq!(text, "  a\n  b\n- c\n+ C\n  d\n  e\n…\n  g\n  h\n+ I\n");
    assert_eq!(excerpt("same\n", "same\n"), "");
}
