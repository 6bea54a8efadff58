//! The CRI client: runtime.v1's RuntimeService and ImageService over a unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1;
pub use k8s_cri::v1::AuthConfig;

/// A connection to a CRI runtime. Clones share the connection.
#[derive(Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
    pub socket: PathBuf,
}

impl Cri {
    /// Connects to the runtime at `socket` and checks that it speaks runtime.v1.
    pub async fn connect(socket: &Path) -> Result<Cri> {
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: every connection goes to the socket.
        let channel = Endpoint::from_static("http://cri.invalid")
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .with_context(|| format!("connecting to the CRI socket {}", socket.display()))?;
        let mut cri = Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            socket: socket.to_path_buf(),
        };
        cri.version().await?;
        Ok(cri)
    }

    /// The runtime's name and version (`containerd 1.6.20`), runtime.v1 only.
    pub async fn version(&mut self) -> Result<String> {
        let v = self
            .runtime
            .version(api::VersionRequest {
                version: "v1".into(),
            })
            .await
            .with_context(|| {
                format!(
                    "CRI Version on {} (does the runtime serve runtime.v1?)",
                    self.socket.display()
                )
            })?
            .into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// Whether `image` is present on the node.
    pub async fn has_image(&mut self, image: &str) -> Result<bool> {
        let r = self
            .images
            .image_status(api::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await
            .with_context(|| format!("CRI ImageStatus {image}"))?
            .into_inner();
        Ok(r.image.is_some())
    }

    pub async fn run_sandbox(&mut self, config: api::PodSandboxConfig) -> Result<String> {
        let name = sandbox_name(&config);
        Ok(self
            .runtime
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .with_context(|| format!("CRI RunPodSandbox {name}"))?
            .into_inner()
            .pod_sandbox_id)
    }

    /// The sandbox's status and, from its verbose info, the path of its network namespace.
    pub async fn sandbox_status(
        &mut self,
        id: &str,
    ) -> Result<(api::PodSandboxStatus, Option<String>)> {
        let r = self
            .runtime
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            })
            .await
            .with_context(|| format!("CRI PodSandboxStatus {id}"))?
            .into_inner();
        let netns = r.info.get("info").and_then(|i| netns_path(i));
        let status = r
            .status
            .with_context(|| format!("CRI PodSandboxStatus {id}: no status in the answer"))?;
        Ok((status, netns))
    }

    pub async fn stop_sandbox(&mut self, id: &str) -> Result<()> {
        self.runtime
            .stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .with_context(|| format!("CRI StopPodSandbox {id}"))?;
        Ok(())
    }

    pub async fn remove_sandbox(&mut self, id: &str) -> Result<()> {
        self.runtime
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .with_context(|| format!("CRI RemovePodSandbox {id}"))?;
        Ok(())
    }

    /// Every sandbox the runtime knows, ready or not.
    pub async fn sandboxes(&mut self) -> Result<Vec<api::PodSandbox>> {
        Ok(self
            .runtime
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await
            .context("CRI ListPodSandbox")?
            .into_inner()
            .items)
    }

    /// Creates and starts a container in a sandbox; returns its id.
    pub async fn start_container(
        &mut self,
        sandbox_id: &str,
        sandbox: &api::PodSandboxConfig,
        config: api::ContainerConfig,
    ) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .runtime
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.into(),
                config: Some(config),
                sandbox_config: Some(sandbox.clone()),
            })
            .await
            .with_context(|| format!("CRI CreateContainer {name} in {sandbox_id}"))?
            .into_inner()
            .container_id;
        self.runtime
            .start_container(api::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("CRI StartContainer {name} ({id})"))?;
        Ok(id)
    }

    pub async fn container_status(&mut self, id: &str) -> Result<api::ContainerStatus> {
        self.runtime
            .container_status(api::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .with_context(|| format!("CRI ContainerStatus {id}"))?
            .into_inner()
            .status
            .with_context(|| format!("CRI ContainerStatus {id}: no status in the answer"))
    }
}

impl Cri {
    /// Asks the runtime to pull `image` from its registry, with `auth` when given. The
    /// runtime's message (the registry's reason) is the error.
    pub async fn pull_image(&mut self, image: &str, auth: Option<AuthConfig>) -> Result<String> {
        match self
            .images
            .pull_image(api::PullImageRequest {
                image: Some(image_spec(image)),
                auth,
                sandbox_config: None,
            })
            .await
        {
            Ok(r) => Ok(r.into_inner().image_ref),
            Err(status) => anyhow::bail!("{}", status.message()),
        }
    }

    /// Stops a container: SIGTERM, then SIGKILL after `timeout` seconds.
    pub async fn stop_container(&mut self, id: &str, timeout: i64) -> Result<()> {
        self.runtime
            .stop_container(api::StopContainerRequest {
                container_id: id.into(),
                timeout,
            })
            .await
            .with_context(|| format!("CRI StopContainer {id}"))?;
        Ok(())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<()> {
        self.runtime
            .remove_container(api::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .with_context(|| format!("CRI RemoveContainer {id}"))?;
        Ok(())
    }

    /// The containers of one sandbox.
    pub async fn containers(&mut self, sandbox_id: &str) -> Result<Vec<api::Container>> {
        Ok(self
            .runtime
            .list_containers(api::ListContainersRequest {
                filter: Some(api::ContainerFilter {
                    pod_sandbox_id: sandbox_id.into(),
                    ..Default::default()
                }),
            })
            .await
            .with_context(|| format!("CRI ListContainers in {sandbox_id}"))?
            .into_inner()
            .containers)
    }

    /// Runs `cmd` in a container and waits for it: (exit code, stdout + stderr).
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: Vec<String>,
        timeout: i64,
    ) -> Result<(i32, String)> {
        let r = self
            .runtime
            .exec_sync(api::ExecSyncRequest {
                container_id: id.into(),
                cmd,
                timeout,
            })
            .await
            .with_context(|| format!("CRI ExecSync in {id}"))?
            .into_inner();
        let mut out = String::from_utf8_lossy(&r.stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&r.stderr));
        Ok((r.exit_code, out))
    }
}

pub fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

fn sandbox_name(config: &api::PodSandboxConfig) -> String {
    config
        .metadata
        .as_ref()
        .map(|m| format!("{}/{}", m.namespace, m.name))
        .unwrap_or_default()
}

/// The network namespace path in containerd's verbose sandbox info (its OCI runtime spec).
fn netns_path(info: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(info).ok()?;
    v["runtimeSpec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_path_from_verbose_info() {
        let info = r#"{"pid":7,"runtimeSpec":{"linux":{"namespaces":[
            {"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1234"}]}}}"#;
        assert_eq!(netns_path(info).as_deref(), Some("/var/run/netns/cni-1234"));
        assert_eq!(
            netns_path(r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"network"}]}}}"#),
            None
        );
        assert_eq!(netns_path("not json"), None);
    }
}
