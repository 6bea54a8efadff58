//! `ferry-incluster`: the program of Ferry's in-cluster client image. Inside a pod it finds the
//! API as every in-cluster client does (kube-rs' `Config::incluster`, like client-go's
//! `rest.InClusterConfig`): `KUBERNETES_SERVICE_HOST`/`_PORT`, the service account token and the
//! cluster CA under `/var/run/secrets/kubernetes.io/serviceaccount`, TLS verified against that
//! CA. It then tries each `<resource>` given (`pods`, `secrets`, ...) as a list in its own
//! namespace and prints one line per try: `<resource>: <n> items` or `<resource>: <code>
//! <reason>: <message>`. Exit status 0 when the client could be configured at all.

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, ListParams};
use kube::{Client, Config};

const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

async fn try_list(client: &Client, ns: &str, resource: &str) -> String {
    let lp = ListParams::default();
    let listed = match resource {
        "pods" => Api::<Pod>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .map(|l| l.items.len()),
        "secrets" => Api::<Secret>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .map(|l| l.items.len()),
        "configmaps" => Api::<ConfigMap>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .map(|l| l.items.len()),
        "services" => Api::<Service>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .map(|l| l.items.len()),
        other => {
            return format!("{other}: unknown resource (use pods, secrets, configmaps or services)")
        }
    };
    match listed {
        Ok(n) => format!("{resource}: {n} items"),
        Err(kube::Error::Api(s)) => format!("{resource}: {} {}: {}", s.code, s.reason, s.message),
        Err(e) => format!("{resource}: error: {e}"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let resources: Vec<String> = std::env::args().skip(1).collect();
    let config = match Config::incluster() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-incluster: no in-cluster configuration: {e}");
            std::process::exit(2);
        }
    };
    let ns = std::fs::read_to_string(NAMESPACE_FILE)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| config.default_namespace.clone());
    let client = match Client::try_from(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-incluster: {e}");
            std::process::exit(2);
        }
    };
    for r in &resources {
        println!("{}", try_list(&client, &ns, r).await);
    }
}
