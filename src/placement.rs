//! Client placement: where a client (a stickiness key) lives, and when it moves (pure Rust).
//!
//! Issue #13. Request-level bounded load ([`crate::balancer`]) moves single requests of a
//! busy client to nodes whose caches are cold for it whenever a node's in-flight count
//! exceeds `c` times the mean, which on Kylin (a miss costs ~12x a hit) loses to plain
//! consistent hashing on layouts where hashing happens to be balanced. This module moves
//! *whole clients*, rarely, and only when it pays:
//!
//! - A key's **home** is the first usable server of its ring order (as today).
//! - The key stays on its current server (home, or where it was moved) unless that server is
//!   **hot**: its time-averaged in-flight count is at least `hot` (an absolute level: on a
//!   4-slot Kylin node, queueing starts around 2-3) **and** at least `rel` times the mean
//!   over usable servers (the rest of the cluster is not just as busy).
//! - Only a **major** key moves: its own load (its average requests in flight, from its
//!   response times by Little's law) is above `major` and at least `share` of the hot
//!   server's load, and it is known (the key is `tau` old, or logins gave it an expected
//!   load). Light clients never move: moving them costs their cache and relieves nothing.
//! - Its target must relieve the hot server: after the move it carries less than the hot
//!   server did, by `margin`: `L(t) + k + margin <= L(cur)`. Among those, the **first server
//!   of the key's own ring order** that ends no busier than the hot one is left
//!   (`L(t) + k <= L(cur) - k`), else the least loaded: the same key, in the same situation,
//!   lands on the same server, and never joins another busy client while a server is free.
//! - The key's expected load moves with it at once (subtracted from the hot server's average,
//!   added to the target's), so the next decision sees the cluster as it will be: no second
//!   client chases the same server before its average has risen.
//! - **Logins bring expected load.** A new session is expected to bring `session` requests
//!   in flight until its requests are measured: [`Placement::login`] adds that to its
//!   server and its key at once. With node-local sessions the login is the only moment a
//!   client's load can move, and a BI server opening its session pool logs in many times
//!   within a second, long before any response time is known.
//! - **Hysteresis**: a moved key stays for at least `residence` before it may move again or
//!   return; it returns home only when home, with the key back, would not be hot
//!   (`L(home) + k < hot`) and would not be busier than where it is. Optionally, after a key
//!   leaves a server, no other key leaves that server for `cooldown` (0 by default: the
//!   expected-load transfer already prevents a herd).
//!
//! State: per server, a time-weighted average of its in-flight count (updated when the count
//! changes, plus the expected load of logins and moves); per key, in a bounded table (a full
//! probe window evicts its least-loaded key that has not moved), a decayed sum of its
//! response times and login priors, the server it was moved to and since when. Everything is
//! integer arithmetic on `u64`, in milliseconds and thousandths of a request, so it can live
//! in shared memory (the caller serializes access, e.g. under the zone's lock).
//!
//! The caller decides *which* requests may follow the placement (logins and requests without
//! a session, shared sessions); node-local sessions stay on the node that created them.

/// Tunables, in milliseconds and thousandths of a request in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Averaging time of the loads (server in-flight, key load).
    pub tau_ms: u64,
    /// A server is hot when its average in-flight is at least this (thousandths).
    pub hot_milli: u64,
    /// ... and at least this multiple of the mean over usable servers (thousandths).
    pub rel_milli: u64,
    /// A key may move only if its load is at least this share of its server's (thousandths).
    pub share_milli: u64,
    /// A key is major only above this load (thousandths of a request in flight).
    pub major_milli: u64,
    /// A move must leave the target below the hot server's load minus this (thousandths).
    pub margin_milli: u64,
    /// A moved key stays at least this long before it moves again or returns.
    pub residence_ms: u64,
    /// After a key leaves a server, no other key leaves it for this long.
    pub cooldown_ms: u64,
    /// Expected load of a new session until measured (thousandths of a request in flight):
    /// a login adds it to its server and its key at once ([`Placement::login`]).
    pub session_milli: u64,
    /// Logins add that prior only while their key is younger than this (its cold start;
    /// later its measured load counts, and re-logins would inflate it); 0: always.
    pub prior_window_ms: u64,
    /// ... and only while the key's expected load from logins is below this (thousandths of a
    /// request in flight): a client that logs in on every request (Kylin's REST API called
    /// with `Authorization: Basic` and no cookie jar gets a new session each time) would
    /// otherwise look as busy as its login rate, however light its queries. The cap bounds
    /// that error, it does not remove it: such a client looks up to this much busier than it
    /// is. 16 (32 logins' worth) is above what any simulated BI server reached (the same
    /// results as no cap in every cell of `scripts/bench-placement --quick`, while 4 lost up to
    /// 0.16x: `bench/placement-research.md`, section 4).
    pub prior_cap_milli: u64,
}

impl Params {
    /// Defaults chosen with `examples/factor_sim.rs cluster` (bench/placement-research.md):
    /// the results hardly depend on `hot` (1 to 3), `share` or `residence`; `tau` of 1 s reacts
    /// within a second; `session` matters for long node-local sessions (0 loses 0.3x there).
    pub const DEFAULT: Params = Params {
        tau_ms: 1_000,
        hot_milli: 2_000,
        rel_milli: 1_250,
        share_milli: 250,
        major_milli: 500,
        margin_milli: 500,
        residence_ms: 30_000,
        cooldown_ms: 0,
        session_milli: 500,
        prior_window_ms: 0,
        prior_cap_milli: 16_000,
    };
}

impl Default for Params {
    fn default() -> Params {
        Params::DEFAULT
    }
}

/// Time-weighted average of a server's in-flight count. All-zero bytes are a valid, empty
/// entry (so the table can live in zeroed shared memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ServerLoad {
    /// Average in-flight, thousandths, as of `at_ms`.
    avg_milli: u64,
    /// In-flight count since `at_ms`.
    level: u64,
    at_ms: u64,
    /// When a key last left this server (0: never).
    left_ms: u64,
    /// Keys currently moved to this server.
    moved_in: u64,
}

/// `x * tau / (tau + dt)`: exponential decay over `dt`, to first order, exact for dt = 0.
#[inline]
fn decay(x: u64, dt: u64, tau: u64) -> u64 {
    if dt == 0 {
        return x;
    }
    let tau = tau.max(1);
    // 64-bit arithmetic for every realistic value (a u128 division costs several times more).
    match (x.checked_mul(tau), tau.checked_add(dt)) {
        (Some(n), Some(d)) => n / d,
        _ => ((u128::from(x) * u128::from(tau)) / (u128::from(tau) + u128::from(dt))) as u64,
    }
}

impl ServerLoad {
    /// Keys currently moved to this server.
    pub fn moved_in(&self) -> u64 {
        self.moved_in
    }

    /// The average as of `now`, with the level held since `at_ms`.
    fn avg_at(&self, now: u64, tau: u64) -> u64 {
        let dt = now.saturating_sub(self.at_ms);
        let target = self.level.saturating_mul(1000);
        // avg moves toward target by dt / (tau + dt).
        if target >= self.avg_milli {
            target - decay(target - self.avg_milli, dt, tau)
        } else {
            target + decay(self.avg_milli - target, dt, tau)
        }
    }
}

/// One key's entry in the bounded table. All-zero bytes are a free entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct KeyEntry {
    /// The key's hash; 0 marks a free entry (a key hashing to 0 is stored as 1).
    key: u64,
    /// Decayed sum of the key's response times, in milliseconds x 1000, as of `at_ms`.
    busy: u64,
    /// Decayed sum of its logins' expected loads, in the same unit.
    prior: u64,
    at_ms: u64,
    /// Server the key was moved to, plus one (0: at home).
    moved: u32,
    /// When the key last moved (or returned).
    since_ms: u64,
    /// When the entry was made: a key's load is known once it is `tau` old...
    first_ms: u64,
    /// ... or once a login gave it an expected load (1; 0 otherwise).
    expected: u32,
}

impl KeyEntry {
    /// The key's load as of `now`: its average requests in flight (measured, plus what its
    /// logins are expected to bring), thousandths.
    fn load_at(&self, now: u64, tau: u64) -> u64 {
        decay(self.busy.saturating_add(self.prior), now.saturating_sub(self.at_ms), tau) / tau.max(1)
    }

    /// Decays both sums to `now`.
    fn advance(&mut self, now: u64, tau: u64) {
        let dt = now.saturating_sub(self.at_ms);
        self.busy = decay(self.busy, dt, tau);
        self.prior = decay(self.prior, dt, tau);
        self.at_ms = now.max(self.at_ms);
    }
}

/// How [`Placement::place`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// The key's home (first usable server of its order).
    Home,
    /// Where the key was moved earlier, and stays.
    Moved,
    /// The key was moved just now (from a hot server).
    MovedNow,
    /// The key returned home just now.
    Returned,
}

/// Probe window of the key table: a key lives in one of this many entries from its slot.
const PROBE: usize = 8;

/// The placement state of one group of servers: its tables in `S` (servers) and `K` (keys),
/// owned ([`Placement::new`]) or borrowed from shared memory ([`Placement::over`]).
#[derive(Clone, Debug)]
pub struct Placement<S = Vec<ServerLoad>, K = Vec<KeyEntry>> {
    params: Params,
    sv: S,
    ks: K,
}

impl Placement {
    /// `servers` servers, a key table of `table` entries (rounded up to a power of two, at
    /// least `PROBE`).
    pub fn new(servers: usize, table: usize, params: Params) -> Placement {
        let table = table.max(PROBE).next_power_of_two();
        Placement { params, sv: vec![ServerLoad::default(); servers], ks: vec![KeyEntry::default(); table] }
    }
}

impl<'a> Placement<&'a mut [ServerLoad], &'a mut [KeyEntry]> {
    /// The placement kept in `servers` and `keys` (e.g. in shared memory, all-zero bytes at
    /// first); `None` unless the key table has a power-of-two size of at least `PROBE`.
    pub fn over(params: Params, servers: &'a mut [ServerLoad], keys: &'a mut [KeyEntry]) -> Option<Self> {
        (keys.len() >= PROBE && keys.len().is_power_of_two()).then_some(Placement { params, sv: servers, ks: keys })
    }
}

impl<S, K> Placement<S, K>
where
    S: AsRef<[ServerLoad]> + AsMut<[ServerLoad]>,
    K: AsRef<[KeyEntry]> + AsMut<[KeyEntry]>,
{
    pub fn params(&self) -> &Params {
        &self.params
    }

    #[inline(always)]
    fn servers(&self) -> &[ServerLoad] {
        self.sv.as_ref()
    }

    #[inline(always)]
    fn servers_mut(&mut self) -> &mut [ServerLoad] {
        self.sv.as_mut()
    }

    #[inline(always)]
    fn keys(&self) -> &[KeyEntry] {
        self.ks.as_ref()
    }

    #[inline(always)]
    fn keys_mut(&mut self) -> &mut [KeyEntry] {
        self.ks.as_mut()
    }

    /// Forgets everything (the servers changed: indices mean other servers now).
    pub fn reset(&mut self) {
        self.servers_mut().fill(ServerLoad::default());
        self.keys_mut().fill(KeyEntry::default());
    }

    /// Samples the in-flight counts of the first `n` servers (`inflight(i)`; `None` leaves
    /// server `i` as it is). The glue calls this every few milliseconds instead of at every
    /// change: the averages span `tau` (a second), so a sample every 10 ms loses little.
    pub fn sample(&mut self, n: usize, inflight: impl Fn(usize) -> Option<u64>, now: u64) {
        for i in 0..n.min(self.servers().len()) {
            if let Some(level) = inflight(i) {
                self.server_inflight(i, level, now);
            }
        }
    }

    /// Whether placement has anything to do: some server's average in flight (per unit of
    /// `weight`) is at least half of `hot`, or some key is moved. While it is not, the glue
    /// neither measures keys nor asks [`Placement::place`]: every key is at home.
    /// Only the first `n` servers are looked at.
    pub fn busy(&self, n: usize, weight: impl Fn(usize) -> u64, now: u64) -> bool {
        self.busy_reported(n, weight, |_| false, now)
    }

    /// [`Placement::busy`], also true when some server reports saturation (`saturated(i)`,
    /// from `kylin_load_report`): load from outside this nginx counts too.
    pub fn busy_reported(&self, n: usize, weight: impl Fn(usize) -> u64, saturated: impl Fn(usize) -> bool, now: u64) -> bool {
        if (0..n.min(self.servers().len())).any(&saturated) {
            return true;
        }
        let tau = self.params.tau_ms;
        let half = self.params.hot_milli / 2;
        self.servers().iter().take(n).enumerate().any(|(i, s)| s.moved_in > 0 || s.avg_at(now, tau) / weight(i).max(1) >= half)
    }

    /// Keys currently moved to server `i`.
    pub fn moved_to(&self, i: usize) -> u64 {
        self.servers().get(i).map_or(0, |s| s.moved_in)
    }

    /// Sets entry `idx`'s move (target + 1, 0: home), keeping the servers' counts.
    fn set_moved(&mut self, idx: usize, moved: u32) {
        let old = self.keys()[idx].moved;
        if old == moved {
            return;
        }
        if let Some(s) = old.checked_sub(1).and_then(|o| self.servers_mut().get_mut(o as usize)) {
            s.moved_in = s.moved_in.saturating_sub(1);
        }
        if let Some(s) = moved.checked_sub(1).and_then(|m| self.servers_mut().get_mut(m as usize)) {
            s.moved_in += 1;
        }
        self.keys_mut()[idx].moved = moved;
    }

    /// Server `i`'s in-flight count changed to `inflight` at `now` (call at `get` and `free`).
    pub fn server_inflight(&mut self, i: usize, inflight: u64, now: u64) {
        let tau = self.params.tau_ms;
        if let Some(s) = self.servers_mut().get_mut(i) {
            s.avg_milli = s.avg_at(now, tau);
            s.at_ms = now.max(s.at_ms);
            s.level = inflight;
        }
    }

    /// Server `i`'s average in-flight as of `now`, thousandths.
    pub fn server_load(&self, i: usize, now: u64) -> u64 {
        self.servers().get(i).map_or(0, |s| s.avg_at(now, self.params.tau_ms))
    }

    /// A request of `key` finished after `response_ms` (call at `free`, for every request of
    /// the key, pinned or not: logins need to know the load a client brings).
    pub fn key_done(&mut self, key: u64, response_ms: u64, now: u64) {
        let tau = self.params.tau_ms;
        let i = self.entry(key, now);
        let e = &mut self.keys_mut()[i];
        e.advance(now, tau);
        e.busy = e.busy.saturating_add(response_ms.saturating_mul(1000));
    }

    /// A login of `key` was placed on server `i` (a new session, which will stay there if
    /// node-local). Until its requests are measured, the session is expected to bring
    /// `session` requests in flight: that much is added to the server's average and to the
    /// key's load at once (and decays with `tau` as measurements take over), so a burst of
    /// logins, e.g. a BI server opening its session pool, sees its own load building up.
    pub fn login(&mut self, key: u64, i: usize, now: u64) {
        let p = self.params;
        if p.session_milli == 0 || i >= self.servers().len() {
            return;
        }
        if p.prior_window_ms > 0 {
            if let Some(j) = self.find(key) {
                if now.saturating_sub(self.keys()[j].first_ms) >= p.prior_window_ms {
                    return;
                }
            }
        }
        let j = self.entry(key, now);
        let tau = p.tau_ms.max(1);
        let e = &mut self.keys_mut()[j];
        e.advance(now, tau);
        // Expected load beyond the cap is not believed: logins that come faster than their
        // sessions could bring requests are sessions that are not kept.
        if p.prior_cap_milli > 0 && e.prior / tau >= p.prior_cap_milli {
            return;
        }
        e.prior = e.prior.saturating_add(p.session_milli.saturating_mul(tau));
        // Its load is known now (an estimate that errs on the heavy side).
        e.expected = 1;
        let s = &mut self.servers_mut()[i];
        s.avg_milli = s.avg_at(now, p.tau_ms).saturating_add(p.session_milli);
        s.at_ms = now.max(s.at_ms);
    }

    /// The key's load as of `now` (0 if unknown), thousandths of a request in flight.
    pub fn key_load(&self, key: u64, now: u64) -> u64 {
        self.find(key).map_or(0, |i| self.keys()[i].load_at(now, self.params.tau_ms))
    }

    /// Where `key` should be served: `order` is its ring order, `usable(i)` whether server `i`
    /// may take a request now, `weight(i)` its `weight` (loads are compared per unit of
    /// weight, so a server of weight 2 is hot at twice the in-flight count). `None` only when
    /// no server is usable.
    pub fn place<I, U, W>(&mut self, key: u64, order: I, usable: U, weight: W, now: u64) -> Option<(usize, Placed)>
    where
        I: IntoIterator<Item = usize>,
        U: FnMut(usize) -> bool,
        W: Fn(usize) -> u64,
    {
        self.place_reported(key, order, usable, weight, |_| false, now)
    }

    /// [`Placement::place`] with the servers' own reports (`kylin_load_report`):
    /// `saturated(i)` says server `i` reports saturation (a fresh report whose `busy=`
    /// condition holds). A saturated server counts as at least hot (its load per unit of weight
    /// is taken as at least `hot + margin`, whatever this nginx has in flight there) and is
    /// never a move target nor a home to return to; it is still usable, so a key whose every
    /// other server is busy stays. With `saturated` false everywhere (reports missing or stale)
    /// this is exactly [`Placement::place`].
    pub fn place_reported<I, U, W, R>(&mut self, key: u64, order: I, mut usable: U, weight: W, saturated: R, now: u64) -> Option<(usize, Placed)>
    where
        I: IntoIterator<Item = usize>,
        U: FnMut(usize) -> bool,
        W: Fn(usize) -> u64,
        R: Fn(usize) -> bool,
    {
        // The usable part of the key's order, on the stack for up to 64 servers; its first
        // server is home.
        let mut buf = [0usize; 64];
        let mut n = 0;
        let len = self.servers().len();
        let mut rest = order.into_iter();
        for i in rest.by_ref() {
            if i < len && usable(i) {
                buf[0] = i;
                n = 1;
                break;
            }
        }
        let home = *buf[..n].first()?;
        let p = self.params;
        // The common case, decided without the rest of the order: a key that is not moved and
        // whose home is not hot stays.
        let moved_now = self.find(key).is_some_and(|i| self.keys()[i].moved != 0);
        if !moved_now && !saturated(home) && self.server_load(home, now) / weight(home).max(1) < p.hot_milli {
            return Some((home, Placed::Home));
        }
        for i in rest {
            if n < buf.len() && i < len && usable(i) {
                buf[n] = i;
                n += 1;
            }
        }
        let order = &buf[..n];
        let idx = self.entry(key, now);
        let e = self.keys()[idx];
        let kl = e.load_at(now, p.tau_ms);
        let moved = e.moved.checked_sub(1).map(|m| m as usize).filter(|&m| m != home && order.contains(&m));
        let cur = moved.unwrap_or(home);
        // Load per unit of weight, with `extra` added first; a saturated server's is at least
        // `hot + margin`.
        let floor = p.hot_milli.saturating_add(p.margin_milli);
        let per = |s: &Self, i: usize, extra: u64| {
            let l = (s.server_load(i, now) + extra) / weight(i).max(1);
            if saturated(i) {
                l.max(floor)
            } else {
                l
            }
        };
        let settled = now.saturating_sub(e.since_ms) >= p.residence_ms || e.since_ms == 0;

        // A moved key returns home when home, with it back, is not hot and not busier.
        if let Some(m) = moved {
            if settled {
                let back = per(self, home, kl);
                if back < p.hot_milli && back <= per(self, m, 0) {
                    self.set_moved(idx, 0);
                    self.keys_mut()[idx].since_ms = now.max(1);
                    self.transfer(m, home, kl, now);
                    return Some((home, Placed::Returned));
                }
            }
        } else if e.moved != 0 {
            // Its target is gone or unusable: home again.
            self.set_moved(idx, 0);
        }

        let lc = per(self, cur, 0);
        let known = e.expected != 0 || now.saturating_sub(e.first_ms) >= p.tau_ms;
        let major = kl > p.major_milli && kl.saturating_mul(1000) >= p.share_milli.saturating_mul(self.server_load(cur, now));
        if settled && known && major && lc >= p.hot_milli {
            let total: u64 = order.iter().map(|&i| self.server_load(i, now)).sum();
            let weights: u64 = order.iter().map(|&i| weight(i).max(1)).sum();
            let mean = total / weights.max(1);
            let left = self.servers()[cur].left_ms;
            let cooled = left == 0 || now.saturating_sub(left) >= p.cooldown_ms;
            // A saturated server is hot whatever the mean of this nginx's loads says.
            if cooled && (saturated(cur) || lc.saturating_mul(1000) >= p.rel_milli.saturating_mul(mean)) {
                // Servers where the move lowers the hot one's load by the margin at least: the
                // first of the key's order that ends no busier than the hot one is left (a
                // stable choice that never piles two clients up while a server is free), else
                // the least loaded.
                let fits = |s: &Self, t: usize| t != cur && !saturated(t) && per(s, t, kl) + p.margin_milli <= lc;
                let left_behind = per(self, cur, 0).saturating_sub(kl / weight(cur).max(1));
                let target = order.iter().copied().find(|&t| fits(self, t) && per(self, t, kl) <= left_behind).or_else(|| {
                    order.iter().copied().filter(|&t| fits(self, t)).min_by_key(|&t| per(self, t, 0))
                });
                if let Some(t) = target {
                    self.set_moved(idx, if t == home { 0 } else { t as u32 + 1 });
                    self.keys_mut()[idx].since_ms = now.max(1);
                    self.servers_mut()[cur].left_ms = now.max(1);
                    self.transfer(cur, t, kl, now);
                    return Some((t, if t == home { Placed::Returned } else { Placed::MovedNow }));
                }
            }
        }
        Some((cur, if cur == home { Placed::Home } else { Placed::Moved }))
    }

    /// Moves `load` of expected load from server `from` to server `to` in their averages, so
    /// that the next decisions see the cluster as it will be once the key's requests follow
    /// (no second key chases the same cool server before its average has risen).
    fn transfer(&mut self, from: usize, to: usize, load: u64, now: u64) {
        let tau = self.params.tau_ms;
        for (i, add) in [(from, false), (to, true)] {
            let s = &mut self.servers_mut()[i];
            s.avg_milli = s.avg_at(now, tau);
            s.at_ms = now.max(s.at_ms);
            s.avg_milli = if add { s.avg_milli.saturating_add(load) } else { s.avg_milli.saturating_sub(load) };
        }
    }

    /// Number of keys currently moved off their home (for status pages and tests).
    pub fn moved_keys(&self) -> usize {
        self.servers().iter().map(|s| s.moved_in as usize).sum()
    }

    #[inline]
    fn slot(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & (self.keys().len() - 1)
    }

    fn find(&self, key: u64) -> Option<usize> {
        let key = key.max(1);
        let mask = self.keys().len() - 1;
        let s = self.slot(key);
        (0..PROBE).map(|j| (s + j) & mask).find(|&i| self.keys()[i].key == key)
    }

    /// The key's entry, inserted if absent. A full probe window evicts the entry with the
    /// least load among those not moved (a moved key keeps its entry unless all are moved).
    fn entry(&mut self, key: u64, now: u64) -> usize {
        if let Some(i) = self.find(key) {
            return i;
        }
        let key = key.max(1);
        let mask = self.keys().len() - 1;
        let s = self.slot(key);
        let tau = self.params.tau_ms;
        let i = (0..PROBE)
            .map(|j| (s + j) & mask)
            .find(|&i| self.keys()[i].key == 0)
            .unwrap_or_else(|| {
                (0..PROBE)
                    .map(|j| (s + j) & mask)
                    .min_by_key(|&i| (self.keys()[i].moved != 0, self.keys()[i].load_at(now, tau)))
                    .unwrap_or(s)
            });
        self.set_moved(i, 0);
        self.keys_mut()[i] = KeyEntry { key, busy: 0, prior: 0, at_ms: now, moved: 0, since_ms: 0, first_ms: now, expected: 0 };
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: Params = Params::DEFAULT;

    fn order(first: usize, n: usize) -> Vec<usize> {
        (0..n).map(|j| (first + j) % n).collect()
    }

    /// Sets every server's average to its level, as if held forever.
    fn levels(p: &mut Placement, levels: &[u64], now: u64) {
        for (i, &l) in levels.iter().enumerate() {
            let s = &mut p.sv[i];
            *s = ServerLoad { avg_milli: l * 1000, level: l, at_ms: now, ..*s };
        }
    }

    /// Gives `key` a load of `milli` thousandths of a request in flight, known since long ago.
    fn key(p: &mut Placement, key: u64, milli: u64, now: u64) {
        let i = p.entry(key, now);
        let e = &mut p.ks[i];
        e.busy = milli * p.params.tau_ms;
        e.at_ms = now;
        e.expected = 1;
    }

    #[test]
    fn borrowed_tables_work_as_owned_ones_and_reset() {
        let mut servers = [ServerLoad::default(); 4];
        let mut keys = [KeyEntry::default(); 16];
        assert!(Placement::over(D, &mut servers, &mut keys[..12]).is_none());
        let mut p = Placement::over(D, &mut servers, &mut keys).unwrap();
        let now = 100_000;
        // Quiet: nothing to do.
        p.sample(4, |_| Some(0), now - 100 * D.tau_ms);
        assert!(!p.busy(4, |_| 1, now - 100 * D.tau_ms));
        // One server held at 6 in flight for long: busy; a major key moves off it.
        p.sample(4, |i| Some(if i == 0 { 6 } else { 0 }), now - 100 * D.tau_ms);
        p.sample(4, |_| None, now);
        assert!(p.busy(4, |_| 1, now));
        for _ in 0..40 {
            p.key_done(5, 100, now - D.tau_ms);
        }
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now).map(|r| r.1), Some(Placed::MovedNow));
        assert_eq!(p.moved_keys(), 1);
        assert_eq!(p.moved_to(1) + p.moved_to(2) + p.moved_to(3), 1);
        // Still busy while a key is moved, even once every server is quiet.
        p.sample(4, |_| Some(0), now + 1000 * D.tau_ms);
        assert!(p.busy(4, |_| 1, now + 1000 * D.tau_ms));
        p.reset();
        assert_eq!(p.moved_keys(), 0);
        assert!(!p.busy(4, |_| 1, now + 1000 * D.tau_ms));
        assert!(servers.iter().all(|s| *s == ServerLoad::default()));
    }

    #[test]
    fn averages_follow_levels_and_responses() {
        let mut p = Placement::new(2, 16, D);
        let mut now = 1;
        p.server_inflight(0, 3, now);
        now += 100 * D.tau_ms;
        let l = p.server_load(0, now);
        assert!((2_950..=3_000).contains(&l), "{l}");
        assert_eq!(p.server_load(1, now), 0);
        // Two requests of 100 ms in flight all the time: one response every 50 ms.
        for _ in 0..(20 * D.tau_ms / 50) {
            p.key_done(42, 100, now);
            now += 50;
        }
        let k = p.key_load(42, now);
        assert!((1_800..=2_100).contains(&k), "{k}");
        assert_eq!(p.key_load(7, now), 0);
        // Both decay once nothing happens.
        now += 100 * D.tau_ms;
        p.server_inflight(0, 0, now);
        assert!(p.server_load(0, now + 100 * D.tau_ms) < 100);
        assert!(p.key_load(42, now) < 100);
    }

    #[test]
    fn stays_home_when_nothing_is_hot() {
        let mut p = Placement::new(4, 16, D);
        let now = 100_000;
        key(&mut p, 9, 1_500, now);
        // Busiest server below `hot`, however uneven.
        levels(&mut p, &[1, 0, 0, 0], now);
        assert_eq!(p.place(9, order(0, 4), |_| true, |_| 1, now), Some((0, Placed::Home)));
        // Hot, but so is everyone (not above `rel` times the mean).
        levels(&mut p, &[5, 5, 5, 4], now);
        assert_eq!(p.place(9, order(0, 4), |_| true, |_| 1, now), Some((0, Placed::Home)));
    }

    #[test]
    fn a_new_key_does_not_move_before_its_load_is_known() {
        let mut p = Placement::new(4, 16, D);
        let now = 100_000;
        levels(&mut p, &[8, 0, 0, 0], now);
        for _ in 0..20 {
            p.key_done(5, 200, now);
        }
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now), Some((0, Placed::Home)));
        assert!(matches!(p.place(5, order(0, 4), |_| true, |_| 1, now + D.tau_ms), Some((_, Placed::MovedNow))));
    }

    #[test]
    fn a_major_key_leaves_a_hot_server_for_its_first_cool_one_and_stays() {
        let mut p = Placement::new(4, 16, D);
        let mut now = 100_000;
        key(&mut p, 5, 3_000, now);
        // Server 1 (next in order) is busy: 3 + 3 + 0.5 > 6; server 2 is cool.
        levels(&mut p, &[6, 3, 0, 0], now);
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now), Some((2, Placed::MovedNow)));
        // Its expected load moved with it.
        assert_eq!(p.server_load(0, now), 3_000);
        assert_eq!(p.server_load(2, now), 3_000);
        // It keeps landing there while the reason lasts (and within its residence, whatever).
        for _ in 0..5 {
            now += 1_000;
            levels(&mut p, &[3, 3, 3, 0], now);
            assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now), Some((2, Placed::Moved)));
        }
        assert_eq!(p.moved_keys(), 1);
    }

    #[test]
    fn no_cool_server_means_the_least_loaded_one_that_relieves() {
        let mut p = Placement::new(4, 16, D);
        let now = 100_000;
        key(&mut p, 5, 3_000, now);
        levels(&mut p, &[9, 5, 3, 4], now);
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now), Some((2, Placed::MovedNow)));
        // Nothing relieves enough: stays.
        let mut p = Placement::new(2, 16, D);
        key(&mut p, 5, 3_000, now);
        levels(&mut p, &[6, 3], now);
        assert_eq!(p.place(5, order(0, 2), |_| true, |_| 1, now), Some((0, Placed::Home)));
    }

    #[test]
    fn loads_are_compared_per_unit_of_weight() {
        let mut p = Placement::new(3, 16, D);
        let now = 100_000;
        key(&mut p, 5, 2_000, now);
        // Server 0 has weight 4: 6 in flight is 1.5 per unit, not hot.
        levels(&mut p, &[6, 0, 0], now);
        let w = |i: usize| if i == 0 { 4 } else { 1 };
        assert_eq!(p.place(5, order(0, 3), |_| true, w, now), Some((0, Placed::Home)));
        // Weight 1 everywhere: hot, moves.
        assert_eq!(p.place(5, order(0, 3), |_| true, |_| 1, now), Some((1, Placed::MovedNow)));
    }

    #[test]
    fn a_login_burst_moves_a_client_before_anything_is_measured() {
        // Three BI servers share home 0 and open their session pools at once: each login adds
        // half a request in flight. The first client to be major on a hot server leaves, the
        // next one goes elsewhere again, and one stays home.
        let mut p = Placement::new(4, 64, D);
        let orders = [vec![0, 1, 2, 3], vec![0, 2, 3, 1], vec![0, 3, 1, 2]];
        let mut now = 1_000;
        let mut at = [0usize; 3];
        for round in 0..6 {
            for c in 0..3 {
                now += 5;
                let (s, _) = p.place(10 + c as u64, orders[c].clone(), |_| true, |_| 1, now).unwrap();
                p.login(10 + c as u64, s, now);
                if round == 5 {
                    at[c] = s;
                }
            }
        }
        let mut distinct = at.to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{at:?}");
        assert!(at.contains(&0));
        assert!(p.moved_keys() == 2);
    }

    #[test]
    fn the_login_prior_can_be_limited_to_a_keys_cold_start() {
        let mut p = Placement::new(2, 16, Params { prior_window_ms: 3_000, ..D });
        p.key_done(8, 1, 1_000);
        p.login(8, 0, 2_000);
        assert!(p.key_load(8, 2_000) >= 500);
        let before = p.server_load(0, 10_000);
        p.login(8, 0, 10_000);
        assert_eq!(p.server_load(0, 10_000), before);
    }

    #[test]
    fn logging_in_on_every_request_does_not_make_a_server_hot() {
        // A tool without a cookie jar: a new session per request, 1,000 of them in a second,
        // each answered at once. Its priors stop at the cap.
        let mut p = Placement::new(2, 16, D);
        let mut now = 10_000;
        for _ in 0..1_000 {
            p.login(9, 0, now);
            p.key_done(9, 1, now);
            now += 1;
        }
        // Its measured load: one response of 1 ms every millisecond, one request in flight.
        assert!(p.key_load(9, now) <= D.prior_cap_milli + D.session_milli + 1_000, "{}", p.key_load(9, now));
        assert!(p.server_load(0, now) <= D.prior_cap_milli + D.session_milli, "{}", p.server_load(0, now));
        assert!(p.server_load(0, now) >= D.prior_cap_milli / 2, "{}", p.server_load(0, now));
        // Without the cap it would look like hundreds of requests in flight.
        let mut q = Placement::new(2, 16, Params { prior_cap_milli: 0, ..D });
        let mut now = 10_000;
        for _ in 0..1_000 {
            q.login(9, 0, now);
            now += 1;
        }
        assert!(q.server_load(0, now) > 100_000);
    }

    #[test]
    fn one_session_clients_are_not_major() {
        let mut p = Placement::new(4, 16, D);
        let now = 100_000;
        levels(&mut p, &[3, 0, 0, 0], now);
        p.login(3, 0, now);
        assert_eq!(p.place(3, order(0, 4), |_| true, |_| 1, now), Some((0, Placed::Home)));
        p.login(3, 0, now);
        assert_eq!(p.place(3, order(0, 4), |_| true, |_| 1, now), Some((1, Placed::MovedNow)));
    }

    #[test]
    fn light_keys_never_move() {
        let mut p = Placement::new(4, 16, D);
        let now = 100_000;
        key(&mut p, 3, 100, now);
        levels(&mut p, &[8, 0, 0, 0], now);
        assert_eq!(p.place(3, order(0, 4), |_| true, |_| 1, now), Some((0, Placed::Home)));
    }

    #[test]
    fn returns_home_after_residence_when_home_is_cool() {
        let params = Params { hot_milli: 3_000, ..D };
        let mut p = Placement::new(3, 16, params);
        let start = 100_000;
        key(&mut p, 5, 1_500, start);
        levels(&mut p, &[5, 0, 0], start);
        assert_eq!(p.place(5, order(0, 3), |_| true, |_| 1, start), Some((1, Placed::MovedNow)));
        // Home cools down, but the residence is not over: stays.
        let now = start + D.residence_ms - 1;
        levels(&mut p, &[0, 2, 0], now);
        key(&mut p, 5, 1_500, now);
        assert_eq!(p.place(5, order(0, 3), |_| true, |_| 1, now), Some((1, Placed::Moved)));
        // Residence over, but home would be hot with the key back: stays.
        let now = start + D.residence_ms;
        levels(&mut p, &[2, 2, 0], now);
        key(&mut p, 5, 1_500, now);
        assert_eq!(p.place(5, order(0, 3), |_| true, |_| 1, now), Some((1, Placed::Moved)));
        // Home quiet: back.
        levels(&mut p, &[0, 2, 0], now);
        assert_eq!(p.place(5, order(0, 3), |_| true, |_| 1, now), Some((0, Placed::Returned)));
        assert_eq!(p.moved_keys(), 0);
    }

    #[test]
    fn a_second_key_waits_for_the_cooldown() {
        let mut p = Placement::new(4, 16, Params { cooldown_ms: 2_000, ..D });
        let now = 100_000;
        key(&mut p, 5, 3_000, now);
        key(&mut p, 6, 3_000, now);
        levels(&mut p, &[9, 0, 0, 0], now);
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now), Some((1, Placed::MovedNow)));
        levels(&mut p, &[9, 3, 0, 0], now + 1);
        assert_eq!(p.place(6, order(0, 4), |_| true, |_| 1, now + 1), Some((0, Placed::Home)));
        levels(&mut p, &[9, 3, 0, 0], now + 2_000);
        key(&mut p, 6, 3_000, now + 2_000);
        // Server 1 ends at 6, no busier than the 6 left behind: the first such server.
        assert_eq!(p.place(6, order(0, 4), |_| true, |_| 1, now + 2_000), Some((1, Placed::MovedNow)));
    }

    #[test]
    fn unusable_target_sends_the_key_home() {
        let mut p = Placement::new(3, 16, D);
        let now = 100_000;
        key(&mut p, 5, 3_000, now);
        levels(&mut p, &[6, 0, 0], now);
        assert_eq!(p.place(5, order(0, 3), |_| true, |_| 1, now), Some((1, Placed::MovedNow)));
        // Server 1 goes down: never chosen; the key is home again (or moved on by the rule).
        let r = p.place(5, order(0, 3), |i| i != 1, |_| 1, now + 1).unwrap();
        assert_ne!(r.0, 1);
        assert_eq!(p.place(5, order(0, 3), |_| false, |_| 1, now + 2), None);
    }

    #[test]
    fn a_full_table_keeps_moved_keys() {
        // 8 entries, one probe window: 9 keys compete for it.
        let mut p = Placement::new(4, 8, D);
        let now = 100_000;
        key(&mut p, 1, 3_000, now);
        levels(&mut p, &[9, 0, 0, 0], now);
        assert_eq!(p.place(1, order(0, 4), |_| true, |_| 1, now).unwrap().1, Placed::MovedNow);
        for k in 2..40 {
            p.key_done(k, 1, now);
        }
        assert_eq!(p.moved_keys(), 1);
        assert_eq!(p.place(1, order(0, 4), |_| true, |_| 1, now + 1).unwrap().1, Placed::Moved);
    }

    #[test]
    fn a_saturated_server_is_hot_and_no_target() {
        let mut p = Placement::new(4, 16, D);
        let mut now = 100_000;
        key(&mut p, 5, 1_000, now);
        // This nginx has nothing in flight on server 0 just now: not hot by its own counts.
        levels(&mut p, &[0, 0, 0, 0], now);
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now), Some((0, Placed::Home)));
        assert!(!p.busy(4, |_| 1, now));
        // Server 0 reports saturation (load from elsewhere), server 1 too: the key moves to 2.
        let sat = |i: usize| i <= 1;
        assert!(p.busy_reported(4, |_| 1, sat, now));
        assert_eq!(p.place_reported(5, order(0, 4), |_| true, |_| 1, sat, now), Some((2, Placed::MovedNow)));
        // While home stays saturated, the key does not return, even after its residence.
        now += D.residence_ms + 1;
        levels(&mut p, &[0, 0, 1, 0], now);
        assert_eq!(p.place_reported(5, order(0, 4), |_| true, |_| 1, sat, now), Some((2, Placed::Moved)));
        // Once home's report is calm (or stale: the caller passes false), it returns.
        assert_eq!(p.place_reported(5, order(0, 4), |_| true, |_| 1, |_| false, now), Some((0, Placed::Returned)));
        // A light key does not move, saturation or not.
        key(&mut p, 6, 100, now);
        assert_eq!(p.place_reported(6, order(0, 4), |_| true, |_| 1, |i| i == 0, now), Some((0, Placed::Home)));
        // Every other server saturated: nowhere to go, the key stays.
        let mut q = Placement::new(2, 16, D);
        key(&mut q, 5, 1_000, now);
        levels(&mut q, &[1, 0], now);
        assert_eq!(q.place_reported(5, order(0, 2), |_| true, |_| 1, |_| true, now), Some((0, Placed::Home)));
    }

    #[test]
    fn a_busy_server_that_is_saturated_is_not_a_target() {
        let mut p = Placement::new(3, 16, D);
        let now = 100_000;
        key(&mut p, 5, 3_000, now);
        // Without reports the key would go to server 1; saturated, 2 takes it.
        levels(&mut p, &[9, 0, 1], now);
        let mut q = p.clone();
        assert_eq!(q.place(5, order(0, 3), |_| true, |_| 1, now), Some((1, Placed::MovedNow)));
        assert_eq!(p.place_reported(5, order(0, 3), |_| true, |_| 1, |i| i == 1, now), Some((2, Placed::MovedNow)));
    }

    proptest! {
        /// Reports that say nothing (missing, stale, or calm: `saturated` false everywhere)
        /// change nothing: `place_reported` and `busy_reported` answer as `place` and `busy`,
        /// and leave the same state, over any history.
        #[test]
        fn no_report_is_no_change(
            n in 1usize..8,
            ops in proptest::collection::vec((0u64..6, 0usize..8, 0u64..12, 0u64..3000, proptest::bool::ANY), 1..200),
        ) {
            let mut a = Placement::new(n, 8, D);
            let mut b = Placement::new(n, 8, D);
            let mut now = 1u64;
            for (key, server, level, dt, done) in ops {
                now += dt;
                for p in [&mut a, &mut b] {
                    p.server_inflight(server % n, level, now);
                    if done {
                        p.key_done(key, dt % 500 * 20, now);
                    }
                }
                let ord = order(key as usize % n, n);
                prop_assert_eq!(a.busy(n, |_| 1, now), b.busy_reported(n, |_| 1, |_| false, now));
                let x = a.place(key, ord.clone(), |_| true, |_| 1, now);
                let y = b.place_reported(key, ord, |_| true, |_| 1, |_| false, now);
                prop_assert_eq!(x, y);
                prop_assert_eq!(&a.sv, &b.sv);
                prop_assert_eq!(&a.ks, &b.ks);
            }
        }

        /// With any servers saturated: the answer is usable, and never a saturated server
        /// the key was just moved to (a saturated server is only ever kept, never chosen).
        #[test]
        fn saturated_servers_are_never_chosen_as_targets(
            n in 2usize..8,
            sat_mask in 0u8..=255,
            ops in proptest::collection::vec((0u64..6, 0usize..8, 0u64..12, 0u64..3000, proptest::bool::ANY), 1..200),
        ) {
            let mut p = Placement::new(n, 8, D);
            let mut now = 1u64;
            let sat = |i: usize| sat_mask & (1 << i) != 0;
            for (key, server, level, dt, done) in ops {
                now += dt;
                p.server_inflight(server % n, level, now);
                if done {
                    p.key_done(key, dt % 500 * 20, now);
                }
                let ord = order(key as usize % n, n);
                let (s, how) = p.place_reported(key, ord, |_| true, |_| 1, sat, now).unwrap();
                prop_assert!(s < n);
                if how == Placed::MovedNow || how == Placed::Returned {
                    prop_assert!(!sat(s));
                }
            }
        }
    }

    proptest! {
        /// Whatever the loads and history: the answer is a usable server; a key at home is
        /// at its first usable server; asking again at the same moment gives the same answer;
        /// and a key never moves twice within its residence.
        #[test]
        fn placement_is_usable_stable_and_deterministic(
            n in 1usize..8,
            ops in proptest::collection::vec((0u64..6, 0usize..8, 0u64..12, 0u64..3000, proptest::bool::ANY), 1..300),
            down in 0usize..9,
        ) {
            let mut p = Placement::new(n, 8, D);
            let mut now = 1u64;
            let mut last_move = std::collections::HashMap::new();
            for (key, server, level, dt, done) in ops {
                now += dt;
                p.server_inflight(server % n, level, now);
                if done {
                    p.key_done(key, dt % 500 * 20, now);
                }
                let ord = order(key as usize % n, n);
                let usable = |i: usize| i != down;
                match p.place(key, ord.clone(), usable, |_| 1, now) {
                    None => prop_assert!(ord.iter().all(|&i| i == down)),
                    Some((s, how)) => {
                        prop_assert!(s < n && s != down);
                        let home = *ord.iter().find(|&&i| i != down).unwrap();
                        if how == Placed::Home || how == Placed::Returned {
                            prop_assert_eq!(s, home);
                        }
                        if how == Placed::MovedNow || how == Placed::Returned {
                            if let Some(&t) = last_move.get(&key) {
                                prop_assert!(now - t >= D.residence_ms);
                            }
                            last_move.insert(key, now);
                        }
                        let again = p.place(key, ord.clone(), usable, |_| 1, now).unwrap();
                        prop_assert_eq!(again.0, s);
                        // The servers' counts of moved keys agree with the table.
                        let scanned = p.ks.iter().filter(|e| e.key != 0 && e.moved != 0).count();
                        prop_assert_eq!(p.moved_keys(), scanned);
                    }
                }
            }
        }

        /// The decayed averages never overflow or go wild: a server's average stays within
        /// the levels it held, plus what moved keys brought.
        #[test]
        fn averages_stay_within_levels(
            steps in proptest::collection::vec((0u64..50, 0u64..100_000), 1..200),
        ) {
            let mut p = Placement::new(1, 8, D);
            let mut now = 0;
            let mut max = 0;
            for (level, dt) in steps {
                now += dt;
                p.server_inflight(0, level, now);
                max = max.max(level);
                prop_assert!(p.server_load(0, now) <= max * 1000);
            }
        }
    }
}
