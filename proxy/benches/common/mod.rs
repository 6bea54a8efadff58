//! What the proxy's API-driven benchmarks share (endpoint latency, DNS): an API client, the
//! Services they fill the cluster with, and the baseline they time a change against, a plain
//! watch in the benchmark process.

use std::collections::HashMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use ferry_testbed::controlplane::ControlPlane;
use futures::{StreamExt as _, TryStreamExt as _};
use kube::runtime::{watcher, WatchStreamExt as _};

/// A client with the identity of `<who>.kubeconfig`.
pub async fn client(cp: &ControlPlane, who: &str) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(cp.kubeconfig(who))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

/// The cluster IP of the benchmarks' Service `s<j>`.
pub fn vip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (j / 250) as u8, (j % 250 + 1) as u8)
}

/// Runs `create(j)` for every j below `n`, 32 requests in flight, saying every 2,000 how far
/// it got (`bench` names the benchmark, `what` the objects).
pub async fn create_all<F, Fut>(bench: &str, what: &str, n: usize, create: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|j| {
            let fut = create(j);
            async move {
                fut.await?;
                if (j + 1) % 2000 == 0 {
                    eprintln!(
                        "[bench {bench}] {} of {n} {what} created ({:.1} s)",
                        j + 1,
                        started.elapsed().as_secs_f64()
                    );
                }
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// When each object first showed up at a plain watch of `api`, by `key`: the API's own
/// delivery, without anything Ferry does.
pub struct FirstSeen {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FirstSeen {
    pub async fn watch<K>(
        api: kube::Api<K>,
        key: impl Fn(&K) -> Option<String> + Send + 'static,
    ) -> Self
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    {
        let seen: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut s = watcher(api, watcher::Config::default())
                    .applied_objects()
                    .boxed();
                while let Some(ev) = s.next().await {
                    match ev {
                        Ok(obj) => {
                            if let Some(k) = key(&obj) {
                                seen.lock().unwrap().entry(k).or_insert_with(Instant::now);
                            }
                        }
                        // The watcher retries by itself.
                        Err(e) => eprintln!("[bench] the baseline watch: {e}"),
                    }
                }
            })
        };
        // The watch's initial list.
        tokio::time::sleep(Duration::from_secs(2)).await;
        FirstSeen { seen, task }
    }

    /// How long after `since` the watch saw `key`, in milliseconds, waiting up to 200 ms.
    pub async fn after_ms(&self, key: &str, since: Instant) -> Option<f64> {
        for _ in 0..200 {
            if let Some(at) = self.seen.lock().unwrap().get(key) {
                return Some(at.duration_since(since).as_secs_f64() * 1e3);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        None
    }
}

impl Drop for FirstSeen {
    fn drop(&mut self) {
        self.task.abort();
    }
}
