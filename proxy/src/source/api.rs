//! Where Services and EndpointSlices come from. The daemon sees them only through
//! `ServiceSource`: a YAML file (`FileSource`) or the Kubernetes API (`ApiSource`).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::model::{parse_yaml_incremental, Snapshot, Strictness};
use crate::view::Change;

/// What a source hands the daemon.
pub enum Update {
    /// A complete view: a file was read, or the API was (re)listed.
    Snapshot(Snapshot),
    /// Objects that changed since the last update (from a watch), and every node when any
    /// node changed.
    Changes {
        changes: Vec<Change>,
        nodes: Option<Vec<k8s_openapi::api::core::v1::Node>>,
    },
}

impl Update {
    /// The cluster's nodes, when this update says what they are.
    pub fn nodes(&self) -> Option<&[k8s_openapi::api::core::v1::Node]> {
        match self {
            Update::Snapshot(s) => Some(&s.nodes),
            Update::Changes { nodes, .. } => nodes.as_deref(),
        }
    }
}

pub trait ServiceSource: Send {
    /// Waits for the next update. An `Err` is bad input: the daemon reports it and keeps
    /// its last good state. Must be cancel-safe (it is polled in a `select!`).
    fn next(&mut self) -> impl Future<Output = Result<Update>> + Send;
    /// How strictly the view is checked (see `Strictness`).
    fn strictness(&self) -> Strictness;
}

/// Multi-document Kubernetes YAML in a file, re-read whenever it changes. Changes are noticed
/// at once through inotify on the file's directory, and by polling the file's metadata as a
/// fallback; the content is read only when the metadata changed, and parsed only when the
/// content differs.
pub struct FileSource {
    path: PathBuf,
    stamp: Option<Stamp>,
    last: Option<Result<Vec<u8>, String>>,
    poll: Duration,
    changed: Arc<tokio::sync::Notify>,
    _watcher: Option<notify::RecommendedWatcher>,
    /// Parsed documents of the last read, by the hash of their text.
    parsed: std::collections::HashMap<u64, Snapshot>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        let changed = Arc::new(tokio::sync::Notify::new());
        let watcher = Self::watch(&path, changed.clone())
            .map_err(
                |e| tracing::warn!(path = %path.display(), "no inotify watch, polling only: {e}"),
            )
            .ok();
        Self {
            path,
            stamp: None,
            last: None,
            poll: Duration::from_millis(500),
            changed,
            _watcher: watcher,
            parsed: Default::default(),
        }
    }

    /// Watches the directory (editors and `mv` replace the file, which a watch on the file
    /// itself would lose).
    fn watch(
        path: &std::path::Path,
        changed: Arc<tokio::sync::Notify>,
    ) -> notify::Result<notify::RecommendedWatcher> {
        use notify::Watcher;
        let name = path.file_name().map(|n| n.to_os_string());
        let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
                {
                    changed.notify_one();
                }
            }
        })?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        w.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    }

    async fn stamp(&self) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = tokio::fs::metadata(&self.path).await.ok()?;
        Some(Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        })
    }
}

impl ServiceSource for FileSource {
    async fn next(&mut self) -> Result<Update> {
        loop {
            let stamp = self.stamp().await;
            if self.last.is_none() || stamp != self.stamp || stamp.is_none() {
                let content = tokio::fs::read(&self.path).await.map_err(|e| e.to_string());
                // No await from here on: state changes only once the content is in hand, so a
                // cancelled call (by `select!`) loses nothing.
                self.stamp = stamp;
                // A missing or unreadable file is reported once per change, like bad content.
                if self.last.as_ref() != Some(&content) {
                    self.last = Some(content.clone());
                    let content =
                        content.map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
                    let text = String::from_utf8(content)
                        .with_context(|| format!("{}: not UTF-8", self.path.display()))?;
                    return parse_yaml_incremental(&text, &mut self.parsed)
                        .map(Update::Snapshot)
                        .with_context(|| format!("{}", self.path.display()));
                }
            }
            // Whichever comes first: an inotify event or the poll period.
            let _ = tokio::time::timeout(self.poll, self.changed.notified()).await;
        }
    }

    fn strictness(&self) -> Strictness {
        Strictness::File
    }
}

/// Services and EndpointSlices listed and watched from a Kubernetes API server (Ferry's own or
/// any conformant cluster), through kube-rs' watcher: it resumes a dropped watch from the last
/// resourceVersion and relists when the server answers 410 Gone. The first update is the
/// complete view once both lists are in; after that each update names the objects that
/// changed (every change waiting is taken at once), and a relist hands out the complete view
/// again.
pub struct ApiSource {
    services: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Service>,
    slices: kube::runtime::reflector::Store<k8s_openapi::api::discovery::v1::EndpointSlice>,
    nodes: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Node>,
    changed: tokio::sync::mpsc::UnboundedReceiver<Dirty>,
    listed: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a watch event says changed.
enum Dirty {
    Service(crate::view::Key),
    Slice(crate::view::Key),
    Node,
    /// A (re)list finished: the store holds a complete new view.
    Listed,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> crate::view::Key {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

impl ApiSource {
    pub async fn connect(kubeconfig: &std::path::Path) -> Result<Self> {
        use kube::runtime::reflector;
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading the kubeconfig {}", kubeconfig.display()))?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| {
                    format!("the kubeconfig {} is not usable", kubeconfig.display())
                })?;
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).context("building the API client")?;
        let (tx, changed) = tokio::sync::mpsc::unbounded_channel();
        let (services, svc_writer) = reflector::store();
        let (slices, slice_writer) = reflector::store();
        let (nodes, node_writer) = reflector::store();
        let tasks = vec![
            tokio::spawn(follow(
                "nodes",
                kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()),
                node_writer,
                tx.clone(),
                |_| Dirty::Node,
            )),
            tokio::spawn(follow(
                "services",
                kube::Api::<k8s_openapi::api::core::v1::Service>::all(client.clone()),
                svc_writer,
                tx.clone(),
                |m| Dirty::Service(key_of(m)),
            )),
            tokio::spawn(follow(
                "endpointslices",
                kube::Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::all(client),
                slice_writer,
                tx,
                |m| Dirty::Slice(key_of(m)),
            )),
        ];
        tracing::info!(%server, "watching Services, EndpointSlices and Nodes");
        Ok(Self {
            services,
            slices,
            nodes,
            changed,
            listed: false,
            tasks,
        })
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self
                .services
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
            slices: self.slices.state().iter().map(|s| (**s).clone()).collect(),
            nodes: self.node_list(),
        }
    }

    fn node_list(&self) -> Vec<k8s_openapi::api::core::v1::Node> {
        self.nodes.state().iter().map(|n| (**n).clone()).collect()
    }
}

/// Feeds a store from a watch and reports each change's object (after the store has it).
async fn follow<K>(
    what: &'static str,
    api: kube::Api<K>,
    writer: kube::runtime::reflector::store::Writer<K>,
    tx: tokio::sync::mpsc::UnboundedSender<Dirty>,
    key: fn(&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Dirty,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use futures::StreamExt;
    use kube::runtime::watcher::{watcher, Config, Event};
    use kube::runtime::WatchStreamExt;
    watcher(api, Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(move |ev| {
            match ev {
                Ok(Event::Apply(o)) | Ok(Event::Delete(o)) => {
                    let _ = tx.send(key(o.meta()));
                }
                Ok(Event::InitDone) => {
                    let _ = tx.send(Dirty::Listed);
                }
                Ok(Event::Init) | Ok(Event::InitApply(_)) => {}
                // The watcher retries with back-off; a 410 makes it relist.
                Err(e) => tracing::warn!("watching {what}: {e}; retrying"),
            }
            std::future::ready(())
        })
        .await;
}

impl Drop for ApiSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ServiceSource for ApiSource {
    async fn next(&mut self) -> Result<Update> {
        // Every wait is cancel-safe: readiness is a state, and a received message is
        // handled before the next await.
        self.services
            .wait_until_ready()
            .await
            .context("the Service watcher stopped")?;
        self.slices
            .wait_until_ready()
            .await
            .context("the EndpointSlice watcher stopped")?;
        self.nodes
            .wait_until_ready()
            .await
            .context("the Node watcher stopped")?;
        if !self.listed {
            self.listed = true;
            // The messages so far are all part of this first view.
            while self.changed.try_recv().is_ok() {}
            return Ok(Update::Snapshot(self.snapshot()));
        }
        let first = self
            .changed
            .recv()
            .await
            .context("the API watchers stopped")?;
        let mut dirty = vec![first];
        while let Ok(d) = self.changed.try_recv() {
            dirty.push(d);
        }
        if dirty.iter().any(|d| matches!(d, Dirty::Listed)) {
            return Ok(Update::Snapshot(self.snapshot()));
        }
        let mut seen = std::collections::HashSet::new();
        let mut changes = Vec::new();
        let mut nodes = None;
        for d in dirty {
            match d {
                Dirty::Service(k) if seen.insert((0, k.clone())) => {
                    let r = kube::runtime::reflector::ObjectRef::new(&k.1).within(&k.0);
                    changes.push(Change::Service(
                        k,
                        self.services.get(&r).map(|s| Box::new((*s).clone())),
                    ));
                }
                Dirty::Slice(k) if seen.insert((1, k.clone())) => {
                    let r = kube::runtime::reflector::ObjectRef::new(&k.1).within(&k.0);
                    changes.push(Change::Slice(
                        k,
                        self.slices.get(&r).map(|s| Box::new((*s).clone())),
                    ));
                }
                Dirty::Node if nodes.is_none() => nodes = Some(self.node_list()),
                _ => {}
            }
        }
        Ok(Update::Changes { changes, nodes })
    }

    fn strictness(&self) -> Strictness {
        Strictness::Live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `next` is polled in a `select!` that often cancels it; a change must never be lost.
    #[tokio::test]
    async fn changes_survive_cancellation() {
        let dir = std::env::temp_dir().join(format!("ferry-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.yaml");
        let svc = |name: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n")
        };
        std::fs::write(&path, svc("a")).unwrap();
        let mut src = FileSource::new(path.clone());
        let Update::Snapshot(first) = src.next().await.unwrap() else {
            panic!("a file gives snapshots")
        };
        assert_eq!(first.services[0].metadata.name.as_deref(), Some("a"));
        let tmp = dir.join("tmp");
        std::fs::write(&tmp, svc("b")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        // Cancel many calls at every point they can be cancelled.
        for _ in 0..50 {
            let _ = tokio::time::timeout(Duration::from_micros(1), src.next()).await;
        }
        let snap = tokio::time::timeout(Duration::from_secs(1), src.next()).await;
        let names: Vec<_> = match snap {
            Ok(Ok(Update::Snapshot(s))) => s
                .services
                .into_iter()
                .filter_map(|s| s.metadata.name)
                .collect(),
            Ok(Ok(Update::Changes { .. })) => panic!("a file gives snapshots"),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => Vec::new(),
        };
        std::fs::remove_dir_all(&dir).ok();
        // Either a cancelled call already returned it (then nothing is pending), or this one does.
        assert!(names.is_empty() || names == ["b"], "{names:?}");
        assert_eq!(
            src.last.as_ref().map(|c| c.as_ref().map(|v| v.len())),
            Some(Ok(svc("b").len()))
        );
    }
}
