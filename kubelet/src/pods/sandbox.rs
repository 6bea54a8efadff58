//! A pod's sandbox: its CRI configuration (DNS, hostname, ports, host network), its hosts file,
//! and creating it (CNI runs inside containerd) with a retry delay after a failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use kube::ResourceExt;

use crate::cri::v1 as cri;

use super::{dns, Worker, POD_NAME, POD_NAMESPACE, POD_UID};

pub(super) struct Sandbox {
    pub(super) id: String,
    pub(super) ip: String,
    pub(super) config: cri::PodSandboxConfig,
}

impl Worker {
    pub(super) fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    pub(super) fn sandbox_config(&self) -> Result<cri::PodSandboxConfig> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let mut port_mappings = Vec::new();
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            for p in c.ports.iter().flatten() {
                if let Some(hp) = p.host_port.filter(|hp| *hp > 0) {
                    port_mappings.push(cri::PortMapping {
                        protocol: match p.protocol.as_deref() {
                            Some("UDP") => cri::Protocol::Udp as i32,
                            Some("SCTP") => cri::Protocol::Sctp as i32,
                            _ => cri::Protocol::Tcp as i32,
                        },
                        container_port: p.container_port,
                        host_port: hp,
                        host_ip: p.host_ip.clone().unwrap_or_default(),
                    });
                }
            }
        }
        let labels: HashMap<String, String> = [
            (POD_UID, self.uid()),
            (POD_NAME, self.pod.name_any()),
            (POD_NAMESPACE, self.pod.namespace().unwrap_or_default()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let ns = self.pod.namespace().unwrap_or_default();
        let (hostname, _) =
            dns::hostname(&spec, &self.pod.name_any(), &ns, &self.k.dns.cluster_domain)
                .map_err(anyhow::Error::msg)?;
        let dns_config = dns::dns_config(&spec, &ns, &self.k.dns).map_err(anyhow::Error::msg)?;
        let network = if self.host_network() {
            cri::NamespaceMode::Node
        } else {
            cri::NamespaceMode::Pod
        };
        Ok(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.pod.name_any(),
                uid: self.uid(),
                namespace: self.pod.namespace().unwrap_or_default(),
                attempt: 0,
            }),
            hostname,
            dns_config: Some(dns_config),
            log_directory: self.pod_dir().join("logs").display().to_string(),
            port_mappings,
            labels,
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: network as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// The pod's managed hosts file, mounted at `/etc/hosts` in each of its containers.
    pub(super) fn hosts_path(&self) -> PathBuf {
        self.pod_dir().join("etc-hosts")
    }

    fn write_hosts(&self, ip: &str) -> Result<()> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let ns = self.pod.namespace().unwrap_or_default();
        let names = dns::hostname(&spec, &self.pod.name_any(), &ns, &self.k.dns.cluster_domain)
            .map_err(anyhow::Error::msg)?;
        let path = self.hosts_path();
        std::fs::create_dir_all(self.pod_dir())
            .with_context(|| format!("creating {}", self.pod_dir().display()))?;
        std::fs::write(&path, dns::hosts_file(&spec, ip, &names))
            .with_context(|| format!("writing {}", path.display()))
    }

    pub(super) async fn ensure_sandbox(&mut self) -> bool {
        if self.sandbox.is_some() {
            return true;
        }
        if self.sandbox_retry.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        let result = async {
            let volumes = self.volumes().map_err(anyhow::Error::msg)?;
            for (name, path) in &volumes {
                if path.starts_with(self.pod_dir()) {
                    std::fs::create_dir_all(path)
                        .with_context(|| format!("creating volume {name} at {}", path.display()))?;
                }
            }
            let config = self.sandbox_config()?;
            std::fs::create_dir_all(&config.log_directory)
                .with_context(|| format!("creating {}", config.log_directory))?;
            let id = self.cri.run_sandbox(config.clone()).await?;
            let (status, _) = self.cri.sandbox_status(&id).await?;
            let ip = if self.host_network() {
                self.k.node_ip.clone()
            } else {
                status.network.map(|n| n.ip).unwrap_or_default()
            };
            self.write_hosts(&ip)?;
            anyhow::Ok(Sandbox { id, ip, config })
        }
        .await;
        match result {
            Ok(s) => {
                tracing::info!(pod = %self.key, sandbox = %s.id, ip = %s.ip, "sandbox running");
                self.sandbox = Some(s);
                self.sandbox_error = None;
                true
            }
            Err(e) => {
                tracing::warn!(pod = %self.key, "creating the pod sandbox: {e:#}");
                self.event(
                    true,
                    "FailedCreatePodSandBox",
                    format!("Failed to create pod sandbox: {e:#}"),
                );
                self.sandbox_error = Some(format!("{e:#}"));
                self.sandbox_retry = Some(Instant::now() + Duration::from_secs(2));
                false
            }
        }
    }
}
