//! `Table` responses (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`): the columns
//! `kubectl get` prints, computed by the server as Kubernetes' printers do. Columns with
//! priority 1 show under `-o wide`.

use serde_json::{json, Value};

use super::resources::ResourceInfo;

type Cell = Box<dyn Fn(&Value) -> Value>;

struct Col {
    name: &'static str,
    ty: &'static str,
    priority: u8,
    cell: Cell,
}

fn col(name: &'static str, priority: u8, cell: impl Fn(&Value) -> Value + 'static) -> Col {
    Col {
        name,
        ty: if [
            "Restarts",
            "Desired",
            "Current",
            "Up-to-date",
            "Available",
            "Data",
            "Active",
        ]
        .contains(&name)
        {
            "integer"
        } else {
            "string"
        },
        priority,
        cell: Box::new(cell),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn or_none(v: String) -> Value {
    if v.is_empty() {
        json!("<none>")
    } else {
        json!(v)
    }
}

fn i(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// `5m10s`, or `5m` when the smaller unit is zero.
fn pair(big: i64, big_unit: &str, small: i64, small_unit: &str) -> String {
    if small == 0 {
        format!("{big}{big_unit}")
    } else {
        format!("{big}{big_unit}{small}{small_unit}")
    }
}

/// Kubernetes' short human durations: 45s, 5m10s, 3h20m, 4d5h, 2y.
pub fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    if secs < 120 {
        return format!("{secs}s");
    }
    let m = secs / 60;
    if m < 10 {
        let s = secs % 60;
        return pair(m, "m", s, "s");
    }
    if m < 180 {
        return format!("{m}m");
    }
    let h = m / 60;
    if h < 8 {
        let mm = m % 60;
        return pair(h, "h", mm, "m");
    }
    if h < 48 {
        return format!("{h}h");
    }
    let d = h / 24;
    if d < 8 {
        let hh = h % 24;
        return pair(d, "d", hh, "h");
    }
    if d < 365 * 2 {
        return format!("{d}d");
    }
    format!("{}y", d / 365)
}

fn age_of(ts: &Value) -> String {
    let Some(t) = ts.as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok()) else {
        return "<unknown>".into();
    };
    human_duration(jiff::Timestamp::now().as_second() - t.as_second())
}

fn age() -> Col {
    col("Age", 0, |o| {
        json!(age_of(&o["metadata"]["creationTimestamp"]))
    })
}

fn name() -> Col {
    let mut c = col("Name", 0, |o| o["metadata"]["name"].clone());
    c.ty = "string";
    c
}

fn selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    let labels = sel.get("matchLabels").unwrap_or(sel);
    if let Some(m) = labels.as_object() {
        for (k, v) in m {
            if let Some(v) = v.as_str() {
                parts.push(format!("{k}={v}"));
            }
        }
    }
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let vals: Vec<String> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        let k = s(&e["key"]);
        parts.push(match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{k} in ({})", vals.join(",")),
            "NotIn" => format!("{k} notin ({})", vals.join(",")),
            "Exists" => k,
            _ => format!("!{k}"),
        });
    }
    parts.join(",")
}

fn containers(o: &Value) -> (String, String) {
    let cs = o["spec"]["template"]["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<String> = cs.iter().map(|c| s(&c["name"])).collect();
    let images: Vec<String> = cs.iter().map(|c| s(&c["image"])).collect();
    (names.join(","), images.join(","))
}

fn pod_status(o: &Value) -> String {
    if o["metadata"]["deletionTimestamp"].is_string() {
        return "Terminating".into();
    }
    let st = &o["status"];
    if let Some(r) = st["reason"].as_str() {
        return r.into();
    }
    for c in st["containerStatuses"].as_array().into_iter().flatten() {
        if let Some(r) = c["state"]["waiting"]["reason"].as_str() {
            return r.into();
        }
        if let Some(r) = c["state"]["terminated"]["reason"].as_str() {
            return r.into();
        }
    }
    if st["phase"].is_string() {
        s(&st["phase"])
    } else {
        "Pending".into()
    }
}

fn service_ports(o: &Value) -> String {
    let ports: Vec<String> = o["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64() {
                Some(np) => format!("{}:{np}/{proto}", p["port"]),
                None => format!("{}/{proto}", p["port"]),
            }
        })
        .collect();
    if ports.is_empty() {
        "<none>".into()
    } else {
        ports.join(",")
    }
}

fn columns(info: &ResourceInfo) -> Vec<Col> {
    match (info.group, info.plural) {
        ("", "pods") => vec![
            name(),
            col("Ready", 0, |o| {
                let cs = o["status"]["containerStatuses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let total = o["spec"]["containers"].as_array().map_or(0, |c| c.len());
                let ready = cs.iter().filter(|c| c["ready"] == true).count();
                json!(format!("{ready}/{total}"))
            }),
            col("Status", 0, |o| json!(pod_status(o))),
            col("Restarts", 0, |o| {
                json!(o["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| i(&c["restartCount"]))
                    .sum::<i64>())
            }),
            age(),
            col("IP", 1, |o| or_none(s(&o["status"]["podIP"]))),
            col("Node", 1, |o| or_none(s(&o["spec"]["nodeName"]))),
            col("Nominated Node", 1, |o| {
                or_none(s(&o["status"]["nominatedNodeName"]))
            }),
            col("Readiness Gates", 1, |o| {
                let g = o["spec"]["readinessGates"]
                    .as_array()
                    .map_or(0, |g| g.len());
                if g == 0 {
                    json!("<none>")
                } else {
                    json!(format!("0/{g}"))
                }
            }),
        ],
        ("", "services") => vec![
            name(),
            col("Type", 0, |o| o["spec"]["type"].clone()),
            col("Cluster-IP", 0, |o| or_none(s(&o["spec"]["clusterIP"]))),
            col("External-IP", 0, |o| {
                let ext: Vec<String> = o["spec"]["externalIPs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .chain(
                        o["status"]["loadBalancer"]["ingress"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|i| s(&i["ip"])),
                    )
                    .collect();
                match (o["spec"]["type"].as_str(), ext.is_empty()) {
                    (Some("ExternalName"), _) => o["spec"]["externalName"].clone(),
                    (Some("LoadBalancer"), true) => json!("<pending>"),
                    (_, true) => json!("<none>"),
                    _ => json!(ext.join(",")),
                }
            }),
            col("Port(s)", 0, |o| json!(service_ports(o))),
            age(),
            col("Selector", 1, |o| {
                or_none(selector_string(&o["spec"]["selector"]))
            }),
        ],
        ("apps", "deployments") => vec![
            name(),
            col("Ready", 0, |o| {
                json!(format!(
                    "{}/{}",
                    i(&o["status"]["readyReplicas"]),
                    i(&o["spec"]["replicas"])
                ))
            }),
            col("Up-to-date", 0, |o| {
                json!(i(&o["status"]["updatedReplicas"]))
            }),
            col("Available", 0, |o| {
                json!(i(&o["status"]["availableReplicas"]))
            }),
            age(),
            col("Containers", 1, |o| json!(containers(o).0)),
            col("Images", 1, |o| json!(containers(o).1)),
            col("Selector", 1, |o| {
                json!(selector_string(&o["spec"]["selector"]))
            }),
        ],
        ("apps", "replicasets") | ("", "replicationcontrollers") => vec![
            name(),
            col("Desired", 0, |o| json!(i(&o["spec"]["replicas"]))),
            col("Current", 0, |o| json!(i(&o["status"]["replicas"]))),
            col("Ready", 0, |o| json!(i(&o["status"]["readyReplicas"]))),
            age(),
            col("Containers", 1, |o| json!(containers(o).0)),
            col("Images", 1, |o| json!(containers(o).1)),
            col("Selector", 1, |o| {
                json!(selector_string(&o["spec"]["selector"]))
            }),
        ],
        ("apps", "daemonsets") => vec![
            name(),
            col("Desired", 0, |o| {
                json!(i(&o["status"]["desiredNumberScheduled"]))
            }),
            col("Current", 0, |o| {
                json!(i(&o["status"]["currentNumberScheduled"]))
            }),
            col("Ready", 0, |o| json!(i(&o["status"]["numberReady"]))),
            col("Up-to-date", 0, |o| {
                json!(i(&o["status"]["updatedNumberScheduled"]))
            }),
            col("Available", 0, |o| {
                json!(i(&o["status"]["numberAvailable"]))
            }),
            col("Node Selector", 0, |o| {
                or_none(selector_string(
                    &o["spec"]["template"]["spec"]["nodeSelector"],
                ))
            }),
            age(),
            col("Containers", 1, |o| json!(containers(o).0)),
            col("Images", 1, |o| json!(containers(o).1)),
        ],
        ("apps", "statefulsets") => vec![
            name(),
            col("Ready", 0, |o| {
                json!(format!(
                    "{}/{}",
                    i(&o["status"]["readyReplicas"]),
                    i(&o["spec"]["replicas"])
                ))
            }),
            age(),
            col("Containers", 1, |o| json!(containers(o).0)),
            col("Images", 1, |o| json!(containers(o).1)),
        ],
        ("batch", "jobs") => vec![
            name(),
            col("Status", 0, |o| {
                let conds = o["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let has = |t: &str| {
                    conds
                        .iter()
                        .any(|c| c["type"] == t && c["status"] == "True")
                };
                json!(if has("Complete") {
                    "Complete"
                } else if has("Failed") {
                    "Failed"
                } else if o["spec"]["suspend"] == true {
                    "Suspended"
                } else {
                    "Running"
                })
            }),
            col("Completions", 0, |o| {
                json!(format!(
                    "{}/{}",
                    i(&o["status"]["succeeded"]),
                    o["spec"]["completions"].as_i64().unwrap_or(1)
                ))
            }),
            col("Duration", 0, |o| {
                let t = |v: &Value| v.as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok());
                match t(&o["status"]["startTime"]) {
                    None => json!(""),
                    Some(start) => {
                        let end =
                            t(&o["status"]["completionTime"]).unwrap_or(jiff::Timestamp::now());
                        json!(human_duration(end.as_second() - start.as_second()))
                    }
                }
            }),
            age(),
        ],
        ("batch", "cronjobs") => vec![
            name(),
            col("Schedule", 0, |o| o["spec"]["schedule"].clone()),
            col("Timezone", 0, |o| or_none(s(&o["spec"]["timeZone"]))),
            col("Suspend", 0, |o| {
                json!(if o["spec"]["suspend"] == true {
                    "True"
                } else {
                    "False"
                })
            }),
            col("Active", 0, |o| {
                json!(o["status"]["active"].as_array().map_or(0, |a| a.len()))
            }),
            col("Last Schedule", 0, |o| {
                json!(if o["status"]["lastScheduleTime"].is_string() {
                    age_of(&o["status"]["lastScheduleTime"])
                } else {
                    "<none>".into()
                })
            }),
            age(),
        ],
        ("", "namespaces") => vec![
            name(),
            col("Status", 0, |o| o["status"]["phase"].clone()),
            age(),
        ],
        ("", "nodes") => vec![
            name(),
            col("Status", 0, |o| {
                let ready = o["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["type"] == "Ready");
                let mut st = match ready {
                    Some(c) if c["status"] == "True" => "Ready".to_string(),
                    Some(_) => "NotReady".to_string(),
                    None => "Unknown".to_string(),
                };
                if o["spec"]["unschedulable"] == true {
                    st.push_str(",SchedulingDisabled");
                }
                json!(st)
            }),
            col("Roles", 0, |o| {
                let roles: Vec<String> = o["metadata"]["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, _)| {
                        k.strip_prefix("node-role.kubernetes.io/").map(String::from)
                    })
                    .collect();
                or_none(roles.join(","))
            }),
            age(),
            col("Version", 0, |o| {
                o["status"]["nodeInfo"]["kubeletVersion"].clone()
            }),
            col("Internal-IP", 1, |o| {
                or_none(
                    o["status"]["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["type"] == "InternalIP")
                        .map(|a| s(&a["address"]))
                        .unwrap_or_default(),
                )
            }),
        ],
        ("", "endpoints") => vec![
            name(),
            col("Endpoints", 0, |o| {
                let mut eps = Vec::new();
                for sub in o["subsets"].as_array().into_iter().flatten() {
                    for a in sub["addresses"].as_array().into_iter().flatten() {
                        for p in sub["ports"].as_array().into_iter().flatten() {
                            eps.push(format!("{}:{}", s(&a["ip"]), p["port"]));
                        }
                    }
                }
                let more = eps.len().saturating_sub(3);
                eps.truncate(3);
                let mut out = eps.join(",");
                if more > 0 {
                    out.push_str(&format!(" + {more} more..."));
                }
                or_none(out)
            }),
            age(),
        ],
        ("discovery.k8s.io", "endpointslices") => vec![
            name(),
            col("AddressType", 0, |o| o["addressType"].clone()),
            col("Ports", 0, |o| {
                let p: Vec<String> = o["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| s(&p["port"]))
                    .collect();
                or_none(p.join(","))
            }),
            col("Endpoints", 0, |o| {
                let a: Vec<String> = o["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                    .map(|a| s(&a))
                    .collect();
                or_none(a.join(","))
            }),
            age(),
        ],
        ("", "configmaps") => vec![
            name(),
            col("Data", 0, |o| {
                json!(
                    o["data"].as_object().map_or(0, |d| d.len())
                        + o["binaryData"].as_object().map_or(0, |d| d.len())
                )
            }),
            age(),
        ],
        ("", "secrets") => vec![
            name(),
            col("Type", 0, |o| o["type"].clone()),
            col("Data", 0, |o| {
                json!(o["data"].as_object().map_or(0, |d| d.len()))
            }),
            age(),
        ],
        ("", "events") => vec![
            col("Last Seen", 0, |o| {
                let t = if o["lastTimestamp"].is_string() {
                    &o["lastTimestamp"]
                } else {
                    &o["eventTime"]
                };
                json!(age_of(t))
            }),
            col("Type", 0, |o| o["type"].clone()),
            col("Reason", 0, |o| o["reason"].clone()),
            col("Object", 0, |o| {
                json!(format!(
                    "{}/{}",
                    s(&o["involvedObject"]["kind"]).to_lowercase(),
                    s(&o["involvedObject"]["name"])
                ))
            }),
            col("Message", 0, |o| o["message"].clone()),
        ],
        ("coordination.k8s.io", "leases") => vec![
            name(),
            col("Holder", 0, |o| json!(s(&o["spec"]["holderIdentity"]))),
            age(),
        ],
        ("scheduling.k8s.io", "priorityclasses") => vec![
            name(),
            col("Value", 0, |o| o["value"].clone()),
            col("Global-Default", 0, |o| json!(o["globalDefault"] == true)),
            age(),
            col("PreemptionPolicy", 0, |o| {
                json!(o["preemptionPolicy"]
                    .as_str()
                    .unwrap_or("PreemptLowerPriority"))
            }),
        ],
        ("networking.k8s.io", "ingresses") => vec![
            name(),
            col("Class", 0, |o| {
                json!(o["spec"]["ingressClassName"].as_str().unwrap_or("<none>"))
            }),
            col("Hosts", 0, |o| {
                let hosts: Vec<String> = o["spec"]["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| r["host"].as_str().unwrap_or("*").to_string())
                    .collect();
                json!(if hosts.is_empty() {
                    "*".to_string()
                } else {
                    hosts.join(",")
                })
            }),
            col("Address", 0, |o| {
                let a: Vec<String> = o["status"]["loadBalancer"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| {
                        i["ip"]
                            .as_str()
                            .or(i["hostname"].as_str())
                            .map(String::from)
                    })
                    .collect();
                json!(a.join(","))
            }),
            col("Ports", 0, |o| {
                json!(
                    if o["spec"]["tls"].as_array().is_some_and(|t| !t.is_empty()) {
                        "80, 443"
                    } else {
                        "80"
                    }
                )
            }),
            age(),
        ],
        ("networking.k8s.io", "ingressclasses") => vec![
            name(),
            col("Controller", 0, |o| json!(s(&o["spec"]["controller"]))),
            col("Parameters", 0, |o| {
                let p = &o["spec"]["parameters"];
                json!(if p.is_object() {
                    format!("{}/{}", s(&p["kind"]), s(&p["name"]))
                } else {
                    "<none>".into()
                })
            }),
            age(),
        ],
        ("policy", "poddisruptionbudgets") => vec![
            name(),
            col("Min Available", 0, |o| {
                json!(or_dash(&o["spec"]["minAvailable"]))
            }),
            col("Max Unavailable", 0, |o| {
                json!(or_dash(&o["spec"]["maxUnavailable"]))
            }),
            col("Allowed Disruptions", 0, |o| {
                json!(o["status"]["disruptionsAllowed"].as_i64().unwrap_or(0))
            }),
            age(),
        ],
        ("", "resourcequotas") => vec![
            name(),
            age(),
            col("Request", 0, |o| json!(quota(o, false))),
            col("Limit", 0, |o| json!(quota(o, true))),
        ],
        ("autoscaling", "horizontalpodautoscalers") => vec![
            name(),
            col("Reference", 0, |o| {
                let r = &o["spec"]["scaleTargetRef"];
                json!(format!("{}/{}", s(&r["kind"]), s(&r["name"])))
            }),
            col("MinPods", 0, |o| {
                json!(o["spec"]["minReplicas"].as_i64().unwrap_or(1))
            }),
            col("MaxPods", 0, |o| o["spec"]["maxReplicas"].clone()),
            col("Replicas", 0, |o| {
                json!(o["status"]["currentReplicas"].as_i64().unwrap_or(0))
            }),
            age(),
        ],
        _ => vec![name(), age()],
    }
}

fn or_dash(v: &Value) -> String {
    match v {
        Value::Null => "N/A".into(),
        other => s(other),
    }
}

/// A ResourceQuota's `used/hard` pairs, requests (or limits) as kubectl shows them.
fn quota(o: &Value, limits: bool) -> String {
    let hard = o["status"]["hard"]
        .as_object()
        .or(o["spec"]["hard"].as_object())
        .cloned()
        .unwrap_or_default();
    let mut out: Vec<String> = hard
        .iter()
        .filter(|(k, _)| k.starts_with("limits.") == limits)
        .map(|(k, h)| {
            let used = o["status"]["used"][k.as_str()].as_str().unwrap_or("0");
            format!("{k}: {used}/{}", s(h))
        })
        .collect();
    out.sort();
    out.join(", ")
}

/// A Table of `objects`, each row carrying its metadata (for `--show-labels` and `-w`).
pub fn table(info: &ResourceInfo, objects: &[Value], list_meta: Value) -> Value {
    let cols = columns(info);
    let defs: Vec<Value> = cols
        .iter()
        .map(|c| {
            json!({"name": c.name, "type": c.ty, "format": if c.name == "Name" { "name" } else { "" },
                   "description": "", "priority": c.priority})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let cells: Vec<Value> = cols.iter().map(|c| (c.cell)(o)).collect();
            // The row's metadata without the field manager's records (as Kubernetes: no
            // table shows them, and they are most of the metadata's bytes).
            let mut meta = o["metadata"].clone();
            if let Some(m) = meta.as_object_mut() {
                m.remove("managedFields");
            }
            json!({"cells": cells, "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": meta}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta,
           "columnDefinitions": defs, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::find;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(130), "2m10s");
        assert_eq!(human_duration(3600 * 3 + 60 * 20), "3h20m");
        assert_eq!(human_duration(86400 * 3 + 3600 * 2), "3d2h");
    }

    #[test]
    fn pod_and_service_rows() {
        let pod = json!({"metadata": {"name": "web-1", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.244.0.5",
                "containerStatuses": [{"ready": true, "restartCount": 2}, {"ready": false, "restartCount": 1}]}});
        let t = table(find("", "v1", "pods").unwrap(), &[pod], json!({}));
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web-1");
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[3], 3);
        assert_eq!(cells[5], "10.244.0.5");
        assert_eq!(t["columnDefinitions"][5]["priority"], 1);
        let svc = json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
            "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}], "selector": {"app": "web"}}});
        let t = table(find("", "v1", "services").unwrap(), &[svc], json!({}));
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[1], "NodePort");
        assert_eq!(cells[2], "10.96.0.10");
        assert_eq!(cells[3], "<none>");
        assert_eq!(cells[4], "80:30080/TCP");
        assert_eq!(cells[6], "app=web");
    }
}
