//! A producer's row as the store read it, before any checks (`RawRow`, of backend-neutral `Cell`s),
//! and its decoding into a `Task` or a one-line reason why it cannot run. Pure: it never touches a
//! database, so it is tested and fuzzed on its own.

use serde_json::Value as Json;

use crate::task::{Task, name_problem};

/// A column's value, whatever a producer stored in it: SQLite lets any column hold any type, and
/// a TEXT that is not UTF-8 comes back as `Blob`.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Cell {
    /// A number as a float (a time, a duration); `None` for anything else.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Cell::Real(f) => Some(f),
            #[allow(clippy::cast_precision_loss)]
            // Unix seconds fit a double exactly for ages to come.
            Cell::Integer(i) => Some(i as f64),
            _ => None,
        }
    }

    /// Text as a person should see it, whatever a producer stored.
    pub fn into_text_lossy(self) -> String {
        match self {
            Cell::Text(text) => text,
            Cell::Blob(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Cell::Null => "(null)".to_owned(),
            Cell::Integer(i) => i.to_string(),
            Cell::Real(f) => f.to_string(),
        }
    }
}

/// A row as `DELETE … RETURNING` gave it, before any checks; producers can put anything in it.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub id: i64,
    pub task_name: Cell,
    pub args: Cell,
    pub kwargs: Cell,
    pub created_at: Cell,
    pub run_after: Cell,
    pub priority: Cell,
    pub attempt: Cell,
    pub origin: Cell,
    pub leased_at: Cell,
    pub unique_key: Cell,
}

/// A stored task name as a log line or an error message may quote it: itself when it is a valid
/// name, else an escaped and shortened form; `None` when it is not text at all.
pub fn printable_name(value: &Cell) -> Option<String> {
    let Cell::Text(name) = value else {
        return None;
    };
    if name_problem(name).is_none() {
        return Some(name.clone());
    }
    let head: String = name.chars().take(64).collect();
    let more = if head.len() < name.len() { "…" } else { "" };
    Some(format!("{head:?}{more}"))
}

/// Turns a raw row into a `Task`, or says in one line why it cannot run.
pub fn decode(raw: &RawRow) -> Result<Task, String> {
    let name = text_column("task_name", &raw.task_name)?;
    if let Some(problem) = name_problem(name) {
        return Err(format!("task_name {problem}"));
    }
    let args = match json_column("args", &raw.args)? {
        Json::Array(items) => items,
        other => {
            return Err(format!(
                "args is not a JSON array (got {})",
                json_kind(&other)
            ));
        }
    };
    let kwargs = match json_column("kwargs", &raw.kwargs)? {
        Json::Object(map) => map,
        other => {
            return Err(format!(
                "kwargs is not a JSON object (got {})",
                json_kind(&other)
            ));
        }
    };
    let created_at = raw.created_at.as_f64();
    let run_after = raw.run_after.as_f64();
    let Cell::Integer(priority) = raw.priority else {
        return Err("priority is not an integer".to_owned());
    };
    let attempt = match raw.attempt {
        Cell::Integer(a) if a >= 1 => a,
        _ => 1,
    };
    let origin = match &raw.origin {
        Cell::Text(text) => Some(text.clone()),
        Cell::Blob(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        _ => None,
    };
    Ok(Task {
        id: raw.id,
        name: name.to_owned(),
        args,
        kwargs,
        created_at,
        run_after,
        attempt,
        priority,
        origin,
        was_leased: !matches!(raw.leased_at, Cell::Null),
        unique_key: match &raw.unique_key {
            Cell::Text(text) => Some(text.clone()),
            Cell::Blob(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
            Cell::Integer(i) => Some(i.to_string()),
            Cell::Real(f) => Some(f.to_string()),
            Cell::Null => None,
        },
        cancel: crate::task::CancelFlag::default(),
    })
}

/// A row whose columns a typed backend (PostgreSQL: `jsonb`, `text`, `smallint`) read already:
/// the same checks as `decode`, on values instead of cells.
pub struct TypedRow {
    pub id: i64,
    pub task_name: String,
    pub args: Json,
    pub kwargs: Json,
    pub created_at: Option<f64>,
    pub run_after: Option<f64>,
    pub priority: i64,
    pub attempt: i64,
    pub origin: Option<String>,
    pub unique_key: Option<String>,
}

/// Turns a typed row into a `Task`, or says in one line why it cannot run. Its schema's CHECKs
/// refuse such rows at the INSERT; this is the pop's own defence, as on SQLite.
pub fn decode_typed(row: TypedRow) -> Result<Task, String> {
    if let Some(problem) = name_problem(&row.task_name) {
        return Err(format!("task_name {problem}"));
    }
    let args = match row.args {
        Json::Array(items) => items,
        other => {
            return Err(format!(
                "args is not a JSON array (got {})",
                json_kind(&other)
            ));
        }
    };
    let kwargs = match row.kwargs {
        Json::Object(map) => map,
        other => {
            return Err(format!(
                "kwargs is not a JSON object (got {})",
                json_kind(&other)
            ));
        }
    };
    Ok(Task {
        id: row.id,
        name: row.task_name,
        args,
        kwargs,
        created_at: row.created_at.filter(|t| t.is_finite()),
        run_after: row.run_after.filter(|t| t.is_finite()),
        attempt: row.attempt.max(1),
        priority: row.priority,
        origin: row.origin,
        was_leased: false,
        unique_key: row.unique_key,
        cancel: crate::task::CancelFlag::default(),
    })
}

fn text_column<'a>(column: &str, value: &'a Cell) -> Result<&'a str, String> {
    match value {
        Cell::Text(text) => Ok(text),
        Cell::Blob(bytes) => {
            std::str::from_utf8(bytes).map_err(|_| format!("{column} is not valid UTF-8"))
        }
        Cell::Null => Err(format!("{column} is NULL")),
        Cell::Integer(_) | Cell::Real(_) => Err(format!("{column} is a number, not text")),
    }
}

fn json_column(column: &str, value: &Cell) -> Result<Json, String> {
    let text = text_column(column, value)?;
    serde_json::from_str(text).map_err(|e| format!("{column} is not valid JSON: {e}"))
}

fn json_kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: Cell, args: &str, kwargs: &str) -> RawRow {
        RawRow {
            id: 7,
            task_name: name,
            args: Cell::Text(args.to_owned()),
            kwargs: Cell::Text(kwargs.to_owned()),
            created_at: Cell::Real(1.5),
            run_after: Cell::Real(1.5),
            priority: Cell::Integer(0),
            attempt: Cell::Integer(1),
            origin: Cell::Null,
            leased_at: Cell::Null,
            unique_key: Cell::Null,
        }
    }

    #[test]
    fn decodes_a_good_row() {
        let task = decode(&row(
            Cell::Text("a.b".into()),
            r#"[1,"x"]"#,
            r#"{"k":true}"#,
        ))
        .unwrap();
        assert_eq!(task.name, "a.b");
        assert_eq!(task.args, vec![Json::from(1), Json::from("x")]);
        assert_eq!(task.kwargs.get("k"), Some(&Json::Bool(true)));
        assert_eq!(task.created_at, Some(1.5));
        let line = task.to_json_line();
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let back: Json = serde_json::from_str(&line).unwrap();
        assert_eq!(back["id"], 7);
        assert_eq!(back["task_name"], "a.b");
    }

    #[test]
    fn says_why_a_row_cannot_run() {
        let cases = [
            (
                row(Cell::Text("t".into()), "{", "{}"),
                "args is not valid JSON",
            ),
            (
                row(Cell::Text("t".into()), "{}", "{}"),
                "args is not a JSON array (got an object)",
            ),
            (
                row(Cell::Text("t".into()), "[]", "[]"),
                "kwargs is not a JSON object (got an array)",
            ),
            (
                row(Cell::Text(String::new()), "[]", "{}"),
                "task_name is empty",
            ),
            (row(Cell::Null, "[]", "{}"), "task_name is NULL"),
            (
                row(Cell::Blob(vec![0xff, 0xfe]), "[]", "{}"),
                "task_name is not valid UTF-8",
            ),
        ];
        for (raw, want) in cases {
            let err = decode(&raw).unwrap_err();
            assert!(err.starts_with(want), "{err} vs {want}");
        }
        let long = row(Cell::Text("x".repeat(5000)), "[]", "{}");
        assert_eq!(
            decode(&long).unwrap_err(),
            "task_name is 5000 bytes long (at most 1024)"
        );
        let nul = row(Cell::Text("a\0b".into()), "[]", "{}");
        assert_eq!(
            decode(&nul).unwrap_err(),
            "task_name contains the control character U+0000"
        );
        assert_eq!(
            printable_name(&long.task_name).unwrap(),
            format!("{:?}…", "x".repeat(64))
        );
        assert_eq!(printable_name(&nul.task_name).unwrap(), "\"a\\0b\"");
    }

    /// Found by the round-trip property: serde_json's default float parsing is off by an ulp for
    /// some numbers, so a handler got `…637e+299` for `…635e299` until `float_roundtrip` was on.
    #[test]
    fn floats_reach_the_handler_unchanged() {
        let task = decode(&row(
            Cell::Text("t".into()),
            "[9.706208360911635e299, 0.1, 1e-7]",
            "{}",
        ))
        .unwrap();
        assert!(
            task.to_json_line()
                .contains("[9.706208360911635e+299,0.1,1e-7]"),
            "{}",
            task.to_json_line()
        );
    }
}

/// Property tests ("fuzzing") of `decode` over whatever a producer can store. Run longer with
/// `PROPTEST_CASES=200000 cargo test --release --lib fuzz` (see CONTRIBUTING.md, *Fuzzing*).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// Any SQLite value, with texts and blobs that are often JSON-like.
    fn any_value() -> impl Strategy<Value = Cell> {
        prop_oneof![
            Just(Cell::Null),
            any::<i64>().prop_map(Cell::Integer),
            any::<f64>().prop_map(Cell::Real),
            any::<String>().prop_map(Cell::Text),
            "[\\[\\]{}\",:0-9a-z\\\\ \u{0}\u{7f}é]{0,24}".prop_map(Cell::Text),
            proptest::collection::vec(any::<u8>(), 0..24).prop_map(Cell::Blob),
        ]
    }

    fn any_row() -> impl Strategy<Value = RawRow> {
        (
            any::<i64>(),
            [any_value(), any_value(), any_value(), any_value()],
            [
                any_value(),
                any_value(),
                any_value(),
                any_value(),
                any_value(),
            ],
        )
            .prop_map(|(id, [task_name, args, kwargs, created_at], rest)| {
                let [run_after, priority, attempt, origin, leased_at] = rest;
                RawRow {
                    unique_key: Cell::Null,
                    id,
                    task_name,
                    args,
                    kwargs,
                    created_at,
                    run_after,
                    priority,
                    attempt,
                    origin,
                    leased_at,
                }
            })
    }

    fn any_json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            // Finite only: JSON has no NaN or infinity.
            (-1e300f64..1e300).prop_map(Json::from),
            any::<String>().prop_map(Json::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..4)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(crate::fuzz_config(256))]

        #[test]
        fn decode_never_panics_and_explains_in_one_line(raw in any_row()) {
            match decode(&raw) {
                Ok(task) => {
                    prop_assert!(name_problem(&task.name).is_none());
                    prop_assert!(task.attempt >= 1);
                    prop_assert!(matches!(raw.priority, Cell::Integer(p) if p == task.priority));
                }
                Err(reason) => {
                    prop_assert!(!reason.contains('\n'), "{reason}");
                    let column = ["task_name", "args", "kwargs", "priority"]
                        .iter()
                        .any(|c| reason.starts_with(c));
                    prop_assert!(column, "the reason names no column: {reason}");
                }
            }
        }

        #[test]
        fn a_valid_row_round_trips(
            name in "[a-z][a-z0-9_.]{0,40}",
            args in proptest::collection::vec(any_json(), 0..4),
            kwargs in proptest::collection::btree_map(any::<String>(), any_json(), 0..4),
            as_blob in any::<bool>(),
            priority in -100i64..=100,
        ) {
            let kwargs: serde_json::Map<String, Json> = kwargs.into_iter().collect();
            let args_text = serde_json::to_string(&args).unwrap();
            let kwargs_text = serde_json::to_string(&kwargs).unwrap();
            // A producer may hand the driver bytes (Python `bytes`): a BLOB of UTF-8 JSON.
            let column = |text: String| if as_blob { Cell::Blob(text.into_bytes()) } else { Cell::Text(text) };
            let raw = RawRow {
                id: 1,
                task_name: Cell::Text(name.clone()),
                args: column(args_text),
                kwargs: column(kwargs_text),
                created_at: Cell::Real(1.5),
                run_after: Cell::Integer(2),
                priority: Cell::Integer(priority),
                attempt: Cell::Integer(1),
                origin: Cell::Null,
                leased_at: Cell::Null,
                unique_key: Cell::Null,
            };
            let task = decode(&raw).map_err(TestCaseError::fail)?;
            prop_assert_eq!(&task.name, &name);
            prop_assert_eq!(&task.args, &args);
            prop_assert_eq!(&task.kwargs, &kwargs);
            prop_assert_eq!(task.run_after, Some(2.0));
            // What a command or worker reads is the same document again.
            let line: Json = serde_json::from_str(&task.to_json_line()).unwrap();
            prop_assert_eq!(&line["args"], &Json::Array(args));
            prop_assert_eq!(&line["kwargs"], &Json::Object(kwargs));
        }
    }
}
