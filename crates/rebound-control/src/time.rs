//! Timestamps of the API: RFC 3339 in UTC with milliseconds.

use std::time::SystemTime;

pub fn format(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn now() -> String {
    format(SystemTime::now())
}

pub fn parse(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let t = super::parse("2026-11-24T20:30:00.123Z").unwrap();
        assert_eq!(super::format(t), "2026-11-24T20:30:00.123Z");
        assert!(super::parse("yesterday").is_none());
    }
}
