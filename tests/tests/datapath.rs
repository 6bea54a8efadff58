//! End-to-end tests of the eBPF Service load balancer with real TCP and UDP traffic between
//! network namespaces. They need root; `cargo xtask test` runs them.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use ferry_testbed::echo::{tcp_ask, tcp_ask_from, udp_ask};
use ferry_testbed::yaml::{service, Endpoint};
use ferry_testbed::{in_netns, pod_ip, Topology, ECHO_PORT, EXT_IP, NODE_IP};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn vip(port: u16) -> SocketAddr {
    SocketAddrV4::new(VIP, port).into()
}

/// Three backends (pod0..pod2) and a client (pod3).
fn cluster() -> Topology {
    let mut t = Topology::new(4).expect("topology");
    t.start_echo_servers().expect("echo servers");
    t
}

fn backends(n: usize) -> Vec<Endpoint> {
    (0..n).map(|i| Endpoint::ready(pod_ip(i))).collect()
}

fn web(extra: &str, eps: &[Endpoint]) -> String {
    service("web", VIP, 80, Some(53), Some(30080), extra, eps)
}

/// Servers reached by `n` TCP connections from the client pod.
fn tcp_servers(t: &Topology, client: usize, to: SocketAddr, n: usize) -> Vec<String> {
    in_netns(&t.pods[client].ns, move || {
        (0..n)
            .map(|_| {
                let a = tcp_ask(to, Duration::from_secs(2)).expect("TCP through the Service");
                assert_eq!(a.from, to, "the reply must come from the frontend");
                a.server
            })
            .collect()
    })
    .unwrap()
}

/// Counts the packets the node's IP stack forwards (an nftables forward hook).
fn count_forwarded(t: &Topology) {
    let rules = "table ip count {\n  chain forwarded {\n    type filter hook forward priority 0;\n    counter\n  }\n}\n";
    let path = std::env::temp_dir().join(format!("{}-count.nft", t.prefix));
    std::fs::write(&path, rules).unwrap();
    t.node
        .exec("nft", &["-f", path.to_str().unwrap()])
        .expect("nft");
    std::fs::remove_file(path).ok();
}

fn forwarded(t: &Topology) -> u64 {
    let out = t
        .node
        .exec("nft", &["list", "chain", "ip", "count", "forwarded"])
        .unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "packets").expect("counter");
    words[i + 1].parse().unwrap()
}

#[test]
fn clusterip_spreads_tcp_and_udp_over_all_backends() {
    spread(true);
}

#[test]
fn clusterip_through_the_kernel_stack_when_host_routing_is_off() {
    spread(false);
}

fn spread(host_routing: bool) {
    let mut t = cluster();
    t.host_routing = host_routing;
    count_forwarded(&t);
    let proxy = t.start_proxy(&web("", &backends(3))).unwrap();
    let client_ip = t.pods[3].ip;

    let seen: BTreeSet<String> = tcp_servers(&t, 3, vip(80), 40).into_iter().collect();
    assert_eq!(seen, ["pod0", "pod1", "pod2"].map(String::from).into());
    // No source translation: the backend sees the client pod.
    let a = tcp_ask_from(&t.pods[3].ns, vip(80)).unwrap();
    assert_eq!(a.seen_client, client_ip.to_string());

    // UDP: a fresh socket per request, so each is a new flow.
    let udp: BTreeSet<String> = in_netns(&t.pods[3].ns, || {
        (0..40)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                let a =
                    udp_ask(&s, vip(53), Duration::from_secs(2)).expect("UDP through the Service");
                assert_eq!(a.from, vip(53), "the UDP reply must come from the VIP");
                a.server
            })
            .collect()
    })
    .unwrap();
    assert_eq!(udp.len(), 3, "UDP reached {udp:?}");

    // Non-service traffic is untouched: direct TCP to a pod and ICMP.
    let direct = tcp_ask_from(&t.pods[3].ns, SocketAddrV4::new(pod_ip(1), 8080).into()).unwrap();
    assert_eq!(
        (direct.server.as_str(), direct.from),
        ("pod1", SocketAddrV4::new(pod_ip(1), 8080).into())
    );
    t.pods[3]
        .ns
        .exec("ping", &["-c", "1", "-W", "2", &pod_ip(0).to_string()])
        .expect("ICMP passes");

    // The datapath counted the service's packets.
    // With host routing, translated packets and those from pod to pod skip the node's stack:
    // the only packets it forwarded are the ping's (ICMP is left to the stack). Without, it
    // forwarded them all.
    let through_stack = forwarded(&t);
    if host_routing {
        assert!(
            through_stack <= 4,
            "{through_stack} packets went through the node's stack, not only the ping's"
        );
    } else {
        assert!(
            through_stack > 300,
            "only {through_stack} packets went through the node's stack"
        );
    }

    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.metric("ferry_conntrack_entries").unwrap() < 1.0
        || proxy.metric("ferry_service_packets_total").unwrap() <= 80.0
    {
        assert!(
            Instant::now() < deadline,
            "conntrack entries or service packets never showed in the metrics"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn session_affinity_sticks_to_one_backend() {
    let mut t = cluster();
    let extra = "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 30\n";
    t.start_proxy(&web(extra, &backends(3))).unwrap();
    let seen: BTreeSet<String> = tcp_servers(&t, 3, vip(80), 20).into_iter().collect();
    assert_eq!(seen.len(), 1, "affinity broken: {seen:?}");
    // Another client is balanced independently; from the outside namespace too.
    let ext: BTreeSet<String> = in_netns(&t.ext, || {
        (0..10)
            .map(|_| {
                tcp_ask(
                    SocketAddrV4::new(NODE_IP, 30080).into(),
                    Duration::from_secs(2),
                )
                .unwrap()
                .server
            })
            .collect()
    })
    .unwrap();
    assert_eq!(ext.len(), 1, "affinity broken for NodePort: {ext:?}");
}

#[test]
fn removing_an_endpoint_moves_new_connections() {
    let mut t = cluster();
    let proxy = t.start_proxy(&web("", &backends(3))).unwrap();
    assert!(tcp_servers(&t, 3, vip(80), 40).contains(&"pod0".to_string()));
    let eps = vec![Endpoint::ready(pod_ip(1)), Endpoint::ready(pod_ip(2))];
    assert!(proxy.update(&web("", &eps)).unwrap());
    let seen: BTreeSet<String> = tcp_servers(&t, 3, vip(80), 40).into_iter().collect();
    assert_eq!(seen, ["pod1", "pod2"].map(String::from).into());
    // Only the changed entries were written: per frontend (ClusterIP and NodePort, TCP and
    // UDP) one moved slot, the header and the stale slot, plus the backends that went away.
    let writes = proxy.metric("ferry_last_sync_map_writes").unwrap();
    assert!(
        writes > 0.0 && writes <= 4.0 * 3.0 + 2.0,
        "{writes} writes for one endpoint removal"
    );

    // Not ready but terminating endpoints serve only when nothing ready is left.
    let mut eps = backends(3);
    eps[0].ready = false;
    eps[0].terminating = true;
    assert!(proxy.update(&web("", &eps)).unwrap());
    assert!(!tcp_servers(&t, 3, vip(80), 30).contains(&"pod0".to_string()));
    for e in &mut eps[1..] {
        e.ready = false;
        e.terminating = false; // not ready and not terminating: never used
    }
    assert!(proxy.update(&web("", &eps)).unwrap());
    let seen: BTreeSet<String> = tcp_servers(&t, 3, vip(80), 10).into_iter().collect();
    assert_eq!(seen, ["pod0".to_string()].into());
}

#[test]
fn established_tcp_survives_a_daemon_restart() {
    let mut t = cluster();
    let yaml = web("", &backends(3));
    let proxy = t.start_proxy(&yaml).unwrap();
    let ns = t.pods[3].ns.clone();
    // One long-lived connection, asked before, during and after the restart.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (atx, arx) = std::sync::mpsc::channel::<String>();
    let conn = std::thread::spawn(move || {
        in_netns(&ns, move || {
            use std::io::{BufRead, BufReader, Write};
            let mut s = std::net::TcpStream::connect(vip(80)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            while rx.recv().is_ok() {
                s.write_all(b"?").unwrap();
                let mut line = String::new();
                r.read_line(&mut line)
                    .expect("established connection broke");
                atx.send(line).unwrap();
            }
        })
        .unwrap()
    });
    let ask = || {
        tx.send(()).unwrap();
        arx.recv_timeout(Duration::from_secs(5))
            .expect("answer on the established connection")
    };
    let first = ask();
    t.stop(proxy.pid, libc::SIGTERM).unwrap();
    assert_eq!(ask(), first, "while the daemon is down");
    let proxy = t.start_proxy(&yaml).unwrap();
    assert_eq!(ask(), first, "after the restart");
    // The new daemon recovered the installed state: the same input wrote nothing.
    assert_eq!(proxy.metric("ferry_last_sync_map_writes").unwrap(), 0.0);
    drop(tx);
    conn.join().unwrap();
}

#[test]
fn udp_client_reaches_a_live_backend_after_its_backend_is_removed() {
    let mut t = cluster();
    let proxy = t.start_proxy(&web("", &backends(3))).unwrap();
    let ns = t.pods[3].ns.clone();
    let sock = in_netns(&ns, || UdpSocket::bind("0.0.0.0:0").unwrap()).unwrap();
    let first = udp_ask(&sock, vip(53), Duration::from_secs(2))
        .unwrap()
        .server;
    // The same flow sticks to its backend while it exists.
    for _ in 0..5 {
        assert_eq!(
            udp_ask(&sock, vip(53), Duration::from_secs(2))
                .unwrap()
                .server,
            first
        );
    }
    let idx: usize = first.trim_start_matches("pod").parse().unwrap();
    let eps: Vec<Endpoint> = (0..3)
        .filter(|i| *i != idx)
        .map(|i| Endpoint::ready(pod_ip(i)))
        .collect();
    assert!(proxy.update(&web("", &eps)).unwrap());
    let removed = Instant::now();
    // The removed backend still answers if asked: only the conntrack flush moves the flow.
    let moved = loop {
        let a = udp_ask(&sock, vip(53), Duration::from_millis(200));
        if let Ok(a) = a {
            if a.server != first {
                break removed.elapsed();
            }
        }
        assert!(
            removed.elapsed() < Duration::from_secs(5),
            "UDP flow still pinned to the removed backend {first}"
        );
    };
    eprintln!("UDP flow moved {moved:?} after the daemon applied the removal");
}

#[test]
fn nodeport_from_outside_and_local_traffic_policy() {
    nodeport(true);
}

#[test]
fn nodeport_through_the_kernel_stack_when_host_routing_is_off() {
    nodeport(false);
}

fn nodeport(host_routing: bool) {
    let mut t = cluster();
    t.host_routing = host_routing;
    let mut eps = backends(3);
    eps[0].node = "node-b"; // not this node
    let mut yaml = web("", &eps);
    let local = "  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n";
    yaml.push_str(&service(
        "local",
        Ipv4Addr::new(10, 96, 0, 11),
        80,
        None,
        Some(30081),
        local,
        &eps,
    ));
    t.start_proxy(&yaml).unwrap();
    let np = |port| -> SocketAddr { SocketAddrV4::new(NODE_IP, port).into() };
    let (all, local_seen) = in_netns(&t.ext, move || {
        let mut all = BTreeSet::new();
        let mut local = BTreeSet::new();
        for _ in 0..40 {
            let a = tcp_ask(np(30080), Duration::from_secs(2)).expect("NodePort from outside");
            assert_eq!(a.from, np(30080));
            assert_eq!(a.seen_client, EXT_IP.to_string());
            all.insert(a.server);
            local.insert(
                tcp_ask(np(30081), Duration::from_secs(2))
                    .expect("Local NodePort")
                    .server,
            );
        }
        (all, local)
    })
    .unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(local_seen, ["pod1", "pod2"].map(String::from).into());
    let internal: BTreeSet<String> = tcp_servers(
        &t,
        3,
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 80).into(),
        30,
    )
    .into_iter()
    .collect();
    assert_eq!(internal, ["pod1", "pod2"].map(String::from).into());
}

#[test]
fn hairpin_a_pod_reaching_itself_through_its_service() {
    let mut t = cluster();
    t.start_proxy(&web("", &[Endpoint::ready(pod_ip(0))]))
        .unwrap();
    let a = tcp_ask_from(&t.pods[0].ns, vip(80)).expect("hairpin connection");
    assert_eq!(a.server, "pod0");
    assert_eq!(a.from, vip(80));
    assert_eq!(
        a.seen_client, "169.254.42.1",
        "hairpin traffic is source-translated"
    );
}

#[test]
fn bad_input_is_rejected_and_traffic_keeps_working() {
    let mut t = cluster();
    let good = web("", &backends(3));
    let proxy = t.start_proxy(&good).unwrap();
    let bad = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: x\n".to_string(),
        good.replace("port: 80\n", "port: 70000\n"),
        good.replace("protocol: UDP\n", "protocol: QUIC\n"),
        good.replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.999"),
        good.replace(
            "kubernetes.io/service-name: web",
            "kubernetes.io/service-name: gone",
        ),
    ];
    for b in &bad {
        assert!(!proxy.update(b).unwrap(), "accepted bad input:\n{b}");
        let seen: BTreeSet<String> = tcp_servers(&t, 3, vip(80), 15).into_iter().collect();
        assert!(seen.len() >= 2, "traffic broken after bad input: {seen:?}");
    }
    assert_eq!(
        proxy.metric("ferry_sync_errors_total").unwrap(),
        bad.len() as f64
    );
    // A Service without endpoints refuses new flows; fixing the input restores it.
    assert!(proxy.update(&web("", &[])).unwrap());
    assert!(in_netns(&t.pods[3].ns, || tcp_ask(
        vip(80),
        Duration::from_millis(500)
    )
    .is_err())
    .unwrap());
    assert!(proxy.update(&good).unwrap());
    assert_eq!(tcp_servers(&t, 3, vip(80), 5).len(), 5);
}

#[test]
fn a_pod_created_after_start_is_attached_and_served() {
    let mut t = cluster();
    let proxy = t.start_proxy(&web("", &backends(3))).unwrap();
    // A new pod appears: its veth must get the program (rtnetlink notification), both as a
    // client of the Service and as a new backend.
    t.add_pod("late").unwrap();
    let late = t.pods.len() - 1;
    t.start_echo_servers().unwrap();
    let mut eps = backends(3);
    eps.push(Endpoint::ready(pod_ip(late)));
    assert!(proxy.update(&web("", &eps)).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen: BTreeSet<String> = in_netns(&t.pods[late].ns, || {
            (0..30)
                .filter_map(|_| tcp_ask(vip(80), Duration::from_millis(500)).ok())
                .map(|a| a.server)
                .collect()
        })
        .unwrap();
        if seen.len() == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the late pod reached only {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn service_without_endpoints_refuses_at_once_and_labels_opt_out() {
    use std::io::ErrorKind;
    let mut t = cluster();
    let proxy = t.start_proxy(&web("", &[])).unwrap();
    // TCP and connected UDP from a pod, TCP from outside to the NodePort: "connection
    // refused", from the ICMP port unreachable the datapath answers with (a drop would end
    // in the 2 s timeout instead).
    let (tcp, udp) = in_netns(&t.pods[3].ns, || {
        let tcp = std::net::TcpStream::connect_timeout(&vip(80), Duration::from_secs(2))
            .map(|_| ())
            .map_err(|e| e.kind());
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect(vip(53)).unwrap();
        s.send(b"anyone?").unwrap();
        let udp = s.recv(&mut [0u8; 64]).map(|_| ()).map_err(|e| e.kind());
        (tcp, udp)
    })
    .unwrap();
    assert_eq!(
        tcp,
        Err(ErrorKind::ConnectionRefused),
        "TCP to the ClusterIP"
    );
    assert_eq!(udp, Err(ErrorKind::ConnectionRefused), "connected UDP");
    let np: SocketAddr = SocketAddrV4::new(NODE_IP, 30080).into();
    let outside = in_netns(&t.ext, move || {
        std::net::TcpStream::connect_timeout(&np, Duration::from_secs(2)).map_err(|e| e.kind())
    })
    .unwrap();
    assert_eq!(
        outside.err(),
        Some(ErrorKind::ConnectionRefused),
        "NodePort"
    );
    assert_eq!(
        proxy.metric("ferry_service_refused_total").unwrap(),
        3.0,
        "each refusal counted once"
    );

    // With endpoints it serves; labelled for another proxy or headless, Ferry lets it be
    // (nothing answers for the ClusterIP), and serves it again once the label is gone.
    let good = web("", &backends(3));
    assert!(proxy.update(&good).unwrap());
    assert_eq!(tcp_servers(&t, 3, vip(80), 3).len(), 3);
    for label in [
        "service.kubernetes.io/service-proxy-name: other",
        "service.kubernetes.io/headless: \"\"",
    ] {
        let labelled = good.replacen(
            "metadata:\n  name: web\n",
            &format!("metadata:\n  name: web\n  labels:\n    {label}\n"),
            1,
        );
        assert_ne!(labelled, good, "the label went in");
        assert!(proxy.update(&labelled).unwrap());
        let reached = in_netns(&t.pods[3].ns, || {
            tcp_ask(vip(80), Duration::from_millis(300)).is_ok()
        })
        .unwrap();
        assert!(!reached, "{label}: the ClusterIP still answers");
        assert!(proxy.update(&good).unwrap());
        assert_eq!(tcp_servers(&t, 3, vip(80), 3).len(), 3, "{label} removed");
    }
}

/// `GET /` on `addr` from the outside host: the status code and the body.
fn http_get(t: &Topology, addr: SocketAddr) -> std::io::Result<(u16, String)> {
    in_netns(&t.ext, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        Ok((code, body))
    })
    .unwrap()
}

#[test]
fn health_check_node_port_reports_local_endpoints() {
    let mut t = cluster();
    let lb = |eps: &[Endpoint]| {
        web(
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 31000\n",
            eps,
        )
        .replacen("type: NodePort", "type: LoadBalancer", 1)
    };
    let proxy = t.start_proxy(&lb(&backends(3))).unwrap();
    let hc: SocketAddr = SocketAddrV4::new(NODE_IP, 31000).into();
    let (code, body) = http_get(&t, hc).expect("the health check port answers");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 3, "{body}");
    assert_eq!(v["service"]["name"], "web");
    // Only endpoints on another node: 503, none here.
    let mut elsewhere = backends(3);
    for e in &mut elsewhere {
        e.node = "node-b";
    }
    assert!(proxy.update(&lb(&elsewhere)).unwrap());
    let (code, body) = http_get(&t, hc).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    // Traffic policy Cluster: no health check port any more.
    assert!(proxy
        .update(&lb(&backends(3)).replace(
            "externalTrafficPolicy: Local",
            "externalTrafficPolicy: Cluster"
        ))
        .unwrap());
    let gone = http_get(&t, hc).map_err(|e| e.kind());
    assert_eq!(gone.err(), Some(std::io::ErrorKind::ConnectionRefused));
}

#[test]
fn a_backend_on_the_node_itself_answers_through_the_clusterip() {
    // The API server behind the `kubernetes` Service is such a backend: its replies leave the
    // node's stack towards the pod and cross no ingress hook, only the pod interface's egress.
    let mut t = cluster();
    let bin = ferry_testbed::bin_path("ferry-echo").unwrap();
    let node_ns = t.node.clone();
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(["--name", "node", "--port", &ECHO_PORT.to_string()])
        .stdout(std::process::Stdio::null());
    t.spawn(&node_ns, &mut cmd).unwrap();
    let node_backend: SocketAddr = SocketAddrV4::new(NODE_IP, ECHO_PORT).into();
    ferry_testbed::echo::wait_listening(&node_ns, node_backend).unwrap();
    let on_node = Endpoint::ready(NODE_IP);
    t.start_proxy(&service("api", VIP, 443, None, None, "", &[on_node]))
        .unwrap();
    let answers = in_netns(&t.pods[3].ns, || {
        (0..5)
            .map(|_| tcp_ask(vip(443), Duration::from_secs(2)).map(|a| (a.server, a.from)))
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap()
    .expect("TCP to a ClusterIP whose backend is the node");
    for (server, from) in answers {
        assert_eq!(server, "node");
        assert_eq!(from, vip(443), "the reply must come from the frontend");
    }
}

#[test]
fn icmp_errors_about_translated_flows_reach_the_client() {
    // The backend pod has no UDP listener on port 9: its kernel answers with ICMP port
    // unreachable quoting client -> pod0:9. Translated back to quote client -> VIP:5353, it
    // reaches the client's connected socket as "connection refused"; untranslated, the client
    // would wait for an answer that never comes.
    let mut t = cluster();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  ports: [{{name: dns, port: 5353, targetPort: 9, protocol: UDP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-a\n  namespace: default\n  labels: {{kubernetes.io/service-name: dns}}\naddressType: IPv4\nports: [{{name: dns, port: 9, protocol: UDP}}]\nendpoints:\n- addresses: [\"{}\"]\n",
        pod_ip(0)
    );
    t.start_proxy(&yaml).unwrap();
    let got = in_netns(&t.pods[3].ns, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect(vip(5353)).unwrap();
        s.send(b"hello?").unwrap();
        s.recv(&mut [0u8; 64]).map(|_| ()).map_err(|e| e.kind())
    })
    .unwrap();
    assert_eq!(got, Err(std::io::ErrorKind::ConnectionRefused));
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients() {
    let mut t = cluster();
    let lb_ip = Ipv4Addr::new(192, 0, 2, 10);
    let lb = |ranges: Option<&str>| {
        let spec = ranges
            .map(|r| format!("  loadBalancerSourceRanges: {r}\n"))
            .unwrap_or_default();
        let y = web(&spec, &backends(3)).replacen("type: NodePort", "type: LoadBalancer", 1);
        // The ingress IP goes in the Service's status, the end of its document.
        let end = y[4..].find("\n---").map(|i| i + 5).unwrap();
        let status = format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {lb_ip}\n");
        format!("{}{status}{}", &y[..end], &y[end..])
    };
    let to: SocketAddr = SocketAddrV4::new(lb_ip, 80).into();
    let from_ext = |t: &Topology| tcp_ask_from(&t.ext, to);
    let from_pod = |t: &Topology| tcp_ask_from(&t.pods[3].ns, to);

    // The outside client is in the ranges: served; the pod is not: dropped.
    let proxy = t
        .start_proxy(&lb(Some(&format!("[\"{EXT_IP}/32\", \"203.0.113.0/24\"]"))))
        .unwrap();
    let a = from_ext(&t).expect("a client inside the ranges is served");
    assert_eq!(a.from, to);
    let e = from_pod(&t).expect_err("a client outside the ranges must be dropped");
    assert!(format!("{e:#}").contains("timed out"), "{e:#}");

    // Ranges changed at run time: the other way round.
    assert!(proxy.update(&lb(Some("[\"10.244.0.0/16\"]"))).unwrap());
    from_pod(&t).expect("the pod is in the new ranges");
    assert!(from_ext(&t).is_err(), "the outside client left the ranges");

    // No ranges: everyone.
    assert!(proxy.update(&lb(None)).unwrap());
    from_ext(&t).expect("no ranges: the outside client is served");
    from_pod(&t).expect("no ranges: the pod is served");

    // A bad range is refused with its field named, and the Service keeps what it had.
    assert!(!proxy
        .update(&lb(Some("[\"10.0.0.0/33\"]")))
        .unwrap_or(false));
    let log = std::fs::read_to_string(t.proxy_log()).unwrap();
    assert!(log.contains("spec.loadBalancerSourceRanges[0]"), "{log}");
    from_ext(&t).expect("the last good state stays");
}
