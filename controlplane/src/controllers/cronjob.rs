//! The CronJob controller: creates a Job from `jobTemplate` at each time of a standard
//! five-field schedule (minute hour day-of-month month day-of-week, with `*`, lists, ranges,
//! steps, month and day names and the `@hourly`-style macros), in `timeZone` when given.
//!
//! Jobs are named `<cronjob>-<scheduled time in minutes since the epoch>`, as Kubernetes
//! names them, so a run is never created twice. `concurrencyPolicy` Allow, Forbid (skip a
//! run while one is active) or Replace (delete the active run first);
//! `startingDeadlineSeconds` skips a run that is too late; finished Jobs beyond
//! `successfulJobsHistoryLimit` / `failedJobsHistoryLimit` are deleted, oldest first.

use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::Timestamp;
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
use ferry_common::cron::Schedule;
use ferry_common::events::{self, Recorder};

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
