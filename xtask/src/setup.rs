//! `cargo xtask setup`: what a fresh Debian 12 machine needs, installed by the project itself.
//! Each step checks first, so a second run takes a moment.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::sh;

/// Debian packages: iproute2/ping/curl for the test bed and demo, iptables/nftables/conntrack
/// for the comparisons, bpftool to inspect maps, iperf3 for bulk throughput, a font for charts,
/// protoc for the etcd client's generated code, etcd for the control plane's etcd backend,
/// tzdata for CronJobs' time zones, the reference CNI plugins (ptp, host-local, portmap) that
/// ferry-cni is compared with, dig (bind9-dnsutils) for the DNS tests, dnsperf and unbound
/// (the reference server) for the DNS benchmark, docker-registry and skopeo for the private
/// registry the image pull tests push to and pull from.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "iptables",
    "nftables",
    "conntrack",
    "bpftool",
    "iperf3",
    "curl",
    "util-linux",
    "fonts-dejavu-core",
    "protobuf-compiler",
    "etcd-server",
    "tzdata",
    "containernetworking-plugins",
    // The container runtime the kubelet drives over CRI, and what Ferry's images hold.
    "containerd",
    "runc",
    "busybox-static",
    "bind9-dnsutils",
    "dnsperf",
    "unbound",
    "docker-registry",
    "skopeo",
];

/// Python packages the tests run (pinned), with the module each is imported as: the
/// `kubernetes` client of the control plane's client tests, and schemathesis, which fuzzes the
/// API server from its OpenAPI documents.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("kubernetes==37.0.2", "kubernetes"),
    ("schemathesis==4.32.5", "schemathesis"),
];

fn ok(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

use ferry_testbed::run as output;

fn missing_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p])
                .map(|s| s.contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect()
}

use ferry_testbed::controlplane::PYTHON_VENV;

/// The pinned packages not importable from the tests' virtual environment.
fn missing_python() -> Vec<&'static str> {
    PYTHON_PACKAGES
        .iter()
        .filter(|(_, module)| {
            !ok(
                &format!("{PYTHON_VENV}/bin/python"),
                &["-c", &format!("import {module}")],
            )
        })
        .map(|(pin, _)| *pin)
        .collect()
}

fn home() -> String {
    std::env::var("HOME").unwrap_or_else(|_| "/root".into())
}

/// bpf-linker is linked against the nightly's libLLVM, which rustup puts on the library path
/// when it runs the linker; do the same to ask its version.
fn bpf_linker_ok() -> bool {
    let lib = output("rustc", &["+nightly", "--print", "sysroot"])
        .map(|s| format!("{}/lib", s.trim()))
        .unwrap_or_default();
    [
        "bpf-linker".to_string(),
        format!("{}/.cargo/bin/bpf-linker", home()),
    ]
    .iter()
    .any(|bin| {
        Command::new(bin)
            .arg("--version")
            .env("LD_LIBRARY_PATH", &lib)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

/// The LLVM major version of the nightly toolchain, which bpf-linker must be built against.
fn nightly_llvm_major() -> Result<String> {
    let v = output("rustc", &["+nightly", "-vV"])?;
    let line = v
        .lines()
        .find(|l| l.starts_with("LLVM version:"))
        .context("rustc +nightly -vV printed no LLVM version")?;
    let ver = line.trim_start_matches("LLVM version:").trim();
    Ok(ver.split('.').next().unwrap_or_default().to_string())
}

/// Fails with what is missing, without installing anything.
pub fn check() -> Result<()> {
    let mut missing = Vec::new();
    let pkgs = missing_packages();
    if !pkgs.is_empty() {
        missing.push(format!("Debian packages {}", pkgs.join(" ")));
    }
    if !ok("rustc", &["+nightly", "--version"]) {
        missing.push("the nightly Rust toolchain".into());
    }
    if !bpf_linker_ok() {
        missing.push("bpf-linker".into());
    }
    let py = missing_python();
    if !py.is_empty() {
        missing.push(format!("Python {} in {PYTHON_VENV}", py.join(" ")));
    }
    if !missing.is_empty() {
        bail!("missing: {}; run `cargo xtask setup`", missing.join(", "));
    }
    Ok(())
}

pub fn run() -> Result<()> {
    let pkgs = missing_packages();
    if !pkgs.is_empty() {
        eprintln!("[setup] installing Debian packages: {}", pkgs.join(" "));
        sh("apt-get", &["update", "-qq"])?;
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(pkgs.iter());
        let status = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("apt-get install")?;
        if !status.success() {
            bail!("apt-get install {} failed", pkgs.join(" "));
        }
    }
    if !ok("rustc", &["+nightly", "--version"]) {
        eprintln!("[setup] installing the nightly toolchain (builds the eBPF programs)");
        sh(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )
        .context("the nightly toolchain could not be installed; Ferry's eBPF crate needs it")?;
    }
    let components = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("[setup] adding rust-src to nightly (build-std for bpfel-unknown-none)");
        sh(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    for c in ["rustfmt", "clippy"] {
        if !output("rustup", &["component", "list", "--installed"])?
            .lines()
            .any(|l| l.starts_with(c))
        {
            sh("rustup", &["component", "add", c])?;
        }
    }
    if !bpf_linker_ok() {
        let major = nightly_llvm_major()?;
        eprintln!(
            "[setup] building bpf-linker against the nightly's LLVM {major} (about a minute)"
        );
        let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])?
            .trim()
            .to_string();
        let lib_dir = format!("{sysroot}/lib");
        let llvm = std::fs::read_dir(&lib_dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so"))
            })
            .with_context(|| format!("no libLLVM.so in {lib_dir}"))?;
        let prefix = format!("{}/.local/rust-llvm", home());
        std::fs::create_dir_all(format!("{prefix}/lib"))?;
        let link = format!("{prefix}/lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
        let feature = format!("llvm-{major}");
        let status = Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                "0.13.0",
                "--no-default-features",
                "--features",
                &feature,
                "--locked",
            ])
            .env("LLVM_PREFIX", &prefix)
            .status()
            .context("cargo install bpf-linker")?;
        if !status.success() {
            bail!("building bpf-linker failed");
        }
    }
    let py = missing_python();
    if !py.is_empty() {
        eprintln!(
            "[setup] installing Python {} into {PYTHON_VENV}",
            py.join(" ")
        );
        if !std::path::Path::new(&format!("{PYTHON_VENV}/bin/pip")).exists() {
            sh("python3", &["-m", "venv", PYTHON_VENV])?;
        }
        let mut args = vec!["install", "-q"];
        args.extend(py);
        sh(&format!("{PYTHON_VENV}/bin/pip"), &args)?;
    }
    eprintln!("[setup] all set");
    Ok(())
}
