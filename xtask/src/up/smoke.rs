//! `up --smoke`: the README's lines checked against the running cluster, then every daemon
//! killed in turn under traffic.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ferry_testbed::run;

use super::{kubectl, node_ready, wait_for, Cluster, CLUSTER_DNS, DATA, NODE_IP};

/// The shell command of a pod that connects to the API server the way in-cluster clients find
/// it.
const API_CLIENT: &str = "if echo | nc -w 3 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT >/dev/null; then echo api-reachable; fi; if echo | nc -w 3 kubernetes.default.svc 443 >/dev/null; then echo api-by-name; fi";

/// A busybox container running `command` with sh.
fn busybox(command: &str) -> String {
    format!("image: ferry.local/busybox:1, command: [sh, -c, '{command}']")
}

/// Applies a pod `name` in `default` whose one container (`container`: its image and command
/// as YAML flow mapping entries) runs once (restartPolicy Never).
fn apply_run_once(admin: &Path, name: &str, container: &str) -> Result<()> {
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
         restartPolicy: Never\n  containers:\n  - {{name: c, imagePullPolicy: IfNotPresent, {container}}}\n"
    );
    let manifest = Path::new(DATA).join(format!("{name}.yaml"));
    std::fs::write(&manifest, pod)?;
    let applied = kubectl(admin, &["apply", "-f", manifest.to_str().unwrap()]);
    std::fs::remove_file(&manifest).ok();
    applied.map(|_| ())
}

/// The logs of pod `name` once it has finished (within a minute).
fn logs_when_finished(admin: &Path, name: &str) -> Result<String> {
    wait_for(
        &format!("the {name} pod to finish"),
        Duration::from_secs(60),
        || {
            kubectl(
                admin,
                &["get", "pod", name, "-o", "jsonpath={.status.phase}"],
            )
            .is_ok_and(|p| p == "Succeeded" || p == "Failed")
        },
    )?;
    kubectl(admin, &["logs", name])
}

/// The README's two lines, checked: every replica answers over the NodePort and the ClusterIP
/// from the host.
pub(super) fn smoke_test(c: &Cluster, admin: &Path, root: &Path) -> Result<()> {
    let hello = root.join("examples/hello.yaml");
    kubectl(admin, &["apply", "-f", hello.to_str().unwrap()])?;
    kubectl(
        admin,
        &["rollout", "status", "deploy/hello", "--timeout=120s"],
    )?;
    let pods: std::collections::BTreeSet<String> = kubectl(
        admin,
        &[
            "get",
            "pods",
            "-l",
            "app=hello",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
    )?
    .split_whitespace()
    .map(str::to_string)
    .collect();
    let vip = kubectl(
        admin,
        &["get", "svc", "hello", "-o", "jsonpath={.spec.clusterIP}"],
    )?;
    for (what, addr) in [
        ("NodePort", format!("{NODE_IP}:30080")),
        ("ClusterIP", format!("{vip}:80")),
    ] {
        let to: std::net::SocketAddr = addr.parse()?;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..60 {
            if let Ok(a) = ferry_testbed::echo::tcp_ask(to, Duration::from_secs(1)) {
                seen.insert(a.server);
            }
            if seen == pods {
                break;
            }
        }
        if seen != pods {
            bail!("the {what} {addr} was answered by {seen:?}; the replicas are {pods:?}");
        }
        eprintln!(
            "[up] smoke: the {what} {addr} reaches all {} replicas",
            pods.len()
        );
    }
    // A pod finds the API through the `kubernetes` Service and the variables the kubelet gave
    // it (the API server is a backend on the node itself).
    apply_run_once(admin, "api-client", &busybox(API_CLIENT))?;
    let said = logs_when_finished(admin, "api-client")?;
    if !said.contains("api-reachable") {
        bail!("a pod could not reach the API through the kubernetes Service: {said}");
    }
    if !said.contains("api-by-name") {
        bail!("a pod could not reach the API as kubernetes.default.svc (cluster DNS): {said}");
    }
    eprintln!(
        "[up] smoke: a pod reaches the API at $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT and as kubernetes.default.svc"
    );
    // An in-cluster client (kube-rs' Config::incluster: the mounted token and CA) is the
    // namespace's default account, which RBAC gives no pods.
    apply_run_once(
        admin,
        "incluster",
        "image: ferry.local/incluster:1, args: [pods]",
    )?;
    let said = logs_when_finished(admin, "incluster")?;
    if !said.contains("pods: 403 Forbidden")
        || !said.contains("system:serviceaccount:default:default")
    {
        bail!("an in-cluster client was not authenticated as its service account: {said}");
    }
    kubectl(admin, &["delete", "pod", "incluster", "--timeout=60s"])?;
    eprintln!("[up] smoke: an in-cluster client authenticates as system:serviceaccount:default:default (and RBAC forbids it pods)");
    // Every daemon killed in turn, the Service in use: each is started again, the NodePort
    // keeps answering, the running pods are adopted and the finished one is not run again.
    survive_kills(c, admin, &pods)?;
    kubectl(admin, &["delete", "pod", "api-client", "--wait=false"])?;
    // The printed DNS line, from the host.
    let name = "hello.default.svc.cluster.local";
    let dig = run(
        "dig",
        &[
            &format!("@{CLUSTER_DNS}"),
            "+short",
            "+time=2",
            "+tries=3",
            name,
        ],
    )?;
    if dig.trim() != vip {
        bail!("dig @{CLUSTER_DNS} {name} answered {dig:?}, not the Service's {vip}");
    }
    eprintln!("[up] smoke: {name} resolves to {vip} at the cluster DNS address {CLUSTER_DNS}");
    // The README's other lines work too.
    for args in [
        &["get", "pods", "-o", "wide"][..],
        &["logs", "-l", "app=hello"][..],
        &["describe", "pod", "-l", "app=hello"][..],
    ] {
        kubectl(admin, args).with_context(|| format!("kubectl {}", args.join(" ")))?;
    }
    kubectl(
        admin,
        &[
            "delete",
            "-f",
            hello.to_str().unwrap(),
            "--wait=true",
            "--timeout=60s",
        ],
    )?;
    Ok(())
}

/// What the pods of the smoke test look like to the API: (name, container id, restarts, phase).
fn pod_states(admin: &Path) -> Result<Vec<String>> {
    let out = kubectl(
        admin,
        &[
            "get",
            "pods",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.containerStatuses[0].containerID} {.status.containerStatuses[0].restartCount}{"\n"}{end}"#,
        ],
    )?;
    let mut v: Vec<String> = out.lines().map(str::to_string).collect();
    v.sort();
    Ok(v)
}

/// kill -9 of each daemon in turn while a client asks the NodePort every 20 ms: each must be
/// started again by the supervisor and serve (the API answers, the node is Ready), no request
/// may fail for longer than the daemon was away, and the pods must be the same containers
/// afterwards (adopted by the restarted kubelet; the finished pod not run again).
fn survive_kills(
    c: &Cluster,
    admin: &Path,
    replicas: &std::collections::BTreeSet<String>,
) -> Result<()> {
    let before = pod_states(admin)?;
    let to: std::net::SocketAddr = format!("{NODE_IP}:30080").parse()?;
    let done = Arc::new(AtomicBool::new(false));
    // (requests, failed, the longest run of failures)
    let client = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut asked, mut failed, mut worst) = (0u64, 0u64, Duration::ZERO);
            let mut failing_since: Option<Instant> = None;
            // Bounded: stops when told, or after 10 minutes whatever happens.
            let limit = Instant::now() + Duration::from_secs(600);
            while !done.load(Ordering::SeqCst) && Instant::now() < limit {
                asked += 1;
                if ferry_testbed::echo::tcp_ask(to, Duration::from_secs(1)).is_ok() {
                    if let Some(t) = failing_since.take() {
                        worst = worst.max(t.elapsed());
                    }
                } else {
                    failed += 1;
                    failing_since.get_or_insert_with(Instant::now);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(t) = failing_since {
                worst = worst.max(t.elapsed());
            }
            (asked, failed, worst)
        })
    };
    let mut away_longest = Duration::ZERO;
    let mut result = Ok(());
    for name in [
        "ferry-proxy",
        "ferry-kubelet",
        "scheduler",
        "controller-manager",
        "ferry-controlplane",
    ] {
        let Some((pid, restarts)) = c.daemon(name) else {
            result = Err(anyhow::anyhow!("{name} is not running before the kill"));
            break;
        };
        let killed = Instant::now();
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let back = wait_for(
            &format!("{name} to be started again"),
            Duration::from_secs(30),
            || c.daemon(name).is_some_and(|(_, r)| r > restarts),
        )
        .and_then(|()| {
            wait_for(
                &format!("the API and node ferry to be Ready after {name} came back"),
                Duration::from_secs(90),
                || node_ready(admin),
            )
        });
        if let Err(e) = back {
            result = Err(e);
            break;
        }
        let away = killed.elapsed();
        away_longest = away_longest.max(away);
        eprintln!("[up] smoke: kill -9 {name}: started again, the API answering, after {away:.1?}");
    }
    done.store(true, Ordering::SeqCst);
    let (asked, failed, worst) = client
        .join()
        .map_err(|_| anyhow::anyhow!("the NodePort client panicked"))?;
    result?;
    eprintln!(
        "[up] smoke: the NodePort answered {} of {asked} requests during the kills; longest failure {worst:.1?}",
        asked - failed
    );
    if worst > away_longest {
        bail!(
            "the NodePort failed for {worst:?}, longer than any daemon was away ({away_longest:?})"
        );
    }
    // The restarted cluster schedules and runs a new pod; the restarted kubelet's workers for
    // the pods it found had their first sync before that (it starts them all at once).
    apply_run_once(admin, "after-restarts", &busybox("echo ran"))?;
    wait_for(
        "a pod created after the restarts to run and finish",
        Duration::from_secs(120),
        || {
            kubectl(
                admin,
                &[
                    "get",
                    "pod",
                    "after-restarts",
                    "-o",
                    "jsonpath={.status.phase}",
                ],
            )
            .is_ok_and(|p| p == "Succeeded")
        },
    )?;
    kubectl(admin, &["delete", "pod", "after-restarts", "--wait=false"])?;
    let mut after = pod_states(admin)?;
    after.retain(|p| !p.starts_with("after-restarts "));
    if after != before {
        bail!("the pods changed across the restarts (a restarted kubelet must adopt running containers and never run a finished pod again):\nbefore: {before:#?}\nafter: {after:#?}");
    }
    eprintln!(
        "[up] smoke: a new pod ran; the {} replicas and the finished api-client pod are the same containers as before the restarts",
        replicas.len()
    );
    Ok(())
}
