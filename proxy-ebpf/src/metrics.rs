//! Per-frontend counters (per CPU, summed by the daemon): packets and bytes of the tc
//! programs, the socket programs' translations, refusals of either.

use proxy_common::ServiceStats;

use crate::maps::STATS;

#[inline(always)]
fn with(rev_nat_id: u16, f: impl FnOnce(&mut ServiceStats)) {
    if let Some(s) = STATS.get_ptr_mut(rev_nat_id as u32) {
        f(unsafe { &mut *s });
    }
}

/// A packet the tc programs sent to a backend.
#[inline(always)]
pub fn count(rev_nat_id: u16, len: u32) {
    with(rev_nat_id, |s| {
        s.packets += 1;
        s.bytes += len as u64;
    });
}

/// A connect (or datagram) the socket programs sent to a backend.
#[inline(always)]
pub fn count_socket(rev_nat_id: u16) {
    with(rev_nat_id, |s| s.sockets += 1);
}

/// A new flow or connect refused for want of an endpoint.
#[inline(always)]
pub fn count_refused(rev_nat_id: u16) {
    with(rev_nat_id, |s| s.refused += 1);
}
