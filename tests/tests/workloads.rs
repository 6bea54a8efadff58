//! The workload controllers through kubectl, with the scheduler placing their pods and a
//! test kubelet (`common::TestKubelet`) running them: ReplicationController, DaemonSet,
//! Job, CronJob, StatefulSet.

mod common;

use std::time::Duration;

use common::{apply, eventually, TestKubelet};
use ferry_testbed::controlplane::{Component, ControlPlane};

struct Cluster {
    kubelet: TestKubelet,
    _components: [Component; 2],
    cp: ControlPlane,
}

fn cluster(nodes: &[&str]) -> Cluster {
    let cp = ControlPlane::start(&[]).expect("control plane");
    let components = cp.spawn_controllers(&[]).expect("controllers");
    let kubelet = TestKubelet::start(
        None,
        cp.kubeconfig("admin"),
        nodes.iter().map(|n| (n.to_string(), Vec::new())).collect(),
    );
    Cluster {
        kubelet,
        _components: components,
        cp,
    }
}

/// `name=nodeName` of the live pods matching `selector`, sorted.
fn placement(cp: &ControlPlane, selector: &str) -> Vec<String> {
    let out = cp
        .ok(&[
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.spec.nodeName}={.metadata.deletionTimestamp} {end}",
        ])
        .unwrap_or_default();
    let mut v: Vec<String> = out
        .split_whitespace()
        .filter(|e| e.ends_with('='))
        .map(|e| e.trim_end_matches('=').to_string())
        .collect();
    v.sort();
    v
}

fn nodes_of(cp: &ControlPlane, selector: &str) -> Vec<String> {
    let mut v: Vec<String> = placement(cp, selector)
        .iter()
        .map(|e| e.split('=').nth(1).unwrap_or_default().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn replication_controller_keeps_its_count() {
    let c = cluster(&["n1", "n2"]);
    apply(
        &c.cp,
        "apiVersion: v1\nkind: ReplicationController\nmetadata: {name: rc, namespace: default}\nspec:\n  replicas: 2\n  selector: {app: rc}\n  template:\n    metadata: {labels: {app: rc}}\n    spec: {containers: [{name: c, image: 'ferry/echo:1'}]}\n",
    );
    eventually("two pods", Duration::from_secs(30), || {
        placement(&c.cp, "app=rc").len() == 2
    });
    c.cp.ok(&["scale", "rc/rc", "--replicas=3"]).unwrap();
    eventually("three pods", Duration::from_secs(30), || {
        placement(&c.cp, "app=rc").len() == 3
    });
    eventually("status.readyReplicas 3", Duration::from_secs(30), || {
        c.cp.ok(&["get", "rc", "rc", "-o", "jsonpath={.status.readyReplicas}"])
            .is_ok_and(|s| s == "3")
    });
    c.cp.ok(&["delete", "rc", "rc"]).unwrap();
    eventually("the pods go with it", Duration::from_secs(30), || {
        placement(&c.cp, "app=rc").is_empty()
    });
}

#[test]
fn daemonset_runs_one_pod_per_eligible_node_and_rolls() {
    let c = cluster(&["n1", "n2", "n3"]);
    c.cp.ok(&["taint", "nodes", "n3", "dedicated=db:NoSchedule"])
        .unwrap();
    let ds = |image: &str| {
        format!("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: agent, namespace: default}}\nspec:\n  selector: {{matchExpressions: [{{key: app, operator: In, values: [agent]}}]}}\n  template:\n    metadata: {{labels: {{app: agent}}}}\n    spec: {{containers: [{{name: c, image: '{image}'}}]}}\n")
    };
    apply(&c.cp, &ds("ferry/echo:1"));
    let st =
        c.cp.ok(&["rollout", "status", "ds/agent", "--timeout=60s"])
            .unwrap();
    assert!(st.contains("successfully rolled out"), "{st}");
    assert_eq!(
        nodes_of(&c.cp, "app=agent"),
        ["n1", "n2"],
        "not on the tainted node"
    );

    // A new template replaces the pods node by node.
    c.cp.ok(&["set", "image", "ds/agent", "c=ferry/echo:2"])
        .unwrap();
    let st =
        c.cp.ok(&["rollout", "status", "ds/agent", "--timeout=60s"])
            .unwrap();
    assert!(st.contains("successfully rolled out"), "{st}");
    eventually(
        "both pods on the new image",
        Duration::from_secs(30),
        || {
            c.cp.ok(&[
                "get",
                "pods",
                "-l",
                "app=agent",
                "-o",
                "jsonpath={.items[*].spec.containers[0].image}",
            ])
            .is_ok_and(|s| s == "ferry/echo:2 ferry/echo:2")
        },
    );

    // The taint goes: the node gets its pod.
    c.cp.ok(&["taint", "nodes", "n3", "dedicated-"]).unwrap();
    eventually("a pod on n3", Duration::from_secs(30), || {
        nodes_of(&c.cp, "app=agent") == ["n1", "n2", "n3"]
    });
    let desired =
        c.cp.ok(&[
            "get",
            "ds",
            "agent",
            "-o",
            "jsonpath={.status.desiredNumberScheduled}",
        ])
        .unwrap();
    assert_eq!(desired, "3");
}

#[test]
fn jobs_complete_or_fail_as_their_pods_do() {
    let c = cluster(&["n1", "n2"]);
    apply(
        &c.cp,
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: ok, namespace: default}\nspec:\n  completions: 3\n  parallelism: 2\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{name: c, image: 'ferry/echo:1', command: [sh, -c, 'exit 0']}]\n",
    );
    let out =
        c.cp.ok(&[
            "wait",
            "--for=condition=complete",
            "job/ok",
            "--timeout=60s",
        ])
        .unwrap();
    assert!(out.contains("condition met"), "{out}");
    let succeeded =
        c.cp.ok(&["get", "job", "ok", "-o", "jsonpath={.status.succeeded}"])
            .unwrap();
    assert_eq!(succeeded, "3");
    let started = c.kubelet.started("ok-");
    assert_eq!(started.len(), 3, "exactly three pods ran: {started:?}");

    apply(
        &c.cp,
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: bad, namespace: default}\nspec:\n  backoffLimit: 1\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{name: c, image: 'ferry/echo:1', command: [sh, -c, 'exit 1']}]\n",
    );
    let out =
        c.cp.ok(&["wait", "--for=condition=failed", "job/bad", "--timeout=60s"])
            .unwrap();
    assert!(out.contains("condition met"), "{out}");
    let why =
        c.cp.ok(&[
            "get",
            "job",
            "bad",
            "-o",
            r#"jsonpath={.status.failed} {.status.conditions[?(@.type=="Failed")].reason}"#,
        ])
        .unwrap();
    assert_eq!(why, "2 BackoffLimitExceeded");
}

#[test]
fn cronjob_creates_a_job_on_schedule() {
    let c = cluster(&["n1"]);
    apply(
        &c.cp,
        "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: tick, namespace: default}\nspec:\n  schedule: '* * * * *'\n  successfulJobsHistoryLimit: 1\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: OnFailure\n          containers: [{name: c, image: 'ferry/echo:1', command: [sh, -c, 'exit 0']}]\n",
    );
    // The next minute boundary is at most 60 s away.
    let mut job = String::new();
    eventually("a Job from the CronJob", Duration::from_secs(75), || {
        job =
            c.cp.ok(&["get", "jobs", "-o", "jsonpath={.items[*].metadata.name}"])
                .unwrap_or_default();
        !job.is_empty()
    });
    let minutes: i64 = job
        .strip_prefix("tick-")
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("job name {job} is not tick-<minutes since the epoch>"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 60;
    assert!((now - minutes).abs() <= 1, "{job} vs now {now}");
    let out =
        c.cp.ok(&[
            "wait",
            "--for=condition=complete",
            &format!("job/{job}"),
            "--timeout=60s",
        ])
        .unwrap();
    assert!(out.contains("condition met"), "{out}");
    eventually(
        "lastScheduleTime and lastSuccessfulTime",
        Duration::from_secs(30),
        || {
            c.cp.ok(&[
                "get",
                "cronjob",
                "tick",
                "-o",
                "jsonpath={.status.lastScheduleTime} {.status.lastSuccessfulTime}",
            ])
            .is_ok_and(|s| s.split_whitespace().count() == 2)
        },
    );
    let bad = c.cp.kubectl_as(
        &c.cp.kubeconfig("admin"),
        &["apply", "-f", "-"],
        Some("apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: typo, namespace: default}\nspec:\n  schedule: '61 * * * *'\n  jobTemplate: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: i}]}}}}\n"),
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success()
            && err.contains("spec.schedule")
            && err.contains("minute: 61 is outside 0-59"),
        "{err}"
    );
}

#[test]
fn statefulset_orders_pods_and_names_them_stably() {
    let c = cluster(&["n1", "n2"]);
    apply(
        &c.cp,
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: default}\nspec:\n  clusterIP: None\n  selector: {app: db}\n  ports: [{port: 5432}]\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db, namespace: default}\nspec:\n  replicas: 3\n  serviceName: db\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n    spec: {containers: [{name: c, image: 'ferry/echo:1'}]}\n",
    );
    let st =
        c.cp.ok(&["rollout", "status", "sts/db", "--timeout=60s"])
            .unwrap();
    assert!(st.contains("rolling update complete 3 pods"), "{st}");
    assert_eq!(
        c.kubelet.started("db-"),
        ["db-0", "db-1", "db-2"],
        "created in order"
    );
    let dns =
        c.cp.ok(&[
            "get",
            "pod",
            "db-1",
            "-o",
            "jsonpath={.spec.hostname}.{.spec.subdomain}",
        ])
        .unwrap();
    assert_eq!(dns, "db-1.db");
    eventually(
        "hostnames in the headless Service's slice",
        Duration::from_secs(30),
        || {
            c.cp.ok(&[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=db",
                "-o",
                "jsonpath={.items[*].endpoints[*].hostname}",
            ])
            .is_ok_and(|s| {
                let mut v: Vec<&str> = s.split_whitespace().collect();
                v.sort();
                v == ["db-0", "db-1", "db-2"]
            })
        },
    );

    c.cp.ok(&["scale", "sts/db", "--replicas=1"]).unwrap();
    eventually("two pods removed", Duration::from_secs(30), || {
        c.kubelet.removed("db-").len() == 2
    });
    assert_eq!(
        c.kubelet.removed("db-"),
        ["db-2", "db-1"],
        "removed from the highest ordinal"
    );
    assert!(placement(&c.cp, "app=db")[0].starts_with("db-0="));
}

#[test]
fn every_namespace_gets_a_default_service_account_and_the_cluster_ca() {
    let c = cluster(&[]);
    let cp = &c.cp;
    cp.ok(&["create", "namespace", "team"]).unwrap();
    let uid = || {
        cp.ok(&[
            "get",
            "sa",
            "default",
            "-n",
            "team",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .unwrap_or_default()
    };
    eventually(
        "team's default ServiceAccount",
        Duration::from_secs(30),
        || !uid().is_empty(),
    );
    // The CA the admin's kubeconfig trusts, as in-cluster clients will read it.
    let ca_data = cp
        .ok(&[
            "config",
            "view",
            "--raw",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority-data}",
        ])
        .unwrap();
    use base64::Engine as _;
    let ca = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(ca_data.trim())
            .unwrap(),
    )
    .unwrap();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    let published = |ns: &str| {
        cp.ok(&[
            "get",
            "configmap",
            "kube-root-ca.crt",
            "-n",
            ns,
            "-o",
            r"jsonpath={.data.ca\.crt}",
        ])
        .unwrap_or_default()
    };
    for ns in ["team", "default", "kube-system"] {
        eventually(
            &format!("{ns} holds the cluster CA"),
            Duration::from_secs(30),
            || published(ns).trim() == ca.trim(),
        );
    }
    // Deleted or changed, they come back.
    let first = uid();
    cp.ok(&["delete", "sa", "default", "-n", "team"]).unwrap();
    eventually(
        "the default ServiceAccount made again",
        Duration::from_secs(30),
        || {
            let now = uid();
            !now.is_empty() && now != first
        },
    );
    cp.ok(&[
        "patch",
        "configmap",
        "kube-root-ca.crt",
        "-n",
        "team",
        "--type=merge",
        "-p",
        r#"{"data":{"ca.crt":"tampered"}}"#,
    ])
    .unwrap();
    eventually("the CA written back", Duration::from_secs(30), || {
        published("team").trim() == ca.trim()
    });
}
