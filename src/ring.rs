//! Weighted consistent-hash ring (pure Rust, no FFI).
//!
//! Every server contributes `POINTS_PER_WEIGHT * weight` points, placed by hashing the
//! server's identity (its address as nginx prints it, e.g. `10.0.0.7:7070`) with the point
//! number. A key is owned by the server of the first point at or after the key's hash,
//! wrapping around. Because a server's points depend only on its own identity and weight,
//! adding, removing or re-weighting one server moves only the keys that server owned or gains,
//! and two nginx instances with the same server list agree on every key whatever the order
//! of the `server` lines.
//!
//! [`Ring::order`] walks the ring from a key and yields each server once, in the order of its
//! first point: the key's own deterministic preference list. The first entry is the sticky
//! server; the next ones are where the key goes, always in the same order, when the servers
//! before are unavailable or (later) over their load bound.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Points per unit of weight, as in nginx's `hash ... consistent` (ketama).
pub const POINTS_PER_WEIGHT: u32 = 160;

/// Upper bound on the points of one ring, so that a typo such as `weight=100000` on a large
/// upstream cannot make every worker allocate gigabytes. 16 M points take 256 MiB, and their
/// bucket index 64 MiB more.
pub const MAX_POINTS: usize = 1 << 24;

// Point positions and bucket numbers are kept in u32.
const _: () = assert!(MAX_POINTS <= u32::MAX as usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Point {
    hash: u64,
    peer: u32,
}

/// A consistent-hash ring over `n` servers numbered `0..n` (their position in the upstream).
///
/// Finding a key's first point is a lookup in a bucket index, not a binary search: the top
/// `bits` bits of a hash select a bucket, `index[b]` is the first point at or after the
/// bucket's start, and with about one point per bucket the scan from there ends after one or
/// two comparisons (the index takes at most 8 bytes per point).
#[derive(Clone, Debug, Default)]
pub struct Ring {
    points: Vec<Point>,
    peers: usize,
    /// `1 << bits` + 1 entries: bucket -> first point at or after the bucket's lowest hash;
    /// the last entry is `points.len()`.
    index: Vec<u32>,
    /// Bits of the hash that select a bucket (0 for an empty ring).
    bits: u32,
}

/// Why a ring could not be built.
#[derive(Debug, PartialEq, Eq)]
pub enum RingError {
    TooManyPoints(usize),
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RingError::TooManyPoints(n) => write!(
                f,
                "the servers' total weight needs {n} hash ring points, more than {MAX_POINTS}"
            ),
        }
    }
}

/// Hash of a stickiness key (a client address, or the value of `kylin_hash`).
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

impl Ring {
    /// Builds the ring from `(identity, weight)` pairs, indexed in iteration order.
    /// A weight of 0 is treated as 1 (nginx never produces 0).
    pub fn new<'a, I>(servers: I) -> Result<Ring, RingError>
    where
        I: IntoIterator<Item = (&'a [u8], u32)>,
    {
        let servers: Vec<(&[u8], u32)> = servers.into_iter().collect();
        let total: usize = servers
            .iter()
            .map(|&(_, w)| w.max(1) as usize * POINTS_PER_WEIGHT as usize)
            .sum();
        if total > MAX_POINTS {
            return Err(RingError::TooManyPoints(total));
        }
        let mut points = Vec::with_capacity(total);
        for (peer, &(id, weight)) in servers.iter().enumerate() {
            for j in 0..weight.max(1) * POINTS_PER_WEIGHT {
                points.push(Point { hash: xxh3_64_with_seed(id, u64::from(j)), peer: peer as u32 });
            }
        }
        // Ties between two servers' points (vanishingly rare with 64-bit hashes) are broken by
        // the servers' identities, so the result does not depend on the order of `server` lines.
        points.sort_unstable_by(|a, b| {
            a.hash
                .cmp(&b.hash)
                .then_with(|| servers[a.peer as usize].0.cmp(servers[b.peer as usize].0))
        });
        let (index, bits) = bucket_index(&points);
        Ok(Ring { points, peers: servers.len(), index, bits })
    }

    /// Number of servers on the ring.
    pub fn peers(&self) -> usize {
        self.peers
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The server that owns `key` (its first choice). `None` only for an empty ring.
    #[inline]
    pub fn owner(&self, key: u64) -> Option<usize> {
        self.points.get(self.start(key)).map(|p| p.peer as usize)
    }

    /// Where `key` lands: its owner (first choice) and the position its preference list
    /// starts from ([`Ring::order_at`]), so that the list is only built when needed.
    /// `None` only for an empty ring.
    #[inline(always)]
    pub fn locate(&self, key: u64) -> Option<(usize, Landing)> {
        let start = self.start(key);
        let owner = self.points.get(start)?.peer as usize;
        Some((owner, Landing(start)))
    }

    /// The preference list of a key [`Ring::locate`]d at `at`; equal to `order(key)`.
    #[inline]
    pub fn order_at(&self, at: Landing) -> Order<'_> {
        Order { ring: self, pos: at.0, walked: 0, left: self.peers, seen: Bits::new(self.peers) }
    }

    /// Index of the first point at or after `key`, wrapping to 0: the key's bucket gives the
    /// first candidate, and the scan stops at the bucket's end (O(1) on average).
    #[inline(always)]
    fn start(&self, key: u64) -> usize {
        if self.bits == 0 {
            return 0;
        }
        let b = (key >> (64 - self.bits)) as usize;
        // Both entries exist: the index has 2^bits + 1 of them.
        let (mut i, end) = (self.index[b] as usize, self.index[b + 1] as usize);
        while i < end && self.points[i].hash < key {
            i += 1;
        }
        if i == self.points.len() {
            0
        } else {
            i
        }
    }

    /// The key's preference list: every server once, in ring order from the key.
    #[inline]
    pub fn order(&self, key: u64) -> Order<'_> {
        self.order_at(Landing(self.start(key)))
    }
}

/// A key's position on a ring, from [`Ring::locate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landing(usize);

/// Builds the bucket index of sorted `points`: about one bucket per point, at least 2.
fn bucket_index(points: &[Point]) -> (Vec<u32>, u32) {
    if points.is_empty() {
        return (Vec::new(), 0);
    }
    // MAX_POINTS (2^24) keeps both the bucket count and the positions within u32.
    let bits = points.len().next_power_of_two().trailing_zeros().clamp(1, 24);
    let buckets = 1usize << bits;
    let mut index = Vec::with_capacity(buckets + 1);
    let mut i = 0usize;
    for b in 0..buckets {
        let lowest = (b as u64) << (64 - bits);
        while i < points.len() && points[i].hash < lowest {
            i += 1;
        }
        index.push(i as u32);
    }
    index.push(points.len() as u32);
    (index, bits)
}

/// A fixed-size bit set: one word up to 64 servers, four up to 256, on the heap beyond.
#[derive(Debug)]
enum Bits {
    Word(u64),
    Inline([u64; 4]),
    Heap(Vec<u64>),
}

impl Bits {
    #[inline]
    fn new(n: usize) -> Bits {
        if n <= 64 {
            Bits::Word(0)
        } else if n <= 256 {
            Bits::Inline([0; 4])
        } else {
            Bits::Heap(vec![0; n.div_ceil(64)])
        }
    }

    /// Sets bit `i`; returns whether it was already set.
    #[inline]
    fn test_and_set(&mut self, i: usize) -> bool {
        let (w, m) = (i / 64, 1u64 << (i % 64));
        let word = match self {
            Bits::Word(x) => x,
            Bits::Inline(a) => &mut a[w],
            Bits::Heap(v) => &mut v[w],
        };
        let was = *word & m != 0;
        *word |= m;
        was
    }
}

/// Iterator over a key's preference list, see [`Ring::order`].
#[derive(Debug)]
pub struct Order<'a> {
    ring: &'a Ring,
    pos: usize,
    walked: usize,
    left: usize,
    seen: Bits,
}

impl Iterator for Order<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        let points = &self.ring.points;
        while self.left > 0 && self.walked < points.len() {
            let peer = points[self.pos].peer as usize;
            self.pos += 1;
            if self.pos == points.len() {
                self.pos = 0;
            }
            self.walked += 1;
            if !self.seen.test_and_set(peer) {
                self.left -= 1;
                return Some(peer);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.{}.{}:7070", i / 250, i % 250 + 1)).collect()
    }

    fn ring_of(names: &[String], weights: &[u32]) -> Ring {
        Ring::new(names.iter().zip(weights).map(|(n, &w)| (n.as_bytes(), w))).unwrap()
    }

    #[test]
    fn order_yields_every_server_once() {
        let n = names(7);
        let ring = ring_of(&n, &[1, 2, 1, 3, 1, 1, 1]);
        for k in 0..1000u64 {
            let mut o: Vec<usize> = ring.order(key_hash(&k.to_le_bytes())).collect();
            assert_eq!(o.len(), 7);
            assert_eq!(o[0], ring.owner(key_hash(&k.to_le_bytes())).unwrap());
            o.sort();
            assert_eq!(o, (0..7).collect::<Vec<_>>());
        }
    }

    #[test]
    fn empty_ring() {
        let ring = Ring::new(core::iter::empty()).unwrap();
        assert!(ring.is_empty());
        assert_eq!(ring.owner(42), None);
        assert_eq!(ring.order(42).count(), 0);
    }

    #[test]
    fn many_servers_use_heap_bits() {
        let n = names(300);
        let ring = ring_of(&n, &vec![1; 300]);
        assert_eq!(ring.order(12345).count(), 300);
    }

    #[test]
    fn weights_shape_the_share() {
        let n = names(3);
        let ring = ring_of(&n, &[1, 1, 2]);
        let mut count = [0usize; 3];
        for k in 0..40_000u32 {
            count[ring.owner(key_hash(&k.to_be_bytes())).unwrap()] += 1;
        }
        // Expected 10k / 10k / 20k; 160 points per unit keep each within a few percent.
        assert!((8_500..11_500).contains(&count[0]), "{count:?}");
        assert!((8_500..11_500).contains(&count[1]), "{count:?}");
        assert!((18_000..22_000).contains(&count[2]), "{count:?}");
    }

    #[test]
    fn too_many_points_is_an_error() {
        let n = names(2);
        let err = Ring::new(n.iter().map(|s| (s.as_bytes(), u32::MAX / 2))).unwrap_err();
        assert!(matches!(err, RingError::TooManyPoints(_)));
        assert!(err.to_string().contains("hash ring points"));
    }

    #[test]
    fn server_order_does_not_matter() {
        let n = names(5);
        let a = ring_of(&n, &[1, 2, 3, 1, 1]);
        let rev: Vec<String> = n.iter().rev().cloned().collect();
        let b = ring_of(&rev, &[1, 1, 3, 2, 1]);
        for k in 0..2000u32 {
            let h = key_hash(&k.to_le_bytes());
            let oa: Vec<&str> = a.order(h).map(|i| n[i].as_str()).collect();
            let ob: Vec<&str> = b.order(h).map(|i| rev[i].as_str()).collect();
            assert_eq!(oa, ob);
        }
    }

    proptest! {
        /// The bucket index finds the same first point as a binary search, for any key.
        #[test]
        fn bucket_lookup_matches_binary_search(
            weights in proptest::collection::vec(1u32..5, 1..40),
            keys in proptest::collection::vec(any::<u64>(), 300),
        ) {
            let n = names(weights.len());
            let ring = ring_of(&n, &weights);
            let last = ring.points.last().unwrap().hash;
            let first = ring.points[0].hash;
            let edges = [0, u64::MAX, first, last, first.wrapping_sub(1), last.wrapping_add(1)];
            for k in keys.into_iter().chain(edges).chain(ring.points.iter().map(|p| p.hash)) {
                let i = ring.points.partition_point(|p| p.hash < k);
                let want = if i == ring.points.len() { 0 } else { i };
                prop_assert_eq!(ring.start(k), want);
            }
        }

        /// Removing one server moves only the keys it owned; everything else keeps its owner,
        /// and the keys it owned go to their second choice.
        #[test]
        fn removing_a_server_moves_only_its_keys(
            weights in proptest::collection::vec(1u32..4, 2..12),
            victim_seed in any::<usize>(),
            keys in proptest::collection::vec(any::<u64>(), 200),
        ) {
            let n = names(weights.len());
            let full = ring_of(&n, &weights);
            let victim = victim_seed % weights.len();
            let kept: Vec<String> = n.iter().enumerate().filter(|&(i, _)| i != victim).map(|(_, s)| s.clone()).collect();
            let kept_w: Vec<u32> = weights.iter().enumerate().filter(|&(i, _)| i != victim).map(|(_, &w)| w).collect();
            let less = ring_of(&kept, &kept_w);
            for k in keys {
                let before: Vec<&str> = full.order(k).map(|i| n[i].as_str()).collect();
                let after = kept[less.owner(k).unwrap()].as_str();
                if before[0] == n[victim] {
                    prop_assert_eq!(after, before[1]);
                } else {
                    prop_assert_eq!(after, before[0]);
                }
            }
        }

        /// Adding a server moves keys only onto the new server.
        #[test]
        fn adding_a_server_moves_keys_only_to_it(
            weights in proptest::collection::vec(1u32..4, 1..12),
            new_weight in 1u32..4,
            keys in proptest::collection::vec(any::<u64>(), 200),
        ) {
            let n = names(weights.len() + 1);
            let old = ring_of(&n[..weights.len()], &weights);
            let mut w2 = weights.clone();
            w2.push(new_weight);
            let new = ring_of(&n, &w2);
            for k in keys {
                let a = old.owner(k).unwrap();
                let b = new.owner(k).unwrap();
                prop_assert!(a == b || b == weights.len());
            }
        }

        /// Changing one server's weight moves keys only to or from that server.
        #[test]
        fn reweighting_moves_keys_only_to_or_from_that_server(
            weights in proptest::collection::vec(1u32..4, 2..10),
            which in any::<usize>(),
            new_weight in 1u32..6,
            keys in proptest::collection::vec(any::<u64>(), 200),
        ) {
            let n = names(weights.len());
            let which = which % weights.len();
            let a = ring_of(&n, &weights);
            let mut w2 = weights.clone();
            w2[which] = new_weight;
            let b = ring_of(&n, &w2);
            for k in keys {
                let (x, y) = (a.owner(k).unwrap(), b.owner(k).unwrap());
                prop_assert!(x == y || x == which || y == which);
            }
        }
    }
}
