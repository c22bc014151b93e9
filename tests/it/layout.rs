//! Tidy tests of the code's layout: ARCHITECTURE.md's code map names every module and only modules
//! that exist, the modules' dependencies (at file level) form no cycle, and only the store speaks
//! SQL. A file may use what its ancestors' `mod.rs` hold, as `super::` does; nothing else counts
//! as the same module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every module file under `src/`, by its path relative to `src/` (`store/sqlite/cycle.rs`).
fn source_files() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(base).unwrap();
                out.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    let src = root().join("src");
    let mut files = Vec::new();
    walk(&src, &src, &mut files);
    files.sort();
    files
}

/// How ARCHITECTURE.md names a file: a folder's `mod.rs` by the folder (`store/`), any other file
/// by its path (`store/row.rs`).
fn map_name(file: &str) -> String {
    match file.strip_suffix("mod.rs") {
        Some(folder) => folder.to_owned(),
        None => file.to_owned(),
    }
}

/// The module path of a file (`store::sqlite::cycle`); the crate root is empty.
fn module_of(file: &str) -> Vec<String> {
    let trimmed = file
        .strip_suffix("/mod.rs")
        .or_else(|| file.strip_suffix(".rs"))
        .unwrap_or(file);
    if trimmed == "lib" || trimmed == "main" {
        return Vec::new();
    }
    trimmed.split('/').map(str::to_owned).collect()
}

/// The code in `text` outside tests: unit tests (`#[cfg(test)]` modules, at the end of a file by
/// this crate's habit) may reach anywhere.
fn without_tests(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |at| &text[..at])
}

#[test]
fn the_architecture_map_names_every_module_and_only_modules_that_exist() {
    let map = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let named: BTreeSet<&str> = map
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|token| {
            (Path::new(token).extension().is_some_and(|e| e == "rs") || token.ends_with('/'))
                && token
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_/.".contains(c))
        })
        .collect();
    for file in source_files() {
        let name = map_name(&file);
        assert!(
            named.contains(name.as_str()),
            "ARCHITECTURE.md's code map does not name src/{file} (as `{name}`)"
        );
    }
    for name in named {
        let exists = root().join("src").join(name).exists() || root().join(name).exists();
        assert!(
            exists,
            "ARCHITECTURE.md names `{name}`, which does not exist"
        );
    }
}

#[test]
fn only_the_store_names_the_database_driver_or_speaks_sql() {
    let sql = [
        "SELECT ",
        "INSERT INTO",
        "DELETE FROM",
        "UPDATE foreman",
        "PRAGMA ",
    ];
    for file in source_files() {
        if file.starts_with("store/") {
            continue;
        }
        let text = std::fs::read_to_string(root().join("src").join(&file)).unwrap();
        assert!(
            !text.contains("rusqlite"),
            "src/{file} names rusqlite: only src/store/ may"
        );
        for word in sql {
            assert!(
                !text.contains(word),
                "src/{file} contains {word:?}: only src/store/ speaks SQL"
            );
        }
    }
}

/// The modules each file depends on: the files its `crate::…`, `super::…` and child-module paths
/// resolve to (the longest prefix that is a module), leaving out its own children's declarations.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let files = source_files();
    let by_module: BTreeMap<Vec<String>, String> =
        files.iter().map(|f| (module_of(f), f.clone())).collect();
    let resolve = |path: &[String]| -> Option<String> {
        (1..=path.len())
            .rev()
            .find_map(|n| by_module.get(&path[..n]).cloned())
    };
    let mut graph = BTreeMap::new();
    for file in &files {
        if file == "main.rs" {
            continue; // The binary is its own crate: it sees the library's public surface only.
        }
        let text = std::fs::read_to_string(root().join("src").join(file)).unwrap();
        let code = without_tests(&text);
        let here = module_of(file);
        let children: BTreeSet<String> = code
            .lines()
            .filter_map(|line| {
                let line = line.trim_start();
                let rest = line
                    .strip_prefix("pub mod ")
                    .or_else(|| line.strip_prefix("mod "))
                    .or_else(|| line.strip_prefix("pub(crate) mod "))?;
                rest.strip_suffix(';').map(str::to_owned)
            })
            .collect();
        let mut deps = BTreeSet::new();
        for path in paths_in(code) {
            let absolute: Vec<String> = match path.first().map(String::as_str) {
                Some("crate") => path[1..].to_vec(),
                Some("super") => {
                    let mut base = here.clone();
                    let mut rest = &path[..];
                    while rest.first().is_some_and(|s| s == "super") {
                        base.pop();
                        rest = &rest[1..];
                    }
                    base.extend(rest.iter().cloned());
                    base
                }
                Some("self") => here.iter().chain(&path[1..]).cloned().collect(),
                Some(first) if children.contains(first) => {
                    here.iter().chain(&path).cloned().collect()
                }
                _ => continue,
            };
            // A file may use what its ancestors hold (as `super::` does): a folder's files share
            // its `mod.rs`, like the impl blocks of the loop's state. Every other dependency,
            // a parent's on its child included, must point one way.
            if let Some(target) = resolve(&absolute)
                && &target != file
                && !is_ancestor(&target, file)
            {
                deps.insert(target);
            }
        }
        graph.insert(file.clone(), deps);
    }
    graph
}

/// Whether `ancestor` is the `mod.rs` of a folder that holds `file` (or lib.rs, the crate's root).
fn is_ancestor(ancestor: &str, file: &str) -> bool {
    if ancestor == "lib.rs" {
        return true;
    }
    ancestor
        .strip_suffix("mod.rs")
        .is_some_and(|folder| file.starts_with(folder))
}

/// Every `a::b::c` path in `code`, with `use a::{b, c::d}` groups expanded.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    while i < chars.len() {
        if !is_ident(chars[i]) || (i > 0 && (is_ident(chars[i - 1]) || chars[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let (path, end) = read_path(&chars, i, Vec::new(), &mut paths);
        if path.len() > 1 {
            paths.push(path);
        }
        i = end.max(i + 1);
    }
    paths
}

/// Reads a path starting at `start` (with `prefix` before it); a `{…}` group pushes each of its
/// members onto `out`. Returns the path read (without a group) and where it ended.
fn read_path(
    chars: &[char],
    start: usize,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> (Vec<String>, usize) {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut path = prefix;
    let mut i = start;
    loop {
        let begin = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        if i == begin {
            return (path, i);
        }
        path.push(chars[begin..i].iter().collect());
        if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
            i += 2;
            if chars.get(i) == Some(&'{') {
                i += 1;
                loop {
                    while chars.get(i).is_some_and(|c| c.is_whitespace() || *c == ',') {
                        i += 1;
                    }
                    match chars.get(i) {
                        Some('}') | None => return (Vec::new(), i + 1),
                        Some(c) if is_ident(*c) => {
                            let (member, end) = read_path(chars, i, path.clone(), out);
                            if member.len() > 1 {
                                out.push(member);
                            }
                            i = end;
                            // Skip ` as alias` and anything else up to the next member.
                            while chars.get(i).is_some_and(|c| *c != ',' && *c != '}') {
                                i += 1;
                            }
                        }
                        Some(_) => i += 1,
                    }
                }
            }
            continue;
        }
        return (path, i);
    }
}

#[test]
fn module_dependencies_form_no_cycle() {
    // Depth-first search for a back edge; the first cycle found is reported whole.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(at) = stack.iter().position(|n| *n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node);
        None
    }
    let graph = dependencies();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        let cycle = visit(node, &graph, &mut Vec::new(), &mut done);
        assert!(
            cycle.is_none(),
            "module cycle: {}",
            cycle.unwrap_or_default().join(" → ")
        );
    }
    // The checker itself must see dependencies, or the test above cannot fail.
    assert!(
        graph["foreman/mod.rs"].contains("store/mod.rs"),
        "{graph:?}"
    );
    assert!(graph["store/sqlite/cycle.rs"].contains("store/types.rs"));
    assert!(graph["cli.rs"].contains("commands/status.rs"), "use groups");
}

#[test]
fn the_path_reader_expands_use_groups() {
    let paths = paths_in("use crate::{a, b::{c, d as e}};\nlet x = super::f::g(y);");
    let shown: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    for want in ["crate::a", "crate::b::c", "crate::b::d", "super::f::g"] {
        assert!(shown.iter().any(|p| p == want), "{want} in {shown:?}");
    }
}
