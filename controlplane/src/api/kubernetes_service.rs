//! The `kubernetes` Service in `default`, kept by the API server itself as Kubernetes does: the
//! first address of the service range, port 443 (`https`) to the API server's port, and the
//! Endpoints and EndpointSlice of the same name pointing at the advertised address. Created at
//! start and put back every few seconds if someone changed or deleted them, so in-cluster
//! clients always find the API at `kubernetes.default.svc` and `KUBERNETES_SERVICE_HOST`.

use std::net::Ipv4Addr;
use std::sync::Weak;
use std::time::Duration;

use serde_json::{json, Value};
use tracing::{debug, warn};

use super::resources::{self, ResourceInfo};
use super::status::ApiResult;
use super::Api;

pub const NAME: &str = "kubernetes";
const NAMESPACE: &str = "default";
/// How often the objects are checked (kube-apiserver's `--endpoint-reconciler` period).
const PERIOD: Duration = Duration::from_secs(10);

/// The address in-cluster clients use: the first of the service range.
pub fn service_ip(cidr: ipnetwork::Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

impl Api {
    /// The three objects as this server wants them.
    fn kubernetes_objects(&self) -> Vec<Value> {
        let (ip, port) = (*self.cfg.advertise.ip(), self.cfg.advertise.port());
        let labels = json!({"component": "apiserver", "provider": "kubernetes"});
        let vip = service_ip(self.cfg.service_cidr).to_string();
        let mut objs = vec![json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                "sessionAffinity": "None",
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}],
            },
        })];
        // Kubernetes refuses loopback endpoints: nothing in a pod could reach them.
        if ip.is_loopback() || ip.is_unspecified() {
            return objs;
        }
        objs.push(json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
            "subsets": [{
                "addresses": [{"ip": ip.to_string()}],
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            }],
        }));
        objs.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {
                "kubernetes.io/service-name": NAME,
                "endpointslice.kubernetes.io/managed-by": "kube-apiserver",
            }},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        }));
        objs
    }

    /// Creates what is missing and puts back what was changed (only the fields this server
    /// owns: the Service's ports, the endpoints' addresses and ports).
    pub async fn reconcile_kubernetes_service(&self) -> ApiResult<()> {
        for want in self.kubernetes_objects() {
            let info = resources::by_kind(
                want["apiVersion"].as_str().unwrap_or_default(),
                want["kind"].as_str().unwrap_or_default(),
            )
            .expect("served kinds");
            self.put_kubernetes_object(info, want).await?;
        }
        Ok(())
    }

    async fn put_kubernetes_object(&self, info: &ResourceInfo, want: Value) -> ApiResult<()> {
        let owned: &[&str] = match info.kind {
            "Service" => &["/spec/ports"],
            "Endpoints" => &["/subsets"],
            _ => &["/endpoints", "/ports", "/addressType"],
        };
        match self.get_object(info, Some(NAMESPACE), NAME).await {
            Err(e) if e.code == 404 => {
                match self
                    .create_object(
                        info,
                        Some(NAMESPACE),
                        want,
                        false,
                        Some(super::SERVER_MANAGER),
                    )
                    .await
                {
                    Ok(_) => debug!(kind = info.kind, "kubernetes object created"),
                    // Another API server of the cluster was first.
                    Err(e) if e.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
            Ok((cur, kv)) => {
                if owned.iter().all(|p| cur.pointer(p) == want.pointer(p)) {
                    return Ok(());
                }
                let mut new = cur.clone();
                for p in owned {
                    if let (Some(slot), Some(v)) = (new.pointer_mut(p), want.pointer(p)) {
                        *slot = v.clone();
                    } else if let (Some(o), Some(v)) = (new.as_object_mut(), want.pointer(p)) {
                        o.insert(p.trim_start_matches('/').to_string(), v.clone());
                    }
                }
                match self
                    .update_object(
                        info,
                        Some(NAMESPACE),
                        NAME,
                        new,
                        &cur,
                        &kv,
                        None,
                        false,
                        Some(super::SERVER_MANAGER),
                    )
                    .await
                {
                    Ok(_) => debug!(kind = info.kind, "kubernetes object put back"),
                    Err(e) if e.code == 409 => {} // changed meanwhile: next round
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// Keeps the objects in place while the server runs.
pub(super) async fn keep(api: Weak<Api>) {
    loop {
        let Some(a) = api.upgrade() else { return };
        if let Err(e) = a.reconcile_kubernetes_service().await {
            warn!(error = %e.message, "reconciling the kubernetes Service");
        }
        drop(a);
        tokio::time::sleep(PERIOD).await;
    }
}
