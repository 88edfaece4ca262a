//! Which snapshots a keep policy keeps: restic's rules, on the times the
//! storage server gave the snapshots, in UTC.
//!
//! Snapshots are taken newest first. `--keep-last N` keeps the N newest.
//! Each other rule keeps the newest snapshot of each of its N most recent
//! periods (hours, days, ISO weeks, months, years) that hold a snapshot. A
//! snapshot any rule keeps is kept. The same function serves the agent's
//! `forget` and the servers' group policy, so both decide alike; UTC
//! because a server has no user's time zone, and one answer everywhere
//! matters more than local midnight.

use time::OffsetDateTime;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl KeepPolicy {
    /// A policy with no rule keeps everything; `forget` refuses it.
    pub fn is_empty(&self) -> bool {
        *self == KeepPolicy::default()
    }

    /// Each rule's name (as its flag says it) and count.
    pub fn rules(&self) -> [(&'static str, u32); 6] {
        [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ]
    }

    /// The rules that are set, in words: "last 7, daily 14" ("" for none).
    pub fn describe(&self) -> String {
        self.rules()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(rule, n)| format!("{rule} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The period a rule groups snapshots by.
#[derive(Clone, Copy)]
enum Period {
    Each,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    /// A key equal for two times in the same period; `index` makes every
    /// snapshot its own period for `Each`.
    fn key(self, time_unix_ms: i64, index: usize) -> i64 {
        let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(time_unix_ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let (year, month, day, hour) = (
            i64::from(t.year()),
            i64::from(u8::from(t.month())),
            i64::from(t.day()),
            i64::from(t.hour()),
        );
        match self {
            Period::Each => index as i64,
            Period::Hour => ((year * 100 + month) * 100 + day) * 100 + hour,
            Period::Day => (year * 100 + month) * 100 + day,
            Period::Week => {
                let (iso_year, week, _) = t.to_iso_week_date();
                i64::from(iso_year) * 100 + i64::from(week)
            }
            Period::Month => year * 100 + month,
            Period::Year => year,
        }
    }
}

/// Splits `snapshots` (any order, each with its time in unix ms) into the
/// ones `policy` keeps and the ones it removes, each newest first.
pub fn apply<T: Clone>(policy: &KeepPolicy, snapshots: &[(T, i64)]) -> (Vec<T>, Vec<T>) {
    let mut order: Vec<usize> = (0..snapshots.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(snapshots[i].1));
    let mut rules = [
        (Period::Each, policy.last, None),
        (Period::Hour, policy.hourly, None),
        (Period::Day, policy.daily, None),
        (Period::Week, policy.weekly, None),
        (Period::Month, policy.monthly, None),
        (Period::Year, policy.yearly, None),
    ];
    let (mut keep, mut remove) = (Vec::new(), Vec::new());
    for (index, &i) in order.iter().enumerate() {
        let time = snapshots[i].1;
        let mut kept = false;
        for (period, left, last) in &mut rules {
            if *left == 0 {
                continue;
            }
            let key = period.key(time, index);
            if *last != Some(key) {
                *last = Some(key);
                *left -= 1;
                kept = true;
            }
        }
        if kept {
            keep.push(snapshots[i].0.clone());
        } else {
            remove.push(snapshots[i].0.clone());
        }
    }
    (keep, remove)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;
    /// 2026-01-01T00:00:00Z, a Thursday.
    const JAN_1: i64 = 1_767_225_600_000;

    fn names(
        snapshots: &[(&'static str, i64)],
        policy: KeepPolicy,
    ) -> (Vec<&'static str>, Vec<&'static str>) {
        apply(&policy, snapshots)
    }

    #[test]
    fn keep_last_keeps_the_newest_whatever_the_input_order() {
        let s = [("b", 2), ("c", 3), ("a", 1)];
        let policy = KeepPolicy {
            last: 2,
            ..KeepPolicy::default()
        };
        assert_eq!(names(&s, policy), (vec!["c", "b"], vec!["a"]));
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_of_the_last_days_with_a_snapshot() {
        // Two a day for four days, then a gap of a day, then one more.
        let mut s = Vec::new();
        let labels = ["d0a", "d0b", "d1a", "d1b", "d2a", "d2b", "d3a", "d3b"];
        for (n, label) in labels.iter().enumerate() {
            let day = (n / 2) as i64;
            let at = JAN_1 + day * DAY + if n % 2 == 0 { 8 * HOUR } else { 20 * HOUR };
            s.push((*label, at));
        }
        s.push(("d5", JAN_1 + 5 * DAY + HOUR));
        let policy = KeepPolicy {
            daily: 3,
            ..KeepPolicy::default()
        };
        let (keep, remove) = names(&s, policy);
        // Days without a snapshot do not count against the three.
        assert_eq!(keep, vec!["d5", "d3b", "d2b"]);
        assert_eq!(remove, vec!["d3a", "d2a", "d1b", "d1a", "d0b", "d0a"]);
    }

    #[test]
    fn rules_add_up_and_a_snapshot_kept_by_two_rules_counts_for_both() {
        // One a day for 60 days.
        let s: Vec<(i64, i64)> = (0..60).map(|d| (d, JAN_1 + d * DAY + HOUR)).collect();
        let policy = KeepPolicy {
            last: 1,
            daily: 7,
            weekly: 4,
            monthly: 3,
            ..KeepPolicy::default()
        };
        let (keep, _) = apply(&policy, &s);
        // Days 59..53 (daily, 59 also last); the newest of each of the four
        // newest ISO weeks: week 9 (Mar 1, day 59) is also daily, then the
        // Sundays 52 and 45 and 38; months: Mar (59), Feb (58), Jan (30).
        let mut want: Vec<i64> = (53..60).rev().collect();
        want.extend([52, 45, 38, 30]);
        assert_eq!(keep, want);
    }

    #[test]
    fn an_hourly_yearly_and_weekly_rule_uses_utc_periods() {
        let s = [
            ("new-year", JAN_1),
            ("new-year-eve", JAN_1 - 1),
            ("year-before", JAN_1 - 365 * DAY),
        ];
        let yearly = KeepPolicy {
            yearly: 5,
            ..KeepPolicy::default()
        };
        assert_eq!(names(&s, yearly).0, vec!["new-year", "new-year-eve"]);
        let hourly = KeepPolicy {
            hourly: 1,
            ..KeepPolicy::default()
        };
        assert_eq!(names(&s, hourly).0, vec!["new-year"]);
        // Dec 31 2025 (Wednesday) and Jan 1 2026 (Thursday) share ISO week 1.
        let weekly = KeepPolicy {
            weekly: 1,
            ..KeepPolicy::default()
        };
        assert_eq!(
            names(&s, weekly),
            (vec!["new-year"], vec!["new-year-eve", "year-before"])
        );
    }

    #[test]
    fn an_empty_policy_is_empty_and_keeps_nothing_by_itself() {
        assert!(KeepPolicy::default().is_empty());
        let (keep, remove) = names(&[("a", 1)], KeepPolicy::default());
        assert!(keep.is_empty());
        assert_eq!(remove, vec!["a"]);
    }
}
