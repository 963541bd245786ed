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
//!   A key placement has never seen answered (new, no response yet: the first logins of a
//!   BI server opening its session pool, all sent before any answer) counts with the load
//!   its first login will bring (`local_session` with node-local sessions, `session` else)
//!   and is placed for that at once: on a hot home it opens its sessions elsewhere instead
//!   of leaving its first one behind. Its prior moves with it (the hot server is spared
//!   it), so new clients leave a hot server a few at a time, never in a herd.
//! - Its target must relieve the hot server: after the move it carries less than the hot
//!   server did, by `margin`: `L(t) + k + margin <= L(cur)`. Among those, the **first server
//!   of the key's own ring order** that ends no busier than the hot one is left
//!   (`L(t) + k <= L(cur) - k`), else the least loaded: the same key, in the same situation,
//!   lands on the same server, and never joins another busy client while a server is free.
//!   With node-local sessions (`local_sessions`: the client's open sessions stay behind and
//!   follow one login at a time) the least loaded server must relieve the hot one by half
//!   the key's load, not just by `margin`.
//! - The key's expected load moves with it at once (subtracted from the hot server's average,
//!   added to the target's), so the next decision sees the cluster as it will be: no second
//!   client chases the same server before its average has risen.
//! - **What a moved client leaves behind leaves by itself.** Its node-local sessions stay on
//!   the server it left until they end, and keep that server's in-flight count up for as long
//!   (seconds, on a busy node). Requests of a moved key served elsewhere are measured per server
//!   ([`Placement::key_done_on`]) and not counted when the keys that live there ask whether it
//!   is hot: otherwise the client that stays would follow the one that left, to a cold cache.
//! - **Logins bring expected load.** A new session is expected to bring the load of one more
//!   of the client's sessions until its requests are measured: [`Placement::login`] adds that
//!   prior to its server and its key at once. A client with `N` active sessions (sessions its
//!   requests used recently, counted in a small bitmap per key) and a measured load `L` gets
//!   `L / N` (capped at `session_max`), so its new login is placed for the load `N + 1`
//!   sessions bring. A client none of whose sessions has been used yet (a BI server opening
//!   its session pool, many logins within a second, long before any response time is known)
//!   gets `session` per login (`local_session` with node-local sessions, which cannot follow
//!   the client later), for its first `cold_logins` logins in `tau`; past those, logins
//!   without used sessions are sessions that are not kept (a REST client without a cookie jar
//!   logs in on every request), and its prior is its measured load per recent login, so it
//!   never looks much busier than it is. With node-local sessions the login is the only moment
//!   a client's load can move.
//! - **Hysteresis**: a moved key stays for at least `residence` before it may move again or
//!   return, unless it was moved on its logins' priors, before its load had been measured
//!   for `tau` (two pools opening at once look alike then, and both may land on the same
//!   server): that move is judged again once its load has been measured for `tau`. It
//!   returns home only when home, with the key back, would not be hot
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
    /// Expected load of a new session of a client none of whose sessions has been used yet
    /// (its cold start), thousandths of a request in flight ([`Placement::login`]).
    pub session_milli: u64,
    /// The same, when sessions are node-local ([`Params::local_sessions`]): a login placed too
    /// low stays where it is for the whole session, while with shared sessions the client
    /// can still move later, and too high a prior delays the moves that pay.
    pub local_session_milli: u64,
    /// While a client's load is not known (not measured for `tau`), its logins get `session`
    /// (or `local_session`) only while its logins in the last `tau` (a decayed count) are fewer than this: a pool
    /// that opens this many sessions at once is believed; a client that keeps logging in
    /// without using its sessions is not.
    pub cold_logins: u64,
    /// Most expected load a login brings once the client's load is measured (thousandths).
    pub session_max_milli: u64,
    /// A session is active while a request used it within the last `active` to `2 x active`
    /// milliseconds (two bitmaps per key, swapped every `active`).
    pub active_ms: u64,
    /// Sessions are node-local: a moved client's open sessions stay where they are, so only
    /// its new sessions follow it, one login at a time. Such a client moves only to a server
    /// that, with all of its load, ends no busier than what the move leaves behind, or else
    /// relieves the hot server by half the client's load at least (not merely by `margin`).
    pub local_sessions: bool,
}

impl Params {
    /// Defaults chosen with `examples/factor_sim.rs cluster` (bench/placement-research.md):
    /// the results hardly depend on `hot` (1 to 3), `share` or `residence`; `tau` of 1 s reacts
    /// within a second; a cold-start prior matters for long node-local sessions (0 loses 0.3x
    /// there); `cold_logins`, `session_max` and `active`: section 6 there. `local_session` (a
    /// whole request, where `session` is half) comes from `scripts/bench`, whose cold start the
    /// simulation does not show (README, "Benchmarks").
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
        local_session_milli: 1_000,
        cold_logins: 16,
        session_max_milli: 1_000,
        active_ms: 1_000,
        local_sessions: false,
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
    /// Decayed sum of the response times of requests it served for keys moved elsewhere (the
    /// node-local sessions a moved client left behind, which end by themselves), in
    /// milliseconds x 1000, as of `behind_ms`.
    behind: u64,
    behind_ms: u64,
    /// When a search for a server to move a key off this one last found none (0: never) ...
    nofit_ms: u64,
    /// ... and for what: the load the key would have brought (high 32 bits) and its own
    /// measured load (low 32 bits), thousandths, saturated.
    nofit: u64,
}

/// How long a search that found no server to move a key to stands for the keys of the same
/// server that would bring as much load or more, while no server's load changes
/// ([`Placement::place_reported`]): the glue's sample period (`shm::PLACEMENT_SAMPLE_MS`),
/// within which the averages move by a hundredth of `tau` at most.
pub const NO_TARGET_MS: u64 = 10;

/// `(brings, kl)` packed for [`ServerLoad::nofit`].
#[inline]
fn nofit_pack(brings: u64, kl: u64) -> u64 {
    (brings.min(u64::from(u32::MAX)) << 32) | kl.min(u64::from(u32::MAX))
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

    /// The load (average requests in flight, thousandths) of what moved keys left behind here,
    /// as of `now`: their node-local sessions, which leave by themselves as they end.
    fn behind_at(&self, now: u64, tau: u64) -> u64 {
        decay(self.behind, now.saturating_sub(self.behind_ms), tau) / tau.max(1)
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
    /// 1 once a login gave it an expected load (its load is known then, or once the entry is
    /// `tau` old); [`GRANTED`] when [`Placement::place`] moved it before any login was
    /// answered and gave it its first login's prior then; 0 otherwise. Beside that value, the
    /// [`GUESSED`] flag ([`KeyEntry::expectation`] reads the value without it).
    expected: u32,
    /// When the key last moved (or returned).
    since_ms: u64,
    /// When the entry was made.
    first_ms: u64,
    /// Decayed count of its logins, thousandths x `tau` (as `prior`), as of `at_ms`.
    logins: u64,
    /// Sessions its requests used in the current window of `active` (one bit per session, by
    /// hash) ...
    seen: u64,
    /// ... and in the previous window.
    seen_prev: u64,
    /// Start of the current window.
    seen_ms: u64,
    /// Since when its response times have been measured without a gap of `tau` (0: never) ...
    measured_ms: u64,
    /// ... and when the last one was.
    done_ms: u64,
}

/// Distinct sessions (thousandths) behind `b` bits set in a 64-bit bitmap of session hashes:
/// linear counting, `-64 ln(1 - b/64)`; 300 for a full bitmap (a lower bound).
const DISTINCT_MILLI: [u32; 65] = [
    0, 1008, 2032, 3073, 4130, 5206, 6300, 7413, 8546, 9699, 10874, 12070, 13289, 14532, 15799, 17092, 18412, 19759,
    21135, 22542, 23980, 25452, 26958, 28500, 30080, 31701, 33363, 35070, 36823, 38626, 40481, 42392, 44361, 46393,
    48492, 50662, 52907, 55235, 57650, 60160, 62773, 65497, 68342, 71319, 74442, 77724, 81185, 84843, 88723, 92853,
    97269, 102012, 107134, 112703, 118803, 125546, 133084, 141630, 151496, 163164, 177446, 195857, 221807, 266169,
    300000,
];

impl KeyEntry {
    /// The key's load as of `now`: its average requests in flight (measured, plus what its
    /// logins are expected to bring), thousandths.
    fn load_at(&self, now: u64, tau: u64) -> u64 {
        decay(self.busy.saturating_add(self.prior), now.saturating_sub(self.at_ms), tau) / tau.max(1)
    }

    /// Decays the sums to `now`.
    fn advance(&mut self, now: u64, tau: u64) {
        let dt = now.saturating_sub(self.at_ms);
        self.busy = decay(self.busy, dt, tau);
        self.prior = decay(self.prior, dt, tau);
        self.logins = decay(self.logins, dt, tau);
        self.at_ms = now.max(self.at_ms);
    }

    /// Starts a new window of session use when the current one is `active` old.
    fn rotate(&mut self, now: u64, active: u64) {
        let dt = now.saturating_sub(self.seen_ms);
        if dt >= active.saturating_mul(2) {
            (self.seen_prev, self.seen, self.seen_ms) = (0, 0, now);
        } else if dt >= active {
            (self.seen_prev, self.seen, self.seen_ms) = (self.seen, 0, self.seen_ms + active);
        }
    }

    /// Its active sessions as of `now` (used within the last `active` to `2 x active`),
    /// thousandths.
    fn active_milli(&self, now: u64, active: u64) -> u64 {
        let dt = now.saturating_sub(self.seen_ms);
        let bits = if dt >= active.saturating_mul(2) {
            0
        } else if dt >= active {
            self.seen.count_ones()
        } else {
            (self.seen | self.seen_prev).count_ones()
        };
        u64::from(DISTINCT_MILLI[bits as usize])
    }

    /// Adds a login's expected load (`prior`, thousandths) to the key's load, which is known
    /// from then on (`expected`: 1, or [`GRANTED`] when placement gives it ahead of the login).
    fn add_prior(&mut self, prior: u64, tau: u64, expected: u32) {
        self.prior = self.prior.saturating_add(prior.saturating_mul(tau));
        self.expected = expected | self.expected & GUESSED;
    }

    /// `expected` without the [`GUESSED`] flag.
    #[inline]
    fn expectation(&self) -> u32 {
        self.expected & !GUESSED
    }

    /// Whether the key's response times have been measured for `tau` without a gap.
    fn measured(&self, now: u64, tau: u64) -> bool {
        self.measured_ms != 0 && now.saturating_sub(self.measured_ms) >= tau
    }

    /// Whether the key's move was made on a guess ([`GUESSED`]) and its load has been measured
    /// for `tau` since, the move being `tau` old at least: the move may be judged again.
    fn guess_measured(&self, now: u64, tau: u64) -> bool {
        self.expected & GUESSED != 0 && self.measured(now, tau) && now.saturating_sub(self.since_ms) >= tau
    }

    /// What a key placement knows nothing of yet (not known, no response measured) is
    /// expected to bring: the prior of its first login; 0 for any other key.
    fn cold_start(&self, now: u64, p: &Params) -> u64 {
        let tau = p.tau_ms.max(1);
        if self.expectation() != 0 || now.saturating_sub(self.first_ms) >= tau || self.measured_ms != 0 {
            return 0;
        }
        let mut e = *self;
        e.advance(now, tau);
        e.login_prior(now, p)
    }

    /// The expected load of a new session of this key as of `now` (entry advanced to `now`),
    /// thousandths of a request in flight: its measured load spread over its sessions (the
    /// active ones, or its recent logins if more), at most `session_max`; at least `session`
    /// (`local_session` with node-local sessions) while its load is not known (measured for less than `tau`, or not for `tau`) and it
    /// has logged in fewer than `cold_logins` times in `tau`.
    fn login_prior(&self, now: u64, p: &Params) -> u64 {
        let tau = p.tau_ms.max(1);
        let recent = self.logins / tau;
        let sessions = self.active_milli(now, p.active_ms).max(recent).max(1000);
        let measured = self.busy / tau;
        let est = (measured.saturating_mul(1000) / sessions).min(p.session_max_milli);
        let young = self.measured_ms == 0 || now.saturating_sub(self.measured_ms) < tau || now.saturating_sub(self.done_ms) >= tau;
        if young && recent < p.cold_logins.saturating_mul(1000) {
            est.max(if p.local_sessions { p.local_session_milli } else { p.session_milli })
        } else {
            est
        }
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

/// `KeyEntry::expected` of a key that [`Placement::place`] moved before any of its logins
/// was answered, giving it its first login's prior then.
const GRANTED: u32 = 2;

/// A flag in `KeyEntry::expected`, beside its value: the key's current move was made before
/// its load had been measured for `tau`, on its logins' priors ([`Placement::place`]). Two
/// pools that open at once look alike then, and such a move can put two heavy clients
/// together. So the move is judged again once the key's load has been measured for `tau`,
/// rather than held for `residence`; a move made on measured loads clears the flag.
const GUESSED: u32 = 4;

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

    /// Whether the clients' sessions are node-local ([`Params::local_sessions`]): the glue
    /// knows it from the upstream's configuration (no shared session store).
    pub fn set_local_sessions(&mut self, local: bool) {
        self.params.local_sessions = local;
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
    /// server `i` as it is) and says whether placement has anything to do: some server's
    /// average in flight (per unit of `weight`) is at least half of `hot`, some key is moved,
    /// or some server reports saturation (`saturated(i)`, from `kylin_load_report`: load from
    /// outside this nginx counts too). While it has nothing to do, the glue neither measures
    /// keys nor asks [`Placement::place`]: every key is at home.
    ///
    /// The glue calls this every few milliseconds instead of at every change: the averages
    /// span `tau` (a second), so a sample every 10 ms loses little. One pass over the servers;
    /// the tests hold it to the two steps it stands for (`sample`, then `busy_reported`).
    pub fn sample_busy(
        &mut self,
        n: usize,
        inflight: impl Fn(usize) -> Option<u64>,
        weight: impl Fn(usize) -> u64,
        saturated: impl Fn(usize) -> bool,
        now: u64,
    ) -> bool {
        let tau = self.params.tau_ms;
        let half = self.params.hot_milli / 2;
        let mut busy = false;
        for i in 0..n.min(self.servers().len()) {
            let level = inflight(i);
            let s = &mut self.servers_mut()[i];
            // The average as of now, which a sample keeps (its level holds from now on).
            let avg = s.avg_at(now, tau);
            if let Some(level) = level {
                s.avg_milli = avg;
                s.at_ms = now.max(s.at_ms);
                s.level = level;
            }
            // avg / weight >= half, without the division (weights and `half` are far below
            // the product's overflow).
            let hot = avg >= half.saturating_mul(weight(i).max(1));
            busy = busy || saturated(i) || s.moved_in > 0 || hot;
        }
        busy
    }

    /// The first step of [`Placement::sample_busy`] alone (the tests' specification of it).
    #[cfg(test)]
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
    /// Only the first `n` servers are looked at. (The second step of
    /// [`Placement::sample_busy`] without reports: the tests' specification of it.)
    #[cfg(test)]
    pub fn busy(&self, n: usize, weight: impl Fn(usize) -> u64, now: u64) -> bool {
        self.busy_reported(n, weight, |_| false, now)
    }

    /// [`Placement::busy`], also true when some server reports saturation (`saturated(i)`,
    /// from `kylin_load_report`): load from outside this nginx counts too. (The second step of
    /// [`Placement::sample_busy`]: the tests' specification of it.)
    #[cfg(test)]
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
        self.key_done_in(key, response_ms, 0, now);
    }

    /// As [`Placement::key_done`], for a request that used the session whose hash is
    /// `session` (0: none, or a login): its key's active sessions are counted from these.
    pub fn key_done_in(&mut self, key: u64, response_ms: u64, session: u64, now: u64) {
        self.done(key, response_ms, session, now);
    }

    /// As [`Placement::key_done_in`], for a request that server `i` served. If the key is
    /// moved to another server, the request was one of the sessions it left behind on `i`
    /// (node-local sessions stay where they were created, and end there): load that leaves
    /// `i` by itself, so [`Placement::place`] does not count it when it asks whether `i` is
    /// hot for the keys that live there. Without this, a client that moves off a server full
    /// of its sessions makes the client that stays look as if it had to move too.
    ///
    /// Only for `residence` after the move: sessions that outlive it (a BI tool can keep its
    /// pool open for hours) are load like any other. And a request counts for `tau` at most,
    /// the longest it can have been in flight within the averaging window (a long query that
    /// ends is no longer in flight: counted whole, it would hide the server's load for long).
    pub fn key_done_on(&mut self, key: u64, i: usize, response_ms: u64, session: u64, now: u64) {
        let j = self.done(key, response_ms, session, now);
        let e = &self.keys()[j];
        let p = self.params;
        if e.moved == 0 || e.moved as usize - 1 == i || now.saturating_sub(e.since_ms) >= p.residence_ms {
            return;
        }
        let tau = p.tau_ms;
        if let Some(s) = self.servers_mut().get_mut(i) {
            let add = response_ms.min(tau).saturating_mul(1000);
            s.behind = decay(s.behind, now.saturating_sub(s.behind_ms), tau).saturating_add(add);
            s.behind_ms = now.max(s.behind_ms);
        }
    }

    /// Records a finished request of `key` in its entry; returns the entry's index.
    fn done(&mut self, key: u64, response_ms: u64, session: u64, now: u64) -> usize {
        let p = self.params;
        let i = self.entry(key, now);
        let e = &mut self.keys_mut()[i];
        e.advance(now, p.tau_ms);
        e.busy = e.busy.saturating_add(response_ms.saturating_mul(1000));
        if e.measured_ms == 0 || now.saturating_sub(e.done_ms) >= p.tau_ms {
            e.measured_ms = now.max(1);
        }
        e.done_ms = now;
        if session != 0 {
            e.rotate(now, p.active_ms.max(1));
            e.seen |= 1u64 << (session.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58);
        }
        i
    }

    /// A login of `key` was placed on server `i` (a new session, which will stay there if
    /// node-local). Until its requests are measured, the session is expected to bring the load
    /// of one more of the key's sessions (`KeyEntry::login_prior`): that much is added to the
    /// server's average and to the key's load at once (and decays with `tau` as measurements
    /// take over), so a burst of logins, e.g. a BI server opening its session pool, sees its
    /// own load building up, while a client that logs in on every request and never uses its
    /// sessions adds about its measured load, not its login rate.
    pub fn login(&mut self, key: u64, i: usize, now: u64) {
        let p = self.params;
        if i >= self.servers().len() {
            return;
        }
        let j = self.entry(key, now);
        let tau = p.tau_ms.max(1);
        let e = &mut self.keys_mut()[j];
        e.advance(now, tau);
        let prior = e.login_prior(now, &p);
        e.logins = e.logins.saturating_add(tau.saturating_mul(1000));
        if e.expectation() == GRANTED {
            e.expected = 1 | e.expected & GUESSED;
            // Placement gave it this login's prior when it moved the key (within `tau`).
            if now.saturating_sub(e.since_ms) < tau {
                return;
            }
        }
        if prior == 0 {
            return;
        }
        // Its load is known now (an estimate).
        e.add_prior(prior, tau, 1);
        let s = &mut self.servers_mut()[i];
        s.avg_milli = s.avg_at(now, p.tau_ms).saturating_add(prior);
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
        // Where the key was moved, if that server is usable. While the key's home is not (a
        // node down), its target may be the first usable server of its order: the key stays
        // moved there, so that it does not follow its home back when that returns (with every
        // other client whose home it is, onto a node whose cache is cold).
        let target = e.moved.checked_sub(1).map(|m| m as usize).filter(|&m| order.contains(&m));
        let moved = target.filter(|&m| m != home);
        let cur = target.unwrap_or(home);
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
        let settled = now.saturating_sub(e.since_ms) >= p.residence_ms || e.since_ms == 0 || e.guess_measured(now, p.tau_ms);

        // A moved key returns home when home, with it back, is not hot and not busier.
        if let Some(m) = moved {
            if settled {
                let back = per(self, home, kl);
                if back < p.hot_milli && back <= per(self, m, 0) {
                    self.set_moved(idx, 0);
                    let e = &mut self.keys_mut()[idx];
                    e.since_ms = now.max(1);
                    e.expected &= !GUESSED;
                    self.transfer(m, home, kl, now);
                    return Some((home, Placed::Returned));
                }
            }
        } else if target.is_none() && e.moved != 0 {
            // Its target is gone or unusable: home again.
            self.set_moved(idx, 0);
        }

        // The current server's load without what moved keys left behind there (it leaves by
        // itself): the load the key shares that server with from now on.
        let own = self.server_load(cur, now).saturating_sub(self.servers()[cur].behind_at(now, p.tau_ms));
        let lc = {
            let l = own / weight(cur).max(1);
            if saturated(cur) {
                l.max(floor)
            } else {
                l
            }
        };
        // A key placement knows nothing of yet (not known, no response measured): its first
        // requests, such as the first logins of a BI server opening its session pool, all sent
        // before any answer. On a hot server it is placed for the load its first login will
        // bring (its cold start, [`KeyEntry::login_prior`]): otherwise the first session of
        // every client stays on its home however hot, and with node-local sessions stays
        // there. A key with responses but not known yet waits to be (a few response times say
        // little).
        let known = e.expectation() != 0 || now.saturating_sub(e.first_ms) >= p.tau_ms;
        let grant = e.cold_start(now, &p);
        // The load the key brings where it goes.
        let brings = kl.saturating_add(grant);
        let major = brings > p.major_milli && brings.saturating_mul(1000) >= p.share_milli.saturating_mul(own);
        if settled && (known || grant > 0) && major && lc >= p.hot_milli {
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
                let fits = |s: &Self, t: usize| t != cur && !saturated(t) && per(s, t, brings) + p.margin_milli <= lc;
                let left_behind = lc.saturating_sub(kl / weight(cur).max(1));
                // Both searches get harder as `brings` and `kl` grow, and every key of `cur`
                // searches the same servers (in another order): a search from `cur` that found
                // nothing stands for a key bringing as much or more, until a server's load
                // changes or NO_TARGET_MS pass (a client that fills its server alone would
                // otherwise search again on every request). A server turning unusable or
                // usable, or its report saturated or calm, within that time is seen at the
                // next search, as the averages' own drift is. "As much" allows for the decay of the key's loads since then: the same key
                // asking again `dt` later brings `tau / (tau + dt)` of what it brought (plus a
                // thousandth for the rounding of the integer decay).
                let s_cur = self.servers()[cur];
                let (nb, nk) = (s_cur.nofit >> 32, s_cur.nofit & u64::from(u32::MAX));
                let dt = now.saturating_sub(s_cur.nofit_ms);
                let at_least = |x: u64, then: u64| {
                    let tau = u128::from(p.tau_ms.max(1));
                    let x = u128::from(x.min(u64::from(u32::MAX))) + u128::from(dt > 0);
                    x * (tau + u128::from(dt)) >= u128::from(then) * tau
                };
                let stands = s_cur.nofit_ms != 0
                    && dt < NO_TARGET_MS
                    && at_least(brings, nb)
                    && at_least(kl, nk)
                    && order.iter().all(|&i| self.servers()[i].at_ms < s_cur.nofit_ms);
                let target = if stands {
                    None
                } else {
                    order.iter().copied().find(|&t| fits(self, t) && per(self, t, brings) <= left_behind).or_else(|| {
                        // A client whose open sessions stay behind must relieve the hot server by
                        // half its load at least.
                        let m = if p.local_sessions { p.margin_milli.max(brings / 2 / weight(cur).max(1)) } else { p.margin_milli };
                        order.iter().copied().filter(|&t| t != cur && !saturated(t) && per(self, t, brings) + m <= lc).min_by_key(|&t| per(self, t, 0))
                    })
                };
                if target.is_none() && !stands {
                    let s = &mut self.servers_mut()[cur];
                    s.nofit_ms = now.max(1);
                    s.nofit = nofit_pack(brings, kl);
                }
                if let Some(t) = target {
                    self.set_moved(idx, if t == home { 0 } else { t as u32 + 1 });
                    let e = &mut self.keys_mut()[idx];
                    e.since_ms = now.max(1);
                    // A move on logins' priors (the key's load not measured for `tau` yet)
                    // is a guess; one on measured loads is not.
                    if t != home && (grant > 0 || !e.measured(now, p.tau_ms)) {
                        e.expected |= GUESSED;
                    } else {
                        e.expected &= !GUESSED;
                    }
                    self.servers_mut()[cur].left_ms = now.max(1);
                    // Its expected load moves with it, a new key's first login's prior
                    // included: `cur` is spared that much, `t` takes it now, and that login's
                    // answer adds no second one (`login`). So each new client that leaves a hot
                    // server cools it as far as placement can tell, and no other one follows it
                    // to `t` before the answer: new clients leave a hot server a few at a time.
                    self.transfer(cur, t, brings, now);
                    if grant > 0 {
                        let tau = p.tau_ms.max(1);
                        let e = &mut self.keys_mut()[idx];
                        e.advance(now, tau);
                        e.add_prior(grant, tau, GRANTED);
                    }
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
        self.keys_mut()[i] = KeyEntry { key, at_ms: now, first_ms: now, seen_ms: now, ..KeyEntry::default() };
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
    fn a_key_entry_packs_into_104_bytes() {
        // The placement zone holds 4,096 of them (README: its size).
        assert_eq!(core::mem::size_of::<KeyEntry>(), 104);
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
    fn a_new_key_with_answers_does_not_move_before_its_load_is_known() {
        // (A few response times say little; a key with none yet is placed for its first
        // login instead: `new_clients_leave_a_hot_server_a_few_at_a_time_...`.)
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
    fn what_a_moved_client_left_behind_does_not_move_the_client_that_stays() {
        // Server 0 holds two clients of 3 (6 in flight). Client 5 moves to server 2; its
        // node-local sessions stay on server 0 and end there.
        let mut now = 100_000;
        let run = |left_behind_counted: bool| {
            let mut p = Placement::new(4, 16, D);
            let mut now = now;
            key(&mut p, 5, 3_000, now);
            key(&mut p, 6, 3_000, now);
            levels(&mut p, &[6, 3, 0, 0], now);
            assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now), Some((2, Placed::MovedNow)));
            // For a second, server 0 stays at 6: client 6 and client 5's open sessions, whose
            // requests (three in flight: 100 ms each, one every 33 ms) end on server 0.
            for _ in 0..30 {
                now += 33;
                if left_behind_counted {
                    p.key_done_on(5, 0, 100, 0, now);
                } else {
                    p.key_done_in(5, 100, 0, now);
                }
                p.key_done_on(6, 0, 100, 0, now);
                p.server_inflight(0, 6, now);
                p.server_inflight(2, 1, now);
            }
            p.place(6, order(0, 4), |_| true, |_| 1, now)
        };
        // Counted as load that leaves by itself, server 0 is client 6's alone (3): it stays.
        assert_eq!(run(true), Some((0, Placed::Home)));
        // Not counted, server 0 looks hot with two clients, and client 6 would leave a cache
        // that is warm for it for one that is cold, only to leave server 0 idle later.
        assert!(matches!(run(false), Some((_, Placed::MovedNow))));
        // Requests of a key at the server it lives on are not left behind.
        let mut p = Placement::new(4, 16, D);
        key(&mut p, 5, 3_000, now);
        levels(&mut p, &[6, 3, 0, 0], now);
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now), Some((2, Placed::MovedNow)));
        for _ in 0..30 {
            now += 33;
            p.key_done_on(5, 2, 100, 0, now);
            p.key_done_on(7, 0, 100, 0, now);
        }
        assert!(p.sv.iter().all(|s| s.behind == 0));
        // And what was left behind fades within a few `tau` once those sessions end.
        p.key_done_on(5, 0, 1_000, 0, now);
        assert_eq!(p.sv[0].behind_at(now, D.tau_ms), 1_000);
        assert!(p.sv[0].behind_at(now + 10 * D.tau_ms, D.tau_ms) < 100);
        // A long query counts for `tau` at most: it was in flight for no longer than that within
        // the window, and is not in flight any more.
        now += 5 * D.tau_ms;
        let before = p.sv[0].behind_at(now, D.tau_ms);
        p.key_done_on(5, 0, 60_000, 0, now);
        assert_eq!(p.sv[0].behind_at(now, D.tau_ms) - before, 1_000);
        // Sessions that outlive the move's residence are load like any other.
        now += D.residence_ms;
        p.key_done_on(5, 0, 100, 0, now);
        assert!(p.sv[0].behind_at(now, D.tau_ms) < 100, "{}", p.sv[0].behind_at(now, D.tau_ms));
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
    fn a_client_with_node_local_sessions_moves_only_where_it_relieves_by_half_its_load() {
        // Server 0 at 10 with a client of 3; servers 1-3 at 6, 7, 8: server 1 relieves server 0
        // by the margin (6 + 3 + 0.5 <= 10) but ends busier than the 7 left behind.
        let now = 100_000;
        let mut shared = Placement::new(4, 16, D);
        key(&mut shared, 5, 3_000, now);
        levels(&mut shared, &[10, 6, 7, 8], now);
        assert_eq!(shared.place(5, order(0, 4), |_| true, |_| 1, now), Some((1, Placed::MovedNow)));
        let mut local = Placement::new(4, 16, Params { local_sessions: true, ..D });
        key(&mut local, 5, 3_000, now);
        levels(&mut local, &[10, 6, 7, 8], now);
        assert_eq!(local.place(5, order(0, 4), |_| true, |_| 1, now), Some((0, Placed::Home)));
        // A server that relieves the hot one by half the client's load (5 + 3 + 1.5 <= 10),
        // though it ends busier than the 7 left behind: it moves there.
        levels(&mut local, &[10, 5, 7, 8], now);
        assert_eq!(local.place(5, order(0, 4), |_| true, |_| 1, now), Some((1, Placed::MovedNow)));
        // A server where it balances: the first of its order.
        let mut local = Placement::new(4, 16, Params { local_sessions: true, ..D });
        key(&mut local, 5, 3_000, now);
        levels(&mut local, &[10, 6, 3, 8], now);
        assert_eq!(local.place(5, order(0, 4), |_| true, |_| 1, now), Some((2, Placed::MovedNow)));
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

    /// A closed-loop client: `n` sessions, each with one request of `rt` ms in flight at all
    /// times, from `from` for `ms`; returns the time it ends.
    fn sessions_busy(p: &mut Placement, key: u64, n: u64, rt: u64, from: u64, ms: u64) -> u64 {
        let mut now = from;
        while now < from + ms {
            now += rt;
            for s in 0..n {
                p.key_done_in(key, rt, 1_000 + s, now);
            }
        }
        now
    }

    #[test]
    fn a_login_is_placed_for_one_more_of_the_clients_sessions() {
        // 6 sessions, one request each always in flight: a load of 6, known for long.
        let mut p = Placement::new(2, 16, D);
        let now = sessions_busy(&mut p, 9, 6, 50, 10_000, 5 * D.tau_ms);
        let before = p.key_load(9, now);
        assert!((5_500..=6_400).contains(&before), "{before}");
        p.login(9, 0, now);
        let added = p.key_load(9, now) - before;
        // One more session: a sixth of its load (the bitmap's count is within a few percent).
        assert!((900..=1_000).contains(&added), "{added}");
        assert!(p.server_load(0, now) >= added);
        // A light client's sessions bring little: two sessions, a 10 ms query every 500 ms.
        let mut now = now;
        for _ in 0..20 {
            now += 250;
            p.key_done_in(4, 10, 1_000 + now / 250 % 2, now);
        }
        let light = p.key_load(4, now);
        p.login(4, 1, now);
        assert!(p.key_load(4, now) - light <= 30, "{}", p.key_load(4, now) - light);
    }

    #[test]
    fn a_new_client_gets_the_cold_start_prior_for_its_first_logins_only() {
        // Node-local sessions: a whole request in flight per login.
        let mut p = Placement::new(2, 16, Params { local_sessions: true, ..D });
        p.login(8, 0, 1_000);
        assert_eq!(p.key_load(8, 1_000), D.local_session_milli);
        let mut p = Placement::new(2, 16, D);
        for k in 0..D.cold_logins {
            p.login(8, 0, 1_000 + k);
            let l = p.key_load(8, 1_000 + k);
            assert!(((k + 1) * D.session_milli * 98 / 100..=(k + 1) * D.session_milli).contains(&l), "login {k}: {l}");
        }
        // A few more logins at once, then its logins stop adding.
        for k in 0..4 {
            p.login(8, 0, 1_020 + k);
        }
        let l = p.key_load(8, 1_030);
        assert!(l <= (D.cold_logins + 2) * D.session_milli, "{l}");
        p.login(8, 0, 1_030);
        assert_eq!(p.key_load(8, 1_030), l);
        // A client idle for long is new again.
        p.login(8, 0, 100_000);
        assert!(p.key_load(8, 100_000) >= D.session_milli);
    }

    #[test]
    fn with_node_local_sessions_pools_opening_on_a_shared_home_leave_at_most_one_session_behind() {
        // Three BI servers whose home is server 0 open 6 sessions each, their logins
        // interleaved, before anything is measured. Returns, per client, the sessions left on
        // server 0 and where the rest went.
        let open = |local: bool| {
            let mut p = Placement::new(4, 16, Params { local_sessions: local, ..D });
            let now = 100_000;
            let mut placed = [[0u32; 4]; 3];
            for _ in 0..6 {
                for k in 0..3 {
                    let (s, _) = p.place(k + 1, order(0, 4), |_| true, |_| 1, now).unwrap();
                    p.login(k + 1, s, now);
                    placed[k as usize][s] += 1;
                }
            }
            placed
        };
        // Node-local: a session is expected to bring a whole request in flight. The first two
        // clients' first logins make server 0 hot; the third client is new there (nothing
        // answered yet) and opens all its sessions elsewhere, placed for its first login's
        // prior; the second moves at its second login, leaving one session on server 0, which
        // its sessions cannot leave; the first stays. No two clients share a server.
        let local = open(true);
        let mut left: Vec<u32> = local.iter().map(|c| c[0]).collect();
        left.sort();
        assert_eq!(left, [0, 1, 6], "{local:?}");
        let elsewhere: Vec<usize> = local.iter().filter(|c| c[0] < 6).filter_map(|c| (1..4).find(|&s| c[s] > 0)).collect();
        assert!(local.iter().filter(|c| c[0] < 6).all(|c| c[1..].iter().filter(|&&n| n > 0).count() == 1), "{local:?}");
        assert_eq!(elsewhere.len(), 2, "{local:?}");
        assert_ne!(elsewhere[0], elsewhere[1], "{local:?}");
        // Shared: half a request per login, and the clients move at their third (their
        // sessions follow them later anyway).
        let shared = open(false);
        assert_eq!(shared.iter().filter(|c| c[0] == 2).count(), 2, "{shared:?}");
    }

    /// Six sessions each for `keys`, one request of 50 ms always in flight per session, for
    /// 3 tau from `now`; returns the time it ends.
    fn six_sessions_busy(p: &mut Placement, keys: &[u64], mut now: u64) -> u64 {
        let end = now + 3 * D.tau_ms;
        while now < end {
            now += 50;
            for &k in keys {
                for s in 0..6 {
                    p.key_done_in(k, 50, k * 1_000 + s, now);
                }
            }
        }
        now
    }

    #[test]
    fn two_clients_moved_together_on_their_first_logins_part_once_their_loads_are_measured() {
        // Server 0 is hot; two BI servers it has never seen open their pools at once, both
        // with server 3 next in their order. On their first logins they look alike (one
        // login's prior each) and both go to server 3. Once measured, each brings 6 requests
        // in flight there, while servers 1 and 2 are idle: the first to log in again leaves
        // (within its residence, which a move on measured loads would hold), the second
        // stays, and neither moves again.
        let local = Params { local_sessions: true, ..D };
        let mut p = Placement::new(4, 64, local);
        let start = 100_000;
        levels(&mut p, &[4, 0, 0, 0], start);
        let (x, y) = (vec![0, 3, 1, 2], vec![0, 3, 2, 1]);
        assert_eq!(p.place(1, x.clone(), |_| true, |_| 1, start), Some((3, Placed::MovedNow)));
        p.login(1, 3, start);
        assert_eq!(p.place(2, y.clone(), |_| true, |_| 1, start), Some((3, Placed::MovedNow)));
        p.login(2, 3, start);
        let now = six_sessions_busy(&mut p, &[1, 2], start);
        levels(&mut p, &[4, 0, 0, 12], now);
        assert!(p.key_load(1, now) > 5_000 && p.key_load(2, now) > 5_000, "{} {}", p.key_load(1, now), p.key_load(2, now));
        assert!(now - start < D.residence_ms);
        assert_eq!(p.place(1, x.clone(), |_| true, |_| 1, now), Some((1, Placed::MovedNow)));
        assert_eq!(p.place(2, y.clone(), |_| true, |_| 1, now + 1), Some((3, Placed::Moved)));
        // The new move was made on measured loads: it holds for its residence.
        levels(&mut p, &[4, 12, 0, 6], now + 2);
        assert_eq!(p.place(1, x, |_| true, |_| 1, now + 2 * D.tau_ms), Some((1, Placed::Moved)));
        assert_eq!(p.place(2, y, |_| true, |_| 1, now + 2 * D.tau_ms), Some((3, Placed::Moved)));
    }

    #[test]
    fn a_client_moved_at_a_later_login_before_it_was_measured_is_judged_again() {
        // Its first login stays home (server 0 calm); at its second, server 0 is hot and it
        // moves on its logins' prior (nothing of it measured yet) to server 3. Measured, it
        // brings 6 requests in flight, and server 3 turns out busy with others as well while
        // servers 1 and 2 are idle: it moves again within its residence, and then stays.
        let local = Params { local_sessions: true, ..D };
        let mut p = Placement::new(4, 64, local);
        let start = 100_000;
        let x = vec![0, 3, 1, 2];
        assert_eq!(p.place(1, x.clone(), |_| true, |_| 1, start), Some((0, Placed::Home)));
        p.login(1, 0, start);
        levels(&mut p, &[3, 0, 0, 0], start + 10);
        assert_eq!(p.place(1, x.clone(), |_| true, |_| 1, start + 10), Some((3, Placed::MovedNow)));
        p.login(1, 3, start + 10);
        let now = six_sessions_busy(&mut p, &[1], start + 10);
        levels(&mut p, &[3, 0, 0, 12], now);
        assert!(now - start < D.residence_ms);
        assert_eq!(p.place(1, x.clone(), |_| true, |_| 1, now), Some((1, Placed::MovedNow)));
        levels(&mut p, &[3, 12, 0, 0], now + 2);
        assert_eq!(p.place(1, x, |_| true, |_| 1, now + 2 * D.tau_ms), Some((1, Placed::Moved)));
    }

    #[test]
    fn new_clients_leave_a_hot_server_a_few_at_a_time_and_their_first_login_counts_once() {
        let local = Params { local_sessions: true, ..D };
        let now = 100_000;
        let mut p = Placement::new(4, 64, local);
        // Server 0 holds 4 requests in flight, the others nothing; 20 clients placement has
        // never seen ask at once (nothing answered yet).
        levels(&mut p, &[4, 0, 0, 0], now);
        let placed: Vec<_> = (1..=20u64).map(|k| p.place(k, order(0, 4), |_| true, |_| 1, now).unwrap()).collect();
        // Each that leaves spares server 0 its first login's prior (a whole request): it is
        // not hot (2 requests) once three have left, and the others stay.
        let moved = placed.iter().filter(|(_, how)| *how == Placed::MovedNow).count();
        assert_eq!(moved, 3, "{placed:?}");
        assert!(placed[..moved].iter().all(|&(s, _)| s != 0), "{placed:?}");
        assert!(placed[moved..].iter().all(|&x| x == (0, Placed::Home)), "{placed:?}");
        assert!(p.server_load(0, now) < D.hot_milli, "{}", p.server_load(0, now));
        // A moved client's first login, answered, adds no second prior where it went; its next
        // one does.
        let t = placed[0].0;
        let (load, key_load) = (p.server_load(t, now), p.key_load(1, now));
        assert_eq!(key_load, local.local_session_milli);
        p.login(1, t, now + 5);
        assert!(p.server_load(t, now + 5) <= load, "{} > {load}", p.server_load(t, now + 5));
        assert!(p.key_load(1, now + 5) <= key_load);
        p.login(1, t, now + 10);
        assert!(p.key_load(1, now + 10) > key_load + local.local_session_milli / 2);
        // With shared sessions a login's prior (half a request) is not a major client's load:
        // new clients stay home until their load is known.
        let mut p = Placement::new(4, 64, D);
        levels(&mut p, &[4, 0, 0, 0], now);
        assert!((1..=20u64).all(|k| p.place(k, order(0, 4), |_| true, |_| 1, now) == Some((0, Placed::Home))));
        // A new client whose home is not hot stays.
        let mut p = Placement::new(4, 64, local);
        levels(&mut p, &[0, 0, 0, 0], now);
        assert_eq!(p.place(1, order(0, 4), |_| true, |_| 1, now), Some((0, Placed::Home)));
    }

    #[test]
    fn logging_in_on_every_request_does_not_make_a_server_hot() {
        // A tool without a cookie jar: a new session per request, 1,000 of them in a second,
        // each answered at once and never used again.
        let mut p = Placement::new(2, 16, D);
        let mut now = 10_000;
        for _ in 0..5_000 {
            p.key_done(9, 1, now);
            p.login(9, 0, now);
            now += 1;
        }
        // Its measured load: one response of 1 ms every millisecond, one request in flight;
        // its priors add about as much again, not its login rate.
        let k = p.key_load(9, now);
        assert!((1_000..=2_100).contains(&k), "{k}");
        assert!(p.server_load(0, now) <= 1_100, "{}", p.server_load(0, now));
        // Measured or not: its first cold_logins logins bring at most that many priors.
        let mut q = Placement::new(2, 16, D);
        let mut now = 10_000;
        for _ in 0..5_000 {
            q.login(9, 0, now);
            now += 1;
        }
        assert!(q.server_load(0, now) <= D.cold_logins * D.session_milli, "{}", q.server_load(0, now));
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
    fn a_moved_key_does_not_follow_its_home_back_after_an_outage() {
        // Key 5 (home 0) was moved to server 1. Server 0 goes down: its order's first usable
        // server is now 1, where the key already is. When server 0 returns, the key stays
        // on 1 (within its residence; after it, only if home, with it back, is not hot),
        // instead of piling onto the returning node with every client whose home it is.
        let mut p = Placement::new(3, 16, D);
        let mut now = 100_000;
        key(&mut p, 5, 3_000, now);
        levels(&mut p, &[6, 0, 0], now);
        assert_eq!(p.place(5, order(0, 3), |_| true, |_| 1, now), Some((1, Placed::MovedNow)));
        for _ in 0..10 {
            now += 500;
            levels(&mut p, &[0, 3, 0], now);
            assert_eq!(p.place(5, order(0, 3), |i| i != 0, |_| 1, now), Some((1, Placed::Home)));
        }
        assert_eq!(p.moved_keys(), 1);
        now += 500;
        levels(&mut p, &[0, 3, 0], now);
        assert_eq!(p.place(5, order(0, 3), |_| true, |_| 1, now), Some((1, Placed::Moved)));
        // Once settled, it returns home by the usual rule.
        now += D.residence_ms;
        levels(&mut p, &[0, 3, 0], now);
        assert_eq!(p.place(5, order(0, 3), |_| true, |_| 1, now), Some((0, Placed::Returned)));
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
    fn a_search_that_found_no_server_stands_for_heavier_keys_until_a_load_changes() {
        let mut p = Placement::new(4, 16, D);
        let now = 100_000;
        // Key 5 fills server 0 alone: no other server would end less busy with it.
        levels(&mut p, &[8, 0, 0, 0], now - 5);
        key(&mut p, 5, 8_000, now - 5);
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now), Some((0, Placed::Home)));
        assert_eq!(p.sv[0].nofit_ms, now);
        // The next request of it, a millisecond later: the search stands (not made again).
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now + 1), Some((0, Placed::Home)));
        assert_eq!(p.sv[0].nofit_ms, now);
        // A lighter key of the same server searches, and finds server 1.
        key(&mut p, 6, 3_000, now + 1);
        assert_eq!(p.place(6, order(0, 4), |_| true, |_| 1, now + 1), Some((1, Placed::MovedNow)));
        // That move changed two servers' loads: key 5 searches again (and still finds none).
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now + 2), Some((0, Placed::Home)));
        assert_eq!(p.sv[0].nofit_ms, now + 2);
        // A sample (every server's load changes) ends it too, as does NO_TARGET_MS.
        levels(&mut p, &[8, 2, 0, 0], now + 3);
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now + 3), Some((0, Placed::Home)));
        assert_eq!(p.sv[0].nofit_ms, now + 3);
        // (A search in the millisecond of a change stands for nothing: the change may have
        // come after it.)
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now + 4), Some((0, Placed::Home)));
        assert_eq!(p.sv[0].nofit_ms, now + 4);
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now + 5), Some((0, Placed::Home)));
        assert_eq!(p.sv[0].nofit_ms, now + 4);
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now + 4 + NO_TARGET_MS), Some((0, Placed::Home)));
        assert_eq!(p.sv[0].nofit_ms, now + 4 + NO_TARGET_MS);
        // A server whose load drops (its sample) is found at once.
        levels(&mut p, &[8, 0, 0, 0], now + 4 + NO_TARGET_MS);
        p.sv[2] = ServerLoad { avg_milli: 0, level: 0, at_ms: now + 4 + NO_TARGET_MS, ..p.sv[2] };
        key(&mut p, 5, 2_000, now + 4 + NO_TARGET_MS);
        assert_eq!(p.place(5, order(0, 4), |_| true, |_| 1, now + 4 + NO_TARGET_MS).map(|x| x.1), Some(Placed::MovedNow));
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
                        p.key_done_on(key, server, dt % 500 * 20, 0, now);
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

        /// A search that stands (found nothing for a key of the same server bringing as
        /// much or less, no server's load changed since) gives what a new search would, the
        /// server tables aside: both searches only get harder with the key's load, its own
        /// measured load, and what moved keys left on its server.
        #[test]
        fn a_search_that_stands_decides_as_a_new_search_would(
            // Bursts of operations at one instant (the averages do not move within one), then a
            // step of NO_TARGET_MS or more, after which no search stands.
            // Keys past 8 are mostly new ones (a first login's prior, nothing measured).
            ops in proptest::collection::vec((0u64..16, 0usize..4, 0u8..6, 0u64..3000, 0u8..10), 1..300),
            local in proptest::bool::ANY,
            n in 2usize..5,
        ) {
            let mut a = Placement::new(n, 16, D);
            let mut b = Placement::new(n, 16, D);
            a.set_local_sessions(local);
            b.set_local_sessions(local);
            let mut now = 50_000u64;
            for (k, server, op, x, step) in ops {
                if step == 0 {
                    now += NO_TARGET_MS + x;
                }
                for p in [&mut a, &mut b] {
                    match op {
                        0 if k < 8 => p.key_done_on(k, server % n, x / 3, k, now),
                        1 => p.login(k, server % n, now),
                        2 => p.server_inflight(server % n, x / 300, now),
                        _ => {}
                    }
                }
                // A server's load changed: what follows comes a millisecond later, so that the
                // searches made then can stand for each other (not for anything at `now`).
                if op == 1 || op == 2 {
                    now += 1;
                }
                // Some requests come twice in the same millisecond (the same key, or the next
                // one of the same home).
                for k in [k, if op == 4 { k } else { k + 2 }].into_iter().take(if op >= 4 { 2 } else { 1 }) {
                    // b never keeps a search's result: it searches every time.
                    for s in b.sv.iter_mut() {
                        s.nofit_ms = 0;
                    }
                    // Homes on two servers, so that keys share them.
                    let x = a.place(k, order(k as usize % 2, n), |_| true, |_| 1, now);
                    let y = b.place(k, order(k as usize % 2, n), |_| true, |_| 1, now);
                    prop_assert_eq!(x, y);
                    prop_assert_eq!(&a.ks, &b.ks);
                    for (s, t) in a.sv.iter().zip(b.sv.iter()) {
                        prop_assert_eq!(ServerLoad { nofit_ms: 0, nofit: 0, ..*s }, ServerLoad { nofit_ms: 0, nofit: 0, ..*t });
                    }
                }
            }
        }

        /// The glue's one-pass sample answers and leaves the state as a sample then
        /// `busy_reported` would, over any history, weights and reports.
        #[test]
        fn sample_busy_is_sample_then_busy(
            n in 1usize..8,
            // Now and then a long pause, after which the averages equal their levels exactly: the
            // `hot` test's boundary (average = half of hot x weight) is reached then.
            ops in proptest::collection::vec((0u64..6, 0usize..8, 0u64..12, prop_oneof![4 => 0u64..3000, 1 => Just(1_000_000u64)], proptest::bool::ANY, 0u8..16), 1..200),
            weights in proptest::collection::vec(1u64..5, 8),
            sampled in 0usize..9,
        ) {
            let mut a = Placement::new(n, 8, D);
            let mut b = Placement::new(n, 8, D);
            let mut now = 1u64;
            for (key, server, level, dt, done, sat) in ops {
                now += dt;
                // Servers past `sampled` have no slot (None), as servers without counters.
                let inflight = |i: usize| (i < sampled).then_some(level + i as u64);
                let weight = |i: usize| weights[i];
                let saturated = |i: usize| sat & (1 << (i % 4)) != 0 && sat >= 8;
                a.sample(n, inflight, now);
                let x = a.busy_reported(n, weight, saturated, now);
                let y = b.sample_busy(n, inflight, weight, saturated, now);
                prop_assert_eq!(x, y);
                prop_assert_eq!(&a.sv, &b.sv);
                for p in [&mut a, &mut b] {
                    if done {
                        p.key_done_on(key, server % n, dt % 500 * 20, 0, now);
                    }
                    p.place(key, order(key as usize % n, n), |_| true, weight, now);
                }
                prop_assert_eq!(&a.ks, &b.ks);
            }
        }

        /// What a moved key leaves behind is measured only where the key is not placed, and
        /// only within its residence: otherwise `key_done_on` changes exactly what
        /// `key_done_in` changes; it never touches another server's entry; and a server's
        /// left-behind load never exceeds what was recorded there, a request counting for
        /// `tau` at most.
        #[test]
        fn only_what_moved_keys_leave_behind_is_left_behind(
            ops in proptest::collection::vec((0u64..6, 0usize..6, 0u64..12, 0u64..3000, 0u64..5000), 1..300),
        ) {
            let n = 4;
            let mut p = Placement::new(n, 8, D);
            let mut now = 1u64;
            let mut recorded = [0u64; 4];
            for (key, server, level, dt, rt) in ops {
                now += dt;
                p.server_inflight(server % n, level, now);
                let _ = p.place(key, order(key as usize % n, n), |_| true, |_| 1, now);
                let e = p.find(key).map(|i| p.ks[i]);
                let mut plain = p.clone();
                plain.key_done_in(key, rt, 0, now);
                p.key_done_on(key, server, rt, 0, now);
                prop_assert_eq!(&p.ks, &plain.ks);
                let left = e.is_some_and(|e| e.moved != 0 && e.moved as usize - 1 != server && now - e.since_ms < D.residence_ms);
                for j in 0..n {
                    if j != server || !left {
                        prop_assert_eq!(p.sv[j], plain.sv[j]);
                    }
                }
                if left && server < n {
                    recorded[server] += rt.min(D.tau_ms) * 1000;
                }
                for (s, &r) in p.sv.iter().zip(&recorded) {
                    prop_assert!(s.behind_at(now, D.tau_ms) <= r / D.tau_ms);
                }
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
                    p.key_done_on(key, server, dt % 500 * 20, 0, now);
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
        /// and a key moves again within its residence only once, `tau` after a move made on a
        /// guess (its load not yet measured), and that second move holds for its residence.
        #[test]
        fn placement_is_usable_stable_and_deterministic(
            n in 1usize..8,
            ops in proptest::collection::vec((0u64..6, 0usize..8, 0u64..12, 0u64..3000, proptest::bool::ANY), 1..300),
            down in 0usize..9,
        ) {
            let mut p = Placement::new(n, 8, D);
            let mut now = 1u64;
            let mut last_move: std::collections::HashMap<u64, (u64, bool)> = std::collections::HashMap::new();
            for (key, server, level, dt, done) in ops {
                now += dt;
                p.server_inflight(server % n, level, now);
                if done {
                    p.key_done_on(key, server, dt % 500 * 20, 0, now);
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
                            let mut short = false;
                            if let Some(&(t, was_short)) = last_move.get(&key) {
                                if now - t < D.residence_ms {
                                    prop_assert!(now - t >= D.tau_ms && !was_short, "{} ms after the last move", now - t);
                                    short = true;
                                }
                            }
                            last_move.insert(key, (now, short));
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

        /// Whatever the history of logins, responses and session use: a login's prior is at most
        /// `max(session, session_max)` (`local_session` for `session` with node-local
        /// sessions), the same history gives the same loads, and a client that never uses its
        /// sessions looks at most twice as busy as its measured load plus its cold start.
        #[test]
        fn login_priors_are_bounded_deterministic_and_do_not_inflate(
            ops in proptest::collection::vec((0u8..3, 0u64..200, 0u64..4), 1..400),
        ) {
            // Shared and node-local sessions (whose cold start is a whole request).
            for local in [false, true] {
                let params = Params { local_sessions: local, ..D };
                let cold = if local { D.local_session_milli } else { D.session_milli };
                let run = |with_sessions: bool| {
                    let mut p = Placement::new(2, 16, params);
                    let mut now = 1_000u64;
                    let mut loads = Vec::new();
                    let mut worst = 0u64;
                    for &(op, x, s) in &ops {
                        now += x % 50;
                        match op {
                            0 => {
                                let before = p.key_load(7, now);
                                p.login(7, (s % 2) as usize, now);
                                worst = worst.max(p.key_load(7, now) - before);
                            }
                            _ => p.key_done_in(7, x, if with_sessions { s + 1 } else { 0 }, now),
                        }
                        loads.push((p.key_load(7, now), p.server_load(0, now), p.server_load(1, now)));
                    }
                    (loads, worst, p, now)
                };
                let (a, worst, _, _) = run(true);
                prop_assert!(worst <= cold.max(D.session_max_milli) + 1);
                prop_assert_eq!(&a, &run(true).0);
                // Without used sessions: the priors' part of the key's load.
                let (_, _, p, now) = run(false);
                let i = p.find(7).unwrap();
                let mut e = p.ks[i];
                e.advance(now, D.tau_ms);
                let prior = e.prior / D.tau_ms;
                let measured = e.busy / D.tau_ms;
                prop_assert!(prior <= measured * 2 + D.cold_logins * cold, "prior {} measured {}", prior, measured);
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
