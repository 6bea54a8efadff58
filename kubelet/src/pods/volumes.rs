//! A pod's volumes as host directories: emptyDir (under the pod's directory), hostPath, and
//! configMap and secret volumes, whose files the kubelet writes from the API and keeps current.
//!
//! ConfigMap and Secret contents are written as kubelet's atomic writer does: the files go to a
//! new timestamped directory, the `..data` link is switched to it with one rename, and each
//! top-level entry is a link through `..data`, so a reader sees the old set or the new one,
//! never a mix. They are read again every `REFRESH` while the pod runs; a container mounting
//! one key with `subPath` keeps the file it started with (as in Kubernetes).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, KeyToPath, Secret, Volume};
use kube::api::Api;
use kube::ResourceExt;

use super::Worker;

/// How often configMap and secret volumes are read again while the pod runs.
pub(super) const REFRESH: Duration = Duration::from_secs(5);
/// Files of configMap and secret volumes without a mode (Kubernetes' default).
const DEFAULT_MODE: u32 = 0o644;

/// A configMap or secret volume's source.
struct Source<'a> {
    kind: &'static str,
    name: &'a str,
    items: &'a [KeyToPath],
    default_mode: Option<i32>,
    optional: bool,
}

fn source(v: &Volume) -> Option<Source<'_>> {
    if let Some(c) = &v.config_map {
        return Some(Source {
            kind: "configmap",
            name: &c.name,
            items: c.items.as_deref().unwrap_or_default(),
            default_mode: c.default_mode,
            optional: c.optional.unwrap_or(false),
        });
    }
    let s = v.secret.as_ref()?;
    Some(Source {
        kind: "secret",
        name: s.secret_name.as_deref().unwrap_or_default(),
        items: s.items.as_deref().unwrap_or_default(),
        default_mode: s.default_mode,
        optional: s.optional.unwrap_or(false),
    })
}

/// A relative path inside a volume: no `..`, not absolute, not empty.
fn safe_path(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && !p.starts_with("..")
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

fn mode(m: Option<i32>, what: &str) -> Result<u32, String> {
    match m {
        None => Ok(DEFAULT_MODE),
        Some(m) if (0..=0o777).contains(&m) => Ok(m as u32),
        Some(m) => Err(format!(
            "{what}: {m} is not a file mode (0 to 0777, e.g. 420 for 0644)"
        )),
    }
}

/// The files of a volume: path -> (content, mode), from the object's keys and the volume's
/// `items` (only those keys, at their paths) and modes.
fn files(
    volume: &str,
    src: &Source,
    data: Option<BTreeMap<String, Vec<u8>>>,
) -> Result<BTreeMap<String, (Vec<u8>, u32)>, String> {
    let prefix = format!("volume {volume:?}");
    let Some(data) = data else {
        if src.optional {
            return Ok(BTreeMap::new());
        }
        return Err(format!(
            "MountVolume.SetUp failed for volume {volume:?} : {} \"{}\" not found",
            src.kind, src.name
        ));
    };
    let default = mode(src.default_mode, &format!("{prefix}: defaultMode"))?;
    let mut out = BTreeMap::new();
    if src.items.is_empty() {
        for (k, v) in data {
            out.insert(k, (v, default));
        }
        return Ok(out);
    }
    for item in src.items {
        if !safe_path(&item.path) {
            return Err(format!(
                "{prefix}: items path {:?} must be relative and must not contain '..'",
                item.path
            ));
        }
        let Some(v) = data.get(&item.key) else {
            if src.optional {
                continue;
            }
            return Err(format!(
                "MountVolume.SetUp failed for volume {volume:?} : {} references non-existent config key: {}",
                src.kind, item.key
            ));
        };
        let m = match item.mode {
            Some(_) => mode(item.mode, &format!("{prefix}: items {:?} mode", item.key))?,
            None => default,
        };
        out.insert(item.path.clone(), (v.clone(), m));
    }
    Ok(out)
}

fn fingerprint(files: &BTreeMap<String, (Vec<u8>, u32)>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

/// Writes `files` into `dir` atomically (see the module's notes).
fn write_atomic(dir: &Path, files: &BTreeMap<String, (Vec<u8>, u32)>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let fresh_name = format!("..{stamp}");
    let fresh = dir.join(&fresh_name);
    std::fs::create_dir(&fresh)?;
    for (path, (content, m)) in files {
        let p = fresh.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, content)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*m))?;
    }
    // Switch `..data` with one rename.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&fresh_name, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    // Top-level entries through `..data`; those no longer there go.
    let top: std::collections::BTreeSet<String> = files
        .keys()
        .filter_map(|p| p.split('/').next().map(str::to_string))
        .collect();
    for name in &top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link)?;
        }
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") {
            // Older contents; one a subPath mount still holds stays (busy).
            if name != "..data" && name != fresh_name {
                let _ = std::fs::remove_dir_all(e.path());
            }
        } else if !top.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

impl Worker {
    /// The pod's volumes as host directories; kinds ferry-kubelet does not serve are refused by
    /// name.
    pub(super) fn volumes(&self) -> Result<HashMap<String, PathBuf>, String> {
        let mut out = HashMap::new();
        for v in self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
        {
            let path = if v.empty_dir.is_some() || v.config_map.is_some() || v.secret.is_some() {
                self.pod_dir().join("volumes").join(&v.name)
            } else if let Some(h) = &v.host_path {
                PathBuf::from(&h.path)
            } else {
                return Err(format!(
                    "volume {:?}: only emptyDir, hostPath, configMap and secret volumes are supported by ferry-kubelet",
                    v.name
                ));
            };
            out.insert(v.name.clone(), path);
        }
        Ok(out)
    }

    /// Whether a volume of the pod is written from the API (mounted read-only).
    pub(super) fn api_volume(&self, name: &str) -> bool {
        self.pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .any(|v| v.name == name && source(v).is_some())
    }

    /// Writes the configMap and secret volumes whose source changed since the last time (all of
    /// them the first time). An error names the volume and what is missing.
    pub(super) async fn sync_api_volumes(&mut self) -> Result<(), String> {
        let ns = self.pod.namespace().unwrap_or_default();
        let volumes: Vec<Volume> = self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter(|v| source(v).is_some())
            .cloned()
            .collect();
        for v in &volumes {
            let src = source(v).expect("filtered above");
            let data = match src.kind {
                "configmap" => {
                    let api: Api<ConfigMap> = Api::namespaced(self.k.client.clone(), &ns);
                    api.get_opt(src.name)
                        .await
                        .map_err(|e| {
                            format!(
                                "volume {:?}: reading configmap {ns}/{}: {e}",
                                v.name, src.name
                            )
                        })?
                        .map(|cm| {
                            let mut d: BTreeMap<String, Vec<u8>> = cm
                                .data
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| (k, v.into_bytes()))
                                .collect();
                            for (k, b) in cm.binary_data.unwrap_or_default() {
                                d.insert(k, b.0);
                            }
                            d
                        })
                }
                _ => {
                    let api: Api<Secret> = Api::namespaced(self.k.client.clone(), &ns);
                    api.get_opt(src.name)
                        .await
                        .map_err(|e| {
                            format!("volume {:?}: reading secret {ns}/{}: {e}", v.name, src.name)
                        })?
                        .map(|s| {
                            let mut d: BTreeMap<String, Vec<u8>> = s
                                .string_data
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| (k, v.into_bytes()))
                                .collect();
                            for (k, b) in s.data.unwrap_or_default() {
                                d.insert(k, b.0);
                            }
                            d
                        })
                }
            };
            let files = files(&v.name, &src, data)?;
            let print = fingerprint(&files);
            if self.volume_prints.get(&v.name) == Some(&print) {
                continue;
            }
            let dir = self.pod_dir().join("volumes").join(&v.name);
            write_atomic(&dir, &files)
                .map_err(|e| format!("volume {:?}: writing {}: {e}", v.name, dir.display()))?;
            if self.volume_prints.insert(v.name.clone(), print).is_some() {
                tracing::info!(pod = %self.key, volume = %v.name, "volume updated from its {} {}", src.kind, src.name);
            }
        }
        self.volumes_synced = Some(Instant::now());
        Ok(())
    }

    /// Every `REFRESH` while the pod runs: its configMap and secret volumes follow their
    /// sources (a failure is logged; the files stay as they were).
    pub(super) async fn refresh_api_volumes(&mut self) {
        if self.volumes_synced.is_none_or(|t| t.elapsed() < REFRESH) {
            return;
        }
        if let Err(e) = self.sync_api_volumes().await {
            tracing::warn!(pod = %self.key, "{e}");
            self.volumes_synced = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src<'a>(items: &'a [KeyToPath], optional: bool) -> Source<'a> {
        Source {
            kind: "configmap",
            name: "app",
            items,
            default_mode: Some(0o600),
            optional,
        }
    }

    fn data() -> Option<BTreeMap<String, Vec<u8>>> {
        Some(
            [
                ("a".to_string(), b"1".to_vec()),
                ("b".to_string(), b"2".to_vec()),
            ]
            .into(),
        )
    }

    #[test]
    fn every_key_or_the_items_at_their_paths_with_their_modes() {
        let all = files("v", &src(&[], false), data()).unwrap();
        assert_eq!(all["a"], (b"1".to_vec(), 0o600));
        assert_eq!(all.len(), 2);
        let items = [KeyToPath {
            key: "b".into(),
            path: "conf/b.txt".into(),
            mode: Some(0o400),
        }];
        let some = files("v", &src(&items, false), data()).unwrap();
        assert_eq!(some.len(), 1);
        assert_eq!(some["conf/b.txt"], (b"2".to_vec(), 0o400));
    }

    #[test]
    fn missing_sources_and_keys_and_bad_paths_are_named() {
        assert_eq!(
            files("v", &src(&[], false), None).unwrap_err(),
            "MountVolume.SetUp failed for volume \"v\" : configmap \"app\" not found"
        );
        assert!(files("v", &src(&[], true), None).unwrap().is_empty());
        let missing = [KeyToPath {
            key: "zz".into(),
            path: "zz".into(),
            mode: None,
        }];
        assert!(files("v", &src(&missing, false), data())
            .unwrap_err()
            .contains("non-existent config key: zz"));
        let escape = [KeyToPath {
            key: "a".into(),
            path: "../etc/passwd".into(),
            mode: None,
        }];
        assert!(files("v", &src(&escape, false), data())
            .unwrap_err()
            .contains("must not contain '..'"));
        let bad_mode = Source {
            default_mode: Some(0o1777),
            ..src(&[], false)
        };
        assert!(files("v", &bad_mode, data())
            .unwrap_err()
            .contains("defaultMode"));
    }

    #[test]
    fn contents_switch_at_once_and_removed_keys_go() {
        let dir = std::env::temp_dir().join(format!("ferry-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let one: BTreeMap<String, (Vec<u8>, u32)> = [
            ("a".to_string(), (b"1".to_vec(), 0o644)),
            ("sub/b".to_string(), (b"2".to_vec(), 0o600)),
        ]
        .into();
        write_atomic(&dir, &one).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"1");
        assert_eq!(std::fs::read(dir.join("sub/b")).unwrap(), b"2");
        let m = std::fs::metadata(dir.join("sub/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o600);
        let two: BTreeMap<String, (Vec<u8>, u32)> =
            [("a".to_string(), (b"changed".to_vec(), 0o644))].into();
        write_atomic(&dir, &two).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"changed");
        assert!(std::fs::symlink_metadata(dir.join("sub")).is_err());
        // One set of contents left besides the link.
        let stamps = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("..") && n != "..data"
            })
            .count();
        assert_eq!(stamps, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
