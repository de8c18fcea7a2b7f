//! Durations on the command line and in the environment (`100ms`, `5s`, `2m`, `24h`), as every
//! Weft binary's `Config` parses them.

use std::time::Duration;

/// Parses a whole number followed by a unit: `ms`, `s` (also no unit), `m` or `h`; surrounding
/// white space is ignored. Used as clap's `value_parser` for duration flags.
///
/// # Errors
/// A message naming the bad value: not a number, an unknown unit, or too long for a
/// [`Duration`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 100ms, 5s, 2m or 24h"))?;
    let secs = |factor: u64| {
        n.checked_mul(factor)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?} is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_errors() {
        for (text, want) in [
            ("250ms", Duration::from_millis(250)),
            ("5s", Duration::from_secs(5)),
            (" 7 ", Duration::from_secs(7)),
            ("2m", Duration::from_secs(120)),
            ("24h", Duration::from_secs(86400)),
        ] {
            assert_eq!(parse(text), Ok(want), "{text:?}");
        }
        assert!(parse("soon").unwrap_err().contains("soon"));
        assert!(parse("5x").unwrap_err().contains("unknown unit"));
        assert!(parse("").is_err());
        assert!(
            parse("18446744073709551615h")
                .unwrap_err()
                .contains("too long")
        );
    }
}
