//! The pods bound to this node. A watch on `spec.nodeName` feeds one worker per pod (as
//! kubelet's pod workers): the worker creates the sandbox (CNI through containerd), runs the
//! init containers in order and then the containers, restarts them by the restart policy with
//! back-off, runs the probes, writes the pod's status, and on deletion stops the containers
//! within the grace period, removes the sandbox and deletes the pod for good.
//!
//! Files: `worker` (one pod's loop), `sandbox`, `volumes`, `containers`, `env` (the
//! environment, from ConfigMaps, Secrets and the downward API), `status`, `dns` (resolv.conf,
//! hosts, hostname);
//! this file holds the dispatcher that gives each pod its worker, and the phase.

mod containers;
mod dns;
mod env;
mod registry;
mod sandbox;
mod status;
mod tokens;
mod volumes;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use kube::ResourceExt;
use tokio::sync::watch;

use crate::cri::Cri;

pub use dns::{DnsSettings, ResolvConf};
use worker::Worker;

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

/// A pod's phase, as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    /// Succeeded or Failed: nothing of the pod runs again.
    pub fn finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

pub struct Kubelet {
    pub client: kube::Client,
    pub cri: Cri,
    pub node_name: String,
    pub node_ip: String,
    /// Per-pod directories: logs and emptyDir volumes.
    pub pods_dir: PathBuf,
    /// Events about pods (`kubectl describe pod`).
    pub events: ferry_common::events::Recorder,
    /// The Services, for the containers' service variables.
    pub services: crate::services::Services,
    /// Cluster DNS and the node's resolver, for the pods' resolv.conf.
    pub dns: DnsSettings,
}

/// Watches the pods bound to this node and keeps one worker per pod; removes sandboxes that
/// belong to no pod (left by pods deleted while the kubelet was down).
pub async fn run(k: Arc<Kubelet>) -> Result<()> {
    k.services.ready(Duration::from_secs(10)).await;
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
