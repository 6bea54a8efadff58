//! A kubelet the end-to-end tests play: it registers nodes, renews their Leases, and runs
//! the pods bound to them in the simplest way that still makes them real to the rest of the
//! cluster.
//!
//! - On a node with pod namespaces (`Slot`s), a pod gets a free namespace, an echo server
//!   named after the pod on `ECHO_PORT`, and that namespace's IP. A deleted pod's server
//!   keeps answering for `SHUTDOWN_DELAY` (a preStop delay, as zero-downtime rollouts
//!   configure), then stops and the pod is removed.
//! - On a node without slots, a pod just gets an address from 10.244.<node>.0/24 and Ready.
//! - A pod that may finish (restartPolicy Never or OnFailure) finishes a moment after it
//!   started: Failed if a container's command or args say `exit 1`, Succeeded otherwise.
//!
//! The order pods started and were removed in is recorded for the tests' assertions.
#![allow(dead_code)] // each test file uses part of it

pub mod containerd;
pub mod raw;
pub mod registry;

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_testbed::controlplane::ControlPlane;
use ferry_testbed::echo::wait_listening;
use ferry_testbed::netns::Netns;
use ferry_testbed::{bin_path, ECHO_PORT};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

/// How long a deleted pod keeps serving before its server stops (its preStop delay).
pub const SHUTDOWN_DELAY: Duration = Duration::from_secs(1);
/// How long a pod that may finish runs.
const RUN_TIME: Duration = Duration::from_millis(300);

/// A pod namespace a node can run a pod in.
pub struct Slot {
    pub ns: Netns,
    pub ip: Ipv4Addr,
}

struct Running {
    node: String,
    slot: Option<usize>,
    server: Option<Child>,
    started: Instant,
    terminating_since: Option<Instant>,
}

impl Running {
    fn stop(&mut self) {
        if let Some(s) = self.server.as_mut() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

#[derive(Default)]
struct Record {
    /// Which node each pod runs on, by pod name.
    placement: HashMap<String, String>,
    /// Pod names in the order they started.
    started: Vec<String>,
    /// Pod names in the order they were removed.
    removed: Vec<String>,
}

pub struct TestKubelet {
    stop: Arc<AtomicBool>,
    alive: HashMap<String, Arc<AtomicBool>>,
    record: Arc<Mutex<Record>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn finishes(pod: &Pod) -> Option<&'static str> {
    let spec = pod.spec.as_ref()?;
    if spec.restart_policy.as_deref().unwrap_or("Always") == "Always" {
        return None;
    }
    let says_fail = spec.containers.iter().any(|c| {
        c.command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .any(|a| a.contains("exit 1"))
    });
    Some(if says_fail { "Failed" } else { "Succeeded" })
}

impl TestKubelet {
    /// `host`: the namespace the API server is reachable from (None: this one).
    /// `nodes`: each node's name and the pod namespaces it may use (empty: fake addresses).
    pub fn start(
        host: Option<&Netns>,
        kubeconfig: std::path::PathBuf,
        nodes: Vec<(String, Vec<Slot>)>,
    ) -> TestKubelet {
        let stop = Arc::new(AtomicBool::new(false));
        let alive: HashMap<String, Arc<AtomicBool>> = nodes
            .iter()
            .map(|(n, _)| (n.clone(), Arc::new(AtomicBool::new(true))))
            .collect();
        let record = Arc::new(Mutex::new(Record::default()));
        let (stop2, alive2, record2) = (stop.clone(), alive.clone(), record.clone());
        let (registered_tx, registered_rx) = std::sync::mpsc::channel();
        let host = host.map(|h| std::fs::File::open(h.path()).expect("host namespace"));
        let thread = std::thread::spawn(move || {
            if let Some(h) = host {
                use std::os::fd::AsRawFd;
                assert_eq!(
                    unsafe { libc::setns(h.as_raw_fd(), libc::CLONE_NEWNET) },
                    0,
                    "entering the API server's namespace"
                );
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run(
                kubeconfig,
                nodes,
                stop2,
                alive2,
                record2,
                registered_tx,
            ));
        });
        registered_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the test kubelet registered its nodes");
        TestKubelet {
            stop,
            alive,
            record,
            thread: Some(thread),
        }
    }

    /// The node's kubelet stops: no more Lease renewals, no more pod handling (its pods'
    /// servers keep running, as on a node cut off from the control plane).
    pub fn stop_heartbeat(&self, node: &str) {
        self.alive[node].store(false, Ordering::Relaxed);
    }

    pub fn node_of(&self, pod: &str) -> Option<String> {
        self.record.lock().unwrap().placement.get(pod).cloned()
    }

    /// Pods whose name starts with `prefix`, in the order they started.
    pub fn started(&self, prefix: &str) -> Vec<String> {
        self.names(prefix, |r| &r.started)
    }

    /// Pods whose name starts with `prefix`, in the order they were removed.
    pub fn removed(&self, prefix: &str) -> Vec<String> {
        self.names(prefix, |r| &r.removed)
    }

    fn names(&self, prefix: &str, list: impl Fn(&Record) -> &Vec<String>) -> Vec<String> {
        let r = self.record.lock().unwrap();
        list(&r)
            .iter()
            .filter(|p| p.starts_with(prefix))
            .cloned()
            .collect()
    }
}

impl Drop for TestKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run(
    kubeconfig: std::path::PathBuf,
    nodes: Vec<(String, Vec<Slot>)>,
    stop: Arc<AtomicBool>,
    alive: HashMap<String, Arc<AtomicBool>>,
    record: Arc<Mutex<Record>>,
    registered: std::sync::mpsc::Sender<()>,
) {
    let client = ferry_common::kubeconfig::client(&kubeconfig, "ferry-e2e")
        .await
        .expect("kubelet client");
    let node_api: Api<Node> = Api::all(client.clone());
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let now = || MicroTime(k8s_openapi::chrono::Utc::now());
    for (name, _) in &nodes {
        let node: Node = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}),
        )
        .unwrap();
        node_api
            .create(&PostParams::default(), &node)
            .await
            .expect("node");
        let status = json!({"status": {
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastHeartbeatTime": k8s_openapi::chrono::Utc::now()}]}});
        node_api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("node status");
        let lease: Lease = serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now()}}))
        .unwrap();
        lease_api
            .create(&PostParams::default(), &lease)
            .await
            .expect("lease");
    }
    let _ = registered.send(());
    let pod_api: Api<Pod> = Api::all(client.clone());
    let mut running: HashMap<String, Running> = HashMap::new();
    let echo = bin_path("ferry-echo").expect("ferry-echo");
    let mut next_ip = 0u32;
    while !stop.load(Ordering::Relaxed) {
        for (name, _) in &nodes {
            if alive[name].load(Ordering::Relaxed) {
                let _ = lease_api
                    .patch(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"spec": {"renewTime": now()}})),
                    )
                    .await;
            }
        }
        let Ok(pods) = pod_api.list(&ListParams::default()).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut present = BTreeSet::new();
        for pod in pods {
            let ns = pod.namespace().unwrap_or_default();
            let key = format!("{ns}/{}", pod.name_any());
            present.insert(key.clone());
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let Some((node_index, (_, slots))) =
                nodes.iter().enumerate().find(|(_, (n, _))| *n == node)
            else {
                continue;
            };
            if !alive[&node].load(Ordering::Relaxed) {
                continue; // a dead kubelet does nothing
            }
            let ns_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            if pod.metadata.deletion_timestamp.is_some() {
                let done = match running.get_mut(&key) {
                    Some(r) if r.server.is_some() => {
                        let since = *r.terminating_since.get_or_insert_with(Instant::now);
                        since.elapsed() >= SHUTDOWN_DELAY
                    }
                    _ => true,
                };
                if done {
                    if let Some(mut r) = running.remove(&key) {
                        r.stop();
                    }
                    let gone = ns_api
                        .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                        .await;
                    if gone.is_ok() {
                        record.lock().unwrap().removed.push(pod.name_any());
                    }
                }
                continue;
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
            if matches!(phase.as_deref(), Some("Succeeded") | Some("Failed")) {
                if let Some(mut r) = running.remove(&key) {
                    r.stop();
                }
                continue;
            }
            if let Some(r) = running.get_mut(&key) {
                if let Some(end) = finishes(&pod).filter(|_| r.started.elapsed() >= RUN_TIME) {
                    r.stop();
                    running.remove(&key);
                    let status = json!({"status": {"phase": end,
                        "conditions": [{"type": "Ready", "status": "False"}]}});
                    let _ = ns_api
                        .patch_status(
                            &pod.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(&status),
                        )
                        .await;
                }
                continue;
            }
            let (slot, server, ip) = if slots.is_empty() {
                next_ip += 1;
                let ip = Ipv4Addr::new(10, 244, node_index as u8, (next_ip % 250 + 1) as u8);
                (None, None, ip)
            } else {
                let used: BTreeSet<usize> = running
                    .values()
                    .filter(|r| r.node == node)
                    .filter_map(|r| r.slot)
                    .collect();
                let Some(slot) = (0..slots.len()).find(|i| !used.contains(i)) else {
                    continue; // the node is full: the pod stays Pending
                };
                let s = &slots[slot];
                let mut cmd = Command::new(&echo);
                cmd.args(["--name", &pod.name_any(), "--port", &ECHO_PORT.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                let server = s.ns.spawn(&mut cmd).expect("echo server");
                wait_listening(&s.ns, SocketAddrV4::new(s.ip, ECHO_PORT).into())
                    .expect("echo server listening");
                (Some(slot), Some(server), s.ip)
            };
            running.insert(
                key.clone(),
                Running {
                    node: node.clone(),
                    slot,
                    server,
                    started: Instant::now(),
                    terminating_since: None,
                },
            );
            {
                let mut r = record.lock().unwrap();
                r.placement.insert(pod.name_any(), node.clone());
                r.started.push(pod.name_any());
            }
            let status = json!({"status": {"phase": "Running", "podIP": ip.to_string(),
                "podIPs": [{"ip": ip.to_string()}],
                "conditions": [{"type": "PodScheduled", "status": "True"},
                               {"type": "Ready", "status": "True"},
                               {"type": "ContainersReady", "status": "True"}]}});
            let _ = ns_api
                .patch_status(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&status),
                )
                .await;
        }
        // Pods deleted outright (or evicted and force-deleted) stop running.
        let gone: Vec<String> = running
            .iter()
            .filter(|(k, r)| !present.contains(*k) && alive[&r.node].load(Ordering::Relaxed))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(mut r) = running.remove(&k) {
                r.stop();
                record
                    .lock()
                    .unwrap()
                    .removed
                    .push(k.rsplit('/').next().unwrap_or_default().to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for (_, mut r) in running {
        r.stop();
    }
}

pub fn apply(cp: &ControlPlane, yaml: &str) {
    let out = cp.kubectl_as(&cp.kubeconfig("admin"), &["apply", "-f", "-"], Some(yaml));
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
