//! Events as the control plane's components report them (core/v1 Events, which `kubectl
//! describe` and `kubectl get events` read).
//!
//! Publishing never blocks the caller: events go through a bounded queue to a writer task,
//! and are dropped with a debug log when the queue is full (client-go's broadcaster does the
//! same). Repeats of the same reason and message about the same object are folded into one
//! Event whose `count` and `lastTimestamp` move, as client-go's correlator does.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::debug;

const QUEUE: usize = 1000;
const WRITERS: usize = 8;

struct Record {
    object: ObjectReference,
    type_: &'static str,
    reason: String,
    message: String,
}

/// Publishes Events for one component (`source.component`, e.g. "default-scheduler").
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Record>,
}

/// A reference to an object for an Event's `involvedObject`.
pub fn reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: obj.meta().name.clone(),
        namespace: obj.meta().namespace.clone(),
        uid: obj.meta().uid.clone(),
        resource_version: obj.meta().resource_version.clone(),
        field_path: None,
    }
}

impl Recorder {
    pub fn new(client: Client, component: &str) -> Recorder {
        let (tx, rx) = mpsc::channel::<Record>(QUEUE);
        let component = component.to_string();
        tokio::spawn(async move {
            let counts = std::sync::Mutex::new(HashMap::<String, i32>::new());
            tokio_stream::wrappers::ReceiverStream::new(rx)
                .for_each_concurrent(WRITERS, |r| {
                    let (client, component, counts) = (client.clone(), component.clone(), &counts);
                    async move {
                        if let Err(e) = write(&client, &component, counts, r).await {
                            debug!(error = %e, "writing an event");
                        }
                    }
                })
                .await;
        });
        Recorder { tx }
    }

    pub fn normal(&self, object: ObjectReference, reason: &str, message: String) {
        self.publish(object, "Normal", reason, message);
    }

    pub fn warning(&self, object: ObjectReference, reason: &str, message: String) {
        self.publish(object, "Warning", reason, message);
    }

    fn publish(&self, object: ObjectReference, type_: &'static str, reason: &str, message: String) {
        let r = Record {
            object,
            type_,
            reason: reason.to_string(),
            message,
        };
        if self.tx.try_send(r).is_err() {
            debug!("event queue full; event dropped");
        }
    }
}

async fn write(
    client: &Client,
    component: &str,
    counts: &std::sync::Mutex<HashMap<String, i32>>,
    r: Record,
) -> Result<(), kube::Error> {
    let ns = r
        .object
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &r.object.uid,
        &r.object.name,
        r.type_,
        &r.reason,
        &r.message,
    )
        .hash(&mut h);
    let name = format!(
        "{}.{:016x}",
        r.object.name.clone().unwrap_or_default(),
        h.finish()
    );
    let now = Time(k8s_openapi::chrono::Utc::now());
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    let seen = counts.lock().unwrap().get(&name).copied();
    if let Some(n) = seen {
        let patch = json!({"count": n + 1, "lastTimestamp": now});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(ev) => {
                counts
                    .lock()
                    .unwrap()
                    .insert(name, ev.count.unwrap_or(n + 1));
                return Ok(());
            }
            // Expired (events live an hour): write it anew.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let ev = Event {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            ..Default::default()
        },
        involved_object: r.object,
        type_: Some(r.type_.into()),
        reason: Some(r.reason),
        message: Some(r.message),
        count: Some(1),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        source: Some(EventSource {
            component: Some(component.to_string()),
            host: None,
        }),
        reporting_component: Some(component.to_string()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &ev).await {
        Ok(e) => {
            let mut c = counts.lock().unwrap();
            if c.len() > 10_000 {
                c.clear(); // forgetting only costs a create that turns into a patch
            }
            c.insert(e.name_any(), 1);
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Another writer (or an earlier run) made it: count on from there.
            let cur = api.get(&name).await?;
            let n = cur.count.unwrap_or(1) + 1;
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    &json!({"count": n, "lastTimestamp": Time(k8s_openapi::chrono::Utc::now())}),
                ),
            )
            .await?;
            counts.lock().unwrap().insert(name, n);
            Ok(())
        }
        Err(e) => Err(e),
    }
}
