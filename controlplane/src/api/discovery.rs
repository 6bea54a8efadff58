//! Discovery (/api, /apis, group versions, /version); the OpenAPI documents are in
//! `openapi.rs`.

use serde_json::{json, Value};

use super::resource_metrics;
use super::resources::{groups, in_group_version};

pub const KUBE_VERSION: &str = "v1.32.0";

pub fn version() -> Value {
    json!({"major": "1", "minor": "32", "gitVersion": format!("{KUBE_VERSION}+ferry"),
           "gitCommit": env!("CARGO_PKG_VERSION"), "gitTreeState": "clean",
           "buildDate": "2026-01-01T00:00:00Z", "goVersion": "n/a (rust)",
           "compiler": "rustc", "platform": "linux/amd64"})
}

pub fn api_versions(addr: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
           "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]})
}

fn group_json(name: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/{version}"), "version": version});
    json!({"name": name, "versions": [gv.clone()], "preferredVersion": gv})
}

/// The groups discovery lists: the served resources' and the resource metrics API's.
fn all_groups() -> Vec<(&'static str, &'static str)> {
    let mut g = groups();
    g.push((resource_metrics::GROUP, resource_metrics::VERSION));
    g
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = all_groups().iter().map(|(g, v)| group_json(g, v)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(name: &str) -> Option<Value> {
    all_groups().iter().find(|(g, _)| *g == name).map(|(g, v)| {
        let mut j = group_json(g, v);
        j["kind"] = json!("APIGroup");
        j["apiVersion"] = json!("v1");
        j
    })
}

fn verbs() -> Value {
    json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ])
}

pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    if (group, version) == (resource_metrics::GROUP, resource_metrics::VERSION) {
        return Some(resource_metrics::resource_list());
    }
    let rs = in_group_version(group, version);
    if rs.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for r in rs {
        let v = if r.create_only {
            json!(["create"])
        } else {
            verbs()
        };
        let mut main = json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": v});
        if !r.short_names.is_empty() {
            main["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            main["categories"] = json!(r.categories);
        }
        out.push(main);
        for sub in r.subresources {
            let (kind, extra, v) = match *sub {
                "scale" => (
                    "Scale",
                    json!({"group": "autoscaling", "version": "v1"}),
                    json!(["get", "patch", "update"]),
                ),
                "binding" => ("Binding", json!({}), json!(["create"])),
                "eviction" => (
                    "Eviction",
                    json!({"group": "policy", "version": "v1"}),
                    json!(["create"]),
                ),
                "token" => (
                    "TokenRequest",
                    json!({"group": "authentication.k8s.io", "version": "v1"}),
                    json!(["create"]),
                ),
                "log" => ("Pod", json!({}), json!(["get"])),
                "exec" => ("PodExecOptions", json!({}), json!(["create", "get"])),
                "attach" => ("PodAttachOptions", json!({}), json!(["create", "get"])),
                "portforward" => ("PodPortForwardOptions", json!({}), json!(["create", "get"])),
                "finalize" => (r.kind, json!({}), json!(["update"])),
                _ => (r.kind, json!({}), json!(["get", "patch", "update"])),
            };
            let mut s = json!({"name": format!("{}/{sub}", r.plural), "singularName": "",
                "namespaced": r.namespaced, "kind": kind, "verbs": v});
            if let (Some(m), Some(e)) = (s.as_object_mut(), extra.as_object()) {
                m.extend(e.clone());
            }
            out.push(s);
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}),
    )
}
