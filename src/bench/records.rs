//! The record file tasks write their start to (`<id or key> <unix seconds.µs>` per line), read
//! as it grows, and the exactly-once check every scenario ends with; plus `Bench::wait_for`, the
//! one way the bench waits for the daemon to get somewhere (with a signal, a dead daemon and a
//! stall as the ways out).

use std::collections::HashMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::daemon::Daemon;
use super::{Bench, Failure, Outcome};

/// A wait fails when its count has not moved for this long: the daemon is stuck or tasks fail.
const STALL: Duration = Duration::from_secs(30);
/// How many ids a failure message quotes.
const QUOTED_IDS: usize = 8;

/// What the tasks of one run recorded, read incrementally.
pub(crate) struct Records {
    path: PathBuf,
    file: Option<std::fs::File>,
    /// A line not complete yet at the last read (a read can meet a write half way).
    partial: Vec<u8>,
    lines: Vec<(i64, f64)>,
}

impl Records {
    pub fn new(path: PathBuf) -> Records {
        Records {
            path,
            file: None,
            partial: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// Reads what was appended since the last call; returns how many lines there are in all.
    pub fn poll(&mut self) -> Outcome<usize> {
        if self.file.is_none() {
            match std::fs::File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                // No task has run yet: the daemon creates the file at the first one.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(self.failure(&e.to_string())),
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(self.lines.len());
        };
        let mut fresh = std::mem::take(&mut self.partial);
        file.read_to_end(&mut fresh)
            .map_err(|e| Failure::new(format!("{}: {e}", self.path.display())))?;
        let complete = fresh.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.partial = fresh.split_off(complete);
        for line in fresh.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let parsed = std::str::from_utf8(line).ok().and_then(|text| {
                let (id, at) = text.split_once(' ')?;
                Some((id.parse().ok()?, at.parse().ok()?))
            });
            match parsed {
                Some(record) => self.lines.push(record),
                None => {
                    return Err(self.failure(&format!(
                        "not a record line: {:?}",
                        String::from_utf8_lossy(line)
                    )));
                }
            }
        }
        Ok(self.lines.len())
    }

    fn failure(&self, message: &str) -> Failure {
        Failure::new(format!("record file {}: {message}", self.path.display()))
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// The start of every id in `expected`, after checking that each one started exactly once and
    /// that nothing else started except the `ignored` ones (warm-ups).
    pub fn exactly_once(
        &self,
        expected: impl IntoIterator<Item = i64>,
        ignored: &[i64],
    ) -> Outcome<HashMap<i64, f64>> {
        let seen = self.by_id();
        let mut starts = HashMap::new();
        let mut missing = Vec::new();
        let mut repeated = Vec::new();
        for id in expected {
            match seen.get(&id) {
                None => missing.push(id),
                Some(times) if times.len() > 1 => repeated.push(id),
                Some(times) => {
                    starts.insert(id, times[0]);
                }
            }
        }
        let mut unexpected: Vec<i64> = seen
            .keys()
            .filter(|id| !starts.contains_key(id) && !ignored.contains(id))
            .filter(|id| !repeated.contains(id))
            .copied()
            .collect();
        unexpected.sort_unstable();
        let expected_count = starts.len() + missing.len() + repeated.len();
        check_clean(expected_count, &missing, &repeated, &unexpected)?;
        Ok(starts)
    }

    /// The starts recorded for ids in `range` when only some of them were meant to run (the
    /// daemon was stopped with rows left): each at most once, none outside the range.
    pub fn at_most_once(
        &self,
        range: &std::ops::RangeInclusive<i64>,
        ignored: &[i64],
    ) -> Outcome<HashMap<i64, f64>> {
        let seen = self.by_id();
        let mut starts = HashMap::new();
        let mut repeated = Vec::new();
        let mut unexpected = Vec::new();
        for (id, times) in seen {
            if !range.contains(&id) {
                if !ignored.contains(&id) {
                    unexpected.push(id);
                }
            } else if times.len() > 1 {
                repeated.push(id);
            } else {
                starts.insert(id, times[0]);
            }
        }
        repeated.sort_unstable();
        unexpected.sort_unstable();
        check_clean(range.clone().count(), &[], &repeated, &unexpected)?;
        Ok(starts)
    }

    fn by_id(&self) -> HashMap<i64, Vec<f64>> {
        let mut seen: HashMap<i64, Vec<f64>> = HashMap::with_capacity(self.lines.len());
        for (id, at) in &self.lines {
            seen.entry(*id).or_default().push(*at);
        }
        seen
    }
}

/// Fails naming what went wrong among `expected` tasks, quoting a few ids of each kind.
fn check_clean(
    expected: usize,
    missing: &[i64],
    repeated: &[i64],
    unexpected: &[i64],
) -> Outcome<()> {
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "{} of {expected} tasks never started (ids {})",
            missing.len(),
            quote(missing)
        ));
    }
    if !repeated.is_empty() {
        problems.push(format!(
            "{} of {expected} tasks started more than once (ids {})",
            repeated.len(),
            quote(repeated)
        ));
    }
    if !unexpected.is_empty() {
        problems.push(format!(
            "{} tasks started that were not enqueued (ids {})",
            unexpected.len(),
            quote(unexpected)
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "exactly-once check failed: {}",
            problems.join("; ")
        )))
    }
}

fn quote(ids: &[i64]) -> String {
    let mut text: Vec<String> = ids.iter().take(QUOTED_IDS).map(i64::to_string).collect();
    if ids.len() > QUOTED_IDS {
        text.push("…".to_owned());
    }
    text.join(", ")
}

impl Bench<'_> {
    /// Polls `count` every `interval` until it reaches `target`. Fails when a signal comes, the
    /// daemon exits, or the count stalls for 30 s; shows progress on a terminal meanwhile.
    pub fn wait_for(
        &mut self,
        daemon: &mut Daemon,
        what: &str,
        target: usize,
        interval: Duration,
        mut count: impl FnMut() -> Outcome<usize>,
    ) -> Outcome<()> {
        let mut last = (0, Instant::now());
        loop {
            let done = count()?;
            if done >= target {
                return Ok(());
            }
            if done != last.0 {
                last = (done, Instant::now());
            } else if last.1.elapsed() > STALL {
                return Err(daemon.failure(&format!(
                    "{what}: stuck at {done} of {target} for {}s",
                    STALL.as_secs()
                )));
            }
            self.check_interrupt()?;
            daemon.check_alive()?;
            self.progress.show(&format!("{what}: {done} of {target}"));
            std::thread::sleep(interval);
        }
    }

    /// Waits until `records` holds `target` lines.
    pub fn wait_records(
        &mut self,
        daemon: &mut Daemon,
        records: &mut Records,
        what: &str,
        target: usize,
    ) -> Outcome<()> {
        self.wait_for(daemon, what, target, Duration::from_millis(5), || {
            records.poll()
        })
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // The values compared are exact.
mod tests {
    use super::*;

    fn records(text: &str) -> Records {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.txt");
        std::fs::write(&path, text).unwrap();
        let mut records = Records::new(path);
        records.poll().unwrap();
        records
    }

    #[test]
    fn a_partial_line_waits_for_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.txt");
        std::fs::write(&path, "1 10.5\n2 1").unwrap();
        let mut records = Records::new(path.clone());
        assert_eq!(records.poll().unwrap(), 1);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"1.25\n").unwrap();
        assert_eq!(records.poll().unwrap(), 2);
        assert_eq!(records.lines[1], (2, 11.25));
    }

    #[test]
    fn exactly_once_names_missing_repeated_and_unexpected_ids() {
        let r = records("1 1.0\n2 2.0\n3 3.0\n");
        let starts = r.exactly_once(1..=3, &[]).unwrap();
        assert_eq!(starts[&2], 2.0);
        let err = match records("1 1.0\n1 1.5\n9 2.0\n0 0.1\n").exactly_once(1..=3, &[0]) {
            Err(Failure::Failed(message)) => message,
            other => panic!("{other:?}"),
        };
        assert!(
            err.contains("2 of 3 tasks never started (ids 2, 3)"),
            "{err}"
        );
        assert!(
            err.contains("1 of 3 tasks started more than once (ids 1)"),
            "{err}"
        );
        assert!(
            err.contains("1 tasks started that were not enqueued (ids 9)"),
            "{err}"
        );
    }

    #[test]
    fn at_most_once_allows_ids_that_did_not_run() {
        let r = records("5 1.0\n6 2.0\n");
        assert_eq!(r.at_most_once(&(5..=10), &[]).unwrap().len(), 2);
        assert!(
            records("5 1.0\n5 2.0\n")
                .at_most_once(&(5..=10), &[])
                .is_err()
        );
        assert!(records("11 1.0\n").at_most_once(&(5..=10), &[]).is_err());
    }

    #[test]
    fn garbage_fails_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.txt");
        std::fs::write(&path, "hello\n").unwrap();
        assert!(Records::new(path).poll().is_err());
    }
}
