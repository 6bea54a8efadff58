//! ferry-kubelet end to end with Debian's containerd: the control plane, controller-manager,
//! scheduler, ferry-proxy and ferry-kubelet (which starts containerd with Ferry's
//! configuration and imports Ferry's images) in a node namespace. The example Deployment and
//! Service are applied with kubectl; pods run, get addresses from ferry-cni and become Ready
//! by their probes; the ClusterIP (from a pod) and the NodePort (from outside) reach every
//! replica through Ferry's eBPF.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use common::containerd::{Kubelet, RuntimeDirs};
use common::registry::Registry;
use common::{apply, eventually};
use ferry_testbed::controlplane::ControlPlane;
use ferry_testbed::echo::servers_seen;
use ferry_testbed::{Netns, Topology, NODE_IP};
use ipnetwork::Ipv4Network;
use serde_json::Value;

const POD_CIDR: &str = "10.244.70.0/24";

fn json(cp: &ControlPlane, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&cp.ok(&a).unwrap()).unwrap()
}

/// Ready pods of app=hello: name -> IP.
fn ready_hello(cp: &ControlPlane) -> Vec<(String, String)> {
    let pods = json(cp, &["get", "pods", "-l", "app=hello"]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p["status"]["podIP"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The network namespace of a running pod, from its sandbox (as containerd reports it).
fn pod_netns(dirs: &RuntimeDirs, pod: &str) -> Netns {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut cri = kubelet::cri::Cri::connect(&dirs.layout.socket)
            .await
            .unwrap();
        let s = cri
            .sandboxes()
            .await
            .unwrap()
            .into_iter()
            .find(|s| {
                s.metadata.as_ref().is_some_and(|m| m.name == pod)
                    && s.state == kubelet::cri::v1::PodSandboxState::SandboxReady as i32
            })
            .unwrap_or_else(|| panic!("no ready sandbox for {pod}"));
        let (_, netns) = cri.sandbox_status(&s.id).await.unwrap();
        let path = netns.expect("the sandbox has a network namespace");
        Netns {
            name: path.rsplit('/').next().unwrap().to_string(),
        }
    })
}

/// A pod of one busybox container `c` running `sh -c command`; `extra` lines go under it.
fn busybox_pod(name: &str, labels: &str, command: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {labels}}}\n\
         spec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    \
         image: ferry.local/busybox:1\n    imagePullPolicy: IfNotPresent\n    \
         command: [sh, -c, {command:?}]\n{extra}"
    )
}

fn example(file: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(file),
    )
    .unwrap()
}

fn container_status(cp: &ControlPlane, pod: &str) -> Value {
    json(cp, &["get", "pod", pod])["status"]["containerStatuses"][0].clone()
}

#[test]
fn kubelet_runs_the_example_with_containerd() {
    let mut t = Topology::new(0).expect("topology");
    t.extra_interfaces = vec!["fy*".into()];
    let dirs = RuntimeDirs::new();
    let cp = ControlPlane::start_in(Some(&t.node.name), &["--node-kubeconfigs", "node-a"])
        .expect("control plane");
    let _controllers = cp.spawn_controllers(&[]).expect("controllers");
    let _proxy = t
        .start_proxy_api(&cp.kubeconfig("kube-proxy"))
        .expect("ferry-proxy");
    let _kubelet = Kubelet::start(&t, &cp, &dirs, POD_CIDR);
    eventually(
        "node-a registers and is Ready",
        Duration::from_secs(60),
        || {
            cp.ok(&[
                "get",
                "node",
                "node-a",
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ])
            .is_ok_and(|s| s == "True")
        },
    );
    let node = json(&cp, &["get", "node", "node-a"]);
    assert_eq!(node["spec"]["podCIDR"], POD_CIDR);
    assert!(node["status"]["nodeInfo"]["containerRuntimeVersion"]
        .as_str()
        .unwrap()
        .starts_with("containerd://"));

    // The example: three replicas, Ready by their httpGet probe, addresses from ferry-cni.
    let hello = example("hello.yaml");
    apply(&cp, &hello);
    let st = cp
        .ok(&["rollout", "status", "deploy/hello", "--timeout=90s"])
        .unwrap();
    assert!(st.contains("successfully rolled out"), "{st}");
    let cidr: Ipv4Network = POD_CIDR.parse().unwrap();
    let pods = ready_hello(&cp);
    assert_eq!(pods.len(), 3, "{pods:?}");
    for (name, ip) in &pods {
        let ip: Ipv4Addr = ip.parse().unwrap_or_else(|_| panic!("{name} has no IP"));
        assert!(cidr.contains(ip), "{name}'s {ip} is outside {POD_CIDR}");
    }
    let names: BTreeSet<String> = pods.iter().map(|p| p.0.clone()).collect();

    // A client pod (busybox, not behind the Service) asks the ClusterIP; the outside host
    // asks the NodePort. Every replica answers, by its own name. The client prints the
    // Service variables it was started with.
    apply(
        &cp,
        &busybox_pod(
            "client",
            "{}",
            "env | grep -E '^(KUBERNETES|HELLO)_' | sort; sleep 3600",
            "",
        ),
    );
    eventually("the client pod runs", Duration::from_secs(60), || {
        cp.ok(&["get", "pod", "client", "-o", "jsonpath={.status.phase}"])
            .is_ok_and(|s| s == "Running")
    });
    let vip: Ipv4Addr = cp
        .ok(&["get", "svc", "hello", "-o", "jsonpath={.spec.clusterIP}"])
        .unwrap()
        .parse()
        .unwrap();
    let client = pod_netns(&dirs, "client");
    let by_vip = servers_seen(
        &client,
        SocketAddrV4::new(vip, 80).into(),
        40,
        Duration::from_secs(1),
    );
    assert_eq!(by_vip, names, "the ClusterIP reaches every replica");
    let env = cp.ok(&["logs", "client"]).unwrap();
    for want in [
        "KUBERNETES_SERVICE_HOST=10.96.0.1".to_string(),
        "KUBERNETES_SERVICE_PORT=443".into(),
        "KUBERNETES_SERVICE_PORT_HTTPS=443".into(),
        "KUBERNETES_PORT=tcp://10.96.0.1:443".into(),
        format!("HELLO_SERVICE_HOST={vip}"),
        "HELLO_SERVICE_PORT_HTTP=80".into(),
        format!("HELLO_PORT_80_TCP_ADDR={vip}"),
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "{want} missing from:\n{env}"
        );
    }
    let by_node_port = servers_seen(
        &t.ext,
        SocketAddrV4::new(NODE_IP, 30080).into(),
        40,
        Duration::from_secs(1),
    );
    assert_eq!(by_node_port, names, "the NodePort reaches every replica");

    // kubectl describe shows what users look for.
    let first = pods[0].0.clone();
    let d = cp.ok(&["describe", "pod", &first]).unwrap();
    for want in [
        "Node:",
        "node-a/",
        "Status:",
        "Running",
        "IP:",
        &pods[0].1,
        "ferry.local/echo:1",
        "Ready",
    ] {
        assert!(d.contains(want), "describe lacks {want:?}:\n{d}");
    }

    // A deleted pod is replaced; its sandbox goes.
    cp.ok(&["delete", "pod", &first, "--wait=false"]).unwrap();
    eventually(
        "the deleted pod is replaced and gone",
        Duration::from_secs(60),
        || {
            let now: BTreeSet<String> = ready_hello(&cp).into_iter().map(|p| p.0).collect();
            now.len() == 3
                && !now.contains(&first)
                && cp.kubectl(&["get", "pod", &first]).status.code() == Some(1)
        },
    );

    // A failing liveness probe restarts the container; a failing readiness probe takes the
    // pod out of the Service's endpoints.
    apply(
        &cp,
        &(busybox_pod(
            "flaky",
            "{app: flaky}",
            "echo started; touch /tmp/live /tmp/ready; sleep 3; rm /tmp/ready; sleep 3; rm /tmp/live; sleep 3600",
            "    readinessProbe: {exec: {command: [cat, /tmp/ready]}, periodSeconds: 1}\n    \
             livenessProbe: {exec: {command: [cat, /tmp/live]}, periodSeconds: 1, failureThreshold: 2}\n",
        ) + r#"---
apiVersion: v1
kind: Service
metadata: {name: flaky, namespace: default}
spec:
  selector: {app: flaky}
  ports: [{port: 80, targetPort: 8080}]
"#),
    );
    let endpoint_ready = |cp: &ControlPlane| -> Option<bool> {
        let s = json(
            cp,
            &[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=flaky",
            ],
        );
        s["items"][0]["endpoints"][0]["conditions"]["ready"].as_bool()
    };
    eventually(
        "flaky becomes a ready endpoint",
        Duration::from_secs(60),
        || endpoint_ready(&cp) == Some(true),
    );
    eventually(
        "flaky leaves the ready endpoints",
        Duration::from_secs(30),
        || endpoint_ready(&cp) == Some(false),
    );
    eventually(
        "the liveness probe restarts flaky",
        Duration::from_secs(60),
        || container_status(&cp, "flaky")["restartCount"].as_i64() >= Some(1),
    );
    let last = &container_status(&cp, "flaky")["lastState"]["terminated"];
    assert!(last["exitCode"].as_i64().is_some(), "lastState: {last}");

    // The kubelet's events are what `kubectl describe` shows.
    eventually(
        "flaky's events tell the story",
        Duration::from_secs(20),
        || {
            cp.ok(&["describe", "pod", "flaky"]).is_ok_and(|d| {
                [
                    "Started container c",
                    "Readiness probe failed",
                    "Liveness probe failed",
                    "failed liveness probe, will be restarted",
                ]
                .iter()
                .all(|w| d.contains(w))
            })
        },
    );

    // kubectl logs through the API server, which asks the pod's kubelet.
    let previous = cp.ok(&["logs", "flaky", "--previous"]).unwrap();
    assert_eq!(previous, "started\n");
    eventually(
        "the restarted flaky logs again",
        Duration::from_secs(20),
        || cp.ok(&["logs", "flaky"]).is_ok_and(|l| l == "started\n"),
    );
    let tail = cp.ok(&["logs", "client", "--tail=1"]).unwrap();
    assert_eq!(
        tail,
        env.lines().last().unwrap().to_string() + "\n",
        "the last line only"
    );
    // Limits reach the container's cgroup (runc mounts the container's own cgroup there).
    apply(
        &cp,
        &busybox_pod(
            "limited",
            "{}",
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us; sleep 3600",
            "    resources: {limits: {cpu: 500m, memory: 64Mi}}\n",
        ),
    );
    eventually(
        "limited reports its cgroup limits",
        Duration::from_secs(60),
        || {
            cp.ok(&["logs", "limited"])
                .is_ok_and(|l| l == "67108864\n50000\n")
        },
    );
    apply(&cp, &example("job.yaml"));
    eventually("the example Job completes", Duration::from_secs(90), || {
        cp.ok(&["get", "job", "count", "-o", "jsonpath={.status.succeeded}"])
            .is_ok_and(|s| s == "3")
    });
    let job_pod = cp
        .ok(&[
            "get",
            "pods",
            "-l",
            "job-name=count",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .unwrap();
    assert_eq!(
        cp.ok(&["logs", &job_pod, "-c", "count"]).unwrap(),
        "1\n2\n3\n"
    );
    assert_eq!(
        cp.ok(&["logs", &job_pod, "-c", "prepare"]).unwrap(),
        "preparing\n"
    );
    let stamped = cp
        .ok(&["logs", &job_pod, "-c", "count", "--timestamps", "--tail=1"])
        .unwrap();
    assert!(
        stamped.ends_with(" 3\n") && stamped.starts_with("20"),
        "{stamped}"
    );
    let wrong = cp.kubectl(&["logs", &job_pod, "-c", "nope"]);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("container nope is not valid"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    // An image that is nowhere gives ErrImagePull / ImagePullBackOff, not a crash.
    apply(
        &cp,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: missing, namespace: default}\nspec:\n  \
         containers:\n  - {name: c, image: ferry.local/nope:1, imagePullPolicy: IfNotPresent}\n",
    );
    eventually("missing image is reported", Duration::from_secs(60), || {
        let w = &container_status(&cp, "missing")["state"]["waiting"]["reason"];
        w == "ErrImagePull" || w == "ImagePullBackOff"
    });

    // The other examples: a DaemonSet whose sidecar is Ready only once it reads, through its
    // own mount of an emptyDir, what the init container wrote; and a StatefulSet.
    apply(&cp, &example("daemonset.yaml"));
    apply(&cp, &example("statefulset.yaml"));
    eventually(
        "the DaemonSet's pod runs both containers",
        Duration::from_secs(60),
        || {
            cp.ok(&[
                "get",
                "pods",
                "-l",
                "app=node-echo",
                "-o",
                "jsonpath={.items[0].status.containerStatuses[*].ready}",
            ])
            .is_ok_and(|s| s == "true true")
        },
    );
    eventually(
        "the StatefulSet's pods are Ready in order",
        Duration::from_secs(60),
        || {
            cp.ok(&[
                "get",
                "statefulset",
                "web",
                "-o",
                "jsonpath={.status.readyReplicas}",
            ])
            .is_ok_and(|s| s == "2")
        },
    );

    // Everything goes away: pods stop within their grace period, addresses are released.
    let start = Instant::now();
    let out = cp.kubectl_as(
        &cp.kubeconfig("admin"),
        &["delete", "-f", "-", "--wait=false"],
        Some(&hello),
    );
    assert!(out.status.success());
    cp.ok(&[
        "delete",
        "pod",
        "client",
        "flaky",
        "missing",
        "limited",
        "--wait=false",
    ])
    .unwrap();
    cp.ok(&["delete", "job", "count", "--wait=false"]).unwrap();
    for f in ["daemonset.yaml", "statefulset.yaml"] {
        let out = cp.kubectl_as(
            &cp.kubeconfig("admin"),
            &["delete", "-f", "-", "--wait=false"],
            Some(&example(f)),
        );
        assert!(out.status.success(), "deleting {f}");
    }
    eventually("every pod is gone", Duration::from_secs(60), || {
        json(&cp, &["get", "pods"])["items"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    });
    eventually("every address is released", Duration::from_secs(20), || {
        dirs.allocations() == 0
    });
    eprintln!("teardown took {:?}", start.elapsed());
}

/// The log of pod `name` once it has finished (restartPolicy Never), as `== <section>` blocks.
fn finished_sections(cp: &ControlPlane, name: &str) -> Vec<(String, String)> {
    eventually(&format!("{name} finishes"), Duration::from_secs(90), || {
        cp.ok(&["get", "pod", name, "-o", "jsonpath={.status.phase}"])
            .is_ok_and(|s| s == "Succeeded" || s == "Failed")
    });
    let log = cp.ok(&["logs", name]).unwrap();
    let mut out = vec![("head".to_string(), String::new())];
    for line in log.lines() {
        if let Some(title) = line.strip_prefix("== ") {
            out.push((title.to_string(), String::new()));
        } else {
            let last = out.last_mut().unwrap();
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    out
}

fn section<'a>(s: &'a [(String, String)], title: &str) -> &'a str {
    &s.iter()
        .find(|(t, _)| t == title)
        .unwrap_or_else(|| panic!("no section {title} in {s:?}"))
        .1
}

/// Section `title` of a pod's log holds `want`.
fn expect(sections: &[(String, String)], title: &str, want: &str) {
    let text = section(sections, title);
    assert!(
        text.contains(want),
        "{title}: {want:?} missing from:\n{text}"
    );
}

#[test]
fn pods_resolve_cluster_names_through_the_node_dns() {
    let mut t = Topology::new(0).expect("topology");
    t.extra_interfaces = vec!["fy*".into()];
    // Names outside the cluster go nowhere: nothing listens on the discard port.
    t.proxy_args = [
        "--dns-addr",
        "169.254.20.10",
        "--dns-upstream",
        "127.0.0.1:9",
    ]
    .map(String::from)
    .to_vec();
    let dirs = RuntimeDirs::new();
    let cp = ControlPlane::start_in(Some(&t.node.name), &["--node-kubeconfigs", "node-a"])
        .expect("control plane");
    let _controllers = cp.spawn_controllers(&[]).expect("controllers");
    let _proxy = t
        .start_proxy_api(&cp.kubeconfig("kube-proxy"))
        .expect("ferry-proxy");
    let _kubelet = Kubelet::start_with(&t, &cp, &dirs, POD_CIDR, &["--cluster-dns", "10.96.0.10"]);

    // The control plane made the cluster DNS Service at the tenth address.
    let dns_ip = cp
        .ok(&[
            "get",
            "svc",
            "-n",
            "kube-system",
            "kube-dns",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .unwrap();
    assert_eq!(dns_ip, "10.96.0.10");

    // A StatefulSet behind a headless Service, a ClusterIP Service to delete later, an
    // ExternalName to change later.
    apply(
        &cp,
        "apiVersion: v1
kind: Service
metadata: {name: nginx, namespace: default}
spec:
  clusterIP: None
  selector: {app: nginx}
  ports: [{name: web, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: gone, namespace: default}
spec:
  selector: {app: nginx}
  ports: [{name: web, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: nginx.default.svc.cluster.local}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web, namespace: default}
spec:
  serviceName: nginx
  replicas: 1
  selector: {matchLabels: {app: nginx}}
  template:
    metadata: {labels: {app: nginx}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: c
        image: ferry.local/busybox:1
        imagePullPolicy: IfNotPresent
        command: [sleep, '3600']
",
    );
    eventually("web-0 runs", Duration::from_secs(90), || {
        cp.ok(&["get", "pod", "web-0", "-o", "jsonpath={.status.podIP}"])
            .is_ok_and(|s| !s.is_empty())
    });
    let web0 = cp
        .ok(&["get", "pod", "web-0", "-o", "jsonpath={.status.podIP}"])
        .unwrap();
    let gone = cp
        .ok(&["get", "svc", "gone", "-o", "jsonpath={.spec.clusterIP}"])
        .unwrap();

    // ClusterFirst: short names through the search list (libc, as applications resolve; ping
    // prints what it resolved), the rest with nslookup.
    let script = "cat /etc/resolv.conf; echo \"hostname=$(hostname)\"; cat /etc/hosts; \
        for n in kubernetes.default kubernetes.default.svc kubernetes.default.svc.cluster.local web-0.nginx gone; do \
          echo \"== $n\"; ping -c1 -W1 $n 2>&1 | head -1; done; \
        echo '== srv'; nslookup -type=srv _web._tcp.nginx.default.svc.cluster.local; \
        echo '== ptr'; nslookup 10.96.0.1; \
        echo '== ext'; nslookup -type=cname ext.default.svc.cluster.local; \
        ip=$(hostname -i); echo '== pod'; echo $ip; nslookup $(echo $ip | tr . -).default.pod.cluster.local; \
        echo '== end'";
    apply(
        &cp,
        &busybox_pod(
            "q1",
            "{}",
            script,
            "  restartPolicy: Never\n  hostname: q1\n  subdomain: nginx\n  \
             hostAliases: [{ip: 192.0.2.7, hostnames: [foo.local, bar.local]}]\n",
        ),
    );
    let q1 = finished_sections(&cp, "q1");
    for want in [
        "nameserver 10.96.0.10",
        "search default.svc.cluster.local svc.cluster.local cluster.local",
        "options ndots:5",
        "hostname=q1",
        "127.0.0.1\tlocalhost",
        "\tq1.nginx.default.svc.cluster.local\tq1",
        "192.0.2.7\tfoo.local\tbar.local",
    ] {
        expect(&q1, "head", want);
    }
    for n in [
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ] {
        expect(&q1, n, &format!("PING {n} (10.96.0.1)"));
    }
    expect(&q1, "web-0.nginx", &format!("({web0})"));
    expect(&q1, "gone", &format!("({gone})"));
    expect(&q1, "srv", "80 web-0.nginx.default.svc.cluster.local");
    expect(&q1, "ptr", "kubernetes.default.svc.cluster.local");
    expect(
        &q1,
        "ext",
        "canonical name = nginx.default.svc.cluster.local",
    );
    let pod = section(&q1, "pod");
    let ip = pod.lines().next().unwrap();
    assert!(ip.starts_with("10.244.70."), "the pod's own address: {pod}");
    assert!(
        pod.contains(&format!("Address: {ip}")),
        "the pod A record: {pod}"
    );

    // Changes at run time: the ExternalName points elsewhere, a deleted Service is gone. The
    // asking pod brings its own resolver configuration (dnsPolicy None).
    cp.ok(&[
        "patch",
        "svc",
        "ext",
        "-p",
        r#"{"spec":{"externalName":"kubernetes.default.svc.cluster.local"}}"#,
    ])
    .unwrap();
    cp.ok(&["delete", "svc", "gone"]).unwrap();
    let script = "cat /etc/resolv.conf; \
        echo '== ext'; nslookup -type=cname ext.default.svc.cluster.local; \
        echo '== gone'; nslookup gone.default.svc.cluster.local; \
        echo '== web-0.nginx'; ping -c1 -W1 web-0.nginx 2>&1 | head -1; echo '== end'";
    apply(
        &cp,
        &busybox_pod(
            "q2",
            "{}",
            script,
            "  restartPolicy: Never\n  dnsPolicy: None\n  dnsConfig:\n    \
             nameservers: [10.96.0.10]\n    searches: [default.svc.cluster.local]\n    \
             options: [{name: ndots, value: '2'}]\n",
        ),
    );
    let q2 = finished_sections(&cp, "q2");
    let head = section(&q2, "head");
    assert!(
        head.contains("nameserver 10.96.0.10")
            && head.contains("search default.svc.cluster.local\n")
            && head.contains("options ndots:2"),
        "{head}"
    );
    expect(
        &q2,
        "ext",
        "canonical name = kubernetes.default.svc.cluster.local",
    );
    expect(&q2, "gone", "NXDOMAIN");
    expect(&q2, "web-0.nginx", &format!("({web0})"));
}

/// A node namespace with the control plane, the controllers, ferry-proxy and ferry-kubelet
/// (containerd); fields drop in order: the kubelet first, the namespace last.
struct OneNode {
    _kubelet: Kubelet,
    _proxy: ferry_testbed::Proxy,
    _controllers: [ferry_testbed::controlplane::Component; 2],
    cp: ControlPlane,
    dirs: RuntimeDirs,
    t: Topology,
}

fn one_node() -> OneNode {
    let mut t = Topology::new(0).expect("topology");
    t.extra_interfaces = vec!["fy*".into()];
    let dirs = RuntimeDirs::new();
    let cp =
        ControlPlane::start_reachable(&t.node.name, NODE_IP, &["--node-kubeconfigs", "node-a"])
            .expect("control plane");
    let controllers = cp.spawn_controllers(&[]).expect("controllers");
    let proxy = t
        .start_proxy_api(&cp.kubeconfig("kube-proxy"))
        .expect("ferry-proxy");
    let kubelet = Kubelet::start(&t, &cp, &dirs, POD_CIDR);
    OneNode {
        _kubelet: kubelet,
        _proxy: proxy,
        _controllers: controllers,
        cp,
        dirs,
        t,
    }
}

#[test]
fn containers_read_configmaps_secrets_and_the_downward_api_in_their_environment() {
    let node = one_node();
    let cp = &node.cp;
    apply(
        cp,
        "apiVersion: v1
kind: ConfigMap
metadata: {name: app, namespace: default}
data: {mode: fast, greeting: hello, OVERRIDE: from-configmap}
---
apiVersion: v1
kind: Secret
metadata: {name: db, namespace: default}
data: {password: czNjcmV0}
",
    );
    // Literals win over envFrom, envFrom over the Services' variables; an optional missing
    // key sets nothing; resources in units of their divisor; labels by key.
    // (`$$` is Kubernetes' escape for `$` in a command: the shell gets `\$$v`.)
    let print = "echo '== env'; for v in MODE PASS CFG_greeting CFG_mode OVERRIDE MEM CPU TIER NAME REF; \
                 do eval echo $v=\\$$$$v; done; echo OPT=${OPT-unset}; echo DB_password=$DB_password; \
                 echo ARG=$1";
    apply(
        cp,
        &busybox_pod(
            "envs",
            "{tier: web}",
            print,
            "    env:
    - {name: MODE, valueFrom: {configMapKeyRef: {name: app, key: mode}}}
    - {name: PASS, valueFrom: {secretKeyRef: {name: db, key: password}}}
    - {name: OPT, valueFrom: {configMapKeyRef: {name: app, key: nope, optional: true}}}
    - {name: MEM, valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}}
    - {name: CPU, valueFrom: {resourceFieldRef: {resource: requests.cpu, divisor: 1m}}}
    - {name: TIER, valueFrom: {fieldRef: {fieldPath: \"metadata.labels['tier']\"}}}
    - {name: NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: OVERRIDE, value: literal}
    - {name: REF, value: \"$(MODE)-$(UNDEFINED)-$$(MODE)\"}
    args: [zero, \"$(NAME)\"]
    envFrom:
    - {configMapRef: {name: app}, prefix: CFG_}
    - {configMapRef: {name: app}}
    - {secretRef: {name: db}, prefix: DB_}
    - {secretRef: {name: absent, optional: true}}
    resources: {limits: {memory: 96Mi, cpu: 250m}}
  restartPolicy: Never
  nodeName: node-a
",
        ),
    );
    let s = finished_sections(cp, "envs");
    for want in [
        "MODE=fast\n",
        "PASS=s3cret\n",
        "CFG_greeting=hello\n",
        "CFG_mode=fast\n",
        "OVERRIDE=literal\n",
        "MEM=96\n",
        "CPU=250\n",
        "TIER=web\n",
        "NAME=envs\n",
        "OPT=unset\n",
        "DB_password=s3cret\n",
        "REF=fast-$(UNDEFINED)-$(MODE)\n",
        "ARG=envs\n",
    ] {
        expect(&s, "env", want);
    }

    // A required ConfigMap that does not exist yet: the container waits with Kubernetes'
    // reason and message, and starts once the ConfigMap is there.
    apply(
        cp,
        &busybox_pod(
            "waits",
            "{}",
            "echo '== env'; echo LATER=$LATER",
            "    env:
    - {name: LATER, valueFrom: {configMapKeyRef: {name: later, key: k}}}
  restartPolicy: Never
  nodeName: node-a
",
        ),
    );
    eventually(
        "waits is held in CreateContainerConfigError",
        Duration::from_secs(60),
        || {
            let w = &container_status(cp, "waits")["state"]["waiting"];
            w["reason"] == "CreateContainerConfigError"
                && w["message"] == "configmap \"later\" not found"
        },
    );
    apply(
        cp,
        "apiVersion: v1
kind: ConfigMap
metadata: {name: later, namespace: default}
data: {other: x}
",
    );
    eventually("a missing key is named", Duration::from_secs(30), || {
        container_status(cp, "waits")["state"]["waiting"]["message"]
            == "couldn't find key k in ConfigMap default/later"
    });
    apply(
        cp,
        "apiVersion: v1
kind: ConfigMap
metadata: {name: later, namespace: default}
data: {k: arrived}
",
    );
    expect(&finished_sections(cp, "waits"), "env", "LATER=arrived\n");
}

#[test]
fn configmap_secret_downward_and_projected_volumes_are_written_read_only_and_follow_their_sources()
{
    let node = one_node();
    let cp = &node.cp;
    let web = |v: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: web, namespace: default}}\n\
             data: {{index.html: {v}, other: x}}\n"
        )
    };
    apply(cp, &web("v1"));
    apply(
        cp,
        "apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: default}
data: {user: YWRtaW4=}
",
    );
    // Every second: each mount's content, the secret file's mode, whether a volume is writable.
    let report = "while true; do echo \"web=$(cat /etc/web/index.html) item=$(cat /etc/items/pages/one.txt) \
                  sub=$(cat /etc/sub/index.html) user=$(cat /etc/creds/user) \
                  mode=$(ls -lL /etc/creds/user | cut -c1-10) items=$(ls /etc/items | tr '\\n' ,) \
                  write=$(touch /etc/web/x 2>/dev/null && echo rw || echo ro) \
                  proj=$(cat /etc/all/web.html),$(cat /etc/all/user),$(cat /etc/all/mem),$(cat /etc/all/name) \
                  labels=$(cat /etc/all/labels | tr '\\n' ' ')\"; sleep 1; done";
    apply(
        cp,
        &busybox_pod(
            "reader",
            "{tier: web}",
            report,
            "    volumeMounts:
    - {name: web, mountPath: /etc/web}
    - {name: items, mountPath: /etc/items}
    - {name: web, mountPath: /etc/sub/index.html, subPath: index.html}
    - {name: creds, mountPath: /etc/creds}
    - {name: all, mountPath: /etc/all}
    resources: {limits: {memory: 64Mi}}
  nodeName: node-a
  volumes:
  - name: all
    projected:
      sources:
      - configMap: {name: web, items: [{key: index.html, path: web.html}]}
      - secret: {name: creds}
      - downwardAPI:
          items:
          - {path: labels, fieldRef: {fieldPath: metadata.labels}}
          - {path: name, fieldRef: {fieldPath: metadata.name}}
          - {path: mem, resourceFieldRef: {containerName: c, resource: limits.memory, divisor: 1Mi}}
  - {name: web, configMap: {name: web}}
  - {name: items, configMap: {name: web, items: [{key: index.html, path: pages/one.txt}]}}
  - {name: creds, secret: {secretName: creds, defaultMode: 256}}
",
        ),
    );
    // The reader's last line (printed when it changes, for a failure's diagnosis).
    let seen = std::cell::RefCell::new(String::new());
    let last = || {
        let mut line = cp
            .ok(&["logs", "reader", "--tail=1"])
            .unwrap_or_default()
            .trim()
            .to_string();
        if line.is_empty() {
            line = container_status(cp, "reader")["state"].to_string();
        }
        if *seen.borrow() != line {
            eprintln!("reader: {line}");
            seen.replace(line.clone());
        }
        line
    };
    let want = "web=v1 item=v1 sub=v1 user=admin mode=-r-------- items=pages, write=ro \
                proj=v1,admin,64,reader labels=tier=\"web\"";
    eventually("reader reports its mounts", Duration::from_secs(90), || {
        last() == want
    });
    // Changes reach the mounted files in place (a subPath mount keeps what it started with):
    // the ConfigMap's, and the pod's labels in the downward API's file.
    apply(cp, &web("v2"));
    cp.ok(&["label", "pod", "reader", "tier=db", "--overwrite"])
        .unwrap();
    let want = "web=v2 item=v2 sub=v1 user=admin mode=-r-------- items=pages, write=ro \
                proj=v2,admin,64,reader labels=tier=\"db\"";
    eventually(
        "the changes reach the volumes",
        Duration::from_secs(60),
        || last() == want,
    );

    // A symlink a container leaves in a volume does not lead another's subPath mount out of
    // it (CVE-2017-1002101).
    apply(
        cp,
        "apiVersion: v1
kind: Pod
metadata: {name: escape, namespace: default}
spec:
  nodeName: node-a
  restartPolicy: Never
  initContainers:
  - {name: plant, image: ferry.local/busybox:1, imagePullPolicy: IfNotPresent,
     command: [ln, -s, /, /v/root], volumeMounts: [{name: v, mountPath: /v}]}
  containers:
  - {name: c, image: ferry.local/busybox:1, imagePullPolicy: IfNotPresent,
     command: [ls, /host], volumeMounts: [{name: v, mountPath: /host, subPath: root}]}
  volumes: [{name: v, emptyDir: {}}]
",
    );
    eventually(
        "escape's subPath is refused",
        Duration::from_secs(60),
        || {
            let w = &container_status(cp, "escape")["state"]["waiting"];
            w["reason"] == "CreateContainerConfigError"
                && w["message"] == "volumeMount \"v\": subPath \"root\" leads outside its volume"
        },
    );

    // A required ConfigMap that is missing holds the pod with Kubernetes' message.
    apply(
        cp,
        &busybox_pod(
            "nomount",
            "{}",
            "true",
            "    volumeMounts: [{name: v, mountPath: /v}]
  restartPolicy: Never
  nodeName: node-a
  volumes: [{name: v, configMap: {name: absent}}]
",
        ),
    );
    eventually(
        "nomount waits for its ConfigMap",
        Duration::from_secs(60),
        || {
            let w = &container_status(cp, "nomount")["state"]["waiting"];
            w["reason"] == "ContainerCreating"
                && w["message"]
                    == "MountVolume.SetUp failed for volume \"v\" : configmap \"absent\" not found"
        },
    );
}

/// A kubeconfig that authenticates with `token` only (the admin's server and CA, no client
/// certificate), written next to the control plane's.
fn token_kubeconfig(cp: &ControlPlane, name: &str, token: &str) -> std::path::PathBuf {
    let admin: Value =
        serde_yaml::from_str(&std::fs::read_to_string(cp.kubeconfig("admin")).unwrap()).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let path = cp.kubeconfig(name);
    let cfg = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "ferry", "cluster": {"server": cluster["server"],
            "certificate-authority-data": cluster["certificate-authority-data"]}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": "ferry", "user": name, "namespace": "default"}}],
        "current-context": name,
    });
    std::fs::write(&path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    path
}

/// (success, stdout, stderr) of kubectl with `kubeconfig`.
fn kubectl_with(
    cp: &ControlPlane,
    kubeconfig: &std::path::Path,
    args: &[&str],
) -> (bool, String, String) {
    let out = cp.kubectl_as(kubeconfig, args, None);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn service_account_tokens_authenticate_kubectl_and_pods_and_rbac_applies() {
    let node = one_node();
    let cp = &node.cp;
    eventually(
        "the default ServiceAccount exists",
        Duration::from_secs(30),
        || cp.ok(&["get", "serviceaccount", "default"]).is_ok(),
    );

    // TokenRequest: bounds checked, then a token kubectl authenticates with as the account.
    let short = cp.kubectl(&["create", "token", "default", "--duration=5m"]);
    assert!(!short.status.success());
    let err = String::from_utf8_lossy(&short.stderr);
    assert!(
        err.contains("may not specify a duration less than 10 minutes"),
        "{err}"
    );
    let token = cp
        .ok(&["create", "token", "default"])
        .unwrap()
        .trim()
        .to_string();
    let as_default = token_kubeconfig(cp, "sa-default", &token);
    let (ok, _, err) = kubectl_with(cp, &as_default, &["get", "pods"]);
    assert!(!ok);
    assert!(
        err.contains(
            "User \"system:serviceaccount:default:default\" cannot list resource \"pods\""
        ),
        "{err}"
    );
    // A token signed by someone else, or changed, is nobody.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[2] = parts[2].chars().rev().collect();
    let forged = token_kubeconfig(cp, "sa-forged", &parts.join("."));
    let (ok, _, err) = kubectl_with(cp, &forged, &["get", "pods"]);
    assert!(!ok && err.contains("Unauthorized"), "{err}");

    // An account with a Role: its token lists pods, and not secrets.
    apply(
        cp,
        "apiVersion: v1
kind: ServiceAccount
metadata: {name: lister, namespace: default}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader, namespace: default}
rules: [{apiGroups: [''], resources: [pods], verbs: [get, list]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: lister-reads-pods, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}
subjects: [{kind: ServiceAccount, name: lister, namespace: default}]
",
    );
    let lister_token = cp
        .ok(&["create", "token", "lister"])
        .unwrap()
        .trim()
        .to_string();
    let as_lister = token_kubeconfig(cp, "sa-lister", &lister_token);
    eventually(
        "the lister's binding applies",
        Duration::from_secs(10),
        || kubectl_with(cp, &as_lister, &["get", "pods"]).0,
    );
    let (ok, _, err) = kubectl_with(cp, &as_lister, &["get", "secrets"]);
    assert!(
        !ok && err.contains("cannot list resource \"secrets\""),
        "{err}"
    );

    // In a pod: the token, the cluster CA and the namespace are mounted, and an in-cluster
    // client (kube-rs' Config::incluster, TLS verified against the mounted CA) reaches the API
    // through the kubernetes Service as the pod's account.
    let client_pod = |name: &str, account: &str, extra: &str| {
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  nodeName: node-a
  restartPolicy: Never
  serviceAccountName: {account}
{extra}  containers:
  - {{name: c, image: ferry.local/incluster:1, imagePullPolicy: IfNotPresent, args: [pods, secrets]}}
"
        )
    };
    apply(cp, &client_pod("client", "lister", ""));
    let pod = json(cp, &["get", "pod", "client"]);
    let volume = pod["spec"]["volumes"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(volume.starts_with("kube-api-access-"), "{pod}");
    assert_eq!(
        pod["spec"]["containers"][0]["volumeMounts"][0],
        serde_json::json!({"name": volume, "readOnly": true,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})
    );
    let finished = |name: &str| {
        let p = json(cp, &["get", "pod", name]);
        matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
    };
    eventually("the in-cluster client ran", Duration::from_secs(90), || {
        finished("client")
    });
    let logs = cp.ok(&["logs", "client"]).unwrap();
    eprintln!("client: {logs}");
    assert!(logs.contains("pods: "), "{logs}");
    assert!(logs.contains(" items"), "{logs}");
    assert!(
        logs.contains("secrets: 403 Forbidden: secrets is forbidden: User \"system:serviceaccount:default:lister\""),
        "{logs}"
    );

    // automountServiceAccountToken: false leaves the pod without credentials.
    apply(
        cp,
        &client_pod(
            "nomount",
            "lister",
            "  automountServiceAccountToken: false\n",
        ),
    );
    let pod = json(cp, &["get", "pod", "nomount"]);
    assert!(pod["spec"]["volumes"].is_null(), "{pod}");
    eventually(
        "the client without a token ran",
        Duration::from_secs(60),
        || finished("nomount"),
    );
    let logs = cp.ok(&["logs", "nomount"]).unwrap();
    assert!(logs.contains("no in-cluster configuration"), "{logs}");

    // A pod naming an account that does not exist is refused.
    let out = cp.kubectl_as(
        &cp.kubeconfig("admin"),
        &["apply", "-f", "-"],
        Some(&client_pod("ghost", "nobody", "")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "error looking up service account default/nobody: serviceaccount \"nobody\" not found"
        ),
        "{err}"
    );

    // Deleting the account revokes its tokens at once.
    cp.ok(&["delete", "serviceaccount", "lister"]).unwrap();
    let (ok, _, err) = kubectl_with(cp, &as_lister, &["get", "pods"]);
    assert!(!ok && err.contains("Unauthorized"), "{err}");
}

#[test]
fn images_are_pulled_from_a_private_registry_with_the_pods_pull_secret() {
    let node = one_node();
    let cp = &node.cp;
    let registry = Registry::start(&node.t.node, NODE_IP, 5000, "ferry", "s3cret-pw");
    registry.push(
        &common::containerd::images_dir().join("echo.tar"),
        "team/echo:1",
    );
    registry.trust(&node.dirs.layout.registry_hosts_dir);
    let server = format!("--docker-server={}", registry.host);
    for (name, password) in [("regcred", "s3cret-pw"), ("wrongcred", "not-it")] {
        cp.ok(&[
            "create",
            "secret",
            "docker-registry",
            name,
            &server,
            "--docker-username=ferry",
            &format!("--docker-password={password}"),
        ])
        .unwrap();
    }
    let pod = |name: &str, image: &str, secret: Option<&str>| {
        let secrets = secret
            .map(|s| format!("  imagePullSecrets: [{{name: {s}}}]\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  nodeName: node-a
  terminationGracePeriodSeconds: 1
{secrets}  containers:
  - {{name: c, image: '{}/{image}', imagePullPolicy: Always}}
",
            registry.host
        )
    };
    apply(cp, &pod("private", "team/echo:1", Some("regcred")));
    apply(cp, &pod("anonymous", "team/echo:1", None));
    apply(cp, &pod("wrong", "team/echo:1", Some("wrongcred")));
    apply(cp, &pod("absent", "team/nothing:1", Some("regcred")));

    // With the secret the image is pulled and the container runs.
    eventually("the private image runs", Duration::from_secs(90), || {
        container_status(cp, "private")["state"]["running"].is_object()
    });
    // Without it, or with a wrong password, or for an image that is not there: ErrImagePull
    // (then ImagePullBackOff) with the registry's reason.
    let refused = |name: &str, because: &[&str]| {
        eventually(
            &format!("{name} is refused by the registry"),
            Duration::from_secs(60),
            || {
                let w = &container_status(cp, name)["state"]["waiting"];
                let msg = w["message"].as_str().unwrap_or_default().to_lowercase();
                let pulling = matches!(
                    w["reason"].as_str(),
                    Some("ErrImagePull" | "ImagePullBackOff")
                );
                if pulling {
                    eprintln!("{name}: {msg}");
                    assert!(
                        because.iter().any(|b| msg.contains(b)),
                        "{name}: {msg} (expected one of {because:?})"
                    );
                    return true;
                }
                false
            },
        )
    };
    refused("anonymous", &["401 unauthorized", "authorization failed"]);
    refused("wrong", &["401 unauthorized", "authorization failed"]);
    refused("absent", &["not found"]);
}

/// kubectl as the admin in the node's namespace with its output, status and stdin given.
/// Runs a Python client script in the node's namespace with the admin's kubeconfig as its
/// first argument; its output.
fn python_as_admin(node: &OneNode, script: &str) -> String {
    node.t
        .node
        .exec(
            ferry_testbed::controlplane::python().to_str().unwrap(),
            &["-c", script, node.cp.kubeconfig("admin").to_str().unwrap()],
        )
        .unwrap()
}

#[test]
fn exec_attach_cp_and_port_forward_stream_through_the_api_server_and_kubelet() {
    let node = one_node();
    let cp = &node.cp;
    apply(
        cp,
        &busybox_pod("shell", "{}", "sleep 3600", "  nodeName: node-a\n"),
    );
    apply(
        cp,
        "apiVersion: v1
kind: Pod
metadata: {name: talk, namespace: default}
spec:
  nodeName: node-a
  restartPolicy: Never
  containers:
  - {name: c, image: ferry.local/busybox:1, imagePullPolicy: IfNotPresent, stdin: true,
     command: [sh, -c, 'read l; echo got:$l; sleep 30']}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: default}
spec:
  nodeName: node-a
  containers:
  - {name: c, image: ferry.local/echo:1, imagePullPolicy: IfNotPresent}
",
    );
    for p in ["shell", "talk", "echo"] {
        eventually(&format!("{p} runs"), Duration::from_secs(90), || {
            container_status(cp, p)["state"]["running"].is_object()
        });
    }

    // Both of kubectl's transports: WebSocket (v5 channels for exec and cp, the tunnelled SPDY
    // of port-forward: served by the API server, carried to the kubelet over SPDY) and SPDY/3.1
    // (kubectl's fallback, proxied to the runtime). At `-v=4` kubectl logs a fallback
    // ("RemoteCommand fallback", "fallback to secondary dialer"), which the WebSocket round
    // must never do.
    let admin = cp.kubeconfig("admin");
    let spdy_only = [
        ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false"),
        ("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (transport, env) in [("WebSocket", &[][..]), ("SPDY", &spdy_only[..])] {
        let no_fallback = |args: &[&str], err: &str| {
            if transport == "WebSocket" {
                assert!(
                    !err.to_lowercase().contains("fallback"),
                    "kubectl {args:?} fell back from WebSocket: {err}"
                );
            }
        };
        let run = |args: &[&str], stdin: Option<&str>| {
            let all: Vec<&str> = ["-v=4"].iter().chain(args).copied().collect();
            let out = cp.kubectl_env(&admin, env, &all, stdin);
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            no_fallback(args, &err);
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            (out.status.code(), stdout, err)
        };

        // exec: output, exit code, stdin (its end of file included).
        let (code, out, err) = run(
            &[
                "exec",
                "shell",
                "--",
                "sh",
                "-c",
                "echo hi; echo oops >&2; exit 3",
            ],
            None,
        );
        assert_eq!(code, Some(3), "{transport}: {out}{err}");
        assert_eq!(out, "hi\n", "{transport}");
        assert!(err.contains("oops"), "{transport}: {err}");
        let (code, out, err) = run(
            &[
                "exec",
                "-i",
                "shell",
                "--",
                "sh",
                "-c",
                "cat > /tmp/x; wc -c < /tmp/x",
            ],
            Some("hello\n"),
        );
        assert_eq!((code, out.trim()), (Some(0), "6"), "{transport}: {err}");

        // cp both ways (tar through exec; into the pod needs stdin's end of file).
        let local = dir.path().join(format!("in-{transport}.txt"));
        std::fs::write(&local, format!("copied in over {transport}\n")).unwrap();
        let (code, _, err) = run(&["cp", local.to_str().unwrap(), "shell:/tmp/in.txt"], None);
        assert_eq!(code, Some(0), "{transport}: cp in: {err}");
        let (_, out, _) = run(&["exec", "shell", "--", "cat", "/tmp/in.txt"], None);
        assert_eq!(out, format!("copied in over {transport}\n"));
        let back = dir.path().join(format!("out-{transport}.txt"));
        let (code, _, err) = run(&["cp", "shell:/tmp/in.txt", back.to_str().unwrap()], None);
        assert_eq!(code, Some(0), "{transport}: cp out: {err}");
        assert_eq!(
            std::fs::read_to_string(&back).unwrap(),
            format!("copied in over {transport}\n")
        );

        // port-forward carries a connection to the pod's port.
        let mut pf = node
            .t
            .node
            .spawn(
                std::process::Command::new("kubectl")
                    .envs(env.iter().copied())
                    .args(["--kubeconfig", admin.to_str().unwrap(), "-v=4"])
                    .args(["port-forward", "pod/echo", "18080:8080"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped()),
            )
            .unwrap();
        let mut answered = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let to = "127.0.0.1:18080".parse().unwrap();
            if let Ok(a) = ferry_testbed::echo::tcp_ask_from(&node.t.node, to) {
                answered = Some(a);
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = pf.kill();
        let out = pf.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let a = answered.unwrap_or_else(|| {
            panic!("{transport}: no answer through kubectl port-forward: {err}")
        });
        assert_eq!(a.server, "echo");
        no_fallback(&["port-forward"], &err);
    }

    // With a terminal (script gives kubectl one): the container sees a pty and its size.
    let inner = format!(
        "kubectl --kubeconfig {} exec -it shell -- sh -c 'tty; sleep 1; stty size'",
        cp.kubeconfig("admin").display()
    );
    let tty = node
        .t
        .node
        .exec(
            "script",
            &[
                "-qec",
                &format!("stty cols 91 rows 33; {inner}"),
                "/dev/null",
            ],
        )
        .unwrap();
    assert!(tty.contains("/dev/pts/"), "{tty}");
    assert!(
        tty.contains("33 91"),
        "the terminal size reaches the container: {tty}"
    );

    // attach: stdin reaches the running container, its output comes back (stdin kept open
    // until then: closing it ends the attach session).
    let mut attach = node
        .t
        .node
        .spawn(
            std::process::Command::new("kubectl")
                .args(["--kubeconfig", cp.kubeconfig("admin").to_str().unwrap()])
                .args(["attach", "-i", "talk"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null()),
        )
        .unwrap();
    let mut stdin = attach.stdin.take().unwrap();
    let stdout = attach.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The stream is up once kubectl has connected; give it a moment, then type.
    std::thread::sleep(Duration::from_secs(1));
    use std::io::Write as _;
    stdin.write_all(b"ping\n").unwrap();
    let got = rx.recv_timeout(Duration::from_secs(20));
    drop(stdin);
    let _ = attach.kill();
    let _ = attach.wait();
    let logs = cp.ok(&["logs", "talk"]).unwrap_or_default();
    assert_eq!(
        got.as_deref(),
        Ok("got:ping"),
        "attach; the container logged {logs:?}"
    );

    // The Python client's WebSocket exec (v4.channel.k8s.io) with its exit code.
    let script = r#"
import sys
from kubernetes import client, config
from kubernetes.stream import stream
config.load_kube_config(sys.argv[1])
api = client.CoreV1Api()
r = stream(api.connect_get_namespaced_pod_exec, 'shell', 'default',
           command=['sh', '-c', 'echo from-python; exit 7'],
           stderr=True, stdin=False, stdout=True, tty=False, _preload_content=False)
r.run_forever(timeout=20)
print(r.read_stdout().strip(), r.returncode)
"#;
    let py = python_as_admin(&node, script);
    assert_eq!(py.trim(), "from-python 7");
    // ... and its WebSocket port-forward (v4 channels, the ports in the query).
    let script = r#"
import sys
from kubernetes import client, config
from kubernetes.stream import portforward
config.load_kube_config(sys.argv[1])
api = client.CoreV1Api()
pf = portforward(api.connect_get_namespaced_pod_portforward, 'echo', 'default', ports='8080')
s = pf.socket(8080)
s.settimeout(20)
s.sendall(b'?')
got = b''
while not got.endswith(b'\n'):
    chunk = s.recv(1024)
    if not chunk:
        break
    got += chunk
s.close()
print(repr(got), pf.error(8080))
"#;
    let py = python_as_admin(&node, script);
    assert!(py.starts_with("b'echo "), "{py}");
    assert!(py.trim().ends_with(" None"), "no port-forward error: {py}");

    // Only the API server gets in: a node's own credentials are refused by RBAC at the API
    // and by the kubelet's port, which anyone without a client certificate cannot even reach.
    let node_cfg = cp.kubeconfig("node-node-a");
    let out = cp.kubectl_as(&node_cfg, &["exec", "shell", "--", "true"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot create resource \"pods/exec\""),
        "{err}"
    );
    let kc: Value = serde_yaml::from_str(&std::fs::read_to_string(&node_cfg).unwrap()).unwrap();
    let b64 = |v: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    };
    std::fs::write(
        dir.path().join("n.crt"),
        b64(&kc["users"][0]["user"]["client-certificate-data"]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("n.key"),
        b64(&kc["users"][0]["user"]["client-key-data"]),
    )
    .unwrap();
    let url = format!("https://{NODE_IP}:10250/containerLogs/default/shell/c");
    let as_node = node
        .t
        .node
        .exec(
            "curl",
            &[
                "-sk",
                "-w",
                " %{http_code}",
                "--cert",
                dir.path().join("n.crt").to_str().unwrap(),
                "--key",
                dir.path().join("n.key").to_str().unwrap(),
                &url,
            ],
        )
        .unwrap();
    assert!(as_node.ends_with(" 403"), "{as_node}");
    let anonymous = node.t.node.exec("curl", &["-sk", &url]);
    assert!(anonymous.is_err(), "{anonymous:?}");
}

/// `kubectl top`: the kubelet samples its containers (CRI stats) and the node, the API server
/// serves `metrics.k8s.io` from the kubelet's `/stats/summary`, kubectl prints both.
#[test]
fn kubectl_top_shows_pod_and_node_usage_from_the_kubelet() {
    let node = one_node();
    let cp = &node.cp;
    // A busy loop for at most a minute (the test takes less) and 16 MiB in memory (tmpfs).
    apply(
        cp,
        &busybox_pod(
            "busy",
            "{app: busy}",
            "head -c 16777216 /dev/zero > /dev/shm/fill; timeout 60 sh -c 'while :; do :; done'; sleep 3600",
            "  nodeName: node-a\n",
        ),
    );
    eventually("busy runs", Duration::from_secs(90), || {
        container_status(cp, "busy")["state"]["running"].is_object()
    });
    // Two samples of the kubelet's (10 s apart) make a rate.
    let mut pods = String::new();
    eventually(
        "kubectl top pods lists busy",
        Duration::from_secs(60),
        || {
            pods = cp.ok(&["top", "pods", "-n", "default"]).unwrap_or_default();
            pods.lines().any(|l| l.starts_with("busy "))
        },
    );
    let line = pods.lines().find(|l| l.starts_with("busy ")).unwrap();
    let cols: Vec<&str> = line.split_whitespace().collect();
    let cpu: u64 = cols[1].trim_end_matches('m').parse().unwrap_or(0);
    assert!(cpu >= 200, "the busy loop's CPU, in millicores: {pods}");
    let mem: u64 = cols[2].trim_end_matches("Mi").parse().unwrap_or(0);
    assert!(
        (16..64).contains(&mem),
        "the 16 MiB it holds, and little more: {pods}"
    );
    let by_label = cp
        .ok(&["top", "pods", "-n", "default", "-l", "app=busy"])
        .unwrap();
    assert!(
        by_label.lines().any(|l| l.starts_with("busy ")),
        "{by_label}"
    );
    let o = cp.kubectl(&["top", "pods", "-n", "default", "-l", "app=other"]);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("busy"),
        "a selector that matches nothing: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let per = cp
        .ok(&["top", "pod", "busy", "-n", "default", "--containers"])
        .unwrap();
    assert!(
        per.lines()
            .any(|l| l.starts_with("busy ") && l.split_whitespace().nth(1) == Some("c")),
        "{per}"
    );
    let nodes = cp.ok(&["top", "nodes"]).unwrap();
    let n = nodes
        .lines()
        .find(|l| l.starts_with("node-a "))
        .unwrap_or_else(|| panic!("{nodes}"));
    assert!(n.contains('%') && n.contains("Mi"), "{nodes}");
    // A pod that is not there, and the API's read-only verbs.
    let o = cp.kubectl(&["top", "pod", "nope", "-n", "default"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `kubectl drain` evicts through `pods/eviction`, which a PodDisruptionBudget gates: with
/// `minAvailable: 2` of 2 ready pods nothing may go (429, kubectl retries until its timeout);
/// with 1 the pods go one at a time, the second once the first's replacement is ready.
#[test]
fn drain_evicts_pods_as_their_disruption_budget_allows() {
    let node = one_node();
    let cp = &node.cp;
    apply(
        cp,
        "apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeName: node-a
      terminationGracePeriodSeconds: 1
      containers:
      - {name: c, image: ferry.local/busybox:1, imagePullPolicy: IfNotPresent, command: [sleep, '3600']}
",
    );
    let ready_pods = || -> Vec<String> {
        let out = cp
            .ok(&[
                "-n", "default", "get", "pods", "-l", "app=web", "-o",
                r#"jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status} {.metadata.deletionTimestamp}{"\n"}{end}"#,
            ])
            .unwrap_or_default();
        out.lines()
            .map(str::trim_end)
            .filter(|l| l.split_whitespace().count() == 2 && l.ends_with(" True"))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect()
    };
    eventually("2 web pods ready", Duration::from_secs(90), || {
        ready_pods().len() == 2
    });
    let before = ready_pods();
    cp.ok(&[
        "-n",
        "default",
        "create",
        "pdb",
        "web",
        "--selector=app=web",
        "--min-available=2",
    ])
    .unwrap();
    let budget = |field: &str| {
        cp.ok(&[
            "-n",
            "default",
            "get",
            "pdb",
            "web",
            "-o",
            &format!("jsonpath={{.status.{field}}}"),
        ])
        .unwrap_or_default()
    };
    eventually("the budget's status", Duration::from_secs(20), || {
        budget("currentHealthy") == "2" && budget("disruptionsAllowed") == "0"
    });
    let drain = |timeout: &str| {
        cp.kubectl(&[
            "drain",
            "node-a",
            "--ignore-daemonsets",
            "--pod-selector=app=web",
            &format!("--timeout={timeout}"),
        ])
    };
    let o = drain("8s");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "drain went through a full budget");
    assert!(
        err.contains("Cannot evict pod as it would violate the pod's disruption budget"),
        "{err}"
    );
    assert_eq!(ready_pods(), before, "nothing was evicted");
    assert_eq!(
        cp.ok(&[
            "get",
            "node",
            "node-a",
            "-o",
            "jsonpath={.spec.unschedulable}"
        ])
        .unwrap(),
        "true",
        "drain cordoned the node"
    );

    cp.ok(&[
        "-n",
        "default",
        "patch",
        "pdb",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec": {"minAvailable": 1}}"#,
    ])
    .unwrap();
    eventually("one disruption allowed", Duration::from_secs(20), || {
        budget("disruptionsAllowed") == "1"
    });
    let o = drain("120s");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for p in &before {
        assert!(out.contains(&format!("pod/{p} evicted")), "{p} in:\n{out}");
    }
    eventually("the replacements ready", Duration::from_secs(60), || {
        let now = ready_pods();
        now.len() == 2 && now.iter().all(|p| !before.contains(p))
    });
    cp.ok(&["uncordon", "node-a"]).unwrap();
}
