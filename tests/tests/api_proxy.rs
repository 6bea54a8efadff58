//! `ferry-proxy --kubeconfig`: the node daemon fed live from the API server instead of a
//! file, with real TCP traffic through the kernel datapath. The control plane runs in the
//! node's network namespace (on its loopback), as it would on a single-node cluster.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use ferry_testbed::controlplane::ControlPlane;
use ferry_testbed::echo::tcp_ask;
use ferry_testbed::yaml::{service, Endpoint};
use ferry_testbed::{in_netns, pod_ip, Topology};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const CLIENT: usize = 3;

fn servers(t: &Topology, n: usize) -> BTreeSet<String> {
    let to: SocketAddr = SocketAddrV4::new(VIP, 80).into();
    in_netns(&t.pods[CLIENT].ns, move || {
        (0..n)
            .filter_map(|_| tcp_ask(to, Duration::from_millis(500)).ok())
            .map(|a| a.server)
            .collect()
    })
    .unwrap()
}

/// Waits until the Service is served by exactly the pods `want` (by name).
fn wait_for(t: &Topology, want: &[usize], what: &str) {
    let want: BTreeSet<String> = want.iter().map(|i| t.pods[*i].name.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = servers(t, 24);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: served by {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn apply(cp: &ControlPlane, yaml: &str) {
    let out = cp.kubectl_as(&cp.kubeconfig("admin"), &["apply", "-f", "-"], Some(yaml));
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn web(backends: &[usize]) -> String {
    let eps: Vec<Endpoint> = backends
        .iter()
        .map(|i| Endpoint::ready(pod_ip(*i)))
        .collect();
    service("web", VIP, 80, None, None, "", &eps)
}

#[test]
fn proxy_follows_services_and_endpointslices_from_the_api() {
    let mut t = Topology::new(4).expect("topology");
    t.start_echo_servers().expect("echo servers");
    let mut cp = ControlPlane::start_in(Some(&t.node.name), &[]).expect("control plane");
    apply(&cp, &web(&[0, 1, 2]));
    // The daemon's own identity: it may only read Services and EndpointSlices.
    let _proxy = t
        .start_proxy_api(&cp.kubeconfig("kube-proxy"))
        .expect("ferry-proxy");
    wait_for(&t, &[0, 1, 2], "after the first list");

    // A changed slice reaches the datapath through the watch.
    apply(&cp, &web(&[0, 1]));
    wait_for(&t, &[0, 1], "after an endpoint left");

    // The API server goes away and comes back (same store): the daemon keeps serving from its
    // maps meanwhile, then re-watches and picks up what changed.
    cp.kill9();
    wait_for(&t, &[0, 1], "while the API server is down");
    cp.restart().expect("control plane restart");
    apply(&cp, &web(&[2]));
    wait_for(&t, &[2], "after the API server came back");

    // Deleting the Service takes its frontend out.
    let out = cp.kubectl(&["delete", "svc", "web"]);
    assert!(
        out.status.success(),
        "{} (server log: {})",
        String::from_utf8_lossy(&out.stderr),
        cp.log_path().display()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !servers(&t, 4).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the deleted Service still answers"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pods the test plays the kubelet for: backends 0..3 on node-a, labelled app=shop.
fn pod(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: shop-{i}, namespace: default, labels: {{app: shop}}}}\nspec:\n  nodeName: node-a\n  containers:\n  - name: echo\n    image: ferry/echo:1\n    ports: [{{name: http, containerPort: 8080}}]\n"
    )
}

/// The status a kubelet would report: the pod's IP and whether it is ready.
fn set_status(cp: &ControlPlane, i: usize, ready: bool) {
    let status = format!(
        r#"{{"status":{{"phase":"Running","podIP":"{}","podIPs":[{{"ip":"{}"}}],"conditions":[{{"type":"Ready","status":"{}"}}]}}}}"#,
        pod_ip(i),
        pod_ip(i),
        if ready { "True" } else { "False" }
    );
    let out = cp.kubectl(&[
        "patch",
        "pod",
        &format!("shop-{i}"),
        "--subresource=status",
        "--type=merge",
        "-p",
        &status,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn endpoints_controller_turns_ready_pods_into_backends() {
    let mut t = Topology::new(4).expect("topology");
    t.start_echo_servers().expect("echo servers");
    let cp = ControlPlane::start_in(Some(&t.node.name), &[]).expect("control plane");
    let cm = cp
        .spawn_component(&[
            "controller-manager",
            "--kubeconfig",
            cp.kubeconfig("controller-manager").to_str().unwrap(),
        ])
        .expect("controller manager");
    apply(
        &cp,
        &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: shop, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  selector: {{app: shop}}\n  ports: [{{name: web, port: 80, targetPort: http}}]\n"),
    );
    for i in 0..3 {
        apply(&cp, &pod(i));
        set_status(&cp, i, true);
    }
    let _proxy = t
        .start_proxy_api(&cp.kubeconfig("kube-proxy"))
        .expect("ferry-proxy");
    wait_for(&t, &[0, 1, 2], "three ready pods");
    let slices = cp
        .ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=shop",
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[0]}",
        ])
        .unwrap();
    assert_eq!(slices.split_whitespace().count(), 3, "{slices}");
    let ep = cp
        .ok(&[
            "get",
            "endpoints",
            "shop",
            "-o",
            "jsonpath={.subsets[0].ports[0].port}",
        ])
        .unwrap();
    assert_eq!(
        ep, "8080",
        "the named targetPort resolved to the container port"
    );

    // An unready pod leaves the datapath; a deleted one too.
    set_status(&cp, 1, false);
    wait_for(&t, &[0, 2], "pod 1 unready");
    cp.ok(&["delete", "pod", "shop-2", "--grace-period=0", "--force"])
        .unwrap();
    wait_for(&t, &[0], "pod 2 deleted");
    set_status(&cp, 1, true);
    wait_for(&t, &[0, 1], "pod 1 ready again");
    drop(cm);
}
