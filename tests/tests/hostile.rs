//! The control plane against a hostile but authenticated user: each test sends what such a
//! user would (amplifying patches, stalled watches, idle connections, deep YAML, unknown
//! option values, a node's credentials used beyond its node, impersonation, bad metadata) and
//! checks the answer, that nothing was written that should not be, and that the server's
//! memory stays bounded (its RSS from /proc, against a generous ceiling).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::raw::{curl, curl_as, send, Answer};
use ferry_testbed::controlplane::ControlPlane;
use serde_json::json;

const CM: &str = "/api/v1/namespaces/default/configmaps";

fn create_cm(cp: &ControlPlane, name: &str) {
    let a = send(
        cp,
        "admin",
        "POST",
        CM,
        "application/json",
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "b"}}).to_string(),
    );
    assert_eq!(a.code, 201, "{}", a.text);
}

#[track_caller]
fn expect(a: &Answer, code: u16, words: &str) {
    assert_eq!(a.code, code, "expected {code} with {words:?}: {}", a.text);
    assert!(
        a.text.contains(words) || a.message().contains(words),
        "expected {words:?} in the answer: {}",
        a.text
    );
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_small_json_patch_cannot_exhaust_memory() {
    let cp = ControlPlane::start(&[]).unwrap();
    create_cm(&cp, "c");
    let before = cp.rss_mib();
    let mut ops = vec![json!({"op": "add", "path": "/metadata/annotations",
        "value": {"a": "x".repeat(100)}})];
    for i in 0..25 {
        ops.push(json!({"op": "copy", "from": "/metadata/annotations",
            "path": format!("/metadata/annotations/k{i}")}));
    }
    let body = serde_json::to_string(&ops).unwrap();
    assert!(body.len() < 3000);
    let a = send(
        &cp,
        "admin",
        "PATCH",
        &format!("{CM}/c"),
        "application/json-patch+json",
        &body,
    );
    expect(&a, 422, "copy");
    let after = cp.rss_mib();
    assert!(
        after < before + 200.0,
        "the server grew from {before:.0} to {after:.0} MiB on a {}-byte patch",
        body.len()
    );
    // The object is as it was.
    let got = curl(&cp, &[&format!("{CM}/c")]).json();
    assert!(got["metadata"]["annotations"].is_null(), "{got}");
}

/// A watch over TLS that reads nothing until told to, then reads until the stream says it was
/// closed (or 30 s pass).
fn stalled_watcher(cp: &ControlPlane) -> std::process::Child {
    let (cert, key) = common::raw::identity(cp, "admin");
    let script = format!(
        r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile="{ca}")
ctx.load_cert_chain("{cert}", "{key}")
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect(("127.0.0.1", {port}))
t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
t.sendall(b"GET {CM}?watch=1 HTTP/1.1\r\nHost: x\r\n\r\n")
print("watching", flush=True)
sys.stdin.readline()
t.settimeout(30)
data = b""
try:
    while b"watch again" not in data:
        chunk = t.recv(1 << 20)
        if not chunk:
            break
        data = (data + chunk)[-4096:]
except Exception as e:
    print("error", e, flush=True)
print("closed" if b"watch again" in data else "still open", flush=True)
"#,
        ca = cp.dir.join("pki/ca.crt").display(),
        cert = cert.display(),
        key = key.display(),
        port = cp.port,
    );
    let mut child = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "watching");
    child
}

#[test]
fn a_watcher_that_never_reads_is_closed_and_memory_stays_bounded() {
    let cp = ControlPlane::start(&[
        "--watch-buffer-size=100",
        "--watch-buffer-bytes=16777216",
        "--compaction-interval=1s",
    ])
    .unwrap();
    create_cm(&cp, "big");
    let mut watcher = stalled_watcher(&cp);
    let before = cp.rss_mib();
    // 300 updates of a ConfigMap near 1 MB: 300 MB a stalled watcher would otherwise hold.
    let client = rt().block_on(async {
        let client = ferry_common::kubeconfig::client(&cp.kubeconfig("admin"), "ferry-e2e")
            .await
            .unwrap();
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(client.clone(), "default");
        for i in 0..300 {
            let v = format!("{i:07}{}", "x".repeat(990_000));
            api.patch(
                "big",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"data": {"a": v}})),
            )
            .await
            .unwrap();
        }
        client
    });
    drop(client);
    // History older than two compaction ticks is gone; what is left is the watcher's.
    std::thread::sleep(Duration::from_secs(4));
    let after = cp.rss_mib();
    eprintln!("server RSS: {before:.0} MiB before, {after:.0} MiB after the updates");
    writeln!(watcher.stdin.as_mut().unwrap()).unwrap();
    let mut out = String::new();
    watcher
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = watcher.wait();
    assert!(
        after < before + 150.0,
        "the server held {before:.0} MiB before and {after:.0} MiB after 300 MB of updates to a stalled watcher"
    );
    assert!(
        out.contains("closed"),
        "the stalled watcher was told to watch again: {out}"
    );
    let log = std::fs::read_to_string(cp.log_path()).unwrap();
    assert!(log.contains("closing an unresponsive watcher"), "{log}");
}

/// Opens `n` TCP connections to the server and returns them.
fn idle_connections(cp: &ControlPlane, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let s = std::net::TcpStream::connect(("127.0.0.1", cp.port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s
        })
        .collect()
}

/// Whether the server closed the connection (a read sees the end, or a reset).
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn idle_and_surplus_connections_are_closed() {
    let cp = ControlPlane::start(&[
        "--handshake-timeout=2s",
        "--idle-connection-timeout=3s",
        "--max-connections-per-client=40",
    ])
    .unwrap();
    // Connections that never start TLS: closed after the handshake timeout.
    let mut idle = idle_connections(&cp, 30);
    // Past the per-client cap, connections are closed at once.
    let mut surplus = idle_connections(&cp, 20);
    let started = Instant::now();
    let mut refused = 0;
    for s in &mut surplus {
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        if closed_by_server(s) {
            refused += 1;
        }
    }
    assert!(
        refused >= 10,
        "of 20 connections past a cap of 40 (30 held), {refused} were closed at once"
    );
    for s in &mut idle {
        assert!(closed_by_server(s), "an idle connection was left open");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    drop(surplus);
    // A TLS connection that never sends a request is closed as well.
    let (cert, key) = common::raw::identity(&cp, "admin");
    let out = Command::new("python3")
        .args([
            "-c",
            &format!(
                r#"
import socket, ssl
ctx = ssl.create_default_context(cafile="{}")
ctx.load_cert_chain("{}", "{}")
t = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {})), server_hostname="127.0.0.1")
t.settimeout(20)
try:
    print("closed" if t.recv(1) == b"" else "data")
except Exception as e:
    print("error", e)
"#,
                cp.dir.join("pki/ca.crt").display(),
                cert.display(),
                key.display(),
                cp.port
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "closed",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server still serves.
    let a = curl(&cp, &["/readyz"]);
    assert_eq!(a.code, 200, "{}", a.text);
}

#[test]
fn deep_yaml_is_refused_and_health_stays_answered() {
    let cp = ControlPlane::start(&[]).unwrap();
    let flow = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\ndata: {{a: {}1{}}}\n",
        "[".repeat(16000),
        "]".repeat(16000)
    );
    let mut block =
        String::from("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: deep2\n  annotations:\n");
    for i in 0..400 {
        block.push_str(&format!("{}k{i}:\n", " ".repeat(4 + i)));
    }
    let yaml = "application/yaml";
    // Three at once, while health is asked.
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let hs: Vec<_> = [&flow, &block, &flow]
            .into_iter()
            .map(|body| s.spawn(|| send(&cp, "admin", "POST", CM, yaml, body)))
            .collect();
        let health = curl(&cp, &["/readyz"]);
        assert_eq!(health.code, 200);
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in &answers {
        expect(a, 400, "nested more than 100 levels");
    }
    // Ordinary YAML still works.
    let fine = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fine\ndata:\n  k: v\n";
    let a = send(&cp, "admin", "POST", CM, yaml, fine);
    assert_eq!(a.code, 201, "{}", a.text);
}

#[test]
fn only_dry_run_all_is_accepted_and_it_writes_nothing() {
    let cp = ControlPlane::start(&[]).unwrap();
    let body =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "d"}}).to_string();
    for bad in ["all", "server", "true", "None"] {
        let a = send(
            &cp,
            "admin",
            "POST",
            &format!("{CM}?dryRun={bad}"),
            "application/json",
            &body,
        );
        expect(&a, 400, "dry run");
    }
    let a = send(
        &cp,
        "admin",
        "POST",
        &format!("{CM}?dryRun=All"),
        "application/json",
        &body,
    );
    assert_eq!(a.code, 201, "{}", a.text);
    assert_eq!(
        curl(&cp, &[&format!("{CM}/d")]).code,
        404,
        "nothing was written"
    );
    create_cm(&cp, "e");
    let a = send(
        &cp,
        "admin",
        "DELETE",
        &format!("{CM}/e"),
        "application/json",
        r#"{"dryRun":["all"]}"#,
    );
    expect(&a, 400, "dry run");
    assert_eq!(curl(&cp, &[&format!("{CM}/e")]).code, 200, "still there");
}

#[test]
fn a_node_reaches_only_what_its_pods_need() {
    let cp = ControlPlane::start(&["--node-kubeconfigs=n1,n2"]).unwrap();
    let admin = |args: &[&str]| cp.ok(args).unwrap();
    admin(&["create", "secret", "generic", "used", "--from-literal=k=v"]);
    admin(&["create", "secret", "generic", "other", "--from-literal=k=v"]);
    admin(&["create", "configmap", "cfg", "--from-literal=k=v"]);
    let pod = |name: &str, node: &str, secret: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox",
                        "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}]}]}})
        .to_string()
    };
    for (n, node, s) in [("p1", "n1", "used"), ("p2", "n2", "other")] {
        let a = send(
            &cp,
            "admin",
            "POST",
            "/api/v1/namespaces/default/pods",
            "application/json",
            &pod(n, node, s),
        );
        assert_eq!(a.code, 201, "{}", a.text);
    }
    for n in ["n1", "n2"] {
        let a = send(
            &cp,
            &format!("node-{n}"),
            "POST",
            "/api/v1/nodes",
            "application/json",
            &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}).to_string(),
        );
        assert_eq!(a.code, 201, "a node registers itself: {}", a.text);
    }
    let n1 = |method: &str, path: &str, ct: &str, body: &str| {
        send(&cp, "node-n1", method, path, ct, body)
    };
    let get = |path: &str| curl_as(&cp, "node-n1", &[path]);
    assert_eq!(get("/api/v1/namespaces/default/secrets/used").code, 200);
    expect(
        &get("/api/v1/namespaces/default/secrets/other"),
        403,
        "system:node:n1",
    );
    expect(
        &get("/api/v1/namespaces/default/secrets"),
        403,
        "only by name",
    );
    expect(&get("/api/v1/secrets"), 403, "forbidden");
    expect(
        &get("/api/v1/namespaces/default/configmaps/cfg"),
        403,
        "no relationship",
    );
    // Its own Node: yes; another's: no (status and labels alike).
    let merge = "application/merge-patch+json";
    let a = n1(
        "PATCH",
        "/api/v1/nodes/n1/status",
        merge,
        r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    );
    assert_eq!(a.code, 200, "{}", a.text);
    expect(
        &n1(
            "PATCH",
            "/api/v1/nodes/n2/status",
            merge,
            r#"{"status":{"conditions":[]}}"#,
        ),
        403,
        "not allowed to modify node \"n2\"",
    );
    expect(
        &n1(
            "PATCH",
            "/api/v1/nodes/n2",
            merge,
            r#"{"metadata":{"labels":{"x":"y"}}}"#,
        ),
        403,
        "not allowed to modify node \"n2\"",
    );
    expect(
        &n1(
            "PATCH",
            "/api/v1/nodes/n1",
            merge,
            r#"{"metadata":{"labels":{"node-restriction.kubernetes.io/pool":"gold"}}}"#,
        ),
        403,
        "not allowed to modify labels",
    );
    // Pods: status and deletion of its own only; no spec changes; only mirror pods.
    expect(
        &n1(
            "PATCH",
            "/api/v1/namespaces/default/pods/p2/status",
            merge,
            r#"{"status":{"phase":"Failed"}}"#,
        ),
        403,
        "spec.nodeName set to itself",
    );
    assert_eq!(
        n1(
            "PATCH",
            "/api/v1/namespaces/default/pods/p1/status",
            merge,
            r#"{"status":{"phase":"Running"}}"#
        )
        .code,
        200
    );
    expect(
        &n1(
            "PATCH",
            "/api/v1/namespaces/default/pods/p1",
            merge,
            r#"{"metadata":{"labels":{"a":"b"}}}"#,
        ),
        403,
        "can only update pod status",
    );
    expect(
        &n1(
            "DELETE",
            "/api/v1/namespaces/default/pods/p2",
            "application/json",
            "",
        ),
        403,
        "can only delete pods with spec.nodeName set to itself",
    );
    let host_pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "evil"},
        "spec": {"nodeName": "n2", "hostNetwork": true, "containers": [{"name": "c", "image": "busybox"}]}}).to_string();
    expect(
        &n1(
            "POST",
            "/api/v1/namespaces/default/pods",
            "application/json",
            &host_pod,
        ),
        403,
        "can only create mirror pods",
    );
    // Leases: its own, not the controller manager's.
    let lease = |ns: &str, name: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": ns}, "spec": {"holderIdentity": "n1"}})
        .to_string()
    };
    let a = n1(
        "POST",
        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
        "application/json",
        &lease("kube-node-lease", "n1"),
    );
    assert_eq!(a.code, 201, "{}", a.text);
    expect(
        &n1(
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            "application/json",
            &lease("kube-node-lease", "n2"),
        ),
        403,
        "same name as the requesting node",
    );
    expect(
        &n1(
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases",
            "application/json",
            &lease("kube-system", "kube-controller-manager"),
        ),
        403,
        "kube-node-lease/n1",
    );
    // And its own pod can go.
    let a = n1(
        "DELETE",
        "/api/v1/namespaces/default/pods/p1",
        "application/json",
        "",
    );
    assert!(a.code == 200 || a.code == 202, "{}", a.text);
    // Nothing it was refused happened.
    let p2 = curl(&cp, &["/api/v1/namespaces/default/pods/p2"]).json();
    assert!(
        p2["metadata"]["deletionTimestamp"].is_null() && p2["status"]["phase"] != "Failed",
        "{p2}"
    );
    assert_eq!(
        curl(&cp, &["/api/v1/namespaces/default/pods/evil"]).code,
        404
    );
}

#[test]
fn impersonation_acts_as_the_named_user_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, "jane-token,jane,1\n").unwrap();
    let cp = ControlPlane::start(&["--token-auth-file", tokens.to_str().unwrap()]).unwrap();
    cp.ok(&["create", "secret", "generic", "s", "--from-literal=k=v"])
        .unwrap();
    // The admin acting as nobody is refused as nobody would be.
    let out = cp.kubectl(&["--as", "nobody", "get", "secrets"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("User \"nobody\" cannot list resource \"secrets\""),
        "{err}"
    );
    let out = cp.kubectl(&[
        "--as",
        "nobody",
        "--as-group",
        "system:masters",
        "get",
        "secrets",
        "-o",
        "name",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // jane may not impersonate until a role says so, and then only bob.
    let as_jane = |args: &[&str]| {
        let mut all = vec!["--token", "jane-token"];
        all.extend_from_slice(args);
        cp.kubectl_as(&cp.kubeconfig("admin"), &all, None)
    };
    let out = as_jane(&["--as", "bob", "get", "pods"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot impersonate resource \"users\""),
        "{err}"
    );
    cp.ok(&[
        "create",
        "clusterrole",
        "impersonate-bob",
        "--verb=impersonate",
        "--resource=users",
        "--resource-name=bob",
    ])
    .unwrap();
    cp.ok(&[
        "create",
        "clusterrolebinding",
        "jane-bob",
        "--clusterrole=impersonate-bob",
        "--user=jane",
    ])
    .unwrap();
    cp.ok(&[
        "create",
        "role",
        "read-pods",
        "--verb=list",
        "--resource=pods",
    ])
    .unwrap();
    cp.ok(&[
        "create",
        "rolebinding",
        "bob-pods",
        "--role=read-pods",
        "--user=bob",
    ])
    .unwrap();
    let ok = || as_jane(&["--as", "bob", "get", "pods"]);
    common::eventually(
        "the role reaches the authorizer",
        Duration::from_secs(10),
        || ok().status.success(),
    );
    let out = as_jane(&["--as", "bob", "get", "secrets"]);
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("User \"bob\" cannot list resource \"secrets\""));
    let out = as_jane(&["--as", "carol", "get", "pods"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot impersonate resource \"users\""));
    let out = as_jane(&[
        "--as",
        "bob",
        "--as-group",
        "system:masters",
        "get",
        "secrets",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot impersonate resource \"groups\""));
}

#[test]
fn system_namespaces_and_the_namespace_collection_cannot_be_deleted() {
    let cp = ControlPlane::start(&[]).unwrap();
    let a = curl(&cp, &["-X", "DELETE", "/api/v1/namespaces"]);
    assert_eq!(a.code, 405, "{}", a.text);
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let out = cp.kubectl(&["delete", "namespace", ns]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("this namespace may not be deleted"),
            "{ns}: {err}"
        );
    }
    let all = cp.ok(&["get", "ns", "-o", "name"]).unwrap();
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(all.contains(&format!("namespace/{ns}")), "{all}");
    }
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn secrets_are_private_on_disk_and_encrypted_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("encryption.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - secretbox:\n      keys:\n      - name: k1\n        secret: ZmVycnktdGVzdC1rZXktMDEyMzQ1Njc4OWFiY2RlZiE=\n  - identity: {}\n",
    )
    .unwrap();
    let mut cp =
        ControlPlane::start(&["--encryption-provider-config", cfg.to_str().unwrap()]).unwrap();
    cp.ok(&[
        "create",
        "secret",
        "generic",
        "db",
        "--from-literal=password=hunter2-plaintext",
    ])
    .unwrap();
    cp.ok(&[
        "create",
        "configmap",
        "plain",
        "--from-literal=k=visible-in-the-log",
    ])
    .unwrap();
    let store = cp.dir.join("store");
    assert_eq!(mode(&cp.dir), 0o700);
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&store.join("wal")), 0o600);
    let wal = std::fs::read(store.join("wal")).unwrap();
    let has = |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        has(&wal, "visible-in-the-log"),
        "the check can see plaintext"
    );
    assert!(!has(&wal, "aHVudGVyMi1wbGFpbnRleHQ") && !has(&wal, "hunter2-plaintext"));
    assert!(has(&wal, "k8s:enc:secretbox:v1:k1:"));
    let snap = cp.dir.join("snap.db");
    let out = Command::new(ferry_testbed::bin_path("ferry-controlplane").unwrap())
        .args([
            "snapshot",
            "save",
            snap.to_str().unwrap(),
            "--data-dir",
            cp.dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&snap), 0o600);
    assert!(!has(
        &std::fs::read(&snap).unwrap(),
        "aHVudGVyMi1wbGFpbnRleHQ"
    ));
    // Read back through the API, also after a restart.
    cp.restart().unwrap();
    let got = cp
        .ok(&["get", "secret", "db", "-o", "jsonpath={.data.password}"])
        .unwrap();
    assert_eq!(got, "aHVudGVyMi1wbGFpbnRleHQ=");
}

#[test]
fn concurrent_patches_without_a_resource_version_all_land() {
    let cp = ControlPlane::start(&[]).unwrap();
    create_cm(&cp, "shared");
    let results = rt().block_on(async {
        let client = ferry_common::kubeconfig::client(&cp.kubeconfig("admin"), "ferry-e2e")
            .await
            .unwrap();
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(client, "default");
        let tasks = (0..60).map(|i| {
            let api = api.clone();
            async move {
                let key = format!("k{i}");
                let patch = match i % 3 {
                    0 => kube::api::Patch::Merge(json!({"data": {key: "v"}})),
                    1 => kube::api::Patch::Strategic(json!({"data": {key: "v"}})),
                    _ => kube::api::Patch::Json::<serde_json::Value>(
                        serde_json::from_value(
                            json!([{"op": "add", "path": format!("/data/{key}"), "value": "v"}]),
                        )
                        .unwrap(),
                    ),
                };
                api.patch("shared", &kube::api::PatchParams::default(), &patch)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        });
        futures::future::join_all(tasks).await
    });
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 60 patches failed: {failed:?}",
        failed.len()
    );
    let data = curl(&cp, &[&format!("{CM}/shared")]).json()["data"].clone();
    assert_eq!(data.as_object().unwrap().len(), 61, "{data}");
}

#[test]
fn validation_and_options_are_answered_as_kubernetes_does() {
    let cp = ControlPlane::start(&[]).unwrap();
    let post = |obj: serde_json::Value, query: &str| {
        send(
            &cp,
            "admin",
            "POST",
            &format!("{CM}{query}"),
            "application/json",
            &obj.to_string(),
        )
    };
    let cm = |meta: serde_json::Value, data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data});
    let cases: Vec<(serde_json::Value, &str, u16, &str)> = vec![
        (
            cm(json!({"name": "k1"}), json!({"a/b": "x"})),
            "",
            422,
            "data[a/b]",
        ),
        (
            cm(json!({"name": "k2", "labels": {"a b": "x"}}), json!({})),
            "",
            422,
            "metadata.labels",
        ),
        (
            cm(
                json!({"name": "k3", "labels": {format!("{}/x", "a".repeat(254)): "x"}}),
                json!({}),
            ),
            "",
            422,
            "prefix part",
        ),
        (
            cm(
                json!({"name": "k4", "annotations": {"a b": "x"}}),
                json!({}),
            ),
            "",
            422,
            "metadata.annotations",
        ),
        (
            cm(
                json!({"name": "k5", "annotations": {"big": "x".repeat(262_200)}}),
                json!({}),
            ),
            "",
            422,
            "Too long: must have at most 262144 bytes",
        ),
        (
            cm(json!({"name": "k6", "finalizers": ["a b"]}), json!({})),
            "",
            422,
            "metadata.finalizers[0]",
        ),
        (
            cm(
                json!({"name": "k7", "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "p"}]}),
                json!({}),
            ),
            "",
            422,
            "uid must not be empty",
        ),
        (
            cm(json!({"name": "k8", "resourceVersion": "12"}), json!({})),
            "",
            400,
            "resourceVersion should not be set on objects to be created",
        ),
        (
            cm(json!({"name": "k9", "generation": -1}), json!({})),
            "",
            422,
            "metadata.generation",
        ),
        (
            cm(json!({"name": "k10"}), json!({})),
            "?fieldValidation=Bogus",
            400,
            "fieldValidation",
        ),
    ];
    for (obj, q, code, words) in cases {
        let a = post(obj.clone(), q);
        expect(&a, code, words);
    }
    // Duplicate keys: refused under Strict, a warning otherwise.
    let dup = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"dup"},"data":{"a":"1","a":"2"}}"#;
    let a = send(
        &cp,
        "admin",
        "POST",
        &format!("{CM}?fieldValidation=Strict"),
        "application/json",
        dup,
    );
    expect(&a, 400, "duplicate field \\\"data.a\\\"");
    let a = send(
        &cp,
        "admin",
        "POST",
        &format!("{CM}?fieldValidation=Warn"),
        "application/json",
        dup,
    );
    assert_eq!(a.code, 201, "{}", a.text);
    assert!(
        a.headers.contains("warning: 299 - \"duplicate field"),
        "{}",
        a.headers
    );
    // A long single-label name is a valid subdomain.
    let long = "n".repeat(100);
    assert_eq!(post(cm(json!({"name": long}), json!({})), "").code, 201);
    // Options and media types.
    expect(&curl(&cp, &[&format!("{CM}?limit=abc")]), 400, "limit");
    expect(
        &curl(&cp, &[&format!("{CM}?watch=1&timeoutSeconds=-5")]),
        400,
        "timeoutSeconds",
    );
    expect(
        &curl(&cp, &[&format!("{CM}?labelSelector=a%20in%20()")]),
        400,
        "values set can't be empty",
    );
    let a = send(&cp, "admin", "POST", CM, "text/plain", "name: x");
    expect(&a, 415, "unknown format");
    // Patches: identity fields are immutable; a no-op changes nothing.
    create_cm(&cp, "p");
    let merge = "application/merge-patch+json";
    for (patch, field) in [
        (r#"{"metadata":{"name":"q"}}"#, "metadata.name"),
        (r#"{"metadata":{"uid":"0000"}}"#, "metadata.uid"),
        (
            r#"{"metadata":{"namespace":"kube-system"}}"#,
            "metadata.namespace",
        ),
    ] {
        let a = send(&cp, "admin", "PATCH", &format!("{CM}/p"), merge, patch);
        expect(&a, 422, field);
    }
    let rv = |a: &Answer| {
        a.json()["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let before = curl(&cp, &[&format!("{CM}/p")]);
    let after = send(
        &cp,
        "admin",
        "PATCH",
        &format!("{CM}/p"),
        merge,
        r#"{"data":{"a":"b"}}"#,
    );
    assert_eq!(after.code, 200);
    assert_eq!(
        rv(&before),
        rv(&after),
        "a no-op patch keeps the resourceVersion"
    );
    let changed = send(
        &cp,
        "admin",
        "PATCH",
        &format!("{CM}/p"),
        merge,
        r#"{"data":{"a":"c"}}"#,
    );
    assert_ne!(rv(&before), rv(&changed));
    // An object over the store's limit is refused whole.
    let env: Vec<serde_json::Value> = (0..4)
        .map(|i| json!({"name": format!("E{i}"), "value": "x".repeat(450_000)}))
        .collect();
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "huge"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "env": env}]}});
    let file = cp.dir.join("huge.json");
    std::fs::write(&file, pod.to_string()).unwrap();
    let a = curl_as(
        &cp,
        "admin",
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!("@{}", file.display()),
            "/api/v1/namespaces/default/pods",
        ],
    );
    expect(&a, 413, "the limit is");
    assert_eq!(
        curl(&cp, &["/api/v1/namespaces/default/pods/huge"]).code,
        404
    );
}

#[test]
fn reads_past_the_in_flight_limit_get_429_and_a_stuck_request_times_out() {
    let cp = ControlPlane::start(&["--max-requests-inflight=1", "--request-timeout=4s"]).unwrap();
    // A kubelet that accepts and never answers holds a log request in flight.
    let kubelet = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = kubelet.local_addr().unwrap().port();
    let node =
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "slow"}}).to_string();
    assert_eq!(
        send(
            &cp,
            "admin",
            "POST",
            "/api/v1/nodes",
            "application/json",
            &node
        )
        .code,
        201
    );
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}})
    .to_string();
    let a = send(
        &cp,
        "admin",
        "PATCH",
        "/api/v1/nodes/slow/status",
        "application/merge-patch+json",
        &status,
    );
    assert_eq!(a.code, 200, "{}", a.text);
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"nodeName": "slow", "containers": [{"name": "c", "image": "busybox"}]}})
    .to_string();
    assert_eq!(
        send(
            &cp,
            "admin",
            "POST",
            "/api/v1/namespaces/default/pods",
            "application/json",
            &pod
        )
        .code,
        201
    );
    std::thread::scope(|s| {
        let stuck = s.spawn(|| curl(&cp, &["/api/v1/namespaces/default/pods/p/log"]));
        let (_conn, _) = kubelet.accept().unwrap(); // the log request is in flight now
        let a = curl(&cp, &[CM]);
        expect(&a, 429, "Too many requests");
        assert!(a.headers.contains("retry-after: 1"), "{}", a.headers);
        assert_eq!(curl(&cp, &["/readyz"]).code, 200, "health is not limited");
        // Writes have their own limit.
        create_cm(&cp, "w");
        let a = stuck.join().unwrap();
        expect(&a, 504, "did not complete within the allotted timeout");
    });
    assert_eq!(curl(&cp, &[CM]).code, 200, "the slot is free again");
}

/// schemathesis (installed by `cargo xtask setup`) generates requests from each OpenAPI
/// document, valid and invalid, with a fixed seed, for a bounded time (`FERRY_FUZZ_SECONDS`
/// in all, 90 by default): no answer may be a server error, and the server stays bounded.
#[test]
fn fuzzing_from_the_openapi_documents_finds_no_server_error() {
    let budget: u64 = std::env::var("FERRY_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    let cp = ControlPlane::start(&[]).unwrap();
    let (cert, key) = common::raw::identity(&cp, "admin");
    let root = curl(&cp, &["/openapi/v3"]).json();
    let docs: Vec<String> = root["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p["serverRelativeURL"].as_str().unwrap().to_string())
        .collect();
    assert!(docs.len() >= 5, "{root}");
    let st = std::path::Path::new(ferry_testbed::controlplane::PYTHON_VENV).join("bin/st");
    for doc in &docs {
        // The core group has most operations: it gets half the time.
        let secs = if doc.contains("/api/v1") {
            budget / 2
        } else {
            (budget / 2 / (docs.len() as u64 - 1)).max(5)
        };
        let out = Command::new(&st)
            .current_dir(&cp.dir)
            .arg("run")
            .arg(format!("{}{doc}", cp.url))
            .arg("--tls-verify")
            .arg(cp.dir.join("pki/ca.crt"))
            .arg("--request-cert")
            .arg(&cert)
            .arg("--request-cert-key")
            .arg(&key)
            .args([
                "--checks",
                "not_a_server_error",
                "--seed",
                "20261129",
                "--workers",
                "1",
            ])
            .args([
                "--max-examples",
                "30",
                "--request-timeout",
                "20",
                "--no-color",
            ])
            .args([
                "--phases",
                "coverage,fuzzing",
                "--max-time",
                &secs.to_string(),
            ])
            .output()
            .expect("schemathesis is installed by cargo xtask setup");
        let text = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        assert!(
            out.status.success(),
            "schemathesis found failures in {doc}:\n{}\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
        let summary = text
            .lines()
            .find(|l| l.contains(" generated, "))
            .unwrap_or_default();
        eprintln!("{doc}: {}", summary.trim());
        assert!(
            summary.contains("passed"),
            "{doc}: no test case ran:\n{text}"
        );
    }
    let rss = cp.rss_mib();
    assert!(rss < 1024.0, "the server holds {rss:.0} MiB after fuzzing");
    assert_eq!(curl(&cp, &["/readyz"]).code, 200);
}
