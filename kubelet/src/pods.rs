//! The pods bound to this node. A watch on `spec.nodeName` feeds one worker per pod (as
//! kubelet's pod workers): the worker creates the sandbox (CNI through containerd), runs the
//! init containers in order and then the containers, restarts them by the restart policy with
//! back-off, runs the probes, writes the pod's status, and on deletion stops the containers
//! within the grace period, removes the sandbox and deletes the pod for good.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::chrono::{DateTime, SecondsFormat, Utc};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::cri::{v1 as cri, Cri};
use crate::probe::Prober;

/// Labels the kubelet puts on sandboxes and containers, to find them again after a restart.
const POD_UID: &str = "io.kubernetes.pod.uid";
const POD_NAME: &str = "io.kubernetes.pod.name";
const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// How often a worker looks at its containers when nothing else happens.
const TICK: Duration = Duration::from_millis(500);
/// Kubernetes' container restart back-off: 10 s doubling to 5 min.
const BACKOFF_BASE: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long restarts without back-off.
const BACKOFF_RESET: Duration = Duration::from_secs(600);

pub struct Kubelet {
    pub client: kube::Client,
    pub cri: Cri,
    pub node_name: String,
    pub node_ip: String,
    /// Per-pod directories: logs and emptyDir volumes.
    pub pods_dir: PathBuf,
    /// Events about pods (`kubectl describe pod`).
    pub events: ferry_common::events::Recorder,
}

/// Watches the pods bound to this node and keeps one worker per pod; removes sandboxes that
/// belong to no pod (left by pods deleted while the kubelet was down).
pub async fn run(k: Arc<Kubelet>) -> Result<()> {
    let api: Api<Pod> = Api::all(k.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", k.node_name));
    let mut events = watcher(api, config).boxed();
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut listing: Option<HashMap<String, Pod>> = None;
    let mut synced = false;
    let mut housekeeping = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            ev = events.next() => {
                let Some(ev) = ev else { anyhow::bail!("the pod watch ended") };
                match ev {
                    Ok(watcher::Event::Init) => listing = Some(HashMap::new()),
                    Ok(watcher::Event::InitApply(p)) => {
                        if let Some(l) = listing.as_mut() {
                            l.insert(p.uid().unwrap_or_default(), p);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        let seen = listing.take().unwrap_or_default();
                        // Pods gone while the watch was down stop now.
                        workers.retain(|uid, tx| {
                            let keep = seen.contains_key(uid);
                            if !keep {
                                let _ = tx.send(None);
                            }
                            keep
                        });
                        for (_, p) in seen {
                            dispatch(&k, &mut workers, p);
                        }
                        synced = true;
                    }
                    Ok(watcher::Event::Apply(p)) => dispatch(&k, &mut workers, p),
                    Ok(watcher::Event::Delete(p)) => {
                        if let Some(tx) = workers.remove(&p.uid().unwrap_or_default()) {
                            let _ = tx.send(None);
                        }
                    }
                    Err(e) => tracing::warn!("pod watch: {e}"),
                }
            }
            _ = housekeeping.tick(), if synced => {
                workers.retain(|_, tx| !tx.is_closed());
                if let Err(e) = remove_orphans(&k, &workers).await {
                    tracing::warn!("removing orphaned sandboxes: {e:#}");
                }
            }
        }
    }
}

fn dispatch(k: &Arc<Kubelet>, workers: &mut HashMap<String, watch::Sender<Option<Pod>>>, p: Pod) {
    let uid = p.uid().unwrap_or_default();
    if let Some(tx) = workers.get(&uid) {
        if tx.send(Some(p.clone())).is_ok() {
            return;
        }
        // The worker finished (the pod was deleted for good): nothing to run.
        if p.metadata.deletion_timestamp.is_some() {
            return;
        }
    }
    let (tx, rx) = watch::channel(Some(p.clone()));
    workers.insert(uid, tx);
    let k = k.clone();
    tokio::spawn(async move {
        let key = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
        if let Err(e) = Worker::new(k, p).run(rx).await {
            tracing::error!(pod = %key, "pod worker: {e:#}");
        }
    });
}

async fn remove_orphans(
    k: &Kubelet,
    workers: &HashMap<String, watch::Sender<Option<Pod>>>,
) -> Result<()> {
    let mut cri = k.cri.clone();
    for s in cri.sandboxes().await? {
        // Only sandboxes a kubelet made (labelled with their pod): others are someone else's.
        let Some(uid) = s.labels.get(POD_UID) else {
            continue;
        };
        if !workers.contains_key(uid) {
            tracing::info!(sandbox = %s.id, uid = %uid, "removing a sandbox no pod owns");
            let _ = cri.stop_sandbox(&s.id).await;
            cri.remove_sandbox(&s.id).await?;
        }
    }
    Ok(())
}

/// What a container is doing now, as the pod status reports it.
#[derive(Clone, Debug, PartialEq)]
enum State {
    Waiting { reason: String, message: String },
    Running { started_at: String },
    Terminated(Terminated),
}

#[derive(Clone, Debug, PartialEq)]
struct Terminated {
    exit_code: i32,
    reason: String,
    message: String,
    started_at: String,
    finished_at: String,
    container_id: String,
}

/// One container of the pod (init or app) across its restarts.
struct Slot {
    spec: Container,
    id: Option<String>,
    restarts: i32,
    /// Consecutive crashes, for the back-off (reset after a long run).
    crashes: u32,
    state: State,
    last: Option<Terminated>,
    backoff_until: Option<Instant>,
    image_ref: String,
    /// Finished for good (an init container that succeeded, or an app container that will
    /// not restart).
    done: bool,
    liveness: Option<Prober>,
    readiness: Option<Prober>,
    running_since: Option<Instant>,
}

impl Slot {
    fn new(spec: Container) -> Slot {
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

    fn ready(&self) -> bool {
        matches!(self.state, State::Running { .. }) && self.readiness.as_ref().is_none_or(|r| r.ok)
    }

    fn wait(&mut self, reason: &str, message: String) {
        self.state = State::Waiting {
            reason: reason.into(),
            message,
        };
    }

    /// After a failure to start or a crash: wait before the next try.
    fn back_off(&mut self) {
        self.crashes += 1;
        let delay = if self.crashes <= 1 {
            Duration::ZERO
        } else {
            (BACKOFF_BASE * 2u32.saturating_pow(self.crashes - 2)).min(BACKOFF_MAX)
        };
        self.backoff_until = Some(Instant::now() + delay);
    }
}

struct Sandbox {
    id: String,
    ip: String,
    config: cri::PodSandboxConfig,
}

struct Worker {
    k: Arc<Kubelet>,
    cri: Cri,
    pod: Pod,
    key: String,
    sandbox: Option<Sandbox>,
    sandbox_error: Option<String>,
    sandbox_retry: Option<Instant>,
    /// A finished pod's sandbox is stopped once.
    sandbox_stopped: bool,
    init: Vec<Slot>,
    apps: Vec<Slot>,
    start_time: String,
    /// Each condition's status and when it last changed.
    conditions: BTreeMap<&'static str, (bool, String)>,
    written: Value,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn nanos_to_time(ns: i64) -> String {
    if ns <= 0 {
        return String::new();
    }
    DateTime::from_timestamp(ns / 1_000_000_000, (ns % 1_000_000_000) as u32)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

impl Worker {
    fn new(k: Arc<Kubelet>, pod: Pod) -> Worker {
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
        }
    }

    fn event(&self, warning: bool, reason: &str, message: String) {
        let pod = ferry_common::events::reference(&self.pod);
        if warning {
            self.k.events.warning(pod, reason, message);
        } else {
            self.k.events.normal(pod, reason, message);
        }
    }

    fn uid(&self) -> String {
        self.pod.uid().unwrap_or_default()
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn grace(&self) -> i64 {
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

    fn pod_dir(&self) -> PathBuf {
        self.k.pods_dir.join(format!(
            "{}_{}_{}",
            self.pod.namespace().unwrap_or_default(),
            self.pod.name_any(),
            self.uid()
        ))
    }

    async fn run(mut self, mut rx: watch::Receiver<Option<Pod>>) -> Result<()> {
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
            let phase = self.sync().await;
            if matches!(phase, "Succeeded" | "Failed") && !self.sandbox_stopped {
                if let Some(s) = self.sandbox.as_ref() {
                    // A finished pod keeps its status but gives back its address.
                    let id = s.id.clone();
                    match self.cri.stop_sandbox(&id).await {
                        Ok(()) => self.sandbox_stopped = true,
                        Err(e) => tracing::warn!(pod = %self.key, "{e:#}"),
                    }
                }
            }
            self.write_status().await;
            tokio::select! {
                r = rx.changed() => if r.is_err() {
                    self.teardown(0).await;
                    return Ok(());
                },
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// After a kubelet restart: the pod's ready sandbox and its newest containers.
    async fn adopt(&mut self) -> Result<()> {
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

    fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    fn sandbox_config(&self) -> Result<cri::PodSandboxConfig> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let mut port_mappings = Vec::new();
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            for p in c.ports.iter().flatten() {
                if let Some(hp) = p.host_port.filter(|hp| *hp > 0) {
                    port_mappings.push(cri::PortMapping {
                        protocol: match p.protocol.as_deref() {
                            Some("UDP") => cri::Protocol::Udp as i32,
                            Some("SCTP") => cri::Protocol::Sctp as i32,
                            _ => cri::Protocol::Tcp as i32,
                        },
                        container_port: p.container_port,
                        host_port: hp,
                        host_ip: p.host_ip.clone().unwrap_or_default(),
                    });
                }
            }
        }
        let labels: HashMap<String, String> = [
            (POD_UID, self.uid()),
            (POD_NAME, self.pod.name_any()),
            (POD_NAMESPACE, self.pod.namespace().unwrap_or_default()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let hostname = spec.hostname.clone().unwrap_or_else(|| self.pod.name_any());
        let network = if self.host_network() {
            cri::NamespaceMode::Node
        } else {
            cri::NamespaceMode::Pod
        };
        Ok(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.pod.name_any(),
                uid: self.uid(),
                namespace: self.pod.namespace().unwrap_or_default(),
                attempt: 0,
            }),
            hostname: hostname.chars().take(63).collect(),
            log_directory: self.pod_dir().join("logs").display().to_string(),
            port_mappings,
            labels,
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: network as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// emptyDir and hostPath volumes as host directories; other kinds are refused by name.
    fn volumes(&self) -> Result<HashMap<String, PathBuf>, String> {
        let mut out = HashMap::new();
        for v in self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
        {
            let path = if v.empty_dir.is_some() {
                self.pod_dir().join("volumes").join(&v.name)
            } else if let Some(h) = &v.host_path {
                PathBuf::from(&h.path)
            } else {
                return Err(format!(
                    "volume {:?}: only emptyDir and hostPath volumes are supported by ferry-kubelet",
                    v.name
                ));
            };
            out.insert(v.name.clone(), path);
        }
        Ok(out)
    }

    async fn ensure_sandbox(&mut self) -> bool {
        if self.sandbox.is_some() {
            return true;
        }
        if self.sandbox_retry.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        let result = async {
            let volumes = self.volumes().map_err(anyhow::Error::msg)?;
            for (name, path) in &volumes {
                if path.starts_with(self.pod_dir()) {
                    std::fs::create_dir_all(path)
                        .with_context(|| format!("creating volume {name} at {}", path.display()))?;
                }
            }
            let config = self.sandbox_config()?;
            std::fs::create_dir_all(&config.log_directory)
                .with_context(|| format!("creating {}", config.log_directory))?;
            let id = self.cri.run_sandbox(config.clone()).await?;
            let (status, _) = self.cri.sandbox_status(&id).await?;
            let ip = if self.host_network() {
                self.k.node_ip.clone()
            } else {
                status.network.map(|n| n.ip).unwrap_or_default()
            };
            anyhow::Ok(Sandbox { id, ip, config })
        }
        .await;
        match result {
            Ok(s) => {
                tracing::info!(pod = %self.key, sandbox = %s.id, ip = %s.ip, "sandbox running");
                self.sandbox = Some(s);
                self.sandbox_error = None;
                true
            }
            Err(e) => {
                tracing::warn!(pod = %self.key, "creating the pod sandbox: {e:#}");
                self.event(
                    true,
                    "FailedCreatePodSandBox",
                    format!("Failed to create pod sandbox: {e:#}"),
                );
                self.sandbox_error = Some(format!("{e:#}"));
                self.sandbox_retry = Some(Instant::now() + Duration::from_secs(2));
                false
            }
        }
    }

    /// One pass over the pod; returns its phase.
    async fn sync(&mut self) -> &'static str {
        if !self.ensure_sandbox().await {
            return "Pending";
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
                return "Failed";
            }
            if !finished {
                init_done = false;
                break;
            }
        }
        if !init_done {
            return "Pending";
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
            return if ok { "Succeeded" } else { "Failed" };
        }
        if self
            .apps
            .iter()
            .all(|s| s.id.is_some() || s.restarts > 0 || s.done)
        {
            "Running"
        } else {
            "Pending"
        }
    }

    /// Env values: literals and the downward API fields a pod commonly reads.
    fn env(&self, c: &Container) -> Result<Vec<cri::KeyValue>, String> {
        let ip = self
            .sandbox
            .as_ref()
            .map(|s| s.ip.clone())
            .unwrap_or_default();
        let mut out = Vec::new();
        for e in c.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                v.clone()
            } else if let Some(f) = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
                match f.field_path.as_str() {
                    "metadata.name" => self.pod.name_any(),
                    "metadata.namespace" => self.pod.namespace().unwrap_or_default(),
                    "metadata.uid" => self.uid(),
                    "spec.nodeName" => self.k.node_name.clone(),
                    "spec.serviceAccountName" => self
                        .pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_default(),
                    "status.podIP" => ip.clone(),
                    "status.hostIP" => self.k.node_ip.clone(),
                    other => {
                        return Err(format!(
                            "env {:?}: fieldRef {other:?} is not supported by ferry-kubelet",
                            e.name
                        ))
                    }
                }
            } else if e.value_from.is_some() {
                return Err(format!(
                    "env {:?}: only value and valueFrom.fieldRef are supported by ferry-kubelet",
                    e.name
                ));
            } else {
                String::new()
            };
            out.push(cri::KeyValue {
                key: e.name.clone(),
                value,
            });
        }
        Ok(out)
    }

    fn container_config(&self, slot: &Slot) -> Result<cri::ContainerConfig, String> {
        let c = &slot.spec;
        let volumes = self.volumes()?;
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let host = volumes.get(&m.name).ok_or_else(|| {
                format!(
                    "volumeMount {:?}: the pod has no volume of that name",
                    m.name
                )
            })?;
            mounts.push(cri::Mount {
                container_path: m.mount_path.clone(),
                host_path: host.display().to_string(),
                readonly: m.read_only.unwrap_or(false),
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
            command: c.command.clone().unwrap_or_default(),
            args: c.args.clone().unwrap_or_default(),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            envs: self.env(c)?,
            mounts,
            labels,
            log_path: format!("{}/{}.log", c.name, slot.restarts),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(crate::resources::linux_resources(c)?),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Makes sure the image is on the node; false (and the slot waiting) when it is not.
    async fn ensure_image(&mut self, slot: &mut Slot) -> bool {
        let image = slot.spec.image.clone().unwrap_or_default();
        if image.is_empty() {
            slot.wait("InvalidImageName", "the container names no image".into());
            return false;
        }
        match self.cri.has_image(&image).await {
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
        match self.cri.pull_image(&image).await {
            Ok(_) => true,
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

    async fn sync_container(&mut self, slot: &mut Slot, policy: &str) {
        let Some(id) = slot.id.clone() else {
            if slot.backoff_until.is_some_and(|t| Instant::now() < t) {
                if let State::Waiting { reason, .. } = &slot.state {
                    if reason == "ErrImagePull" {
                        let image = slot.spec.image.clone().unwrap_or_default();
                        slot.wait(
                            "ImagePullBackOff",
                            format!("Back-off pulling image {image:?}"),
                        );
                    }
                }
                return;
            }
            if !self.ensure_image(slot).await {
                return;
            }
            let config = match self.container_config(slot) {
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

    /// Stops the containers (SIGTERM, then SIGKILL after `grace` seconds) and the sandbox,
    /// and removes them with the pod's directories.
    async fn teardown(&mut self, grace: i64) {
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

    fn condition(&mut self, kind: &'static str, ok: bool) -> Value {
        let entry = self.conditions.entry(kind).or_insert((ok, now()));
        if entry.0 != ok {
            *entry = (ok, now());
        }
        json!({"type": kind, "status": if ok { "True" } else { "False" },
               "lastTransitionTime": entry.1, "lastProbeTime": null})
    }

    fn status(&mut self, phase: &str) -> Value {
        let ip = self
            .sandbox
            .as_ref()
            .map(|s| s.ip.clone())
            .unwrap_or_default();
        let init_done = self.init.iter().all(|s| s.done);
        let ready = init_done && !self.apps.is_empty() && self.apps.iter().all(Slot::ready);
        let running = matches!(phase, "Running");
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
            "phase": phase,
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

    async fn write_status(&mut self) {
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
    fn phase_now(&self) -> &'static str {
        if self
            .init
            .iter()
            .any(|s| s.done && s.last.as_ref().is_some_and(|t| t.exit_code != 0))
        {
            return "Failed";
        }
        if !self.apps.is_empty() && self.apps.iter().all(|s| s.done) {
            let ok = self
                .apps
                .iter()
                .all(|s| s.last.as_ref().is_some_and(|t| t.exit_code == 0));
            return if ok { "Succeeded" } else { "Failed" };
        }
        if self.sandbox.is_some()
            && self.init.iter().all(|s| s.done)
            && self.apps.iter().all(|s| s.id.is_some() || s.restarts > 0)
        {
            return "Running";
        }
        "Pending"
    }
}

fn new_probers(slot: &mut Slot) {
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

fn terminated_json(t: &Terminated) -> Value {
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

fn container_status(s: &Slot) -> Value {
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
