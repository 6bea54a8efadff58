//! The Job controller: runs pods until `completions` of them succeed, at most `parallelism`
//! at a time; more than `backoffLimit` failed pods, or running past `activeDeadlineSeconds`,
//! fails the Job. A finished Job gets a `Complete` or `Failed` condition (what
//! `kubectl wait --for=condition=complete` waits for) and its remaining pods are deleted.
//! `suspend: true` deletes the running pods and starts none.
//!
//! Pods carry the labels Kubernetes gives Job pods (`batch.kubernetes.io/job-name`,
//! `batch.kubernetes.io/controller-uid` and their short forms) and a controller reference.
//! Counts of succeeded and failed pods are kept in the status, so they survive the pods'
//! deletion.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::pods::{
    controller_ref, from_template, is_active, is_ready, owned_by, owner_to_wake, phase,
    random_suffix, Expectations,
};

struct Ctx {
    client: Client,
    pods: Store<Pod>,
    expect: Expectations,
}

/// The condition a finished Job carries, if it has finished.
pub fn finished(job: &Job) -> Option<&str> {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
        .map(|c| c.type_.as_str())
}

/// What the Job should do next, from its spec and its pods' counts.
#[derive(Debug, PartialEq)]
enum Step {
    /// Start this many more pods (negative: stop that many).
    Run(i64),
    Complete,
    Fail(&'static str, String),
}

fn step(job: &Job, active: i64, succeeded: i64, failed: i64, now: Time) -> Step {
    let spec = job.spec.clone().unwrap_or_default();
    let completions = spec.completions.map(i64::from);
    let parallelism = spec.parallelism.unwrap_or(1).max(0) as i64;
    let backoff = spec.backoff_limit.unwrap_or(6).max(0) as i64;
    if failed > backoff {
        return Step::Fail(
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit".into(),
        );
    }
    if let (Some(deadline), Some(start)) = (
        spec.active_deadline_seconds,
        job.status.as_ref().and_then(|s| s.start_time.as_ref()),
    ) {
        if (now.0 - start.0).num_seconds() >= deadline {
            return Step::Fail(
                "DeadlineExceeded",
                "Job was active longer than specified deadline".into(),
            );
        }
    }
    match completions {
        Some(c) if succeeded >= c => Step::Complete,
        // Without completions: done once one pod succeeded and none is still running.
        None if succeeded > 0 && active == 0 => Step::Complete,
        Some(c) => Step::Run(parallelism.min(c - succeeded) - active),
        None if succeeded > 0 => Step::Run(0),
        None => Step::Run(parallelism - active),
    }
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.pods.wait_until_ready().await.ok();
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let uid = job.metadata.uid.clone().unwrap_or_default();
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let pods: Vec<Arc<Pod>> = super::pods::in_namespace(&ctx.pods, &ns)
        .into_iter()
        .filter(|p| owned_by(&**p, &uid))
        .collect();
    let names: HashSet<String> = pods.iter().map(|p| p.name_any()).collect();
    if !ctx.expect.satisfied(&uid, &names) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let status = job.status.clone().unwrap_or_default();
    let count = |ph: &str| pods.iter().filter(|p| phase(p) == Some(ph)).count() as i64;
    let succeeded = count("Succeeded").max(status.succeeded.unwrap_or(0) as i64);
    let failed = count("Failed").max(status.failed.unwrap_or(0) as i64);
    let active: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_active(p)).collect();
    let now = Time(k8s_openapi::chrono::Utc::now());
    let suspended = job.spec.as_ref().and_then(|s| s.suspend) == Some(true);
    let mut patch = json!({
        "active": active.len(),
        "ready": active.iter().filter(|p| is_ready(p)).count(),
        "succeeded": succeeded,
        "failed": failed,
    });
    if status.start_time.is_none() && !suspended {
        patch["startTime"] = json!(now);
    }
    let mut conditions = status.conditions.clone().unwrap_or_default();
    let mut delete_active = suspended;
    let mut requeue = Action::await_change();
    if finished(&job).is_some() {
        delete_active = true;
    } else if !suspended {
        match step(&job, active.len() as i64, succeeded, failed, now.clone()) {
            Step::Complete => {
                info!(job = %format!("{ns}/{name}"), succeeded, "job complete");
                conditions.push(
                    serde_json::from_value(json!({
                    "type": "Complete", "status": "True",
                    "lastProbeTime": now, "lastTransitionTime": now}))
                    .expect("a condition"),
                );
                patch["completionTime"] = json!(now);
                delete_active = true;
            }
            Step::Fail(reason, message) => {
                info!(job = %format!("{ns}/{name}"), failed, reason, "job failed");
                conditions.push(
                    serde_json::from_value(json!({
                    "type": "Failed", "status": "True", "reason": reason, "message": message,
                    "lastProbeTime": now, "lastTransitionTime": now}))
                    .expect("a condition"),
                );
                delete_active = true;
            }
            Step::Run(n) if n > 0 => {
                let template = job
                    .spec
                    .as_ref()
                    .map(|s| s.template.clone())
                    .unwrap_or_default();
                let labels = BTreeMap::from([
                    (
                        "batch.kubernetes.io/controller-uid".to_string(),
                        uid.clone(),
                    ),
                    ("batch.kubernetes.io/job-name".to_string(), name.clone()),
                    ("controller-uid".to_string(), uid.clone()),
                    ("job-name".to_string(), name.clone()),
                ]);
                for _ in 0..n {
                    let pod_name = format!("{name}-{}", random_suffix());
                    let pod = from_template(
                        &template,
                        &ns,
                        pod_name.clone(),
                        controller_ref(&*job),
                        labels.clone(),
                    );
                    match pod_api.create(&PostParams::default(), &pod).await {
                        Ok(_) => ctx.expect.created(&uid, pod_name),
                        Err(e) => {
                            warn!(job = %format!("{ns}/{name}"), error = %e, "creating a pod");
                            requeue = Action::requeue(Duration::from_secs(5));
                            break;
                        }
                    }
                }
            }
            Step::Run(n) if n < 0 => {
                // Parallelism lowered: stop the newest.
                let mut newest: Vec<&&Arc<Pod>> = active.iter().collect();
                newest.sort_by_key(|p| std::cmp::Reverse(p.metadata.creation_timestamp.clone()));
                for p in newest.into_iter().take((-n) as usize) {
                    let _ = pod_api
                        .delete(&p.name_any(), &DeleteParams::default())
                        .await;
                    ctx.expect.deleted(&uid, p.name_any());
                }
            }
            Step::Run(_) => {}
        }
        if let Some(d) = job.spec.as_ref().and_then(|s| s.active_deadline_seconds) {
            requeue = Action::requeue(Duration::from_secs(d.max(1) as u64));
        }
    }
    if delete_active {
        for p in &active {
            match pod_api
                .delete(&p.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => ctx.expect.deleted(&uid, p.name_any()),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    if suspended
        && !conditions
            .iter()
            .any(|c| c.type_ == "Suspended" && c.status == "True")
    {
        conditions.retain(|c| c.type_ != "Suspended");
        conditions.push(
            serde_json::from_value(json!({
            "type": "Suspended", "status": "True", "reason": "JobSuspended",
            "message": "Job suspended", "lastProbeTime": now, "lastTransitionTime": now}))
            .expect("a condition"),
        );
    } else if !suspended {
        conditions.retain(|c| c.type_ != "Suspended");
    }
    patch["conditions"] = serde_json::to_value(&conditions).unwrap_or_default();
    super::pods::write_status(&ctx.client, &*job, patch).await?;
    Ok(requeue)
}

fn error_policy(job: Arc<Job>, e: &kube::Error, _: Arc<Ctx>) -> Action {
    warn!(job = %job.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client) -> anyhow::Result<()> {
    let (pods, pod_events) = super::cached::<Pod>(&client);
    let controller = Controller::new(Api::<Job>::all(client.clone()), watcher::Config::default());
    info!("Job controller started");
    super::drain(
        "job",
        controller
            .watches_stream(pod_events, |pod: Pod| owner_to_wake::<Job, _>(&pod))
            .run(
                reconcile,
                error_policy,
                Arc::new(Ctx {
                    client,
                    pods,
                    expect: Expectations::default(),
                }),
            ),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(spec: serde_json::Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j"}, "spec": spec})).unwrap()
    }

    fn now() -> Time {
        Time(k8s_openapi::chrono::Utc::now())
    }

    #[test]
    fn runs_up_to_parallelism_until_completions() {
        let j = job(json!({"completions": 5, "parallelism": 2, "template": {}}));
        assert_eq!(step(&j, 0, 0, 0, now()), Step::Run(2));
        assert_eq!(step(&j, 1, 3, 0, now()), Step::Run(1));
        // Only one completion left: one pod at a time.
        assert_eq!(step(&j, 2, 4, 0, now()), Step::Run(-1));
        assert_eq!(step(&j, 1, 5, 0, now()), Step::Complete);
    }

    #[test]
    fn fails_past_the_backoff_limit_or_the_deadline() {
        let j = job(json!({"completions": 1, "backoffLimit": 2, "template": {}}));
        assert_eq!(step(&j, 1, 0, 2, now()), Step::Run(0));
        assert!(matches!(
            step(&j, 0, 0, 3, now()),
            Step::Fail("BackoffLimitExceeded", _)
        ));
        let mut j = job(json!({"completions": 1, "activeDeadlineSeconds": 10, "template": {}}));
        j.status =
            Some(serde_json::from_value(json!({"startTime": "2026-01-01T00:00:00Z"})).unwrap());
        assert!(matches!(
            step(&j, 1, 0, 0, now()),
            Step::Fail("DeadlineExceeded", _)
        ));
    }

    #[test]
    fn without_completions_one_success_ends_it_once_the_rest_stop() {
        let j = job(json!({"parallelism": 3, "template": {}}));
        let mut j = j;
        j.spec.as_mut().unwrap().completions = None;
        assert_eq!(step(&j, 0, 0, 0, now()), Step::Run(3));
        assert_eq!(step(&j, 2, 1, 0, now()), Step::Run(0));
        assert_eq!(step(&j, 0, 1, 0, now()), Step::Complete);
    }
}
