//! Per-frontend packet and byte counters (per CPU, summed by the daemon).

use crate::maps::STATS;

#[inline(always)]
pub fn count(rev_nat_id: u16, len: u32) {
    if let Some(s) = STATS.get_ptr_mut(rev_nat_id as u32) {
        let s = unsafe { &mut *s };
        s.packets += 1;
        s.bytes += len as u64;
    }
}
