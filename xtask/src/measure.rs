//! What the benchmarks share: the load generator run in a client pod and its figures (`Load`,
//! medians over repetitions, CPU time), the run's conditions (`RunInfo`), a seeded random
//! source, the Services and YAML they program, and writing results under `bench/results/`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};
use ferry_testbed::{bin_path, Topology};
use serde::Serialize;

use crate::kube_rules::Svc;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Load {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    pub transactions: u64,
}

/// Where and how a benchmark ran: the head of every report.
#[derive(Debug, Serialize)]
pub struct RunInfo {
    pub machine: String,
    pub kernel: String,
    pub quick: bool,
    pub seconds_per_run: f64,
    pub repetitions: usize,
    pub concurrency: usize,
}

impl RunInfo {
    pub fn new(quick: bool, seconds_per_run: f64, repetitions: usize, concurrency: usize) -> Self {
        Self {
            machine: cpu_model(),
            kernel: uname(),
            quick,
            seconds_per_run,
            repetitions,
            concurrency,
        }
    }

    /// "`cargo xtask bench NAME` on MACHINE (Linux K), C connections, R x S s per figure".
    pub fn describe(&self, name: &str) -> String {
        format!(
            "`cargo xtask bench {name}{}` on {} (Linux {}): {} connections, {} x {:.1} s per figure",
            if self.quick { " --quick" } else { "" },
            self.machine,
            self.kernel,
            self.concurrency,
            self.repetitions,
            self.seconds_per_run
        )
    }
}

/// A xorshift generator: enough to pick Services at random without another dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(t ^ 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Service `i` of a benchmark: `bench/svc-<i>`, port 80 ("http") on `vip(i)`.
pub fn bench_svc(i: usize, endpoints: Vec<(Ipv4Addr, u16)>) -> Svc {
    Svc {
        ns: "bench".into(),
        name: format!("svc-{i}"),
        port_name: "http".into(),
        vip: vip(i),
        port: 80,
        endpoints,
    }
}

pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32)
}

/// Services as Kubernetes YAML (a v1 Service and its EndpointSlice each), for ferry-proxy.
pub fn ferry_yaml(svcs: &[Svc]) -> String {
    let mut s = String::with_capacity(svcs.len() * 600);
    for v in svcs {
        let target = v.endpoints.first().map_or(v.port, |e| e.1);
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  clusterIP: {}\n  ports: [{{name: {}, port: {}, targetPort: {target}, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-a\n  namespace: {}\n  labels: {{kubernetes.io/service-name: {}}}\naddressType: IPv4\nports: [{{name: {}, port: {target}, protocol: TCP}}]\nendpoints:\n",
            v.name, v.ns, v.vip, v.port_name, v.port, v.name, v.ns, v.name, v.port_name
        );
        if v.endpoints.is_empty() {
            s.pop();
            s.push_str(" []\n");
        }
        for (ip, _) in &v.endpoints {
            let _ = writeln!(s, "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}");
        }
    }
    s
}

/// Each measurement connects from an address of its own, so no connection tuple of an earlier
/// measurement (in any kernel table) can collide with its connections.
pub fn fresh_source(t: &Topology, client: usize) -> Result<Ipv4Addr> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 200, 0)) + n);
    t.add_pod_address(client, addr)?;
    Ok(addr)
}

/// Runs `ferry-loadgen` in pod `client` from a fresh source address. Every connection goes to a
/// target picked at random among `targets`: the way a Service spreads connections over its
/// backends, so a row straight to the pod addresses spreads its load over the pods as the
/// Service rows do. (With each worker keeping one pod instead, direct connections ran 1.22x
/// faster on the 2-core development VM than the same connections spread, in one run of four
/// alternating pairs: an advantage no Service path can have.)
pub fn loadgen(
    t: &Topology,
    client: usize,
    mode: &str,
    targets: &[String],
    secs: f64,
    concurrency: usize,
) -> Result<Load> {
    let bin = bin_path("ferry-loadgen")?;
    let source = fresh_source(t, client)?.to_string();
    let mut args = vec![
        "--mode".to_string(),
        mode.into(),
        "--seconds".into(),
        secs.to_string(),
        "--concurrency".into(),
        concurrency.to_string(),
        "--source".into(),
        source,
        "--spread".into(),
    ];
    for tg in targets {
        args.push("--target".into());
        args.push(tg.clone());
    }
    let mut cmd = Command::new(&bin);
    cmd.args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // With connect-time load balancing on, the client is where the socket programs serve it.
    t.client_cgroup(&mut cmd)?;
    let done = t.pods[client].ns.spawn(&mut cmd)?.wait_with_output()?;
    if !done.status.success() {
        bail!(
            "ferry-loadgen {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&done.stderr).trim()
        );
    }
    let out = String::from_utf8_lossy(&done.stdout).into_owned();
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("loadgen printed {out:?}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let load = Load {
        rate: f("rate"),
        p50_us: f("p50_us"),
        p99_us: f("p99_us"),
        errors: v["errors"].as_u64().unwrap_or(0),
        transactions: v["transactions"].as_u64().unwrap_or(0),
    };
    if load.rate == 0.0 {
        bail!(
            "no {mode} transaction completed towards {targets:?} ({} errors)",
            load.errors
        );
    }
    Ok(load)
}

pub fn median(mut v: Vec<Load>) -> Load {
    v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    v[v.len() / 2].clone()
}

/// The CRR and RR runs of one measurement, with the machine's busy CPU time during the CRR runs.
#[derive(Default)]
pub struct Reps {
    pub crr: Vec<Load>,
    pub rr: Vec<Load>,
    pub crr_cpu_s: f64,
}

impl Reps {
    /// Adds `other`'s repetitions after these.
    pub fn append(&mut self, other: Reps) {
        self.crr.extend(other.crr);
        self.rr.extend(other.rr);
        self.crr_cpu_s += other.crr_cpu_s;
    }
}

/// `reps` times a CRR run then an RR run from pod `client`; `before` is told each repetition.
pub fn run_reps(
    t: &Topology,
    client: usize,
    targets: &[String],
    (secs, reps, concurrency): (f64, usize, usize),
    mut before: impl FnMut(usize),
) -> Result<Reps> {
    let mut out = Reps {
        crr: Vec::new(),
        rr: Vec::new(),
        crr_cpu_s: 0.0,
    };
    for rep in 0..reps {
        before(rep);
        let c0 = cpu_busy_s();
        out.crr
            .push(loadgen(t, client, "crr", targets, secs, concurrency)?);
        out.crr_cpu_s += cpu_busy_s() - c0;
        out.rr
            .push(loadgen(t, client, "rr", targets, secs, concurrency)?);
    }
    Ok(out)
}

/// Busy CPU time of the whole machine, in seconds (from /proc/stat).
pub fn cpu_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle) as f64 / 100.0 // USER_HZ
}

pub fn uname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_string();
    let cores = info.lines().filter(|l| l.starts_with("processor")).count();
    format!("{cores} x {model}")
}

pub fn write_results(name: &str, report: &impl Serialize, md: &str) -> Result<std::path::PathBuf> {
    println!("\n{md}");
    let dir = crate::workspace_root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join(format!("{name}.md")), md)?;
    eprintln!("[bench] wrote bench/results/{name}.json and {name}.md");
    Ok(dir)
}
