//! A pod's volumes as host directories: emptyDir (under the pod's directory), hostPath, and the
//! volumes whose files the kubelet writes from the API and keeps current: configMap, secret,
//! downwardAPI, and projected volumes of those three and of serviceAccountToken (the token from
//! `tokens.rs`).
//!
//! Their contents are written as kubelet's atomic writer does: the files go to a
//! new timestamped directory, the `..data` link is switched to it with one rename, and each
//! top-level entry is a link through `..data`, so a reader sees the old set or the new one,
//! never a mix. They are read again every `REFRESH` while the pod runs; a container mounting
//! one key with `subPath` keeps the file it started with (as in Kubernetes).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, DownwardAPIVolumeFile, KeyToPath, Secret, Volume};
use k8s_openapi::ByteString;
use kube::api::Api;
use kube::ResourceExt;

use super::Worker;

/// How often configMap and secret volumes are read again while the pod runs.
pub(super) const REFRESH: Duration = Duration::from_secs(5);
/// Files of configMap and secret volumes without a mode (Kubernetes' default).
const DEFAULT_MODE: u32 = 0o644;

/// One source of a volume written from the API: a ConfigMap's or Secret's keys, or fields of
/// the pod (downward API).
enum Part<'a> {
    Object {
        kind: &'static str,
        name: &'a str,
        items: &'a [KeyToPath],
        optional: bool,
    },
    Downward(&'a [DownwardAPIVolumeFile]),
    /// A service account token for `audience` (None: the API server's), valid this long.
    Token {
        path: &'a str,
        audience: Option<&'a str>,
        expiration: i64,
    },
}

/// A configMap, secret, downwardAPI or projected volume: its parts and default file mode.
struct Written<'a> {
    parts: Vec<Part<'a>>,
    default_mode: Option<i32>,
}

fn object<'a>(
    kind: &'static str,
    name: &'a str,
    items: &'a Option<Vec<KeyToPath>>,
    optional: Option<bool>,
) -> Part<'a> {
    Part::Object {
        kind,
        name,
        items: items.as_deref().unwrap_or_default(),
        optional: optional.unwrap_or(false),
    }
}

/// The parts of a volume the kubelet writes from the API (None for other kinds). A projected
/// source ferry-kubelet cannot write is refused by name.
fn written(v: &Volume) -> Option<Result<Written<'_>, String>> {
    let w = |parts, default_mode| {
        Some(Ok(Written {
            parts,
            default_mode,
        }))
    };
    if let Some(c) = &v.config_map {
        return w(
            vec![object("configmap", &c.name, &c.items, c.optional)],
            c.default_mode,
        );
    }
    if let Some(s) = &v.secret {
        let name = s.secret_name.as_deref().unwrap_or_default();
        return w(
            vec![object("secret", name, &s.items, s.optional)],
            s.default_mode,
        );
    }
    if let Some(d) = &v.downward_api {
        let items = d.items.as_deref().unwrap_or_default();
        return w(vec![Part::Downward(items)], d.default_mode);
    }
    let p = v.projected.as_ref()?;
    let mut parts = Vec::new();
    for src in p.sources.iter().flatten() {
        if let Some(c) = &src.config_map {
            parts.push(object("configmap", &c.name, &c.items, c.optional));
        } else if let Some(s) = &src.secret {
            parts.push(object("secret", &s.name, &s.items, s.optional));
        } else if let Some(d) = &src.downward_api {
            parts.push(Part::Downward(d.items.as_deref().unwrap_or_default()));
        } else if let Some(t) = &src.service_account_token {
            parts.push(Part::Token {
                path: &t.path,
                audience: t.audience.as_deref().filter(|a| !a.is_empty()),
                expiration: t
                    .expiration_seconds
                    .unwrap_or(super::tokens::DEFAULT_SECONDS),
            });
        } else {
            return Some(Err(format!(
                "volume {:?}: projected sources other than configMap, secret, downwardAPI and serviceAccountToken are not supported by ferry-kubelet yet",
                v.name
            )));
        }
    }
    w(parts, p.default_mode)
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

/// A downward API file as rendered: path, content, its item's mode.
type Rendered = (String, Vec<u8>, Option<i32>);

/// A part's content as read: an object's keys (None: not found), or the downward API files.
enum Read {
    Object(Option<BTreeMap<String, Vec<u8>>>),
    Downward(Vec<Rendered>),
    Token(String),
}

/// The files of a volume: path -> (content, mode), from each part in order: an object's keys
/// (or only its `items`, at their paths), the downward API's files; modes from the item or the
/// volume's default.
fn files(
    volume: &str,
    w: &Written,
    read: Vec<Read>,
) -> Result<BTreeMap<String, (Vec<u8>, u32)>, String> {
    let prefix = format!("volume {volume:?}");
    let default = mode(w.default_mode, &format!("{prefix}: defaultMode"))?;
    let item_mode = |m: Option<i32>, what: &str| match m {
        Some(_) => mode(m, &format!("{prefix}: items {what:?} mode")),
        None => Ok(default),
    };
    let checked = |path: &str| {
        if safe_path(path) {
            Ok(path.to_string())
        } else {
            Err(format!(
                "{prefix}: items path {path:?} must be relative and must not contain '..'"
            ))
        }
    };
    let mut out = BTreeMap::new();
    for (part, read) in w.parts.iter().zip(read) {
        match (part, read) {
            (
                Part::Object {
                    kind,
                    name,
                    items,
                    optional,
                },
                Read::Object(data),
            ) => {
                let Some(data) = data else {
                    if *optional {
                        continue;
                    }
                    return Err(format!(
                        "MountVolume.SetUp failed for volume {volume:?} : {kind} \"{name}\" not found"
                    ));
                };
                if items.is_empty() {
                    for (k, v) in data {
                        out.insert(checked(&k)?, (v, default));
                    }
                    continue;
                }
                for item in items.iter() {
                    let Some(v) = data.get(&item.key) else {
                        if *optional {
                            continue;
                        }
                        return Err(format!(
                            "MountVolume.SetUp failed for volume {volume:?} : {kind} references non-existent config key: {}",
                            item.key
                        ));
                    };
                    out.insert(
                        checked(&item.path)?,
                        (v.clone(), item_mode(item.mode, &item.key)?),
                    );
                }
            }
            (Part::Downward(_), Read::Downward(rendered)) => {
                for (path, content, m) in rendered {
                    let m = item_mode(m, &path)?;
                    out.insert(checked(&path)?, (content, m));
                }
            }
            (Part::Token { path, .. }, Read::Token(token)) => {
                out.insert(checked(path)?, (token.into_bytes(), default));
            }
            _ => unreachable!("each part is read as its own kind"),
        }
    }
    Ok(out)
}

/// An object's text and binary keys as bytes (a ConfigMap's data and binaryData, a Secret's
/// stringData and data); a binary key wins over a text key of the same name.
pub(super) fn merged(
    text: Option<BTreeMap<String, String>>,
    bytes: Option<BTreeMap<String, ByteString>>,
) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = text
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, b) in bytes.unwrap_or_default() {
        out.insert(k, b.0);
    }
    out
}

/// Labels or annotations as the downward API writes them: sorted `key="value"` lines.
fn map_lines(m: &Option<BTreeMap<String, String>>) -> String {
    m.iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}\n"))
        .collect()
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
            let path = if v.empty_dir.is_some() || written(v).is_some() {
                self.pod_dir().join("volumes").join(&v.name)
            } else if let Some(h) = &v.host_path {
                PathBuf::from(&h.path)
            } else {
                return Err(format!(
                    "volume {:?}: only emptyDir, hostPath, configMap, secret, downwardAPI and projected volumes are supported by ferry-kubelet",
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
            .any(|v| v.name == name && written(v).is_some())
    }

    /// Writes the configMap, secret, downwardAPI and projected volumes whose content changed
    /// since the last time (all of them the first time). An error names the volume and what is
    /// missing.
    pub(super) async fn sync_api_volumes(&mut self) -> Result<(), String> {
        let volumes: Vec<Volume> = self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter(|v| written(v).is_some())
            .cloned()
            .collect();
        for v in &volumes {
            let w = written(v).expect("filtered above")?;
            let mut read = Vec::new();
            for part in &w.parts {
                read.push(match part {
                    Part::Object { kind, name, .. } => {
                        Read::Object(self.read_object(kind, name).await.map_err(|e| {
                            format!("volume {:?}: reading {kind} {name}: {e}", v.name)
                        })?)
                    }
                    Part::Downward(items) => Read::Downward(self.render_downward(&v.name, items)?),
                    Part::Token {
                        audience,
                        expiration,
                        ..
                    } => Read::Token(self.token(&v.name, *audience, *expiration).await?),
                });
            }
            let files = files(&v.name, &w, read)?;
            let print = fingerprint(&files);
            if self.volume_prints.get(&v.name) == Some(&print) {
                continue;
            }
            let dir = self.pod_dir().join("volumes").join(&v.name);
            write_atomic(&dir, &files)
                .map_err(|e| format!("volume {:?}: writing {}: {e}", v.name, dir.display()))?;
            if self.volume_prints.insert(v.name.clone(), print).is_some() {
                tracing::info!(pod = %self.key, volume = %v.name, "volume updated");
            }
        }
        self.volumes_synced = Some(Instant::now());
        Ok(())
    }

    /// A ConfigMap's (data and binaryData) or Secret's keys; None when it does not exist.
    async fn read_object(
        &self,
        kind: &str,
        name: &str,
    ) -> kube::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let ns = self.pod.namespace().unwrap_or_default();
        if kind == "configmap" {
            let api: Api<ConfigMap> = Api::namespaced(self.k.client.clone(), &ns);
            return Ok(api
                .get_opt(name)
                .await?
                .map(|cm| merged(cm.data, cm.binary_data)));
        }
        let api: Api<Secret> = Api::namespaced(self.k.client.clone(), &ns);
        Ok(api
            .get_opt(name)
            .await?
            .map(|s| merged(s.string_data, s.data)))
    }

    /// The downward API's files: fields of the pod (whole label and annotation maps as
    /// `key="value"` lines) and resources of a named container.
    fn render_downward(
        &self,
        volume: &str,
        items: &[DownwardAPIVolumeFile],
    ) -> Result<Vec<Rendered>, String> {
        let ip = self
            .sandbox
            .as_ref()
            .map(|s| s.ip.clone())
            .unwrap_or_default();
        let mut out = Vec::new();
        for item in items {
            let what = format!("volume {volume:?}: item {:?}", item.path);
            let content = if let Some(f) = &item.field_ref {
                match f.field_path.as_str() {
                    "metadata.labels" => map_lines(&self.pod.metadata.labels),
                    "metadata.annotations" => map_lines(&self.pod.metadata.annotations),
                    path => self.field(path, &ip).map_err(|e| format!("{what}: {e}"))?,
                }
            } else if let Some(r) = &item.resource_field_ref {
                let name = r.container_name.as_deref().unwrap_or_default();
                let c = self.container_named(name).ok_or_else(|| {
                    format!("{what}: resourceFieldRef needs the containerName of a container of the pod (got {name:?})")
                })?;
                let capacity = crate::node::capacity_quantities();
                super::env::resource_value(c, &r.resource, r.divisor.as_ref(), &capacity)
                    .map_err(|e| format!("{what}: {e}"))?
            } else {
                return Err(format!(
                    "{what}: names neither fieldRef nor resourceFieldRef"
                ));
            };
            out.push((item.path.clone(), content.into_bytes(), item.mode));
        }
        Ok(out)
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

    fn cm<'a>(items: &'a [KeyToPath], optional: bool) -> Part<'a> {
        Part::Object {
            kind: "configmap",
            name: "app",
            items,
            optional,
        }
    }

    fn one(part: Part<'_>, default_mode: Option<i32>) -> Written<'_> {
        Written {
            parts: vec![part],
            default_mode,
        }
    }

    fn data() -> Read {
        Read::Object(Some(
            [
                ("a".to_string(), b"1".to_vec()),
                ("b".to_string(), b"2".to_vec()),
            ]
            .into(),
        ))
    }

    #[test]
    fn every_key_or_the_items_at_their_paths_with_their_modes() {
        let all = files("v", &one(cm(&[], false), Some(0o600)), vec![data()]).unwrap();
        assert_eq!(all["a"], (b"1".to_vec(), 0o600));
        assert_eq!(all.len(), 2);
        let items = [KeyToPath {
            key: "b".into(),
            path: "conf/b.txt".into(),
            mode: Some(0o400),
        }];
        let some = files("v", &one(cm(&items, false), None), vec![data()]).unwrap();
        assert_eq!(some.len(), 1);
        assert_eq!(some["conf/b.txt"], (b"2".to_vec(), 0o400));
        // Projected: parts in order, the downward API's files with the default mode.
        let w = Written {
            parts: vec![cm(&[], false), Part::Downward(&[])],
            default_mode: None,
        };
        let both = files(
            "v",
            &w,
            vec![
                data(),
                Read::Downward(vec![("name".into(), b"p".to_vec(), None)]),
            ],
        )
        .unwrap();
        assert_eq!(both.len(), 3);
        assert_eq!(both["name"], (b"p".to_vec(), DEFAULT_MODE));
    }

    #[test]
    fn missing_sources_and_keys_and_bad_paths_are_named() {
        assert_eq!(
            files("v", &one(cm(&[], false), None), vec![Read::Object(None)]).unwrap_err(),
            "MountVolume.SetUp failed for volume \"v\" : configmap \"app\" not found"
        );
        assert!(
            files("v", &one(cm(&[], true), None), vec![Read::Object(None)])
                .unwrap()
                .is_empty()
        );
        let missing = [KeyToPath {
            key: "zz".into(),
            path: "zz".into(),
            mode: None,
        }];
        assert!(files("v", &one(cm(&missing, false), None), vec![data()])
            .unwrap_err()
            .contains("non-existent config key: zz"));
        let escape = [KeyToPath {
            key: "a".into(),
            path: "../etc/passwd".into(),
            mode: None,
        }];
        assert!(files("v", &one(cm(&escape, false), None), vec![data()])
            .unwrap_err()
            .contains("must not contain '..'"));
        assert!(files("v", &one(cm(&[], false), Some(0o1777)), vec![data()])
            .unwrap_err()
            .contains("defaultMode"));
        assert_eq!(
            map_lines(&Some(
                [("b".into(), "2".into()), ("a".into(), "x\"y".into())].into()
            )),
            "a=\"x\\\"y\"\nb=\"2\"\n"
        );
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
