//! The Service environment variables a container starts with, as the kubelet gives them: for
//! every Service of the pod's namespace with a cluster IP (when `enableServiceLinks`, the
//! default) and always for `kubernetes` in `default`, `<NAME>_SERVICE_HOST`,
//! `<NAME>_SERVICE_PORT[_<PORT NAME>]` and the Docker link variables (`<NAME>_PORT`,
//! `<NAME>_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]`). Read from a watched cache of Services;
//! the container's own `env` wins over them.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};

/// The Services every node knows, kept by a watch.
#[derive(Clone)]
pub struct Services {
    store: Store<Service>,
}

impl Services {
    /// Starts the watch; the cache fills in the background.
    pub fn watch(client: Client) -> Services {
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(Api::<Service>::all(client), Default::default()),
        )
        .default_backoff()
        .touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(r) = stream.next().await {
                if let Err(e) = r {
                    tracing::warn!("service watch: {e}");
                }
            }
        });
        Services { store }
    }

    /// Waits (bounded) for the first list, so the first containers see every Service.
    pub async fn ready(&self, within: Duration) {
        if tokio::time::timeout(within, self.store.wait_until_ready())
            .await
            .is_err()
        {
            tracing::warn!(
                "no Service list after {within:?}: containers start without some service variables"
            );
        }
    }

    /// The variables for a pod in `namespace`, sorted by name.
    pub fn env(&self, namespace: &str, links: bool) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let svcs = self.store.state();
        // The `kubernetes` Service first, so one of the pod's namespace named alike wins.
        for s in svcs.iter().filter(|s| is_master(s)) {
            add(&mut out, s);
        }
        if links {
            for s in svcs
                .iter()
                .filter(|s| s.namespace().as_deref() == Some(namespace) && !is_master(s))
            {
                add(&mut out, s);
            }
        }
        out
    }
}

fn is_master(s: &Service) -> bool {
    s.namespace().as_deref() == Some("default") && s.name_any() == "kubernetes"
}

/// Adds the variables of one Service (none without a cluster IP: headless, ExternalName).
pub fn add(out: &mut BTreeMap<String, String>, s: &Service) {
    let Some(spec) = s.spec.as_ref() else { return };
    let Some(ip) = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty() && *ip != "None")
    else {
        return;
    };
    let name = s.name_any().to_uppercase().replace('-', "_");
    let ports = spec.ports.as_deref().unwrap_or_default();
    let Some(first) = ports.first() else { return };
    out.insert(format!("{name}_SERVICE_HOST"), ip.to_string());
    out.insert(format!("{name}_SERVICE_PORT"), first.port.to_string());
    for p in ports {
        if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
            out.insert(
                format!("{name}_SERVICE_PORT_{}", n.to_uppercase().replace('-', "_")),
                p.port.to_string(),
            );
        }
    }
    let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
        p.protocol.as_deref().unwrap_or("TCP").to_string()
    };
    out.insert(
        format!("{name}_PORT"),
        format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port),
    );
    for p in ports {
        let prefix = format!("{name}_PORT_{}_{}", p.port, proto(p).to_uppercase());
        out.insert(
            prefix.clone(),
            format!("{}://{ip}:{}", proto(p).to_lowercase(), p.port),
        );
        out.insert(format!("{prefix}_PROTO"), proto(p).to_lowercase());
        out.insert(format!("{prefix}_PORT"), p.port.to_string());
        out.insert(format!("{prefix}_ADDR"), ip.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, ip: &str, ports: &str) -> Service {
        serde_json::from_str(&format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{{"clusterIP":"{ip}","ports":{ports}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn variables_follow_the_kubelet() {
        let mut out = BTreeMap::new();
        add(
            &mut out,
            &svc(
                "shop",
                "redis-primary",
                "10.96.3.4",
                r#"[{"name":"db","port":6379},{"name":"metrics","port":9121,"protocol":"UDP"}]"#,
            ),
        );
        let want = [
            ("REDIS_PRIMARY_SERVICE_HOST", "10.96.3.4"),
            ("REDIS_PRIMARY_SERVICE_PORT", "6379"),
            ("REDIS_PRIMARY_SERVICE_PORT_DB", "6379"),
            ("REDIS_PRIMARY_SERVICE_PORT_METRICS", "9121"),
            ("REDIS_PRIMARY_PORT", "tcp://10.96.3.4:6379"),
            ("REDIS_PRIMARY_PORT_6379_TCP", "tcp://10.96.3.4:6379"),
            ("REDIS_PRIMARY_PORT_6379_TCP_PROTO", "tcp"),
            ("REDIS_PRIMARY_PORT_6379_TCP_PORT", "6379"),
            ("REDIS_PRIMARY_PORT_6379_TCP_ADDR", "10.96.3.4"),
            ("REDIS_PRIMARY_PORT_9121_UDP", "udp://10.96.3.4:9121"),
            ("REDIS_PRIMARY_PORT_9121_UDP_PROTO", "udp"),
            ("REDIS_PRIMARY_PORT_9121_UDP_PORT", "9121"),
            ("REDIS_PRIMARY_PORT_9121_UDP_ADDR", "10.96.3.4"),
        ];
        let got: Vec<(&str, &str)> = out.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut want = want.to_vec();
        want.sort();
        assert_eq!(got, want);
        // Headless Services and those without an address give nothing.
        let mut out = BTreeMap::new();
        add(&mut out, &svc("shop", "db", "None", r#"[{"port":5432}]"#));
        add(&mut out, &svc("shop", "ext", "", r#"[{"port":80}]"#));
        assert!(out.is_empty(), "{out:?}");
    }
}
