//! Shared per-server counters (pure Rust, no FFI): in-flight requests, and the running
//! totals the status page reports.
//!
//! # Layout and use
//!
//! The table is a [`Header`] and an array of [`Slot`]s in shared memory, the same in every
//! worker process. A slot holds the counters of one key: a hash of upstream name and server
//! address ([`server_key`]), of the upstream name alone for its in-flight total
//! ([`upstream_key`]), or of a session store ([`store_key`]; that slot holds the store's
//! shared state rather than counts, [`Use::State`]). A key's slot is found by linear probing
//! from `key % capacity`. Once a worker holds a `&Slot`, every update is a single atomic add:
//! the per-request path takes no lock and does nothing else.
//!
//! # Claiming and reclaiming
//!
//! Slots are keyed by names, so a server keeps its slot (and its counts) across
//! `nginx -s reload`, and old workers finishing their requests decrement the same counters
//! the new workers read. Slots that no configuration uses any more are reclaimed:
//!
//! - Each configuration nginx sets up is a *generation*. While it does (zone init, in the
//!   master), the master [`prepare`](LoadTable::prepare)s the table: it begins a generation,
//!   stamps the slot of every key the configuration names with it (claiming the slots it
//!   lacks) and sweeps. When the configuration is committed (nginx's `init_module`, which
//!   only a cycle that is going to run reaches), the master [`commit`](LoadTable::commit)s
//!   that generation; a reload that fails commits nothing. A worker that claims a slot at
//!   run time (a server that `resolve` found) stamps it with the committed generation, which
//!   is never older than the worker's own configuration.
//! - The sweep reclaims a slot whose stamp is older than the committed generation, that is
//!   a slot that neither the new configuration nor the running one (about to become the
//!   previous one) uses, and, for a counting slot, only while its in-flight count is 0.
//!   Servers that `resolve` drops keep their stamp, so they are reclaimed by the second
//!   reload after, like servers removed from the configuration.
//! - Workers of a configuration older than the previous one may still run (finishing their
//!   requests after a reload, up to `worker_shutdown_timeout`) and hold pointers to a slot
//!   reclaimed since. They cannot corrupt its new owner's in-flight count: the count belongs
//!   to the slot (a try's start and finish go to the slot it was counted in), a slot is
//!   reclaimed only with nothing in flight, and neither reclaiming nor claiming writes the
//!   count, so a late try of theirs (a retry to another of their servers) adds one and
//!   removes it again: at worst a transient +1 and a statistic counted for the wrong server.
//! - [`Use::State`] slots (a session store's breaker and statistics, two per distinct
//!   `kylin_session_store` URL list) are never reclaimed: an old worker's Redis call still
//!   under way may write a time into the in-flight field, which would corrupt a server's count
//!   if the slot were a server's by then. They stay until nginx restarts.
//! - Claims and sweeps are serialised by the caller (with the zone's mutex, see `shm.rs`).
//!   They are rare (a worker claims when it builds an upstream's tables, the master when it
//!   sets up a configuration), and lock-free open addressing with deletion is not worth its
//!   subtlety here. [`find`](LoadTable::find) and every counter update need no lock.
//! - Deletion keeps probing correct: a reclaimed slot becomes a tombstone, which `find`
//!   passes over and a claim reuses (after making sure that its key is not further along).
//!   Invariant: between a key's first probe position and its slot, no slot is empty (a claim
//!   takes the first free slot on the key's path; only the sweep empties slots). So the sweep
//!   can turn every tombstone that no live key's path runs through back into an empty slot,
//!   which keeps probe paths short after many reloads, even after the table was once full.

use core::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Counters kept per slot besides the in-flight count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// Requests that came here by [`crate::balancer::Route::Sticky`].
    Sticky = 0,
    /// ... by [`crate::balancer::Route::Learned`].
    Learned,
    /// ... spilled here from an over-bound server.
    SpilledIn,
    /// ... whose own server was over its bound and that went elsewhere.
    SpilledOut,
    /// ... by [`crate::balancer::Route::Failover`].
    Failover,
    /// ... by [`crate::balancer::Route::Backup`].
    Backup,
    /// Tries that failed (nginx's `NGX_PEER_FAILED`).
    Failures,
    /// ... by [`crate::balancer::Route::Moved`]: its client was moved here.
    Moved,
}

pub const COUNTERS: usize = 8;

/// What a slot holds, which decides when it may be reclaimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// In-flight counts and statistics (servers, upstream totals): reclaimed only with
    /// nothing in flight.
    Counts,
    /// Shared state in the counter cells and the in-flight field (a session store's circuit
    /// breaker and statistics): never reclaimed, see the module documentation.
    State,
}

/// Key of a free slot.
const EMPTY: u64 = 0;
/// Key of a reclaimed slot: free for a claim, but probing goes on past it.
const TOMBSTONE: u64 = u64::MAX;
/// Bit of [`Slot::stamp`] marking a [`Use::State`] slot; the other bits are a generation.
const STATE: u64 = 1 << 63;

/// One shared slot. `#[repr(C)]` with atomics only, so it can live in shared memory.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Slot {
    /// [`EMPTY`], [`TOMBSTONE`], or the key that owns the slot.
    key: AtomicU64,
    inflight: AtomicI64,
    counters: [AtomicU64; COUNTERS],
    /// The newest generation that used the slot, with [`STATE`] for a state slot. Written
    /// only by claims and sweeps (serialised), read by sweeps.
    stamp: AtomicU64,
}

impl Slot {
    /// Requests in flight, never negative.
    #[inline]
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed).max(0) as u64
    }

    #[inline]
    pub fn start(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn finish(&self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn count(&self, c: Counter) {
        self.counters[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Ordering::Relaxed)
    }

    pub fn key(&self) -> u64 {
        self.key.load(Ordering::Relaxed)
    }

    /// The in-flight field as a raw atomic, for slots that are not servers (a session store's
    /// slot keeps there the time it last recovered from failing).
    pub fn aux(&self) -> &AtomicI64 {
        &self.inflight
    }

    /// Counter `i` as a raw atomic, for slots used as shared state rather than counts (the
    /// session stores' circuit breakers).
    pub fn cell(&self, i: usize) -> &AtomicU64 {
        &self.counters[i % COUNTERS]
    }

    /// Every counter cell, read one by one (not one snapshot).
    pub fn cells(&self) -> [u64; COUNTERS] {
        core::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed))
    }

    /// The newest generation that used the slot.
    pub fn generation(&self) -> u64 {
        self.stamp.load(Ordering::Relaxed) & !STATE
    }

    fn is_live(key: u64) -> bool {
        key != EMPTY && key != TOMBSTONE
    }

    /// Marks the slot used by `generation` (never moves the stamp back).
    fn touch(&self, generation: u64) {
        let flag = self.stamp.load(Ordering::Relaxed) & STATE;
        self.stamp.fetch_max(flag | (generation & !STATE), Ordering::Relaxed);
    }
}

/// The key of a server's slot: a hash of upstream name and server address.
pub fn server_key(upstream: &[u8], server: &[u8]) -> u64 {
    let mut buf = Vec::with_capacity(upstream.len() + server.len() + 1);
    buf.extend_from_slice(upstream);
    buf.push(0);
    buf.extend_from_slice(server);
    valid(xxhash_rust::xxh3::xxh3_64(&buf))
}

/// The key of a session store's slot (its circuit breaker and statistics).
pub fn store_key(urls: &[u8]) -> u64 {
    valid(xxhash_rust::xxh3::xxh3_64_with_seed(urls, 0x73746f7265))
}

/// The key of a server's health slot: its health-check record ([`crate::health::cell`]) and
/// its run-time drain mark. A counting slot (its in-flight field stays 0), so it is reclaimed
/// like the server's counters once no configuration names the server.
pub fn health_key(upstream: &[u8], server: &[u8]) -> u64 {
    let mut buf = Vec::with_capacity(upstream.len() + server.len() + 1);
    buf.extend_from_slice(upstream);
    buf.push(0);
    buf.extend_from_slice(server);
    valid(xxhash_rust::xxh3::xxh3_64_with_seed(&buf, 0x6865_616c_7468))
}

/// The key of a server's load-report slot (`kylin_load_report`, [`crate::load_report::cell`]):
/// a counting slot (its in-flight field stays 0), reclaimed like the server's counters.
pub fn report_key(upstream: &[u8], server: &[u8]) -> u64 {
    let mut buf = Vec::with_capacity(upstream.len() + server.len() + 1);
    buf.extend_from_slice(upstream);
    buf.push(0);
    buf.extend_from_slice(server);
    valid(xxhash_rust::xxh3::xxh3_64_with_seed(&buf, 0x7265_706f_7274))
}

/// The key of an upstream's own slot (its in-flight total).
pub fn upstream_key(upstream: &[u8]) -> u64 {
    valid(xxhash_rust::xxh3::xxh3_64_with_seed(upstream, 0x6b796c696e))
}

/// A hash made a usable key: never [`EMPTY`] nor [`TOMBSTONE`].
fn valid(k: u64) -> u64 {
    match k {
        EMPTY => 1,
        TOMBSTONE => TOMBSTONE - 1,
        k => k,
    }
}

/// The table's header in shared memory: generations and zone-wide statistics.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Header {
    /// The newest generation begun (by [`LoadTable::prepare`]).
    generation: AtomicU64,
    /// The generation of the running configuration (0 before the first commit).
    committed: AtomicU64,
    /// Claims that found no free slot (each attempt counts).
    claims_failed: AtomicU64,
    /// Slots reclaimed, in all.
    reclaimed: AtomicU64,
}

/// What [`LoadTable::prepare`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// The generation begun for the new configuration (commit it if the configuration runs).
    pub generation: u64,
    pub reclaimed: usize,
    /// Keys of the configuration left without a slot: the table is full.
    pub failed: usize,
}

/// A view of the slot array.
pub struct LoadTable<'a> {
    header: &'a Header,
    slots: &'a [Slot],
}

impl<'a> LoadTable<'a> {
    pub fn new(header: &'a Header, slots: &'a [Slot]) -> LoadTable<'a> {
        LoadTable { header, slots }
    }

    /// The slots `key` may occupy, in probing order (linear probing from `key % n`).
    fn probe(&self, key: u64) -> impl Iterator<Item = &'a Slot> {
        let slots = self.slots;
        let n = slots.len();
        let start = if n == 0 { 0 } else { (key % n as u64) as usize };
        (0..n).map(move |i| &slots[(start + i) % n])
    }

    /// The slot of `key` if it has one. Needs no lock.
    pub fn find(&self, key: u64) -> Option<&'a Slot> {
        if !Slot::is_live(key) {
            return None;
        }
        for s in self.probe(key) {
            match s.key.load(Ordering::Acquire) {
                EMPTY => return None,
                k if k == key => return Some(s),
                _ => {}
            }
        }
        None
    }

    /// The slot of `key`, claimed (from the first free slot on its path) if it has none,
    /// stamped with `generation`. `None` when the table is full (counted in
    /// [`claims_failed`](Self::claims_failed)). Callers serialise claims and sweeps.
    pub fn claim(&self, key: u64, use_: Use, generation: u64) -> Option<&'a Slot> {
        if !Slot::is_live(key) {
            return None;
        }
        let mut free = None;
        for s in self.probe(key) {
            match s.key.load(Ordering::Acquire) {
                k if k == key => {
                    s.touch(generation);
                    return Some(s);
                }
                EMPTY => {
                    free = free.or(Some(s));
                    break;
                }
                TOMBSTONE => free = free.or(Some(s)),
                _ => {}
            }
        }
        let Some(s) = free else {
            self.header.claims_failed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let flag = if use_ == Use::State { STATE } else { 0 };
        s.stamp.store(flag | (generation & !STATE), Ordering::Relaxed);
        // Release: whoever finds the key sees the slot's fields as they are now.
        s.key.store(key, Ordering::Release);
        Some(s)
    }

    /// Reclaims the slots last used before generation `keep_from` (see the module
    /// documentation); returns how many. Callers serialise claims and sweeps.
    pub fn sweep(&self, keep_from: u64) -> usize {
        let mut reclaimed = 0;
        for s in self.slots {
            if !Slot::is_live(s.key.load(Ordering::Acquire)) || s.generation() >= keep_from {
                continue;
            }
            let state = s.stamp.load(Ordering::Relaxed) & STATE != 0;
            if state || s.inflight.load(Ordering::Relaxed) != 0 {
                continue;
            }
            for c in &s.counters {
                c.store(0, Ordering::Relaxed);
            }
            s.stamp.store(0, Ordering::Relaxed);
            s.key.store(TOMBSTONE, Ordering::Release);
            reclaimed += 1;
        }
        self.empty_unused_tombstones();
        self.header.reclaimed.fetch_add(reclaimed as u64, Ordering::Relaxed);
        reclaimed
    }

    /// Turns every tombstone that lies on no live key's probe path back into an empty slot
    /// (see the invariant in the module documentation: `find` of a live key never meets an
    /// empty slot before the key's), so that probing stays short after many reloads, even
    /// once the table has been full. Callers serialise claims and sweeps.
    fn empty_unused_tombstones(&self) {
        let n = self.slots.len();
        // depth[i]: how many live keys' paths (first probe position up to, not including,
        // the key's slot) cover slot i, from the prefix sums of +1 at each path's start and
        // -1 at its end (a path that wraps also starts at 0).
        let mut depth = vec![0i64; n + 1];
        for (at, s) in self.slots.iter().enumerate() {
            let key = s.key.load(Ordering::Relaxed);
            if !Slot::is_live(key) {
                continue;
            }
            let home = (key % n as u64) as usize;
            depth[home] += 1;
            depth[at] -= 1;
            if at < home {
                depth[0] += 1;
            }
        }
        let mut covered = 0;
        for (i, s) in self.slots.iter().enumerate() {
            covered += depth[i];
            if covered == 0 && s.key.load(Ordering::Relaxed) == TOMBSTONE {
                s.key.store(EMPTY, Ordering::Release);
            }
        }
    }

    /// Sets the table up for a new configuration that uses `keys` (in the master, while nginx
    /// sets the configuration up): begins a generation, stamps the slots the configuration
    /// keeps, sweeps what neither it nor the committed configuration uses, and claims the
    /// slots it lacks. Callers serialise claims and sweeps.
    pub fn prepare(&self, keys: &[(u64, Use)]) -> Prepared {
        let generation = self.header.generation.fetch_add(1, Ordering::Relaxed) + 1;
        for &(k, _) in keys {
            if let Some(s) = self.find(k) {
                s.touch(generation);
            }
        }
        let reclaimed = self.sweep(self.committed());
        let failed = keys.iter().filter(|&&(k, u)| Slot::is_live(k) && self.claim(k, u, generation).is_none()).count();
        Prepared { generation, reclaimed, failed }
    }

    /// Clears the cells of `key`'s slot if the running (committed) configuration does not use
    /// it: state that a configuration without the slot's server left there (a server removed
    /// by one reload and added again by a later one starts afresh). Call before
    /// [`prepare`](LoadTable::prepare) stamps the new configuration's slots. Returns whether
    /// it cleared. Callers serialise claims and sweeps.
    pub fn reset_stale(&self, key: u64) -> bool {
        let Some(s) = self.find(key) else { return false };
        if s.generation() >= self.committed() {
            return false;
        }
        for c in &s.counters {
            c.store(0, Ordering::Relaxed);
        }
        true
    }

    /// Records that the configuration of `generation` runs (nginx committed it).
    pub fn commit(&self, generation: u64) {
        self.header.committed.fetch_max(generation, Ordering::Relaxed);
    }

    /// The generation of the running configuration: what run-time claims stamp.
    pub fn committed(&self) -> u64 {
        self.header.committed.load(Ordering::Relaxed)
    }

    /// The newest generation begun.
    pub fn generation(&self) -> u64 {
        self.header.generation.load(Ordering::Relaxed)
    }

    /// Slots in use.
    pub fn used(&self) -> usize {
        self.slots.iter().filter(|s| Slot::is_live(s.key())).count()
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Claims that found the table full, since the zone was created.
    pub fn claims_failed(&self) -> u64 {
        self.header.claims_failed.load(Ordering::Relaxed)
    }

    /// Slots reclaimed since the zone was created.
    pub fn reclaimed(&self) -> u64 {
        self.header.reclaimed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn table(n: usize) -> (Header, Vec<Slot>) {
        (Header::default(), (0..n).map(|_| Slot::default()).collect())
    }

    #[test]
    fn a_server_removed_and_added_again_starts_afresh() {
        let (h, slots) = table(16);
        let t = LoadTable::new(&h, &slots);
        let a = health_key(b"up", b"10.0.0.1:7070");
        let b = health_key(b"up", b"10.0.0.2:7070");
        assert_ne!(a, server_key(b"up", b"10.0.0.1:7070"));
        // Configuration 1 has both servers.
        let p = t.prepare(&[(a, Use::Counts), (b, Use::Counts)]);
        t.commit(p.generation);
        t.find(a).unwrap().cell(0).store(7, Ordering::Relaxed);
        t.find(b).unwrap().cell(0).store(9, Ordering::Relaxed);
        // Configuration 2 keeps b only: nothing is cleared for the keys it names.
        assert!(!t.reset_stale(b));
        let p = t.prepare(&[(b, Use::Counts)]);
        t.commit(p.generation);
        assert_eq!(t.find(b).unwrap().cell(0).load(Ordering::Relaxed), 9);
        // Configuration 3 adds a again: its old state is gone, b's stays.
        assert!(t.reset_stale(a));
        assert!(!t.reset_stale(b));
        let p = t.prepare(&[(a, Use::Counts), (b, Use::Counts)]);
        t.commit(p.generation);
        assert_eq!(t.find(a).unwrap().cell(0).load(Ordering::Relaxed), 0);
        assert_eq!(t.find(b).unwrap().cell(0).load(Ordering::Relaxed), 9);
    }

    #[test]
    fn claim_find_and_count() {
        let (h, v) = table(8);
        let t = LoadTable::new(&h, &v);
        let k = server_key(b"kylin", b"10.0.0.1:7070");
        assert!(t.find(k).is_none());
        let s = t.claim(k, Use::Counts, 1).unwrap();
        assert!(core::ptr::eq(s, t.claim(k, Use::Counts, 1).unwrap()));
        assert!(core::ptr::eq(s, t.find(k).unwrap()));
        s.start();
        s.start();
        s.finish();
        assert_eq!(s.inflight(), 1);
        s.count(Counter::SpilledIn);
        assert_eq!(s.counter(Counter::SpilledIn), 1);
        assert_eq!(t.used(), 1);
    }

    #[test]
    fn inflight_never_reads_negative() {
        let s = Slot::default();
        s.finish();
        assert_eq!(s.inflight(), 0);
        s.start();
        assert_eq!(s.inflight(), 0);
        s.start();
        assert_eq!(s.inflight(), 1);
    }

    #[test]
    fn full_table_and_collisions() {
        let (h, v) = table(3);
        let t = LoadTable::new(&h, &v);
        // Keys that collide on the same start slot still get distinct slots.
        let keys = [3u64, 6, 9];
        let slots: Vec<_> = keys.iter().map(|&k| t.claim(k, Use::Counts, 1).unwrap() as *const Slot).collect();
        assert_ne!(slots[0], slots[1]);
        assert_ne!(slots[1], slots[2]);
        assert!(t.claim(12, Use::Counts, 1).is_none());
        assert_eq!(t.claims_failed(), 1);
        assert!(t.find(12).is_none());
        assert!(core::ptr::eq(t.find(9).unwrap(), slots[2]));
        assert!(LoadTable::new(&h, &[]).claim(1, Use::Counts, 1).is_none());
        assert!(t.claim(EMPTY, Use::Counts, 1).is_none());
        assert!(t.claim(TOMBSTONE, Use::Counts, 1).is_none());
    }

    #[test]
    fn keys_differ_by_upstream_and_server() {
        assert_ne!(server_key(b"a", b"x:1"), server_key(b"b", b"x:1"));
        assert_ne!(server_key(b"a", b"x:1"), server_key(b"a", b"x:2"));
        assert_ne!(server_key(b"ab", b"c"), server_key(b"a", b"bc"));
        assert!(Slot::is_live(upstream_key(b"a")));
        assert_eq!(valid(EMPTY), 1);
        assert!(Slot::is_live(valid(TOMBSTONE)));
    }

    #[test]
    fn concurrent_updates_are_exact() {
        let (h, v) = table(4);
        let t = LoadTable::new(&h, &v);
        let s = t.claim(42, Use::Counts, 1).unwrap();
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..10_000 {
                        s.start();
                        s.count(Counter::Sticky);
                        s.finish();
                    }
                });
            }
        });
        assert_eq!(s.inflight(), 0);
        assert_eq!(s.counter(Counter::Sticky), 40_000);
    }

    /// The issue this design fixes: reloads whose servers change every time fill the table
    /// unless slots of servers no longer configured are reclaimed.
    #[test]
    fn reloads_with_changing_servers_never_fill_the_table() {
        let (h, v) = table(64);
        let t = LoadTable::new(&h, &v);
        for reload in 0..200u64 {
            let keys: Vec<_> = (0..20).map(|i| (server_key(b"u", format!("10.{reload}.0.{i}:7070").as_bytes()), Use::Counts)).collect();
            let p = t.prepare(&keys);
            assert_eq!(p.failed, 0, "reload {reload}");
            t.commit(p.generation);
            for &(k, _) in &keys {
                assert!(t.find(k).is_some());
            }
            assert!(t.used() <= 40, "current and previous configuration only: {}", t.used());
        }
        assert_eq!(t.claims_failed(), 0);
    }

    #[test]
    fn in_flight_slots_and_the_previous_configuration_are_kept() {
        let (h, v) = table(8);
        let t = LoadTable::new(&h, &v);
        let g1 = t.prepare(&[(1, Use::Counts), (2, Use::Counts), (3, Use::State)]).generation;
        t.commit(g1);
        t.find(1).unwrap().start();
        t.find(3).unwrap().aux().store(1_700_000_000, Ordering::Relaxed);
        let g2 = t.prepare(&[(4, Use::Counts)]).generation;
        t.commit(g2);
        // Configuration 1 is the previous one: all its slots stay.
        assert_eq!(t.used(), 4);
        let g3 = t.prepare(&[(4, Use::Counts)]);
        t.commit(g3.generation);
        // Key 2 goes; key 1 has a request in flight (an old worker's); the state slot 3 stays.
        assert_eq!(g3.reclaimed, 1);
        assert!(t.find(1).is_some() && t.find(2).is_none() && t.find(3).is_some());
        t.find(1).unwrap().finish();
        let g4 = t.prepare(&[(4, Use::Counts)]);
        assert_eq!(g4.reclaimed, 1);
        assert_eq!(t.used(), 2);
        assert_eq!(t.find(3).unwrap().aux().load(Ordering::Relaxed), 1_700_000_000);
    }

    #[test]
    fn a_table_once_full_gets_its_empty_slots_back() {
        let (h, v) = table(16);
        let t = LoadTable::new(&h, &v);
        let old: Vec<_> = (0..16u64).map(|k| (k * 16 + 3, Use::Counts)).collect();
        let p = t.prepare(&old);
        assert_eq!(p.failed, 0);
        t.commit(p.generation);
        assert!(t.claim(100, Use::Counts, 1).is_none(), "full");
        // Two reloads with other keys: the old ones go; no slot was empty when they did.
        let p = t.prepare(&[]);
        t.commit(p.generation);
        let p = t.prepare(&[(7, Use::Counts)]);
        assert_eq!(p.reclaimed, 16);
        // Only slots on the path of key 7 (home 7, placed at 7) could stay tombstones: none.
        assert!(v.iter().all(|s| s.key() == EMPTY || s.key() == 7));
        // Tombstones on a live key's path stay (or `find` would stop early).
        let (h, v) = table(8);
        let t = LoadTable::new(&h, &v);
        for k in [1u64, 9, 17] {
            t.claim(k, Use::Counts, 1);
        }
        t.commit(3);
        v[1].touch(3);
        v[3].touch(3);
        assert_eq!(t.sweep(3), 1);
        assert_eq!(v[2].key(), TOMBSTONE);
        assert!(core::ptr::eq(t.find(17).unwrap(), &v[3]));
    }

    #[test]
    fn a_failed_reload_does_not_move_the_running_configuration() {
        let (h, v) = table(8);
        let t = LoadTable::new(&h, &v);
        let g1 = t.prepare(&[(1, Use::Counts)]).generation;
        t.commit(g1);
        let g2 = t.prepare(&[(2, Use::Counts)]).generation;
        t.commit(g2);
        // Two reloads that fail after zone init (nothing committed): configuration 2 runs.
        t.prepare(&[(3, Use::Counts)]);
        t.prepare(&[(4, Use::Counts)]);
        assert!(t.find(2).is_some(), "the running configuration's slots stay");
        // The next good reload may drop configuration 1, never configuration 2.
        let p = t.prepare(&[(5, Use::Counts)]);
        t.commit(p.generation);
        assert!(t.find(2).is_some());
        assert!(t.find(1).is_none());
    }

    #[test]
    fn run_time_claims_are_stamped_with_the_running_configuration() {
        let (h, v) = table(8);
        let t = LoadTable::new(&h, &v);
        for _ in 0..3 {
            let p = t.prepare(&[(1, Use::Counts)]);
            t.commit(p.generation);
        }
        // A worker of the running configuration finds a server by `resolve`.
        let s = t.claim(9, Use::Counts, t.committed()).unwrap();
        assert_eq!(s.generation(), t.committed());
        let p = t.prepare(&[(1, Use::Counts)]);
        assert!(t.find(9).is_some(), "used by the running configuration");
        t.commit(p.generation);
        t.prepare(&[(1, Use::Counts)]);
        assert!(t.find(9).is_none(), "reclaimed at the second reload after");
    }

    /// Two workers (threads) claiming the same keys while others find and count lock-free and
    /// a master sweeps: every key ends with exactly one slot and exact counts.
    #[test]
    fn concurrent_claims_end_with_one_slot_per_key() {
        let (h, v) = table(64);
        let t = LoadTable::new(&h, &v);
        let lock = std::sync::Mutex::new(());
        // Old keys to sweep while the claims run, so that tombstones appear on the paths.
        for k in 1000..1040u64 {
            t.claim(k * 64 + 5, Use::Counts, 0);
        }
        t.commit(1);
        let keys: Vec<u64> = (0..20u64).map(|k| k * 64 + 5).chain(1..5).collect();
        let got: Vec<Vec<usize>> = std::thread::scope(|sc| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    sc.spawn(|| {
                        keys.iter()
                            .map(|&k| {
                                let s = {
                                    let _g = lock.lock().unwrap();
                                    t.claim(k, Use::Counts, 1).unwrap()
                                };
                                s.start();
                                s.finish();
                                (s as *const Slot as usize - v.as_ptr() as usize) / core::mem::size_of::<Slot>()
                            })
                            .collect()
                    })
                })
                .collect();
            sc.spawn(|| {
                for _ in 0..50 {
                    let _g = lock.lock().unwrap();
                    t.sweep(1);
                }
            });
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        for g in &got[1..] {
            assert_eq!(g, &got[0]);
        }
        let mut distinct = got[0].clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), keys.len());
        for (&k, &i) in keys.iter().zip(&got[0]) {
            assert!(core::ptr::eq(t.find(k).unwrap(), &v[i]));
            assert_eq!(v[i].inflight(), 0);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A worker claims key `k` (stamped with the committed generation).
        Claim(u64, bool),
        Find(u64),
        Start(u64),
        Finish(u64),
        /// A reload with these keys; committed unless it fails.
        Reload(Vec<(u64, bool)>, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = 1u64..30;
        prop_oneof![
            (key.clone(), any::<bool>()).prop_map(|(k, s)| Op::Claim(k, s)),
            key.clone().prop_map(Op::Find),
            key.clone().prop_map(Op::Start),
            key.clone().prop_map(Op::Finish),
            (proptest::collection::vec((key, prop::bool::weighted(0.2)), 0..8), prop::bool::weighted(0.85))
                .prop_map(|(k, c)| Op::Reload(k, c)),
        ]
    }

    /// The model of a live slot.
    #[derive(Debug)]
    struct M<'a> {
        at: &'a Slot,
        stamp: u64,
        inflight: i64,
        state: bool,
    }

    fn use_of(state: bool) -> Use {
        if state {
            Use::State
        } else {
            Use::Counts
        }
    }

    /// A claim, checked against the model.
    fn claim<'a>(t: &LoadTable<'a>, model: &mut HashMap<u64, M<'a>>, n: usize, k: u64, state: bool, g: u64) -> Result<(), TestCaseError> {
        let got = t.claim(k, use_of(state), g);
        if let Some(m) = model.get_mut(&k) {
            prop_assert!(got.is_some_and(|s| core::ptr::eq(s, m.at)));
            m.stamp = m.stamp.max(g);
        } else if model.len() < n {
            let Some(s) = got else { return Err(TestCaseError::fail(format!("no slot for {k} with room left"))) };
            prop_assert!(model.values().all(|m| !core::ptr::eq(m.at, s)));
            model.insert(k, M { at: s, stamp: g, inflight: s.aux().load(Ordering::Relaxed), state });
        } else {
            prop_assert!(got.is_none());
        }
        Ok(())
    }

    proptest! {
        /// LoadTable against a map: claims, finds, counts and reloads (prepare, sweep,
        /// commit) in any order, on small tables where every key collides.
        #[test]
        fn table_matches_a_simple_model(n in 1usize..12, ops in proptest::collection::vec(op(), 1..120)) {
            let (h, v) = table(n);
            let t = LoadTable::new(&h, &v);
            let mut model: HashMap<u64, M> = HashMap::new();
            let (mut generation, mut committed) = (0u64, 0u64);
            for op in ops {
                match op {
                    Op::Claim(k, state) => claim(&t, &mut model, n, k, state, committed)?,
                    Op::Find(k) => prop_assert_eq!(t.find(k).map(|s| s as *const Slot), model.get(&k).map(|m| m.at as *const Slot)),
                    Op::Start(k) => {
                        if let Some(m) = model.get_mut(&k).filter(|m| !m.state) {
                            m.at.start();
                            m.inflight += 1;
                        }
                    }
                    Op::Finish(k) => {
                        if let Some(m) = model.get_mut(&k).filter(|m| !m.state && m.inflight > 0) {
                            m.at.finish();
                            m.inflight -= 1;
                        }
                    }
                    Op::Reload(keys, commits) => {
                        let keys: Vec<(u64, Use)> = keys.iter().map(|&(k, s)| (k, use_of(s))).collect();
                        let p = t.prepare(&keys);
                        generation += 1;
                        prop_assert_eq!(p.generation, generation);
                        for &(k, _) in &keys {
                            if let Some(m) = model.get_mut(&k) {
                                m.stamp = generation;
                            }
                        }
                        let before = model.len();
                        model.retain(|_, m| m.stamp >= committed || m.state || m.inflight != 0);
                        prop_assert_eq!(p.reclaimed, before - model.len());
                        let mut failed = 0;
                        for &(k, u) in &keys {
                            let full = !model.contains_key(&k) && model.len() >= n;
                            failed += usize::from(full);
                            claim(&t, &mut model, n, k, u == Use::State, generation)?;
                        }
                        prop_assert_eq!(p.failed, failed);
                        if commits {
                            t.commit(generation);
                            committed = generation;
                        }
                    }
                }
                prop_assert_eq!(t.used(), model.len());
                for (&k, m) in &model {
                    let s = t.find(k);
                    prop_assert!(s.is_some_and(|s| core::ptr::eq(s, m.at)), "key {} lost", k);
                    let s = m.at;
                    prop_assert_eq!(s.generation(), m.stamp);
                    if !m.state {
                        prop_assert_eq!(s.inflight() as i64, m.inflight);
                    }
                }
            }
        }
    }
}
