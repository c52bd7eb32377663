//! Istio duration strings.
//!
//! Istio's CRDs take protobuf `Duration`s, which in YAML are written either in
//! protobuf JSON form (`"1.5s"`) or, as Istio's own docs do, Go form (`"1m"`,
//! `"2m30s"`, `"100ms"`). Both are sequences of `<decimal><unit>`.

use std::time::Duration;

const UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
];

/// Parses `"10s"`, `"1.5s"`, `"100ms"`, `"1m"`, `"1h"`, `"2m30s"`; `"0"` is zero.
/// Negative durations are rejected because no Istio field accepts them.
/// The error is the message to report, e.g. `"ten" is not a duration`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let not_a_duration = || format!("{text:?} is not a duration");
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(not_a_duration());
    }
    let mut rest = s;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(not_a_duration)?;
        let (number, after) = rest.split_at(number_len);
        // Longest unit first so "ms" is not read as "m" followed by garbage.
        let (unit, scale) = UNITS
            .iter()
            .filter(|(u, _)| after.starts_with(u))
            .max_by_key(|(u, _)| u.len())
            .ok_or_else(not_a_duration)?;
        let nanos = scaled(number, *scale).ok_or_else(not_a_duration)?;
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(not_a_duration)?;
        rest = &after[unit.len()..];
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| not_a_duration())?;
    // The remainder is below 1e9 and so always fits in u32.
    let sub = (total_nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, sub))
}

/// `number` (digits with an optional fraction) times `scale` nanoseconds, exactly.
fn scaled(number: &str, scale: u128) -> Option<u128> {
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if (int.is_empty() && frac.is_empty()) || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let int_part: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut nanos = int_part.checked_mul(scale)?;
    // Digits beyond nanosecond precision cannot change the result.
    let mut place = scale;
    for digit in frac.chars().take(30) {
        place /= 10;
        let d = u128::from(digit.to_digit(10)?);
        nanos = nanos.checked_add(d * place)?;
    }
    Some(nanos)
}

/// Istio's `ValidateDuration`: durations must be at least a millisecond.
pub fn check_min_1ms(text: &str, parsed: Duration) -> Result<Duration, String> {
    if parsed < Duration::from_millis(1) {
        Err(format!("{text:?} must be at least 1ms"))
    } else {
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_istio_and_go_forms() {
        let cases = [
            ("10s", Duration::from_secs(10)),
            ("1.5s", Duration::from_millis(1500)),
            ("100ms", Duration::from_millis(100)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("2m30s", Duration::from_secs(150)),
            ("250us", Duration::from_micros(250)),
            ("0.001s", Duration::from_millis(1)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("1h1m1s1ms", Duration::from_millis(3_661_001)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for text in [
            "ten", "", "10", "s", "1.5", "-1s", "1x", "1.2.3s", "10 s", "1d", ".s",
        ] {
            assert_eq!(
                parse_duration(text),
                Err(format!("{text:?} is not a duration")),
                "{text}"
            );
        }
    }

    #[test]
    fn minimum_is_one_millisecond() {
        assert!(check_min_1ms("1ms", Duration::from_millis(1)).is_ok());
        assert_eq!(
            check_min_1ms("0s", Duration::ZERO),
            Err("\"0s\" must be at least 1ms".to_string())
        );
    }
}
