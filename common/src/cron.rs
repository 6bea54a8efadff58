//! Cron schedules: the standard five fields (minute hour day-of-month month day-of-week, with
//! `*`, lists, ranges, steps, month and day names) and the `@hourly`-style macros, evaluated in
//! a time zone. The CronJob controller runs Jobs by them.

use std::collections::BTreeSet;

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A parsed five-field schedule: the allowed values of each field.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    minutes: BTreeSet<u8>,
    hours: BTreeSet<u8>,
    days: BTreeSet<u8>,
    months: BTreeSet<u8>,
    weekdays: BTreeSet<u8>,
    /// Cron's rule: when both day fields are restricted, a day matching either runs.
    days_restricted: bool,
    weekdays_restricted: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn field(text: &str, what: &str, lo: u8, hi: u8, names: &[&str]) -> Result<BTreeSet<u8>, String> {
    let value = |s: &str| -> Result<u8, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            return Ok(i as u8 + lo);
        }
        s.parse::<u8>().map_err(|_| {
            format!(
                "{what}: \"{s}\" is not a number{}",
                if names.is_empty() { "" } else { " or a name" }
            )
        })
    };
    let mut out = BTreeSet::new();
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u8>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{what}: step \"{s}\" must be a positive number"))?,
            ),
            None => (part, 1),
        };
        let (a, b) = if range == "*" || range == "?" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            (v, if part.contains('/') { hi } else { v })
        };
        if a < lo || b > hi || a > b {
            return Err(format!("{what}: {range} is outside {lo}-{hi}"));
        }
        out.extend((a..=b).step_by(step as usize));
    }
    Ok(out)
}

impl Schedule {
    pub fn parse(spec: &str) -> Result<Schedule, String> {
        let spec = spec.trim();
        let expanded = match spec {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            s if s.starts_with('@') => {
                return Err(format!(
                    "unknown macro {s}: use @yearly, @monthly, @weekly, @daily or @hourly"
                ))
            }
            s => s,
        };
        let f: Vec<&str> = expanded.split_whitespace().collect();
        if f.len() != 5 {
            return Err(format!(
                "\"{spec}\" has {} fields; a schedule has five: minute hour day-of-month month day-of-week",
                f.len()
            ));
        }
        let mut weekdays = field(f[4], "day of week", 0, 7, &WEEKDAYS)?;
        if weekdays.remove(&7) {
            weekdays.insert(0); // 7 is Sunday too
        }
        Ok(Schedule {
            minutes: field(f[0], "minute", 0, 59, &[])?,
            hours: field(f[1], "hour", 0, 23, &[])?,
            days: field(f[2], "day of month", 1, 31, &[])?,
            months: field(f[3], "month", 1, 12, &MONTHS)?,
            weekdays,
            days_restricted: !f[2].starts_with('*') && f[2] != "?",
            weekdays_restricted: !f[4].starts_with('*') && f[4] != "?",
        })
    }

    fn day_matches(&self, d: Date) -> bool {
        if !self.months.contains(&(d.month() as u8)) {
            return false;
        }
        let dom = self.days.contains(&(d.day() as u8));
        let dow = self
            .weekdays
            .contains(&(d.weekday().to_sunday_zero_offset() as u8));
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first time strictly after `after` that the schedule names, in `tz`.
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let local = after.to_zoned(tz.clone());
        let mut day = local.date();
        // Five years covers every valid schedule (Feb 29 on a given weekday included).
        for _ in 0..(366 * 5) {
            if self.day_matches(day) {
                for h in &self.hours {
                    for m in &self.minutes {
                        let dt =
                            DateTime::from_parts(day, jiff::civil::time(*h as i8, *m as i8, 0, 0));
                        if let Ok(z) = dt.to_zoned(tz.clone()) {
                            let t = z.timestamp();
                            if t > after {
                                return Some(t);
                            }
                        }
                    }
                }
            }
            day = day.checked_add(1.day()).ok()?;
        }
        None
    }

    /// The latest scheduled time in (`after`, `now`], if any, and how many there were.
    pub fn last_missed(
        &self,
        after: Timestamp,
        now: Timestamp,
        tz: &TimeZone,
    ) -> (Option<Timestamp>, usize) {
        let (mut last, mut n, mut t) = (None, 0, after);
        while let Some(next) = self.next_after(t, tz) {
            if next > now {
                break;
            }
            last = Some(next);
            n += 1;
            t = next;
            if n > 1000 {
                // Far behind (a long outage): only the latest run matters.
                t = now - 2.minutes();
                if t <= next {
                    break;
                }
            }
        }
        (last, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(spec: &str, after: &str) -> String {
        Schedule::parse(spec)
            .unwrap()
            .next_after(ts(after), &TimeZone::UTC)
            .unwrap()
            .to_string()
    }

    #[test]
    fn five_fields_as_cron_reads_them() {
        assert_eq!(
            next("* * * * *", "2026-11-24T15:30:10Z"),
            "2026-11-24T15:31:00Z"
        );
        assert_eq!(
            next("*/15 * * * *", "2026-11-24T15:30:00Z"),
            "2026-11-24T15:45:00Z"
        );
        assert_eq!(
            next("0 9-17/4 * * *", "2026-11-24T15:30:00Z"),
            "2026-11-24T17:00:00Z"
        );
        assert_eq!(
            next("30 2 1 * *", "2026-11-24T15:30:00Z"),
            "2026-12-01T02:30:00Z"
        );
        assert_eq!(
            next("0 0 * * SUN", "2026-11-24T15:30:00Z"),
            "2026-11-29T00:00:00Z"
        );
        assert_eq!(
            next("0 0 * * 7", "2026-11-24T15:30:00Z"),
            "2026-11-29T00:00:00Z"
        );
        assert_eq!(
            next("0 12 * FEB mon-fri", "2026-11-24T15:30:00Z"),
            "2027-02-01T12:00:00Z"
        );
        assert_eq!(
            next("0 0 29 2 *", "2026-11-24T15:30:00Z"),
            "2028-02-29T00:00:00Z"
        );
        // Both day fields restricted: either matches (the 1st, or a Friday).
        assert_eq!(
            next("0 0 1 * 5", "2026-11-24T15:30:00Z"),
            "2026-11-27T00:00:00Z"
        );
        assert_eq!(
            next("@hourly", "2026-11-24T15:30:00Z"),
            "2026-11-24T16:00:00Z"
        );
        assert_eq!(
            next("@weekly", "2026-11-24T15:30:00Z"),
            "2026-11-29T00:00:00Z"
        );
    }

    #[test]
    fn time_zones_move_the_hour() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let t = Schedule::parse("0 9 * * *")
            .unwrap()
            .next_after(ts("2026-11-24T00:00:00Z"), &tz)
            .unwrap();
        assert_eq!(t.to_string(), "2026-11-24T08:00:00Z");
    }

    #[test]
    fn bad_schedules_say_which_field() {
        for (spec, want) in [
            ("* * * *", "has 4 fields"),
            ("61 * * * *", "minute: 61 is outside 0-59"),
            ("* * * foo *", "month: \"foo\" is not a number or a name"),
            (
                "*/0 * * * *",
                "minute: step \"0\" must be a positive number",
            ),
            ("@sometimes", "unknown macro @sometimes"),
        ] {
            let e = Schedule::parse(spec).unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }

    #[test]
    fn missed_runs_count_and_the_latest_is_taken() {
        let s = Schedule::parse("*/10 * * * *").unwrap();
        let (last, n) = s.last_missed(
            ts("2026-11-24T15:00:00Z"),
            ts("2026-11-24T15:35:00Z"),
            &TimeZone::UTC,
        );
        assert_eq!(n, 3);
        assert_eq!(last.unwrap().to_string(), "2026-11-24T15:30:00Z");
        let (last, n) = s.last_missed(
            ts("2026-11-24T15:30:00Z"),
            ts("2026-11-24T15:35:00Z"),
            &TimeZone::UTC,
        );
        assert_eq!((last, n), (None, 0));
    }
}
