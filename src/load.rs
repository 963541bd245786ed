//! Shared per-server counters (pure Rust, no FFI): in-flight requests, and the running
//! totals the status page reports.
//!
//! The table is an array of [`Slot`]s in shared memory, the same in every worker process.
//! A slot is claimed for a key (a hash of upstream name and server address, or of the
//! upstream name alone for upstream-wide totals) with a compare-and-swap, so workers need no
//! lock; afterwards every update is a single atomic add. Because slots are keyed by names, a
//! server keeps its slot (and its counts) across `nginx -s reload`, and old workers finishing
//! their requests decrement the same counters the new workers read.

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
    /// Unused; keeps the slot layout.
    Reserved,
}

pub const COUNTERS: usize = 8;

/// One shared slot. `#[repr(C)]` with atomics only, so it can live in shared memory.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Slot {
    /// 0 while free.
    key: AtomicU64,
    inflight: AtomicI64,
    counters: [AtomicU64; COUNTERS],
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
}

/// The key of a server's slot: a hash of upstream name and server address. Never 0.
pub fn server_key(upstream: &[u8], server: &[u8]) -> u64 {
    let mut buf = Vec::with_capacity(upstream.len() + server.len() + 1);
    buf.extend_from_slice(upstream);
    buf.push(0);
    buf.extend_from_slice(server);
    nonzero(xxhash_rust::xxh3::xxh3_64(&buf))
}

/// The key of a session store's slot (its circuit breaker and statistics). Never 0.
pub fn store_key(urls: &[u8]) -> u64 {
    nonzero(xxhash_rust::xxh3::xxh3_64_with_seed(urls, 0x73746f7265))
}

/// The key of an upstream's own slot (its in-flight total). Never 0.
pub fn upstream_key(upstream: &[u8]) -> u64 {
    nonzero(xxhash_rust::xxh3::xxh3_64_with_seed(upstream, 0x6b796c696e))
}

fn nonzero(k: u64) -> u64 {
    if k == 0 {
        1
    } else {
        k
    }
}

/// A view of the slot array.
pub struct LoadTable<'a> {
    slots: &'a [Slot],
}

impl<'a> LoadTable<'a> {
    pub fn new(slots: &'a [Slot]) -> LoadTable<'a> {
        LoadTable { slots }
    }

    /// The slots `key` may occupy, in probing order (linear probing from `key % n`).
    fn probe(&self, key: u64) -> impl Iterator<Item = &'a Slot> {
        let slots = self.slots;
        let n = slots.len();
        let start = if n == 0 { 0 } else { (key % n as u64) as usize };
        (0..n).map(move |i| &slots[(start + i) % n])
    }

    /// The slot for `key`, claiming a free one if needed. `None` when the table is full.
    pub fn slot(&self, key: u64) -> Option<&'a Slot> {
        if key == 0 {
            return None;
        }
        self.probe(key).find(|s| match s.key.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(k) => k == key,
        })
    }

    /// The slot for `key` if one was claimed.
    pub fn find(&self, key: u64) -> Option<&'a Slot> {
        if key == 0 {
            return None;
        }
        for s in self.probe(key) {
            match s.key.load(Ordering::Acquire) {
                0 => return None,
                k if k == key => return Some(s),
                _ => {}
            }
        }
        None
    }

    /// Slots in use.
    pub fn used(&self) -> usize {
        self.slots.iter().filter(|s| s.key() != 0).count()
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize) -> Vec<Slot> {
        (0..n).map(|_| Slot::default()).collect()
    }

    #[test]
    fn claim_find_and_count() {
        let v = table(8);
        let t = LoadTable::new(&v);
        let k = server_key(b"kylin", b"10.0.0.1:7070");
        assert!(t.find(k).is_none());
        let s = t.slot(k).unwrap();
        assert!(core::ptr::eq(s, t.slot(k).unwrap()));
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
        let v = table(3);
        let t = LoadTable::new(&v);
        // Keys that collide on the same start slot still get distinct slots.
        let keys = [3u64, 6, 9];
        let slots: Vec<_> = keys.iter().map(|&k| t.slot(k).unwrap() as *const Slot).collect();
        assert_ne!(slots[0], slots[1]);
        assert_ne!(slots[1], slots[2]);
        assert!(t.slot(12).is_none());
        assert!(t.find(12).is_none());
        assert!(core::ptr::eq(t.find(9).unwrap(), slots[2]));
        assert!(LoadTable::new(&[]).slot(1).is_none());
        assert!(t.slot(0).is_none());
    }

    #[test]
    fn keys_differ_by_upstream_and_server() {
        assert_ne!(server_key(b"a", b"x:1"), server_key(b"b", b"x:1"));
        assert_ne!(server_key(b"a", b"x:1"), server_key(b"a", b"x:2"));
        assert_ne!(server_key(b"ab", b"c"), server_key(b"a", b"bc"));
        assert_ne!(upstream_key(b"a"), 0);
    }

    #[test]
    fn concurrent_updates_are_exact() {
        let v = table(4);
        let t = LoadTable::new(&v);
        let s = t.slot(42).unwrap();
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
}
