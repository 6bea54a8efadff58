//! Where a Service becomes map entries: the incremental reconciler.
//!
//! `Reconciler` keeps a copy of what is installed in the datapath maps and, given a new
//! desired state, writes only the difference, in an order that a packet in flight never sees
//! a half-written frontend:
//! 1. backends (and the rev-NAT entry of a new frontend) first,
//! 2. then the frontend's slots 1..=N,
//! 3. then slot 0, whose count publishes the new set,
//! 4. then stale slots beyond the new count and backends nobody references any more.
//!
//! A backend keeps its slot while it stays, so adding or removing one endpoint writes a handful
//! of entries, not the whole Service. On restart the installed state is rebuilt from the pinned
//! maps, so an unchanged input writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use anyhow::{bail, Context as _, Result};
use ipnetwork::Ipv4Network;
use proxy_common::{
    limits, Backend, RevNat, ServiceKey, ServiceValue, PROTO_UDP, SVC_FLAG_AFFINITY,
    SVC_FLAG_SOURCE_RANGES,
};
use tracing::{debug, info, warn};

use crate::maps::{flush_affinity, flush_conntrack, DatapathMaps};
use crate::model::{BackendAddr, DesiredState, Frontend, FrontendSpec, Proto};

/// What one reconcile did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Map entries written or deleted.
    pub writes: u64,
    pub frontends_changed: u64,
    pub frontends_removed: u64,
    pub conntrack_flushed: u64,
}

/// Flows to forget, gathered over one write so the conntrack and affinity maps are scanned
/// once for all of them (a scan per removed frontend made removing 10,000 Services take minutes
/// with a full conntrack table).
#[derive(Debug, Default)]
struct Forget {
    /// Frontends (rev-NAT ids) gone: every flow and affinity of theirs.
    frontends: HashSet<u16>,
    /// (rev-NAT id, backend id): a backend left a frontend; its affinities, and its UDP flows.
    backends: HashSet<(u16, u32)>,
    udp: HashSet<(u16, u32)>,
    /// The same UDP backends by address (network order), for the sockets the socket programs
    /// connected to them.
    udp_addrs: HashSet<(u16, u32, u16)>,
}

impl Forget {
    fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.backends.is_empty()
    }
}

#[derive(Clone, Debug)]
struct InstalledFrontend {
    rev_nat_id: u16,
    header: ServiceValue,
    /// Backend id of slot i+1.
    slots: Vec<u32>,
    /// Source ranges in the source-range map under this frontend's rev-NAT id.
    ranges: BTreeSet<Ipv4Network>,
}

#[derive(Clone, Debug)]
struct InstalledBackend {
    id: u32,
    refs: u32,
}

/// Ids handed out from 1 (0 means none in the datapath), reusing freed ones.
#[derive(Debug)]
struct IdPool {
    next: u64,
    max: u64,
    free: Vec<u64>,
}

impl IdPool {
    fn new(max: u64) -> Self {
        Self {
            next: 1,
            max,
            free: Vec::new(),
        }
    }
    fn take(&mut self) -> Option<u64> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        (self.next <= self.max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
    fn give(&mut self, id: u64) {
        self.free.push(id);
    }
    /// Marks ids found in the maps as used.
    fn rebuild(&mut self, used: &BTreeSet<u64>) {
        self.next = used.iter().next_back().map_or(1, |m| m + 1);
        self.free = (1..self.next).filter(|i| !used.contains(i)).rev().collect();
    }
}

fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn from_be(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

fn service_key(fe: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey::new(be(fe.addr), fe.port.to_be(), fe.proto.number(), slot)
}

fn header_for(spec: &FrontendSpec, rev_nat_id: u16, count: u16) -> ServiceValue {
    let mut flags = 0;
    if spec.affinity_timeout.is_some() {
        flags |= SVC_FLAG_AFFINITY;
    }
    if spec.source_ranges.is_some() {
        flags |= SVC_FLAG_SOURCE_RANGES;
    }
    ServiceValue {
        backend_id: 0,
        count,
        flags,
        rev_nat_id,
        _pad: 0,
        affinity_timeout: spec.affinity_timeout.unwrap_or(0),
    }
}

/// Keeps each staying backend in its slot, fills holes with new backends, then compacts by
/// moving the last slot into any remaining hole.
fn assign_slots(old: &[u32], wanted: &[u32]) -> Vec<u32> {
    let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
    let old_set: BTreeSet<u32> = old.iter().copied().collect();
    let mut list: Vec<Option<u32>> = old
        .iter()
        .map(|id| wanted_set.contains(id).then_some(*id))
        .collect();
    let mut to_add: Vec<u32> = wanted
        .iter()
        .rev()
        .filter(|id| !old_set.contains(id))
        .copied()
        .collect();
    for slot in list.iter_mut().filter(|s| s.is_none()) {
        match to_add.pop() {
            Some(id) => *slot = Some(id),
            None => break,
        }
    }
    list.extend(to_add.into_iter().rev().map(Some));
    loop {
        while matches!(list.last(), Some(None)) {
            list.pop();
        }
        match list.iter().position(Option::is_none) {
            Some(i) => {
                let last = list.pop().flatten();
                list[i] = last;
            }
            None => break,
        }
    }
    list.into_iter().flatten().collect()
}

#[derive(Debug)]
pub struct Reconciler {
    frontends: BTreeMap<Frontend, InstalledFrontend>,
    backends: HashMap<BackendAddr, InstalledBackend>,
    backend_ids: IdPool,
    rev_nat_ids: IdPool,
    /// Frontend labels (`ns/name:port`) for metrics; not stored in the maps.
    labels: HashMap<u16, String>,
    /// Frontends per address (network order), mirrored as presence in the frontend address map.
    addr_refs: HashMap<u32, u32>,
    /// Cookies of sockets the socket programs sent to a UDP backend (or frontend) that is gone;
    /// the daemon destroys the connected ones (`sockets::destroy_udp`).
    stale_sockets: HashSet<u64>,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self {
            frontends: BTreeMap::new(),
            backends: HashMap::new(),
            backend_ids: IdPool::new(limits::BACKENDS as u64 * 16),
            rev_nat_ids: IdPool::new(limits::REV_NAT as u64 - 1),
            labels: HashMap::new(),
            stale_sockets: HashSet::new(),
            addr_refs: HashMap::new(),
        }
    }
}

impl Reconciler {
    /// Rebuilds the installed state from maps a previous daemon left pinned, and removes entries
    /// that no frontend references (left by a crash mid-write).
    pub fn recover(maps: &mut dyn DatapathMaps) -> Result<Self> {
        let mut r = Self::default();
        let backends: HashMap<u32, Backend> = maps.backends()?.into_iter().collect();
        let mut services: BTreeMap<(Frontend, u16), ServiceValue> = BTreeMap::new();
        let mut bad_keys = Vec::new();
        for (k, v) in maps.services()? {
            match Proto::from_number(k.proto) {
                Some(proto) => {
                    let fe = Frontend {
                        addr: from_be(k.addr),
                        port: u16::from_be(k.port),
                        proto,
                    };
                    services.insert((fe, k.slot), v);
                }
                None => bad_keys.push(k),
            }
        }
        let mut ranges: HashMap<u16, BTreeSet<Ipv4Network>> = HashMap::new();
        for (rev, net) in maps.source_ranges()? {
            ranges.entry(rev).or_default().insert(net);
        }
        let mut used_backends = BTreeSet::new();
        let mut used_revnat = BTreeSet::new();
        for ((fe, slot), header) in &services {
            if *slot != 0 {
                continue;
            }
            let mut slots = Vec::new();
            for s in 1..=header.count {
                let id = services.get(&(*fe, s)).map(|v| v.backend_id).unwrap_or(0);
                let Some(b) = backends.get(&id) else {
                    bail!("pinned service map is inconsistent: {fe} slot {s} names missing backend {id}; run `ferry-proxy --cleanup` and restart");
                };
                let addr = BackendAddr {
                    addr: from_be(b.addr),
                    port: u16::from_be(b.port),
                    proto: fe.proto,
                };
                r.backends
                    .entry(addr)
                    .or_insert(InstalledBackend { id, refs: 0 })
                    .refs += 1;
                used_backends.insert(id as u64);
                slots.push(id);
            }
            used_revnat.insert(header.rev_nat_id as u64);
            r.frontends.insert(
                *fe,
                InstalledFrontend {
                    rev_nat_id: header.rev_nat_id,
                    header: *header,
                    slots,
                    ranges: ranges.remove(&header.rev_nat_id).unwrap_or_default(),
                },
            );
        }
        // Frontend addresses: those of the recovered frontends (maps of a Ferry without this
        // map have none yet), and nothing else.
        for fe in r.frontends.keys() {
            *r.addr_refs.entry(be(fe.addr)).or_default() += 1;
        }
        let present: HashSet<u32> = maps.frontend_addrs()?.into_iter().map(|(a, _)| a).collect();
        for addr in r.addr_refs.keys() {
            if !present.contains(addr) {
                maps.set_frontend_addr(*addr, 1)?;
            }
        }
        for addr in present {
            if !r.addr_refs.contains_key(&addr) {
                maps.delete_frontend_addr(addr)?;
            }
        }
        // Garbage: slots past a count, backends and rev-NAT entries nobody references.
        for (fe, slot) in services.keys() {
            let count = r.frontends.get(fe).map_or(0, |f| f.slots.len() as u16);
            if *slot > count || !r.frontends.contains_key(fe) {
                maps.delete_service(service_key(fe, *slot))?;
            }
        }
        for k in bad_keys {
            maps.delete_service(k)?;
        }
        for id in backends.keys() {
            if !used_backends.contains(&(*id as u64)) {
                maps.delete_backend(*id)?;
            }
        }
        for (id, _) in maps.rev_nats()? {
            if !used_revnat.contains(&(id as u64)) {
                maps.delete_rev_nat(id)?;
            }
        }
        for (rev, nets) in ranges {
            for net in nets {
                maps.delete_source_range(rev, net)?;
            }
        }
        r.backend_ids.rebuild(&used_backends);
        r.rev_nat_ids.rebuild(&used_revnat);
        if !r.frontends.is_empty() {
            info!(
                frontends = r.frontends.len(),
                backends = r.backends.len(),
                "recovered datapath state from pinned maps"
            );
        }
        Ok(r)
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// `(rev_nat_id, label, frontend)` of every installed frontend.
    pub fn frontends(&self) -> impl Iterator<Item = (u16, &str, &Frontend)> {
        self.frontends.iter().map(|(fe, f)| {
            (
                f.rev_nat_id,
                self.labels.get(&f.rev_nat_id).map_or("", String::as_str),
                fe,
            )
        })
    }

    /// Refuses a change that would not fit the maps, before anything is written: `frontends`
    /// are written (new or changed), and `frontends_after` will be installed afterwards.
    /// Old and new entries of a changing frontend coexist for a moment: room is kept for both.
    fn check_capacity<'a>(
        &self,
        frontends: impl Iterator<Item = (&'a Frontend, &'a FrontendSpec)>,
        frontends_after: usize,
        full: bool,
    ) -> Result<()> {
        if frontends_after >= limits::REV_NAT as usize {
            bail!(
                "{frontends_after} frontends requested; the datapath holds at most {}: remove Services or ports",
                limits::REV_NAT - 1
            );
        }
        let mut slots = 0usize;
        let mut distinct = BTreeSet::new();
        for (fe, spec) in frontends {
            if spec.backends.len() > limits::MAX_BACKENDS_PER_SERVICE as usize {
                bail!(
                    "{} ({fe}): {} endpoints; the datapath holds at most {} per Service port",
                    spec.service,
                    spec.backends.len(),
                    limits::MAX_BACKENDS_PER_SERVICE
                );
            }
            slots += spec.backends.len() + 1;
            distinct.extend(spec.backends.iter().copied());
        }
        let installed_slots: usize = self.frontends.values().map(|f| f.slots.len() + 1).sum();
        // A full sync replaces everything (the installed entries it keeps are counted in
        // `slots`); a delta adds to what stays installed.
        let extra_slots = if full {
            installed_slots.min(slots)
        } else {
            installed_slots
        };
        if slots + extra_slots > limits::SERVICES as usize {
            bail!(
                "{} service-map entries requested; the datapath holds at most {}",
                slots + extra_slots,
                limits::SERVICES
            );
        }
        let extra_backends = if full {
            self.backends.len().min(distinct.len())
        } else {
            self.backends.len()
        };
        if distinct.len() + extra_backends > limits::BACKENDS as usize {
            bail!(
                "{} distinct endpoints requested; the datapath holds at most {}",
                distinct.len() + extra_backends,
                limits::BACKENDS
            );
        }
        Ok(())
    }

    /// Brings the maps to `desired`, writing only what differs.
    pub fn apply(
        &mut self,
        maps: &mut dyn DatapathMaps,
        desired: &DesiredState,
    ) -> Result<SyncStats> {
        self.check_capacity(desired.iter(), desired.len(), true)?;
        let gone: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|fe| !desired.contains_key(fe))
            .copied()
            .collect();
        self.write(maps, &gone, desired)
    }

    /// Applies a change of some frontends only: `removed` go, `upserts` are written (unchanged
    /// ones cost nothing). What is not named stays as it is.
    pub fn apply_delta(
        &mut self,
        maps: &mut dyn DatapathMaps,
        removed: &[Frontend],
        upserts: &DesiredState,
    ) -> Result<SyncStats> {
        let gone = removed
            .iter()
            .filter(|fe| self.frontends.contains_key(fe))
            .count();
        let added = upserts
            .keys()
            .filter(|fe| !self.frontends.contains_key(fe))
            .count();
        self.check_capacity(upserts.iter(), self.frontends.len() - gone + added, false)?;
        self.write(maps, removed, upserts)
    }

    fn write(
        &mut self,
        maps: &mut dyn DatapathMaps,
        removed: &[Frontend],
        upserts: &DesiredState,
    ) -> Result<SyncStats> {
        let mut stats = SyncStats::default();
        // Removed frontends first: frees ids and map room for the new ones (their flows are
        // forgotten before their rev-NAT ids can be handed out again).
        let mut forget = Forget::default();
        for fe in removed {
            self.remove_frontend(maps, fe, &mut forget, &mut stats)
                .with_context(|| format!("removing frontend {fe}"))?;
        }
        self.forget(maps, &mut forget, &mut stats)?;
        for (fe, spec) in upserts {
            self.apply_frontend(maps, fe, spec, &mut forget, &mut stats)
                .with_context(|| format!("programming {} ({fe})", spec.service))?;
        }
        self.forget(maps, &mut forget, &mut stats)?;
        Ok(stats)
    }

    /// One scan of each flow map for everything `forget` names; then the removed frontends'
    /// rev-NAT entries go and their ids are free again.
    fn forget(
        &mut self,
        maps: &mut dyn DatapathMaps,
        forget: &mut Forget,
        stats: &mut SyncStats,
    ) -> Result<()> {
        if forget.is_empty() {
            return Ok(());
        }
        let f = std::mem::take(forget);
        let udp_flushed = std::cell::Cell::new(0u64);
        let n = flush_conntrack(maps, |k, v| {
            if f.frontends.contains(&v.rev_nat_id) {
                return true;
            }
            let gone = k.proto == PROTO_UDP && f.udp.contains(&(v.rev_nat_id, v.backend_id));
            if gone {
                udp_flushed.set(udp_flushed.get() + 1);
            }
            gone
        })?;
        stats.conntrack_flushed += n as u64;
        if udp_flushed.get() > 0 {
            info!(
                entries = udp_flushed.get(),
                backends = f.udp.len(),
                "flushed UDP conntrack entries of removed backends"
            );
        }
        flush_affinity(maps, |k, v| {
            f.frontends.contains(&k.rev_nat_id)
                || f.backends.contains(&(k.rev_nat_id, v.backend_id))
        })?;
        // Sockets connected to what is gone: their reverse entries go, and the UDP ones are
        // destroyed by the daemon, so the application reconnects to a live backend. (TCP
        // connections to a removed backend live on, as under kube-proxy.)
        if !f.udp_addrs.is_empty() || !f.frontends.is_empty() {
            for (k, v) in maps.sock_rev()? {
                let gone_frontend = f.frontends.contains(&v.rev_nat_id);
                if gone_frontend || f.udp_addrs.contains(&(v.rev_nat_id, k.addr, k.port)) {
                    self.stale_sockets.insert(k.cookie);
                    maps.delete_sock_rev(k)?;
                }
            }
        }
        for rev in f.frontends {
            maps.delete_rev_nat(rev)?;
            stats.writes += 1;
            self.rev_nat_ids.give(rev as u64);
            self.labels.remove(&rev);
        }
        Ok(())
    }

    fn acquire_backend(
        &mut self,
        maps: &mut dyn DatapathMaps,
        addr: BackendAddr,
        stats: &mut SyncStats,
    ) -> Result<u32> {
        if let Some(b) = self.backends.get_mut(&addr) {
            b.refs += 1;
            return Ok(b.id);
        }
        let id = self.backend_ids.take().context("backend ids exhausted")? as u32;
        let value = Backend {
            addr: be(addr.addr),
            port: addr.port.to_be(),
            proto: addr.proto.number(),
            _pad: 0,
        };
        if let Err(e) = maps.set_backend(id, value) {
            self.backend_ids.give(id as u64);
            return Err(e);
        }
        stats.writes += 1;
        self.backends.insert(addr, InstalledBackend { id, refs: 1 });
        Ok(id)
    }

    fn backend_addr(&self, id: u32) -> Option<BackendAddr> {
        self.backends
            .iter()
            .find_map(|(addr, b)| (b.id == id).then_some(*addr))
    }

    /// The sockets found stale since the last call (see `stale_sockets`).
    pub fn take_stale_sockets(&mut self) -> HashSet<u64> {
        std::mem::take(&mut self.stale_sockets)
    }

    fn release_backend(
        &mut self,
        maps: &mut dyn DatapathMaps,
        id: u32,
        stats: &mut SyncStats,
    ) -> Result<()> {
        let Some((addr, b)) = self.backends.iter_mut().find(|(_, b)| b.id == id) else {
            warn!(id, "releasing a backend that is not installed");
            return Ok(());
        };
        b.refs -= 1;
        if b.refs == 0 {
            let addr = *addr;
            maps.delete_backend(id)?;
            stats.writes += 1;
            self.backends.remove(&addr);
            self.backend_ids.give(id as u64);
        }
        Ok(())
    }

    fn apply_frontend(
        &mut self,
        maps: &mut dyn DatapathMaps,
        fe: &Frontend,
        spec: &FrontendSpec,
        forget: &mut Forget,
        stats: &mut SyncStats,
    ) -> Result<()> {
        let existing = self.frontends.get(fe).cloned();
        // Unchanged? Compare without writing anything.
        if let Some(cur) = &existing {
            let ids: Option<BTreeSet<u32>> = spec
                .backends
                .iter()
                .map(|a| self.backends.get(a).map(|b| b.id))
                .collect();
            let cur_ids: BTreeSet<u32> = cur.slots.iter().copied().collect();
            let header = header_for(spec, cur.rev_nat_id, cur.slots.len() as u16);
            if ids.as_ref() == Some(&cur_ids)
                && header == cur.header
                && cur_ids.len() == cur.slots.len()
                && spec.source_ranges.clone().unwrap_or_default() == cur.ranges
            {
                self.labels.insert(cur.rev_nat_id, spec.service.clone());
                return Ok(());
            }
        }
        stats.frontends_changed += 1;
        let rev_nat_id = match &existing {
            Some(cur) => cur.rev_nat_id,
            None => {
                // Its address first: the program only looks up frontends at known addresses.
                let refs = self.addr_refs.entry(be(fe.addr)).or_default();
                if *refs == 0 {
                    maps.set_frontend_addr(be(fe.addr), 1)?;
                    stats.writes += 1;
                }
                *refs += 1;
                let id = self.rev_nat_ids.take().context("rev-NAT ids exhausted")? as u16;
                maps.reset_stats(id)?;
                maps.set_rev_nat(
                    id,
                    RevNat {
                        addr: be(fe.addr),
                        port: fe.port.to_be(),
                        _pad: 0,
                    },
                )?;
                stats.writes += 1;
                id
            }
        };
        self.labels.insert(rev_nat_id, spec.service.clone());
        let old_slots = existing
            .as_ref()
            .map(|c| c.slots.clone())
            .unwrap_or_default();
        let old_header = existing.as_ref().map(|c| c.header);
        // Track a new frontend at once, so a failure below leaves the bookkeeping truthful.
        let mut installed = existing.unwrap_or(InstalledFrontend {
            rev_nat_id,
            header: ServiceValue::default(),
            slots: Vec::new(),
            ranges: BTreeSet::new(),
        });
        // 0. Source ranges the new set adds, before a header can name them.
        let want_ranges = spec.source_ranges.clone().unwrap_or_default();
        for net in want_ranges.difference(&installed.ranges.clone()) {
            maps.set_source_range(rev_nat_id, *net)?;
            installed.ranges.insert(*net);
            stats.writes += 1;
        }

        // 1. Backends: take a reference on each wanted one (new ones are written now).
        let mut wanted = Vec::with_capacity(spec.backends.len());
        for addr in &spec.backends {
            wanted.push(self.acquire_backend(maps, *addr, stats)?);
        }
        let new_slots = assign_slots(&old_slots, &wanted);

        // 2. Slots 1..=N that differ.
        for (i, id) in new_slots.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                let value = ServiceValue {
                    backend_id: *id,
                    rev_nat_id,
                    ..Default::default()
                };
                maps.set_service(service_key(fe, i as u16 + 1), value)?;
                stats.writes += 1;
            }
        }
        // 3. Slot 0 publishes the count.
        let header = header_for(spec, rev_nat_id, new_slots.len() as u16);
        if old_header != Some(header) {
            maps.set_service(service_key(fe, 0), header)?;
            stats.writes += 1;
        }
        installed.header = header;
        installed.slots = new_slots.clone();
        // Ranges the new set dropped, once the header no longer needs them.
        for net in installed.ranges.clone().difference(&want_ranges) {
            maps.delete_source_range(rev_nat_id, *net)?;
            installed.ranges.remove(net);
            stats.writes += 1;
        }
        self.frontends.insert(*fe, installed);

        // 4. Stale slots, then references of the old set (the new set holds its own).
        for i in new_slots.len()..old_slots.len() {
            maps.delete_service(service_key(fe, i as u16 + 1))?;
            stats.writes += 1;
        }
        let kept: BTreeSet<u32> = new_slots.iter().copied().collect();
        for id in &old_slots {
            if !kept.contains(id) {
                // Its affinities and UDP flows go (at the end of the write), so clients move
                // to a live backend instead of sending into the void.
                forget.backends.insert((rev_nat_id, *id));
                if fe.proto.number() == PROTO_UDP {
                    forget.udp.insert((rev_nat_id, *id));
                    if let Some(addr) = self.backend_addr(*id) {
                        forget
                            .udp_addrs
                            .insert((rev_nat_id, be(addr.addr), addr.port.to_be()));
                    }
                }
            }
            self.release_backend(maps, *id, stats)?;
        }
        debug!(frontend = %fe, service = %spec.service, backends = new_slots.len(), "frontend programmed");
        Ok(())
    }

    fn remove_frontend(
        &mut self,
        maps: &mut dyn DatapathMaps,
        fe: &Frontend,
        forget: &mut Forget,
        stats: &mut SyncStats,
    ) -> Result<()> {
        let Some(cur) = self.frontends.get(fe).cloned() else {
            return Ok(());
        };
        // Slot 0 first: new flows stop matching before anything they need disappears.
        maps.delete_service(service_key(fe, 0))?;
        stats.writes += 1;
        for i in 1..=cur.slots.len() {
            maps.delete_service(service_key(fe, i as u16))?;
            stats.writes += 1;
        }
        for net in &cur.ranges {
            maps.delete_source_range(cur.rev_nat_id, *net)?;
            stats.writes += 1;
        }
        self.frontends.remove(fe);
        if let Some(refs) = self.addr_refs.get_mut(&be(fe.addr)) {
            *refs -= 1;
            if *refs == 0 {
                self.addr_refs.remove(&be(fe.addr));
                maps.delete_frontend_addr(be(fe.addr))?;
                stats.writes += 1;
            }
        }
        // Its flows, affinities and rev-NAT entry go with the others of this write.
        forget.frontends.insert(cur.rev_nat_id);
        for id in &cur.slots {
            self.release_backend(maps, *id, stats)?;
        }
        stats.frontends_removed += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
