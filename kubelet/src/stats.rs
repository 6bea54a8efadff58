//! Resource usage at `/stats/summary`, in the shape of the kubelet's summary API (what
//! metrics-server reads; the API server's `metrics.k8s.io` serves `kubectl top` from it): each
//! running container's CPU in cores, from the runtime's cumulative CPU time (CRI
//! ListContainerStats) sampled every interval, and its memory working set; the sums per pod;
//! the node's CPU from /proc/stat and memory (total less available) from /proc/meminfo. A
//! container seen once has no rate yet and is left out until the next sample.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use k8s_openapi::chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::cri::{v1 as api, Cri};

/// How often containers and the node are sampled (the kubelet's housekeeping interval; a rate
/// spans two samples).
pub const EVERY: Duration = Duration::from_secs(10);

/// One container's usage as last computed.
#[derive(Clone, Debug, PartialEq)]
struct Usage {
    namespace: String,
    pod: String,
    uid: String,
    container: String,
    nano_cores: u64,
    cpu_ns: u64,
    working_set: u64,
}

#[derive(Default)]
struct Sampled {
    /// Container id -> (time ns, cumulative CPU ns) of the previous sample.
    prev: HashMap<String, (i64, u64)>,
    containers: Vec<Usage>,
    /// (when, busy CPU ns since boot) of the previous node sample.
    prev_node: Option<(std::time::Instant, u64)>,
    node: Option<(u64, u64, u64)>,
    at: Option<DateTime<Utc>>,
}

#[derive(Clone, Default)]
pub struct Stats {
    node_name: String,
    inner: Arc<Mutex<Sampled>>,
}

/// CPU cores between two cumulative samples, in nanocores.
fn rate(prev: (i64, u64), now: (i64, u64)) -> Option<u64> {
    let dt = now.0.checked_sub(prev.0).filter(|d| *d > 0)? as u128;
    let dcpu = now.1.checked_sub(prev.1)? as u128;
    Some((dcpu * 1_000_000_000 / dt) as u64)
}

/// Busy CPU time since boot, in ns, from /proc/stat's first line (all but idle and iowait).
fn node_busy_ns(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let busy = total - v[3] - v[4];
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as u64,
        _ => 100,
    };
    Some(busy * (1_000_000_000 / hz))
}

/// Memory in use (MemTotal less MemAvailable), bytes.
fn node_working_set(meminfo: &str) -> Option<u64> {
    let kb = |key: &str| -> Option<u64> {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((kb("MemTotal:")?.checked_sub(kb("MemAvailable:")?)?) * 1024)
}

impl Stats {
    pub fn new(node_name: &str) -> Self {
        Stats {
            node_name: node_name.to_string(),
            inner: Default::default(),
        }
    }

    /// Takes one sample of every container and of the node.
    pub async fn sample(&self, cri: &mut Cri) -> anyhow::Result<()> {
        let list = cri
            .runtime
            .list_container_stats(api::ListContainerStatsRequest { filter: None })
            .await?
            .into_inner()
            .stats;
        let busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| node_busy_ns(&s));
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| node_working_set(&s));
        let now = std::time::Instant::now();
        let mut st = self.inner.lock().unwrap();
        let mut prev = HashMap::new();
        let mut containers = Vec::new();
        for s in list {
            let Some(a) = s.attributes else { continue };
            let label = |k: &str| a.labels.get(k).cloned().unwrap_or_default();
            let Some(cpu) = s.cpu.as_ref() else { continue };
            let Some(cpu_ns) = cpu.usage_core_nano_seconds.as_ref().map(|v| v.value) else {
                continue;
            };
            let sample = (cpu.timestamp, cpu_ns);
            let working_set = s
                .memory
                .as_ref()
                .and_then(|m| m.working_set_bytes.as_ref())
                .map_or(0, |v| v.value);
            if let Some(nano_cores) = st.prev.get(&a.id).and_then(|p| rate(*p, sample)) {
                containers.push(Usage {
                    namespace: label("io.kubernetes.pod.namespace"),
                    pod: label("io.kubernetes.pod.name"),
                    uid: label("io.kubernetes.pod.uid"),
                    container: label("io.kubernetes.container.name"),
                    nano_cores,
                    cpu_ns,
                    working_set,
                });
            }
            prev.insert(a.id, sample);
        }
        st.prev = prev;
        st.containers = containers;
        if let Some(busy) = busy {
            let node_rate = st.prev_node.and_then(|(t, b)| {
                let dt = now.duration_since(t).as_nanos();
                (dt > 0).then(|| (busy.saturating_sub(b) as u128 * 1_000_000_000 / dt) as u64)
            });
            st.node = node_rate.map(|r| (r, busy, mem.unwrap_or(0)));
            st.prev_node = Some((now, busy));
        }
        st.at = Some(Utc::now());
        Ok(())
    }

    /// The summary as the kubelet's `/stats/summary` shapes it.
    pub fn summary(&self) -> Value {
        let st = self.inner.lock().unwrap();
        let time = st.at.map(|t| t.to_rfc3339()).unwrap_or_default();
        let usage = |cores: u64, cpu_ns: u64, ws: u64| {
            json!({"cpu": {"time": time, "usageNanoCores": cores, "usageCoreNanoSeconds": cpu_ns},
                   "memory": {"time": time, "workingSetBytes": ws}})
        };
        let mut node = json!({"nodeName": self.node_name});
        if let Some((cores, busy, ws)) = st.node {
            let u = usage(cores, busy, ws);
            node["cpu"] = u["cpu"].clone();
            node["memory"] = u["memory"].clone();
        }
        // (namespace, name, uid) and the pod's containers, in the order first seen.
        type PodKey = (String, String, String);
        let mut pods: Vec<(PodKey, Vec<&Usage>)> = Vec::new();
        for c in &st.containers {
            let key = (c.namespace.clone(), c.pod.clone(), c.uid.clone());
            match pods.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(c),
                None => pods.push((key, vec![c])),
            }
        }
        let pods: Vec<Value> = pods
            .into_iter()
            .map(|((ns, name, uid), cs)| {
                let sum = |f: fn(&Usage) -> u64| cs.iter().map(|c| f(c)).sum::<u64>();
                let total = usage(
                    sum(|c| c.nano_cores),
                    sum(|c| c.cpu_ns),
                    sum(|c| c.working_set),
                );
                let containers: Vec<Value> = cs
                    .iter()
                    .map(|c| {
                        let mut v = usage(c.nano_cores, c.cpu_ns, c.working_set);
                        v["name"] = json!(c.container);
                        v
                    })
                    .collect();
                json!({"podRef": {"name": name, "namespace": ns, "uid": uid},
                       "cpu": total["cpu"], "memory": total["memory"], "containers": containers})
            })
            .collect();
        json!({"node": node, "pods": pods})
    }
}

/// Samples every `every` until the runtime's socket goes away for good (the kubelet's life).
pub async fn run(stats: Stats, mut cri: Cri, every: Duration) {
    loop {
        if let Err(e) = stats.sample(&mut cri).await {
            tracing::debug!(error = %format!("{e:#}"), "sampling container stats");
        }
        tokio::time::sleep(every).await;
    }
}

pub async fn summary(State(stats): State<Stats>) -> Response {
    axum::Json(stats.summary()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_node_figures() {
        // 0.5 s of CPU in 2 s: a quarter of a core.
        assert_eq!(
            rate((0, 0), (2_000_000_000, 500_000_000)),
            Some(250_000_000)
        );
        assert_eq!(rate((5, 0), (5, 10)), None, "no time passed");
        assert_eq!(
            rate((0, 10), (1, 5)),
            None,
            "a restarted container's counter"
        );
        let stat = "cpu  100 0 50 1000 10 0 0 0 0 0\ncpu0 1 2 3 4 5\n";
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        assert_eq!(node_busy_ns(stat), Some(150 * (1_000_000_000 / hz)));
        let mem = "MemTotal:       1000 kB\nMemFree:  10 kB\nMemAvailable:    400 kB\n";
        assert_eq!(node_working_set(mem), Some(600 * 1024));
    }
}
