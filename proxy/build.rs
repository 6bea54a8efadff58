//! Builds the eBPF datapath (`proxy-ebpf`) with the nightly toolchain and bpf-linker, so the
//! daemon can embed the object. `AYA_BUILD_SKIP=1` skips it for a quick check of host code.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .ok_or_else(|| anyhow!("proxy crate has no parent dir"))?;
    let ebpf_dir = root.join("proxy-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to proxy-ebpf")?;
    aya_build::build_ebpf(
        [Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF datapath (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}
