//! End-to-end tests of the node's cluster DNS: `ferry-proxy --dns-addr` answering for the
//! Services it is fed, reached from pods through the cluster DNS Service's address, with `dig`
//! over UDP and TCP, through the tc programs (a client outside the socket-LB cgroup) and the
//! socket programs (a client inside it). The kube-dns Service has no endpoints at all (without
//! the redirection a query would be refused): an answer proves it went to the node's server.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ferry_testbed::netns::Netns;
use ferry_testbed::yaml::{service, Endpoint};
use ferry_testbed::{pod_ip, Topology};

const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_DNS: &str = "169.254.20.10";
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LATE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);

/// The cluster DNS Service as Ferry's control plane creates it: no pods behind it, the node
/// answers.
fn kube_dns() -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
spec:
  clusterIP: {CLUSTER_DNS}
  ports:
  - name: dns
    port: 53
    protocol: UDP
  - name: dns-tcp
    port: 53
    protocol: TCP
"
    )
}

/// A headless Service `db` with two ready endpoints, one of them named `db-0`.
fn headless() -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: default
spec:
  clusterIP: None
  ports:
  - name: pg
    port: 5432
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-abc
  namespace: default
  labels:
    kubernetes.io/service-name: db
addressType: IPv4
ports:
- name: pg
  port: 5432
  protocol: TCP
endpoints:
- addresses: [\"{}\"]
  hostname: db-0
  conditions: {{ready: true}}
- addresses: [\"{}\"]
  conditions: {{ready: true}}
",
        pod_ip(0),
        pod_ip(1)
    )
}

fn external_name(target: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: ext
  namespace: default
spec:
  type: ExternalName
  externalName: {target}
"
    )
}

/// `dig` from `ns` (inside the socket-LB cgroup or not) against `server`; its full output.
fn dig(t: &Topology, ns: &Netns, in_cgroup: bool, server: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{server}"))
        .args(["+time=2", "+tries=1", "+nocookie"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if in_cgroup {
        t.in_cgroup(&mut cmd).unwrap();
    }
    let out = ns.spawn(&mut cmd).unwrap().wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answer section's data, one record per line (`dig +short`), and the response status.
fn ask(
    t: &Topology,
    ns: &Netns,
    in_cgroup: bool,
    server: &str,
    args: &[&str],
) -> (String, Vec<String>) {
    let full = dig(t, ns, in_cgroup, server, args);
    let status = full
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no response from {server} for {args:?}:\n{full}"))
        .to_string();
    let mut short_args = args.to_vec();
    short_args.push("+short");
    let mut records: Vec<String> = dig(t, ns, in_cgroup, server, &short_args)
        .lines()
        .filter(|l| !l.starts_with(';'))
        .map(str::to_string)
        .collect();
    records.sort();
    (status, records)
}

#[test]
fn cluster_names_resolve_on_the_node_through_the_cluster_dns_address() {
    let mut t = Topology::new(2).expect("topology");
    t.enable_socket_lb().expect("cgroup");
    // Nothing listens on the discard port: names outside the cluster get SERVFAIL, and no
    // query leaves the test bed.
    t.proxy_args = ["--dns-addr", NODE_DNS, "--dns-upstream", "127.0.0.1:9"]
        .map(String::from)
        .to_vec();
    let web = service(
        "web",
        WEB,
        80,
        None,
        None,
        "",
        &[Endpoint::ready(pod_ip(1))],
    );
    let yaml = [
        kube_dns(),
        web.clone(),
        headless(),
        external_name("web.default.svc.cluster.local"),
    ]
    .concat();
    let proxy = t.start_proxy(&yaml).expect("proxy");
    let client = t.pods[1].ns.clone();
    let vip = CLUSTER_DNS.to_string();

    // On the ferry-dns dummy link, or on lo where the kernel has no dummy links.
    let addrs = t.node.exec("ip", &["-4", "addr", "show"]).unwrap();
    assert!(
        addrs.contains(&format!("{NODE_DNS}/32")),
        "the node-local address: {addrs}"
    );

    // The same names over UDP and TCP, through the tc programs and the socket programs, and
    // straight to the node-local address.
    for (in_cgroup, server) in [
        (false, vip.as_str()),
        (true, vip.as_str()),
        (false, NODE_DNS),
    ] {
        for tcp in [false, true] {
            let proto = if tcp { "+tcp" } else { "+notcp" };
            let (status, a) = ask(
                &t,
                &client,
                in_cgroup,
                server,
                &[proto, "web.default.svc.cluster.local", "A"],
            );
            assert_eq!(
                (status.as_str(), a),
                ("NOERROR", vec![WEB.to_string()]),
                "web over {proto} to {server} (socket LB: {in_cgroup})"
            );
        }
    }

    let q = |args: &[&str]| ask(&t, &client, false, &vip, args);
    // Case does not matter.
    assert_eq!(
        q(&["WEB.Default.SVC.cluster.LOCAL", "A"]).1,
        [WEB.to_string()]
    );
    // A headless Service answers with its ready endpoints, a named endpoint by its hostname.
    assert_eq!(
        q(&["db.default.svc.cluster.local", "A"]).1,
        [pod_ip(0).to_string(), pod_ip(1).to_string()]
    );
    assert_eq!(
        q(&["db-0.db.default.svc.cluster.local", "A"]).1,
        [pod_ip(0).to_string()]
    );
    // SRV for a named port.
    assert_eq!(
        q(&["_http._tcp.web.default.svc.cluster.local", "SRV"]).1,
        ["0 100 80 web.default.svc.cluster.local."]
    );
    // PTR of a cluster IP; a pod's A record; the schema version.
    assert_eq!(
        q(&["-x", &WEB.to_string()]).1,
        ["web.default.svc.cluster.local."]
    );
    let p0 = pod_ip(0).to_string();
    assert_eq!(
        q(&[
            &format!("{}.default.pod.cluster.local", p0.replace('.', "-")),
            "A"
        ])
        .1,
        std::slice::from_ref(&p0)
    );
    assert_eq!(q(&["dns-version.cluster.local", "TXT"]).1, ["\"1.1.0\""]);
    // An ExternalName Service is a CNAME.
    let (status, ext) = q(&["ext.default.svc.cluster.local", "A"]);
    assert_eq!(status, "NOERROR");
    assert!(
        ext.contains(&"web.default.svc.cluster.local.".to_string()),
        "{ext:?}"
    );
    // A name that does not exist.
    assert_eq!(q(&["nope.default.svc.cluster.local", "A"]).0, "NXDOMAIN");

    // Changes are answered as soon as the node has them: a new Service resolves, a deleted
    // one is gone with its PTR, an ExternalName points elsewhere.
    let late = service(
        "late",
        LATE,
        80,
        None,
        None,
        "",
        &[Endpoint::ready(pod_ip(1))],
    );
    let changed = [
        kube_dns(),
        late,
        headless(),
        external_name("late.default.svc.cluster.local"),
    ]
    .concat();
    assert!(proxy.update(&changed).unwrap(), "the update was taken");
    assert_eq!(
        q(&["late.default.svc.cluster.local", "A"]),
        ("NOERROR".to_string(), vec![LATE.to_string()])
    );
    assert_eq!(q(&["web.default.svc.cluster.local", "A"]).0, "NXDOMAIN");
    // An address the cluster does not know falls through to the upstream (CoreDNS's default
    // `fallthrough in-addr.arpa`), which here answers nothing.
    assert_eq!(q(&["-x", &WEB.to_string()]).0, "SERVFAIL");
    let (_, ext) = q(&["ext.default.svc.cluster.local", "A"]);
    assert!(
        ext.contains(&"late.default.svc.cluster.local.".to_string()),
        "{ext:?}"
    );

    // Names outside the cluster go upstream; the one configured answers nothing.
    assert_eq!(q(&["example.org", "A"]).0, "SERVFAIL");

    let metrics = proxy.metrics().unwrap();
    assert!(
        proxy.metric("ferry_dns_queries_total").unwrap() >= 20.0,
        "{metrics}"
    );
    // Both paths carried DNS: the socket programs translated the in-cgroup queries, the tc
    // programs the others.
    assert!(
        proxy
            .metric("ferry_service_socket_translations_total")
            .unwrap()
            >= 2.0
    );
    assert!(proxy.metric("ferry_service_packets_total").unwrap() > 0.0);
}
