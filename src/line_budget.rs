//! `LineBudget`: how many output lines of one command task or one pool process the daemon logs. A
//! burst is logged whole, then at most a steady rate; lines over it are counted, and the count is
//! logged now and then instead. A task that floods its output then cannot flood the daemon's log
//! (where journald's rate limit would drop the daemon's own lines with it), nor keep the loop
//! waiting on a slow log reader; its pipes are still read at full speed, so it never blocks on
//! them either.

use std::time::{Duration, Instant};

/// Lines logged at once before the rate applies: a traceback or a verbose run logs whole.
pub const BURST_LINES: f64 = 1000.0;
/// Lines a second logged beyond the burst.
pub const LINES_PER_SECOND: f64 = 100.0;
/// While a flood lasts, how often the count of the lines not logged is.
const COUNT_EVERY: Duration = Duration::from_secs(10);

/// A token bucket of log lines for one output source.
#[derive(Debug)]
pub struct LineBudget {
    tokens: f64,
    refilled: Instant,
    /// Lines not logged and not counted in the log yet.
    skipped: u64,
    /// A flood began (a line was not logged) and the bucket has not filled up since.
    flooding: bool,
    /// When the last count was logged, or the flood began.
    counted_at: Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Log the line; first, if given, the count of the lines before it that were not.
    Log(Option<u64>),
    /// Do not log it; `first` of a flood, which is said.
    Skip { first: bool },
}

impl LineBudget {
    pub fn new() -> Self {
        LineBudget::at(Instant::now())
    }

    fn at(now: Instant) -> Self {
        LineBudget {
            tokens: BURST_LINES,
            refilled: now,
            skipped: 0,
            flooding: false,
            counted_at: now,
        }
    }

    fn take(&mut self, now: Instant) -> Verdict {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() * LINES_PER_SECOND;
        self.tokens = (self.tokens + earned).min(BURST_LINES);
        self.refilled = now;
        // Quiet long enough to log a whole burst again: the flood is over.
        let over = self.flooding && self.tokens >= BURST_LINES;
        if self.tokens < 1.0 {
            self.skipped += 1;
            let first = !self.flooding;
            if first {
                self.flooding = true;
                self.counted_at = now;
            }
            return Verdict::Skip { first };
        }
        self.tokens -= 1.0;
        if over {
            self.flooding = false;
        }
        let count_due = over || now.saturating_duration_since(self.counted_at) >= COUNT_EVERY;
        if self.skipped > 0 && count_due {
            self.counted_at = now;
            return Verdict::Log(Some(std::mem::take(&mut self.skipped)));
        }
        Verdict::Log(None)
    }

    /// Logs `line` of `who`'s `stream` (`task 42 myapp.x`, `stderr`) if the budget allows.
    pub fn log(&mut self, who: &str, stream: &str, line: &str) {
        match self.take(Instant::now()) {
            Verdict::Log(count) => {
                if let Some(skipped) = count {
                    log::info!("{who}: {skipped} output line(s) not logged");
                }
                log::info!("{who} {stream}: {line}");
            }
            Verdict::Skip { first: true } => log::warn!(
                "{who} writes more than {LINES_PER_SECOND} lines a second (after {BURST_LINES} at once); the lines over that are counted, not logged"
            ),
            Verdict::Skip { first: false } => {}
        }
    }

    /// At the end of the output: says how many lines were not logged since the last count.
    pub fn finish(&mut self, who: &str) {
        let skipped = std::mem::take(&mut self.skipped);
        if skipped > 0 {
            log::info!("{who}: {skipped} output line(s) not logged");
        }
    }
}

impl Default for LineBudget {
    fn default() -> Self {
        LineBudget::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_logs_whole_then_the_rate_applies_and_the_rest_is_counted() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut budget = LineBudget::at(start);
        for _ in 0..1000 {
            assert_eq!(budget.take(start), Verdict::Log(None));
        }
        assert_eq!(budget.take(start), Verdict::Skip { first: true });
        // 25 seconds of 1,000 lines a second: about 100 a second are logged, the flood is said
        // once, and the count comes every ten seconds.
        let (mut logged, mut counts, mut firsts) = (0, Vec::new(), 0);
        for ms in 1..=25_000 {
            match budget.take(at(ms)) {
                Verdict::Log(None) => logged += 1,
                Verdict::Log(Some(count)) => {
                    logged += 1;
                    counts.push((ms, count));
                }
                Verdict::Skip { first } => firsts += u32::from(first),
            }
        }
        assert!((2490..=2510).contains(&logged), "{logged}");
        assert_eq!(firsts, 0);
        assert_eq!(counts.len(), 2, "{counts:?}");
        assert!(
            (10_000..10_020).contains(&counts[0].0) && (20_000..20_040).contains(&counts[1].0),
            "{counts:?}"
        );
        let counted: u64 = counts.iter().map(|c| c.1).sum();
        assert_eq!(counted + budget.skipped, 1 + 25_000 - logged);
        // Quiet long enough to refill the burst: the flood is over, its count is said with the
        // next line, and a later flood is said again.
        let quiet = at(40_000);
        let left = budget.skipped;
        assert_eq!(budget.take(quiet), Verdict::Log((left > 0).then_some(left)));
        for _ in 0..999 {
            assert_eq!(budget.take(quiet), Verdict::Log(None));
        }
        assert_eq!(budget.take(quiet), Verdict::Skip { first: true });
        assert_eq!(budget.skipped, 1);
        budget.finish("task 1 t");
        assert_eq!(budget.skipped, 0);
    }
}
