//! Named network namespaces (`ip netns`), and running code or processes inside them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use anyhow::{Context as _, Result};

#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        // A leftover of a killed run with the same name would make `add` fail.
        let _ = crate::run("ip", &["netns", "del", name]);
        crate::run("ip", &["netns", "add", name])?;
        let ns = Self { name: name.into() };
        crate::run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub(crate) fn placeholder() -> Self {
        Self {
            name: String::new(),
        }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Moves the calling thread into this namespace (threads it starts later inherit it).
    pub fn enter(&self) -> Result<()> {
        let path = self.path();
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering the network namespace {}", self.name));
        }
        Ok(())
    }

    pub fn delete(&self) {
        if !self.name.is_empty() {
            let _ = crate::run("ip", &["netns", "del", &self.name]);
        }
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        in_netns(self, move || {
            std::fs::write(&path, &value).with_context(|| format!("sysctl {path}={value}"))
        })?
    }

    /// Starts a process in this namespace (network only: the mount namespace, and so bpffs,
    /// stays the caller's).
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        let f = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        let fd = f.as_raw_fd();
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {:?} in {}", cmd.get_program(), self.name))?;
        drop(f);
        Ok(child)
    }

    /// The names of this namespace's links that start with `prefix` (e.g. `fy`, ferry-cni's
    /// host ends).
    pub fn links(&self, prefix: &str) -> Result<Vec<String>> {
        let out = self.exec("ip", &["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with(prefix))
            .collect())
    }

    /// Runs a command in this namespace and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .spawn(
                Command::new(program)
                    .args(args)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped()),
            )?
            .wait_with_output()?;
        if !out.status.success() {
            anyhow::bail!(
                "{program} {} in {}: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Runs `f` on a thread that has entered `ns`; sockets it creates belong to `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let ns2 = ns.clone();
    std::thread::spawn(move || -> Result<T> {
        ns2.enter()?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {} panicked", ns.name))?
}
