//! `cargo xtask bench controlplane`: the API server over HTTPS on the embedded store and on
//! etcd, in the same run, each row measured the same way on both:
//! - creates/s and updates/s of pods (durable: each is acknowledged after its commit),
//!   64 requests in flight over one HTTP/2 connection;
//! - server-side applies/s of the same pods (each its whole configuration plus a label, as
//!   `kubectl apply --server-side` sends it) against the merge-patch updates/s above;
//! - a list of 10,000 pods (JSON, and the Table `kubectl get` asks for), median of 5, and
//!   its bytes with the pods' `managedFields` against the same list without them;
//! - watch delivery latency to 1,000 concurrent watchers (each its own connection): a writer
//!   updates a ConfigMap every 10 ms; latency is from sending the update to each watcher
//!   reading the event.
//!
//! Arguments: `--quick` (fewer watchers and events), `--out DIR` (JSON and Markdown results).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use controlplane::api::{Api, Config};
use controlplane::store::{embedded::EmbeddedStore, etcd::EtcdStore, etcd::LocalEtcd, Store};
use controlplane::{pki, server};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// glibc's allocator showed in profiles of watch fan-out and creates; mimalloc is faster
/// for the many small, short-lived buffers of JSON and TLS.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

#[derive(Clone)]
struct Client {
    http: HyperClient<Https, Full<Bytes>>,
    base: String,
}

impl Client {
    fn new(dir: &std::path::Path, base: &str, http2: bool) -> Result<Client> {
        let ca = std::fs::read(dir.join("pki/ca.crt"))?;
        let kc: Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join("admin.kubeconfig"))?)?;
        use base64::Engine as _;
        let b = |k: &str| -> Result<Vec<u8>> {
            Ok(base64::engine::general_purpose::STANDARD
                .decode(kc["users"][0]["user"][k].as_str().context("kubeconfig")?)?)
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca.as_slice()) {
            roots.add(c?)?;
        }
        let certs = rustls_pemfile::certs(&mut b("client-certificate-data")?.as_slice())
            .collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pemfile::private_key(&mut b("client-key-data")?.as_slice())?
            .context("client key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)?;
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only();
        let conn = if http2 {
            builder.enable_http2().wrap_connector(tcp)
        } else {
            builder.enable_http1().wrap_connector(tcp)
        };
        let mut hb = HyperClient::builder(TokioExecutor::new());
        if http2 {
            hb.http2_only(true);
        } else {
            hb.pool_max_idle_per_host(0);
        }
        Ok(Client {
            http: hb.build(conn),
            base: base.to_string(),
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        ct: &str,
        body: Vec<u8>,
        accept: Option<&str>,
    ) -> Result<(u16, Bytes)> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", ct);
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let resp = self
            .http
            .request(req.body(Full::new(Bytes::from(body)))?)
            .await?;
        let code = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((code, body))
    }
}

fn pod(ns: &str, i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("web-{i:05}"), "namespace": ns,
            "labels": {"app": "web", "pod-template-hash": "5d8f7c9b4", "shard": (i % 10).to_string()},
            "annotations": {"example.com/owner": "team-bench"}},
        "spec": {"nodeName": format!("node-{}", i % 100), "containers": [
            {"name": "web", "image": "ferry/echo:1", "ports": [{"containerPort": 8080, "name": "http"}],
             "env": [{"name": "MODE", "value": "serve"}, {"name": "LOG", "value": "info"}],
             "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}},
             "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 5}},
            {"name": "log", "image": "busybox:1", "args": ["tail", "-f", "/var/log/app.log"]}]}})
}

async fn rate(
    n: usize,
    conc: usize,
    f: impl Fn(usize) -> futures::future::BoxFuture<'static, Result<u16>>,
) -> Result<f64> {
    let start = Instant::now();
    let mut errors = 0;
    let codes: Vec<Result<u16>> = futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(conc)
        .collect()
        .await;
    for c in codes {
        match c {
            Ok(c) if c < 300 => {}
            Ok(c) => {
                errors += 1;
                if errors < 3 {
                    eprintln!("  request failed with {c}");
                }
            }
            Err(e) => bail!("request failed: {e:#}"),
        }
    }
    if errors > 0 {
        bail!("{errors} of {n} requests failed");
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The value of `"data":{"n":"..."}` in a watch event line.
fn counter(line: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"data\":{\"n\":\"";
    let at = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let end = line[at..].iter().position(|b| *b == b'"')? + at;
    std::str::from_utf8(&line[at..end]).ok()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[derive(serde::Serialize, Default, Clone)]
struct Row {
    creates_per_s: f64,
    updates_per_s: f64,
    list_json_ms: f64,
    list_table_ms: f64,
    list_bytes: usize,
    list_bytes_without_managed_fields: usize,
    applies_per_s: f64,
    watch_p50_ms: f64,
    watch_p99_ms: f64,
    watch_events: usize,
    watch_spaced_p50_ms: f64,
    watch_spaced_p99_ms: f64,
}

async fn measure(
    name: &str,
    store: Arc<dyn Store>,
    dir: &std::path::Path,
    pods: usize,
    watchers: usize,
    events: usize,
) -> Result<Row> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let url = format!("https://127.0.0.1:{}", addr.port());
    let pki = pki::ensure(dir, &url, &["127.0.0.1".into(), "localhost".into()], &[])?;
    let cfg = Config {
        service_cidr: "10.96.0.0/12".parse()?,
        node_ports: (30000, 32767),
        tokens: HashMap::new(),
        advertise: std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, addr.port()),
        limits: Default::default(),
        node_authorizer: true,
        signer: None,
        kubelet_tls: None,
    };
    let api = Api::new(store, cfg).await?;
    let server =
        tokio::spawn(async move { server::serve(api, listener, &pki, Default::default()).await });
    let c = Client::new(dir, &url, true)?;
    let ns = |n: &str| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}});
    for n in ["bench", "watch"] {
        let (code, body) = c
            .send(
                Method::POST,
                "/api/v1/namespaces",
                "application/json",
                serde_json::to_vec(&ns(n))?,
                None,
            )
            .await?;
        if code != 201 {
            bail!(
                "creating namespace {n}: {code} {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    let mut row = Row::default();

    eprintln!("[{name}] creating {pods} pods (64 in flight)");
    let cc = c.clone();
    row.creates_per_s = rate(pods, 64, move |i| {
        let c = cc.clone();
        Box::pin(async move {
            Ok(c.send(
                Method::POST,
                "/api/v1/namespaces/bench/pods",
                "application/json",
                serde_json::to_vec(&pod("bench", i))?,
                None,
            )
            .await?
            .0)
        })
    })
    .await?;
    eprintln!("[{name}] updating {pods} pods");
    let cc = c.clone();
    row.updates_per_s = rate(pods, 64, move |i| {
        let c = cc.clone();
        Box::pin(async move {
            let patch = json!({"metadata": {"labels": {"bench-round": "2"}}});
            Ok(c.send(
                Method::PATCH,
                &format!("/api/v1/namespaces/bench/pods/web-{i:05}"),
                "application/merge-patch+json",
                serde_json::to_vec(&patch)?,
                None,
            )
            .await?
            .0)
        })
    })
    .await?;

    eprintln!("[{name}] applying {pods} pods (server-side apply)");
    let cc = c.clone();
    row.applies_per_s = rate(pods, 64, move |i| {
        let c = cc.clone();
        Box::pin(async move {
            let mut config = pod("bench", i);
            config["metadata"]["labels"]["bench-apply"] = json!("1");
            Ok(c.send(
                Method::PATCH,
                &format!("/api/v1/namespaces/bench/pods/web-{i:05}?fieldManager=bench-apply"),
                "application/apply-patch+yaml",
                serde_json::to_vec(&config)?,
                None,
            )
            .await?
            .0)
        })
    })
    .await?;

    eprintln!("[{name}] listing {pods} pods");
    let table = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
    for (accept, slot) in [(None, 0), (Some(table), 1)] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let (code, body) = c
                .send(
                    Method::GET,
                    "/api/v1/namespaces/bench/pods",
                    "application/json",
                    vec![],
                    accept,
                )
                .await?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            let v: Value = serde_json::from_slice(&body)?;
            let n = v["items"]
                .as_array()
                .or(v["rows"].as_array())
                .map_or(0, |a| a.len());
            if code != 200 || n != pods {
                bail!("list returned {code} with {n} of {pods} pods");
            }
            if slot == 0 {
                // Both sizes from the same list written the same way, one without the
                // field manager's records.
                let mut v = v;
                row.list_bytes = serde_json::to_vec(&v)?.len();
                for item in v["items"].as_array_mut().into_iter().flatten() {
                    if let Some(m) = item["metadata"].as_object_mut() {
                        m.remove("managedFields");
                    }
                }
                row.list_bytes_without_managed_fields = serde_json::to_vec(&v)?.len();
            }
        }
        let m = pct(&mut times, 0.5);
        if slot == 0 {
            row.list_json_ms = m;
        } else {
            row.list_table_ms = m;
        }
    }

    for interval_ms in [10u64, 50] {
        eprintln!("[{name}] {watchers} watchers, {events} events {interval_ms} ms apart");
        let (a, b, delivered) = watch_latency(&c, dir, &url, watchers, events, interval_ms).await?;
        if delivered < watchers * events {
            eprintln!(
                "[{name}] warning: {delivered} of {} events delivered within 30 s",
                watchers * events
            );
        }
        if interval_ms == 10 {
            (row.watch_p50_ms, row.watch_p99_ms, row.watch_events) = (a, b, delivered);
        } else {
            (row.watch_spaced_p50_ms, row.watch_spaced_p99_ms) = (a, b);
        }
    }
    server.abort();
    Ok(row)
}

/// Opens `watchers` watches of one ConfigMap, updates it `events` times `interval_ms` apart,
/// and returns the p50 and p99 from sending each update to each watcher reading it.
async fn watch_latency(
    c: &Client,
    dir: &std::path::Path,
    url: &str,
    watchers: usize,
    events: usize,
    interval_ms: u64,
) -> Result<(f64, f64, usize)> {
    let cm = format!("tick-{interval_ms}");
    let (code, body) = c
        .send(Method::POST, "/api/v1/namespaces/watch/configmaps", "application/json",
              serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": cm}, "data": {"n": "0"}}))?, None)
        .await?;
    if code != 201 {
        bail!("creating the watched ConfigMap: {code}");
    }
    let rv = serde_json::from_slice::<Value>(&body)?["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string();
    // Send times as nanoseconds since `base`, read by every watcher without a lock.
    let base = Instant::now();
    let sent: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..=events).map(|_| Default::default()).collect());
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<f64>();
    let ready = Arc::new(tokio::sync::Barrier::new(watchers + 1));
    let wc = Client::new(dir, url, false)?;
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let wc = wc.clone();
        let sent = sent.clone();
        let lat_tx = lat_tx.clone();
        let ready = ready.clone();
        let path = format!(
            "{}/api/v1/namespaces/watch/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=120",
            wc.base
        );
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri(path)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = wc.http.request(req).await;
            ready.wait().await;
            let Ok(resp) = resp else { return };
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            let mut got = 0;
            while got < events {
                let Some(Ok(frame)) = body.frame().await else {
                    break;
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let now = base.elapsed().as_nanos() as u64;
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    // The measuring client shares the machine's two cores with the server:
                    // find the counter without parsing the whole event.
                    let Some(i) = counter(&line).and_then(|n| n.parse::<usize>().ok()) else {
                        continue;
                    };
                    let t0 = sent
                        .get(i)
                        .map_or(0, |t| t.load(std::sync::atomic::Ordering::Acquire));
                    if t0 > 0 {
                        let _ = lat_tx.send(now.saturating_sub(t0) as f64 / 1e6);
                        got += 1;
                    }
                }
            }
        }));
    }
    drop(lat_tx);
    ready.wait().await;
    // Every watch is open (its response headers arrived); give the last ones a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 1..=events {
        sent[i].store(
            base.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Release,
        );
        let patch = json!({"data": {"n": i.to_string()}});
        let (code, _) = c
            .send(
                Method::PATCH,
                &format!("/api/v1/namespaces/watch/configmaps/{cm}"),
                "application/merge-patch+json",
                serde_json::to_vec(&patch)?,
                None,
            )
            .await?;
        if code != 200 {
            bail!("update {i} of the watched ConfigMap: {code}");
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
    let mut lats = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(l)) = tokio::time::timeout_at(deadline, lat_rx.recv()).await {
        lats.push(l);
        if lats.len() == watchers * events {
            break;
        }
    }
    for t in tasks {
        t.abort();
    }
    let n = lats.len();
    Ok((pct(&mut lats, 0.5), pct(&mut lats, 0.99), n))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = ferry_testbed::bench::BenchArgs::parse();
    let quick = args.quick;
    let (pods, watchers, events) = if quick {
        (10_000, 100, 20)
    } else {
        (10_000, 1_000, 100)
    };
    let base = std::env::temp_dir().join(format!("ferry-cp-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);

    let embedded = {
        let dir = base.join("embedded");
        let store = EmbeddedStore::open(&dir.join("store"))?;
        measure("embedded", store, &dir, pods, watchers, events).await?
    };
    let etcd_row = {
        let dir = base.join("etcd");
        let etcd = LocalEtcd::start(&dir.join("etcd"), 23850)?;
        let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint)).await?;
        let r = measure("etcd", store, &dir, pods, watchers, events).await;
        drop(etcd);
        r?
    };
    let _ = std::fs::remove_dir_all(&base);

    let mut md = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(
        md,
        "Control plane, {} run on {} cores, kernel {}: {pods} pods, {watchers} watchers x {events} events; HTTPS with client certificates; embedded and etcd 3.4 in the same run.\n",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    );
    let _ = writeln!(md, "| row | embedded | etcd | embedded vs etcd | target |");
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    let rows: [(&str, f64, f64, bool, &str); 8] = [
        (
            "pod creates/s (durable, 64 in flight)",
            embedded.creates_per_s,
            etcd_row.creates_per_s,
            true,
            ">= 5,000/s embedded",
        ),
        (
            "pod updates/s (merge patch)",
            embedded.updates_per_s,
            etcd_row.updates_per_s,
            true,
            "",
        ),
        (
            "list 10,000 pods, JSON (ms)",
            embedded.list_json_ms,
            etcd_row.list_json_ms,
            false,
            "< 200 ms",
        ),
        (
            "list 10,000 pods, Table (ms)",
            embedded.list_table_ms,
            etcd_row.list_table_ms,
            false,
            "",
        ),
        (
            "watch delivery p50 (ms), one update every 50 ms",
            embedded.watch_spaced_p50_ms,
            etcd_row.watch_spaced_p50_ms,
            false,
            "",
        ),
        (
            "watch delivery p99 (ms), one update every 50 ms",
            embedded.watch_spaced_p99_ms,
            etcd_row.watch_spaced_p99_ms,
            false,
            "< 10 ms",
        ),
        (
            "watch delivery p50 (ms), one update every 10 ms",
            embedded.watch_p50_ms,
            etcd_row.watch_p50_ms,
            false,
            "",
        ),
        (
            "watch delivery p99 (ms), one update every 10 ms",
            embedded.watch_p99_ms,
            etcd_row.watch_p99_ms,
            false,
            "< 10 ms",
        ),
    ];
    for (label, e, d, higher_better, target) in rows {
        // The ratio reads "how many times better embedded is".
        let ratio = if higher_better { e / d } else { d / e };
        let _ = writeln!(md, "| {label} | {e:.1} | {d:.1} | {ratio:.2}x | {target} |");
    }
    let _ = writeln!(
        md,
        "\nList body: {:.1} MB. Watch events delivered: {} embedded, {} etcd (of {}).",
        embedded.list_bytes as f64 / 1e6,
        embedded.watch_events,
        etcd_row.watch_events,
        watchers * events
    );
    let _ = writeln!(
        md,
        "\nServer-side apply and field ownership (`managedFields`), same run:\n\n| row | embedded | etcd | target |\n|---|---:|---:|---|"
    );
    let mb = |b: usize| b as f64 / 1e6;
    let ssa_rows: [(&str, f64, f64, &str); 6] = [
        (
            "pod applies/s (server-side apply, whole pod, 64 in flight)",
            embedded.applies_per_s,
            etcd_row.applies_per_s,
            "",
        ),
        (
            "pod updates/s (merge patch)",
            embedded.updates_per_s,
            etcd_row.updates_per_s,
            "",
        ),
        (
            "applies/s vs merge-patch updates/s",
            embedded.applies_per_s / embedded.updates_per_s,
            etcd_row.applies_per_s / etcd_row.updates_per_s,
            "",
        ),
        (
            "list of 10,000 pods with managedFields (MB)",
            mb(embedded.list_bytes),
            mb(etcd_row.list_bytes),
            "",
        ),
        (
            "the same list without managedFields (MB)",
            mb(embedded.list_bytes_without_managed_fields),
            mb(etcd_row.list_bytes_without_managed_fields),
            "",
        ),
        (
            "with vs without (size ratio)",
            embedded.list_bytes as f64 / embedded.list_bytes_without_managed_fields as f64,
            etcd_row.list_bytes as f64 / etcd_row.list_bytes_without_managed_fields as f64,
            "",
        ),
    ];
    for (label, e, d, target) in ssa_rows {
        let _ = writeln!(md, "| {label} | {e:.2} | {d:.2} | {target} |");
    }
    args.report(
        "controlplane",
        &md,
        &json!({"quick": quick, "pods": pods, "watchers": watchers, "events": events,
                "embedded": embedded, "etcd": etcd_row}),
    )?;
    Ok(())
}
