//! The CronJob controller: creates a Job from `jobTemplate` at each time of a standard
//! five-field schedule (minute hour day-of-month month day-of-week, with `*`, lists, ranges,
//! steps, month and day names and the `@hourly`-style macros), in `timeZone` when given.
//!
//! Jobs are named `<cronjob>-<scheduled time in minutes since the epoch>`, as Kubernetes
//! names them, so a run is never created twice. `concurrencyPolicy` Allow, Forbid (skip a
//! run while one is active) or Replace (delete the active run first);
//! `startingDeadlineSeconds` skips a run that is too late; finished Jobs beyond
//! `successfulJobsHistoryLimit` / `failedJobsHistoryLimit` are deleted, oldest first.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, PostParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::job::finished;
use super::pods::{controller_ref, owned_by, owner_to_wake};
use crate::events::{self, Recorder};

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

struct Ctx {
    client: Client,
    jobs: Store<Job>,
    recorder: Recorder,
}

fn to_ts(t: &Time) -> Timestamp {
    Timestamp::from_second(t.0.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn to_time(t: Timestamp) -> Time {
    Time(k8s_openapi::chrono::DateTime::from_timestamp(t.as_second(), 0).unwrap_or_default())
}

/// Which finished Jobs go: beyond the limit of each kind, the oldest first.
fn beyond_history(jobs: &[Arc<Job>], successful: usize, failed: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (kind, keep) in [("Complete", successful), ("Failed", failed)] {
        let mut done: Vec<&Arc<Job>> = jobs.iter().filter(|j| finished(j) == Some(kind)).collect();
        done.sort_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let excess = done.len().saturating_sub(keep);
        out.extend(done.into_iter().take(excess).map(|j| j.name_any()));
    }
    out
}

async fn reconcile(cj: Arc<CronJob>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.jobs.wait_until_ready().await.ok();
    let ns = cj.namespace().unwrap_or_default();
    let name = cj.name_any();
    let uid = cj.metadata.uid.clone().unwrap_or_default();
    if cj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = cj.spec.clone().unwrap_or_default();
    let tz = match spec.time_zone.as_deref() {
        None | Some("") => TimeZone::UTC,
        Some(z) => match TimeZone::get(z) {
            Ok(tz) => tz,
            Err(_) => {
                ctx.recorder.warning(
                    events::reference(&*cj),
                    "UnknownTimeZone",
                    format!("spec.timeZone: unknown time zone {z}"),
                );
                return Ok(Action::await_change());
            }
        },
    };
    let schedule = match Schedule::parse(&spec.schedule) {
        Ok(s) => s,
        Err(e) => {
            ctx.recorder.warning(
                events::reference(&*cj),
                "UnparseableSchedule",
                format!("spec.schedule: {e}"),
            );
            return Ok(Action::await_change());
        }
    };
    let jobs: Vec<Arc<Job>> = ctx
        .jobs
        .state()
        .into_iter()
        .filter(|j| j.namespace().as_deref() == Some(ns.as_str()) && owned_by(&**j, &uid))
        .collect();
    let active: Vec<&Arc<Job>> = jobs.iter().filter(|j| finished(j).is_none()).collect();
    let job_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Timestamp::now();
    let status = cj.status.clone().unwrap_or_default();
    let since = status
        .last_schedule_time
        .as_ref()
        .or(cj.metadata.creation_timestamp.as_ref())
        .map(to_ts)
        .unwrap_or(now);
    let mut last_schedule = status.last_schedule_time.clone();
    let mut active_refs: Vec<&Arc<Job>> = active.clone();
    let (missed, _) = schedule.last_missed(since, now, &tz);
    if let (Some(t), false) = (missed, spec.suspend == Some(true)) {
        let late = (now - t).get_seconds();
        let too_late = spec.starting_deadline_seconds.is_some_and(|d| late > d);
        let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
        if too_late {
            ctx.recorder.warning(
                events::reference(&*cj),
                "MissSchedule",
                format!("Missed scheduled time to start a job: {t}"),
            );
            last_schedule = Some(to_time(t));
        } else if policy == "Forbid" && !active.is_empty() {
            // Skipped: a run is still active. The next schedule time decides again.
            last_schedule = Some(to_time(t));
        } else {
            if policy == "Replace" {
                for j in &active {
                    let dp = DeleteParams {
                        propagation_policy: Some(PropagationPolicy::Background),
                        ..Default::default()
                    };
                    let _ = job_api.delete(&j.name_any(), &dp).await;
                }
                active_refs.clear();
            }
            let template = spec.job_template.clone();
            let meta = template.metadata.clone().unwrap_or_default();
            let job_name = format!("{name}-{}", t.as_second() / 60);
            let mut annotations = meta.annotations.unwrap_or_default();
            annotations.insert(
                "batch.kubernetes.io/cronjob-scheduled-timestamp".into(),
                t.to_string(),
            );
            let job = Job {
                metadata: ObjectMeta {
                    name: Some(job_name.clone()),
                    namespace: Some(ns.clone()),
                    labels: meta.labels,
                    annotations: Some(annotations),
                    owner_references: Some(vec![controller_ref(&*cj)]),
                    ..Default::default()
                },
                spec: template.spec,
                status: None,
            };
            match job_api.create(&PostParams::default(), &job).await {
                Ok(_) => {
                    info!(cronjob = %format!("{ns}/{name}"), job = %job_name, scheduled = %t, "job created");
                    ctx.recorder.normal(
                        events::reference(&*cj),
                        "SuccessfulCreate",
                        format!("Created job {job_name}"),
                    );
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
            last_schedule = Some(to_time(t));
        }
    }
    // History.
    let doomed = beyond_history(
        &jobs,
        spec.successful_jobs_history_limit.unwrap_or(3).max(0) as usize,
        spec.failed_jobs_history_limit.unwrap_or(1).max(0) as usize,
    );
    for j in &doomed {
        let dp = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..Default::default()
        };
        match job_api.delete(j, &dp).await {
            Ok(_) => info!(cronjob = %format!("{ns}/{name}"), job = %j, "old job deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let last_successful = jobs
        .iter()
        .filter(|j| finished(j) == Some("Complete"))
        .filter_map(|j| j.status.as_ref().and_then(|s| s.completion_time.clone()))
        .max_by_key(|t| t.0);
    let new_status = json!({
        "lastScheduleTime": last_schedule,
        "lastSuccessfulTime": last_successful.or(status.last_successful_time.clone()),
        "active": active_refs.iter().map(|j| json!({
            "apiVersion": "batch/v1", "kind": "Job", "name": j.name_any(),
            "namespace": ns, "uid": j.metadata.uid})).collect::<Vec<_>>(),
    });
    super::pods::write_status(&ctx.client, &*cj, new_status).await?;
    // Wake at the next scheduled time (and at least every minute, to follow the clock).
    let wait = schedule
        .next_after(now, &tz)
        .map(|t| Duration::from_millis(((t - now).get_milliseconds().max(0) as u64) + 200))
        .unwrap_or(Duration::from_secs(60))
        .min(Duration::from_secs(60));
    Ok(Action::requeue(wait))
}

fn error_policy(cj: Arc<CronJob>, e: &kube::Error, _: Arc<Ctx>) -> Action {
    warn!(cronjob = %cj.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

pub async fn run(client: Client) -> anyhow::Result<()> {
    let (jobs, job_events) = super::cached::<Job>(&client);
    let controller = Controller::new(
        Api::<CronJob>::all(client.clone()),
        watcher::Config::default(),
    );
    info!("CronJob controller started");
    super::drain(
        "cronjob",
        controller
            .watches_stream(job_events, |job: Job| owner_to_wake::<CronJob, _>(&job))
            .run(
                reconcile,
                error_policy,
                Arc::new(Ctx {
                    recorder: Recorder::new(client.clone(), "cronjob-controller"),
                    client,
                    jobs,
                }),
            ),
    )
    .await;
    Ok(())
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

    #[test]
    fn history_keeps_the_newest_finished_jobs() {
        let job = |name: &str, created: &str, done: &str| -> Arc<Job> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "creationTimestamp": created},
                    "status": {"conditions": [{"type": done, "status": "True"}]}
                }))
                .unwrap(),
            )
        };
        let jobs = vec![
            job("a", "2026-01-01T00:00:00Z", "Complete"),
            job("b", "2026-01-02T00:00:00Z", "Complete"),
            job("c", "2026-01-03T00:00:00Z", "Failed"),
            job("d", "2026-01-04T00:00:00Z", "Complete"),
            job("e", "2026-01-05T00:00:00Z", "Failed"),
        ];
        assert_eq!(beyond_history(&jobs, 2, 1), ["a", "c"]);
    }
}
