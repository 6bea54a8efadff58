//! What the workload controllers share about the pods they own: state tests, owner
//! references, names, template hashes and pods made from templates.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

/// Not being deleted and not finished.
pub fn is_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(phase(pod), Some("Succeeded") | Some("Failed"))
}

pub fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.phase.as_deref())
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The controller reference of an object, if it has one.
pub fn controller_of<K: Resource>(obj: &K) -> Option<&OwnerReference> {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

pub fn owned_by<K: Resource>(obj: &K, uid: &str) -> bool {
    controller_of(obj).is_some_and(|o| o.uid == uid)
}

/// A controller reference to `owner`, as its dependents carry it.
pub fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.meta().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Five characters as Kubernetes uses for generated names.
pub fn random_suffix() -> String {
    (0..5)
        .map(|_| ALPHABET[rand::random::<u32>() as usize % ALPHABET.len()] as char)
        .collect()
}

/// A stable short hash of a value (FNV-1a over its JSON): pod-template-hash and
/// controller-revision-hash labels.
pub fn hash(value: &impl serde::Serialize) -> String {
    let t = serde_json::to_string(value).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in t.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (0..10)
        .map(|i| ALPHABET[((h >> (i * 6)) % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

/// A pod from a template, owned by `owner`, with `labels` added to the template's.
pub fn from_template(
    template: &PodTemplateSpec,
    ns: &str,
    name: String,
    owner: OwnerReference,
    labels: BTreeMap<String, String>,
) -> Pod {
    let meta = template.metadata.clone().unwrap_or_default();
    let mut all = meta.labels.unwrap_or_default();
    all.extend(labels);
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(ns.to_string()),
            labels: Some(all),
            annotations: meta.annotations,
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

/// How long to wait for the cache to show a controller's own writes before acting anyway.
const EXPECTATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Default)]
struct Expected {
    create: std::collections::HashSet<String>,
    delete: std::collections::HashSet<String>,
    since: Option<std::time::Instant>,
}

/// The pods a controller created or deleted and waits to see so in its cache, per owner uid.
/// Without them, a reconcile on a cache that lags behind its own writes would create a
/// fourth pod where three were asked for.
#[derive(Default)]
pub struct Expectations(std::sync::Mutex<std::collections::HashMap<String, Expected>>);

impl Expectations {
    /// Whether the cache (the names of the pods it shows) reflects every write made for
    /// `owner` (or the writes are too old to wait for).
    pub fn satisfied(&self, owner: &str, names: &std::collections::HashSet<String>) -> bool {
        let mut all = self.0.lock().unwrap();
        let Some(e) = all.get_mut(owner) else {
            return true;
        };
        e.create.retain(|n| !names.contains(n));
        e.delete.retain(|n| names.contains(n));
        let pending = !e.create.is_empty() || !e.delete.is_empty();
        if pending && e.since.is_some_and(|t| t.elapsed() < EXPECTATION_TIMEOUT) {
            return false;
        }
        all.remove(owner);
        true
    }

    pub fn created(&self, owner: &str, pod: String) {
        self.entry(owner, |e| {
            e.create.insert(pod);
        });
    }

    pub fn deleted(&self, owner: &str, pod: String) {
        self.entry(owner, |e| {
            e.delete.insert(pod);
        });
    }

    fn entry(&self, owner: &str, f: impl FnOnce(&mut Expected)) {
        let mut all = self.0.lock().unwrap();
        let e = all.entry(owner.to_string()).or_default();
        e.since = Some(std::time::Instant::now());
        f(e);
    }
}

/// The pods of one namespace in a cache.
pub fn in_namespace(
    pods: &kube::runtime::reflector::Store<Pod>,
    ns: &str,
) -> Vec<std::sync::Arc<Pod>> {
    pods.state()
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
        .collect()
}

/// Writes `status` (some of an object's status fields) with a merge patch of the status
/// subresource, unless the object already says the same. A field the object lacks counts as
/// saying 0, null or an empty list, as the API leaves such fields out.
pub async fn write_status<K>(
    client: &kube::Client,
    obj: &K,
    status: serde_json::Value,
) -> kube::Result<()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + serde::Serialize
        + serde::de::DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let current = serde_json::to_value(obj).unwrap_or_default()["status"].clone();
    let empty = |v: &serde_json::Value| {
        v.is_null() || *v == 0 || v.as_array().is_some_and(|a| a.is_empty())
    };
    let differs = status
        .as_object()
        .into_iter()
        .flatten()
        .any(|(k, v)| match current.get(k) {
            Some(c) => c != v,
            None => !empty(v),
        });
    if differs {
        let api: kube::Api<K> =
            kube::Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
        api.patch_status(
            &obj.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&serde_json::json!({ "status": status })),
        )
        .await?;
    }
    Ok(())
}

/// The `O` that controls `obj` (same namespace), to wake when `obj` changes.
pub fn owner_to_wake<O, K>(obj: &K) -> Option<kube::runtime::reflector::ObjectRef<O>>
where
    O: Resource<DynamicType = ()>,
    K: Resource,
{
    let ns = obj.meta().namespace.clone().unwrap_or_default();
    controller_of(obj)
        .filter(|o| o.kind == O::kind(&()))
        .map(|o| kube::runtime::reflector::ObjectRef::new(&o.name).within(&ns))
}
