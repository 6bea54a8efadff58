//! Services, EndpointSlices and Nodes listed and watched from a Kubernetes API server (Ferry's
//! own or any conformant cluster), through kube-rs' watcher: it resumes a dropped watch from
//! the last resourceVersion and relists when the server answers 410 Gone.
//!
//! The watchers' events are handed over as they are: an applied or deleted object becomes a
//! `Change`, a (re)list the complete list of its kind. The first update waits until all three
//! kinds are listed, so the daemon never programs Services before their endpoints are known.
//! Only nodes are kept here (routes need all of them whenever one changes); Services and
//! slices are kept once, in the daemon's view.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{watcher, Config, Event};
use kube::runtime::WatchStreamExt;
use kube::Resource;
use tokio::sync::mpsc;

use super::{key_of, Change, ServiceSource, Update};

pub struct ApiSource {
    events: mpsc::UnboundedReceiver<Msg>,
    /// Kinds listed at least once (services, slices, nodes).
    listed: [bool; 3],
    /// Changes taken in but not handed over yet (kept here, so a cancelled `next` loses none).
    pending: Vec<Change>,
    nodes: BTreeMap<String, Node>,
    nodes_changed: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a watcher task reports.
enum Msg {
    Change(Change),
    Listed(usize),
    Node(Option<Box<Node>>, String),
    Nodes(Vec<Node>),
}

const SERVICES: usize = 0;
const SLICES: usize = 1;
const NODES: usize = 2;

impl ApiSource {
    pub async fn connect(kubeconfig: &std::path::Path) -> Result<Self> {
        let config = ferry_common::kubeconfig::config(kubeconfig, "ferry-proxy").await?;
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).context("building the API client")?;
        let (tx, events) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(follow(
                kube::Api::<Service>::all(client.clone()),
                tx.clone(),
                SERVICES,
                |o| Msg::Change(Change::Service(key_of(o.meta()), Some(Box::new(o)))),
                |o| Msg::Change(Change::Service(key_of(o.meta()), None)),
                |all| Msg::Change(Change::AllServices(all)),
            )),
            tokio::spawn(follow(
                kube::Api::<EndpointSlice>::all(client.clone()),
                tx.clone(),
                SLICES,
                |o| Msg::Change(Change::Slice(key_of(o.meta()), Some(Box::new(o)))),
                |o| Msg::Change(Change::Slice(key_of(o.meta()), None)),
                |all| Msg::Change(Change::AllSlices(all)),
            )),
            tokio::spawn(follow(
                kube::Api::<Node>::all(client),
                tx,
                NODES,
                |o| {
                    let name = o.meta().name.clone().unwrap_or_default();
                    Msg::Node(Some(Box::new(o)), name)
                },
                |o| Msg::Node(None, o.meta().name.clone().unwrap_or_default()),
                Msg::Nodes,
            )),
        ];
        tracing::info!(%server, "watching Services, EndpointSlices and Nodes");
        Ok(Self {
            events,
            listed: [false; 3],
            pending: Vec::new(),
            nodes: BTreeMap::new(),
            nodes_changed: false,
            tasks,
        })
    }

    fn absorb(&mut self, m: Msg) {
        match m {
            Msg::Change(c) => self.pending.push(c),
            Msg::Listed(kind) => self.listed[kind] = true,
            Msg::Node(node, name) => {
                match node {
                    Some(n) => self.nodes.insert(name, *n),
                    None => self.nodes.remove(&name),
                };
                self.nodes_changed = true;
            }
            Msg::Nodes(all) => {
                self.nodes = all
                    .into_iter()
                    .map(|n| (n.meta().name.clone().unwrap_or_default(), n))
                    .collect();
                self.nodes_changed = true;
            }
        }
    }
}

/// Follows one kind: applied and deleted objects one by one; a (re)list's objects are
/// gathered and sent as one list when it completes, followed by `Listed`.
async fn follow<K>(
    api: kube::Api<K>,
    tx: mpsc::UnboundedSender<Msg>,
    kind: usize,
    applied: fn(K) -> Msg,
    deleted: fn(K) -> Msg,
    list: fn(Vec<K>) -> Msg,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let what = K::plural(&());
    let mut listing: Vec<K> = Vec::new();
    let mut events = std::pin::pin!(watcher(api, Config::default()).default_backoff());
    while let Some(ev) = events.next().await {
        let msg = match ev {
            Ok(Event::Apply(o)) => applied(o),
            Ok(Event::Delete(o)) => deleted(o),
            Ok(Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(Event::InitApply(o)) => {
                listing.push(o);
                continue;
            }
            Ok(Event::InitDone) => {
                if tx.send(list(std::mem::take(&mut listing))).is_err() {
                    return;
                }
                Msg::Listed(kind)
            }
            // The watcher retries with back-off; a 410 makes it relist.
            Err(e) => {
                tracing::warn!("watching {what}: {e}; retrying");
                continue;
            }
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
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
        loop {
            // Take everything waiting without awaiting; `recv` is cancel-safe and what it
            // returns is absorbed before the next await.
            while let Ok(m) = self.events.try_recv() {
                self.absorb(m);
            }
            if self.listed.iter().all(|l| *l) && (!self.pending.is_empty() || self.nodes_changed) {
                let nodes = std::mem::take(&mut self.nodes_changed)
                    .then(|| self.nodes.values().cloned().collect());
                return Ok(Update {
                    changes: std::mem::take(&mut self.pending),
                    nodes,
                });
            }
            let m = self
                .events
                .recv()
                .await
                .context("the API watchers stopped")?;
            self.absorb(m);
        }
    }
}
