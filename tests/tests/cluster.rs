//! The whole control loop in network namespaces: API server, controller manager, scheduler
//! and `ferry-proxy`, with real TCP traffic to a ClusterIP through the kernel datapath.
//!
//! The test plays the kubelet of two nodes (`common::TestKubelet`): each pod bound to one
//! gets an echo server named after it in a free pod namespace of that node; a deleted pod's
//! server keeps answering for a second (a preStop delay) and then stops, so a request routed
//! to a pod after that fails.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{apply, eventually, Slot, TestKubelet, SHUTDOWN_DELAY};
use ferry_testbed::controlplane::ControlPlane;
use ferry_testbed::echo::{servers_seen, tcp_ask};
use ferry_testbed::netns::Netns;
use ferry_testbed::{in_netns, Topology, ECHO_PORT};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

/// Which servers answer `n` requests to the Service (failed requests are left out).
fn servers(client: &Netns, n: usize) -> BTreeSet<String> {
    let to: SocketAddr = SocketAddrV4::new(VIP, 80).into();
    servers_seen(client, to, n, Duration::from_millis(500))
}

/// Names of the pods of app=web that are Ready.
fn ready_pods(cp: &ControlPlane) -> BTreeSet<String> {
    let out = cp
        .ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}={.metadata.deletionTimestamp}={.status.conditions[?(@.type=="Ready")].status} {end}"#,
        ])
        .unwrap_or_default();
    out.split_whitespace()
        .filter_map(|e| {
            let mut it = e.split('=');
            match (it.next(), it.next(), it.next()) {
                (Some(name), Some(""), Some("True")) => Some(name.to_string()),
                _ => None,
            }
        })
        .collect()
}

/// Waits until the Service is served by exactly the ready pods, `count` of them, and returns them.
fn wait_served_by_ready(
    cp: &ControlPlane,
    client: &Netns,
    count: usize,
    what: &str,
) -> BTreeSet<String> {
    let mut last = (BTreeSet::new(), BTreeSet::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = ready_pods(cp);
        if ready.len() == count {
            let got = servers(client, 8 * count.max(1));
            if got == ready {
                return ready;
            }
            last = (ready, got);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: want {count} ready pods serving; last saw ready {:?}, serving {:?}",
            last.0,
            last.1
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Sends requests to the Service one after another until stopped (at most `limit`), and
/// returns (answered, failures with their errors).
fn steady_traffic(
    client: &Netns,
    stop: Arc<AtomicBool>,
    limit: usize,
) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    let client = client.clone();
    std::thread::spawn(move || {
        let to: SocketAddr = SocketAddrV4::new(VIP, 80).into();
        in_netns(&client, move || {
            let (mut ok, mut failed) = (0, Vec::new());
            for _ in 0..limit {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match tcp_ask(to, Duration::from_secs(2)) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{e:#}")),
                }
            }
            (ok, failed)
        })
        .unwrap()
    })
}

fn deployment(replicas: usize, image: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: default}}
spec:
  replicas: {replicas}
  selector: {{matchExpressions: [{{key: app, operator: In, values: [web]}}]}}
  strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 30
      tolerations:
      - {{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}}
      - {{key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}}
      containers:
      - name: c
        image: {image}
        ports: [{{name: http, containerPort: {ECHO_PORT}}}]
        resources: {{requests: {{cpu: 100m, memory: 64Mi}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: http}}]
"#
    )
}

#[test]
fn deployments_are_scheduled_served_rolled_and_moved_off_a_dead_node() {
    // Pod namespaces 0..4 belong to node-a, 4..8 to node-b; 8 is the client.
    let mut t = Topology::new(9).expect("topology");
    let client = t.pods[8].ns.clone();
    let cp = ControlPlane::start_in(Some(&t.node.name), &[]).expect("control plane");
    let _controllers = cp
        .spawn_controllers(&[
            "--node-monitor-grace-period=3s",
            "--node-monitor-period=500ms",
        ])
        .expect("controllers");
    let slots = |r: std::ops::Range<usize>| -> Vec<Slot> {
        r.map(|i| Slot {
            ns: t.pods[i].ns.clone(),
            ip: t.pods[i].ip,
        })
        .collect()
    };
    let kubelet = TestKubelet::start(
        Some(&t.node),
        cp.kubeconfig("admin"),
        vec![
            ("node-a".into(), slots(0..4)),
            ("node-b".into(), slots(4..8)),
        ],
    );
    let _proxy = t
        .start_proxy_api(&cp.kubeconfig("kube-proxy"))
        .expect("ferry-proxy");

    // Apply: pods are scheduled over both nodes, endpoints appear, every replica serves.
    apply(&cp, &deployment(3, "ferry/echo:1"));
    let st = cp
        .ok(&["rollout", "status", "deploy/web", "--timeout=60s"])
        .unwrap();
    assert!(st.contains("successfully rolled out"), "{st}");
    let first = wait_served_by_ready(&cp, &client, 3, "after apply");
    let nodes: BTreeSet<String> = first.iter().filter_map(|p| kubelet.node_of(p)).collect();
    assert_eq!(
        nodes.len(),
        2,
        "the scheduler spreads three pods over both nodes: {first:?} on {nodes:?}"
    );
    let describe = cp
        .ok(&["describe", "pod", first.iter().next().unwrap()])
        .unwrap();
    assert!(
        describe.contains("Scheduled") && describe.contains("Successfully assigned default/"),
        "{describe}"
    );

    // A rolling update under steady traffic loses no request.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = steady_traffic(&client, stop.clone(), 1_000_000);
    cp.ok(&["set", "image", "deploy/web", "c=ferry/echo:2"])
        .unwrap();
    let st = cp
        .ok(&["rollout", "status", "deploy/web", "--timeout=90s"])
        .unwrap();
    assert!(st.contains("successfully rolled out"), "{st}");
    let second = wait_served_by_ready(&cp, &client, 3, "after the rolling update");
    assert!(
        first.is_disjoint(&second),
        "every pod was replaced: {first:?} then {second:?}"
    );
    std::thread::sleep(SHUTDOWN_DELAY * 2); // the old pods' servers are gone by now
    stop.store(true, Ordering::Relaxed);
    let (answered, failed) = traffic.join().unwrap();
    eprintln!(
        "rolling update: {answered} requests answered, {} failed; {first:?} -> {second:?}",
        failed.len()
    );
    assert!(
        answered > 100,
        "only {answered} requests were answered during the rollout"
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rolling update, first: {:?}",
        failed.len(),
        answered + failed.len(),
        failed.first()
    );

    // node-b's kubelet goes silent: its pods stop getting traffic, then are evicted and
    // replaced on node-a.
    let on_b: BTreeSet<String> = second
        .iter()
        .filter(|p| kubelet.node_of(p).as_deref() == Some("node-b"))
        .cloned()
        .collect();
    assert!(!on_b.is_empty(), "some pods run on node-b: {second:?}");
    kubelet.stop_heartbeat("node-b");
    eventually("node-b marked Unknown", Duration::from_secs(30), || {
        cp.ok(&[
            "get",
            "node",
            "node-b",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
        ])
        .is_ok_and(|s| s == "Unknown")
    });
    eventually("traffic leaves node-b", Duration::from_secs(30), || {
        let got = servers(&client, 24);
        !got.is_empty() && got.is_disjoint(&on_b)
    });
    let third = wait_served_by_ready(&cp, &client, 3, "after node-b went silent");
    for p in &third {
        assert_eq!(
            kubelet.node_of(p).as_deref(),
            Some("node-a"),
            "{p} of {third:?}"
        );
    }
    eprintln!("after node-b went silent: {third:?}");
    let taints = cp
        .ok(&[
            "get",
            "node",
            "node-b",
            "-o",
            "jsonpath={.spec.taints[*].key}",
        ])
        .unwrap();
    assert!(
        taints.contains("node.kubernetes.io/unreachable"),
        "{taints}"
    );
    let evicted = cp
        .ok(&[
            "get",
            "events",
            "--field-selector",
            "reason=TaintManagerEviction",
            "-o",
            "name",
        ])
        .unwrap();
    assert!(!evicted.trim().is_empty(), "eviction events");

    // Scale to zero: nothing answers; and back.
    cp.ok(&["scale", "deploy/web", "--replicas=0"]).unwrap();
    eventually("no ready pods", Duration::from_secs(30), || {
        ready_pods(&cp).is_empty()
    });
    eventually("nothing answers", Duration::from_secs(30), || {
        servers(&client, 4).is_empty()
    });
    cp.ok(&["scale", "deploy/web", "--replicas=2"]).unwrap();
    wait_served_by_ready(&cp, &client, 2, "after scaling back to 2");

    // Bad input: clear Status messages from the API server.
    let bad = deployment(1, "x").replace(
        "selector: {matchExpressions: [{key: app, operator: In, values: [web]}]}",
        "selector: {matchLabels: {app: other}}",
    );
    let out = cp.kubectl_as(&cp.kubeconfig("admin"), &["apply", "-f", "-"], Some(&bad));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("`selector` does not match template `labels`"),
        "{err}"
    );
    let bad = deployment(1, "x").replace("operator: In", "operator: Within");
    let out = cp.kubectl_as(&cp.kubeconfig("admin"), &["apply", "-f", "-"], Some(&bad));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("spec.selector"),
        "{err}"
    );

    // An impossible pod stays Pending, and says why.
    apply(
        &cp,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: huge, namespace: default}\nspec:\n  containers: [{name: c, image: 'ferry/echo:1', resources: {requests: {cpu: '64'}}}]\n",
    );
    eventually(
        "FailedScheduling for the huge pod",
        Duration::from_secs(30),
        || {
            cp.ok(&["describe", "pod", "huge"]).is_ok_and(|d| {
                d.contains("FailedScheduling")
                    && d.contains("0/2 nodes are available")
                    && d.contains("Insufficient cpu")
            })
        },
    );
    let phase = cp
        .ok(&["get", "pod", "huge", "-o", "jsonpath={.status.phase}"])
        .unwrap();
    assert_eq!(phase, "Pending");
    let cond = cp
        .ok(&[
            "get",
            "pod",
            "huge",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="PodScheduled")].reason}"#,
        ])
        .unwrap();
    assert_eq!(cond, "Unschedulable");
    drop(kubelet);
}

#[test]
fn a_standby_scheduler_takes_over_when_the_leader_dies() {
    let cp = ControlPlane::start(&[]).expect("control plane");
    let sched = |_: usize| {
        cp.spawn_component(&[
            "scheduler",
            "--kubeconfig",
            cp.kubeconfig("scheduler").to_str().unwrap(),
            "--leader-elect-lease-duration=3s",
        ])
        .expect("scheduler")
    };
    let mut first = Some(sched(0));
    let holder = || {
        cp.ok(&[
            "get",
            "lease",
            "-n",
            "kube-system",
            "kube-scheduler",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .unwrap_or_default()
    };
    eventually("a leader", Duration::from_secs(20), || !holder().is_empty());
    let leader = holder();
    let _second = sched(1);
    let node = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n";
    apply(&cp, node);
    cp.ok(&[
        "patch", "node", "n1", "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"allocatable":{"cpu":"4","memory":"8Gi","pods":"110"},"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ])
    .unwrap();
    let pod = |name: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec: {{containers: [{{name: c, image: 'ferry/echo:1'}}]}}\n")
    };
    let bound = |name: &str| {
        cp.ok(&["get", "pod", name, "-o", "jsonpath={.spec.nodeName}"])
            .is_ok_and(|n| n == "n1")
    };
    apply(&cp, &pod("before"));
    eventually("the leader binds a pod", Duration::from_secs(20), || {
        bound("before")
    });
    assert_eq!(
        holder(),
        leader,
        "the standby did not take the lease from a live leader"
    );

    // Kill the leader; the standby takes over within the lease duration (and its retries).
    drop(first.take());
    let killed = Instant::now();
    eventually("a new leader", Duration::from_secs(20), || {
        let h = holder();
        !h.is_empty() && h != leader
    });
    let took = killed.elapsed();
    apply(&cp, &pod("after"));
    eventually(
        "the new leader binds a pod",
        Duration::from_secs(20),
        || bound("after"),
    );
    let transitions = cp
        .ok(&[
            "get",
            "lease",
            "-n",
            "kube-system",
            "kube-scheduler",
            "-o",
            "jsonpath={.spec.leaseTransitions}",
        ])
        .unwrap();
    assert_eq!(transitions, "1");
    eprintln!("takeover after {took:?}");
}
