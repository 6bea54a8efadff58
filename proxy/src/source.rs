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

/// Multi-document Kubernetes YAML in a file, re-read whenever its content changes.
pub struct FileSource {
    path: PathBuf,
    last: Option<Vec<u8>>,
    poll: Duration,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            last: None,
            poll: Duration::from_millis(200),
        }
    }
}

impl ServiceSource for FileSource {
    async fn next(&mut self) -> Result<Snapshot> {
        loop {
            // A missing or unreadable file is reported once per change, like bad content.
            let content = match tokio::fs::read(&self.path).await {
                Ok(c) => c,
                Err(e) => format!("\0unreadable: {e}").into_bytes(),
            };
            if self.last.as_ref() != Some(&content) {
                self.last = Some(content.clone());
                if let Some(err) = content.strip_prefix(b"\0unreadable: ") {
                    anyhow::bail!("{}: {}", self.path.display(), String::from_utf8_lossy(err));
                }
                let text = String::from_utf8(content)
                    .with_context(|| format!("{}: not UTF-8", self.path.display()))?;
                return parse_yaml(&text).with_context(|| format!("{}", self.path.display()));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    fn strictness(&self) -> Strictness {
        Strictness::File
    }
}
