//! End-to-end tests of connect-time load balancing (the socket programs), with real sockets in
//! network namespaces. The proxies here attach the socket programs to a cgroup of the test's
//! own; clients run as `ferry-ask` processes inside it. That the socket programs, not the tc
//! programs, carried a flow shows in the datapath's per-packet counters staying at zero.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testbed::netns::Netns;
use ferry_testbed::yaml::{service, Endpoint};
use ferry_testbed::{bin_path, pod_ip, Topology, NODE_IP};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

fn vip(port: u16) -> SocketAddr {
    SocketAddrV4::new(VIP, port).into()
}

fn backends(idx: &[usize]) -> Vec<Endpoint> {
    idx.iter().map(|i| Endpoint::ready(pod_ip(*i))).collect()
}

fn services(web: &[usize]) -> String {
    [
        service("web", VIP, 80, Some(53), Some(30080), "", &backends(web)),
        service("empty", EMPTY_VIP, 80, Some(53), None, "", &[]),
        service(
            "sticky",
            STICKY_VIP,
            80,
            None,
            None,
            "  sessionAffinity: ClientIP\n",
            &backends(&[0, 1, 2]),
        ),
    ]
    .concat()
}

/// Three backends (pod0..pod2), a client (pod3), a proxy with socket LB on the test's cgroup.
fn cluster() -> (Topology, ferry_testbed::Proxy) {
    let mut t = Topology::new(4).expect("topology");
    t.start_echo_servers().expect("echo servers");
    t.enable_socket_lb().expect("cgroup");
    let p = t.start_proxy(&services(&[0, 1, 2])).expect("proxy");
    (t, p)
}

fn ask_cmd(mode: &str, target: SocketAddr, repeat: u32, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin_path("ferry-ask").unwrap());
    cmd.args(["--mode", mode, "--target", &target.to_string()])
        .args(["--repeat", &repeat.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// Runs `ferry-ask` in `ns`, inside the socket-LB cgroup or not; its answers.
fn ask(
    t: &Topology,
    ns: &Netns,
    in_cgroup: bool,
    mode: &str,
    to: SocketAddr,
    n: u32,
) -> Vec<Value> {
    let mut cmd = ask_cmd(mode, to, n, &[]);
    if in_cgroup {
        t.in_cgroup(&mut cmd).unwrap();
    }
    let out = ns.spawn(&mut cmd).unwrap().wait_with_output().unwrap();
    assert!(out.status.success(), "ferry-ask failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("ferry-ask prints JSON"))
        .collect()
}

fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn servers(answers: &[Value]) -> BTreeSet<String> {
    answers
        .iter()
        .map(|a| field(a, "server").to_string())
        .collect()
}

fn all_backends() -> BTreeSet<String> {
    ["pod0", "pod1", "pod2"].map(String::from).into()
}

#[test]
fn connect_time_translation_for_tcp_and_udp_shows_the_service_address() {
    let (t, proxy) = cluster();
    let client = t.pods[3].ns.clone();

    // TCP: spread over every backend, getpeername() shows the Service, no source translation.
    let tcp = ask(&t, &client, true, "tcp", vip(80), 40);
    assert_eq!(servers(&tcp), all_backends(), "{tcp:?}");
    for a in &tcp {
        assert_eq!(field(a, "peer"), vip(80).to_string(), "getpeername: {a}");
        assert_eq!(field(a, "seen_client"), t.pods[3].ip.to_string());
    }

    // Connected UDP: one backend for the socket's life; getpeername() and recvfrom() show the
    // Service.
    let udp = ask(&t, &client, true, "udp-connected", vip(53), 10);
    assert_eq!(servers(&udp).len(), 1, "{udp:?}");
    for a in &udp {
        assert_eq!(field(a, "peer"), vip(53).to_string(), "getpeername: {a}");
        assert_eq!(field(a, "from"), vip(53).to_string(), "recvfrom: {a}");
    }

    // Unconnected UDP: each datagram is balanced; recvfrom() shows the Service.
    let dgrams = ask(&t, &client, true, "udp", vip(53), 40);
    assert_eq!(servers(&dgrams), all_backends(), "{dgrams:?}");
    for a in &dgrams {
        assert_eq!(field(a, "from"), vip(53).to_string(), "recvfrom: {a}");
    }

    // None of it went through the per-packet path; the socket programs counted each connect
    // and each unconnected datagram.
    assert_eq!(
        proxy.metric("ferry_service_packets_total").unwrap(),
        0.0,
        "the tc programs translated packets the socket programs should have"
    );
    let translated = proxy
        .metric("ferry_service_socket_translations_total")
        .unwrap();
    assert!(
        translated >= (tcp.len() + 1 + dgrams.len()) as f64,
        "{translated} socket translations counted"
    );

    // The node's own processes reach the ClusterIP and a NodePort on the node's address (the
    // tc programs never see these: they leave through no pod or node interface's ingress).
    let host = ask(&t, &t.node, true, "tcp", vip(80), 20);
    assert_eq!(servers(&host), all_backends(), "{host:?}");
    assert!(host.iter().all(|a| field(a, "peer") == vip(80).to_string()));
    let np: SocketAddr = SocketAddrV4::new(NODE_IP, 30080).into();
    let host_np = ask(&t, &t.node, true, "tcp", np, 10);
    assert!(
        host_np.iter().all(|a| field(a, "peer") == np.to_string()),
        "{host_np:?}"
    );
    assert!(servers(&host_np).is_subset(&all_backends()));

    // A restarted daemon replaces its socket programs: one of each stays attached.
    let mut t = t;
    t.stop(proxy.pid, libc::SIGTERM).unwrap();
    let proxy = t.start_proxy(&services(&[0, 1, 2])).unwrap();
    let cg = t.socket_lb_cgroup.clone().unwrap();
    let attached = Command::new("bpftool")
        .args(["cgroup", "show", cg.to_str().unwrap()])
        .output()
        .expect("bpftool");
    let listing = String::from_utf8_lossy(&attached.stdout);
    for prog in ["connect4", "sendmsg4", "recvmsg4", "getpeername4"] {
        let n = listing
            .lines()
            .filter(|l| l.contains(&format!("ferry_{prog}")))
            .count();
        assert_eq!(
            n, 1,
            "{prog} attached {n} times after a restart:\n{listing}"
        );
    }
    let again = ask(&t, &client, true, "tcp", vip(80), 10);
    assert!(
        again
            .iter()
            .all(|a| field(a, "peer") == vip(80).to_string()),
        "{again:?}"
    );

    // A process outside the served cgroup is left to the tc programs, which still work.
    let outside = ask(&t, &client, false, "tcp", vip(80), 5);
    assert!(
        outside.iter().all(|a| a.get("server").is_some()),
        "{outside:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.metric("ferry_service_packets_total").unwrap() == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the tc path did not count the outside client"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn no_endpoints_refuse_the_connect_and_affinity_keeps_one_backend() {
    let (t, proxy) = cluster();
    let client = t.pods[3].ns.clone();

    // No endpoint: connect() fails with ECONNREFUSED at once, for TCP and connected UDP.
    for mode in ["tcp", "udp-connected"] {
        let port = if mode == "tcp" { 80 } else { 53 };
        let to = SocketAddrV4::new(EMPTY_VIP, port).into();
        let started = Instant::now();
        let r = ask(&t, &client, true, mode, to, 1);
        eprintln!(
            "{mode} refused in {:?} (process start included)",
            started.elapsed()
        );
        assert_eq!(r[0]["errno"], libc::ECONNREFUSED, "{mode}: {:?}", r[0]);
    }
    assert_eq!(proxy.metric("ferry_service_refused_total").unwrap(), 2.0);

    // ClientIP affinity: every connection of the pod goes to one backend.
    let sticky = ask(
        &t,
        &client,
        true,
        "tcp",
        SocketAddrV4::new(STICKY_VIP, 80).into(),
        20,
    );
    assert_eq!(servers(&sticky).len(), 1, "{sticky:?}");
    assert_eq!(
        proxy.metric("ferry_service_packets_total").unwrap(),
        0.0,
        "the tc programs carried what the socket programs should have"
    );
}

#[test]
fn a_connected_udp_socket_moves_when_its_backend_is_removed() {
    let (t, proxy) = cluster();
    let client = t.pods[3].ns.clone();
    // A resolver-like client: one connected socket, a fresh one when it fails; 10 s at most.
    let mut cmd = ask_cmd(
        "udp-connected",
        vip(53),
        100,
        &["--interval-ms", "100", "--reconnect"],
    );
    t.in_cgroup(&mut cmd).unwrap();
    let mut child = client.spawn(&mut cmd).unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value {
        let l = lines.next().expect("ferry-ask ended early").unwrap();
        serde_json::from_str(&l).unwrap()
    };
    let first = next();
    let pinned = field(&first, "server").to_string();
    for _ in 0..3 {
        assert_eq!(
            field(&next(), "server"),
            pinned,
            "a connected socket keeps its backend"
        );
    }
    let idx: usize = pinned.trim_start_matches("pod").parse().unwrap();
    let rest: Vec<usize> = (0..3).filter(|i| *i != idx).collect();
    assert!(proxy.update(&services(&rest)).unwrap());

    // The removed backend still answers if asked: only the destroyed socket moves the client.
    let mut aborted = None;
    let moved = loop {
        let a = next();
        if let Some(errno) = a["errno"].as_i64() {
            aborted.get_or_insert(errno);
            continue;
        }
        let server = field(&a, "server");
        if server != pinned {
            break server.to_string();
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(rest.iter().any(|i| moved == format!("pod{i}")));
    assert!(
        matches!(aborted, Some(e) if e == libc::ECONNABORTED as i64 || e == libc::EDESTADDRREQ as i64),
        "the socket should have been destroyed (ECONNABORTED), saw {aborted:?}"
    );
}
