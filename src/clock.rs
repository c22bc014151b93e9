//! The two clocks the loop lives by. Due times in the database are wall-clock Unix seconds (a
//! producer writes them); timers run on the monotonic clock. This module turns one into the other
//! without panicking whatever the wall clock does, and notices when the wall clock steps back.

use std::time::{Duration, Instant};

/// Now, as Unix seconds: the unit of every time column, and of every due time the loop handles.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A smaller difference between the two clocks is jitter or NTP slewing, not a step.
const STEP_TOLERANCE_SECONDS: f64 = 1.0;

/// How long to sleep until the wall-clock time `due`, seen at wall-clock time `now`: zero for a
/// time past (or now), at most `max`, and `max` for a time that is not a number, so that an odd
/// due time is only read again after the longest wait.
pub fn wait_until(due: f64, now: f64, max: Duration) -> Duration {
    if due <= now {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(due - now).map_or(max, |wait| wait.min(max))
}

/// Tells a backward step of the wall clock from its steady pace, by the monotonic clock.
#[derive(Debug, Default)]
pub struct StepDetector {
    /// The monotonic and the wall-clock readings of the last look.
    last: Option<(Instant, f64)>,
}

impl StepDetector {
    /// Takes the clocks' readings; returns how many seconds the wall clock went back since the
    /// last look, if it did. A forward jump (a suspended machine waking up, a clock set forward) is
    /// not a step back: whatever it made due is due.
    pub fn observe(&mut self, monotonic: Instant, wall: f64) -> Option<f64> {
        let (then, then_wall) = self.last.replace((monotonic, wall))?;
        let expected = then_wall + monotonic.saturating_duration_since(then).as_secs_f64();
        let back = expected - wall;
        // Not a number (a clock before 1970 reads 0.0, never NaN, but a caller's sum might be)
        // compares false: no step.
        (back > STEP_TOLERANCE_SECONDS).then_some(back)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_hours(1);

    #[test]
    fn waits_are_never_negative_nor_longer_than_the_cap() {
        assert_eq!(wait_until(100.0, 100.0, HOUR), Duration::ZERO);
        // The wall clock went back below a due time it had passed: still no negative wait.
        assert_eq!(wait_until(100.0, 3700.0, HOUR), Duration::ZERO);
        assert_eq!(wait_until(100.5, 100.0, HOUR), Duration::from_millis(500));
        // A due time pushed far off by a step back, or absurd, is re-read after the cap.
        assert_eq!(wait_until(100.0 + 86_400.0, 100.0, HOUR), HOUR);
        assert_eq!(wait_until(f64::INFINITY, 100.0, HOUR), HOUR);
        assert_eq!(wait_until(f64::NAN, 100.0, HOUR), HOUR);
        assert_eq!(wait_until(f64::MAX, f64::MIN, HOUR), HOUR);
    }

    #[test]
    fn a_step_back_is_told_from_the_clocks_steady_pace() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut clock = StepDetector::default();
        assert_eq!(clock.observe(at(0), 1000.0), None, "first look");
        assert_eq!(clock.observe(at(1), 1001.0), None, "steady");
        assert_eq!(clock.observe(at(2), 1002.4), None, "slewing");
        assert_eq!(clock.observe(at(3), 1002.9), None, "jitter under a second");
        let back = clock.observe(at(4), 3.9).unwrap();
        assert!((back - 1000.0).abs() < 1e-6, "{back}");
        assert_eq!(
            clock.observe(at(5), 4.9),
            None,
            "steady again after the step"
        );
        assert_eq!(clock.observe(at(6), 90_000.0), None, "a jump forward");
        // Readings out of order (a caller's mistake) or absurd never panic.
        assert_eq!(clock.observe(at(1), 90_000.0), None);
        assert_eq!(clock.observe(at(7), f64::NAN), None);
        assert_eq!(clock.observe(at(8), 0.0), None, "after a NaN, no verdict");
    }
}
