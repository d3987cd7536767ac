//! Times on the command line: RFC 3339, a date, or a span ago (`90s`, `15m`, `2h`, `7d`).

use chrono::{DateTime, NaiveDate, Utc};

/// Parses `input`: `2024-05-01T10:00:00Z` (RFC 3339), `2024-05-01` (midnight UTC), `now`,
/// or a span before now such as `30s`, `15m`, `2h`, `7d` (optionally followed by ` ago`).
pub(crate) fn parse(input: &str) -> Result<DateTime<Utc>, String> {
    parse_at(input, Utc::now())
}

fn parse_at(input: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = input.trim();
    if text == "now" {
        return Ok(now);
    }
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        && let Some(midnight) = date.and_hms_opt(0, 0, 0)
    {
        return Ok(midnight.and_utc());
    }
    let span = text.strip_suffix("ago").unwrap_or(text).trim();
    let split = span
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(span.len());
    let (number, unit) = span.split_at(split);
    let seconds: i64 = match unit.trim() {
        "s" | "sec" | "secs" => 1,
        "m" | "min" | "mins" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        _ => 0,
    };
    match number.parse::<i64>() {
        Ok(n) if seconds > 0 => n
            .checked_mul(seconds)
            .and_then(chrono::Duration::try_seconds)
            .and_then(|span| now.checked_sub_signed(span))
            .ok_or_else(|| format!("`{input}` reaches too far back")),
        _ => Err(format!(
            "`{input}` is not a time: use RFC 3339 (2024-05-01T10:00:00Z), a date \
             (2024-05-01), `now`, or a span ago (30s, 15m, 2h, 7d)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        let now = DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |s: &str| parse_at(s, now).map(|t| t.to_rfc3339());
        assert_eq!(at("2h").unwrap(), "2024-05-01T10:00:00+00:00");
        assert_eq!(at("15m ago").unwrap(), "2024-05-01T11:45:00+00:00");
        assert_eq!(at("1d").unwrap(), "2024-04-30T12:00:00+00:00");
        assert_eq!(at("2024-04-01").unwrap(), "2024-04-01T00:00:00+00:00");
        assert_eq!(
            at("2024-04-01T08:30:00+02:00").unwrap(),
            "2024-04-01T06:30:00+00:00"
        );
        assert_eq!(at("now").unwrap(), "2024-05-01T12:00:00+00:00");
        assert!(at("yesterday").is_err());
        assert!(at("5 fortnights").is_err());
    }
}
