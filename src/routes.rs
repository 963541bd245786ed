//! Learned session routes (pure Rust, no FFI): session key -> server, in a fixed-size region
//! of shared memory, with an idle timeout and least-recently-used eviction.
//!
//! The region holds a [`Header`], a bucket array and an entry array; links are `u32`
//! indices, never pointers, so the table works at whatever address each process maps it.
//! The caller serialises access (the glue holds the shared zone's mutex).
//!
//! Keys are keyed hashes of session ids ([`crate::session::session_key`]); values are
//! hashes of server addresses, so a route survives a reload that reorders or adds servers.
//!
//! Each worker also keeps [`RecentRoutes`]: the routes it found in the table this second,
//! valid while the table's change count ([`RouteTable::changes`]) stays the same, so that a
//! busy session's requests after its first in a second need neither the lock nor the table.

use bytemuck::{Pod, Zeroable};

const MAGIC: u64 = 0x6b796c_696e_7274_02; // "kylinrt" v2 (v2 added `changes`)
const NIL: u32 = u32::MAX;

/// Table-wide state and statistics, at the start of the region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct Header {
    magic: u64,
    capacity: u32,
    nbuckets: u32,
    len: u32,
    free_head: u32,
    lru_head: u32,
    lru_tail: u32,
    /// Secret for the keyed session hash, chosen when the zone is created.
    pub secret: [u64; 2],
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: u64,
    pub expired: u64,
    /// When eviction was last logged (seconds), for rate limiting.
    pub evict_logged_at: i64,
    /// Evictions not yet logged.
    pub evict_unlogged: u64,
    /// How many times a route was removed or changed its server or its time of sharing (see
    /// [`RecentRoutes`]); wraps.
    changes: u64,
}

/// Where a table's magic number and secret lie in its region: both are written once, when
/// the table is formatted, so they may be read without the zone's lock.
pub const MAGIC_OFFSET: usize = core::mem::offset_of!(Header, magic);
pub const SECRET_OFFSET: usize = core::mem::offset_of!(Header, secret);

/// Whether `magic` (read at [`MAGIC_OFFSET`]) marks a formatted table.
pub fn is_table(magic: u64) -> bool {
    magic == MAGIC
}

/// One route (fields private to this module).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct Entry {
    key: [u64; 2],
    peer: u64,
    last_used: i64,
    prev: u32,
    next: u32,
    chain: u32,
    /// When the route was last written to the session store (seconds, truncated to 32
    /// bits); 0 when it must be written again (never written, or the write failed).
    shared_at: u32,
}

const HEADER: usize = core::mem::size_of::<Header>();
const ENTRY: usize = core::mem::size_of::<Entry>();

/// Why a region cannot hold a table.
#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    TooSmall,
    Misaligned,
}

impl core::fmt::Display for RouteError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            RouteError::TooSmall => "the zone is too small for a session route table",
            RouteError::Misaligned => "the session route region is misaligned",
        })
    }
}

/// What an insert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    New,
    Updated,
    /// New, after evicting the least recently used route to make room.
    Evicted,
}

/// See [`RouteTable::share_interval`].
pub const SHARE_EVERY: i64 = 300;

/// The table over a region.
pub struct RouteTable<'a> {
    hdr: &'a mut Header,
    buckets: &'a mut [u32],
    entries: &'a mut [Entry],
}

/// Where a formatted table's arrays lie in its region: byte offsets from the region's start
/// and the number of entries. Fixed once the region is formatted, so a caller can keep it
/// and rebuild the table with [`RouteTable::from_parts`] without checking the region again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub capacity: usize,
    pub buckets_at: usize,
    pub entries_at: usize,
}

fn layout_for(capacity: usize) -> Layout {
    Layout { capacity, buckets_at: HEADER, entries_at: HEADER + (capacity * 4).next_multiple_of(8) }
}

/// How many routes a region of `bytes` holds.
pub fn capacity_for(bytes: usize) -> usize {
    bytes.saturating_sub(HEADER + 8) / (ENTRY + 4)
}

fn split(region: &mut [u8], capacity: usize) -> Result<(&mut Header, &mut [u32], &mut [Entry]), RouteError> {
    if region.as_ptr() as usize % 8 != 0 {
        return Err(RouteError::Misaligned);
    }
    let l = layout_for(capacity);
    let buckets_bytes = l.entries_at - l.buckets_at;
    let need = l.entries_at + capacity * ENTRY;
    if capacity == 0 || region.len() < need {
        return Err(RouteError::TooSmall);
    }
    let (h, rest) = region.split_at_mut(HEADER);
    let (b, rest) = rest.split_at_mut(buckets_bytes);
    let e = &mut rest[..capacity * ENTRY];
    let hdr: &mut Header = bytemuck::try_from_bytes_mut(h).map_err(|_| RouteError::Misaligned)?;
    let buckets: &mut [u32] = bytemuck::try_cast_slice_mut(&mut b[..capacity * 4]).map_err(|_| RouteError::Misaligned)?;
    let entries: &mut [Entry] = bytemuck::try_cast_slice_mut(e).map_err(|_| RouteError::Misaligned)?;
    Ok((hdr, buckets, entries))
}

impl<'a> RouteTable<'a> {
    /// Formats `region` as an empty table (8-byte aligned).
    pub fn format(region: &'a mut [u8], secret: [u64; 2]) -> Result<RouteTable<'a>, RouteError> {
        let mut capacity = capacity_for(region.len());
        // Leave room for the bucket array's padding.
        while capacity > 0 && split(region, capacity).is_err() {
            capacity -= 1;
        }
        let capacity = capacity.min(NIL as usize - 1);
        let (hdr, buckets, entries) = split(region, capacity)?;
        *hdr = Header::zeroed();
        hdr.magic = MAGIC;
        hdr.capacity = capacity as u32;
        hdr.nbuckets = capacity as u32;
        hdr.secret = secret;
        hdr.lru_head = NIL;
        hdr.lru_tail = NIL;
        buckets.fill(NIL);
        for (i, e) in entries.iter_mut().enumerate() {
            *e = Entry::zeroed();
            e.next = if i + 1 < capacity { (i + 1) as u32 } else { NIL };
        }
        hdr.free_head = 0;
        Ok(RouteTable { hdr, buckets, entries })
    }

    /// The table from its parts, where [`RouteTable::layout`] says [`RouteTable::format`]
    /// placed them (a process that did not format the region finds them there).
    #[inline]
    pub fn from_parts(hdr: &'a mut Header, buckets: &'a mut [u32], entries: &'a mut [Entry]) -> RouteTable<'a> {
        debug_assert!(buckets.len() == hdr.capacity as usize && entries.len() == hdr.capacity as usize);
        RouteTable { hdr, buckets, entries }
    }

    /// Where this table's parts lie in its region.
    pub fn layout(&self) -> Layout {
        layout_for(self.hdr.capacity as usize)
    }

    pub fn header(&self) -> &Header {
        self.hdr
    }

    pub fn header_mut(&mut self) -> &mut Header {
        self.hdr
    }

    pub fn len(&self) -> usize {
        self.hdr.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.hdr.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.hdr.capacity as usize
    }

    fn bucket(&self, key: u128) -> usize {
        // Fold to 64 bits first: a 128-bit remainder is a libcall costing ~50 instructions.
        ((key as u64 ^ (key >> 64) as u64) % u64::from(self.hdr.nbuckets)) as usize
    }

    fn find(&self, key: u128) -> Option<usize> {
        let k = split_key(key);
        let mut i = self.buckets[self.bucket(key)];
        while i != NIL {
            let e = &self.entries[i as usize];
            if e.key == k {
                return Some(i as usize);
            }
            i = e.chain;
        }
        None
    }

    fn lru_unlink(&mut self, i: usize) {
        let (prev, next) = (self.entries[i].prev, self.entries[i].next);
        if prev == NIL {
            self.hdr.lru_head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.hdr.lru_tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
    }

    fn lru_push_front(&mut self, i: usize) {
        let head = self.hdr.lru_head;
        self.entries[i].prev = NIL;
        self.entries[i].next = head;
        if head == NIL {
            self.hdr.lru_tail = i as u32;
        } else {
            self.entries[head as usize].prev = i as u32;
        }
        self.hdr.lru_head = i as u32;
    }

    fn chain_unlink(&mut self, i: usize) {
        let key = join_key(self.entries[i].key);
        let b = self.bucket(key);
        let mut cur = self.buckets[b];
        let mut prev = NIL;
        while cur != NIL {
            if cur as usize == i {
                let next = self.entries[i].chain;
                if prev == NIL {
                    self.buckets[b] = next;
                } else {
                    self.entries[prev as usize].chain = next;
                }
                return;
            }
            prev = cur;
            cur = self.entries[cur as usize].chain;
        }
    }

    /// Marks entry `i` used at `now`. The LRU list is kept (approximately: workers' clocks
    /// may be a second apart) in order of `last_used`, in whole seconds, so an entry already
    /// used this second stays where it is: a busy session (a BI tool firing many queries a
    /// second) costs one list move per second, not per request.
    #[inline]
    fn touch(&mut self, i: usize, now: i64) {
        if self.entries[i].last_used != now {
            self.entries[i].last_used = now;
            self.lru_unlink(i);
            self.lru_push_front(i);
        }
    }

    fn release(&mut self, i: usize) {
        self.chain_unlink(i);
        self.lru_unlink(i);
        self.entries[i] = Entry::zeroed();
        self.entries[i].next = self.hdr.free_head;
        self.hdr.free_head = i as u32;
        self.hdr.len -= 1;
        self.changed();
    }

    #[inline]
    fn changed(&mut self) {
        self.hdr.changes = self.hdr.changes.wrapping_add(1);
    }

    /// How many times a route was removed, or changed its server or its time of sharing:
    /// what a worker's [`RecentRoutes`] may have missed when this count differs from theirs.
    #[inline]
    pub fn changes(&self) -> u64 {
        self.hdr.changes
    }

    /// Drops routes idle for more than `timeout` seconds, oldest first, at most `max` of them.
    pub fn expire(&mut self, now: i64, timeout: i64, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let t = self.hdr.lru_tail;
            if t == NIL || now - self.entries[t as usize].last_used <= timeout {
                break;
            }
            self.release(t as usize);
            self.hdr.expired += 1;
            n += 1;
        }
        n
    }

    /// How many live (not idle for more than `timeout`) routes lead to each of `peers`: the
    /// sessions a server still holds, for draining it. One walk of the recency list, most
    /// recent first, stopping at the first expired route (the list is in `last_used` order
    /// up to a second, so at most a few routes idle for just over `timeout` are missed).
    pub fn count_by_peer(&self, peers: &[u64], now: i64, timeout: i64) -> Vec<u64> {
        let mut counts = vec![0u64; peers.len()];
        let mut i = self.hdr.lru_head;
        let mut steps = 0;
        while i != NIL && steps < self.entries.len() {
            let e = &self.entries[i as usize];
            if now - e.last_used > timeout + 1 {
                break;
            }
            if now - e.last_used <= timeout {
                for (c, &p) in counts.iter_mut().zip(peers) {
                    *c += u64::from(e.peer == p);
                }
            }
            i = e.next;
            steps += 1;
        }
        counts
    }

    /// The server of `key`'s session, refreshing its idle time; `None` if unknown or expired.
    pub fn lookup(&mut self, key: u128, now: i64, timeout: i64) -> Option<u64> {
        self.find_live(key, now, timeout).map(|i| self.entries[i].peer)
    }

    /// [`RouteTable::lookup`], returning the entry's index.
    fn find_live(&mut self, key: u128, now: i64, timeout: i64) -> Option<usize> {
        let Some(i) = self.find(key) else {
            self.hdr.misses += 1;
            return None;
        };
        if now - self.entries[i].last_used > timeout {
            self.release(i);
            self.hdr.expired += 1;
            self.hdr.misses += 1;
            return None;
        }
        self.touch(i, now);
        self.hdr.hits += 1;
        Some(i)
    }

    /// Records that `key`'s session lives on `peer`.
    pub fn insert(&mut self, key: u128, peer: u64, now: i64, timeout: i64) -> Inserted {
        if let Some(i) = self.find(key) {
            self.entries[i].peer = peer;
            self.entries[i].shared_at = now as u32;
            self.touch(i, now);
            self.changed();
            return Inserted::Updated;
        }
        // Expired routes make room first; they are not evictions.
        self.expire(now, timeout, 4);
        let mut result = Inserted::New;
        if self.hdr.free_head == NIL {
            let t = self.hdr.lru_tail;
            if t == NIL {
                return Inserted::Updated; // capacity 0 cannot happen after format
            }
            self.release(t as usize);
            self.hdr.evictions += 1;
            self.hdr.evict_unlogged += 1;
            result = Inserted::Evicted;
        }
        let i = self.hdr.free_head as usize;
        self.hdr.free_head = self.entries[i].next;
        let b = self.bucket(key);
        self.entries[i] = Entry {
            key: split_key(key),
            peer,
            last_used: now,
            prev: NIL,
            next: NIL,
            chain: self.buckets[b],
            shared_at: now as u32,
        };
        self.buckets[b] = i as u32;
        self.lru_push_front(i);
        self.hdr.len += 1;
        self.hdr.inserts += 1;
        result
    }

    /// How often (seconds of use) a learned route shared through the session store is written
    /// there again, with routes that expire after `timeout` seconds idle: every
    /// [`SHARE_EVERY`] seconds, or twice per timeout if that is shorter (so that the store's
    /// copy, written with the same expiry, never lapses while the route is in use).
    pub fn share_interval(timeout: i64) -> i64 {
        SHARE_EVERY.min(timeout / 2).max(1)
    }

    /// Like [`RouteTable::lookup`], and also says whether the route should be written to the
    /// session store again: never written successfully, or last written `every` seconds ago
    /// or more (which also refreshes the store's copy before it expires). When it says so it
    /// notes `now` as the time of writing.
    /// Routes written before `since` (when the store came back after failing, and may have
    /// lost them) are due too.
    pub fn lookup_share(&mut self, key: u128, now: i64, timeout: i64, every: i64, since: i64) -> Option<(u64, bool)> {
        self.lookup_noting(key, now, timeout, Some(Share { every, since }), None)
    }

    /// [`RouteTable::lookup`] (without `share`) or [`RouteTable::lookup_share`] (with it), and
    /// notes what it found in the worker's `recent` routes, at monotonic milliseconds `ms`.
    #[inline]
    pub fn lookup_noting(&mut self, key: u128, now: i64, timeout: i64, share: Option<Share>, recent: Option<(&RecentRoutes, u64)>) -> Option<(u64, bool)> {
        let i = self.find_live(key, now, timeout)?;
        let peer = self.entries[i].peer;
        let due = share.is_some_and(|s| s.due(self.entries[i].shared_at, now));
        if due {
            // Written now, and after the store came back. Never earlier than before (a worker
            // whose clock is a second behind must not make the route due again for the
            // others): so not a change for RecentRoutes, whose older time of sharing makes
            // the route due for them too, and they ask the table, which then says it is not.
            let at = self.entries[i].shared_at;
            let s = share.map_or(0, |s| s.since);
            self.entries[i].shared_at = latest(latest(at, now as u32), s as u32);
        }
        if let Some((r, ms)) = recent {
            r.note(key as u64, peer, self.entries[i].shared_at, now, ms, self.hdr.changes);
        }
        Some((peer, due))
    }

    /// Forgets `key`'s route (the session was deleted).
    pub fn remove(&mut self, key: u128) -> bool {
        match self.find(key) {
            Some(i) => {
                self.release(i);
                true
            }
            None => false,
        }
    }

    /// Evictions to report if the last report is at least `interval` seconds old; resets the
    /// pending count when it returns `Some`.
    pub fn evictions_to_log(&mut self, now: i64, interval: i64) -> Option<u64> {
        if self.hdr.evict_unlogged == 0 || now - self.hdr.evict_logged_at < interval {
            return None;
        }
        let n = self.hdr.evict_unlogged;
        self.hdr.evict_unlogged = 0;
        self.hdr.evict_logged_at = now;
        Some(n)
    }
}

/// When a route shared through the session store is written there again (see
/// [`RouteTable::lookup_share`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Seconds of use between writes ([`RouteTable::share_interval`]).
    pub every: i64,
    /// Routes written before this (when the store came back after failing) are due.
    pub since: i64,
}

impl Share {
    /// Whether a route last written at `at` (seconds, truncated to 32 bits; 0: never) is due
    /// at `now`: never written, written before the store came back, or `every` seconds ago
    /// or more. A write "in the future" (by a worker whose clock is ahead) is recent.
    #[inline]
    fn due(self, at: u32, now: i64) -> bool {
        at == 0 || (self.since != 0 && later(self.since as u32, at)) || i64::from((now as u32).wrapping_sub(at) as i32) >= self.every
    }
}

/// Whether second `a` is later than `b`, both truncated to 32 bits (they are less than 68
/// years apart).
#[inline]
fn later(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The later of two seconds truncated to 32 bits.
#[inline]
fn latest(a: u32, b: u32) -> u32 {
    if later(b, a) {
        b
    } else {
        a
    }
}

/// How many routes a worker remembers per upstream ([`RecentRoutes`]).
pub const RECENT_ROUTES: usize = 256;

/// One remembered route; `key` 0 is an empty slot (session keys are never 0).
#[derive(Clone, Copy, Debug, Default)]
struct Recent {
    key: u64,
    peer: u64,
    second: i64,
    /// When it was noted, monotonic milliseconds.
    noted_ms: u64,
    changes: u64,
    shared_at: u32,
}

// 48 bytes: RECENT_ROUTES of them are the 12 KB per upstream and worker the README states.
const _: () = assert!(core::mem::size_of::<core::cell::Cell<Recent>>() == 48);

/// A worker's memory of the routes it found in the shared table during the current second,
/// direct-mapped by key (a collision forgets the older route).
///
/// A remembered route is the table's answer, without its lock, while
/// - the second is the same: the table's lookup refreshed the route's idle time to this second,
///   as every lookup in it would, and moves a route in its recency list at most once a second
///   (so skipping the table changes nothing in it, up to the worker clocks' second apart that
///   the recency list already allows);
/// - the table's change count is the same: no route was removed, expired, evicted or given
///   another server or time of sharing since;
/// - with sharing, the route is not due for a write (the remembered time of sharing is never
///   later than the table's, so a route the table says is due is due here too).
///
/// A new route added since is no change: it cannot be a remembered one.
///
/// Seconds are nginx's cached wall-clock time, which a stepped clock can bring round again: a
/// remembered route also holds only for a second of the monotonic clock (`ngx_current_msec`)
/// after it was noted.
#[derive(Debug, Default)]
pub struct RecentRoutes {
    slots: Box<[core::cell::Cell<Recent>]>,
}

impl RecentRoutes {
    /// Room for `n` routes, rounded up to a power of two; 0 remembers nothing.
    pub fn new(n: usize) -> RecentRoutes {
        let n = if n == 0 { 0 } else { n.next_power_of_two() };
        RecentRoutes { slots: (0..n).map(|_| core::cell::Cell::new(Recent::default())).collect() }
    }

    #[inline(always)]
    fn slot(&self, key: u64) -> Option<&core::cell::Cell<Recent>> {
        self.slots.get(key as usize & self.slots.len().wrapping_sub(1))
    }

    /// The server of `key`'s route, if remembered and still the table's answer at `now`
    /// (seconds, as the table's) and `ms` (monotonic milliseconds) with the table's change
    /// count `changes` (read without its lock); `share` as for [`RouteTable::lookup_noting`].
    /// `None`: ask the table.
    #[inline]
    pub fn get(&self, key: u64, now: i64, ms: u64, changes: u64, share: Option<Share>) -> Option<u64> {
        let r = self.slot(key)?.get();
        let valid = r.key == key
            && key != 0
            && r.second == now
            && ms.wrapping_sub(r.noted_ms) < 1000
            && r.changes == changes
            && !share.is_some_and(|s| s.due(r.shared_at, now));
        valid.then_some(r.peer)
    }

    fn note(&self, key: u64, peer: u64, shared_at: u32, now: i64, ms: u64, changes: u64) {
        if let Some(s) = self.slot(key) {
            s.set(Recent { key, peer, second: now, noted_ms: ms, changes, shared_at });
        }
    }
}

fn split_key(k: u128) -> [u64; 2] {
    [k as u64, (k >> 64) as u64]
}

fn join_key(k: [u64; 2]) -> u128 {
    u128::from(k[0]) | (u128::from(k[1]) << 64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// An 8-byte-aligned region.
    fn region(bytes: usize) -> Vec<u64> {
        vec![0u64; bytes / 8]
    }

    fn bytes(v: &mut [u64]) -> &mut [u8] {
        bytemuck::cast_slice_mut(v)
    }

    const H: i64 = 3600;

    #[test]
    fn share_interval_keeps_the_stores_copy_alive() {
        assert_eq!(RouteTable::share_interval(8 * 3600), SHARE_EVERY);
        assert_eq!(RouteTable::share_interval(60), 30);
        assert_eq!(RouteTable::share_interval(1), 1);
    }

    #[test]
    fn sessions_held_per_server() {
        let mut r = region(8192);
        let mut t = RouteTable::format(bytes(&mut r), [1, 2]).unwrap();
        for k in 1..=10u128 {
            t.insert(k, if k <= 7 { 100 } else { 200 }, k as i64, H);
        }
        assert_eq!(t.count_by_peer(&[100, 200, 300], 10, H), vec![7, 3, 0]);
        // Routes idle for longer than the timeout are not counted.
        assert_eq!(t.count_by_peer(&[100, 200], H + 5, H), vec![3, 3]);
        assert_eq!(t.count_by_peer(&[100, 200], 100 + H, H), vec![0, 0]);
        // A moved route counts for its new server.
        t.insert(1, 200, 11, H);
        assert_eq!(t.count_by_peer(&[100, 200], 11, H), vec![6, 4]);
    }

    #[test]
    fn insert_lookup_update_remove() {
        let mut r = region(8192);
        let mut t = RouteTable::format(bytes(&mut r), [1, 2]).unwrap();
        assert!(t.capacity() > 100);
        assert_eq!(t.lookup(5, 0, H), None);
        assert_eq!(t.insert(5, 77, 0, H), Inserted::New);
        assert_eq!(t.lookup(5, 10, H), Some(77));
        assert_eq!(t.insert(5, 78, 20, H), Inserted::Updated);
        assert_eq!(t.lookup(5, 30, H), Some(78));
        assert_eq!(t.len(), 1);
        assert!(t.remove(5));
        assert!(!t.remove(5));
        assert_eq!(t.lookup(5, 40, H), None);
        assert!(t.is_empty());
        assert_eq!(t.header().hits, 2);
        assert_eq!(t.header().misses, 2);
    }

    #[test]
    fn routes_are_shared_again_when_due_or_after_a_recovery() {
        let mut r = region(4096);
        let mut t = RouteTable::format(bytes(&mut r), [0, 0]).unwrap();
        t.insert(3, 30, 1000, H);
        assert_eq!(t.lookup_share(3, 1010, H, 60, 0), Some((30, false)));
        assert_eq!(t.lookup_share(3, 1060, H, 60, 0), Some((30, true)));
        assert_eq!(t.lookup_share(3, 1061, H, 60, 0), Some((30, false)));
        assert_eq!(t.lookup_share(4, 1063, H, 60, 0), None);
        // The store recovered at 1070 after an outage: the route written at 1060 is due again.
        assert_eq!(t.lookup_share(3, 1075, H, 60, 1070), Some((30, true)));
        assert_eq!(t.lookup_share(3, 1076, H, 60, 1070), Some((30, false)));
    }

    #[test]
    fn idle_routes_expire() {
        let mut r = region(4096);
        let mut t = RouteTable::format(bytes(&mut r), [0, 0]).unwrap();
        t.insert(1, 1, 0, 100);
        t.insert(2, 2, 50, 100);
        assert_eq!(t.lookup(1, 101, 100), None); // idle 101 s > 100 s
        assert_eq!(t.lookup(2, 101, 100), Some(2)); // refreshed at 101
        assert_eq!(t.lookup(2, 200, 100), Some(2));
        assert_eq!(t.header().expired, 1);
        assert_eq!(t.expire(1000, 100, 10), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn full_table_evicts_least_recently_used() {
        let mut r = region(1024);
        let mut t = RouteTable::format(bytes(&mut r), [0, 0]).unwrap();
        let cap = t.capacity() as u128;
        assert!(cap >= 4);
        for k in 1..=cap {
            assert_eq!(t.insert(k, k as u64, 0, H), Inserted::New);
        }
        // Touch key 1 so that key 2 becomes the least recently used.
        assert_eq!(t.lookup(1, 1, H), Some(1));
        assert_eq!(t.insert(cap + 1, 0, 2, H), Inserted::Evicted);
        assert_eq!(t.lookup(2, 3, H), None);
        assert_eq!(t.lookup(1, 3, H), Some(1));
        assert_eq!(t.len() as u128, cap);
        assert_eq!(t.evictions_to_log(100, 60), Some(1));
        assert_eq!(t.evictions_to_log(101, 60), None);
        t.insert(cap + 2, 0, 102, H);
        assert_eq!(t.evictions_to_log(120, 60), None); // within the minute
        assert_eq!(t.evictions_to_log(161, 60), Some(1));
    }

    #[test]
    fn parts_at_the_layout_are_the_table() {
        let mut r = region(8192);
        let layout = {
            let mut t = RouteTable::format(bytes(&mut r), [5, 6]).unwrap();
            t.insert(7, 70, 1, H);
            t.layout()
        };
        let b = bytes(&mut r);
        let (h, rest) = b.split_at_mut(layout.buckets_at);
        let (bk, e) = rest.split_at_mut(layout.entries_at - layout.buckets_at);
        let hdr: &mut Header = bytemuck::from_bytes_mut(h);
        let buckets: &mut [u32] = bytemuck::cast_slice_mut(&mut bk[..layout.capacity * 4]);
        let entries: &mut [Entry] = bytemuck::cast_slice_mut(&mut e[..layout.capacity * ENTRY]);
        let mut t = RouteTable::from_parts(hdr, buckets, entries);
        assert_eq!(t.capacity(), layout.capacity);
        assert_eq!(t.lookup(7, 2, H), Some(70));
        assert_eq!(t.header().secret, [5, 6]);
    }

    #[test]
    fn small_or_misaligned_regions_are_refused() {
        let mut r = region(64);
        assert_eq!(RouteTable::format(bytes(&mut r), [0, 0]).err(), Some(RouteError::TooSmall));
        let mut r = region(4096);
        let b = bytes(&mut r);
        assert_eq!(RouteTable::format(&mut b[4..], [0, 0]).err(), Some(RouteError::Misaligned));
    }

    /// A lookup as the glue does it: the worker's recent routes, else the table.
    fn recent_then_table(t: &mut RouteTable<'_>, recent: &RecentRoutes, key: u128, now: i64, timeout: i64, share: Option<Share>) -> Option<(u64, bool)> {
        match recent.get(key as u64, now, ms(now), t.changes(), share) {
            Some(peer) => Some((peer, false)),
            None => t.lookup_noting(key, now, timeout, share, Some((recent, ms(now)))),
        }
    }

    /// The monotonic clock in step with the wall clock (milliseconds).
    fn ms(now: i64) -> u64 {
        now as u64 * 1000 + 500
    }

    #[test]
    fn a_second_that_comes_round_again_is_not_the_same() {
        let mut r = region(4096);
        let mut t = RouteTable::format(bytes(&mut r), [0, 0]).unwrap();
        let recent = RecentRoutes::new(RECENT_ROUTES);
        t.insert(5, 50, 100, H);
        assert_eq!(t.lookup_noting(5, 100, H, None, Some((&recent, 7_000))), Some((50, false)));
        assert_eq!(recent.get(5, 100, 7_999, t.changes(), None), Some(50));
        // The wall clock was stepped back and has come round to second 100 again.
        assert_eq!(recent.get(5, 100, 60_000, t.changes(), None), None);
    }

    #[test]
    fn a_worker_a_second_behind_does_not_write_a_shared_route_again() {
        let mut r = region(4096);
        let mut t = RouteTable::format(bytes(&mut r), [0, 0]).unwrap();
        let (a, b) = (RecentRoutes::new(8), RecentRoutes::new(8));
        let share = Some(Share { every: 1, since: 0 });
        t.insert(5, 50, 8, H);
        // Worker a (second 10) writes the route again; worker b (second 9) finds it written.
        assert_eq!(recent_then_table(&mut t, &a, 5, 10, H, share), Some((50, true)));
        assert_eq!(recent_then_table(&mut t, &b, 5, 9, H, share), Some((50, false)));
        // a's memory and the table agree: written, not due.
        assert_eq!(a.get(5, 10, ms(10), t.changes(), share), Some(50));
        assert_eq!(t.lookup_share(5, 10, H, 1, 0), Some((50, false)));
        // The store came back at a's second 10: a writes the route again, b (at 9) does not.
        let back = Some(Share { every: H, since: 10 });
        t.insert(6, 60, 8, H);
        assert_eq!(recent_then_table(&mut t, &a, 6, 10, H, back), Some((60, true)));
        assert_eq!(recent_then_table(&mut t, &b, 6, 9, H, back), Some((60, false)));
        assert_eq!(a.get(6, 10, ms(10), t.changes(), back), Some(60));
        assert_eq!(t.lookup_share(6, 10, H, H, 10), Some((60, false)));
    }

    #[test]
    fn recent_routes_hold_within_the_second_until_the_table_changes() {
        let mut r = region(8192);
        let mut t = RouteTable::format(bytes(&mut r), [1, 2]).unwrap();
        let recent = RecentRoutes::new(RECENT_ROUTES);
        t.insert(5, 50, 10, H);
        assert_eq!(recent.get(5, 10, ms(10), t.changes(), None), None); // not looked up yet
        assert_eq!(recent_then_table(&mut t, &recent, 5, 10, H, None), Some((50, false)));
        assert_eq!(recent.get(5, 10, ms(10), t.changes(), None), Some(50));
        // A new route is no change.
        t.insert(6, 60, 10, H);
        assert_eq!(recent.get(5, 10, ms(10), t.changes(), None), Some(50));
        // Another second: the table refreshes the route's idle time.
        assert_eq!(recent.get(5, 11, ms(11), t.changes(), None), None);
        assert_eq!(recent_then_table(&mut t, &recent, 5, 11, H, None), Some((50, false)));
        // Another worker moves the route: forgotten.
        t.insert(5, 51, 11, H);
        assert_eq!(recent.get(5, 11, ms(11), t.changes(), None), None);
        assert_eq!(recent_then_table(&mut t, &recent, 5, 11, H, None), Some((51, false)));
        // Any removal is a change.
        t.remove(6);
        assert_eq!(recent.get(5, 11, ms(11), t.changes(), None), None);
        // Key 0 is never remembered, nor anything by an empty memory.
        assert_eq!(RecentRoutes::default().get(5, 11, ms(11), t.changes(), None), None);
        assert_eq!(recent.get(0, 0, ms(0), 0, None), None);
        // A route due for sharing is due here too.
        let share = Some(Share { every: 60, since: 0 });
        assert_eq!(recent_then_table(&mut t, &recent, 5, 12, H, share), Some((51, false)));
        assert_eq!(recent.get(5, 12, ms(12), t.changes(), share), Some(51));
        assert_eq!(recent.get(5, 12, ms(12), t.changes(), Some(Share { every: 60, since: 13 })), None);
        assert_eq!(t.header().hits, 4);
    }

    proptest! {
        /// Lookups through two workers' recent routes give the same answers (server, and
        /// whether a shared route is due for writing) as lookups in the table alone, and
        /// leave the table as they would (same routes, same expiry and eviction, the same
        /// count of hits together with the recent routes' own), whatever else happens to it.
        #[test]
        fn recent_routes_answer_as_the_table(
            ops in proptest::collection::vec((0u8..6, 0u128..24, 0u64..3, 0usize..2), 1..500),
            timeout in 1i64..8,
            sharing in any::<bool>(),
        ) {
            let (mut ra, mut rb) = (region(1024), region(1024));
            let mut with = RouteTable::format(bytes(&mut ra), [0, 0]).unwrap();
            let mut alone = RouteTable::format(bytes(&mut rb), [0, 0]).unwrap();
            let workers = [RecentRoutes::new(4), RecentRoutes::new(RECENT_ROUTES)];
            let (mut now, mut since, mut recent_hits) = (1i64, 0i64, 0u64);
            for (op, k, v, w) in ops {
                let key = k + 1; // session keys are never 0
                let share = sharing.then_some(Share { every: 3, since });
                match op {
                    0 => { with.insert(key, v, now, timeout); alone.insert(key, v, now, timeout); }
                    1 => { prop_assert_eq!(with.remove(key), alone.remove(key)); }
                    2 => { prop_assert_eq!(with.expire(now, timeout, 2), alone.expire(now, timeout, 2)); }
                    // The store comes back (routes written before now are due), or time passes.
                    3 => { if v == 0 { since = now; } else { now += v as i64; } }
                    _ => {
                        let before = with.header().hits;
                        let got = recent_then_table(&mut with, &workers[w], key, now, timeout, share);
                        if got.is_some() && with.header().hits == before { recent_hits += 1; }
                        let want = match share {
                            Some(s) => alone.lookup_share(key, now, timeout, s.every, s.since),
                            None => alone.lookup(key, now, timeout).map(|p| (p, false)),
                        };
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(with.len(), alone.len());
                prop_assert_eq!(with.header().hits + recent_hits, alone.header().hits);
                prop_assert_eq!(with.header().misses, alone.header().misses);
            }
        }

        /// The same with worker clocks a second apart and lookups with and without sharing
        /// mixed (as the precontent phase and `init_peer` do): with a few routes that never
        /// expire, the answers (server, and whether a write is due) are the table's alone.
        #[test]
        fn recent_routes_answer_as_the_table_with_clocks_a_second_apart(
            ops in proptest::collection::vec((0u8..6, 0u128..6, 0u64..3, 0usize..2, any::<bool>()), 1..400),
            every in 1i64..4,
        ) {
            let (mut ra, mut rb) = (region(4096), region(4096));
            let mut with = RouteTable::format(bytes(&mut ra), [0, 0]).unwrap();
            let mut alone = RouteTable::format(bytes(&mut rb), [0, 0]).unwrap();
            let workers = [RecentRoutes::new(4), RecentRoutes::new(RECENT_ROUTES)];
            let (mut now, mut since) = (10i64, 0i64);
            let never = 1i64 << 40;
            for (op, k, v, w, sharing) in ops {
                let key = k + 1;
                // Worker 1's clock is a second behind.
                let at = now - w as i64;
                let share = sharing.then_some(Share { every, since });
                match op {
                    0 => { with.insert(key, v, at, never); alone.insert(key, v, at, never); }
                    1 => { prop_assert_eq!(with.remove(key), alone.remove(key)); }
                    2 => { since = at; }
                    3 => { now += v as i64; }
                    _ => {
                        let got = recent_then_table(&mut with, &workers[w], key, at, never, share);
                        let want = match share {
                            Some(s) => alone.lookup_share(key, at, never, s.every, s.since),
                            None => alone.lookup(key, at, never).map(|p| (p, false)),
                        };
                        prop_assert_eq!(got, want);
                    }
                }
            }
        }

        /// The table behaves like a map with LRU eviction: every key it still has maps to the
        /// last value stored, it never exceeds capacity, and its links stay consistent.
        #[test]
        fn behaves_like_a_bounded_map(ops in proptest::collection::vec((0u8..3, 0u128..40, 0u64..5), 1..400)) {
            let mut r = region(1024);
            let mut t = RouteTable::format(bytes(&mut r), [0, 0]).unwrap();
            let cap = t.capacity();
            let mut model: HashMap<u128, u64> = HashMap::new();
            for (step, (op, k, v)) in ops.into_iter().enumerate() {
                // Several operations per second, as on a busy server.
                let now = step as i64 / 3;
                match op {
                    0 => { t.insert(k, v, now, 1 << 40); model.insert(k, v); }
                    1 => { t.remove(k); model.remove(&k); }
                    _ => {
                        if let Some(got) = t.lookup(k, now, 1 << 40) {
                            prop_assert_eq!(Some(&got), model.get(&k));
                        }
                    }
                }
                prop_assert!(t.len() <= cap);
                // Walk the LRU list: it has len entries, each findable, most recent first.
                let mut n = 0;
                let mut i = t.hdr.lru_head;
                let mut newer = i64::MAX;
                while i != NIL {
                    let key = join_key(t.entries[i as usize].key);
                    prop_assert_eq!(t.find(key), Some(i as usize));
                    prop_assert!(t.entries[i as usize].last_used <= newer);
                    newer = t.entries[i as usize].last_used;
                    n += 1;
                    i = t.entries[i as usize].next;
                }
                prop_assert_eq!(n, t.len());
            }
        }
    }
}
