//! The control plane against real clients: this machine's kubectl and the Python
//! `kubernetes` client, on the embedded store and on etcd; a crash test with kill -9.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use controlplane::store::etcd::LocalEtcd;
use ferry_testbed::controlplane::{temp_dir, ControlPlane};

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web, tier: front}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: ferry/echo:1
        ports:
        - containerPort: 8080
      - name: log
        image: busybox:1
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: 8080
"#;

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// kubectl as the user of a bearer token.
fn as_token(cp: &ControlPlane, token: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--token", token];
    all.extend_from_slice(args);
    cp.kubectl_as(&cp.kubeconfig("admin"), &all, None)
}

/// The command's error output says `want`.
#[track_caller]
fn expect_err(o: &std::process::Output, want: &str) {
    let err = stderr(o);
    assert!(err.contains(want), "expected {want:?} in: {err}");
}

/// The scenario a kubectl user goes through; `cp` is fresh.
fn kubectl_scenario(cp: &ControlPlane, tokens: bool) {
    let dir = &cp.dir;
    let app = write(dir, "app.yaml", APP);
    let out = cp.ok(&["apply", "-f", &app]).unwrap();
    assert!(out.contains("namespace/shop created"), "{out}");
    assert!(out.contains("deployment.apps/web created"), "{out}");
    assert!(out.contains("service/web created"), "{out}");

    // get, in the formats users use.
    let wide = cp
        .ok(&["-n", "shop", "get", "svc", "web", "-o", "wide"])
        .unwrap();
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE",
            "SELECTOR"
        ]
    );
    let row: Vec<&str> = wide.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[1], "NodePort");
    let ip: std::net::Ipv4Addr = row[2].parse().expect("a cluster IP");
    assert!(
        ipnetwork::Ipv4Network::new("10.96.0.0".parse().unwrap(), 12)
            .unwrap()
            .contains(ip)
    );
    let node_port: u16 = row[4]
        .trim_start_matches("80:")
        .trim_end_matches("/TCP")
        .parse()
        .unwrap();
    assert!((30000..=32767).contains(&node_port), "{}", row[4]);
    assert_eq!(row[6], "app=web");
    let d = cp
        .ok(&["-n", "shop", "get", "deploy", "-o", "wide"])
        .unwrap();
    assert!(
        d.lines()
            .next()
            .unwrap()
            .starts_with("NAME   READY   UP-TO-DATE   AVAILABLE   AGE   CONTAINERS   IMAGES"),
        "{d}"
    );
    assert!(
        d.contains("web,log") && d.contains("ferry/echo:1,busybox:1"),
        "{d}"
    );
    let yaml = cp
        .ok(&["-n", "shop", "get", "deploy", "web", "-o", "yaml"])
        .unwrap();
    let obj: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(
        obj["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%",
        "defaults applied"
    );
    assert_eq!(obj["metadata"]["generation"], 1);
    assert!(obj["metadata"]["uid"]
        .as_str()
        .is_some_and(|u| u.len() == 36));
    let jp = cp
        .ok(&["-n", "shop", "get", "svc", "web", "-o", "jsonpath={.spec.ports[0].protocol} {.spec.ports[0].targetPort} {.spec.sessionAffinity}"])
        .unwrap();
    assert_eq!(jp, "TCP 8080 None");
    let labels = cp
        .ok(&["-n", "shop", "get", "deploy", "--show-labels"])
        .unwrap();
    assert!(labels.contains("app=web,tier=front"), "{labels}");
    assert!(cp
        .ok(&[
            "-n",
            "shop",
            "get",
            "deploy",
            "-l",
            "tier=front",
            "-o",
            "name"
        ])
        .unwrap()
        .contains("deployment.apps/web"));
    assert!(cp
        .ok(&[
            "-n",
            "shop",
            "get",
            "deploy",
            "-l",
            "tier in (back,db)",
            "-o",
            "name"
        ])
        .unwrap()
        .trim()
        .is_empty());
    assert!(cp
        .ok(&[
            "-n",
            "shop",
            "get",
            "deploy",
            "-l",
            "tier notin (back)",
            "-o",
            "name"
        ])
        .unwrap()
        .contains("web"));
    assert!(cp
        .ok(&["-n", "shop", "get", "deploy", "-l", "!tier", "-o", "name"])
        .unwrap()
        .trim()
        .is_empty());

    // get -w sees a later change.
    let mut w = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cp.kubeconfig("admin"))
        .arg("--cache-dir")
        .arg(dir.join("kube-cache"))
        .args([
            "-n",
            "shop",
            "get",
            "deploy",
            "web",
            "-w",
            "--request-timeout=30s",
            "-o",
            "custom-columns=NAME:.metadata.name,REPLICAS:.spec.replicas",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wout = w.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(wout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("watch printed the header");
    assert!(first.starts_with("NAME"), "{first}");
    let current = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(current.contains('2'), "{current}");

    // scale, label, annotate, patch in all three types.
    assert!(cp
        .ok(&["-n", "shop", "scale", "deploy", "web", "--replicas=5"])
        .unwrap()
        .contains("scaled"));
    let seen = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the watch saw the scale");
    assert!(seen.split_whitespace().last() == Some("5"), "{seen}");
    let _ = w.kill();
    let _ = w.wait();
    cp.ok(&["-n", "shop", "label", "deploy", "web", "release=stable"])
        .unwrap();
    cp.ok(&["-n", "shop", "annotate", "deploy", "web", "owner=team-a"])
        .unwrap();
    cp.ok(&[
        "-n",
        "shop",
        "patch",
        "deploy",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":3}}"#,
    ])
    .unwrap();
    cp.ok(&[
        "-n",
        "shop",
        "patch",
        "deploy",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/metadata/labels/track","value":"blue"}]"#,
    ])
    .unwrap();
    cp.ok(&[
        "-n",
        "shop",
        "patch",
        "deploy",
        "web",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"ferry/echo:2"}]}}}}"#,
    ])
    .unwrap();
    let j = cp
        .ok(&["-n", "shop", "get", "deploy", "web", "-o", "json"])
        .unwrap();
    let obj: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(obj["spec"]["replicas"], 3);
    assert_eq!(obj["metadata"]["labels"]["release"], "stable");
    assert_eq!(obj["metadata"]["labels"]["track"], "blue");
    assert_eq!(obj["metadata"]["annotations"]["owner"], "team-a");
    let cs = obj["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(
        cs.len(),
        2,
        "the strategic patch merged by name, not replaced"
    );
    assert_eq!(cs[0]["image"], "ferry/echo:2");
    assert_eq!(cs[0]["ports"][0]["containerPort"], 8080);
    assert_eq!(cs[1]["name"], "log");
    assert!(
        obj["metadata"]["generation"].as_i64().unwrap() >= 4,
        "spec changes bump generation"
    );

    // Edit by applying a changed file: the sidecar goes, the image changes.
    let changed = APP
        .replace("ferry/echo:1", "ferry/echo:3")
        .replace("      - name: log\n        image: busybox:1\n", "");
    let app2 = write(dir, "app2.yaml", &changed);
    let out = cp.ok(&["apply", "-f", &app2]).unwrap();
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    assert!(out.contains("service/web unchanged"), "{out}");
    let imgs = cp
        .ok(&["-n", "shop", "get", "deploy", "web", "-o", "jsonpath={.spec.template.spec.containers[*].name}={.spec.template.spec.containers[*].image} {.spec.replicas}"])
        .unwrap();
    assert_eq!(imgs, "web=ferry/echo:3 2");
    // The Service kept its cluster IP and node port through apply.
    let again = cp
        .ok(&[
            "-n",
            "shop",
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.clusterIP} {.spec.ports[0].nodePort}",
        ])
        .unwrap();
    assert_eq!(again, format!("{ip} {node_port}"));

    // Bad input: invalid values and unknown fields are refused with the field named.
    let bad = cp.kubectl_as(&cp.kubeconfig("admin"), &["apply", "-f", "-"], Some(
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec:\n  ports: [{port: 80, protocol: SCTPX}]\n"));
    assert!(!bad.status.success());
    expect_err(&bad, "spec.ports[0].protocol: Unsupported value: \"SCTPX\"");
    let bad = cp.kubectl_as(&cp.kubeconfig("admin"), &["apply", "-f", "-"], Some(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: shop}\ndatta: {a: b}\n"));
    assert!(!bad.status.success());
    expect_err(&bad, "unknown field \"datta\"");

    // Delete with cascade; the namespace goes with its contents.
    let out = cp
        .ok(&[
            "-n",
            "shop",
            "delete",
            "deploy",
            "web",
            "--cascade=foreground",
            "--wait=false",
        ])
        .unwrap();
    assert!(out.contains("deleted"), "{out}");
    let left = cp
        .ok(&[
            "-n",
            "shop",
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.metadata.finalizers}",
        ])
        .unwrap();
    assert!(
        left.contains("foregroundDeletion"),
        "foreground deletion waits for dependents: {left}"
    );
    cp.ok(&[
        "-n",
        "shop",
        "patch",
        "deploy",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])
    .unwrap();
    let gone = cp.kubectl(&["-n", "shop", "get", "deploy", "web"]);
    expect_err(&gone, "deployments.apps \"web\" not found");
    cp.ok(&["delete", "ns", "shop", "--timeout=60s"]).unwrap();
    let gone = cp.kubectl(&["get", "ns", "shop"]);
    expect_err(&gone, "namespaces \"shop\" not found");
    let svc = cp
        .ok(&[
            "get",
            "svc",
            "-A",
            "-o",
            "jsonpath={.items[*].metadata.namespace}",
        ])
        .unwrap();
    assert!(
        !svc.contains("shop"),
        "the namespace's Service went with it: {svc}"
    );

    // A user without rights is refused, with kubectl's usual message.
    if tokens {
        let tok = as_token(cp, "viewer-token", &["-n", "default", "get", "pods"]);
        assert!(
            tok.status.success(),
            "viewer may list pods: {}",
            stderr(&tok)
        );
        let no = as_token(
            cp,
            "viewer-token",
            &["-n", "default", "delete", "svc", "kubernetes"],
        );
        expect_err(&no, "Error from server (Forbidden): services \"kubernetes\" is forbidden: User \"viewer\" cannot delete resource \"services\" in API group \"\" in the namespace \"default\"");
        let anon = as_token(cp, "no-such-token", &["get", "pods"]);
        expect_err(&anon, "Unauthorized");
        let proxy = cp.kubectl_as(
            &cp.kubeconfig("kube-proxy"),
            &["get", "endpointslices", "-A"],
            None,
        );
        assert!(
            proxy.status.success(),
            "kube-proxy may list endpointslices: {}",
            stderr(&proxy)
        );
        let proxy = cp.kubectl_as(
            &cp.kubeconfig("kube-proxy"),
            &["get", "secrets", "-A"],
            None,
        );
        assert!(
            stderr(&proxy).contains("Forbidden"),
            "kube-proxy may not read secrets"
        );
    }
}

/// A directory removed on drop, however the test ends.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tokens_file() -> (TempDir, String) {
    let dir = temp_dir("tokens");
    std::fs::create_dir_all(&dir).unwrap();
    let file = write(&dir, "tokens.csv", "viewer-token,viewer,2001,\"viewers\"\n");
    (TempDir(dir), file)
}

fn grant_viewer(cp: &ControlPlane) {
    cp.ok(&[
        "create",
        "clusterrolebinding",
        "viewers-view",
        "--clusterrole=view",
        "--group=viewers",
    ])
    .unwrap();
    // RBAC changes apply within moments (the server watches them).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !as_token(cp, "viewer-token", &["-n", "default", "get", "pods"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the binding never took effect");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kubectl_scenario_on_the_embedded_store() {
    let (_dir, tokens) = tokens_file();
    let cp = ControlPlane::start(&["--token-auth-file", &tokens]).unwrap();
    grant_viewer(&cp);
    kubectl_scenario(&cp, true);
}

#[test]
fn kubectl_scenario_on_etcd() {
    let dir = temp_dir("etcd");
    let etcd = LocalEtcd::start(&dir, 23800).unwrap();
    let cp = ControlPlane::start(&["--etcd-servers", &etcd.endpoint]).unwrap();
    kubectl_scenario(&cp, false);
    drop(cp);
    drop(etcd);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_kubernetes_service_and_type_changes_follow_kubernetes() {
    // Advertised at a documentation address: written into the endpoints, never connected to.
    let cp = ControlPlane::start(&["--advertise-address", "192.0.2.10"]).unwrap();
    let get = |what: &[&str], path: &str| {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        let jp = format!("jsonpath={path}");
        args.extend_from_slice(&["-o", &jp]);
        cp.ok(&args).unwrap()
    };
    // A merge patch of Service `name` in default.
    let patch = |name: &str, p: &str| {
        cp.ok(&["-n", "default", "patch", "svc", name, "-p", p])
            .unwrap();
    };
    let svc = ["-n", "default", "svc", "kubernetes"];
    assert_eq!(
        get(&svc, "{.spec.clusterIP} {.spec.ports[0].name} {.spec.ports[0].port} {.spec.ports[0].targetPort}"),
        format!("10.96.0.1 https 443 {}", cp.port)
    );
    let eps = ["-n", "default", "endpoints", "kubernetes"];
    assert_eq!(
        get(
            &eps,
            "{.subsets[0].addresses[0].ip} {.subsets[0].ports[0].port}"
        ),
        format!("192.0.2.10 {}", cp.port)
    );
    let slice = ["-n", "default", "endpointslices", "kubernetes"];
    assert_eq!(
        get(
            &slice,
            "{.metadata.labels.kubernetes\\.io/service-name} {.endpoints[0].addresses[0]}"
        ),
        "kubernetes 192.0.2.10"
    );
    // Deleted or changed, it comes back as the server wants it.
    cp.ok(&["-n", "default", "delete", "endpointslice", "kubernetes"])
        .unwrap();
    cp.ok(&[
        "-n",
        "default",
        "patch",
        "svc",
        "kubernetes",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/ports/0/port","value":8443}]"#,
    ])
    .unwrap();
    eventually("the kubernetes Service put back", || {
        cp.ok(&[
            "-n",
            "default",
            "get",
            "svc",
            "kubernetes",
            "-o",
            "jsonpath={.spec.ports[0].port}",
        ])
        .is_ok_and(|p| p == "443")
            && cp
                .ok(&[
                    "-n",
                    "default",
                    "get",
                    "endpointslice",
                    "kubernetes",
                    "-o",
                    "name",
                ])
                .is_ok()
    });

    // NodePort -> ExternalName releases the cluster IP and the node port: both can be had
    // again at once.
    let apply =
        |yaml: &str| cp.kubectl_as(&cp.kubeconfig("admin"), &["apply", "-f", "-"], Some(yaml));
    let np = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.7.7\n  ports: [{port: 80, nodePort: 30777}]\n";
    let o = apply(np);
    assert!(o.status.success(), "{}", stderr(&o));
    patch(
        "web",
        r#"{"spec":{"type":"ExternalName","externalName":"example.org"}}"#,
    );
    assert_eq!(
        get(
            &["-n", "default", "svc", "web"],
            "{.spec.type} {.spec.clusterIP} {.spec.ports[0].nodePort}"
        ),
        "ExternalName  "
    );
    let o = apply(&np.replace("name: web", "name: web2"));
    assert!(
        o.status.success(),
        "the released IP and port are free again: {}",
        stderr(&o)
    );
    // ExternalName with a cluster IP is refused, the field named.
    let o = cp.kubectl(&[
        "-n",
        "default",
        "patch",
        "svc",
        "web",
        "-p",
        r#"{"spec":{"clusterIP":"10.96.7.8"}}"#,
    ]);
    expect_err(
        &o,
        "spec.clusterIPs: Forbidden: may not be set for ExternalName services",
    );
    // NodePort -> ClusterIP releases the node port only.
    patch("web2", r#"{"spec":{"type":"ClusterIP"}}"#);
    assert_eq!(
        get(
            &["-n", "default", "svc", "web2"],
            "{.spec.clusterIP} {.spec.ports[0].nodePort}"
        ),
        "10.96.7.7 "
    );
    let o = apply(
        &np.replace("name: web", "name: web3")
            .replace("clusterIP: 10.96.7.7", "clusterIP: 10.96.7.9"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // A LoadBalancer keeping traffic local gets a health check node port, released with it.
    let lb = "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: default}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  ports: [{port: 80}]\n";
    let o = apply(lb);
    assert!(o.status.success(), "{}", stderr(&o));
    let hc: u16 = get(
        &["-n", "default", "svc", "lb"],
        "{.spec.healthCheckNodePort}",
    )
    .parse()
    .unwrap();
    assert!((30000..=32767).contains(&hc));
    patch("lb", r#"{"spec":{"externalTrafficPolicy":"Cluster"}}"#);
    assert_eq!(
        get(
            &["-n", "default", "svc", "lb"],
            "{.spec.healthCheckNodePort}"
        ),
        ""
    );
    let o = apply(&format!("apiVersion: v1\nkind: Service\nmetadata: {{name: hc, namespace: default}}\nspec:\n  type: NodePort\n  ports: [{{port: 80, nodePort: {hc}}}]\n"));
    assert!(
        o.status.success(),
        "the health check port was released: {}",
        stderr(&o)
    );
}

#[test]
fn bad_requests_get_status_bodies_that_name_the_problem() {
    let cp = ControlPlane::start(&[]).unwrap();
    // Malformed YAML, wrong apiVersion, wrong kind for the endpoint, invalid names.
    let cases: &[(&str, &str)] = &[
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x\n", "error converting YAML"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n", "spec.containers[0].image: Required value"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: x, ports: [{containerPort: \"eighty\"}]}]}\n", "spec.containers[0].ports[0].containerPort"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: Bad.Name}\n", "metadata.name: Invalid value: \"Bad.Name\""),
        ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {app: a}}\n  template: {metadata: {labels: {app: b}}, spec: {containers: [{name: c, image: x}]}}\n",
         "`selector` does not match template `labels`"),
    ];
    for (input, want) in cases {
        let out = cp.kubectl_as(&cp.kubeconfig("admin"), &["create", "-f", "-"], Some(input));
        assert!(!out.status.success(), "{input} was accepted");
        assert!(stderr(&out).contains(want), "{input}: {}", stderr(&out));
    }
    let out = cp.kubectl_as(
        &cp.kubeconfig("admin"),
        &["create", "--validate=false", "-f", "-"],
        Some("apiVersion: apps/v2\nkind: Deployment\nmetadata: {name: x}\n"),
    );
    expect_err(
        &out,
        "no matches for kind \"Deployment\" in version \"apps/v2\"",
    );
    // Nothing half-written: none of the refused objects exists.
    let all = cp
        .ok(&["get", "pods,deploy,cm", "-A", "-o", "name"])
        .unwrap();
    assert!(
        !all.contains("/p") && !all.contains("/d") && !all.contains("/x"),
        "{all}"
    );

    // Raw HTTP: the Status body and code, for bodies kubectl would not send.
    let curl = |args: &[&str]| -> (u16, serde_json::Value) {
        let a = common::raw::curl(&cp, args);
        (a.code, a.json())
    };
    let url = format!("{}/api/v1/namespaces/default/configmaps", cp.url);
    let post = |body: &str| {
        curl(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            &url,
        ])
    };
    let (code, st) = post(r#"{"apiVersion":"apps/v2","kind":"ConfigMap","metadata":{"name":"v"}}"#);
    assert_eq!(code, 400);
    assert!(
        st["message"].as_str().unwrap().contains(
            "the API version in the data (apps/v2) does not match the expected API version (v1)"
        ),
        "{st}"
    );
    let (code, st) = post(r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"v"}}"#);
    assert_eq!(code, 400);
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("the kind in the data (Secret)"),
        "{st}"
    );
    let (code, st) = post("{not json");
    assert_eq!(code, 400);
    assert_eq!(st["kind"], "Status");
    assert_eq!(st["reason"], "BadRequest");
    let big = format!(
        "{{\"metadata\":{{\"name\":\"big\"}},\"data\":{{\"a\":\"{}\"}}}}",
        "x".repeat(4 << 20)
    );
    let big_file = write(&cp.dir, "big.json", &big);
    let (code, st) = curl(&[
        "--http1.1",
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{big_file}"),
        &url,
    ]);
    assert_eq!(code, 413, "{st}");
    assert!(
        st["message"].as_str().unwrap().contains("too large"),
        "{st}"
    );
    let (code, st) = post(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a_b"}}"#);
    assert_eq!(code, 422);
    assert_eq!(st["details"]["causes"][0]["field"], "metadata.name", "{st}");
    let (code, _) = post(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ok1"}}"#);
    assert_eq!(code, 201);
    let (code, st) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ok1","resourceVersion":"1"},"data":{"a":"b"}}"#,
        &format!("{url}/ok1"),
    ]);
    assert_eq!(code, 409, "a stale resourceVersion is a conflict: {st}");
    assert_eq!(st["reason"], "Conflict");
    let (code, st) = curl(&[
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/json-patch+json",
        "-d",
        r#"[{"op":"test","path":"/data/a","value":"zz"}]"#,
        &format!("{url}/ok1"),
    ]);
    assert_eq!(code, 422, "{st}");
    let (code, _) = curl(&[
        "-X",
        "GET",
        &format!("{}/api/v1/namespaces/default/nosuchthings", cp.url),
    ]);
    assert_eq!(code, 404);
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", &url])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "401",
        "anonymous requests are refused"
    );
}

/// Runs `tests/python/<script>` with the official Python client as admin; it must succeed and
/// print each of `steps`.
fn python_script(cp: &ControlPlane, script: &str, steps: &[&str]) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let out = Command::new(ferry_testbed::controlplane::python())
        .arg(&path)
        .env("KUBECONFIG", cp.kubeconfig("admin"))
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    for step in steps {
        assert!(
            text.contains(step),
            "{script}: missing step {step}:\n{text}"
        );
    }
}

#[test]
fn python_client_scenario() {
    let cp = ControlPlane::start(&["--compaction-interval", "3s"]).unwrap();
    python_script(
        &cp,
        "client_scenario.py",
        &["crud ok", "watch resume ok", "gone ok", "status ok"],
    );
}

#[test]
fn every_acknowledged_write_survives_kill_9() {
    let mut cp = ControlPlane::start(&[]).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/crash_writer.py");
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut last_rev = 0i64;
    for round in 0..3 {
        let mut w = Command::new(ferry_testbed::controlplane::python())
            .arg(&script)
            .arg(format!("r{round}"))
            .env("KUBECONFIG", cp.kubeconfig("admin"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = BufReader::new(w.stdout.take().unwrap());
        let mut n = 0;
        for l in lines.lines().map_while(Result::ok) {
            if let Some((name, rv)) = l.strip_prefix("ACK ").and_then(|r| r.split_once(' ')) {
                let rv: i64 = rv.parse().unwrap();
                assert!(
                    rv > last_rev || n > 0,
                    "revision went backwards: {rv} after {last_rev}"
                );
                acked.push((name.to_string(), rv));
                n += 1;
                if n == 300 {
                    // Mid-stream: writers are still sending.
                    cp.kill9();
                    break;
                }
            }
        }
        let _ = w.kill();
        let _ = w.wait();
        assert_eq!(n, 300, "the writer acknowledged {n} writes before the kill");
        cp.restart().unwrap();
        let listed = cp
            .ok(&["get", "--raw", "/api/v1/namespaces/default/configmaps"])
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
        let have: std::collections::HashMap<String, i64> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["metadata"]["name"].as_str().unwrap().to_string(),
                    i["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap(),
                )
            })
            .collect();
        for (name, rv) in &acked {
            assert_eq!(
                have.get(name),
                Some(rv),
                "acknowledged write {name}@{rv} lost in round {round}"
            );
        }
        let list_rv: i64 = v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let max = acked.iter().map(|a| a.1).max().unwrap();
        assert!(
            list_rv >= max,
            "revision went backwards after restart: {list_rv} < {max}"
        );
        last_rev = list_rv;
    }
}

#[test]
fn snapshot_save_and_restore_through_the_cli() {
    let mut cp = ControlPlane::start(&[]).unwrap();
    cp.ok(&["create", "configmap", "keep", "--from-literal=a=1"])
        .unwrap();
    let bin = ferry_testbed::bin_path("ferry-controlplane").unwrap();
    let snap = cp.dir.join("backup.snap");
    // Saved while the server runs.
    let out = Command::new(&bin)
        .args(["snapshot", "save"])
        .arg(&snap)
        .arg("--data-dir")
        .arg(&cp.dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    cp.ok(&["create", "configmap", "after-backup"]).unwrap();
    cp.kill9();
    // Restoring over a store that has data needs --force.
    let refused = Command::new(&bin)
        .args(["snapshot", "restore"])
        .arg(&snap)
        .arg("--data-dir")
        .arg(&cp.dir)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    expect_err(&refused, "--force");
    let out = Command::new(&bin)
        .args(["snapshot", "restore", "--force"])
        .arg(&snap)
        .arg("--data-dir")
        .arg(&cp.dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    cp.restart().unwrap();
    assert_eq!(
        cp.ok(&["get", "cm", "keep", "-o", "jsonpath={.data.a}"])
            .unwrap(),
        "1"
    );
    let gone = cp.kubectl(&["get", "cm", "after-backup"]);
    assert!(
        stderr(&gone).contains("not found"),
        "the restore brought back the old state"
    );
}

fn pod_names(cp: &ControlPlane, selector: &str) -> Vec<String> {
    let out = cp
        .ok(&["get", "pods", "-l", selector, "-o", "name"])
        .unwrap();
    out.lines().map(String::from).collect()
}

/// Polls until `f` holds (20 s at most).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn replicaset_controller_keeps_exactly_the_desired_count() {
    let cp = ControlPlane::start(&[]).unwrap();
    let kc = cp.kubeconfig("controller-manager");
    let _cm = cp
        .spawn_component(&["controller-manager", "--kubeconfig", kc.to_str().unwrap()])
        .unwrap();
    let rs = "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: cache, namespace: default}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: cache}}\n  template:\n    metadata: {labels: {app: cache}}\n    spec: {containers: [{name: c, image: ferry/echo:1}]}\n";
    let out = cp.kubectl_as(&cp.kubeconfig("admin"), &["apply", "-f", "-"], Some(rs));
    assert!(out.status.success(), "{}", stderr(&out));
    eventually("three pods", || pod_names(&cp, "app=cache").len() == 3);
    // Never more than asked for, even while the controller's cache catches up.
    for _ in 0..10 {
        assert_eq!(pod_names(&cp, "app=cache").len(), 3);
        std::thread::sleep(Duration::from_millis(100));
    }
    let owner = cp
        .ok(&[
            "get",
            "pods",
            "-l",
            "app=cache",
            "-o",
            "jsonpath={.items[0].metadata.ownerReferences[0].kind}",
        ])
        .unwrap();
    assert_eq!(owner, "ReplicaSet");
    eventually("status.replicas 3", || {
        cp.ok(&["get", "rs", "cache", "-o", "jsonpath={.status.replicas}"])
            .unwrap()
            == "3"
    });

    cp.ok(&["scale", "rs", "cache", "--replicas=2"]).unwrap();
    eventually("two pods after scaling down", || {
        pod_names(&cp, "app=cache").len() == 2
    });
    let before = pod_names(&cp, "app=cache");
    cp.ok(&["delete", &before[0]]).unwrap();
    eventually("a replacement pod", || {
        let now = pod_names(&cp, "app=cache");
        now.len() == 2 && !now.contains(&before[0])
    });
    // An orphan with matching labels is adopted instead of adding to the count.
    let orphan = "apiVersion: v1\nkind: Pod\nmetadata: {name: stray, namespace: default, labels: {app: cache}}\nspec: {containers: [{name: c, image: x:1}]}\n";
    let out = cp.kubectl_as(&cp.kubeconfig("admin"), &["apply", "-f", "-"], Some(orphan));
    assert!(out.status.success(), "{}", stderr(&out));
    eventually("the set back at two with the orphan adopted", || {
        pod_names(&cp, "app=cache").len() == 2
    });
}

#[test]
fn garbage_collector_follows_owner_references() {
    let cp = ControlPlane::start(&[]).unwrap();
    let kc = cp.kubeconfig("controller-manager");
    let _cm = cp
        .spawn_component(&["controller-manager", "--kubeconfig", kc.to_str().unwrap()])
        .unwrap();
    let rs = |name: &str| {
        format!("apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{set: {name}}}}}\n  template:\n    metadata: {{labels: {{set: {name}}}}}\n    spec: {{containers: [{{name: c, image: ferry/echo:1}}]}}\n")
    };
    for name in ["bg", "fg", "keep"] {
        let out = cp.kubectl_as(
            &cp.kubeconfig("admin"),
            &["apply", "-f", "-"],
            Some(&rs(name)),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        eventually("two pods", || {
            pod_names(&cp, &format!("set={name}")).len() == 2
        });
    }
    // Background: the set goes at once, its pods after it.
    cp.ok(&["delete", "rs", "bg", "--cascade=background"])
        .unwrap();
    eventually("pods of a deleted set collected", || {
        pod_names(&cp, "set=bg").is_empty()
    });
    // Foreground: the set waits for its pods, then goes (kubectl waits for it).
    cp.ok(&[
        "delete",
        "rs",
        "fg",
        "--cascade=foreground",
        "--timeout=30s",
    ])
    .unwrap();
    assert!(
        pod_names(&cp, "set=fg").is_empty(),
        "foreground deletion removes the pods first"
    );
    expect_err(&cp.kubectl(&["get", "rs", "fg"]), "not found");
    // Orphan: the pods stay, without their owner reference.
    cp.ok(&["delete", "rs", "keep", "--cascade=orphan", "--timeout=30s"])
        .unwrap();
    expect_err(&cp.kubectl(&["get", "rs", "keep"]), "not found");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pod_names(&cp, "set=keep").len(), 2, "orphaned pods stay");
    let refs = cp
        .ok(&[
            "get",
            "pods",
            "-l",
            "set=keep",
            "-o",
            "jsonpath={.items[*].metadata.ownerReferences}",
        ])
        .unwrap();
    assert!(
        refs.trim().is_empty(),
        "orphans lost their owner reference: {refs}"
    );
}

/// Plays the kubelet for the pods of `selector` until dropped: each one without an IP gets
/// one, Running and Ready (no containers run; the controllers only read the status).
fn images(cp: &ControlPlane, selector: &str) -> Vec<String> {
    let out = cp
        .ok(&[
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].spec.containers[0].image}",
        ])
        .unwrap();
    out.split_whitespace().map(String::from).collect()
}

#[test]
fn deployment_rolls_out_and_back_with_kubectl_rollout() {
    let cp = ControlPlane::start(&[]).unwrap();
    // Pods are placed by the scheduler and run by the shared test kubelet.
    let _controllers = cp.spawn_controllers(&[]).unwrap();
    let _kubelet = common::TestKubelet::start(
        None,
        cp.kubeconfig("admin"),
        vec![("n1".into(), Vec::new())],
    );
    let dep = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: roll, namespace: default}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: roll}}\n  template:\n    metadata: {labels: {app: roll}}\n    spec: {containers: [{name: c, image: 'ferry/echo:1'}]}\n";
    let out = cp.kubectl_as(&cp.kubeconfig("admin"), &["apply", "-f", "-"], Some(dep));
    assert!(out.status.success(), "{}", stderr(&out));
    let st = cp
        .ok(&["rollout", "status", "deploy/roll", "--timeout=60s"])
        .unwrap();
    assert!(st.contains("successfully rolled out"), "{st}");
    assert_eq!(images(&cp, "app=roll"), ["ferry/echo:1"; 3]);

    cp.ok(&["set", "image", "deploy/roll", "c=ferry/echo:2"])
        .unwrap();
    let st = cp
        .ok(&["rollout", "status", "deploy/roll", "--timeout=60s"])
        .unwrap();
    assert!(st.contains("successfully rolled out"), "{st}");
    eventually("three pods of the new template", || {
        images(&cp, "app=roll") == ["ferry/echo:2"; 3]
    });
    let sets = cp
        .ok(&[
            "get",
            "rs",
            "-l",
            "app=roll",
            "-o",
            "jsonpath={range .items[*]}{.spec.replicas} {end}",
        ])
        .unwrap();
    let mut counts: Vec<&str> = sets.split_whitespace().collect();
    counts.sort();
    assert_eq!(
        counts,
        ["0", "3"],
        "the old set scaled to zero and kept as history"
    );
    let hist = cp.ok(&["rollout", "history", "deploy/roll"]).unwrap();
    assert!(hist.contains('1') && hist.contains('2'), "{hist}");

    cp.ok(&["rollout", "undo", "deploy/roll"]).unwrap();
    let st = cp
        .ok(&["rollout", "status", "deploy/roll", "--timeout=60s"])
        .unwrap();
    assert!(st.contains("successfully rolled out"), "{st}");
    eventually("rolled back to the first template", || {
        images(&cp, "app=roll") == ["ferry/echo:1"; 3]
    });
}

/// The review APIs answer as the authorizers and authenticators do: `kubectl auth can-i`
/// (resources, paths, `--as`), `can-i --list`, `auth whoami`, SubjectAccessReview and
/// TokenReview for a bound delegator only, a LocalSubjectAccessReview in another namespace
/// refused, reviews never stored, and the Python client's SelfSubjectAccessReview.
#[test]
fn access_reviews_answer_as_the_authorizers_do() {
    let dir = temp_dir("reviews");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    let tokens = write(
        &dir,
        "tokens.csv",
        "viewer-token,viewer,2001,\"viewers\"\ndelegator-token,delegator,2003\n",
    );
    let cp = ControlPlane::start(&["--token-auth-file", &tokens]).unwrap();
    grant_viewer(&cp);
    let can = |token: Option<&str>, args: &[&str]| {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let o = match token {
            Some(t) => as_token(&cp, t, &all),
            None => cp.kubectl(&all),
        };
        let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.code(), out, stderr(&o))
    };
    let viewer = Some("viewer-token");
    assert_eq!(can(viewer, &["list", "pods", "-n", "default"]).1, "yes");
    let (code, out, _) = can(viewer, &["delete", "pods", "-n", "default"]);
    assert_eq!(
        (code, out.as_str()),
        (Some(1), "no"),
        "kubectl exits 1 on no"
    );
    assert_eq!(
        can(viewer, &["get", "/healthz"]).1,
        "yes",
        "system:discovery"
    );
    assert_eq!(can(viewer, &["get", "/metrics"]).1, "no");
    assert_eq!(can(viewer, &["create", "secrets", "-n", "default"]).1, "no");
    assert_eq!(can(None, &["*", "*"]).1, "yes", "the admin");

    // --as: the admin asks about someone else (impersonation, then the self review).
    assert_eq!(
        can(None, &["get", "pods", "-n", "default", "--as", "alice"]).1,
        "no"
    );
    cp.ok(&[
        "-n",
        "default",
        "create",
        "role",
        "pod-reader",
        "--verb=get",
        "--resource=pods",
        "--resource-name=p1",
    ])
    .unwrap();
    cp.ok(&[
        "-n",
        "default",
        "create",
        "rolebinding",
        "alice-reads",
        "--role=pod-reader",
        "--user=alice",
    ])
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while can(None, &["get", "pods/p1", "-n", "default", "--as", "alice"]).1 != "yes" {
        assert!(
            Instant::now() < deadline,
            "alice's binding never took effect"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        can(None, &["get", "pods/p2", "-n", "default", "--as", "alice"]).1,
        "no",
        "resourceNames"
    );
    assert_eq!(
        can(
            None,
            &["get", "pods/p1", "-n", "kube-system", "--as", "alice"]
        )
        .1,
        "no"
    );

    // can-i --list: the viewer's rules in the namespace, resources and paths.
    let (code, list, err) = can(viewer, &["--list", "-n", "default"]);
    assert_eq!(code, Some(0), "{err}");
    let line = |what: &str| {
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(what))
            .map(str::to_string)
    };
    let pods = line("pods").unwrap_or_else(|| panic!("no pods rule in:\n{list}"));
    assert!(pods.contains("[get list watch]"), "{pods}");
    assert!(
        list.lines()
            .any(|l| l.contains("[/healthz]") && l.contains("[get]")),
        "{list}"
    );
    assert!(
        line("selfsubjectaccessreviews.authorization.k8s.io").is_some(),
        "system:basic-user: {list}"
    );
    let (_, alice_list, _) = can(None, &["--list", "-n", "default", "--as", "alice"]);
    assert!(
        alice_list
            .lines()
            .any(|l| l.starts_with("pods ") && l.contains("[p1]") && l.contains("[get]")),
        "{alice_list}"
    );

    // auth whoami.
    let o = as_token(&cp, "viewer-token", &["auth", "whoami", "-o", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let me: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(me["kind"], "SelfSubjectReview");
    assert_eq!(me["status"]["userInfo"]["username"], "viewer");
    let groups = me["status"]["userInfo"]["groups"].to_string();
    assert!(
        groups.contains("viewers") && groups.contains("system:authenticated"),
        "{groups}"
    );

    // SubjectAccessReview and TokenReview: only for whoever is bound to ask.
    let sar = |user: &str, groups: &str, verb: &str| {
        format!(
            r#"{{"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "spec": {{"user": "{user}", "groups": [{groups}],
                          "resourceAttributes": {{"namespace": "default", "verb": "{verb}", "resource": "pods"}}}}}}"#
        )
    };
    let ask = |token: &str, body: &str| {
        let f = write(&dir, "review.json", body);
        // kubectl checks a kind without a PATCH operation against /openapi/v2, not served.
        as_token(
            &cp,
            token,
            &["create", "--validate=false", "-f", &f, "-o", "json"],
        )
    };
    let o = ask("delegator-token", &sar("viewer", "\"viewers\"", "list"));
    expect_err(
        &o,
        "cannot create resource \"subjectaccessreviews\" in API group \"authorization.k8s.io\"",
    );
    let o = ask(
        "delegator-token",
        r#"{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": "viewer-token"}}"#,
    );
    expect_err(&o, "tokenreviews");
    cp.ok(&[
        "create",
        "clusterrolebinding",
        "delegator",
        "--clusterrole=system:auth-delegator",
        "--user=delegator",
    ])
    .unwrap();
    let answer = |token: &str, body: &str| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = ask(token, body);
            if o.status.success() {
                return serde_json::from_slice(&o.stdout).unwrap();
            }
            assert!(Instant::now() < deadline, "{}", stderr(&o));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let r = answer("delegator-token", &sar("viewer", "\"viewers\"", "list"));
    assert_eq!(r["status"]["allowed"], true, "{r}");
    let r = answer("delegator-token", &sar("viewer", "", "list"));
    assert_eq!(
        r["status"]["allowed"], false,
        "the groups given are the subject's only ones: {r}"
    );
    let r = answer("delegator-token", &sar("viewer", "\"viewers\"", "delete"));
    assert_eq!(r["status"]["allowed"], false, "{r}");
    let o = ask("delegator-token", &sar("", "", "list"));
    expect_err(&o, "at least one of user or group must be specified");
    let review = |token: &str| {
        format!(
            r#"{{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {{"token": "{token}"}}}}"#
        )
    };
    let r = answer("delegator-token", &review("viewer-token"));
    assert_eq!(r["status"]["authenticated"], true, "{r}");
    assert_eq!(r["status"]["user"]["username"], "viewer");
    let r = answer("delegator-token", &review("not-a-token"));
    assert_eq!(r["status"]["authenticated"], false, "{r}");
    cp.ok(&["-n", "default", "create", "serviceaccount", "robot"])
        .unwrap();
    let sa_token = cp
        .ok(&["-n", "default", "create", "token", "robot"])
        .unwrap();
    let r = answer("delegator-token", &review(sa_token.trim()));
    assert_eq!(
        r["status"]["user"]["username"], "system:serviceaccount:default:robot",
        "{r}"
    );
    let r = answer(
        "delegator-token",
        &format!(
            r#"{{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {{"token": "{}", "audiences": ["vault"]}}}}"#,
            sa_token.trim()
        ),
    );
    assert_eq!(r["status"]["authenticated"], false, "another audience: {r}");

    // A local review names its own namespace; reviews are answered, not stored.
    let o = cp.kubectl_as(
        &cp.kubeconfig("admin"),
        &["create", "--validate=false", "-n", "default", "-f", &write(&dir, "local.json", r#"{"apiVersion": "authorization.k8s.io/v1", "kind": "LocalSubjectAccessReview",
            "spec": {"user": "viewer", "resourceAttributes": {"namespace": "kube-system", "verb": "get", "resource": "pods"}}}"#)],
        None,
    );
    expect_err(
        &o,
        "spec.resourceAttributes.namespace must match namespace: default",
    );
    let o = cp.kubectl(&[
        "get",
        "--raw",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
    ]);
    expect_err(&o, "MethodNotAllowed");

    // The Python client's typed call.
    let script = r#"
import sys
from kubernetes import client, config
config.load_kube_config(sys.argv[1])
api = client.AuthorizationV1Api()
body = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
    resource_attributes=client.V1ResourceAttributes(namespace='default', verb='delete', resource='nodes')))
print(api.create_self_subject_access_review(body).status.allowed)
"#;
    let out = Command::new(ferry_testbed::controlplane::python())
        .args(["-c", script, cp.kubeconfig("admin").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "True",
        "{}",
        stderr(&out)
    );
}

/// `/metrics` counts requests as kube-apiserver's do (verb, resource, scope, code), holds open
/// watches in `apiserver_longrunning_requests` until they end, and is for monitoring identities
/// only.
#[test]
fn metrics_count_requests_and_open_watches() {
    let (_dir, tokens) = tokens_file();
    let cp = ControlPlane::start(&["--token-auth-file", &tokens]).unwrap();
    grant_viewer(&cp);
    let metrics = || cp.ok(&["get", "--raw", "/metrics"]).unwrap();
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let list = r#"apiserver_request_total{verb="LIST",group="",version="v1",resource="pods",subresource="",scope="namespace",component="apiserver",code="200"}"#;
    let before = value(&metrics(), list).unwrap_or(0.0);
    for _ in 0..3 {
        cp.ok(&["-n", "default", "get", "pods"]).unwrap();
    }
    let o = cp.kubectl(&["-n", "default", "get", "pod", "nope"]);
    assert!(!o.status.success());
    let text = metrics();
    assert_eq!(value(&text, list), Some(before + 3.0), "{text}");
    let missing = r#"apiserver_request_total{verb="GET",group="",version="v1",resource="pods",subresource="",scope="resource",component="apiserver",code="404"}"#;
    assert_eq!(value(&text, missing), Some(1.0), "{text}");
    assert!(
        text.contains(r#"apiserver_request_duration_seconds_bucket{le="0.005",verb="LIST",group="",version="v1",resource="pods""#)
            || text.lines().any(|l| l.starts_with("apiserver_request_duration_seconds_count{verb=\"LIST\"") && l.contains("resource=\"pods\"")),
        "{text}"
    );
    expect_err(
        &as_token(&cp, "viewer-token", &["get", "--raw", "/metrics"]),
        "cannot get path \"/metrics\"",
    );

    // An open watch is counted until it ends.
    let watching = r#"apiserver_longrunning_requests{verb="WATCH",group="",version="v1",resource="pods",subresource="",scope="namespace",component="apiserver"}"#;
    let mut w = Command::new("kubectl")
        .args(["--kubeconfig", cp.kubeconfig("admin").to_str().unwrap()])
        .args(["-n", "default", "get", "pods", "-w"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(&metrics(), watching) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the watch was never counted: {}",
            metrics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = w.kill();
    let _ = w.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(&metrics(), watching) != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the ended watch is still counted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// PriorityClass, ResourceQuota, LimitRange, PodDisruptionBudget, Ingress, IngressClass and
/// HorizontalPodAutoscaler are served (kubectl create, apply and get with their columns), and a
/// pod's priority comes from its class or the one global default, as the Priority admission
/// plugin does.
#[test]
fn more_kinds_are_served_and_pods_get_their_priority() {
    let cp = ControlPlane::start(&[]).unwrap();
    // kubectl's typed create commands (protobuf bodies).
    cp.ok(&[
        "create",
        "priorityclass",
        "high",
        "--value=1000",
        "--description=important",
    ])
    .unwrap();
    cp.ok(&[
        "-n",
        "default",
        "create",
        "quota",
        "small",
        "--hard=pods=5,requests.cpu=2",
    ])
    .unwrap();
    cp.ok(&[
        "-n",
        "default",
        "create",
        "pdb",
        "web",
        "--selector=app=web",
        "--min-available=1",
    ])
    .unwrap();
    let dir = temp_dir("kinds");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    let manifest = write(
        &dir,
        "kinds.yaml",
        "apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: ferry}
spec: {controller: ferry.dev/ingress}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: default}
spec:
  ingressClassName: ferry
  rules:
  - host: web.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}
---
apiVersion: v1
kind: LimitRange
metadata: {name: defaults, namespace: default}
spec:
  limits:
  - type: Container
    default: {cpu: 500m}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web, namespace: default}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 2
  maxReplicas: 5
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}
",
    );
    cp.ok(&["apply", "-f", &manifest]).unwrap();
    let pcs = cp.ok(&["get", "priorityclasses"]).unwrap();
    for want in [["system-node-critical", "2000001000"], ["high", "1000"]] {
        assert!(
            pcs.lines()
                .any(|l| l.split_whitespace().take(2).eq(want.iter().copied())),
            "{want:?} in:\n{pcs}"
        );
    }
    let ing = cp.ok(&["-n", "default", "get", "ingress", "web"]).unwrap();
    assert!(
        ing.contains("ferry") && ing.contains("web.example"),
        "{ing}"
    );
    let pdb = cp.ok(&["-n", "default", "get", "pdb"]).unwrap();
    assert!(
        pdb.lines()
            .any(|l| l.starts_with("web ") && l.contains(" 1 ") && l.contains("N/A")),
        "{pdb}"
    );
    let quota = cp.ok(&["-n", "default", "get", "quota", "small"]).unwrap();
    assert!(quota.contains("requests.cpu: 0/2"), "{quota}");
    let hpa = cp.ok(&["-n", "default", "get", "hpa", "web"]).unwrap();
    assert!(hpa.contains("Deployment/web"), "{hpa}");
    assert!(cp
        .ok(&["-n", "default", "get", "limits", "defaults"])
        .is_ok());
    assert!(cp
        .ok(&["get", "ingressclass", "ferry"])
        .unwrap()
        .contains("ferry.dev/ingress"));

    // Priority admission.
    let pod = |name: &str, class: &str| {
        let class = if class.is_empty() {
            String::new()
        } else {
            format!("\n  priorityClassName: {class}")
        };
        write(
            &dir,
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:{class}\n  containers:\n  - {{name: c, image: busybox:1}}\n"
            ),
        )
    };
    let priority = |name: &str| {
        cp.ok(&[
            "-n",
            "default",
            "get",
            "pod",
            name,
            "-o",
            "jsonpath={.spec.priority} {.spec.priorityClassName}",
        ])
        .unwrap()
    };
    cp.ok(&["create", "-f", &pod("important", "high")]).unwrap();
    assert_eq!(priority("important"), "1000 high");
    cp.ok(&["create", "-f", &pod("critical", "system-cluster-critical")])
        .unwrap();
    assert_eq!(priority("critical"), "2000000000 system-cluster-critical");
    cp.ok(&["create", "-f", &pod("plain", "")]).unwrap();
    assert_eq!(priority("plain"), "0 ");
    expect_err(
        &cp.kubectl(&["create", "-f", &pod("lost", "nope")]),
        "no PriorityClass with name nope was found",
    );
    cp.ok(&[
        "create",
        "priorityclass",
        "everyone",
        "--value=10",
        "--global-default",
    ])
    .unwrap();
    cp.ok(&["create", "-f", &pod("defaulted", "")]).unwrap();
    assert_eq!(priority("defaulted"), "10 everyone");
    expect_err(
        &cp.kubectl(&[
            "create",
            "priorityclass",
            "another",
            "--value=11",
            "--global-default",
        ]),
        "PriorityClass everyone is already marked as default",
    );
    expect_err(
        &cp.kubectl(&["create", "priorityclass", "huge", "--value=2000000000"]),
        "maximum allowed value of a user defined priority is 1000000000",
    );
    expect_err(
        &cp.kubectl(&["create", "priorityclass", "system-mine", "--value=1"]),
        "reserved",
    );
    expect_err(
        &cp.kubectl(&["patch", "priorityclass", "high", "-p", r#"{"value": 5}"#]),
        "may not be changed in an update",
    );
}

/// A LimitRange fills and bounds containers' resources and ResourceQuotas charge pods at
/// admission, with Kubernetes' messages; the quota's status follows creates and deletes.
#[test]
fn limit_ranges_and_quotas_admit_pods_as_kubernetes_does() {
    let cp = ControlPlane::start(&[]).unwrap();
    let dir = temp_dir("quota");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    cp.ok(&["create", "namespace", "team"]).unwrap();
    let limits = write(
        &dir,
        "limits.yaml",
        "apiVersion: v1
kind: LimitRange
metadata: {name: cpu, namespace: team}
spec:
  limits:
  - type: Container
    default: {cpu: 200m}
    defaultRequest: {cpu: 100m}
    max: {cpu: '1'}
",
    );
    cp.ok(&["apply", "-f", &limits]).unwrap();
    cp.ok(&[
        "-n",
        "team",
        "create",
        "quota",
        "q",
        "--hard=pods=2,requests.cpu=300m",
    ])
    .unwrap();
    let pod = |name: &str, resources: &str| {
        let f = write(
            &dir,
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: team}}\nspec:\n  containers:\n  - name: c\n    image: busybox:1\n    resources: {resources}\n"
            ),
        );
        cp.kubectl(&["create", "-f", &f])
    };
    assert!(pod("a", "{}").status.success());
    let res = cp
        .ok(&[
            "-n",
            "team",
            "get",
            "pod",
            "a",
            "-o",
            "jsonpath={.spec.containers[0].resources}",
        ])
        .unwrap();
    let res: serde_json::Value = serde_json::from_str(&res).unwrap();
    assert_eq!(
        res,
        serde_json::json!({"limits": {"cpu": "200m"}, "requests": {"cpu": "100m"}}),
        "the LimitRange's defaults"
    );
    assert!(pod("b", "{}").status.success());
    expect_err(
        &pod("c", "{}"),
        "pods \"c\" is forbidden: exceeded quota: q, requested: pods=1, used: pods=2, limited: pods=2",
    );
    let quota = cp.ok(&["-n", "team", "get", "quota", "q"]).unwrap();
    assert!(
        quota.contains("pods: 2/2") && quota.contains("requests.cpu: 200m/300m"),
        "{quota}"
    );
    expect_err(
        &pod("big", "{limits: {cpu: '2'}}"),
        "maximum cpu usage per Container is 1, but limit is 2",
    );

    // A deleted pod gives its place back.
    cp.ok(&["-n", "team", "delete", "pod", "a", "--wait=false"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cp
        .ok(&["-n", "team", "get", "quota", "q"])
        .unwrap()
        .contains("pods: 1/2")
    {
        assert!(Instant::now() < deadline, "the quota never released pod a");
        std::thread::sleep(Duration::from_millis(200));
    }
    // ... though not for more CPU than is left.
    expect_err(
        &pod("d", "{requests: {cpu: 250m}, limits: {cpu: 250m}}"),
        "exceeded quota: q, requested: requests.cpu=250m, used: requests.cpu=100m, limited: requests.cpu=300m",
    );
    assert!(pod("e", "{}").status.success());
    // A pod that finished gives its place back too.
    cp.ok(&[
        "-n",
        "team",
        "patch",
        "pod",
        "b",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status": {"phase": "Succeeded"}}"#,
    ])
    .unwrap();
    let quota = cp.ok(&["-n", "team", "get", "quota", "q"]).unwrap();
    assert!(
        quota.contains("pods: 1/2"),
        "the finished pod b released: {quota}"
    );
    // A quota on memory makes its request mandatory.
    cp.ok(&[
        "-n",
        "team",
        "create",
        "quota",
        "mem",
        "--hard=requests.memory=1Gi",
    ])
    .unwrap();
    cp.ok(&["-n", "team", "delete", "pod", "e", "--wait=false"])
        .unwrap();
    expect_err(
        &pod("f", "{}"),
        "failed quota: mem: must specify requests.memory",
    );

    // Object counts, by `count/<resource>.<group>` and by a core resource's plain name.
    cp.ok(&["create", "namespace", "counted"]).unwrap();
    cp.ok(&[
        "-n",
        "counted",
        "create",
        "quota",
        "objects",
        "--hard=count/configmaps=2,secrets=1,count/deployments.apps=1",
    ])
    .unwrap();
    let used = || {
        cp.ok(&[
            "-n",
            "counted",
            "get",
            "quota",
            "objects",
            "-o",
            "jsonpath={.status.used}",
        ])
        .unwrap()
    };
    eventually("the new quota's status", || {
        used() == r#"{"count/configmaps":"0","count/deployments.apps":"0","secrets":"0"}"#
    });
    for cm in ["c1", "c2"] {
        cp.ok(&["-n", "counted", "create", "configmap", cm])
            .unwrap();
    }
    expect_err(
        &cp.kubectl(&["-n", "counted", "create", "configmap", "c3"]),
        "configmaps \"c3\" is forbidden: exceeded quota: objects, requested: count/configmaps=1, used: count/configmaps=2, limited: count/configmaps=2",
    );
    cp.ok(&["-n", "counted", "create", "secret", "generic", "s1"])
        .unwrap();
    expect_err(
        &cp.kubectl(&["-n", "counted", "create", "secret", "generic", "s2"]),
        "exceeded quota: objects, requested: secrets=1, used: secrets=1, limited: secrets=1",
    );
    cp.ok(&[
        "-n",
        "counted",
        "create",
        "deployment",
        "d1",
        "--image=busybox:1",
    ])
    .unwrap();
    expect_err(
        &cp.kubectl(&[
            "-n",
            "counted",
            "create",
            "deployment",
            "d2",
            "--image=busybox:1",
        ]),
        "deployments.apps \"d2\" is forbidden: exceeded quota: objects",
    );
    assert_eq!(
        used(),
        r#"{"count/configmaps":"2","count/deployments.apps":"1","secrets":"1"}"#
    );
    // A deleted object gives its place back.
    cp.ok(&["-n", "counted", "delete", "configmap", "c1"])
        .unwrap();
    assert!(used().contains(r#""count/configmaps":"1""#), "{}", used());
    cp.ok(&["-n", "counted", "create", "configmap", "c3"])
        .unwrap();
}

const SSA_DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
  labels: {app: web, tier: front}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: ferry/echo:1
        ports:
        - containerPort: 8080
"#;

/// The deployment's managers as `manager/operation` with the fields each owns (FieldsV1).
fn managed_fields(cp: &ControlPlane) -> Vec<(String, serde_json::Value)> {
    let out = cp
        .ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "json",
            "--show-managed-fields",
        ])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                format!(
                    "{}/{}",
                    m["manager"].as_str().unwrap(),
                    m["operation"].as_str().unwrap()
                ),
                m["fieldsV1"].clone(),
            )
        })
        .collect()
}

#[test]
fn server_side_apply_tracks_managers_refuses_conflicts_and_removes_dropped_fields() {
    let cp = ControlPlane::start(&[]).unwrap();
    let dir = temp_dir("ssa");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    let full = write(&dir, "full.yaml", SSA_DEPLOYMENT);
    let out = cp.ok(&["apply", "--server-side", "-f", &full]).unwrap();
    assert!(
        out.contains("deployment.apps/web serverside-applied"),
        "{out}"
    );
    let mf = managed_fields(&cp);
    assert_eq!(mf.len(), 1, "{mf:?}");
    assert_eq!(mf[0].0, "kubectl/Apply");
    let f = &mf[0].1;
    assert!(f["f:spec"]["f:replicas"].is_object(), "{f}");
    assert!(
        f["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"]["f:ports"]
            ["k:{\"containerPort\":8080,\"protocol\":\"TCP\"}"]["."]
            .is_object(),
        "containers and ports owned item by item, by their keys: {f}"
    );

    // A second manager changing replicas: refused, naming the field and its manager.
    let scale = write(
        &dir,
        "scale.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\nspec: {replicas: 3}\n",
    );
    let o = cp.kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=scaler",
        "-f",
        &scale,
    ]);
    expect_err(
        &o,
        "Apply failed with 1 conflict: conflict with \"kubectl\" using apps/v1: .spec.replicas",
    );
    assert_eq!(
        cp.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])
            .unwrap(),
        "2"
    );
    // Forced, it takes the field over.
    cp.ok(&[
        "apply",
        "--server-side",
        "--field-manager=scaler",
        "--force-conflicts",
        "-f",
        &scale,
    ])
    .unwrap();
    assert_eq!(
        cp.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])
            .unwrap(),
        "3"
    );
    let mf = managed_fields(&cp);
    let kubectl = &mf.iter().find(|(m, _)| m == "kubectl/Apply").unwrap().1;
    assert!(
        kubectl["f:spec"].get("f:replicas").is_none(),
        "kubectl lost replicas: {kubectl}"
    );
    let scaler = &mf.iter().find(|(m, _)| m == "scaler/Apply").unwrap().1;
    assert_eq!(scaler, &serde_json::json!({"f:spec": {"f:replicas": {}}}));

    // kubectl's configuration drops replicas and the tier label: replicas stays (the scaler
    // owns it), the label goes (kubectl was its only manager).
    let trimmed = SSA_DEPLOYMENT
        .replace("  replicas: 2\n", "")
        .replace("{app: web, tier: front}", "{app: web}");
    let trimmed = write(&dir, "trimmed.yaml", &trimmed);
    cp.ok(&["apply", "--server-side", "-f", &trimmed]).unwrap();
    let got = cp
        .ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas} {.metadata.labels} {.metadata.resourceVersion}",
        ])
        .unwrap();
    let parts: Vec<&str> = got.split(' ').collect();
    assert_eq!(parts[..2], ["3", "{\"app\":\"web\"}"], "{got}");
    // The same configuration again writes nothing.
    cp.ok(&["apply", "--server-side", "-f", &trimmed]).unwrap();
    let rv = cp
        .ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .unwrap();
    assert_eq!(rv, parts[2], "a no-op apply must not write");

    // An update (kubectl label) owns what it set; an apply changing it conflicts with it.
    cp.ok(&["label", "deploy", "web", "team=a"]).unwrap();
    let mf = managed_fields(&cp);
    assert!(
        mf.iter().any(|(m, f)| m == "kubectl-label/Update"
            && f["f:metadata"]["f:labels"]["f:team"].is_object()),
        "{mf:?}"
    );
    let team_b = write(
        &dir,
        "team.yaml",
        &SSA_DEPLOYMENT
            .replace("  replicas: 2\n", "")
            .replace("{app: web, tier: front}", "{app: web, team: b}"),
    );
    let o = cp.kubectl(&["apply", "--server-side", "-f", &team_b]);
    expect_err(
        &o,
        "conflict with \"kubectl-label\" using apps/v1: .metadata.labels.team",
    );
    // Server-side dry run shows the forced result and stores nothing.
    let dry = cp
        .ok(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "-f",
            &team_b,
            "-o",
            "jsonpath={.metadata.labels.team}",
        ])
        .unwrap();
    assert_eq!(dry, "b");
    assert_eq!(
        cp.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.metadata.labels.team}"
        ])
        .unwrap(),
        "a"
    );
    cp.ok(&["apply", "--server-side", "--force-conflicts", "-f", &team_b])
        .unwrap();
    let mf = managed_fields(&cp);
    assert!(
        !mf.iter().any(|(m, _)| m == "kubectl-label/Update"),
        "the label's only field went to kubectl, so its entry goes: {mf:?}"
    );

    // From client-side to server-side apply and back, as kubectl moves between them: the
    // server-side apply takes over client-side apply's fields without a conflict, and
    // kubectl's migration of managedFields (a JSON patch testing the resourceVersion) lands.
    let cm = |z: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: moving, namespace: default}}\ndata: {{x: \"1\", z: \"{z}\"}}\n")
    };
    let csa = write(&dir, "cm-csa.yaml", &cm("2"));
    cp.ok(&["apply", "-f", &csa]).unwrap();
    let ssa = write(&dir, "cm-ssa.yaml", &cm("3"));
    cp.ok(&["apply", "--server-side", "-f", &ssa]).unwrap();
    let back = write(&dir, "cm-back.yaml", &cm("4"));
    let o = cp.kubectl(&["apply", "-f", &back]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("rejected managed fields migration"),
        "{}",
        stderr(&o)
    );
    let got: serde_json::Value = serde_json::from_str(
        &cp.ok(&["get", "cm", "moving", "-o", "json", "--show-managed-fields"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(got["data"], serde_json::json!({"x": "1", "z": "4"}));

    // The Python client: its dynamic client's server_side_apply and typed apply patches.
    python_script(
        &cp,
        "server_side_apply.py",
        &["conflict ok", "force ok", "status ok", "bad requests ok"],
    );
}
