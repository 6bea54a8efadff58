//! `cargo xtask images`: Ferry's container images, built locally (no registry is reachable
//! here) as OCI image archives that `ctr images import` (and `ferry-kubelet --images`) load:
//!
//! | image                    | contents                                           |
//! |--------------------------|----------------------------------------------------|
//! | `ferry.local/pause:1`    | `ferry-pause`, every pod sandbox's first process    |
//! | `ferry.local/busybox:1`  | Debian's static busybox with its applets as links   |
//! | `ferry.local/echo:1`     | `ferry-echo` on :8080 (answers with the pod's name) |
//! | `ferry.local/incluster:1`| `ferry-incluster`: an in-cluster API client         |
//!
//! Ferry's programs are linked statically (`+crt-static`) so each image is one layer with one
//! file. Archives are reproducible: fixed times, owners and order, so equal inputs give equal
//! digests and a re-import is a no-op.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const BUSYBOX: &str = "/bin/busybox";

/// One file of an image's single layer.
enum Entry {
    Dir(&'static str),
    File { path: String, from: PathBuf },
    Link { path: String, target: String },
}

struct Image {
    file: &'static str,
    name: &'static str,
    entries: Vec<Entry>,
    config: Value,
}

/// Where the archives go: `<target>/images`.
pub fn dir() -> PathBuf {
    crate::target_dir("images")
}

/// Builds every image archive, points the test bed at them (`FERRY_IMAGES_DIR`) and returns
/// their paths.
pub fn build() -> Result<Vec<PathBuf>> {
    let bins = build_static(&["ferry-pause", "ferry-echo", "ferry-incluster"])?;
    let busybox = busybox_entries()?;
    let env = json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
    let images = [
        Image {
            file: "pause.tar",
            name: "ferry.local/pause:1",
            entries: vec![Entry::File {
                path: "pause".into(),
                from: bins.join("ferry-pause"),
            }],
            config: json!({"Entrypoint": ["/pause"], "Env": env}),
        },
        Image {
            file: "busybox.tar",
            name: "ferry.local/busybox:1",
            entries: busybox,
            config: json!({"Cmd": ["sh"], "Env": env}),
        },
        Image {
            file: "echo.tar",
            name: "ferry.local/echo:1",
            entries: vec![Entry::File {
                path: "ferry-echo".into(),
                from: bins.join("ferry-echo"),
            }],
            config: json!({"Entrypoint": ["/ferry-echo"], "Env": env,
                           "ExposedPorts": {"8080/tcp": {}, "8080/udp": {}}}),
        },
        Image {
            file: "incluster.tar",
            name: "ferry.local/incluster:1",
            entries: vec![Entry::File {
                path: "ferry-incluster".into(),
                from: bins.join("ferry-incluster"),
            }],
            config: json!({"Entrypoint": ["/ferry-incluster"], "Env": env}),
        },
    ];
    let out = dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut paths = Vec::new();
    for image in images {
        let path = out.join(image.file);
        write_archive(&image, &path)
            .with_context(|| format!("building image {} ({})", image.name, path.display()))?;
        eprintln!("[images] {} -> {}", image.name, path.display());
        paths.push(path);
    }
    std::env::set_var("FERRY_IMAGES_DIR", &out);
    Ok(paths)
}

/// Builds `bins` of the tests crate as static executables; returns their directory.
fn build_static(bins: &[&str]) -> Result<PathBuf> {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let mut args = vec!["build", "--release", "-p", "tests", "--target", &triple];
    for b in bins {
        args.extend(["--bin", b]);
    }
    eprintln!("$ cargo {} (static)", args.join(" "));
    let var = format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        triple.to_uppercase().replace('-', "_")
    );
    let status = Command::new("cargo")
        .args(&args)
        .env(var, "-C target-feature=+crt-static -C strip=symbols")
        .current_dir(crate::workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building {} statically failed", bins.join(", "));
    }
    Ok(crate::target_dir(&triple).join("release"))
}

/// busybox and a link per applet in /bin, as the busybox image has them.
fn busybox_entries() -> Result<Vec<Entry>> {
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| {
            format!("running {BUSYBOX} (Debian's busybox-static; `cargo xtask setup`)")
        })?;
    if !out.status.success() {
        bail!("{BUSYBOX} --list failed");
    }
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::Dir("tmp"),
        Entry::File {
            path: "bin/busybox".into(),
            from: BUSYBOX.into(),
        },
    ];
    let mut applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|a| *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect();
    applets.sort();
    applets.dedup();
    entries.extend(applets.into_iter().map(|a| Entry::Link {
        path: format!("bin/{a}"),
        target: "busybox".into(),
    }));
    Ok(entries)
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    // Paths are short and ASCII here; set_path checks both.
    h.set_path(path).expect("image paths are short ASCII");
    h
}

/// The layer: an uncompressed tar (its digest is its diff id).
fn layer(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(path) => {
                // /tmp is world-writable with the sticky bit, as on any system.
                let mode = if *path == "tmp" { 0o1777 } else { 0o755 };
                let mut h = header(&format!("{path}/"), tar::EntryType::Directory, mode, 0);
                h.set_cksum();
                b.append(&h, std::io::empty())?;
            }
            Entry::File { path, from } => {
                let data =
                    std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
                let mut h = header(path, tar::EntryType::Regular, 0o755, data.len() as u64);
                h.set_cksum();
                b.append(&h, data.as_slice())?;
            }
            Entry::Link { path, target } => {
                let mut h = header(path, tar::EntryType::Symlink, 0o777, 0);
                h.set_link_name(target)?;
                h.set_cksum();
                b.append(&h, std::io::empty())?;
            }
        }
    }
    Ok(b.into_inner()?)
}

fn write_archive(image: &Image, path: &Path) -> Result<()> {
    let layer = layer(&image.entries)?;
    let config = serde_json::to_vec(&json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": image.config,
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
        "history": [{"created_by": "cargo xtask images"}],
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha256(&layer), "size": layer.len()}],
    }))?;
    let tag = image
        .name
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&manifest), "size": manifest.len(),
            "annotations": {"io.containerd.image.name": image.name,
                            "org.opencontainers.image.ref.name": tag},
        }],
    }))?;
    let mut files: Vec<(String, &[u8])> = vec![
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json".into(), &index),
    ];
    for blob in [&layer, &config, &manifest] {
        let digest = sha256(blob);
        files.push((format!("blobs/sha256/{}", &digest[7..]), blob));
    }
    let tmp = path.with_extension("tar.tmp");
    let mut b = tar::Builder::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    for (name, data) in files {
        let mut h = header(&name, tar::EntryType::Regular, 0o644, data.len() as u64);
        h.set_cksum();
        b.append(&h, data)?;
    }
    b.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_reproducible_tars() {
        let dir = std::env::temp_dir().join(format!("ferry-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("hello");
        std::fs::write(&f, b"hi").unwrap();
        let entries = || {
            vec![
                Entry::Dir("bin"),
                Entry::File {
                    path: "bin/hello".into(),
                    from: f.clone(),
                },
                Entry::Link {
                    path: "bin/hi".into(),
                    target: "hello".into(),
                },
            ]
        };
        let a = layer(&entries()).unwrap();
        assert_eq!(sha256(&a), sha256(&layer(&entries()).unwrap()));
        let mut ar = tar::Archive::new(a.as_slice());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["bin/", "bin/hello", "bin/hi"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
