//! The garbage collector: follows ownerReferences as Kubernetes' does.
//! - Background: a dependent whose owners are all gone is deleted (checked against the API
//!   server before deleting, so a cache that has not seen a new owner yet deletes nothing).
//! - Foreground: an owner marked with the `foregroundDeletion` finalizer has its dependents
//!   deleted (foreground too, so chains wait), and loses the finalizer when none is left.
//! - Orphan: an owner marked with the `orphan` finalizer has its reference removed from every
//!   dependent, then loses the finalizer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy,
};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

/// The kinds that own or are owned, watched by the collector.
fn collected_kinds() -> Vec<ApiResource> {
    use k8s_openapi::api::{
        apps::v1 as apps, batch::v1 as batch, core::v1 as core, discovery::v1 as discovery,
    };
    vec![
        ApiResource::erase::<core::Pod>(&()),
        ApiResource::erase::<core::Service>(&()),
        ApiResource::erase::<core::ReplicationController>(&()),
        ApiResource::erase::<apps::Deployment>(&()),
        ApiResource::erase::<apps::ReplicaSet>(&()),
        ApiResource::erase::<apps::DaemonSet>(&()),
        ApiResource::erase::<apps::StatefulSet>(&()),
        ApiResource::erase::<apps::ControllerRevision>(&()),
        ApiResource::erase::<batch::Job>(&()),
        ApiResource::erase::<batch::CronJob>(&()),
        ApiResource::erase::<discovery::EndpointSlice>(&()),
    ]
}

struct Kind {
    ar: ApiResource,
    store: Store<DynamicObject>,
}

fn api(client: &Client, ar: &ApiResource, ns: Option<&str>) -> Api<DynamicObject> {
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

fn has_finalizer(o: &DynamicObject, f: &str) -> bool {
    o.finalizers().iter().any(|x| x == f)
}

/// Is the owner `uid` (kind, name in `ns`) still there? Asks the API server, not the cache.
async fn owner_exists(
    client: &Client,
    kinds: &[Kind],
    ns: Option<&str>,
    r: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> bool {
    let Some(k) = kinds
        .iter()
        .find(|k| k.ar.kind == r.kind && k.ar.api_version == r.api_version)
    else {
        // An owner of a kind we do not know: never collect on its account.
        return true;
    };
    match api(client, &k.ar, ns).get_opt(&r.name).await {
        Ok(Some(o)) => o.uid().as_deref() == Some(r.uid.as_str()),
        Ok(None) => false,
        Err(_) => true,
    }
}

async fn pass(client: &Client, kinds: &[Kind]) {
    // Every object by uid, and every dependent by owner uid.
    let mut by_uid: HashMap<String, (usize, Arc<DynamicObject>)> = HashMap::new();
    let mut dependents: HashMap<String, Vec<(usize, Arc<DynamicObject>)>> = HashMap::new();
    for (i, k) in kinds.iter().enumerate() {
        for o in k.store.state() {
            if let Some(uid) = o.uid() {
                by_uid.insert(uid, (i, o.clone()));
            }
            for r in o.owner_references() {
                dependents
                    .entry(r.uid.clone())
                    .or_default()
                    .push((i, o.clone()));
            }
        }
    }
    // Owners being deleted in the foreground or with orphaning.
    for (uid, (i, owner)) in &by_uid {
        if owner.metadata.deletion_timestamp.is_none() {
            continue;
        }
        let ns = owner.namespace();
        let deps = dependents.get(uid).cloned().unwrap_or_default();
        let owner_api = api(client, &kinds[*i].ar, ns.as_deref());
        if has_finalizer(owner, "orphan") {
            for (j, d) in &deps {
                let refs: Vec<_> = d
                    .owner_references()
                    .iter()
                    .filter(|r| &r.uid != uid)
                    .cloned()
                    .collect();
                let refs = if refs.is_empty() {
                    serde_json::Value::Null
                } else {
                    json!(refs)
                };
                let patch = json!({"metadata": {"ownerReferences": refs}});
                let _ = api(client, &kinds[*j].ar, d.namespace().as_deref())
                    .patch(
                        &d.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
            }
            remove_finalizer(&owner_api, owner, "orphan").await;
        } else if has_finalizer(owner, "foregroundDeletion") {
            let live: Vec<_> = deps
                .iter()
                .filter(|(_, d)| d.metadata.deletion_timestamp.is_none())
                .collect();
            for (j, d) in &live {
                let dp = DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Foreground),
                    ..Default::default()
                };
                let _ = api(client, &kinds[*j].ar, d.namespace().as_deref())
                    .delete(&d.name_any(), &dp)
                    .await;
            }
            if deps.is_empty() {
                remove_finalizer(&owner_api, owner, "foregroundDeletion").await;
            }
        }
    }
    // Dependents whose owners are all gone.
    for (i, k) in kinds.iter().enumerate() {
        for d in k.store.state() {
            let refs = d.owner_references();
            if refs.is_empty() || d.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if refs.iter().any(|r| by_uid.contains_key(&r.uid)) {
                continue;
            }
            let ns = d.namespace();
            let mut gone = true;
            for r in refs {
                if owner_exists(client, kinds, ns.as_deref(), r).await {
                    gone = false;
                    break;
                }
            }
            if gone {
                debug!(kind = %kinds[i].ar.kind, name = %d.name_any(), "owner gone; deleting");
                let dp = DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..Default::default()
                };
                if let Err(e) = api(client, &kinds[i].ar, ns.as_deref())
                    .delete(&d.name_any(), &dp)
                    .await
                {
                    debug!(error = %e, "deleting a dependent");
                }
            }
        }
    }
}

async fn remove_finalizer(api: &Api<DynamicObject>, o: &DynamicObject, f: &str) {
    let left: Vec<String> = o.finalizers().iter().filter(|x| *x != f).cloned().collect();
    let patch = json!({"metadata": {"finalizers": left, "resourceVersion": o.resource_version()}});
    if let Err(e) = api
        .patch(
            &o.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        debug!(error = %e, "removing finalizer {f}");
    }
}

pub async fn run(client: Client) -> anyhow::Result<()> {
    let (tx, mut changed) = tokio::sync::watch::channel(0u64);
    let tx = Arc::new(tx);
    let mut kinds = Vec::new();
    for ar in collected_kinds() {
        let writer = reflector::store::Writer::new(ar.clone());
        let store = writer.as_reader();
        let tx = tx.clone();
        tokio::spawn(
            watcher(api(&client, &ar, None), watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .for_each(move |_| {
                    tx.send_modify(|n| *n += 1);
                    std::future::ready(())
                }),
        );
        kinds.push(Kind { ar, store });
    }
    for k in &kinds {
        if k.store.wait_until_ready().await.is_err() {
            warn!(kind = %k.ar.kind, "watch of a collected kind stopped");
        }
    }
    info!(kinds = kinds.len(), "garbage collector started");
    loop {
        pass(&client, &kinds).await;
        // Changes come in bursts: gather them for a moment, and look again now and then.
        let _ = tokio::time::timeout(Duration::from_secs(5), changed.changed()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
