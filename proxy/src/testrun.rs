//! The datapath program run on packets in the kernel (BPF_PROG_TEST_RUN), with its own maps:
//! what the datapath's unit tests (`proxy/tests/prog.rs`) and `cargo xtask bench prog` stand on.
//!
//! A `TestBed` loads the real object under a pin directory of its own (never the daemon's),
//! fills the maps through the same `DatapathMaps` interface the reconciler uses, and removes
//! everything when dropped.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, Result};
use proxy_common::{Backend, RevNat, ServiceKey, ServiceValue, SVC_FLAG_AFFINITY};

use crate::datapath::{self, Datapath};
use crate::maps::DatapathMaps;

/// A frontend for `TestBed::add_service`.
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// ClientIP affinity timeout in seconds.
    pub affinity: Option<u32>,
}

/// What one run did: the tc verdict, the packet as it left the program, and the run time the
/// kernel measured around the program.
pub struct Outcome {
    pub verdict: i32,
    pub packet: Vec<u8>,
    pub ns: u64,
}

pub struct TestBed {
    pub datapath: Datapath,
    pin_dir: PathBuf,
    next_backend: u32,
    next_rev_nat: u16,
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

impl TestBed {
    /// Loads the datapath with `hairpin` as its hairpin address, host routing off.
    pub fn new(hairpin: Ipv4Addr) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/ferry-testrun-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let datapath = match Datapath::load(&pin_dir, hairpin, false) {
            Ok(d) => d,
            Err(e) => {
                let _ = datapath::cleanup(&pin_dir);
                return Err(e).context("loading the datapath for a test run (needs root)");
            }
        };
        Ok(Self {
            datapath,
            pin_dir,
            next_backend: 1,
            next_rev_nat: 1,
        })
    }

    /// Installs a frontend and its backends as the reconciler would (address, rev-NAT,
    /// backends, slots, then the header); returns the rev-NAT id.
    pub fn add_service(&mut self, fe: &Frontend, backends: &[(Ipv4Addr, u16)]) -> Result<u16> {
        let rev_nat_id = self.next_rev_nat;
        self.next_rev_nat += 1;
        let maps = &mut self.datapath.maps;
        maps.set_frontend_addr(be(fe.addr), 1)?;
        maps.set_rev_nat(
            rev_nat_id,
            RevNat {
                addr: be(fe.addr),
                port: fe.port.to_be(),
                _pad: 0,
            },
        )?;
        for (slot, (addr, port)) in backends.iter().enumerate() {
            let id = self.next_backend;
            self.next_backend += 1;
            maps.set_backend(
                id,
                Backend {
                    addr: be(*addr),
                    port: port.to_be(),
                    proto: fe.proto,
                    _pad: 0,
                },
            )?;
            maps.set_service(
                ServiceKey::new(be(fe.addr), fe.port.to_be(), fe.proto, slot as u16 + 1),
                ServiceValue {
                    backend_id: id,
                    rev_nat_id,
                    ..Default::default()
                },
            )?;
        }
        maps.set_service(
            ServiceKey::new(be(fe.addr), fe.port.to_be(), fe.proto, 0),
            ServiceValue {
                backend_id: 0,
                count: backends.len() as u16,
                flags: if fe.affinity.is_some() {
                    SVC_FLAG_AFFINITY
                } else {
                    0
                },
                rev_nat_id,
                _pad: 0,
                affinity_timeout: fe.affinity.unwrap_or(0),
            },
        )?;
        Ok(rev_nat_id)
    }

    /// The names of the maps the object pinned (every map of the object is pinned).
    pub fn pinned_maps(&self) -> Result<Vec<String>> {
        let dir = self.pin_dir.join("maps");
        let mut names = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    /// Runs the program once on `packet`. (Once per call: the kernel's own `repeat` reruns
    /// the program on the buffer it has already translated, which is another path.)
    pub fn run(&mut self, packet: &[u8]) -> Result<Outcome> {
        let mut out = vec![0u8; packet.len() + 256];
        let r = self.datapath.test_run(packet, &mut out, 1)?;
        out.truncate(r.data_size_out as usize);
        Ok(Outcome {
            verdict: r.return_value as i32,
            packet: out,
            ns: r.duration.as_nanos() as u64,
        })
    }
}

/// An empty tc program, run the same way: the floor under every figure of the datapath's.
pub struct Floor {
    ebpf: aya::Ebpf,
}

const FLOOR_PROG: &str = "ferry_floor";
static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-ebpf-floor"));

impl Floor {
    pub fn new() -> Result<Self> {
        let mut ebpf = aya::Ebpf::load(FLOOR_OBJECT).context("loading the empty program")?;
        let prog: &mut aya::programs::SchedClassifier = ebpf
            .program_mut(FLOOR_PROG)
            .context("ferry_floor missing from its object")?
            .try_into()?;
        prog.load().context("loading the empty program")?;
        Ok(Self { ebpf })
    }

    /// Runs the empty program once on `packet`; the kernel's measured nanoseconds.
    pub fn run(&self, packet: &[u8]) -> Result<u64> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let prog: &aya::programs::SchedClassifier = self
            .ebpf
            .program(FLOOR_PROG)
            .context("ferry_floor missing from its object")?
            .try_into()?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            ..TestRunOptions::new()
        })?;
        Ok(r.duration.as_nanos() as u64)
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        if let Err(e) = datapath::cleanup(&self.pin_dir) {
            tracing::warn!(error = %e, "removing the test bed's pins");
        }
    }
}
