//! The cluster DNS Service, `kube-dns` in `kube-system`, created at the first start as kubeadm's
//! DNS add-on does: the tenth address of the service range, port 53 over UDP (`dns`) and TCP
//! (`dns-tcp`). No pods stand behind it in a Ferry cluster: each node's `ferry-proxy` answers
//! queries to this address itself. Created once and then left to the cluster's users (an
//! operator may change or delete an add-on), unlike the `kubernetes` Service.

use std::net::Ipv4Addr;

use serde_json::json;
use tracing::{info, warn};

use super::resources;
use super::status::ApiResult;
use super::Api;

pub const NAMESPACE: &str = "kube-system";
pub const NAME: &str = "kube-dns";

/// The cluster DNS address: the tenth of the service range (kubeadm's choice).
pub fn service_ip(cidr: ipnetwork::Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 10)
}

impl Api {
    /// Creates the Service when it is missing; an address already taken by another Service is
    /// reported and the server goes on without it.
    pub async fn create_cluster_dns_service(&self) -> ApiResult<()> {
        let info = resources::by_kind("v1", "Service").expect("served kinds");
        match self.get_object(info, Some(NAMESPACE), NAME).await {
            Ok(_) => return Ok(()),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
        let vip = service_ip(self.cfg.service_cidr).to_string();
        let labels = json!({
            "k8s-app": "kube-dns",
            "kubernetes.io/name": "CoreDNS",
            "kubernetes.io/cluster-service": "true",
        });
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                "selector": {"k8s-app": "kube-dns"},
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        });
        match self
            .create_object(
                info,
                Some(NAMESPACE),
                svc,
                false,
                Some(super::SERVER_MANAGER),
            )
            .await
        {
            Ok(_) => info!(%vip, "cluster DNS Service kube-system/kube-dns created"),
            // Another API server of the cluster was first.
            Err(e) if e.code == 409 => {}
            Err(e) if e.code == 422 => warn!(
                %vip,
                error = %e.message,
                "the cluster DNS Service could not be created; pods' cluster DNS address will not answer"
            ),
            Err(e) => return Err(e),
        }
        Ok(())
    }
}
