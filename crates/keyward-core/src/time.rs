//! Time as keyward stores it: milliseconds since the Unix epoch, UTC, and the few ways it is
//! shown (RFC 3339 in JSON, the calendar month the shared pool is metered in).

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{Month, OffsetDateTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    pub fn as_i64(self) -> i64 {
        self.0
    }

    /// The instant as a UTC date and time (the epoch for a value `time` cannot hold).
    pub fn to_datetime(self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// The instant `t` names (to the millisecond).
    pub fn from_datetime(t: OffsetDateTime) -> UnixMillis {
        UnixMillis(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
    }

    /// RFC 3339 in UTC, milliseconds shown when there are any (what JSON answers carry).
    pub fn rfc3339(self) -> String {
        self.to_datetime()
            .format(&Rfc3339)
            .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
    }

    /// The calendar month (UTC) this instant falls in.
    pub fn month(self) -> CalendarMonth {
        let t = self.to_datetime();
        let start = t
            .replace_day(1)
            .map(|d| d.replace_time(time::Time::MIDNIGHT))
            .unwrap_or(t);
        let (year, month) = (start.year(), start.month());
        let end = if month == Month::December {
            start
                .replace_year(year + 1)
                .and_then(|d| d.replace_month(Month::January))
        } else {
            start.replace_month(month.next())
        }
        .unwrap_or(start);
        CalendarMonth {
            label: format!("{year:04}-{:02}", u8::from(month)),
            start: UnixMillis::from_datetime(start),
            end: UnixMillis::from_datetime(end),
        }
    }
}

/// A calendar month in UTC: the period the shared pool's credits are counted in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarMonth {
    /// `YYYY-MM`: the key usage is stored under.
    pub label: String,
    /// Its first instant.
    pub start: UnixMillis,
    /// The first instant of the next month.
    pub end: UnixMillis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(UnixMillis(0).rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(UnixMillis(1_764_000_000_123).rfc3339(), "2025-11-24T16:00:00.123Z");
    }

    #[test]
    fn months_are_calendar_months() {
        // 2026-12-31T23:59:59Z
        let m = UnixMillis(1_798_761_599_000).month();
        assert_eq!(m.label, "2026-12");
        assert_eq!(m.start, UnixMillis(1_796_083_200_000));
        assert_eq!(m.end, UnixMillis(1_798_761_600_000));
        // The first instant of a month is in that month.
        assert_eq!(UnixMillis(1_796_083_200_000).month().label, "2026-12");
        assert_eq!(UnixMillis(1_796_083_199_999).month().label, "2026-11");
    }
}
