//! The CNI specification as this plugin speaks it (1.0.0 and 1.1.0, and the 0.3.x/0.4.0
//! result format older runtimes ask for): the environment, the network configuration on
//! stdin, results, and errors with the spec's well-known codes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Versions whose configuration this plugin accepts and whose result format it writes.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

/// The spec's well-known error codes, and this plugin's own (100 and up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADD now.
    NotAvailable = 50,
    /// The pod CIDR has no free address.
    RangeExhausted = 100,
}

/// An error as the spec prints it on stdout.
#[derive(Debug, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code as u32, "msg": self.msg, "details": self.details})
    }
}

pub type Result<T> = std::result::Result<T, CniError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// What the runtime passes in the environment.
#[derive(Clone, Debug)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
}

fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// An interface name Linux accepts: 1-15 bytes, not `.` or `..`, no `/`, `:` or whitespace.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl Env {
    /// Reads and checks the variables the command needs (`get` is `std::env::var` in the
    /// binary, a map in tests).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<Env> {
        let bad = |msg: String| CniError::new(Code::InvalidEnvironment, "invalid environment", msg);
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some(other) => {
                return Err(bad(format!(
                    "CNI_COMMAND={other:?}: expected ADD, DEL, CHECK, VERSION, STATUS or GC"
                )))
            }
            None => return Err(bad("CNI_COMMAND is not set".into())),
        };
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = get("CNI_CONTAINERID").unwrap_or_default();
        let ifname = get("CNI_IFNAME").unwrap_or_default();
        let netns = get("CNI_NETNS").filter(|n| !n.is_empty());
        if per_container {
            if !valid_container_id(&container_id) {
                return Err(bad(format!(
                    "CNI_CONTAINERID={container_id:?}: must be set, start with a letter or digit and hold only letters, digits, _ . -"
                )));
            }
            if !valid_ifname(&ifname) {
                return Err(bad(format!(
                    "CNI_IFNAME={ifname:?}: must be 1-15 characters without /, : or spaces"
                )));
            }
            if command != Command::Del && netns.is_none() {
                return Err(bad(
                    "CNI_NETNS is not set: ADD and CHECK need the container's network namespace"
                        .into(),
                ));
            }
        }
        let mut args = BTreeMap::new();
        for pair in get("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|p| !p.is_empty())
        {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(bad(format!(
                    "CNI_ARGS: {pair:?} is not KEY=VALUE (pairs are separated by ;)"
                )));
            };
            args.insert(k.to_string(), v.to_string());
        }
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

/// The network configuration on stdin (one plugin of a conflist, as the runtime passes it).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The node's pod CIDR; addresses come from it (the first one is the gateway).
    #[serde(default, rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Where allocations are kept (default /var/lib/ferry/ipam).
    #[serde(default)]
    pub data_dir: Option<String>,
    /// Where ferry-proxy pins the datapath (default /sys/fs/bpf/ferry).
    #[serde(default)]
    pub bpf_dir: Option<String>,
    /// Without podCIDR: read it from this node's Node object (spec.podCIDR) through this
    /// kubeconfig, once (it is kept with the allocations).
    #[serde(default)]
    pub kubeconfig: Option<String>,
    /// The Node to read podCIDR from (default: the host name).
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// What the configuration says once checked.
#[derive(Clone, Debug)]
pub struct Network {
    pub version: String,
    pub name: String,
    pub cidr: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    pub data_dir: std::path::PathBuf,
    pub bpf_dir: std::path::PathBuf,
}

/// Fields of a network configuration this plugin knows (others are refused with code 2, so a
/// typo is not silently ignored). Keys of other plugins' capabilities are fine.
const KNOWN: &[&str] = &["args", "dns", "capabilities"];

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf> {
        serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                "cannot decode the network configuration",
                format!("{e} (stdin must be one JSON network configuration)"),
            )
        })
    }

    pub fn check_version(&self) -> Result<()> {
        if SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            Ok(())
        } else {
            Err(CniError::new(
                Code::IncompatibleVersion,
                "incompatible CNI version",
                format!(
                    "cniVersion {:?} is not supported; supported: {}",
                    self.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ))
        }
    }

    pub fn network(&self) -> Result<Network> {
        self.check_version()?;
        let invalid =
            |d: String| CniError::new(Code::InvalidConfig, "invalid network configuration", d);
        if self.name.is_empty() {
            return Err(invalid("name: required (the network's name)".into()));
        }
        if let Some(k) = self.other.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(CniError::new(
                Code::UnsupportedField,
                "unsupported field",
                format!("{k}: ferry-cni does not know this field (known: podCIDR, ipam.subnet, mtu, dataDir, bpfDir, kubeconfig, nodeName)"),
            ));
        }
        let subnet = self.pod_cidr.clone().or_else(|| {
            self.ipam
                .as_ref()
                .and_then(|i| i.get("subnet"))
                .and_then(|s| s.as_str())
                .map(String::from)
        });
        let Some(subnet) = subnet else {
            return Err(invalid(
                "podCIDR: required (the node's pod CIDR, e.g. \"10.244.1.0/24\"; or ipam.subnet; or a kubeconfig to read the Node's spec.podCIDR)"
                    .into(),
            ));
        };
        let cidr: Ipv4Network = subnet.parse().map_err(|_| {
            invalid(format!(
                "podCIDR: {subnet:?} is not an IPv4 CIDR such as 10.244.1.0/24"
            ))
        })?;
        if cidr.prefix() > 30 {
            return Err(invalid(format!(
                "podCIDR: {subnet} is too small; give at least a /30 (a gateway and a pod)"
            )));
        }
        if cidr.ip() != cidr.network() {
            return Err(invalid(format!(
                "podCIDR: {subnet} has host bits set; write {}/{}",
                cidr.network(),
                cidr.prefix()
            )));
        }
        let mtu = self.mtu.unwrap_or(1500);
        if !(576..=65535).contains(&mtu) {
            return Err(invalid(format!("mtu: {mtu} is outside 576-65535")));
        }
        Ok(Network {
            version: self.cni_version.clone(),
            name: self.name.clone(),
            gateway: Ipv4Addr::from(u32::from(cidr.network()) + 1),
            cidr,
            mtu,
            data_dir: self
                .data_dir
                .clone()
                .unwrap_or_else(|| "/var/lib/ferry/ipam".into())
                .into(),
            bpf_dir: self
                .bpf_dir
                .clone()
                .unwrap_or_else(|| "/sys/fs/bpf/ferry".into())
                .into(),
        })
    }
}

/// An ADD result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Added {
    pub host: Interface,
    pub pod: Interface,
    pub address: Ipv4Network,
    pub gateway: Ipv4Addr,
}

impl Added {
    /// The result in the format of `version` (0.3.x/0.4.0 name each IP's version).
    pub fn to_json(&self, version: &str) -> Value {
        let mut ip = json!({
            "address": self.address.to_string(),
            "gateway": self.gateway.to_string(),
            "interface": 1,
        });
        if version.starts_with("0.") {
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": version,
            "interfaces": [self.host, self.pod],
            "ips": [ip],
            "routes": [{"dst": "0.0.0.0/0", "gw": self.gateway.to_string()}],
            "dns": {},
        })
    }
}

/// The pod address a prevResult names on interface `ifname`, for CHECK.
pub fn prev_address(prev: &Value, ifname: &str) -> Result<Ipv4Network> {
    let bad = |d: String| CniError::new(Code::InvalidConfig, "invalid prevResult", d);
    let ifaces = prev["interfaces"].as_array().cloned().unwrap_or_default();
    let index = ifaces
        .iter()
        .position(|i| i["name"] == ifname && i["sandbox"].is_string())
        .ok_or_else(|| {
            bad(format!(
                "prevResult.interfaces: no sandbox interface named {ifname}"
            ))
        })?;
    prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|ip| ip["interface"].as_u64() == Some(index as u64))
        .and_then(|ip| ip["address"].as_str())
        .ok_or_else(|| bad(format!("prevResult.ips: no address on interface {index}")))?
        .parse()
        .map_err(|e| bad(format!("prevResult.ips: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env> {
        let m: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::read(|k| m.get(k).cloned())
    }

    #[test]
    fn environment_is_checked_as_the_spec_says() {
        let ok = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ])
        .unwrap();
        assert_eq!(ok.args["K8S_POD_NAME"], "web");
        for (vars, want) in [
            (vec![], "CNI_COMMAND is not set"),
            (vec![("CNI_COMMAND", "JUMP")], "expected ADD"),
            (
                vec![
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/x"),
                ],
                "CNI_CONTAINERID",
            ),
            (
                vec![
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_IFNAME", "a/b"),
                ],
                "CNI_IFNAME",
            ),
            (
                vec![
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_NETNS",
            ),
            (
                vec![
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_ARGS", "novalue"),
                ],
                "CNI_ARGS",
            ),
        ] {
            let e = env(&vars).unwrap_err();
            assert_eq!(e.code, Code::InvalidEnvironment);
            assert!(e.details.contains(want), "{vars:?}: {}", e.details);
        }
        // DEL without a netns is fine (the runtime may have lost it).
        assert!(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0")
        ])
        .is_ok());
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
    }

    #[test]
    fn configuration_errors_name_the_field() {
        let conf = |s: &str| NetConf::parse(s.as_bytes()).and_then(|c| c.network());
        let n = conf(r#"{"cniVersion":"1.0.0","name":"k8s","type":"ferry-cni","podCIDR":"10.244.1.0/24","mtu":1450}"#).unwrap();
        assert_eq!(n.gateway, Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(n.mtu, 1450);
        for (text, code, want) in [
            ("{", Code::Decode, "cannot decode"),
            (
                r#"{"cniVersion":"0.1.0","name":"k","type":"t","podCIDR":"10.0.0.0/24"}"#,
                Code::IncompatibleVersion,
                "0.1.0",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"","type":"t","podCIDR":"10.0.0.0/24"}"#,
                Code::InvalidConfig,
                "name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"k","type":"t"}"#,
                Code::InvalidConfig,
                "podCIDR: required",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"k","type":"t","podCIDR":"10.0.0.5/24"}"#,
                Code::InvalidConfig,
                "host bits",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"k","type":"t","podCIDR":"10.0.0.0/31"}"#,
                Code::InvalidConfig,
                "too small",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"k","type":"t","podCIDR":"10.0.0.0/24","mtuu":1}"#,
                Code::UnsupportedField,
                "mtuu",
            ),
        ] {
            let e = NetConf::parse(text.as_bytes())
                .and_then(|c| c.network())
                .unwrap_err();
            assert_eq!(e.code, code, "{text}");
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn results_follow_the_requested_version() {
        let a = Added {
            host: Interface {
                name: "fyabc".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                sandbox: None,
            },
            pod: Interface {
                name: "eth0".into(),
                mac: "11:22:33:44:55:66".into(),
                sandbox: Some("/run/netns/p".into()),
            },
            address: "10.244.1.5/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 244, 1, 1),
        };
        let v1 = a.to_json("1.0.0");
        assert_eq!(v1["ips"][0]["interface"], 1);
        assert!(v1["ips"][0].get("version").is_none());
        assert_eq!(v1["interfaces"][1]["sandbox"], "/run/netns/p");
        assert_eq!(a.to_json("0.4.0")["ips"][0]["version"], "4");
        assert_eq!(prev_address(&v1, "eth0").unwrap(), a.address);
        assert!(prev_address(&v1, "eth1").is_err());
    }
}
