//! What every namespace gets, as Kubernetes' service account controller and root CA publisher
//! make it: the `default` ServiceAccount (the identity of pods that name none), and the
//! `kube-root-ca.crt` ConfigMap holding the cluster's CA as `ca.crt` (what in-cluster clients
//! verify the API server with). Both are made when a namespace appears, made again when
//! deleted, and the ConfigMap is written back when its content differs from the CA.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
pub const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";

struct Ctx {
    client: Client,
    /// The cluster CA, PEM (None: not known to this controller manager, nothing published).
    ca: Option<String>,
}

/// Whether a create that failed can be left: it exists already (409), or the namespace is
/// going away (Kubernetes refuses new objects in a terminating namespace).
fn benign(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(a) if a.code == 409 || (a.code == 403 && a.message.contains("terminat")))
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    let terminating = ns.metadata.deletion_timestamp.is_some()
        || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    if terminating {
        return Ok(Action::await_change());
    }
    let name = ns.name_any();
    let meta = |n: &str| ObjectMeta {
        name: Some(n.to_string()),
        namespace: Some(name.clone()),
        ..Default::default()
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &name);
    if accounts.get_opt(DEFAULT_SERVICE_ACCOUNT).await?.is_none() {
        let sa = ServiceAccount {
            metadata: meta(DEFAULT_SERVICE_ACCOUNT),
            ..Default::default()
        };
        match accounts.create(&PostParams::default(), &sa).await {
            Ok(_) => info!(namespace = %name, "created the default ServiceAccount"),
            Err(e) if benign(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let Some(ca) = &ctx.ca else {
        return Ok(Action::await_change());
    };
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &name);
    match maps.get_opt(ROOT_CA_CONFIGMAP).await? {
        Some(cm) if cm.data.as_ref().and_then(|d| d.get("ca.crt")) == Some(ca) => {}
        Some(_) => {
            let patch = json!({"data": {"ca.crt": ca}});
            maps.patch(
                ROOT_CA_CONFIGMAP,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
            info!(namespace = %name, "rewrote {ROOT_CA_CONFIGMAP} with the cluster CA");
        }
        None => {
            let cm = ConfigMap {
                metadata: meta(ROOT_CA_CONFIGMAP),
                data: Some([("ca.crt".to_string(), ca.clone())].into()),
                ..Default::default()
            };
            match maps.create(&PostParams::default(), &cm).await {
                Ok(_) => {
                    info!(namespace = %name, "published the cluster CA as {ROOT_CA_CONFIGMAP}")
                }
                Err(e) if benign(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(Action::await_change())
}

fn error_policy(ns: Arc<Namespace>, e: &kube::Error, _: Arc<Ctx>) -> Action {
    warn!(namespace = %ns.name_any(), error = %e, "namespace defaults failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// The namespace an object of it belongs to, as the key the controller reconciles.
fn owner_namespace<K: ResourceExt>(o: K) -> Option<ObjectRef<Namespace>> {
    o.namespace().map(|ns| ObjectRef::new(&ns))
}

/// The CA a kubeconfig trusts for its current cluster, PEM (inline or from its file).
pub fn kubeconfig_ca(path: &std::path::Path) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    use base64::Engine as _;
    let kc = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let cluster_name = kc
        .contexts
        .iter()
        .find(|c| Some(&c.name) == kc.current_context.as_ref())
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone());
    let Some(cluster) = kc
        .clusters
        .iter()
        .find(|c| cluster_name.is_none() || Some(&c.name) == cluster_name.as_ref())
        .and_then(|c| c.cluster.as_ref())
    else {
        return Ok(None);
    };
    if let Some(data) = &cluster.certificate_authority_data {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .context("certificate-authority-data is not base64")?;
        return Ok(Some(String::from_utf8_lossy(&pem).into_owned()));
    }
    match &cluster.certificate_authority {
        Some(file) => Ok(Some(
            std::fs::read_to_string(file).with_context(|| format!("reading the CA {file}"))?,
        )),
        None => Ok(None),
    }
}

/// Runs the controller; `ca` is the cluster CA in PEM (from the controller manager's
/// kubeconfig).
pub async fn run(client: Client, ca: Option<String>) -> anyhow::Result<()> {
    if ca.is_none() {
        warn!("the kubeconfig names no CA: {ROOT_CA_CONFIGMAP} is not published");
    }
    let by_name = |n: &str| watcher::Config::default().fields(&format!("metadata.name={n}"));
    let controller = Controller::new(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<ServiceAccount>::all(client.clone()),
        by_name(DEFAULT_SERVICE_ACCOUNT),
        owner_namespace,
    )
    .watches(
        Api::<ConfigMap>::all(client.clone()),
        by_name(ROOT_CA_CONFIGMAP),
        owner_namespace,
    );
    info!("service account controller started");
    super::drain(
        "serviceaccounts",
        controller.run(reconcile, error_policy, Arc::new(Ctx { client, ca })),
    )
    .await;
    Ok(())
}
