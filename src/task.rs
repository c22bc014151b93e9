//! `Task`, a popped row ready to run, and the decoding of a raw `foreman_task` row into one. Decoding
//! is pure: it never touches the DB, so it can be tested and fuzzed on its own.

use rusqlite::types::Value;
use serde_json::{Map, Value as Json};

/// A task popped from the queue. Its row is already deleted when a handler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: i64,
    pub name: String,
    /// Always a JSON array.
    pub args: Vec<Json>,
    pub kwargs: Map<String, Json>,
    /// Unix time in seconds at which the row was inserted, if the row had a usable value.
    pub created_at: Option<f64>,
    /// Unix time before which it was not to start (its delay, or its retry's backoff).
    pub run_after: Option<f64>,
    /// 1 for the first run; retries and re-runs after a crash count up.
    pub attempt: i64,
    pub priority: i64,
    /// Who enqueued it, when it was not a producer (a schedule, a requeue).
    pub origin: Option<String>,
    /// The row was leased by an at-least-once run that never finished (its daemon died).
    pub was_leased: bool,
}

/// A row as `DELETE … RETURNING` gave it, before any checks; producers can put anything in it.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub id: i64,
    pub task_name: Value,
    pub args: Value,
    pub kwargs: Value,
    pub created_at: Value,
    pub run_after: Value,
    pub priority: Value,
    pub attempt: Value,
    pub origin: Value,
    pub leased_at: Value,
}

impl Task {
    /// The one-line JSON document a command task reads on its stdin.
    pub fn to_json_line(&self) -> String {
        let doc = serde_json::json!({
            "id": self.id,
            "task_name": self.name,
            "args": self.args,
            "kwargs": self.kwargs,
        });
        let mut line = doc.to_string();
        line.push('\n');
        line
    }
}

/// Turns a raw row into a `Task`, or says in one line why it cannot run.
pub fn decode(raw: &RawRow) -> Result<Task, String> {
    let name = text_column("task_name", &raw.task_name)?;
    if name.is_empty() {
        return Err("task_name is empty".to_owned());
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
    let created_at = unix_time(&raw.created_at);
    let run_after = unix_time(&raw.run_after);
    let Value::Integer(priority) = raw.priority else {
        return Err("priority is not an integer".to_owned());
    };
    let attempt = match raw.attempt {
        Value::Integer(a) if a >= 1 => a,
        _ => 1,
    };
    let origin = match &raw.origin {
        Value::Text(text) => Some(text.clone()),
        Value::Blob(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
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
        was_leased: !matches!(raw.leased_at, Value::Null),
    })
}

fn unix_time(value: &Value) -> Option<f64> {
    match *value {
        Value::Real(t) => Some(t),
        #[allow(clippy::cast_precision_loss)] // Unix seconds fit a double exactly for ages to come.
        Value::Integer(t) => Some(t as f64),
        _ => None,
    }
}

fn text_column<'a>(column: &str, value: &'a Value) -> Result<&'a str, String> {
    match value {
        Value::Text(text) => Ok(text),
        Value::Blob(bytes) => {
            std::str::from_utf8(bytes).map_err(|_| format!("{column} is not valid UTF-8"))
        }
        Value::Null => Err(format!("{column} is NULL")),
        Value::Integer(_) | Value::Real(_) => Err(format!("{column} is a number, not text")),
    }
}

fn json_column(column: &str, value: &Value) -> Result<Json, String> {
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

    fn row(name: Value, args: &str, kwargs: &str) -> RawRow {
        RawRow {
            id: 7,
            task_name: name,
            args: Value::Text(args.to_owned()),
            kwargs: Value::Text(kwargs.to_owned()),
            created_at: Value::Real(1.5),
            run_after: Value::Real(1.5),
            priority: Value::Integer(0),
            attempt: Value::Integer(1),
            origin: Value::Null,
            leased_at: Value::Null,
        }
    }

    #[test]
    fn decodes_a_good_row() {
        let task = decode(&row(
            Value::Text("a.b".into()),
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
                row(Value::Text("t".into()), "{", "{}"),
                "args is not valid JSON",
            ),
            (
                row(Value::Text("t".into()), "{}", "{}"),
                "args is not a JSON array (got an object)",
            ),
            (
                row(Value::Text("t".into()), "[]", "[]"),
                "kwargs is not a JSON object (got an array)",
            ),
            (
                row(Value::Text(String::new()), "[]", "{}"),
                "task_name is empty",
            ),
            (row(Value::Null, "[]", "{}"), "task_name is NULL"),
            (
                row(Value::Blob(vec![0xff, 0xfe]), "[]", "{}"),
                "task_name is not valid UTF-8",
            ),
        ];
        for (raw, want) in cases {
            let err = decode(&raw).unwrap_err();
            assert!(err.starts_with(want), "{err} vs {want}");
        }
    }
}
