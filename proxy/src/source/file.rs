//! Multi-document Kubernetes YAML in a file, re-read whenever it changes.
//!
//! Changes are noticed at once through inotify on the file's directory, and by polling the
//! file's metadata as a fallback; the content is read only when the metadata changed. Each
//! document is known by the hash of its text, with the keys of the objects it defined (not the
//! objects: those live in the daemon's view), so a re-read parses only the documents whose text
//! changed and hands over only their objects, and deletions for the keys that disappeared:
//! a one-line change to a file of 10,000 Services costs one document, not the file.
//!
//! Reading the YAML itself is `yaml.rs`'s. A file is one consistent document: an EndpointSlice
//! naming a Service the file does not define, or an object defined twice, rejects the whole
//! read (the daemon keeps its state).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use k8s_openapi::api::core::v1::Node;
use nohash_hasher::{IntMap, IntSet};
use xxhash_rust::xxh3::xxh3_64;

use super::yaml::{parse_document, split_documents};
use super::{key_of, Change, Key, ServiceSource, Update};
use crate::model::SERVICE_NAME_LABEL;

pub struct FileSource {
    path: PathBuf,
    stamp: Option<Stamp>,
    /// The document hashes of the last content read (or why it could not be read), so each
    /// change is reported once.
    last: Option<Result<Vec<u64>, String>>,
    poll: Duration,
    changed: Arc<tokio::sync::Notify>,
    _watcher: Option<notify::RecommendedWatcher>,
    /// The documents of the last accepted read, by the hash of their text.
    docs: IntMap<u64, Document>,
    /// The hashes of the last accepted file's documents, in order.
    order: Vec<u64>,
    index: Index,
    /// Whether a read was accepted yet (the first hands over complete lists).
    listed: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Service,
    Slice,
}

/// What one document defined: object keys (a slice with the Service it names) and nodes.
#[derive(Default)]
struct Document {
    objects: Vec<(Kind, Key)>,
    slice_services: Vec<(Key, Option<Key>)>,
    nodes: Vec<Node>,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        let changed = Arc::new(tokio::sync::Notify::new());
        let watcher = Self::watch(&path, changed.clone())
            .map_err(
                |e| tracing::warn!(path = %path.display(), "no inotify watch, polling only: {e}"),
            )
            .ok();
        Self {
            path,
            stamp: None,
            last: None,
            poll: Duration::from_millis(500),
            changed,
            _watcher: watcher,
            docs: IntMap::default(),
            order: Vec::new(),
            index: Index::default(),
            listed: false,
        }
    }

    /// Watches the directory (editors and `mv` replace the file, which a watch on the file
    /// itself would lose).
    fn watch(
        path: &Path,
        changed: Arc<tokio::sync::Notify>,
    ) -> notify::Result<notify::RecommendedWatcher> {
        use notify::Watcher;
        let name = path.file_name().map(|n| n.to_os_string());
        let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
                {
                    changed.notify_one();
                }
            }
        })?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        w.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    }

    /// The file's stamp, and its content when the stamp is not `known` (one trip to the
    /// blocking pool for both).
    async fn fetch(
        &self,
        known: Option<Stamp>,
    ) -> (Option<Stamp>, Option<Result<Vec<u8>, String>>) {
        use std::os::unix::fs::MetadataExt;
        let path = self.path.clone();
        let work = move || {
            let stamp = std::fs::metadata(&path).ok().map(|m| Stamp {
                modified: m.modified().ok(),
                len: m.len(),
                inode: m.ino(),
            });
            if known.is_some() && stamp == known {
                return (stamp, None);
            }
            (stamp, Some(std::fs::read(&path).map_err(|e| e.to_string())))
        };
        tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| (None, Some(Err(format!("reading: {e}")))))
    }

    /// Turns a new content into the changes since the last accepted one. A document at the
    /// place it had costs a hash; only documents that moved, came or went are looked up, and
    /// only new ones parsed. Nothing changes unless the whole content is accepted.
    fn read(&mut self, docs: &[&[u8]], order: Vec<u64>) -> Result<Update> {
        // Places where the new file differs from the last (usually few).
        let differ: Vec<usize> = (0..order.len().max(self.order.len()))
            .filter(|&i| order.get(i) != self.order.get(i))
            .collect();
        let was: IntSet<u64> = differ
            .iter()
            .filter_map(|&i| self.order.get(i).copied())
            .collect();
        let now: IntSet<u64> = differ
            .iter()
            .filter_map(|&i| order.get(i).copied())
            .collect();
        let mut added: IntMap<u64, Document> = IntMap::default();
        let mut seen = IntSet::default();
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut nodes_changed = !self.listed;
        for &i in differ.iter().filter(|&&i| i < order.len()) {
            let (hash, doc) = (order[i], docs[i]);
            // The same text twice defines the same objects twice: twice among the places that
            // differ, or here and at a place that kept a document of the last file.
            let twice =
                !seen.insert(hash) || (self.docs.contains_key(&hash) && !was.contains(&hash));
            if twice {
                bail!(
                    "document {}: the same objects are defined twice in the input",
                    i + 1
                );
            }
            if self.docs.contains_key(&hash) {
                continue; // moved, not changed
            }
            let parsed = std::str::from_utf8(doc)
                .map_err(|e| anyhow!("not UTF-8: {e}"))
                .and_then(parse_document)
                .map_err(|e| anyhow!("document {}: {e:#}", i + 1))?;
            let mut d = Document {
                nodes: parsed.nodes,
                ..Default::default()
            };
            nodes_changed |= !d.nodes.is_empty();
            for s in parsed.services {
                d.objects.push((Kind::Service, key_of(&s.metadata)));
                services.push(s);
            }
            for s in parsed.slices {
                let k = key_of(&s.metadata);
                let names = s
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(|svc| (k.0.clone(), svc.clone()));
                d.objects.push((Kind::Slice, k.clone()));
                d.slice_services.push((k, names));
                slices.push(s);
            }
            added.insert(hash, d);
        }
        let removed: Vec<u64> = was.difference(&now).copied().collect();
        self.index
            .update(removed.iter().map(|h| &self.docs[h]), added.values())?;

        // Accepted: hand over the difference and remember this file.
        let mut update = Update::default();
        if self.listed {
            // Objects of removed documents are gone, unless a new document defines them now.
            let redefined: HashSet<&(Kind, Key)> =
                added.values().flat_map(|d| d.objects.iter()).collect();
            for d in removed.iter().map(|h| &self.docs[h]) {
                nodes_changed |= !d.nodes.is_empty();
                for o in d.objects.iter().filter(|o| !redefined.contains(o)) {
                    update.changes.push(match o {
                        (Kind::Service, key) => Change::Service(key.clone(), None),
                        (Kind::Slice, key) => Change::Slice(key.clone(), None),
                    });
                }
            }
            update.changes.extend(
                services
                    .into_iter()
                    .map(|s| Change::Service(key_of(&s.metadata), Some(Box::new(s)))),
            );
            update.changes.extend(
                slices
                    .into_iter()
                    .map(|s| Change::Slice(key_of(&s.metadata), Some(Box::new(s)))),
            );
        } else {
            update.changes = vec![Change::AllServices(services), Change::AllSlices(slices)];
        }
        for h in &removed {
            self.docs.remove(h);
        }
        self.docs.extend(added);
        self.order = order;
        self.listed = true;
        if nodes_changed {
            update.nodes = Some(self.docs.values().flat_map(|d| d.nodes.clone()).collect());
        }
        Ok(update)
    }
}

/// What the accepted file defines, kept up to date document by document, so a change is
/// checked at the cost of the documents it touches: every object defined once, every slice
/// naming a Service of the file.
#[derive(Default)]
struct Index {
    /// How many documents define each object (1 when consistent).
    defined: HashMap<(Kind, Key), u32>,
    /// How many slices name each Service.
    named: HashMap<Key, u32>,
}

impl Index {
    fn add(&mut self, d: &Document, by: i64) {
        for o in &d.objects {
            let n = self.defined.entry(o.clone()).or_default();
            *n = (*n as i64 + by) as u32;
            if *n == 0 {
                self.defined.remove(o);
            }
        }
        for svc in d.slice_services.iter().filter_map(|(_, s)| s.as_ref()) {
            let n = self.named.entry(svc.clone()).or_default();
            *n = (*n as i64 + by) as u32;
            if *n == 0 {
                self.named.remove(svc);
            }
        }
    }

    /// Takes `removed` documents out and `added` ones in; when the result is inconsistent,
    /// puts everything back and says why.
    fn update<'a>(
        &mut self,
        removed: impl Iterator<Item = &'a Document> + Clone,
        added: impl Iterator<Item = &'a Document> + Clone,
    ) -> Result<()> {
        removed.clone().for_each(|d| self.add(d, -1));
        added.clone().for_each(|d| self.add(d, 1));
        let check = self.check(removed.clone(), added.clone());
        if check.is_err() {
            added.for_each(|d| self.add(d, -1));
            removed.for_each(|d| self.add(d, 1));
        }
        check
    }

    fn check<'a>(
        &self,
        removed: impl Iterator<Item = &'a Document>,
        added: impl Iterator<Item = &'a Document>,
    ) -> Result<()> {
        let field = format!("metadata.labels[{SERVICE_NAME_LABEL}]");
        for d in added {
            for o @ (kind, key) in &d.objects {
                if self.defined.get(o).is_some_and(|n| *n > 1) {
                    let kind = match kind {
                        Kind::Service => "Service",
                        Kind::Slice => "EndpointSlice",
                    };
                    bail!(
                        "{kind} {}/{}: metadata.name: Duplicate value: defined twice in the input",
                        key.0,
                        key.1
                    );
                }
            }
            for (slice, names) in &d.slice_services {
                let Some(svc) = names else {
                    bail!(
                        "EndpointSlice {}/{}: {field}: Required value: the label naming the slice's Service is missing",
                        slice.0,
                        slice.1
                    );
                };
                if !self.defined.contains_key(&(Kind::Service, svc.clone())) {
                    bail!(
                        "EndpointSlice {}/{}: {field}: Not found: Service {}/{} does not exist in the input; add it or fix the label",
                        slice.0,
                        slice.1,
                        svc.0,
                        svc.1
                    );
                }
            }
        }
        for d in removed {
            for (kind, key) in &d.objects {
                let gone = !self.defined.contains_key(&(*kind, key.clone()));
                if *kind == Kind::Service && gone && self.named.contains_key(key) {
                    bail!(
                        "Service {}/{}: Not found: it was removed from the input but EndpointSlices still name it ({field}); remove them too, or keep the Service",
                        key.0,
                        key.1
                    );
                }
            }
        }
        Ok(())
    }
}

/// The non-empty documents of a content, and the hash of each.
fn documents(content: &[u8]) -> (Vec<&[u8]>, Vec<u64>) {
    let docs: Vec<&[u8]> = split_documents(content)
        .into_iter()
        .filter(|d| !d.trim_ascii().is_empty())
        .collect();
    let hashes = docs.iter().map(|d| xxh3_64(d)).collect();
    (docs, hashes)
}

impl ServiceSource for FileSource {
    async fn next(&mut self) -> Result<Update> {
        loop {
            let known = self.last.is_some().then_some(self.stamp).flatten();
            let (stamp, content) = self.fetch(known).await;
            // No await from here on: state changes only once the content is in hand, so a
            // cancelled call (by `select!`) loses nothing.
            if let Some(content) = content {
                self.stamp = stamp;
                let start = std::time::Instant::now();
                // Each document is known by its hash: the same hashes are the same content.
                let (docs, seen) = match &content {
                    Ok(c) => {
                        let (docs, hashes) = documents(c);
                        (docs, Ok(hashes))
                    }
                    Err(e) => (Vec::new(), Err(e.clone())),
                };
                // A missing or unreadable file is reported once per change, like bad content.
                if self.last.as_ref() != Some(&seen) {
                    self.last = Some(seen.clone());
                    let order = seen.map_err(|e| anyhow!("{}: {e}", self.path.display()))?;
                    let update = self
                        .read(&docs, order)
                        .with_context(|| format!("{}", self.path.display()))?;
                    tracing::debug!(
                        documents = self.docs.len(),
                        changes = update.changes.len(),
                        took_ms = start.elapsed().as_secs_f64() * 1e3,
                        "services file read"
                    );
                    return Ok(update);
                }
            }
            // Whichever comes first: an inotify event or the poll period.
            let _ = tokio::time::timeout(self.poll, self.changed.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::task::Poll;

    use super::*;

    impl FileSource {
        fn read_text(&mut self, text: &str) -> Result<Update> {
            let (docs, hashes) = documents(text.as_bytes());
            self.read(&docs, hashes)
        }
    }

    fn svc(name: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n")
    }

    const WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.3]}]
";

    fn names(u: &Update) -> Vec<String> {
        u.changes
            .iter()
            .map(|c| match c {
                Change::Service(k, Some(_)) => format!("+svc {}", k.1),
                Change::Service(k, None) => format!("-svc {}", k.1),
                Change::Slice(k, Some(_)) => format!("+slice {}", k.1),
                Change::Slice(k, None) => format!("-slice {}", k.1),
                Change::AllServices(v) => format!("services {}", v.len()),
                Change::AllSlices(v) => format!("slices {}", v.len()),
            })
            .collect()
    }

    #[test]
    fn a_reread_hands_over_only_what_changed() {
        let mut src = FileSource::new(PathBuf::from("/nonexistent/services.yaml"));
        let first = src.read_text(WEB).unwrap();
        assert_eq!(names(&first), ["services 1", "slices 1"]);
        let moved = WEB.replace("10.244.1.3", "10.244.1.9");
        assert_eq!(names(&src.read_text(&moved).unwrap()), ["+slice web-1"]);
        assert!(src.read_text(&moved).unwrap().changes.is_empty());
        let grown = format!("{moved}---\n{}", svc("extra"));
        assert_eq!(names(&src.read_text(&grown).unwrap()), ["+svc extra"]);
        assert_eq!(names(&src.read_text(&moved).unwrap()), ["-svc extra"]);
        // Documents that only move cost nothing; one repeated, moved or not, is refused.
        let mut parts: Vec<&str> = grown.split("---\n").collect();
        parts.reverse();
        assert_eq!(names(&src.read_text(&grown).unwrap()), ["+svc extra"]);
        assert!(src
            .read_text(&parts.join("---\n"))
            .unwrap()
            .changes
            .is_empty());
        let repeated = format!("{}---\n{}", parts.join("---\n"), parts[0]);
        let err = format!("{:#}", src.read_text(&repeated).unwrap_err());
        assert!(err.contains("defined twice"), "{err}");
        let first_again = format!("{}---\n{}", parts.join("---\n"), parts[2]);
        assert!(src.read_text(&first_again).is_err());
        assert_eq!(names(&src.read_text(&moved).unwrap()), ["-svc extra"]);
        // Errors name the document, and leave the known state as it was.
        let err = src
            .read_text(&format!("{moved}---\nkind: [\n"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("document 3"), "{err:#}");
        assert!(src.read_text(&moved).unwrap().changes.is_empty());
    }

    #[test]
    fn a_file_must_be_consistent() {
        let mut src = FileSource::new(PathBuf::from("/nonexistent/services.yaml"));
        let orphan = WEB.replace(
            "kubernetes.io/service-name: web",
            "kubernetes.io/service-name: nope",
        );
        let err = format!("{:#}", src.read_text(&orphan).unwrap_err());
        assert!(
            err.contains("metadata.labels[kubernetes.io/service-name]") && err.contains("nope"),
            "{err}"
        );
        let twice = format!(
            "{WEB}---\n{}",
            WEB.split("---")
                .next()
                .unwrap()
                .replace("10.96.0.10", "10.96.0.11")
        );
        let err = format!("{:#}", src.read_text(&twice).unwrap_err());
        assert!(err.contains("defined twice"), "{err}");
        // Accepted, then the Service goes while its slice stays: refused, state kept.
        assert_eq!(
            names(&src.read_text(WEB).unwrap()),
            ["services 1", "slices 1"]
        );
        let slice_only = WEB.split("---\n").nth(1).unwrap();
        let err = format!("{:#}", src.read_text(slice_only).unwrap_err());
        assert!(err.contains("EndpointSlices still name it"), "{err}");
        assert!(src.read_text(WEB).unwrap().changes.is_empty());
        // Both go together: two deletions.
        let none = "# nothing\n";
        assert_eq!(
            names(&src.read_text(none).unwrap()),
            ["-svc web", "-slice web-1"]
        );
        assert!(src
            .read_text("apiVersion: v1\nkind: Service\n metadata: [")
            .is_err());
    }

    /// `next` is polled in a `select!` that often cancels it: every change must arrive
    /// exactly once, whatever point a call was dropped at.
    #[tokio::test(start_paused = true)]
    async fn changes_survive_cancellation() {
        let dir = std::env::temp_dir().join(format!("ferry-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.yaml");
        std::fs::write(&path, svc("a")).unwrap();
        let mut src = FileSource::new(path.clone());
        let first = src.next().await.unwrap();
        assert_eq!(names(&first), ["services 1", "slices 0"]);
        let mut previous = "a";
        for name in ["b", "c", "d"] {
            let tmp = dir.join("tmp");
            std::fs::write(&tmp, svc(name)).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            let mut got = Vec::new();
            // Call k is polled k times, yielding between polls (so reads in the blocking pool
            // may finish), then dropped.
            for polls in 0..24 {
                let mut call = pin!(src.next());
                for _ in 0..polls {
                    if let Poll::Ready(r) = futures::poll!(call.as_mut()) {
                        got.push(r.unwrap());
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }
            // Then a call that may wait (paused time: a wait ends as soon as nothing else can
            // happen, so this is quick when everything was delivered already).
            if let Ok(r) = tokio::time::timeout(Duration::from_secs(5), src.next()).await {
                got.push(r.unwrap());
            }
            let seen: Vec<Vec<String>> = got.iter().map(names).collect();
            assert_eq!(
                seen,
                [vec![format!("-svc {previous}"), format!("+svc {name}")]],
                "change to {name}"
            );
            previous = name;
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
