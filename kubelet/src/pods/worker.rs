//! One pod's worker: adopts what a previous kubelet left, syncs the pod every tick or change
//! (sandbox, init containers in order, then the containers) and tears it down on deletion.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, DeleteParams, Preconditions};
use kube::ResourceExt;
use serde_json::Value;
use tokio::sync::watch;

use crate::cri::{v1 as cri, Cri};

use super::containers::{new_probers, Slot, State, Terminated};
use super::sandbox::Sandbox;
use super::status::now;
use super::{Kubelet, Phase, CONTAINER_NAME, POD_UID, TICK};

pub(super) struct Worker {
    pub(super) k: Arc<Kubelet>,
    pub(super) cri: Cri,
    pub(super) pod: Pod,
    pub(super) key: String,
    pub(super) sandbox: Option<Sandbox>,
    pub(super) sandbox_error: Option<String>,
    pub(super) sandbox_retry: Option<Instant>,
    /// A finished pod's sandbox is stopped once.
    pub(super) sandbox_stopped: bool,
    pub(super) init: Vec<Slot>,
    pub(super) apps: Vec<Slot>,
    pub(super) start_time: String,
    /// Each condition's status and when it last changed.
    pub(super) conditions: BTreeMap<&'static str, (bool, String)>,
    pub(super) written: Value,
    /// What each configMap and secret volume was last written with, and when they were last
    /// read (None: not yet).
    pub(super) volume_prints: HashMap<String, u64>,
    pub(super) volumes_synced: Option<Instant>,
    /// Service account tokens of projected volumes, by audience and lifetime.
    pub(super) tokens: HashMap<String, super::tokens::CachedToken>,
}

impl Worker {
    pub(super) fn new(k: Arc<Kubelet>, pod: Pod) -> Worker {
        let spec = pod.spec.clone().unwrap_or_default();
        Worker {
            cri: k.cri.clone(),
            key: format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
            init: spec
                .init_containers
                .unwrap_or_default()
                .into_iter()
                .map(Slot::new)
                .collect(),
            apps: spec.containers.into_iter().map(Slot::new).collect(),
            k,
            pod,
            sandbox: None,
            sandbox_error: None,
            sandbox_retry: None,
            sandbox_stopped: false,
            start_time: now(),
            conditions: BTreeMap::new(),
            written: Value::Null,
            volume_prints: HashMap::new(),
            volumes_synced: None,
            tokens: HashMap::new(),
        }
    }

    pub(super) fn event(&self, warning: bool, reason: &str, message: String) {
        let pod = ferry_common::events::reference(&self.pod);
        if warning {
            self.k.events.warning(pod, reason, message);
        } else {
            self.k.events.normal(pod, reason, message);
        }
    }

    pub(super) fn uid(&self) -> String {
        self.pod.uid().unwrap_or_default()
    }

    pub(super) fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    pub(super) fn grace(&self) -> i64 {
        self.pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
    }

    pub(super) fn pod_dir(&self) -> PathBuf {
        self.k.pods_dir.join(format!(
            "{}_{}_{}",
            self.pod.namespace().unwrap_or_default(),
            self.pod.name_any(),
            self.uid()
        ))
    }

    pub(super) async fn run(mut self, mut rx: watch::Receiver<Option<Pod>>) -> Result<()> {
        tracing::info!(pod = %self.key, "starting the pod worker");
        if let Err(e) = self.adopt().await {
            tracing::warn!(pod = %self.key, "looking for this pod's sandbox: {e:#}");
        }
        loop {
            let current = rx.borrow_and_update().clone();
            let Some(pod) = current else {
                // Deleted outright (force delete): stop everything at once.
                self.teardown(0).await;
                return Ok(());
            };
            self.pod = pod;
            if self.pod.metadata.deletion_timestamp.is_some() {
                self.teardown(self.grace()).await;
                self.write_status().await;
                let api: Api<Pod> = Api::namespaced(
                    self.k.client.clone(),
                    &self.pod.namespace().unwrap_or_default(),
                );
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: self.pod.uid(),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match api.delete(&self.pod.name_any(), &dp).await {
                    Ok(_) => tracing::info!(pod = %self.key, "pod stopped and deleted"),
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                    Err(e) => tracing::warn!(pod = %self.key, "deleting the pod: {e}"),
                }
                return Ok(());
            }
            if finished_in_api(&self.pod) {
                // A pod the API shows finished never runs again, whoever finished it (this
                // worker, or a kubelet before a restart): its status stays as written, and a
                // sandbox of it still up (adopted after a restart) stops.
                self.stop_finished_sandbox().await;
            } else {
                let phase = self.sync().await;
                if phase.finished() {
                    self.stop_finished_sandbox().await;
                } else {
                    self.refresh_api_volumes().await;
                }
                self.write_status().await;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() {
                    self.teardown(0).await;
                    return Ok(());
                },
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// A finished pod keeps its status but gives back its address: its sandbox stops, once.
    async fn stop_finished_sandbox(&mut self) {
        if self.sandbox_stopped {
            return;
        }
        let Some(id) = self.sandbox.as_ref().map(|s| s.id.clone()) else {
            return;
        };
        match self.cri.stop_sandbox(&id).await {
            Ok(()) => self.sandbox_stopped = true,
            Err(e) => tracing::warn!(pod = %self.key, "{e:#}"),
        }
    }

    /// After a kubelet restart: the pod's ready sandbox and its newest containers.
    pub(super) async fn adopt(&mut self) -> Result<()> {
        let uid = self.uid();
        let Some(s) = self
            .cri
            .sandboxes()
            .await?
            .into_iter()
            .filter(|s| s.labels.get(POD_UID) == Some(&uid))
            .find(|s| s.state == cri::PodSandboxState::SandboxReady as i32)
        else {
            return Ok(());
        };
        let (status, _) = self.cri.sandbox_status(&s.id).await?;
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        let mut newest: HashMap<String, cri::Container> = HashMap::new();
        for c in self.cri.containers(&s.id).await? {
            let name = c.labels.get(CONTAINER_NAME).cloned().unwrap_or_default();
            let attempt = c.metadata.as_ref().map(|m| m.attempt).unwrap_or(0);
            if newest
                .get(&name)
                .is_none_or(|o| o.metadata.as_ref().map(|m| m.attempt).unwrap_or(0) < attempt)
            {
                newest.insert(name, c);
            }
        }
        for slot in self.init.iter_mut().chain(self.apps.iter_mut()) {
            if let Some(c) = newest.remove(&slot.spec.name) {
                slot.restarts = c.metadata.as_ref().map(|m| m.attempt as i32).unwrap_or(0);
                slot.id = Some(c.id);
                new_probers(slot);
            }
        }
        tracing::info!(pod = %self.key, sandbox = %s.id, "adopted the running sandbox");
        self.sandbox = Some(Sandbox {
            id: s.id,
            ip,
            config: self.sandbox_config()?,
        });
        Ok(())
    }

    /// One pass over the pod; returns its phase.
    pub(super) async fn sync(&mut self) -> Phase {
        if !self.ensure_sandbox().await {
            return Phase::Pending;
        }
        let policy = self.restart_policy();
        // Init containers, in order: each must succeed before the next starts.
        let init_policy = if policy == "Never" {
            "Never"
        } else {
            "OnFailure"
        };
        let mut init_done = true;
        for i in 0..self.init.len() {
            if self.init[i].done {
                continue;
            }
            let mut slot = std::mem::replace(&mut self.init[i], Slot::new(Container::default()));
            self.sync_container(&mut slot, init_policy).await;
            let failed = slot.done && slot.last.as_ref().is_some_and(|t| t.exit_code != 0);
            let finished = slot.done;
            self.init[i] = slot;
            if failed {
                return Phase::Failed;
            }
            if !finished {
                init_done = false;
                break;
            }
        }
        if !init_done {
            return Phase::Pending;
        }
        for i in 0..self.apps.len() {
            let mut slot = std::mem::replace(&mut self.apps[i], Slot::new(Container::default()));
            if !slot.done {
                self.sync_container(&mut slot, &policy).await;
            }
            self.apps[i] = slot;
        }
        if self.apps.iter().all(|s| s.done) {
            let ok = self
                .apps
                .iter()
                .all(|s| s.last.as_ref().is_some_and(|t| t.exit_code == 0));
            return if ok { Phase::Succeeded } else { Phase::Failed };
        }
        if self
            .apps
            .iter()
            .all(|s| s.id.is_some() || s.restarts > 0 || s.done)
        {
            Phase::Running
        } else {
            Phase::Pending
        }
    }

    /// Stops the containers (SIGTERM, then SIGKILL after `grace` seconds) and the sandbox,
    /// and removes them with the pod's directories.
    pub(super) async fn teardown(&mut self, grace: i64) {
        let mut stops = Vec::new();
        for slot in self.init.iter().chain(self.apps.iter()) {
            if let Some(id) = slot.id.clone() {
                self.event(
                    false,
                    "Killing",
                    format!("Stopping container {}", slot.spec.name),
                );
                let mut cri = self.cri.clone();
                stops.push(async move { cri.stop_container(&id, grace).await });
            }
        }
        for r in futures::future::join_all(stops).await {
            if let Err(e) = r {
                tracing::warn!(pod = %self.key, "{e:#}");
            }
        }
        for slot in self.init.iter_mut().chain(self.apps.iter_mut()) {
            slot.id = None;
            if !matches!(slot.state, State::Terminated(_)) {
                slot.state = State::Terminated(Terminated {
                    exit_code: 0,
                    reason: "Completed".into(),
                    message: String::new(),
                    started_at: String::new(),
                    finished_at: now(),
                    container_id: String::new(),
                });
            }
        }
        // A sandbox made by an earlier kubelet run (or one being adopted) goes too.
        let uid = self.uid();
        let mut ids: Vec<String> = self.sandbox.take().map(|s| s.id).into_iter().collect();
        if let Ok(all) = self.cri.sandboxes().await {
            ids.extend(
                all.into_iter()
                    .filter(|s| s.labels.get(POD_UID) == Some(&uid))
                    .map(|s| s.id),
            );
        }
        ids.sort();
        ids.dedup();
        for id in ids {
            if let Err(e) = self.cri.stop_sandbox(&id).await {
                tracing::warn!(pod = %self.key, "{e:#}");
            }
            if let Err(e) = self.cri.remove_sandbox(&id).await {
                tracing::warn!(pod = %self.key, "{e:#}");
            }
        }
        let _ = std::fs::remove_dir_all(self.pod_dir());
        tracing::info!(pod = %self.key, "pod stopped");
    }
}

/// Whether the API shows the pod Succeeded or Failed.
fn finished_in_api(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}
