//! How the operator's commands print for people: aligned columns, ages and spans, one-line cuts,
//! and colour only on a terminal with `NO_COLOR` unset.

/// Whether human output may carry colour: stdout is a terminal and `NO_COLOR` is unset or empty
/// (no-color.org).
pub fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// ANSI colour for the human forms, or none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Style {
    pub colour: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum Paint {
    Bold,
    Dim,
    Red,
    Green,
    Yellow,
}

impl Style {
    /// `text` wrapped in the colour's codes; pad it first, since the codes have no width.
    pub fn paint(self, paint: Paint, text: &str) -> String {
        if !self.colour {
            return text.to_owned();
        }
        let code = match paint {
            Paint::Bold => "1",
            Paint::Dim => "2",
            Paint::Red => "31",
            Paint::Green => "32",
            Paint::Yellow => "33",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// An age for people: `0.8s`, `42s`, `12m 03s`, `2h 03m`, `3d 04h`.
pub fn age(seconds: f64) -> String {
    let seconds = seconds.max(0.0);
    if seconds < 10.0 {
        return format!("{seconds:.1}s");
    }
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
    // Non-negative, and ages fit.
    let whole = seconds as u64;
    match whole {
        0..60 => format!("{whole}s"),
        60..3600 => format!("{}m {:02}s", whole / 60, whole % 60),
        3600..86_400 => format!("{}h {:02}m", whole / 3600, whole % 3600 / 60),
        _ => format!("{}d {:02}h", whole / 86_400, whole % 86_400 / 3600),
    }
}

/// A task's wall or wait time for people: `85µs`, `120ms`, `2.30s`, then as an age.
pub fn span(seconds: f64) -> String {
    match seconds {
        s if s < 0.001 => format!("{:.0}µs", s.max(0.0) * 1e6),
        s if s < 1.0 => format!("{:.0}ms", s * 1e3),
        s if s < 10.0 => format!("{s:.2}s"),
        s => age(s),
    }
}

/// Seconds with millisecond precision: the JSON forms' unit.
pub fn rounded(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// `text` on one line of at most `width` characters, cut with an ellipsis.
pub fn one_line(text: &str, width: usize) -> String {
    let clean = text.chars().map(|c| if c.is_control() { ' ' } else { c });
    if text.chars().count() <= width {
        return clean.collect();
    }
    let mut cut: String = clean.take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Aligned columns under a dimmed header, each line indented by `indent`; `right[i]` right-aligns
/// column i (numbers). The last column is not padded, so lines carry no trailing spaces.
pub fn columns(
    indent: &str,
    header: &[&str],
    rows: &[Vec<String>],
    right: &[bool],
    style: Style,
) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::from(indent);
        for (i, cell) in cells.enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                text.push_str("  ");
            }
            let last = i + 1 == widths.len();
            if right.get(i).copied().unwrap_or(false) {
                text.extend(std::iter::repeat_n(' ', pad));
                text.push_str(cell);
            } else {
                text.push_str(cell);
                if !last {
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        text
    };
    let mut out = style.paint(Paint::Dim, line(&mut header.iter().copied()).trim_end());
    out.push('\n');
    for row in rows {
        out.push_str(line(&mut row.iter().map(String::as_str)).trim_end());
        out.push('\n');
    }
    out
}

/// A column a producer wrote: its JSON when it is JSON, else its text as a string (a row is often
/// dead precisely because it is not JSON).
pub fn stored_json(text: Option<&str>) -> serde_json::Value {
    text.map_or(serde_json::Value::Null, |text| {
        serde_json::from_str(text).unwrap_or_else(|_| text.into())
    })
}

/// `12s ago`, `3m ago`, `5h ago`, `2d ago`.
pub fn ago(seconds: f64) -> String {
    #[allow(clippy::cast_sign_loss)] // Clamped to 0 first; a clock step back is "0s ago".
    let seconds = seconds.max(0.0) as u64;
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86_400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_spans_read_at_a_glance() {
        assert_eq!(age(0.84), "0.8s");
        assert_eq!(age(42.3), "42s");
        assert_eq!(age(723.0), "12m 03s");
        assert_eq!(age(7380.0), "2h 03m");
        assert_eq!(age(3.0 * 86_400.0 + 4.0 * 3600.0), "3d 04h");
        assert_eq!(age(-5.0), "0.0s");
        assert_eq!(span(0.000_085), "85µs");
        assert_eq!(span(0.12), "120ms");
        assert_eq!(span(2.3), "2.30s");
        assert_eq!(span(75.0), "1m 15s");
    }
}
