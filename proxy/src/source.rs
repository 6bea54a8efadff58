//! Where Services and EndpointSlices come from. The daemon sees them only through
//! `ServiceSource`; today a YAML file, later the Kubernetes API.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::model::{parse_yaml, Snapshot, Strictness};

pub trait ServiceSource: Send {
    /// Waits for the next complete view. An `Err` is bad input: the daemon reports it and keeps
    /// its last good state. Must be cancel-safe (it is polled in a `select!`).
    fn next(&mut self) -> impl Future<Output = Result<Snapshot>> + Send;
    /// How strictly the view is checked (see `Strictness`).
    fn strictness(&self) -> Strictness;
}

/// Multi-document Kubernetes YAML in a file, re-read whenever it changes. The file's metadata is
/// polled (cheap even for a large file); its content is read only when that changes, and parsed
/// only when the content differs.
pub struct FileSource {
    path: PathBuf,
    stamp: Option<Stamp>,
    last: Option<Result<Vec<u8>, String>>,
    poll: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            stamp: None,
            last: None,
            poll: Duration::from_millis(200),
        }
    }

    async fn stamp(&self) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = tokio::fs::metadata(&self.path).await.ok()?;
        Some(Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        })
    }
}

impl ServiceSource for FileSource {
    async fn next(&mut self) -> Result<Snapshot> {
        loop {
            let stamp = self.stamp().await;
            if self.last.is_none() || stamp != self.stamp || stamp.is_none() {
                self.stamp = stamp;
                let content = tokio::fs::read(&self.path).await.map_err(|e| e.to_string());
                // A missing or unreadable file is reported once per change, like bad content.
                if self.last.as_ref() != Some(&content) {
                    self.last = Some(content.clone());
                    let content =
                        content.map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
                    let text = String::from_utf8(content)
                        .with_context(|| format!("{}: not UTF-8", self.path.display()))?;
                    return parse_yaml(&text).with_context(|| format!("{}", self.path.display()));
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    fn strictness(&self) -> Strictness {
        Strictness::File
    }
}
