//! Each mode programmed, torn down and changed: Ferry through its services file, the kube-proxy
//! layouts through iptables-restore and nft, each bounded in time.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use ferry_testbed::{bin_path, pod_ip, Proxy, Topology, ECHO_PORT, NODE_IP};
use serde::Serialize;

use crate::kube_rules::{self, Svc};
use crate::measure::{bench_svc, ferry_yaml};

/// Pods 0 and 1 serve every Service (M = 2); pod 2 is the endpoint added by the change test.
pub(super) const ENDPOINTS: usize = 2;

pub(super) const NEW_ENDPOINT: usize = 2;
/// Endpoint changes measured per mode (each to another Service); the figure is their median,
/// as one change on a shared 2-core machine can land on any hiccup of the scheduler.
pub(super) const CHANGES: usize = 5;

pub(super) const CLIENT: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Mode {
    NoProxy,
    Ferry,
    FerrySocket,
    IptablesNft,
    IptablesLegacy,
    Nftables,
    Ipvs,
}

impl Mode {
    pub(super) const ALL: [Mode; 7] = [
        Mode::NoProxy,
        Mode::Ferry,
        Mode::FerrySocket,
        Mode::IptablesNft,
        Mode::Nftables,
        Mode::IptablesLegacy,
        Mode::Ipvs,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            Mode::NoProxy => "no proxy (pod IPs)",
            Mode::Ferry => "Ferry (eBPF, tc)",
            Mode::FerrySocket => "Ferry socket LB (eBPF)",
            Mode::IptablesNft => "kube-proxy iptables (nft)",
            Mode::IptablesLegacy => "kube-proxy iptables (legacy)",
            Mode::Nftables => "kube-proxy nftables",
            Mode::Ipvs => "kube-proxy IPVS",
        }
    }

    /// Ferry, per packet (tc programs) or per connect (socket programs, the client in the
    /// cgroup they serve).
    pub(super) fn is_ferry(self) -> bool {
        matches!(self, Mode::Ferry | Mode::FerrySocket)
    }

    pub(super) fn iptables(self) -> Option<&'static str> {
        match self {
            Mode::IptablesNft => Some("iptables-nft"),
            Mode::IptablesLegacy => Some("iptables-legacy"),
            _ => None,
        }
    }

    /// Why the mode cannot run here, if it cannot.
    pub(super) fn unavailable(self) -> Option<String> {
        match self {
            Mode::Ipvs if !std::path::Path::new("/proc/net/ip_vs").exists() => Some(
                "unavailable on this kernel (no CONFIG_IP_VS: /proc/net/ip_vs is absent)".into(),
            ),
            Mode::Ipvs => Some("IPVS is present but this benchmark does not program it yet".into()),
            m => m.iptables().and_then(|bin| {
                let ok = Command::new(bin)
                    .arg("--version")
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                (!ok).then(|| format!("{bin} is not installed (cargo xtask setup)"))
            }),
        }
    }
}

pub(super) fn svc_list(n: usize) -> Vec<Svc> {
    (0..n)
        .map(|i| bench_svc(i, (0..ENDPOINTS).map(|j| (pod_ip(j), ECHO_PORT)).collect()))
        .collect()
}

/// Kernel memory that rules and maps live in, KiB.
pub(super) fn kernel_mem_kib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .filter(|l| {
            l.starts_with("Slab:") || l.starts_with("VmallocUsed:") || l.starts_with("Percpu:")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Memory charged by Ferry's maps, MiB.
pub(super) fn ferry_maps_mib() -> Result<f64> {
    let out = Command::new("bpftool")
        .args(["map", "show", "-j"])
        .output()
        .context("bpftool map show")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool map show -j")?;
    let bytes: u64 = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["name"].as_str().is_some_and(|n| n.starts_with("FERRY_")))
        .filter_map(|m| m["bytes_memlock"].as_u64())
        .sum();
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

/// Runs a command in the node namespace with a file as its input.
pub(super) fn node_exec(t: &Topology, program: &str, args: &[&str]) -> Result<()> {
    t.node.exec(program, args).map(|_| ())
}

pub(super) fn write_tmp(t: &Topology, name: &str, text: &str) -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("{}-{name}", t.prefix));
    std::fs::write(&p, text)?;
    Ok(p)
}

/// One mode programmed on the node.
pub(super) struct Programmed {
    pub(super) proxy: Option<Proxy>,
}

pub(super) fn teardown(t: &mut Topology, mode: Mode, p: &mut Programmed) -> Result<()> {
    if let Some(proxy) = p.proxy.take() {
        t.stop(proxy.pid, libc::SIGTERM)?;
        std::fs::remove_dir_all(&t.bpf_dir).ok();
    }
    if mode == Mode::FerrySocket {
        t.disable_socket_lb();
    }
    if let Some(bin) = mode.iptables() {
        for table in ["nat", "filter"] {
            node_exec(t, bin, &["-w", "-t", table, "-F"])?;
            node_exec(t, bin, &["-w", "-t", table, "-X"])?;
        }
    }
    if mode == Mode::Nftables {
        let _ = node_exec(t, "nft", &["delete", "table", "ip", "kube-proxy"]);
    }
    // No connection state may leak from one mode or size into the next.
    let _ = node_exec(t, "conntrack", &["-F"]);
    Ok(())
}

/// How long one full programming may take before the benchmark stops it and reports the limit
/// (a transaction stopped before it commits leaves nothing behind).
pub(super) const PROGRAM_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
#[error("stopped after {0:?}")]
pub(super) struct TooSlow(Duration);

/// Runs a rule loader in the node namespace, killing it once it exceeds `PROGRAM_LIMIT`.
pub(super) fn exec_bounded(t: &Topology, program: &str, args: &[&str]) -> Result<()> {
    let mut child = t.node.spawn(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!("{program} {}: {}", args.join(" "), err.trim());
        }
        if start.elapsed() > PROGRAM_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TooSlow(PROGRAM_LIMIT).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Programs `svcs` from scratch, the way the mode does on a full sync; returns the time it took.
pub(super) fn program(
    t: &mut Topology,
    mode: Mode,
    svcs: &[Svc],
    p: &mut Programmed,
) -> Result<Duration> {
    match mode {
        Mode::NoProxy | Mode::Ipvs => Ok(Duration::ZERO),
        Mode::Ferry | Mode::FerrySocket => {
            if mode == Mode::FerrySocket {
                t.enable_socket_lb()?;
            }
            // The daemon runs with no Services first; the timed part is from the new input
            // landing to the daemon reporting it in the datapath.
            let proxy = t.start_proxy("")?;
            let (applied, took) = proxy.update_timed(&ferry_yaml(svcs))?;
            if !applied {
                bail!("ferry-proxy rejected the generated Services");
            }
            p.proxy = Some(proxy);
            Ok(took)
        }
        Mode::IptablesNft | Mode::IptablesLegacy => {
            let bin = mode.iptables().unwrap();
            let restore = format!("{bin}-restore");
            let rules = write_tmp(
                t,
                "rules.iptables",
                &kube_rules::iptables_restore(svcs, &|_| true),
            )?;
            let start = Instant::now();
            for (table, chain) in kube_rules::IPTABLES_HOOK_TARGETS {
                let _ = node_exec(t, bin, &["-w", "-t", table, "-N", chain]);
            }
            for (table, chain, rule) in kube_rules::iptables_hooks() {
                let mut args = vec!["-w", "-t", table, "-I", chain];
                args.extend(rule.iter().map(String::as_str));
                node_exec(t, bin, &args).with_context(|| format!("{bin} hook in {chain}"))?;
            }
            let done = exec_bounded(
                t,
                &restore,
                &[
                    "-w",
                    "5",
                    "--noflush",
                    "--counters",
                    rules.to_str().unwrap(),
                ],
            );
            std::fs::remove_file(rules).ok();
            done?;
            Ok(start.elapsed())
        }
        Mode::Nftables => {
            let rules = write_tmp(t, "rules.nft", &kube_rules::nft_full(svcs, NODE_IP))?;
            let start = Instant::now();
            let done = exec_bounded(t, "nft", &["-f", rules.to_str().unwrap()]);
            std::fs::remove_file(rules).ok();
            done?;
            Ok(start.elapsed())
        }
    }
}

/// Adds the new endpoint to Service `k` the way the mode applies one EndpointSlice change, and
/// measures until a prober in the client pod gets an answer from it through the ClusterIP.
/// `svcs` keeps the change (the next one starts from it).
pub(super) fn endpoint_change(
    t: &mut Topology,
    mode: Mode,
    svcs: &mut [Svc],
    k: usize,
    p: &Programmed,
) -> Result<Duration> {
    let mut changed = svcs.to_vec();
    changed[k].endpoints.push((pod_ip(NEW_ENDPOINT), ECHO_PORT));
    // Prepare the input before the clock starts: generating it is not the datapath's work.
    enum Apply {
        Ferry(String),
        Cmd(String, Vec<String>, PathBuf),
    }
    let apply = match mode {
        Mode::Ferry | Mode::FerrySocket => Apply::Ferry(ferry_yaml(&changed)),
        Mode::IptablesNft | Mode::IptablesLegacy => {
            let f = write_tmp(
                t,
                "change.iptables",
                &kube_rules::iptables_restore(&changed, &|i| i == k),
            )?;
            let bin = format!("{}-restore", mode.iptables().unwrap());
            Apply::Cmd(
                bin,
                vec![
                    "-w".into(),
                    "5".into(),
                    "--noflush".into(),
                    "--counters".into(),
                    f.to_str().unwrap().into(),
                ],
                f,
            )
        }
        Mode::Nftables => {
            let f = write_tmp(t, "change.nft", &kube_rules::nft_partial(&changed[k]))?;
            Apply::Cmd(
                "nft".into(),
                vec!["-f".into(), f.to_str().unwrap().into()],
                f,
            )
        }
        Mode::NoProxy | Mode::Ipvs => bail!("no endpoint change for {mode:?}"),
    };
    let want = t.pods[NEW_ENDPOINT].name.clone();
    let source = crate::measure::fresh_source(t, CLIENT)?.to_string();
    let target = format!("{}:{}", changed[k].vip, changed[k].port);
    // Paced: a prober trying back to back keeps one core busy with itself and its echo server,
    // which on a 2-core machine is half of what the mode under test has to apply the change
    // with. 250 µs between tries costs the figure ~1 ms of resolution, the same for every mode.
    let mut prober = Command::new(bin_path("ferry-loadgen")?);
    prober
        .args([
            "--mode",
            "probe",
            "--want",
            &want,
            "--target",
            &target,
            "--source",
            &source,
            "--seconds",
            "150",
            "--pause-us",
            "250",
        ])
        .stdout(Stdio::piped());
    t.client_cgroup(&mut prober)?;
    let mut probe = t.pods[CLIENT].ns.spawn(&mut prober)?;
    std::thread::sleep(Duration::from_millis(300)); // the prober is connecting by now
    let mut counts = None;
    if let (Apply::Ferry(yaml), Some(proxy)) = (&apply, p.proxy.as_ref()) {
        // Written before the clock, like the other modes' rule files.
        proxy.stage(yaml)?;
        counts = Some(proxy.sync_counts()?);
    }
    let start = Instant::now();
    let start_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as u64;
    let applied = match &apply {
        Apply::Ferry(_) => p
            .proxy
            .as_ref()
            .context("Ferry is not running")
            // Only the rename: the prober ends the measurement, and polling the daemon's
            // /healthz meanwhile would take CPU from it. Its answer is checked afterwards.
            .and_then(|proxy| proxy.put_staged()),
        Apply::Cmd(bin, args, _) => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            exec_bounded(t, bin, &args)
        }
    };
    if let Err(e) = applied {
        let _ = probe.kill();
        let _ = probe.wait();
        return Err(e);
    }
    let out = probe.wait_with_output()?;
    if let (Some(proxy), Some(before)) = (p.proxy.as_ref(), counts) {
        let (synced, _) = proxy.answer(before, start)?;
        if !synced {
            bail!("ferry-proxy refused the changed Services");
        }
    }
    if let Apply::Cmd(_, _, f) = apply {
        std::fs::remove_file(f).ok();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("prober output")?;
    let seen = v["seen_unix_us"].as_u64().unwrap_or(0);
    if seen == 0 {
        bail!("{} never answered through {target} after the change", want);
    }
    svcs[k] = changed.swap_remove(k);
    Ok(Duration::from_micros(seen.saturating_sub(start_us)))
}
