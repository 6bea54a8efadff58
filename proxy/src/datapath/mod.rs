//! Loading the eBPF datapath, pinning it under bpffs and attaching it to interfaces.
//!
//! Layout under the pin directory (default /sys/fs/bpf/ferry):
//! - `maps/FERRY_*`: every map, reused by the next daemon, so conntrack survives a restart;
//! - `prog_ingress`, `prog_egress`: the tc programs (egress only translates replies the node
//!   itself sends back);
//! - `links/<ifname>`, `links-egress/<ifname>`: the TCX links of each attached interface. A
//!   restarted daemon swaps its new programs into the existing links atomically
//!   (bpf_link_update), so no packet goes untranslated;
//! - `sock/<program>`: the cgroup links of the socket programs (`socket_lb.rs`, connect-time load balancing),
//!   when they are on. A restarted daemon attaches its programs next to the old ones and then
//!   renames its pins over theirs, which detaches them: some program serves every connect.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{self, SchedClassifierLink, TcAttachType};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use ipnetwork::Ipv4Network;
use proxy_common::{
    names, AffinityKey, AffinityValue, Backend, CtKey, CtValue, RevNat, ServiceKey, ServiceStats,
    ServiceValue, SockRevKey, SockRevValue, SourceRangeKey, CONFIG_FLAGS, CONFIG_F_HOST_ROUTING,
    CONFIG_HAIRPIN_ADDR,
};
use tracing::{debug, info, warn};

mod socket_lb;
pub use socket_lb::cgroup2_root;

use crate::links::Link;
use crate::maps::DatapathMaps;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-ebpf"));

const BPFFS_MAGIC: i64 = 0xcafe4a11;

/// Mounts bpffs on /sys/fs/bpf when it is not mounted yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        return Ok(());
    }
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new("/sys/fs/bpf")?;
    fs::create_dir_all(root).ok();
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPFFS_MAGIC {
        return Ok(());
    }
    info!("mounting bpffs on /sys/fs/bpf");
    let fstype = std::ffi::CString::new("bpf")?;
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("mount -t bpf bpf /sys/fs/bpf (Ferry needs root)");
    }
    Ok(())
}

/// A map pinned by an earlier Ferry whose layout differs from this program's (a key or value
/// that grew, another size) cannot be reused: the program would read it with the wrong layout.
/// Such a pin is removed, with a warning, and the map starts empty (the daemon writes the
/// Services again; flows and affinities in it are lost). The old program keeps its own
/// reference until the new one replaces it in the links.
fn retire_incompatible_maps(map_dir: &Path) -> Result<()> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the eBPF object")?;
    for (name, def) in &object.maps {
        let pin = map_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let want = (def.key_size(), def.value_size(), def.max_entries());
        let have = aya::maps::MapData::from_pin(&pin)
            .and_then(|m| m.info())
            .map(|i| (i.key_size(), i.value_size(), i.max_entries()));
        match have {
            Ok(have) if have == want => {}
            Ok(have) => {
                warn!(map = %name, ?have, ?want, "pinned map has another layout (key, value, entries): starting it empty");
                fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            }
            Err(e) => {
                warn!(map = %name, error = %e, "pinned map unreadable: starting it empty");
                fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            }
        }
    }
    Ok(())
}

/// Where a program is attached on every interface, and where its links are pinned.
#[derive(Clone, Copy)]
struct Hook {
    program: &'static str,
    attach: TcAttachType,
    links: &'static str,
}

const HOOKS: [Hook; 2] = [
    Hook {
        program: names::PROG_INGRESS,
        attach: TcAttachType::Ingress,
        links: "links",
    },
    Hook {
        program: names::PROG_EGRESS,
        attach: TcAttachType::Egress,
        links: "links-egress",
    },
];

/// The loaded datapath: the programs and handles on every map.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    veth_peers: HashMap<MapData, u32, u32>,
    pub maps: Maps,
}

pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nat: HashMap<MapData, u16, RevNat>,
    ct: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    sock_rev: HashMap<MapData, SockRevKey, SockRevValue>,
    frontend_addrs: HashMap<MapData, u32, u32>,
    reply_addrs: HashMap<MapData, u32, u32>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    stats: PerCpuArray<MapData, ServiceStats>,
    config: Array<MapData, u32>,
    nr_cpus: usize,
}

/// A program of the object, as the kind it is (a tc classifier, a socket program).
fn program_of<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing"))?;
    Ok(prog.try_into()?)
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    /// Loads the program, reusing maps pinned by an earlier daemon.
    pub fn load(
        pin_dir: &Path,
        hairpin_addr: std::net::Ipv4Addr,
        host_routing: bool,
    ) -> Result<Self> {
        ensure_bpffs(pin_dir)?;
        let map_dir = pin_dir.join("maps");
        fs::create_dir_all(&map_dir).with_context(|| format!("creating {}", map_dir.display()))?;
        for hook in HOOKS {
            fs::create_dir_all(pin_dir.join(hook.links))?;
        }
        retire_incompatible_maps(&map_dir)?;
        let reused = fs::read_dir(&map_dir)?.count();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .load(EBPF_OBJECT)
            .with_context(|| {
                format!("loading the eBPF datapath (maps pinned under {}; if they come from an incompatible Ferry version, run `ferry-proxy --cleanup`)", map_dir.display())
            })?;
        for (name, pin) in [
            (names::PROG_INGRESS, "prog_ingress"),
            (names::PROG_EGRESS, "prog_egress"),
        ] {
            let prog: &mut SchedClassifier = program_of(&mut ebpf, name)?;
            prog.load().with_context(|| {
                format!("the kernel verifier rejected the datapath program {name}")
            })?;
            let prog_pin = pin_dir.join(pin);
            let _ = fs::remove_file(&prog_pin);
            prog.pin(&prog_pin).context("pinning the program")?;
        }
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let mut maps = Maps {
            services: take(&mut ebpf, names::SERVICES)?,
            backends: take(&mut ebpf, names::BACKENDS)?,
            rev_nat: take(&mut ebpf, names::REV_NAT)?,
            ct: take(&mut ebpf, names::CONNTRACK)?,
            affinity: take(&mut ebpf, names::AFFINITY)?,
            sock_rev: take(&mut ebpf, names::SOCK_REV)?,
            frontend_addrs: take(&mut ebpf, names::FRONTEND_ADDRS)?,
            reply_addrs: take(&mut ebpf, names::REPLY_ADDRS)?,
            source_ranges: take(&mut ebpf, names::SOURCE_RANGES)?,
            stats: take(&mut ebpf, names::STATS)?,
            config: take(&mut ebpf, names::CONFIG)?,
            nr_cpus,
        };
        maps.config
            .set(
                CONFIG_HAIRPIN_ADDR,
                u32::from_ne_bytes(hairpin_addr.octets()),
                0,
            )
            .context("writing the hairpin address")?;
        let flags = if host_routing {
            CONFIG_F_HOST_ROUTING
        } else {
            0
        };
        maps.config
            .set(CONFIG_FLAGS, flags, 0)
            .context("writing the datapath flags")?;
        info!(pin_dir = %pin_dir.display(), reused_maps = reused, host_routing, "datapath loaded");
        let veth_peers = take(&mut ebpf, names::VETH_PEERS)?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            veth_peers,
            maps,
        })
    }

    fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        program_of(&mut self.ebpf, name)
    }

    /// Runs the program once per `repeat` on `packet` in the kernel (BPF_PROG_TEST_RUN), for
    /// the datapath's unit tests and `cargo xtask bench prog`. The translated packet lands in
    /// `out`; the result carries the tc verdict and the mean run time.
    pub fn test_run(
        &mut self,
        packet: &[u8],
        out: &mut [u8],
        repeat: u32,
    ) -> Result<aya::programs::TestRunResult> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(out),
            repeat,
            ..TestRunOptions::new()
        };
        self.program(names::PROG_INGRESS)?
            .test_run(opts)
            .context("BPF_PROG_TEST_RUN of the datapath program")
    }

    /// Attaches the programs to the ingress and egress of `ifname`, replacing the programs of
    /// links an earlier daemon pinned (atomically), or creating and pinning new TCX links.
    pub fn attach(&mut self, link: &Link) -> Result<()> {
        let ifname = link.name.as_str();
        prepare_interface(ifname)?;
        // Pod veths receive redirected packets straight into the pod; stale ifindexes of
        // deleted links are harmless (the FIB never names them) and overwritten on reuse.
        if link.veth {
            self.veth_peers
                .insert(link.index, 1, 0)
                .map_err(err("veth map update"))?;
        } else {
            ignore_missing(self.veth_peers.remove(&link.index)).map_err(err("veth map delete"))?;
        }
        if let Err(e) = tc::qdisc_add_clsact(ifname) {
            // EEXIST is fine; TCX does not need the qdisc, but it lets `tc` users see the hook.
            debug!(ifname, error = %e, "clsact qdisc not added");
        }
        for hook in HOOKS {
            self.attach_hook(ifname, hook)?;
        }
        info!(ifname, "datapath attached");
        Ok(())
    }

    fn attach_hook(&mut self, ifname: &str, hook: Hook) -> Result<()> {
        let pin = self.pin_dir.join(hook.links).join(ifname);
        if pin.exists() {
            match self.replace_in_pinned_link(&pin, hook.program) {
                Ok(()) => {
                    debug!(
                        ifname,
                        hook = hook.links,
                        "program replaced in existing link"
                    );
                    return Ok(());
                }
                Err(e) => {
                    // The interface this link belonged to is gone (or was recreated).
                    debug!(ifname, error = %e, "stale link pin, attaching anew");
                    let _ = fs::remove_file(&pin);
                }
            }
        }
        let prog = self.program(hook.program)?;
        let id = prog
            .attach(ifname, hook.attach)
            .with_context(|| format!("attaching {} to {ifname}", hook.program))?;
        let link = prog.take_link(id)?;
        let fd: FdLink = link.try_into().map_err(|e| {
            anyhow!("{ifname}: link is not a TCX link ({e:?}); Ferry needs Linux >= 6.6")
        })?;
        fd.pin(&pin)
            .with_context(|| format!("pinning link {}", pin.display()))?;
        Ok(())
    }

    fn replace_in_pinned_link(&mut self, pin: &Path, program: &str) -> Result<()> {
        let pinned = PinnedLink::from_pin(pin)?;
        let fd: FdLink = pinned.into();
        let link = SchedClassifierLink::try_from(fd)?;
        let prog = self.program(program)?;
        let id = prog.attach_to_link(link)?;
        // The link stays pinned; give up our handle without detaching.
        let link = prog.take_link(id)?;
        let fd: FdLink = link.try_into().map_err(|e| anyhow!("{e:?}"))?;
        drop(fd);
        Ok(())
    }

    /// Removes link pins of interfaces that no longer exist or no longer match.
    pub fn forget_links_except(&self, keep: &BTreeSet<String>) {
        for hook in HOOKS {
            let Ok(dir) = fs::read_dir(self.pin_dir.join(hook.links)) else {
                continue;
            };
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    debug!(ifname = %name, hook = hook.links, "removing link pin");
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// Replies to NodePort clients leave the datapath with a node address as their source, and
/// are then forwarded: the kernel drops such packets as martians unless the interface they
/// arrive on accepts local sources. Strict reverse-path filtering would drop them too.
fn prepare_interface(ifname: &str) -> Result<()> {
    for (key, value) in [("accept_local", "1"), ("rp_filter", "0")] {
        let path = format!("/proc/sys/net/ipv4/conf/{ifname}/{key}");
        fs::write(&path, value).with_context(|| format!("setting {path} = {value}"))?;
    }
    Ok(())
}

/// Detaches everything and removes the pin directory (`ferry-proxy --cleanup`).
pub fn cleanup(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    // Unpinning a link drops its last reference, which detaches it from the interface.
    fs::remove_dir_all(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    info!(pin_dir = %pin_dir.display(), "datapath removed");
    Ok(())
}

fn err(what: &str) -> impl FnOnce(aya::maps::MapError) -> anyhow::Error + '_ {
    move |e| anyhow!("{what}: {e}")
}

impl Maps {
    /// The counters of one frontend, summed over CPUs.
    pub fn stats(&self, rev_nat_id: u16) -> Result<ServiceStats> {
        let v = self
            .stats
            .get(&(rev_nat_id as u32), 0)
            .map_err(err("reading stats"))?;
        Ok(v.iter().fold(ServiceStats::default(), |a, s| a.plus(*s)))
    }
}

impl DatapathMaps for Maps {
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        self.services
            .insert(key, value, 0)
            .map_err(err("service map update"))
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<()> {
        ignore_missing(self.services.remove(&key)).map_err(err("service map delete"))
    }
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.backends
            .insert(id, backend, 0)
            .map_err(err("backend map update"))
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.backends.remove(&id)).map_err(err("backend map delete"))
    }
    fn set_rev_nat(&mut self, id: u16, rev: RevNat) -> Result<()> {
        self.rev_nat
            .insert(id, rev, 0)
            .map_err(err("rev-NAT map update"))
    }
    fn delete_rev_nat(&mut self, id: u16) -> Result<()> {
        ignore_missing(self.rev_nat.remove(&id)).map_err(err("rev-NAT map delete"))
    }
    fn reset_stats(&mut self, id: u16) -> Result<()> {
        let zero = PerCpuValues::try_from(vec![ServiceStats::default(); self.nr_cpus])
            .map_err(|e| anyhow!("{e}"))?;
        self.stats
            .set(id as u32, zero, 0)
            .map_err(err("stats reset"))
    }
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err("service map dump"))
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err("backend map dump"))
    }
    fn rev_nats(&self) -> Result<Vec<(u16, RevNat)>> {
        self.rev_nat
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err("rev-NAT map dump"))
    }
    fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>> {
        // Entries may vanish (LRU) while we walk: skip those instead of failing the walk.
        Ok(self.ct.iter().filter_map(Result::ok).collect())
    }
    fn delete_conntrack(&mut self, key: CtKey) -> Result<()> {
        ignore_missing(self.ct.remove(&key)).map_err(err("conntrack delete"))
    }
    fn affinity(&self) -> Result<Vec<(AffinityKey, AffinityValue)>> {
        Ok(self.affinity.iter().filter_map(Result::ok).collect())
    }
    fn delete_affinity(&mut self, key: AffinityKey) -> Result<()> {
        ignore_missing(self.affinity.remove(&key)).map_err(err("affinity delete"))
    }
    fn set_frontend_addr(&mut self, addr: u32, frontends: u32) -> Result<()> {
        self.frontend_addrs
            .insert(addr, frontends, 0)
            .map_err(err("frontend address map update"))
    }
    fn delete_frontend_addr(&mut self, addr: u32) -> Result<()> {
        ignore_missing(self.frontend_addrs.remove(&addr))
            .map_err(err("frontend address map delete"))
    }
    fn frontend_addrs(&self) -> Result<Vec<(u32, u32)>> {
        self.frontend_addrs
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err("frontend address map dump"))
    }
    fn set_reply_addr(&mut self, addr: u32) -> Result<()> {
        self.reply_addrs
            .insert(addr, 1, 0)
            .map_err(err("reply address map update"))
    }
    fn delete_reply_addr(&mut self, addr: u32) -> Result<()> {
        ignore_missing(self.reply_addrs.remove(&addr)).map_err(err("reply address map delete"))
    }
    fn reply_addrs(&self) -> Result<Vec<u32>> {
        Ok(self.reply_addrs.keys().filter_map(Result::ok).collect())
    }
    fn sock_rev(&self) -> Result<Vec<(SockRevKey, SockRevValue)>> {
        Ok(self.sock_rev.iter().filter_map(Result::ok).collect())
    }
    fn delete_sock_rev(&mut self, key: SockRevKey) -> Result<()> {
        ignore_missing(self.sock_rev.remove(&key)).map_err(err("socket reverse map delete"))
    }
    fn set_source_range(&mut self, rev_nat_id: u16, range: Ipv4Network) -> Result<()> {
        self.source_ranges
            .insert(&range_key(rev_nat_id, range), 1, 0)
            .map_err(err("source range map update"))
    }
    fn delete_source_range(&mut self, rev_nat_id: u16, range: Ipv4Network) -> Result<()> {
        ignore_missing(self.source_ranges.remove(&range_key(rev_nat_id, range)))
            .map_err(err("source range map delete"))
    }
    fn source_ranges(&self) -> Result<Vec<(u16, Ipv4Network)>> {
        let mut out = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(err("source range map dump"))?;
            let data = key.data();
            let addr = std::net::Ipv4Addr::from(u32::from_be(data.addr));
            let prefix = key.prefix_len().saturating_sub(32) as u8;
            if let Ok(net) = Ipv4Network::new(addr, prefix) {
                out.push((data.rev_nat_id, net));
            }
        }
        Ok(out)
    }
}

/// The LPM key of a source range: 32 bits of rev-NAT id and padding, then the prefix.
fn range_key(rev_nat_id: u16, range: Ipv4Network) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        32 + range.prefix() as u32,
        SourceRangeKey {
            rev_nat_id,
            _pad: 0,
            addr: u32::from(range.network()).to_be(),
        },
    )
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map an older Ferry pinned with another key layout is not reused: the program would
    /// read it wrongly. Needs root (bpffs, bpftool); skipped otherwise.
    #[test]
    fn a_pinned_map_of_another_layout_is_replaced() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/ferry-retire-test-{}",
            std::process::id()
        ));
        ensure_bpffs(&dir).unwrap();
        fs::create_dir_all(dir.join("maps")).unwrap();
        let old = dir.join("maps").join(names::AFFINITY);
        let made = std::process::Command::new("bpftool")
            .args(["map", "create", old.to_str().unwrap(), "type", "lru_hash"])
            .args([
                "key",
                "8",
                "value",
                "16",
                "entries",
                "65536",
                "name",
                "FERRY_AFFINITY",
            ])
            .status()
            .expect("bpftool");
        assert!(made.success());
        let loaded = Datapath::load(&dir, std::net::Ipv4Addr::new(169, 254, 42, 1), false);
        let info = aya::maps::MapData::from_pin(&old).and_then(|m| m.info());
        drop(loaded);
        let _ = cleanup(&dir);
        let info = info.expect("the map is pinned again");
        assert_eq!(info.key_size() as usize, std::mem::size_of::<AffinityKey>());
    }
}
