//! The controller manager: control loops that watch the API and act on it, as a client of the
//! API server like any other (`ferry-controlplane controller-manager --kubeconfig ...`).
//! Endpoints and EndpointSlices; ReplicaSets and ReplicationControllers; Deployments;
//! DaemonSets; Jobs and CronJobs; StatefulSets; PodDisruptionBudgets' status; the garbage
//! collector; node lifecycle; each namespace's default ServiceAccount and root CA ConfigMap.

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod gc;
pub mod job;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod pods;
pub mod replicaset;
pub mod serviceaccounts;
pub mod statefulset;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};

/// A cache of every `K` and the stream of its changes, fed by one watch: the cache is updated
/// before a change goes on to wake a controller, so a reconcile never runs on a cache older
/// than the change that woke it.
pub fn cached<K>(
    client: &Client,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let events = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    (store, events)
}

/// Runs a controller's result stream to its end, logging failed reconciles (the controller
/// retries them through its error policy).
pub async fn drain<T, E: std::fmt::Display>(name: &str, results: impl Stream<Item = Result<T, E>>) {
    results
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!("{name} controller: {e}");
            }
            std::future::ready(())
        })
        .await;
}
