//! Per-minute task figures (`foreman_stat`): the log histogram both the daemon and the CLI use, and
//! the daemon's in-memory tally that the loop flushes at most once a second.

use std::collections::BTreeMap;

/// The smallest duration with a bucket of its own; everything shorter lands in bucket 0.
const BASE_SECONDS: f64 = 1e-4;
/// Buckets per doubling: a percentile read from the histogram is within 2^(1/8) ≈ 9 % of the truth.
const PER_OCTAVE: f64 = 4.0;
/// 100 µs · 2^(160/4) is about 3.5 years: no duration a task can take lands past it.
const LAST_BUCKET: u32 = 160;

/// Counts of durations in log-spaced buckets (see `foreman_stat` in schema.sql). Sparse, since a
/// task type's durations crowd into a few buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    buckets: BTreeMap<u32, u64>,
}

impl Histogram {
    pub fn bucket_of(seconds: f64) -> u32 {
        if seconds.is_nan() || seconds < BASE_SECONDS {
            return 0;
        }
        let b = ((seconds / BASE_SECONDS).log2() * PER_OCTAVE).floor() + 1.0;
        // In range: clamped, and a float of a small integer.
        #[allow(clippy::cast_sign_loss)]
        let b = b.clamp(1.0, f64::from(LAST_BUCKET)) as u32;
        b
    }

    /// The (lower, upper) bound in seconds of bucket `b`.
    fn bounds(b: u32) -> (f64, f64) {
        if b == 0 {
            return (0.0, BASE_SECONDS);
        }
        let at = |k: u32| BASE_SECONDS * (f64::from(k) / PER_OCTAVE).exp2();
        (at(b - 1), at(b))
    }

    pub fn add(&mut self, seconds: f64) {
        *self.buckets.entry(Self::bucket_of(seconds)).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (b, n) in &other.buckets {
            let count = self.buckets.entry(*b).or_default();
            *count = count.saturating_add(*n);
        }
    }

    pub fn count(&self) -> u64 {
        // Saturating: the counts are read from the database, where anything may have been written.
        self.buckets
            .values()
            .fold(0, |sum, n| sum.saturating_add(*n))
    }

    /// The `q` quantile (0..=1), as the geometric middle of its bucket; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the quantile, 1-based: the median of 3 is the 2nd.
        #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen: u64 = 0;
        for (b, n) in &self.buckets {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                let (low, high) = Self::bounds(*b);
                return Some(if *b == 0 {
                    high / 2.0
                } else {
                    (low * high).sqrt()
                });
            }
        }
        None
    }

    /// `{"bucket": count, …}`, as `foreman_stat` stores it.
    pub fn to_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .buckets
            .iter()
            .map(|(b, n)| (b.to_string(), (*n).into()))
            .collect();
        serde_json::Value::Object(map).to_string()
    }

    /// Reads what `to_json` wrote; anything it cannot read counts as empty, since a figure is not
    /// worth failing a command over.
    pub fn from_json(text: &str) -> Histogram {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str(text) else {
            return Histogram::default();
        };
        let buckets = map
            .iter()
            .filter_map(|(b, n)| Some((b.parse().ok()?, n.as_u64()?)))
            .filter(|(b, _)| *b <= LAST_BUCKET)
            .collect();
        Histogram { buckets }
    }
}

/// One task name's figures for one minute (a row of `foreman_stat`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MinuteStat {
    pub count: u64,
    pub done: u64,
    pub failed: u64,
    pub wall_total: f64,
    pub wall_max: f64,
    pub wait_total: f64,
    pub wait_max: f64,
    pub wall_hist: Histogram,
    pub wait_hist: Histogram,
}

impl MinuteStat {
    pub fn add(&mut self, ok: bool, wall: f64, wait: f64) {
        self.count += 1;
        if ok {
            self.done += 1;
        } else {
            self.failed += 1;
        }
        self.wall_total += wall;
        self.wall_max = self.wall_max.max(wall);
        self.wait_total += wait;
        self.wait_max = self.wait_max.max(wait);
        self.wall_hist.add(wall);
        self.wait_hist.add(wait);
    }

    pub fn merge(&mut self, other: &MinuteStat) {
        // Saturating: `other` may come from a row anyone could have written.
        self.count = self.count.saturating_add(other.count);
        self.done = self.done.saturating_add(other.done);
        self.failed = self.failed.saturating_add(other.failed);
        self.wall_total += other.wall_total;
        self.wall_max = self.wall_max.max(other.wall_max);
        self.wait_total += other.wait_total;
        self.wait_max = self.wait_max.max(other.wait_max);
        self.wall_hist.merge(&other.wall_hist);
        self.wait_hist.merge(&other.wait_hist);
    }
}

/// The unit of `foreman_stat.minute`.
pub fn minute_of(unix: f64) -> i64 {
    (unix / 60.0).floor() as i64
}

/// What the daemon counted since its last flush, by (minute, task name), and in total since it
/// started (the heartbeat row's `totals`).
#[derive(Debug, Default)]
pub struct Tally {
    // Keyed so that counting an attempt looks its name up without allocating.
    pending: BTreeMap<i64, BTreeMap<String, MinuteStat>>,
    totals: BTreeMap<String, (u64, u64)>,
    /// Finished attempts per minute for the last two minutes, for the systemd status line.
    recent: [(i64, u64); 2],
}

impl Tally {
    /// Counts an ended attempt: `wall` its run time, `wait` how long it was due before it started.
    pub fn add(&mut self, name: &str, ok: bool, finished_at: f64, wall: f64, wait: f64) {
        let minute = minute_of(finished_at);
        let names = self.pending.entry(minute).or_default();
        if let Some(stat) = names.get_mut(name) {
            stat.add(ok, wall, wait);
        } else {
            names
                .entry(name.to_owned())
                .or_default()
                .add(ok, wall, wait);
        }
        let total = if let Some(total) = self.totals.get_mut(name) {
            total
        } else {
            self.totals.entry(name.to_owned()).or_default()
        };
        if ok {
            total.0 += 1;
        } else {
            total.1 += 1;
        }
        if let Some((_, n)) = self.recent.iter_mut().find(|(m, _)| *m == minute) {
            *n += 1;
        } else {
            // Replace the older of the two.
            let oldest = usize::from(self.recent[1].0 < self.recent[0].0);
            self.recent[oldest] = (minute, 1);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The rows to add to `foreman_stat`; put them back with `restore` if writing them fails.
    pub fn take(&mut self) -> BTreeMap<(i64, String), MinuteStat> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .flat_map(|(minute, names)| {
                names
                    .into_iter()
                    .map(move |(name, stat)| ((minute, name), stat))
            })
            .collect()
    }

    pub fn restore(&mut self, rows: BTreeMap<(i64, String), MinuteStat>) {
        for ((minute, name), row) in rows {
            self.pending
                .entry(minute)
                .or_default()
                .entry(name)
                .or_default()
                .merge(&row);
        }
    }

    /// `{task: {"done": n, "failed": n}}` since the daemon started.
    pub fn totals_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .totals
            .iter()
            .map(|(name, (done, failed))| {
                (
                    name.clone(),
                    serde_json::json!({ "done": done, "failed": failed }),
                )
            })
            .collect();
        serde_json::Value::Object(map).to_string()
    }

    /// Attempts that ended in the last complete minute before `now`.
    pub fn last_minute(&self, now: f64) -> u64 {
        let previous = minute_of(now) - 1;
        self.recent
            .iter()
            .find(|(m, _)| *m == previous)
            .map_or(0, |(_, n)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let mut h = Histogram::default();
        for ms in 1..=1000 {
            h.add(f64::from(ms) / 1000.0);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 / 0.5 - 1.0).abs() < 0.1, "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((p99 / 0.99 - 1.0).abs() < 0.1, "{p99}");
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn histograms_survive_their_json_and_merge() {
        let mut a = Histogram::default();
        a.add(0.00001);
        a.add(2.0);
        a.add(1e12);
        let mut b = Histogram::from_json(&a.to_json());
        assert_eq!(a, b);
        b.merge(&a);
        assert_eq!(b.count(), 6);
        assert_eq!(Histogram::from_json("not json").count(), 0);
        assert_eq!(
            Histogram::from_json(r#"{"x": 1, "999": 2, "3": -1}"#).count(),
            0
        );
    }

    #[test]
    fn huge_counts_read_from_the_db_saturate_instead_of_overflowing() {
        let huge = Histogram::from_json(&format!(r#"{{"3": {}, "4": {}}}"#, u64::MAX, u64::MAX));
        assert_eq!(huge.count(), u64::MAX);
        let mut sum = huge.clone();
        sum.merge(&huge);
        assert_eq!(sum.count(), u64::MAX);
        assert!(sum.quantile(0.5).is_some());
        let mut stat = MinuteStat {
            count: u64::MAX,
            done: u64::MAX,
            ..MinuteStat::default()
        };
        stat.merge(&stat.clone());
        assert_eq!((stat.count, stat.done), (u64::MAX, u64::MAX));
    }

    #[test]
    fn the_tally_counts_the_last_complete_minute() {
        let mut t = Tally::default();
        t.add("a", true, 120.5, 0.1, 0.0);
        t.add("a", false, 150.0, 0.1, 0.0);
        t.add("b", true, 185.0, 0.1, 0.0);
        assert_eq!(t.last_minute(190.0), 2);
        assert_eq!(t.last_minute(250.0), 1);
        assert_eq!(
            t.totals_json(),
            r#"{"a":{"done":1,"failed":1},"b":{"done":1,"failed":0}}"#
        );
        let rows = t.take();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[&(2, "a".to_owned())].count, 2);
        assert!(t.is_empty());
    }
}
