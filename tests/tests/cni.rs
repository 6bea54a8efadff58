//! `ferry-cni` driven as a container runtime drives it: the CNI environment, the network
//! configuration on stdin, JSON on stdout and the exit code. The plugin runs inside a node
//! namespace the test creates; pods are namespaces too, and real TCP goes between them.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ferry_testbed::cni::{result_address, Plugin};
use ferry_testbed::echo::{servers_seen, tcp_ask, wait_listening};
use ferry_testbed::yaml::{service, Endpoint};
use ferry_testbed::{bin_path, in_netns, Netns, Topology, ECHO_PORT};
use serde_json::{json, Value};

/// Namespaces and a data directory, removed when the test ends however it ends.
struct Bed {
    plugin: Plugin,
    prefix: String,
    node: Netns,
    /// The node namespace belongs to someone else (a Topology) and stays.
    borrowed_node: bool,
    pods: Vec<Netns>,
    data: std::path::PathBuf,
    children: Vec<std::process::Child>,
}

impl Bed {
    fn new(pods: usize) -> Bed {
        Bed::with(Plugin::ferry().expect("ferry-cni"), pods)
    }

    fn with(plugin: Plugin, pods: usize) -> Bed {
        Bed::build(plugin, None, pods)
    }

    /// Pods wired into an existing node namespace.
    fn in_node(node: &Netns, pods: usize) -> Bed {
        Bed::build(
            Plugin::ferry().expect("ferry-cni"),
            Some(node.clone()),
            pods,
        )
    }

    fn build(plugin: Plugin, node: Option<Netns>, pods: usize) -> Bed {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "fc{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let borrowed_node = node.is_some();
        let node = node
            .unwrap_or_else(|| Netns::create(&format!("{prefix}-node")).expect("node namespace"));
        let mut bed = Bed {
            plugin,
            borrowed_node,
            data: std::env::temp_dir().join(format!("{prefix}-ipam")),
            prefix,
            node,
            pods: Vec::new(),
            children: Vec::new(),
        };
        for i in 0..pods {
            bed.add_pod(i);
        }
        bed
    }

    fn add_pod(&mut self, i: usize) -> Netns {
        let ns = Netns::create(&format!("{}-p{i}", self.prefix)).expect("pod namespace");
        self.pods.push(ns.clone());
        ns
    }

    fn conf(&self, version: &str, cidr: &str) -> Value {
        self.plugin.conf(version, cidr, &self.data)
    }

    /// Runs the plugin in the node namespace: (exit success, stdout as JSON or Null).
    fn cni(&self, env: &[(&str, &str)], stdin: &str) -> (bool, Value) {
        let o = self
            .plugin
            .run(&self.node, env, stdin)
            .expect("running the plugin");
        (o.ok, o.out)
    }

    fn call(
        &self,
        command: &str,
        container: &str,
        pod: Option<&Netns>,
        conf: &Value,
    ) -> (bool, Value) {
        let o = self
            .plugin
            .call(&self.node, command, container, pod, conf)
            .expect("running the plugin");
        (o.ok, o.out)
    }

    /// Starts an echo server named `name` in pod `i` at `addr` and waits until it answers.
    fn serve(&mut self, i: usize, name: &str, addr: Ipv4Addr) -> SocketAddr {
        let mut echo = Command::new(bin_path("ferry-echo").unwrap());
        echo.args(["--name", name, "--port", &ECHO_PORT.to_string()])
            .stdout(Stdio::null());
        let child = self.pods[i].spawn(&mut echo).unwrap();
        self.children.push(child);
        let to: SocketAddr = SocketAddrV4::new(addr, ECHO_PORT).into();
        wait_listening(&self.pods[i], to).unwrap();
        to
    }

    fn allocations(&self) -> usize {
        std::fs::read_dir(self.data.join("ferry"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().parse::<Ipv4Addr>().is_ok())
                    .count()
            })
            .unwrap_or(0)
    }

    fn host_links(&self) -> Vec<String> {
        self.node.links("fy").unwrap()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &self.pods {
            p.delete();
        }
        if !self.borrowed_node {
            self.node.delete();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn code(v: &Value) -> u64 {
    v["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

fn address(result: &Value) -> Ipv4Addr {
    result_address(result).unwrap_or_else(|| panic!("no address in {result}"))
}

#[test]
fn add_check_del_as_a_runtime_does() {
    let mut bed = Bed::new(2);
    let conf = bed.conf("1.0.0", "10.244.7.0/24");

    let (ok, v) = bed.cni(&[("CNI_COMMAND", "VERSION")], "");
    assert!(ok);
    assert_eq!(v["cniVersion"], "1.1.0");
    let versions: Vec<&str> = v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert!(
        versions.contains(&"1.0.0") && versions.contains(&"1.1.0"),
        "{v}"
    );

    let (p0, p1) = (bed.pods[0].clone(), bed.pods[1].clone());
    let (ok, r0) = bed.call("ADD", "c0", Some(&p0), &conf);
    assert!(ok, "{r0}");
    let (ok, r1) = bed.call("ADD", "c1", Some(&p1), &conf);
    assert!(ok, "{r1}");
    // The result names the pod interface with its sandbox, so the runtime finds eth0's IP.
    assert_eq!(r0["cniVersion"], "1.0.0");
    assert_eq!(r0["interfaces"][1]["name"], "eth0");
    assert_eq!(r0["interfaces"][1]["sandbox"], p0.path());
    assert_eq!(r0["ips"][0]["interface"], 1);
    assert_eq!(r0["ips"][0]["gateway"], "10.244.7.1");
    let (a0, a1) = (address(&r0), address(&r1));
    assert_ne!(a0, a1);
    let mtu = p0.exec("cat", &["/sys/class/net/eth0/mtu"]).unwrap();
    assert_eq!(mtu.trim(), "1400");

    // Real TCP from one pod to the other, through the node.
    let to = bed.serve(1, "pod1", a1);
    let answer = in_netns(&p0, move || tcp_ask(to, Duration::from_secs(2)))
        .unwrap()
        .expect("pod0 reaches pod1");
    assert_eq!(answer.server, "pod1");
    assert_eq!(answer.seen_client, a0.to_string(), "no NAT between pods");

    // CHECK: as ADD left it, then not.
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = r0.clone();
    let (ok, v) = bed.call("CHECK", "c0", Some(&p0), &with_prev);
    assert!(ok, "{v}");
    p0.exec("ip", &["link", "del", "eth0"]).unwrap();
    let (ok, v) = bed.call("CHECK", "c0", Some(&p0), &with_prev);
    assert!(!ok);
    assert_eq!(code(&v), 3, "{v}");
    assert!(
        v["details"]
            .as_str()
            .unwrap()
            .contains("eth0 does not exist"),
        "{v}"
    );

    // DEL: releases, and succeeds again when everything is already gone.
    assert_eq!(bed.allocations(), 2);
    for _ in 0..2 {
        let (ok, v) = bed.call("DEL", "c0", Some(&p0), &conf);
        assert!(ok, "{v}");
    }
    assert_eq!(bed.allocations(), 1);
    p1.delete();
    let (ok, v) = bed.call("DEL", "c1", Some(&p1), &conf);
    assert!(ok, "DEL after the namespace is gone: {v}");
    let (ok, v) = bed.call("DEL", "c1", None, &conf);
    assert!(ok, "DEL without CNI_NETNS: {v}");
    assert_eq!(bed.allocations(), 0);
    assert!(bed.host_links().is_empty(), "{:?}", bed.host_links());

    // Older runtimes get the older result format.
    let p2 = bed.add_pod(2);
    let (ok, r) = bed.call("ADD", "c2", Some(&p2), &bed.conf("0.4.0", "10.244.7.0/24"));
    assert!(ok, "{r}");
    assert_eq!(r["ips"][0]["version"], "4");
}

#[test]
fn errors_use_the_spec_codes() {
    let bed = Bed::new(2);
    let (p0, p1) = (bed.pods[0].clone(), bed.pods[1].clone());
    let conf = bed.conf("1.0.0", "10.244.8.0/30");
    let netns = p0.path();
    let add_env = |id: &'static str, ns: &str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", id.into()),
            ("CNI_NETNS", ns.to_string()),
            ("CNI_IFNAME", "eth0".into()),
        ]
    };
    let run = |env: Vec<(&'static str, String)>, stdin: &str| {
        let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        bed.cni(&e, stdin)
    };
    let expect = |(ok, v): (bool, Value), want_code: u64, want: &str| {
        assert!(!ok, "should fail: {v}");
        assert_eq!(code(&v), want_code, "{v}");
        let text = format!("{} {}", v["msg"], v["details"]);
        assert!(text.contains(want), "{want:?} not in {v}");
        assert!(v["cniVersion"].is_string(), "{v}");
    };
    expect(run(vec![], "{}"), 4, "CNI_COMMAND is not set");
    expect(run(add_env("c", ""), &conf.to_string()), 4, "CNI_NETNS");
    let mut bad_if = add_env("c", &netns);
    bad_if[3].1 = "eth0:1".into();
    expect(run(bad_if, &conf.to_string()), 4, "CNI_IFNAME");
    expect(run(add_env("c", &netns), "{not json"), 6, "cannot decode");
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.1.0");
    expect(run(add_env("c", &netns), &old.to_string()), 1, "0.1.0");
    let mut no_cidr = conf.clone();
    no_cidr.as_object_mut().unwrap().remove("podCIDR");
    expect(
        run(add_env("c", &netns), &no_cidr.to_string()),
        7,
        "podCIDR: required",
    );
    let mut typo = conf.clone();
    typo["mtuu"] = json!(1400);
    expect(run(add_env("c", &netns), &typo.to_string()), 2, "mtuu");
    expect(
        run(
            add_env("c", "/run/netns/no-such-namespace"),
            &conf.to_string(),
        ),
        3,
        "namespace is gone",
    );
    // A /30 holds one pod besides the gateway.
    let (ok, v) = run(add_env("c1", &netns), &conf.to_string());
    assert!(ok, "{v}");
    expect(
        run(add_env("c2", &p1.path()), &conf.to_string()),
        100,
        "exhausted",
    );
    assert!(
        bed.host_links().len() == 1,
        "a failed ADD leaves no link: {:?}",
        bed.host_links()
    );
    // STATUS and GC are 1.1's.
    let mut v11 = conf.clone();
    v11["cniVersion"] = json!("1.1.0");
    expect(
        run(vec![("CNI_COMMAND", "STATUS".into())], &v11.to_string()),
        50,
        "exhausted",
    );
    expect(
        run(vec![("CNI_COMMAND", "GC".into())], &conf.to_string()),
        1,
        "1.1.0",
    );
    // CHECK needs prevResult.
    let mut check = add_env("c1", &netns);
    check[0].1 = "CHECK".into();
    expect(run(check, &conf.to_string()), 7, "prevResult");
}

#[test]
fn concurrent_adds_get_unique_addresses_and_gc_frees_the_rest() {
    let mut bed = Bed::new(0);
    let pods: Vec<Netns> = (0..50).map(|i| bed.add_pod(i)).collect();
    let conf = bed.conf("1.1.0", "10.244.9.0/24");
    let bed = std::sync::Arc::new(bed);
    let handles: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (bed, p, conf) = (bed.clone(), p.clone(), conf.clone());
            std::thread::spawn(move || bed.call("ADD", &format!("c{i}"), Some(&p), &conf))
        })
        .collect();
    let mut addrs = BTreeSet::new();
    for h in handles {
        let (ok, v) = h.join().unwrap();
        assert!(ok, "{v}");
        addrs.insert(address(&v));
    }
    assert_eq!(addrs.len(), 50, "50 ADDs, 50 distinct addresses");
    assert_eq!(bed.allocations(), 50);
    // GC: the runtime names the attachments it still has; the others are released.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!((0..10)
        .map(|i| json!({"containerID": format!("c{i}"), "ifname": "eth0"}))
        .collect::<Vec<_>>());
    let (ok, v) = bed.cni(&[("CNI_COMMAND", "GC")], &gc.to_string());
    assert!(ok, "{v}");
    assert_eq!(bed.allocations(), 10);
    let (ok, v) = bed.cni(&[("CNI_COMMAND", "STATUS")], &conf.to_string());
    assert!(ok && v.is_null(), "{v}");
}

/// The same runtime-facing scenario against ferry-cni and the reference ptp + host-local, side
/// by side: where their behaviour should match, it must.
#[test]
fn behaves_as_the_reference_plugins_do() {
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut outcomes: Vec<Vec<String>> = Vec::new();
    for plugin in [Plugin::ferry().unwrap(), Plugin::reference().unwrap()] {
        let mut bed = Bed::with(plugin, 2);
        let (p0, p1) = (bed.pods[0].clone(), bed.pods[1].clone());
        let conf = bed.conf("1.0.0", "10.246.0.0/24");
        let mut seen = Vec::new();
        let (_, r0) = note(
            &mut seen,
            "ADD pod 0",
            bed.call("ADD", "c0", Some(&p0), &conf),
        );
        let (_, r1) = note(
            &mut seen,
            "ADD pod 1",
            bed.call("ADD", "c1", Some(&p1), &conf),
        );
        let sandbox = r0["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["name"] == "eth0" && i["sandbox"] == p0.path());
        seen.push(format!("result names eth0 in its sandbox: {sandbox}"));
        let (a0, a1) = (address(&r0), address(&r1));
        let to = bed.serve(1, "pod1", a1);
        let seen_client = in_netns(&p0, move || tcp_ask(to, Duration::from_secs(2)))
            .unwrap()
            .map(|a| a.seen_client == a0.to_string());
        seen.push(format!("pod to pod, no NAT: {:?}", seen_client.ok()));
        let mut with_prev = conf.clone();
        with_prev["prevResult"] = r0.clone();
        note(
            &mut seen,
            "CHECK",
            bed.call("CHECK", "c0", Some(&p0), &with_prev),
        );
        note(&mut seen, "DEL", bed.call("DEL", "c0", Some(&p0), &conf));
        note(
            &mut seen,
            "DEL again",
            bed.call("DEL", "c0", Some(&p0), &conf),
        );
        note(
            &mut seen,
            "DEL without CNI_NETNS",
            bed.call("DEL", "c1", None, &conf),
        );
        note(&mut seen, "no CNI_COMMAND", bed.cni(&[], &conf.to_string()));
        note(
            &mut seen,
            "stdin not JSON",
            bed.call("ADD", "c2", Some(&p0), &json!("{")),
        );
        let mut future = conf.clone();
        future["cniVersion"] = json!("9.9.9");
        note(
            &mut seen,
            "cniVersion 9.9.9",
            bed.call("ADD", "c2", Some(&p0), &future),
        );
        note(
            &mut seen,
            "CNI_NETNS missing",
            bed.cni(
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "c3"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/run/netns/none"),
                ],
                &conf.to_string(),
            ),
        );
        outcomes.push(seen);
    }
    for (f, r) in outcomes[0].iter().zip(&outcomes[1]) {
        let (what, fo) = f.split_once(": ").unwrap();
        let ro = r.split_once(": ").unwrap().1;
        rows.push((what.to_string(), fo.to_string(), ro.to_string()));
    }
    eprintln!("| case | ferry-cni | ptp + host-local |\n|---|---|---|");
    for (w, f, r) in &rows {
        eprintln!("| {w} | {f} | {r} |");
    }
    let differ: Vec<&(String, String, String)> = rows
        .iter()
        .filter(|(w, f, r)| f != r && !KNOWN_DIFFERENCES.contains(&w.as_str()))
        .collect();
    assert!(
        differ.is_empty(),
        "behaviour differs from the reference: {differ:?}"
    );
}

/// Records one outcome as `what: ok` or `what: error <code>`.
fn note(seen: &mut Vec<String>, what: &str, (ok, v): (bool, Value)) -> (bool, Value) {
    let s = if ok {
        "ok".to_string()
    } else {
        format!("error {}", v["code"])
    };
    seen.push(format!("{what}: {s}"));
    (ok, v)
}

/// Where ferry-cni answers differently on purpose:
/// - without CNI_COMMAND the reference plugins print their version on stderr and exit 0;
///   the spec makes CNI_COMMAND required, so ferry-cni answers code 4 (invalid environment);
/// - a CNI_NETNS that does not exist is the reference's generic code 999; ferry-cni says
///   code 3 (unknown container), which runtimes can act on.
const KNOWN_DIFFERENCES: &[&str] = &["no CNI_COMMAND", "CNI_NETNS missing"];

/// Pods wired by ferry-cni next to a running ferry-proxy: ADD returns once the datapath is
/// attached to the pod's host end, and a pod reaches a Service whose endpoints are pods.
#[test]
fn pods_reach_a_service_through_ferrys_datapath() {
    let mut t = Topology::new(0).expect("topology");
    t.extra_interfaces = vec!["fy*".into()];
    let vip = Ipv4Addr::new(10, 96, 0, 50);
    let proxy = t
        .start_proxy(&service("web", vip, 80, None, None, "", &[]))
        .expect("ferry-proxy");
    let mut bed = Bed::in_node(&t.node, 3);
    let mut conf = bed.conf("1.0.0", "10.244.50.0/24");
    conf["bpfDir"] = json!(t.bpf_dir);
    let mut addrs = Vec::new();
    for i in 0..3 {
        let pod = bed.pods[i].clone();
        let (ok, r) = bed.call("ADD", &format!("c{i}"), Some(&pod), &conf);
        assert!(ok, "{r}");
        let host_end = r["interfaces"][0]["name"].as_str().unwrap().to_string();
        assert!(
            t.bpf_dir.join("links").join(&host_end).exists(),
            "ADD returned before ferry-proxy attached to {host_end}"
        );
        addrs.push(address(&r));
    }
    for (i, addr) in addrs.iter().take(2).enumerate() {
        bed.serve(i, &format!("pod{i}"), *addr);
    }
    let eps = [Endpoint::ready(addrs[0]), Endpoint::ready(addrs[1])];
    assert!(proxy
        .update(&service("web", vip, 80, None, None, "", &eps))
        .unwrap());
    let to: SocketAddr = SocketAddrV4::new(vip, 80).into();
    let client = addrs[2].to_string();
    let answers = in_netns(&bed.pods[2], move || {
        (0..24)
            .map(|_| tcp_ask(to, Duration::from_secs(2)))
            .collect::<Vec<_>>()
    })
    .unwrap();
    let servers: BTreeSet<String> = answers
        .iter()
        .map(|a| a.as_ref().expect("the Service answers").server.clone())
        .collect();
    assert_eq!(
        servers,
        BTreeSet::from(["pod0".to_string(), "pod1".to_string()])
    );
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().unwrap().seen_client == client),
        "backends see the client pod's own address"
    );
}

/// First plugin of a conflist with Debian's `portmap` after it, as containerd runs it: the
/// result passes on as portmap's prevResult, the runtime's portMappings reach portmap, and
/// a host port on the node leads to the pod; DEL runs the chain backwards.
#[test]
fn chains_with_portmap() {
    let mut bed = Bed::new(2);
    let (p0, p1) = (bed.pods[0].clone(), bed.pods[1].clone());
    let conf = bed.conf("1.0.0", "10.244.60.0/24");
    let (ok, r0) = bed.call("ADD", "c0", Some(&p0), &conf);
    assert!(ok, "{r0}");
    let (ok, r1) = bed.call("ADD", "c1", Some(&p1), &conf);
    assert!(ok, "{r1}");
    let portmap = Plugin::named("portmap").expect("portmap");
    let mut pm = json!({"cniVersion": "1.0.0", "name": "ferry", "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": ECHO_PORT, "protocol": "tcp"}]},
        "prevResult": r0});
    let o = portmap
        .call(&bed.node, "ADD", "c0", Some(&p0), &pm)
        .unwrap();
    assert!(o.ok, "portmap ADD: {}", o.out);
    assert_eq!(o.out["ips"], r0["ips"], "portmap passes our result on");

    bed.serve(0, "pod0", address(&r0));
    // From the other pod to the node's address on its side (the gateway), host port 18080.
    let gw: Ipv4Addr = r1["ips"][0]["gateway"].as_str().unwrap().parse().unwrap();
    let to: SocketAddr = SocketAddrV4::new(gw, 18080).into();
    let answer = in_netns(&p1, move || tcp_ask(to, Duration::from_secs(2)))
        .unwrap()
        .expect("the host port leads to pod0");
    assert_eq!(answer.server, "pod0");

    // A runtime's CHECK and DEL go through the chain too.
    pm["prevResult"] = o.out.clone();
    let mut ours = conf.clone();
    ours["prevResult"] = o.out.clone();
    let (ok, v) = bed.call("CHECK", "c0", Some(&p0), &ours);
    assert!(ok, "{v}");
    let o = portmap
        .call(&bed.node, "DEL", "c0", Some(&p0), &pm)
        .unwrap();
    assert!(o.ok, "portmap DEL: {}", o.out);
    let (ok, v) = bed.call("DEL", "c0", Some(&p0), &ours);
    assert!(ok, "{v}");
    let rules = bed.node.exec("iptables-save", &[]).unwrap_or_default();
    assert!(
        !rules.contains("18080"),
        "portmap's rules are gone: {rules}"
    );
}

/// Without podCIDR in its configuration, ferry-cni reads the Node's spec.podCIDR, which the
/// controller manager's node IPAM assigns from --cluster-cidr.
#[test]
fn pod_cidr_comes_from_the_node_object() {
    use ferry_testbed::controlplane::ControlPlane;
    let bed = Bed::new(1);
    let cp = ControlPlane::start_in(Some(&bed.node.name), &[]).expect("control plane");
    let _cm = cp
        .spawn_component(&[
            "controller-manager",
            "--kubeconfig",
            cp.kubeconfig("controller-manager").to_str().unwrap(),
            "--cluster-cidr=10.250.0.0/16",
            "--node-cidr-mask-size=24",
        ])
        .expect("controller manager");
    let out = cp.kubectl_as(
        &cp.kubeconfig("admin"),
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n2}\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cidrs = || {
        cp.ok(&["get", "nodes", "-o", "jsonpath={.items[*].spec.podCIDR}"])
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cidrs().split_whitespace().count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "nodes got no pod CIDRs: {}",
            cidrs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let all: BTreeSet<String> = cidrs().split_whitespace().map(String::from).collect();
    assert_eq!(
        all,
        BTreeSet::from(["10.250.0.0/24".to_string(), "10.250.1.0/24".to_string()])
    );
    let n2 = cp
        .ok(&["get", "node", "n2", "-o", "jsonpath={.spec.podCIDR}"])
        .unwrap();

    let mut conf = bed.conf("1.0.0", "unused");
    conf.as_object_mut().unwrap().remove("podCIDR");
    conf["kubeconfig"] = json!(cp.kubeconfig("admin"));
    conf["nodeName"] = json!("n2");
    let p0 = bed.pods[0].clone();
    let (ok, r) = bed.call("ADD", "c0", Some(&p0), &conf);
    assert!(ok, "{r}");
    let net: ipnetwork::Ipv4Network = n2.parse().unwrap();
    assert!(net.contains(address(&r)), "{} in {n2}", address(&r));
    let mut other = conf.clone();
    other["nodeName"] = json!("n9");
    other["name"] = json!("elsewhere");
    let (ok, v) = bed.call("ADD", "c1", Some(&p0), &other);
    assert!(
        !ok && v["code"] == 11,
        "an unknown node is worth retrying later: {v}"
    );
}

/// Two nodes, each with ferry-cni pods and its own ferry-proxy, joined by a link: the
/// proxies route each other's pod CIDRs (from Node objects in their input), so pods reach
/// pods on the other node with their own addresses, and a Service on one node balances
/// over endpoints on the other.
#[test]
fn two_nodes_route_pods_and_services_across() {
    let mut ta = Topology::new(0).expect("node a");
    let mut tb = Topology::new(0).expect("node b");
    tb.node_name = "node-b".into();
    for t in [&mut ta, &mut tb] {
        t.extra_interfaces = vec!["fy*".into(), "nl0".into()];
    }
    // The link between the nodes (gone with their namespaces).
    ferry_testbed::run(
        "ip",
        &[
            "link",
            "add",
            "nl0",
            "netns",
            &ta.node.name,
            "type",
            "veth",
            "peer",
            "name",
            "nl0",
            "netns",
            &tb.node.name,
        ],
    )
    .unwrap();
    for (t, ip) in [(&ta, "192.168.90.1/24"), (&tb, "192.168.90.2/24")] {
        t.node
            .exec("ip", &["addr", "add", ip, "dev", "nl0"])
            .unwrap();
        t.node.exec("ip", &["link", "set", "nl0", "up"]).unwrap();
    }
    let nodes = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDR: 10.244.10.0/24}\nstatus: {addresses: [{type: InternalIP, address: 192.168.90.1}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nspec: {podCIDR: 10.244.11.0/24}\nstatus: {addresses: [{type: InternalIP, address: 192.168.90.2}]}\n";
    let vip = Ipv4Addr::new(10, 96, 0, 60);
    let input = |eps: &[Endpoint]| {
        format!(
            "{}---\n{nodes}",
            service("web", vip, 80, None, None, "", eps)
        )
    };
    let pa = ta.start_proxy(&input(&[])).expect("ferry-proxy on node a");
    let pb = tb.start_proxy(&input(&[])).expect("ferry-proxy on node b");
    let routes = ta
        .node
        .exec("ip", &["route", "show", "proto", "249"])
        .unwrap();
    assert!(
        routes.contains("10.244.11.0/24 via 192.168.90.2"),
        "node a's routes: {routes}"
    );

    let bed_a = Bed::in_node(&ta.node, 1);
    let mut bed_b = Bed::in_node(&tb.node, 2);
    let wire = |bed: &Bed, t: &Topology, cidr: &str, i: usize| -> Ipv4Addr {
        let mut conf = bed.conf("1.0.0", cidr);
        conf["bpfDir"] = json!(t.bpf_dir);
        let pod = bed.pods[i].clone();
        let (ok, r) = bed.call("ADD", &format!("c{i}"), Some(&pod), &conf);
        assert!(ok, "{r}");
        address(&r)
    };
    let a0 = wire(&bed_a, &ta, "10.244.10.0/24", 0);
    let b: Vec<Ipv4Addr> = (0..2)
        .map(|i| wire(&bed_b, &tb, "10.244.11.0/24", i))
        .collect();
    for (i, ip) in b.iter().enumerate() {
        bed_b.serve(i, &format!("b{i}"), *ip);
    }
    // Pod to pod across the nodes, no NAT.
    let to: SocketAddr = SocketAddrV4::new(b[0], ECHO_PORT).into();
    let answer = in_netns(&bed_a.pods[0], move || tcp_ask(to, Duration::from_secs(2)))
        .unwrap()
        .expect("a pod on node a reaches a pod on node b");
    assert_eq!(
        (answer.server.as_str(), answer.seen_client.clone()),
        ("b0", a0.to_string())
    );
    // A Service on node a whose endpoints are on node b.
    let eps: Vec<Endpoint> = b.iter().map(|ip| Endpoint::ready(*ip)).collect();
    assert!(pa.update(&input(&eps)).unwrap());
    assert!(pb.update(&input(&eps)).unwrap());
    let to: SocketAddr = SocketAddrV4::new(vip, 80).into();
    assert_eq!(
        servers_seen(&bed_a.pods[0], to, 24, Duration::from_secs(1)),
        BTreeSet::from(["b0".to_string(), "b1".to_string()]),
        "the Service answers across nodes from both endpoints"
    );
}
