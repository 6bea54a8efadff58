//! `cargo xtask demo`: ferry-proxy alone, fed from a file. Network namespaces for a node,
//! three backend pods, a client pod and an outside host; ferry-proxy in the node namespace
//! with `examples/demo-services.yaml`. Ctrl-C (or `--exit-after`) removes everything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use ferry_testbed::Topology;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn run(exit_after: Option<u64>) -> Result<()> {
    let yaml_path = crate::workspace_root().join("examples/demo-services.yaml");
    let yaml = std::fs::read_to_string(&yaml_path)
        .with_context(|| format!("reading {}", yaml_path.display()))?;
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    eprintln!("[demo] creating namespaces ferry-node, ferry-ext, ferry-p0..p3");
    let mut t = Topology::with_prefix("ferry", 4)?;
    t.start_echo_servers()?;
    eprintln!("[demo] starting ferry-proxy");
    let proxy = t.start_proxy(&yaml)?;
    println!();
    println!(
        "The demo is up: pods ferry-p0..p2 serve Service default/web, ferry-p3 is a client pod."
    );
    println!("  ClusterIP from a pod:      ip netns exec ferry-p3 curl -s http://10.96.0.10/");
    println!(
        "  NodePort from outside:     ip netns exec ferry-ext curl -s http://192.168.77.1:30080/"
    );
    println!("  metrics:                   ip netns exec ferry-node curl -s localhost:10249/metrics | grep ferry_");
    println!(
        "  maps:                      bpftool map dump pinned {}/maps/FERRY_SERVICES",
        t.bpf_dir.display()
    );
    println!(
        "  edit live (reloaded):      {}",
        proxy.services_file.display()
    );
    println!(
        "Each answer names the backend and the client address it saw. Ctrl-C stops and cleans up."
    );
    let start = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        if exit_after.is_some_and(|s| start.elapsed() >= Duration::from_secs(s)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("[demo] stopping and cleaning up");
    drop(t);
    Ok(())
}
