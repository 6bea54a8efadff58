//! Service cluster IPs and node ports: each allocation is a store key created only if absent,
//! so two concurrent creates can never get the same one; a Service's update keeps what it had,
//! claims what is new, and releases what it no longer names. A change of type drops what the
//! new type does not use (as Kubernetes' `dropTypeDependentFields`), so it is released.

use std::net::Ipv4Addr;

use bytes::Bytes;
use serde_json::{json, Value};
use tracing::warn;

use super::status::{self, ApiError, ApiResult, FieldError};
use super::Api;
use crate::store::{Precondition, StoreError};

const IP_PREFIX: &str = "/registry/ranges/serviceips/";

/// 422 for a Service whose requested cluster IP or node port cannot be had.
fn alloc_error(owner: &str, field: &str, value: impl std::fmt::Display, why: &str) -> ApiError {
    ApiError::invalid(
        "Service",
        "",
        owner,
        vec![status::FieldError::invalid(field, value, why)],
    )
}
const PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";

impl Api {
    async fn claim(&self, key: String, owner: &str) -> ApiResult<bool> {
        match self
            .store
            .put(
                &key,
                Bytes::from(owner.to_string()),
                Precondition::Absent,
                0,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn release(&self, key: String) {
        if let Err(e) = self.store.delete(&key, Precondition::None).await {
            if !matches!(e, StoreError::NotFound(_)) {
                warn!(key, error = %e, "releasing an allocation");
            }
        }
    }

    /// Claims `want` (if given) or a free address of the service CIDR.
    pub async fn allocate_ip(&self, want: Option<Ipv4Addr>, owner: &str) -> ApiResult<Ipv4Addr> {
        let net = self.cfg.service_cidr;
        if let Some(ip) = want {
            if !net.contains(ip) || ip == net.network() || ip == net.broadcast() {
                return Err(alloc_error(
                    owner,
                    "spec.clusterIPs",
                    format!("[]string{{\"{ip}\"}}"),
                    &format!("failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {net}"),
                ));
            }
            if self.claim(format!("{IP_PREFIX}{ip}"), owner).await? {
                return Ok(ip);
            }
            return Err(alloc_error(
                owner,
                "spec.clusterIPs",
                format!("[]string{{\"{ip}\"}}"),
                &format!("failed to allocate IP {ip}: provided IP is already allocated"),
            ));
        }
        let size = net.size() as u64;
        let base = u32::from(net.network()) as u64;
        let start = rand::random::<u64>() % size.max(1);
        // Skip the network address, the broadcast address and .1 (kubernetes.default).
        for i in 0..size {
            let off = (start + i) % size;
            if off < 2 || off == size - 1 {
                continue;
            }
            let ip = Ipv4Addr::from((base + off) as u32);
            if self.claim(format!("{IP_PREFIX}{ip}"), owner).await? {
                return Ok(ip);
            }
        }
        Err(ApiError::internal(format!(
            "no free cluster IP left in {net}"
        )))
    }

    pub async fn allocate_port(
        &self,
        want: Option<u16>,
        owner: &str,
        field: &str,
    ) -> ApiResult<u16> {
        let (lo, hi) = self.cfg.node_ports;
        if let Some(p) = want {
            if p < lo || p > hi {
                return Err(alloc_error(
                    owner,
                    field,
                    p,
                    &format!("provided port is not in the valid range. The range of valid ports is {lo}-{hi}"),
                ));
            }
            if self.claim(format!("{PORT_PREFIX}{p}"), owner).await? {
                return Ok(p);
            }
            return Err(alloc_error(
                owner,
                field,
                p,
                "provided port is already allocated",
            ));
        }
        let n = (hi - lo + 1) as u32;
        let start = rand::random::<u32>() % n;
        for i in 0..n {
            let p = lo + ((start + i) % n) as u16;
            if self.claim(format!("{PORT_PREFIX}{p}"), owner).await? {
                return Ok(p);
            }
        }
        Err(ApiError::internal(format!(
            "no free node port left in {lo}-{hi}"
        )))
    }

    pub fn ip_key(ip: &str) -> String {
        format!("{IP_PREFIX}{ip}")
    }
    pub fn port_key(p: i64) -> String {
        format!("{PORT_PREFIX}{p}")
    }
}

fn needs_cluster_ip(spec: &Value) -> bool {
    spec["type"].as_str() != Some("ExternalName")
}

fn needs_node_ports(spec: &Value) -> bool {
    matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer"))
}

/// A LoadBalancer Service keeping external traffic on the node gets a port where each node
/// says whether it has endpoints (Kubernetes allocates it for no other type).
fn needs_health_check_port(spec: &Value) -> bool {
    spec["type"] == "LoadBalancer" && spec["externalTrafficPolicy"] == "Local"
}

fn node_ports(spec: &Value) -> Vec<i64> {
    spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["nodePort"].as_i64())
        .collect()
}

/// An update of a Service (`new`, before validation) against the stored one: keeps the cluster
/// IP the update leaves out, and drops the cluster IP, node ports and health check port that
/// the new type does not use, unless the update changed them itself (then validation says why
/// they cannot stay).
pub(crate) fn carry_over_service(new: &mut Value, old: &Value) {
    let (o, n) = (&old["spec"], &mut new["spec"]);
    if !n.is_object() {
        return;
    }
    if needs_cluster_ip(n) {
        if n["clusterIP"].as_str().is_none_or(str::is_empty) {
            if let Some(ip) = o["clusterIP"].as_str() {
                n["clusterIP"] = json!(ip);
                n["clusterIPs"] = o["clusterIPs"].clone();
            }
        }
    } else if needs_cluster_ip(o) {
        let same = |f: &str| n[f].is_null() || n[f] == o[f];
        if same("clusterIP") && same("clusterIPs") {
            let spec = n.as_object_mut().expect("checked above");
            for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                spec.remove(f);
            }
        }
    }
    if needs_node_ports(o)
        && !needs_node_ports(n)
        && node_ports(n).iter().all(|p| node_ports(o).contains(p))
    {
        for p in n["ports"].as_array_mut().into_iter().flatten() {
            if let Some(p) = p.as_object_mut() {
                p.remove("nodePort");
            }
        }
    }
    if needs_health_check_port(o)
        && !needs_health_check_port(n)
        && n["healthCheckNodePort"] == o["healthCheckNodePort"]
    {
        if let Some(spec) = n.as_object_mut() {
            spec.remove("healthCheckNodePort");
        }
    }
}

impl Api {
    /// Cluster IP and node ports of a Service being created or updated (`old`): keeps what
    /// the old object had, claims what is new; returns the claims made (released on failure).
    pub(super) async fn allocate_service(
        &self,
        obj: &mut Value,
        old: Option<&Value>,
        name: &str,
    ) -> ApiResult<Vec<String>> {
        let mut claims = Vec::new();
        let spec = &mut obj["spec"];
        let old_ip = old
            .and_then(|o| o["spec"]["clusterIP"].as_str())
            .map(String::from);
        if needs_cluster_ip(spec) {
            match (spec["clusterIP"].as_str(), &old_ip) {
                (Some("None"), _) => spec["clusterIPs"] = json!(["None"]),
                (None | Some(""), Some(ip)) => {
                    spec["clusterIP"] = json!(ip);
                    spec["clusterIPs"] = json!([ip]);
                }
                (Some(ip), Some(o)) if ip == o => {}
                (want, _) => {
                    let want: Option<Ipv4Addr> = match want {
                        None | Some("") => None,
                        Some(s) => Some(s.parse().map_err(|_| {
                            ApiError::invalid(
                                "Service",
                                "",
                                name,
                                vec![FieldError::invalid(
                                    "spec.clusterIPs[0]",
                                    format!("\"{s}\""),
                                    "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
                                )],
                            )
                        })?),
                    };
                    let ip = self.allocate_ip(want, name).await?;
                    claims.push(Api::ip_key(&ip.to_string()));
                    spec["clusterIP"] = json!(ip.to_string());
                    spec["clusterIPs"] = json!([ip.to_string()]);
                }
            }
        }
        let needs_ports = needs_node_ports(spec);
        let old_ports: Vec<i64> = old.map(|o| node_ports(&o["spec"])).unwrap_or_default();
        if let Some(ports) = spec["ports"].as_array_mut() {
            for (i, p) in ports.iter_mut().enumerate() {
                if !needs_ports {
                    continue;
                }
                let want = p["nodePort"].as_i64();
                match want {
                    Some(w) if old_ports.contains(&w) => {}
                    _ => {
                        let field = format!("spec.ports[{i}].nodePort");
                        let got = match self
                            .allocate_port(want.map(|w| w as u16), name, &field)
                            .await
                        {
                            Ok(g) => g,
                            Err(e) => {
                                for c in &claims {
                                    self.release(c.clone()).await;
                                }
                                return Err(e);
                            }
                        };
                        claims.push(Api::port_key(got as i64));
                        p["nodePort"] = json!(got);
                    }
                }
            }
        }
        if needs_health_check_port(spec) {
            let want = spec["healthCheckNodePort"].as_i64();
            let had = old.and_then(|o| o["spec"]["healthCheckNodePort"].as_i64());
            if want.is_none() || want != had {
                let field = "spec.healthCheckNodePort";
                match self
                    .allocate_port(want.map(|w| w as u16), name, field)
                    .await
                {
                    Ok(got) => {
                        claims.push(Api::port_key(got as i64));
                        spec["healthCheckNodePort"] = json!(got);
                    }
                    Err(e) => {
                        for c in &claims {
                            self.release(c.clone()).await;
                        }
                        return Err(e);
                    }
                }
            }
        }
        Ok(claims)
    }

    /// Releases what `old` held and `new` (if any) does not.
    pub(super) async fn release_service(&self, old: &Value, new: Option<&Value>) {
        let ip = |v: &Value| v["spec"]["clusterIP"].as_str().map(String::from);
        let ports = |v: &Value| -> Vec<i64> {
            let mut ports = node_ports(&v["spec"]);
            ports.extend(v["spec"]["healthCheckNodePort"].as_i64());
            ports
        };
        if let Some(o) = ip(old).filter(|o| o != "None") {
            if new.and_then(ip).as_deref() != Some(o.as_str()) {
                self.release(Api::ip_key(&o)).await;
            }
        }
        let keep = new.map(ports).unwrap_or_default();
        for p in ports(old) {
            if !keep.contains(&p) {
                self.release(Api::port_key(p)).await;
            }
        }
    }
}
