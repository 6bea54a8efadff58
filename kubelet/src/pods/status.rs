//! The pod's status as the API shows it: phase, conditions, container statuses, written only
//! when it changed.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::chrono::{DateTime, SecondsFormat, Utc};
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::{json, Value};

use super::containers::{Slot, State, Terminated};
use super::{Phase, Worker};

pub(super) fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub(super) fn nanos_to_time(ns: i64) -> String {
    if ns <= 0 {
        return String::new();
    }
    DateTime::from_timestamp(ns / 1_000_000_000, (ns % 1_000_000_000) as u32)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

impl Worker {
    pub(super) fn condition(&mut self, kind: &'static str, ok: bool) -> Value {
        let entry = self.conditions.entry(kind).or_insert((ok, now()));
        if entry.0 != ok {
            *entry = (ok, now());
        }
        json!({"type": kind, "status": if ok { "True" } else { "False" },
               "lastTransitionTime": entry.1, "lastProbeTime": null})
    }

    pub(super) fn status(&mut self, phase: Phase) -> Value {
        let ip = self
            .sandbox
            .as_ref()
            .map(|s| s.ip.clone())
            .unwrap_or_default();
        let init_done = self.init.iter().all(|s| s.done);
        let ready = init_done && !self.apps.is_empty() && self.apps.iter().all(Slot::ready);
        let running = phase == Phase::Running;
        let mut conditions = vec![
            self.condition("PodReadyToStartContainers", self.sandbox.is_some()),
            self.condition("Initialized", init_done),
            self.condition("Ready", ready && running),
            self.condition("ContainersReady", ready && running),
            self.condition("PodScheduled", true),
        ];
        if let Some(e) = &self.sandbox_error {
            conditions[0]["reason"] = json!("FailedCreatePodSandBox");
            conditions[0]["message"] = json!(e);
        }
        let statuses =
            |slots: &[Slot]| -> Vec<Value> { slots.iter().map(container_status).collect() };
        let mut status = json!({
            "phase": phase.as_str(),
            "hostIP": self.k.node_ip, "hostIPs": [{"ip": self.k.node_ip}],
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": statuses(&self.apps),
        });
        if !self.init.is_empty() {
            status["initContainerStatuses"] = json!(statuses(&self.init));
        }
        if !ip.is_empty() {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        status
    }

    pub(super) async fn write_status(&mut self) {
        let phase = self.phase_now();
        let status = self.status(phase);
        if status == self.written {
            return;
        }
        let api: Api<Pod> = Api::namespaced(
            self.k.client.clone(),
            &self.pod.namespace().unwrap_or_default(),
        );
        match api
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
        {
            Ok(_) => self.written = status,
            Err(e) => tracing::warn!(pod = %self.key, "writing the pod status: {e}"),
        }
    }

    /// The phase from what the slots say now.
    pub(super) fn phase_now(&self) -> Phase {
        if self
            .init
            .iter()
            .any(|s| s.done && s.last.as_ref().is_some_and(|t| t.exit_code != 0))
        {
            return Phase::Failed;
        }
        if !self.apps.is_empty() && self.apps.iter().all(|s| s.done) {
            let ok = self
                .apps
                .iter()
                .all(|s| s.last.as_ref().is_some_and(|t| t.exit_code == 0));
            return if ok { Phase::Succeeded } else { Phase::Failed };
        }
        if self.sandbox.is_some()
            && self.init.iter().all(|s| s.done)
            && self.apps.iter().all(|s| s.id.is_some() || s.restarts > 0)
        {
            return Phase::Running;
        }
        Phase::Pending
    }
}

pub(super) fn terminated_json(t: &Terminated) -> Value {
    let mut v = json!({"exitCode": t.exit_code, "reason": t.reason,
                       "containerID": t.container_id});
    if !t.message.is_empty() {
        v["message"] = json!(t.message);
    }
    if !t.started_at.is_empty() {
        v["startedAt"] = json!(t.started_at);
    }
    if !t.finished_at.is_empty() {
        v["finishedAt"] = json!(t.finished_at);
    }
    v
}

pub(super) fn container_status(s: &Slot) -> Value {
    let state = match &s.state {
        State::Waiting { reason, message } => {
            let mut w = json!({"reason": reason});
            if !message.is_empty() {
                w["message"] = json!(message);
            }
            json!({"waiting": w})
        }
        State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
        State::Terminated(t) => json!({"terminated": terminated_json(t)}),
    };
    let mut v = json!({
        "name": s.spec.name,
        "state": state,
        "lastState": s.last.as_ref().map(|t| json!({"terminated": terminated_json(t)})).unwrap_or(json!({})),
        "ready": s.ready(),
        "restartCount": s.restarts,
        "image": s.spec.image.clone().unwrap_or_default(),
        "imageID": s.image_ref,
        "started": matches!(s.state, State::Running { .. }),
    });
    if let Some(id) = &s.id {
        v["containerID"] = json!(format!("containerd://{id}"));
    }
    v
}
