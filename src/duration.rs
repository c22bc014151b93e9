//! Parsing and printing of the durations used in config, env and flags (`500ms`, `10s`, `5m`, `1h`,
//! `7d`, plain seconds).

use std::time::Duration;

/// The longest duration accepted anywhere: 100 years (`36500d`). Longer is a typo, and the
/// daemon adds durations to the monotonic clock (`now + graceful_timeout`), which a value near
/// `u64::MAX` seconds overflows: a panic at the first SIGTERM.
pub const MAX_DURATION: Duration = Duration::from_hours(36_500 * 24);

/// Parses `500ms`, `10s`, `5m`, `1h`, `7d`, or a plain number of seconds (fractions allowed).
/// The number is read as a decimal, not a float, so that whatever `format_duration` prints parses
/// back to the same nanosecond.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let invalid =
        || format!("invalid duration {text:?}: expected e.g. 500ms, 10s, 5m, 1h, 7d or seconds");
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(invalid());
    }
    let nanos_per_unit: u128 = match unit.trim() {
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
            ));
        }
    };
    let out_of_range = || format!("invalid duration {text:?}: out of range");
    // Digits past the nanosecond (of the largest unit) change nothing; dropping them keeps the
    // arithmetic in range.
    let fraction = &fraction[..fraction.len().min(18)];
    let digits = |s: &str| -> Result<u128, String> {
        if s.is_empty() {
            Ok(0)
        } else {
            s.parse::<u128>().map_err(|_| out_of_range())
        }
    };
    let scale = 10u128.pow(u32::try_from(fraction.len()).unwrap_or(18));
    // At most 18 digits times at most a day's nanoseconds: far inside u128.
    let fraction_nanos = digits(fraction)? * nanos_per_unit / scale;
    let nanos = digits(whole)?
        .checked_mul(nanos_per_unit)
        .and_then(|n| n.checked_add(fraction_nanos))
        .ok_or_else(out_of_range)?;
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| out_of_range())?;
    in_range(Duration::new(secs, (nanos % 1_000_000_000) as u32), text)
}

/// `duration` if it is at most `MAX_DURATION`; else an error quoting `text`, as it was written.
pub fn in_range(duration: Duration, text: &str) -> Result<Duration, String> {
    if duration > MAX_DURATION {
        return Err(format!(
            "invalid duration {text:?}: out of range (at most {})",
            format_duration(MAX_DURATION)
        ));
    }
    Ok(duration)
}

/// Prints a duration in the largest unit that represents it exactly, so that it parses back; one
/// that is not a whole number of milliseconds as decimal seconds (`0.0004`).
pub fn format_duration(duration: Duration) -> String {
    if !duration.subsec_nanos().is_multiple_of(1_000_000) {
        let digits = format!("{:09}", duration.subsec_nanos());
        return format!("{}.{}", duration.as_secs(), digits.trim_end_matches('0'));
    }
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if millis.is_multiple_of(size) {
            return format!("{}{unit}", millis / size);
        }
    }
    format!("{millis}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_form() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_mins(5)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_hours(1)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_hours(7 * 24)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0.25"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn rejects_garbage_with_a_message() {
        for bad in ["", "s", "10x", "-1s", "1.2.3s", "ten"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("invalid duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn format_round_trips() {
        for text in ["500ms", "10s", "5m", "1h", "7d", "1500ms", "0s"] {
            let parsed = parse_duration(text).unwrap();
            assert_eq!(format_duration(parsed), text);
            assert_eq!(parse_duration(&format_duration(parsed)), Ok(parsed));
        }
    }
}

/// Property tests ("fuzzing") of the duration parser. Run longer with
/// `PROPTEST_CASES=200000 cargo test --release --lib fuzz` (see CONTRIBUTING.md, *Fuzzing*).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(crate::fuzz_config(512))]

        #[test]
        fn any_text_is_a_duration_or_says_invalid(text in prop_oneof![
            any::<String>(),
            "[0-9. ]{0,30}(ms|s|m|h|d|x|µs|)[ 0-9]{0,2}",
        ]) {
            match parse_duration(&text) {
                Ok(duration) => prop_assert!(duration <= MAX_DURATION),
                Err(why) => {
                    prop_assert!(why.starts_with("invalid duration "), "{why}");
                    prop_assert!(!why.contains('\n'));
                }
            }
        }

        #[test]
        fn every_duration_prints_as_text_that_parses_back(secs in 0..=MAX_DURATION.as_secs(), nanos in 0u32..1_000_000_000, whole_ms in any::<bool>()) {
            let nanos = if whole_ms { nanos / 1_000_000 * 1_000_000 } else { nanos };
            let duration = Duration::new(secs, nanos).min(MAX_DURATION);
            let text = format_duration(duration);
            prop_assert_eq!(parse_duration(&text), Ok(duration), "{}", text);
        }

        #[test]
        fn decimal_seconds_are_exact(whole in 0u64..1_000_000, fraction in 0u32..1_000_000_000) {
            let text = format!("{whole}.{fraction:09}");
            prop_assert_eq!(parse_duration(&text), Ok(Duration::new(whole, fraction)));
        }
    }

    /// The print-back property on the case it failed before the fix: 0.4 ms printed as "0s",
    /// which `check-config` output then gave back as a `tick` it refuses.
    #[test]
    fn a_sub_millisecond_duration_prints_back() {
        let tick = Duration::from_micros(400);
        assert_eq!(format_duration(tick), "0.0004");
        assert_eq!(parse_duration("0.0004"), Ok(tick));
        assert_eq!(parse_duration("0.0003"), Ok(Duration::from_micros(300)));
        assert!(parse_duration("18446744073709551615").is_err());
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
    }
}
