//! The cluster DNS Service (`kube-system/kube-dns`) answered by this node's own DNS server:
//! its port-53 cluster-IP frontends lead to the node-local DNS address, whatever endpoints the
//! Service has (none, in a Ferry cluster), so DNS never crosses nodes.

use std::net::Ipv4Addr;

use super::{BackendAddr, Proto};

/// The port DNS is served on.
pub const DNS_PORT: u16 = 53;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalDns {
    pub namespace: String,
    pub name: String,
    pub addr: Ipv4Addr,
}

impl LocalDns {
    /// The node's server, when `ns/name` port `port` is the cluster DNS Service's DNS port.
    pub(super) fn backend(
        &self,
        ns: &str,
        name: &str,
        port: u16,
        proto: Proto,
    ) -> Option<BackendAddr> {
        (self.namespace == ns && self.name == name && port == DNS_PORT).then_some(BackendAddr {
            addr: self.addr,
            port: DNS_PORT,
            proto,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::state_on;
    use super::*;
    use crate::model::{Frontend, NodeInfo};

    const KUBE_DNS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
  - {name: metrics, port: 9153, protocol: TCP}
"#;

    #[test]
    fn the_dns_service_leads_to_the_node_server_without_endpoints() {
        let node = NodeInfo {
            name: "node-a".into(),
            addresses: vec![Ipv4Addr::new(192, 168, 77, 1)],
            local_dns: Some(LocalDns {
                namespace: "kube-system".into(),
                name: "kube-dns".into(),
                addr: Ipv4Addr::new(169, 254, 20, 10),
            }),
        };
        let d = state_on(KUBE_DNS, &node).unwrap().frontends;
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        for proto in [Proto::Udp, Proto::Tcp] {
            let fe = Frontend {
                addr: vip,
                port: 53,
                proto,
            };
            assert_eq!(
                d[&fe].backends,
                vec![BackendAddr {
                    addr: Ipv4Addr::new(169, 254, 20, 10),
                    port: 53,
                    proto
                }]
            );
        }
        // Its other ports, and every other Service, keep their endpoints (none here).
        let metrics = Frontend {
            addr: vip,
            port: 9153,
            proto: Proto::Tcp,
        };
        assert!(d[&metrics].backends.is_empty());
        let other = KUBE_DNS.replace("name: kube-dns", "name: my-dns");
        let d = state_on(&other, &node).unwrap().frontends;
        assert!(d.values().all(|f| f.backends.is_empty()));
    }
}
