//! A pod's containers: each one's slot (state, restarts, back-off, probes), its image, its
//! CRI configuration (environment, mounts) and the step that starts, watches and restarts it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::Container;
use kube::ResourceExt;

use crate::cri::v1 as cri;
use crate::probe::Prober;

use super::env::{expand, Objects};
use super::status::{nanos_to_time, now};
use super::{
    Worker, BACKOFF_BASE, BACKOFF_MAX, BACKOFF_RESET, CONTAINER_NAME, POD_NAME, POD_NAMESPACE,
    POD_UID,
};

/// What a container is doing now, as the pod status reports it.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum State {
    Waiting { reason: String, message: String },
    Running { started_at: String },
    Terminated(Terminated),
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Terminated {
    pub(super) exit_code: i32,
    pub(super) reason: String,
    pub(super) message: String,
    pub(super) started_at: String,
    pub(super) finished_at: String,
    pub(super) container_id: String,
}

/// One container of the pod (init or app) across its restarts.
pub(super) struct Slot {
    pub(super) spec: Container,
    pub(super) id: Option<String>,
    pub(super) restarts: i32,
    /// Consecutive crashes, for the back-off (reset after a long run).
    pub(super) crashes: u32,
    pub(super) state: State,
    pub(super) last: Option<Terminated>,
    pub(super) backoff_until: Option<Instant>,
    pub(super) image_ref: String,
    /// Finished for good (an init container that succeeded, or an app container that will
    /// not restart).
    pub(super) done: bool,
    pub(super) liveness: Option<Prober>,
    pub(super) readiness: Option<Prober>,
    pub(super) running_since: Option<Instant>,
}

impl Slot {
    pub(super) fn new(spec: Container) -> Slot {
        Slot {
            spec,
            id: None,
            restarts: 0,
            crashes: 0,
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last: None,
            backoff_until: None,
            image_ref: String::new(),
            done: false,
            liveness: None,
            readiness: None,
            running_since: None,
        }
    }

    pub(super) fn ready(&self) -> bool {
        matches!(self.state, State::Running { .. }) && self.readiness.as_ref().is_none_or(|r| r.ok)
    }

    pub(super) fn wait(&mut self, reason: &str, message: String) {
        self.state = State::Waiting {
            reason: reason.into(),
            message,
        };
    }

    /// After a failure to start or a crash: wait before the next try.
    pub(super) fn back_off(&mut self) {
        self.crashes += 1;
        let delay = if self.crashes <= 1 {
            Duration::ZERO
        } else {
            (BACKOFF_BASE * 2u32.saturating_pow(self.crashes - 2)).min(BACKOFF_MAX)
        };
        self.backoff_until = Some(Instant::now() + delay);
    }
}

impl Worker {
    pub(super) fn container_config(
        &self,
        slot: &Slot,
        objects: &Objects,
    ) -> Result<cri::ContainerConfig, String> {
        let c = &slot.spec;
        let envs = self.env(c, objects)?;
        // `$(NAME)` in the command and args expands to the container's variables.
        let vars: HashMap<&str, &str> = envs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect();
        let expanded = |v: &Option<Vec<String>>| -> Vec<String> {
            v.iter()
                .flatten()
                .map(|s| expand(s, |n| vars.get(n).map(|v| v.to_string())))
                .collect()
        };
        let volumes = self.volumes()?;
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let mut host = volumes
                .get(&m.name)
                .ok_or_else(|| {
                    format!(
                        "volumeMount {:?}: the pod has no volume of that name",
                        m.name
                    )
                })?
                .clone();
            if let Some(sub) = m.sub_path.as_deref().filter(|p| !p.is_empty()) {
                if sub.starts_with('/') || sub.split('/').any(|c| c == "..") {
                    return Err(format!(
                        "volumeMount {:?}: subPath {sub:?} must be relative and must not contain '..'",
                        m.name
                    ));
                }
                let base = host.clone();
                host = host.join(sub);
                // A subPath of a writable directory volume is made if missing, as kubelet does.
                if !self.api_volume(&m.name) && !host.exists() && host.starts_with(self.pod_dir()) {
                    std::fs::create_dir_all(&host)
                        .map_err(|e| format!("volumeMount {:?}: subPath {sub:?}: {e}", m.name))?;
                }
                // A container may have put a symlink in a volume it writes: the subPath must
                // still lead inside the volume once links are followed (CVE-2017-1002101), and
                // the resolved path is what gets mounted.
                let outside = || {
                    format!(
                        "volumeMount {:?}: subPath {sub:?} leads outside its volume",
                        m.name
                    )
                };
                let real_base = std::fs::canonicalize(&base)
                    .map_err(|e| format!("volumeMount {:?}: {}: {e}", m.name, base.display()))?;
                let real = std::fs::canonicalize(&host)
                    .map_err(|e| format!("volumeMount {:?}: subPath {sub:?}: {e}", m.name))?;
                if !real.starts_with(&real_base) {
                    return Err(outside());
                }
                host = real;
            }
            mounts.push(cri::Mount {
                container_path: m.mount_path.clone(),
                host_path: host.display().to_string(),
                // ConfigMap and Secret volumes are always read-only, as in Kubernetes.
                readonly: m.read_only.unwrap_or(false) || self.api_volume(&m.name),
                ..Default::default()
            });
        }
        // The managed hosts file, unless the container mounts its own.
        if !mounts.iter().any(|m| m.container_path == "/etc/hosts") {
            mounts.push(cri::Mount {
                container_path: "/etc/hosts".into(),
                host_path: self.hosts_path().display().to_string(),
                ..Default::default()
            });
        }
        let labels: HashMap<String, String> = [
            (CONTAINER_NAME.to_string(), c.name.clone()),
            (POD_UID.to_string(), self.uid()),
            (POD_NAME.to_string(), self.pod.name_any()),
            (
                POD_NAMESPACE.to_string(),
                self.pod.namespace().unwrap_or_default(),
            ),
        ]
        .into();
        Ok(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: c.name.clone(),
                attempt: slot.restarts as u32,
            }),
            image: Some(crate::cri::image_spec(
                c.image.as_deref().unwrap_or_default(),
            )),
            command: expanded(&c.command),
            args: expanded(&c.args),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            envs,
            mounts,
            labels,
            log_path: format!("{}/{}.log", c.name, slot.restarts),
            // What `kubectl attach` (and `run -it`) reach: stdin kept open, a TTY.
            stdin: c.stdin.unwrap_or(false),
            stdin_once: c.stdin_once.unwrap_or(false),
            tty: c.tty.unwrap_or(false),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(crate::resources::linux_resources(c)?),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Makes sure the image is on the node; false (and the slot waiting) when it is not. With
    /// `imagePullPolicy: Always` it is pulled at each container start even when present, so the
    /// registry checks this pod's credentials (an image another pod pulled is not a pass).
    pub(super) async fn ensure_image(&mut self, slot: &mut Slot) -> bool {
        let image = slot.spec.image.clone().unwrap_or_default();
        if image.is_empty() {
            slot.wait("InvalidImageName", "the container names no image".into());
            return false;
        }
        let always = slot.spec.image_pull_policy.as_deref() == Some("Always");
        match self.cri.has_image(&image).await {
            Ok(true) if always => {}
            Ok(true) => {
                if slot.restarts == 0 && slot.crashes == 0 {
                    self.event(
                        false,
                        "Pulled",
                        format!("Container image \"{image}\" already present on machine"),
                    );
                }
                return true;
            }
            Ok(false) => {}
            Err(e) => {
                slot.wait("ErrImagePull", format!("{e:#}"));
                slot.back_off();
                return false;
            }
        }
        if slot.spec.image_pull_policy.as_deref() == Some("Never") {
            slot.wait(
                "ErrImageNeverPull",
                format!("Container image {image:?} is not present with pull policy of Never"),
            );
            return false;
        }
        let pulled = match self.pull_credentials(&image).await {
            Ok(creds) if creds.is_empty() => self.cri.pull_image(&image, None).await,
            Ok(creds) => {
                // Each matching credential in turn, as the kubelet's keyring does; the last
                // refusal is the one reported.
                let mut last = Err(anyhow::anyhow!("no credentials"));
                for auth in creds {
                    last = self.cri.pull_image(&image, Some(auth)).await;
                    if last.is_ok() {
                        break;
                    }
                }
                last
            }
            Err(msg) => Err(anyhow::anyhow!(msg)),
        };
        match pulled {
            Ok(_) => {
                self.event(
                    false,
                    "Pulled",
                    format!("Successfully pulled image \"{image}\""),
                );
                true
            }
            Err(e) => {
                let reason = if slot.crashes > 0 {
                    "ImagePullBackOff"
                } else {
                    "ErrImagePull"
                };
                tracing::warn!(pod = %self.key, container = %slot.spec.name, "pulling {image}: {e:#}");
                self.event(
                    true,
                    "Failed",
                    format!("Failed to pull image \"{image}\": {e:#}"),
                );
                slot.wait(reason, format!("failed to pull image {image:?}: {e:#}"));
                slot.back_off();
                false
            }
        }
    }

    pub(super) async fn sync_container(&mut self, slot: &mut Slot, policy: &str) {
        let Some(id) = slot.id.clone() else {
            if slot.backoff_until.is_some_and(|t| Instant::now() < t) {
                if let State::Waiting { reason, message } = &slot.state {
                    if reason == "ErrImagePull" {
                        // As the kubelet says it: the back-off, and why the pull failed.
                        let image = slot.spec.image.clone().unwrap_or_default();
                        let message =
                            format!("Back-off pulling image {image:?}: ErrImagePull: {message}");
                        slot.wait("ImagePullBackOff", message);
                    }
                }
                return;
            }
            if !self.ensure_image(slot).await {
                return;
            }
            if let Err(msg) = self.sync_api_volumes().await {
                self.event(true, "FailedMount", msg.clone());
                slot.wait("ContainerCreating", msg);
                return;
            }
            let config = match self.env_objects(&slot.spec).await {
                Ok(objects) => self.container_config(slot, &objects),
                Err(e) => Err(e),
            };
            let config = match config {
                Ok(c) => c,
                Err(msg) => {
                    slot.wait("CreateContainerConfigError", msg);
                    return;
                }
            };
            let sandbox = self.sandbox.as_ref().expect("sandbox exists");
            let (sid, sconfig) = (sandbox.id.clone(), sandbox.config.clone());
            match self.cri.start_container(&sid, &sconfig, config).await {
                Ok(id) => {
                    tracing::info!(pod = %self.key, container = %slot.spec.name, id = %id, "container started");
                    self.event(
                        false,
                        "Created",
                        format!("Created container {}", slot.spec.name),
                    );
                    self.event(
                        false,
                        "Started",
                        format!("Started container {}", slot.spec.name),
                    );
                    slot.id = Some(id);
                    slot.state = State::Running { started_at: now() };
                    slot.running_since = Some(Instant::now());
                    new_probers(slot);
                }
                Err(e) => {
                    self.event(true, "Failed", format!("Error: {e:#}"));
                    slot.wait("RunContainerError", format!("{e:#}"));
                    slot.back_off();
                }
            }
            return;
        };
        let status = match self.cri.container_status(&id).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pod = %self.key, container = %slot.spec.name, "{e:#}");
                slot.id = None;
                return;
            }
        };
        slot.image_ref = status.image_ref.clone();
        if status.state == cri::ContainerState::ContainerRunning as i32 {
            slot.state = State::Running {
                started_at: nanos_to_time(status.started_at),
            };
            slot.running_since.get_or_insert_with(Instant::now);
            let ip = self
                .sandbox
                .as_ref()
                .map(|s| s.ip.clone())
                .unwrap_or_default();
            if let Some(r) = slot.readiness.as_mut() {
                if r.tick(&mut self.cri, &id, &ip, &slot.spec).await {
                    tracing::info!(pod = %self.key, container = %slot.spec.name, ready = r.ok, "readiness changed: {}", r.message);
                }
                if r.failed_now {
                    let msg = format!("Readiness probe failed: {}", r.message);
                    self.event(true, "Unhealthy", msg);
                }
            }
            if let Some(l) = slot.liveness.as_mut() {
                l.tick(&mut self.cri, &id, &ip, &slot.spec).await;
                let (failed_now, ok, message) = (l.failed_now, l.ok, l.message.clone());
                if failed_now {
                    self.event(
                        true,
                        "Unhealthy",
                        format!("Liveness probe failed: {message}"),
                    );
                }
                if !ok {
                    self.event(
                        false,
                        "Killing",
                        format!(
                            "Container {} failed liveness probe, will be restarted",
                            slot.spec.name
                        ),
                    );
                    tracing::info!(pod = %self.key, container = %slot.spec.name,
                        "liveness probe failed ({message}); restarting the container");
                    let grace = self
                        .pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.termination_grace_period_seconds)
                        .unwrap_or(30);
                    if let Err(e) = self.cri.stop_container(&id, grace).await {
                        tracing::warn!("{e:#}");
                    }
                }
            }
            return;
        }
        if status.state == cri::ContainerState::ContainerExited as i32
            || status.state == cri::ContainerState::ContainerUnknown as i32
        {
            let t = Terminated {
                exit_code: status.exit_code,
                reason: if status.reason.is_empty() {
                    if status.exit_code == 0 {
                        "Completed"
                    } else {
                        "Error"
                    }
                    .into()
                } else {
                    status.reason.clone()
                },
                message: status.message.clone(),
                started_at: nanos_to_time(status.started_at),
                finished_at: nanos_to_time(status.finished_at),
                container_id: format!("containerd://{id}"),
            };
            tracing::info!(pod = %self.key, container = %slot.spec.name, exit_code = t.exit_code, "container exited");
            let ran = slot
                .running_since
                .take()
                .map(|s| s.elapsed())
                .unwrap_or_default();
            if let Err(e) = self.cri.remove_container(&id).await {
                tracing::warn!("{e:#}");
            }
            slot.id = None;
            slot.liveness = None;
            slot.readiness = None;
            slot.last = Some(t.clone());
            let restart = match policy {
                "Always" => true,
                "OnFailure" => t.exit_code != 0,
                _ => false,
            };
            if restart {
                if ran >= BACKOFF_RESET {
                    slot.crashes = 0;
                }
                slot.restarts += 1;
                slot.back_off();
                let name = slot.spec.name.clone();
                if slot.crashes > 1 {
                    self.event(
                        true,
                        "BackOff",
                        format!(
                            "Back-off restarting failed container {name} in pod {}",
                            self.pod.name_any()
                        ),
                    );
                }
                slot.wait(
                    "CrashLoopBackOff",
                    format!("back-off restarting failed container {name}"),
                );
            } else {
                slot.done = true;
                slot.state = State::Terminated(t);
            }
        }
    }
}

pub(super) fn new_probers(slot: &mut Slot) {
    slot.liveness = slot
        .spec
        .liveness_probe
        .clone()
        .map(|p| Prober::new(p, true));
    slot.readiness = slot
        .spec
        .readiness_probe
        .clone()
        .map(|p| Prober::new(p, false));
}
