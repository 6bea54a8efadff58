//! containerd as ferry-cni's real client: Debian's containerd runs in a node namespace with a
//! CNI network list naming `ferry-cni` (and `portmap`), pod sandboxes are run through CRI with
//! Ferry's locally built pause image, and real TCP goes between the pods and to a Service VIP
//! programmed by ferry-proxy. Stopping and removing the sandboxes must release everything.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use common::containerd::{echo_container, sandbox_config, Runtime};
use ferry_testbed::echo::{servers_seen, tcp_ask, wait_listening};
use ferry_testbed::yaml::{service, Endpoint};
use ferry_testbed::{in_netns, Netns, Topology, ECHO_PORT};
use ipnetwork::Ipv4Network;
use serde_json::json;

/// What the test does through CRI.
trait Pods {
    fn run_pod(&mut self, name: &str) -> Result<(String, Ipv4Addr, Netns)>;
    fn run_echo(&mut self, sandbox: &str, pod: &str) -> Result<String>;
    fn remove_pod(&mut self, id: &str) -> Result<()>;
}

impl Pods for Runtime {
    /// Runs a sandbox for pod `name`; returns its id, its address and its network namespace.
    fn run_pod(&mut self, name: &str) -> Result<(String, Ipv4Addr, Netns)> {
        let config = sandbox_config(name, "default", &self.dirs.data);
        let mut cri = self.cri.clone();
        let id = self.block_on(cri.run_sandbox(config))?;
        let (status, netns) = self.block_on(cri.sandbox_status(&id))?;
        let ip = status
            .network
            .as_ref()
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        let ip: Ipv4Addr = ip
            .parse()
            .with_context(|| format!("sandbox {name} has no IPv4 address: {status:?}"))?;
        let netns = netns.with_context(|| format!("sandbox {name} has no network namespace"))?;
        let name = Path::new(&netns)
            .file_name()
            .context("netns path")?
            .to_string_lossy()
            .into_owned();
        Ok((id, ip, Netns { name }))
    }

    /// Starts Ferry's echo image in a sandbox (it answers with the pod's host name).
    fn run_echo(&mut self, sandbox: &str, pod: &str) -> Result<String> {
        let config = echo_container();
        let sandbox_config = sandbox_config(pod, "default", &self.dirs.data);
        let mut cri = self.cri.clone();
        self.block_on(cri.start_container(sandbox, &sandbox_config, config))
    }

    fn remove_pod(&mut self, id: &str) -> Result<()> {
        let mut cri = self.cri.clone();
        self.block_on(async {
            cri.stop_sandbox(id).await?;
            cri.remove_sandbox(id).await
        })
    }
}

/// Pod sandboxes from containerd get addresses from ferry-cni, reach each other and a Service
/// VIP through ferry-proxy's datapath; StopPodSandbox/RemovePodSandbox release the addresses,
/// the host links and the namespaces.
#[test]
fn containerd_runs_pod_sandboxes_through_ferry_cni() {
    let mut t = Topology::new(0).expect("topology");
    t.extra_interfaces = vec!["fy*".into()];
    let vip = Ipv4Addr::new(10, 96, 0, 60);
    let proxy = t
        .start_proxy(&service("web", vip, 80, None, None, "", &[]))
        .expect("ferry-proxy");
    let cidr: Ipv4Network = "10.244.60.0/24".parse().unwrap();
    let mut rt = Runtime::start(
        &t.node,
        json!({"podCIDR": cidr.to_string(), "bpfDir": t.bpf_dir}),
    )
    .expect("containerd");
    let version = rt.block_on(rt.cri.clone().version()).unwrap();
    assert!(version.starts_with("containerd"), "{version}");

    let mut pods = Vec::new();
    for i in 0..3 {
        let (id, ip, netns) = rt.run_pod(&format!("pod-{i}")).expect("RunPodSandbox");
        assert!(cidr.contains(ip), "{ip} is not in {cidr}");
        pods.push((id, ip, netns));
    }
    let ips: BTreeSet<Ipv4Addr> = pods.iter().map(|p| p.1).collect();
    assert_eq!(ips.len(), 3, "addresses are unique: {ips:?}");
    assert_eq!(rt.dirs.allocations(), 3);
    let links = t.node.links("fy").unwrap();
    assert_eq!(links.len(), 3, "one host link per pod: {links:?}");
    for l in &links {
        assert!(
            t.bpf_dir.join("links").join(l).exists(),
            "ferry-proxy's datapath is attached to {l}"
        );
    }

    // Echo containers in pods 0 and 1 (answering with the pod's host name).
    for (i, (id, ip, netns)) in pods.iter().take(2).enumerate() {
        let id = id.clone();
        rt.run_echo(&id, &format!("pod-{i}"))
            .expect("echo container");
        wait_listening(netns, SocketAddrV4::new(*ip, ECHO_PORT).into()).expect("echo answers");
    }

    // Pod to pod, no NAT: pod-0 sees pod-2's own address.
    let client = pods[2].2.clone();
    let to: SocketAddr = SocketAddrV4::new(pods[0].1, ECHO_PORT).into();
    let a = in_netns(&client, move || tcp_ask(to, Duration::from_secs(2)))
        .unwrap()
        .expect("pod-2 reaches pod-0");
    assert_eq!(a.server, "pod-0");
    assert_eq!(a.seen_client, pods[2].1.to_string());

    // A Service whose endpoints are the two echo pods, reached from pod-2 through the VIP.
    let eps = [Endpoint::ready(pods[0].1), Endpoint::ready(pods[1].1)];
    assert!(proxy
        .update(&service("web", vip, 80, None, None, "", &eps))
        .unwrap());
    let to: SocketAddr = SocketAddrV4::new(vip, 80).into();
    let servers = servers_seen(&client, to, 24, Duration::from_secs(1));
    assert_eq!(servers, BTreeSet::from(["pod-0".into(), "pod-1".into()]));

    // Stop and remove: addresses, host links and namespaces go.
    for (id, _, netns) in &pods {
        rt.remove_pod(id)
            .expect("StopPodSandbox + RemovePodSandbox");
        assert!(
            !Path::new(&netns.path()).exists(),
            "{} is removed with its sandbox",
            netns.path()
        );
    }
    assert_eq!(rt.dirs.allocations(), 0, "every address is released");
    assert_eq!(t.node.links("fy").unwrap(), Vec::<String>::new());
    assert!(rt.block_on(rt.cri.clone().sandboxes()).unwrap().is_empty());
}
