//! `cargo xtask`: everything around the code.
//! - `setup`: installs what a fresh machine lacks (Debian packages, nightly rust-src, bpf-linker);
//! - `build`: builds the eBPF datapath and the binaries;
//! - `test`: formatting, lints, unit tests and the end-to-end tests in network namespaces;
//! - `up`: a single-node cluster (control plane, controller-manager, scheduler, ferry-proxy,
//!   ferry-kubelet with containerd) in the foreground;
//! - `demo`: ferry-proxy alone, fed from a file, in front of three backends in namespaces;
//! - `bench datapath`: connection and request rates through Ferry against the direct path;
//! - `bench compare`: Ferry against kube-proxy's layouts; `bench controlplane`: the API server;
//!   `bench scheduler`: pods bound per second; `bench endpoints`: EndpointSlice to live map entry;
//!   `bench cni`: ferry-cni's ADD/DEL against the reference plugins; `bench pods`: pod startup
//!   through the API against the same pods started straight through CRI;
//! - `images`: the pause, busybox and echo images as OCI archives (no registry here).

mod bench;
mod bench_cni;
mod bench_datapath;
mod charts;
mod compare;
mod demo;
mod images;
mod kube_rules;
mod measure;
mod setup;
mod up;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks to build and test Ferry (idempotent).
    Setup,
    /// Build the datapath and every binary (release).
    Build,
    /// Run every check and test: fmt, clippy, unit tests, end-to-end tests (needs root).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Start a single-node cluster in the foreground (Ctrl-C stops it and cleans up).
    Up {
        /// Stop by itself after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        exit_after: Option<u64>,
        /// Apply examples/hello.yaml, check every replica answers over the NodePort and the
        /// ClusterIP from the host, then stop.
        #[arg(long)]
        smoke: bool,
    },
    /// Start the proxy-only demo: namespaces with a client and three backends behind
    /// ferry-proxy fed from examples/demo-services.yaml.
    Demo {
        /// Stop by itself after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        exit_after: Option<u64>,
    },
    /// Build Ferry's container images (pause, busybox, echo) as OCI archives under
    /// target/images; `ferry-kubelet --images DIR` imports them into containerd.
    Images,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command from the workspace root, streaming its output.
pub fn sh(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Where cargo puts binaries of `profile`.
pub fn target_dir(profile: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    base.join(profile)
}

/// Builds the binaries in release mode and points the test bed at them, except where a
/// `FERRY_*_BIN` is set already (to measure another build of one binary, e.g. the one before a
/// change, against the rest).
pub fn build_release() -> Result<()> {
    sh("cargo", &["build", "--release", "--bins"])?;
    let dir = target_dir("release");
    for (var, bin) in [
        ("FERRY_PROXY_BIN", "ferry-proxy"),
        ("FERRY_ECHO_BIN", "ferry-echo"),
        ("FERRY_LOADGEN_BIN", "ferry-loadgen"),
        ("FERRY_CNI_BIN", "ferry-cni"),
        ("FERRY_KUBELET_BIN", "ferry-kubelet"),
        ("FERRY_CONTROLPLANE_BIN", "ferry-controlplane"),
    ] {
        match std::env::var_os(var) {
            Some(given) => eprintln!("[xtask] {var} given: {}", given.to_string_lossy()),
            None => std::env::set_var(var, dir.join(bin)),
        }
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with one line that sums every test binary.
fn test_with_summary(args: &[&str]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("$ cargo {}", args.join(" "));
    let mut child = Command::new("cargo")
        .args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().context("no stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("\nferry: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

pub fn require_root(what: &str) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (network namespaces, eBPF): run it with sudo or as root");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    exit_code(run(Cli::parse()))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build => {
            setup::check()?;
            build_release()
        }
        Cmd::Test { filter } => {
            require_root("cargo xtask test")?;
            setup::run()?;
            sh("cargo", &["fmt", "--all", "--", "--check"])?;
            sh(
                "cargo",
                &["clippy", "--all-targets", "--", "-D", "warnings"],
            )?;
            // The end-to-end tests start the binaries and run the images: build them first.
            sh("cargo", &["build", "--bins"])?;
            images::build()?;
            let mut args = vec!["test", "--", "--test-threads=1"];
            if let Some(f) = filter.as_deref() {
                args.push(f);
            }
            test_with_summary(&args)
        }
        Cmd::Up { exit_after, smoke } => {
            require_root("cargo xtask up")?;
            setup::run()?;
            build_release()?;
            images::build()?;
            up::run_cluster(exit_after, smoke)
        }
        Cmd::Demo { exit_after } => {
            require_root("cargo xtask demo")?;
            setup::run()?;
            build_release()?;
            demo::run(exit_after)
        }
        Cmd::Images => {
            setup::check()?;
            images::build().map(|_| ())
        }
        Cmd::Bench { which } => {
            require_root("cargo xtask bench")?;
            setup::check()?;
            build_release()?;
            bench::run(which)
        }
    }
}

/// Errors reach the user as one line per cause, without a backtrace (even when the environment
/// asks for one: that is for panics).
fn exit_code(result: Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
