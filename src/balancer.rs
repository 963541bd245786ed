//! How a peer is chosen (pure Rust, no FFI).
//!
//! The nginx glue (`upstream.rs`) gathers the request's facts into a [`Request`], wraps
//! nginx's peer list in a [`Servers`] view, and calls [`choose`]. Everything that decides
//! *which* server a request goes to lives in this file, so it can be tested without nginx.
//!
//! 1. **Learned route.** A request whose session was created by server L (the glue looked
//!    the session up in the learned-routes table, or nginx's own `sticky` named L) goes to L
//!    while L is usable for its sessions ([`Route::Learned`]); a *draining* server is, for
//!    these requests only ([`Servers::usable_for_session`]).
//! 2. **Sticky server.** Otherwise the request walks its key's preference list on the ring
//!    ([`Ring::order`]); the first server is its sticky server ([`Route::Sticky`]).
//! 3. **Failover.** When that server is unusable (`down`, failed, at `max_conns`, already
//!    tried by this request), the first usable server further down the list takes it
//!    ([`Route::Failover`]): the same key always fails over to the same second choice.
//! 4. **Bounded load.** A *movable* request ([`may_move`]) whose server (sticky, failover or
//!    learned) is at or over its bound goes to the next server of its own order that is under
//!    its bound ([`Route::Spilled`]), so a spilled client keeps landing on the same second
//!    choice. A server's bound is `ceil(c * (in_flight_total + 1) * weight / live_weight)`
//!    (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads"; HAProxy's
//!    `hash-balance-factor`). With `c > 1` some usable server is always under its bound.
//!    Requests that may not move stay put whatever the load.
//! 5. **Backup.** When no primary server is usable, the same walk runs over the `backup`
//!    servers ([`Route::Backup`]).
//!
//! What moves is set by `kylin_balance` ([`Balance`]). With `requests`, step 4 moves single
//! requests, as above. With `clients` (client placement, [`crate::placement`]) step 4 is off
//! and whole clients move instead: the placement decides, rarely and only off a hot server,
//! where a client (a stickiness key) lives, and the glue passes that in
//! [`Request::moved`]. A movable request then follows its client: to where it was moved
//! ([`Route::Moved`]) while that server is usable, else by steps 2 and 3; a shared session's
//! learned route plays no part (it would pin the client's sessions to where they began).
//! Node-local and unknown sessions keep their learned route, as with `requests`, and nginx's
//! own `sticky` (the operator's pin, [`Request::sticky`]) is followed by every request.

use crate::ring::Ring;

/// How the chosen server was reached; reported by `$kylin_route` and in logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The key's own server.
    Sticky,
    /// The server that created the request's session.
    Learned,
    /// A later server in the key's order, because the sticky or learned one was over its bound.
    Spilled,
    /// A later server in the key's order, because the ones before were unusable.
    Failover,
    /// A backup server, because no primary server was usable.
    Backup,
    /// The server client placement moved the request's client to, off its hot home.
    Moved,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Sticky => "sticky",
            Route::Learned => "learned",
            Route::Spilled => "spilled",
            Route::Failover => "failover",
            Route::Backup => "backup",
            Route::Moved => "moved",
        }
    }
}

/// What is known about a request's session, for the decision to move it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// The request carries no (well-formed) session cookie.
    None,
    /// The session is known to live on one node only.
    Local,
    /// The session is known to be shared by all nodes (e.g. confirmed in Redis).
    Shared,
    /// The request carries a session whose kind is not known (not checked yet).
    Unknown,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::None => "none",
            SessionState::Local => "local",
            SessionState::Shared => "shared",
            SessionState::Unknown => "unknown",
        }
    }
}

/// The one rule for which requests may leave their server when it is over its bound:
/// requests without a session, and sessions every node can serve. A node-local session, or
/// one not known to be shared, never moves while its node is usable.
#[inline]
pub fn may_move(session: SessionState) -> bool {
    matches!(session, SessionState::None | SessionState::Shared)
}

/// A view of one group of servers (primary or backup) at selection time.
pub trait Servers {
    /// Whether server `i` may take this request now (nginx's own availability tests).
    fn usable(&mut self, i: usize) -> bool;
    /// Whether server `i` may take a request of a session that lives there (its learned
    /// server, or the one nginx's `sticky` names): as [`Servers::usable`], except that a
    /// *draining* server (`server ... drain`, nginx 1.29.6+) still serves its own sessions.
    fn usable_for_session(&mut self, i: usize) -> bool {
        self.usable(i)
    }
    /// Requests in flight on server `i`, counted across all worker processes.
    fn load(&self, i: usize) -> u64;
    /// Server `i`'s `weight`.
    fn weight(&self, i: usize) -> u64;
}

/// The load bound of one group at this moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    /// The balance factor `c` in thousandths (1250 = 1.25); 0 turns bounding off.
    pub factor_milli: u32,
    /// Requests in flight on the whole group.
    pub total: u64,
    /// Sum of the weights of the group's live servers.
    pub live_weight: u64,
}

impl Bound {
    /// Bounding turned off: pure stickiness.
    pub const OFF: Bound = Bound { factor_milli: 0, total: 0, live_weight: 0 };

    pub fn is_on(&self) -> bool {
        self.factor_milli > 0 && self.live_weight > 0
    }

    /// `ceil(c * (total + 1) * weight / live_weight)`, the most requests a server of this
    /// weight may have in flight before it stops taking movable requests.
    pub fn limit(&self, weight: u64) -> u64 {
        if !self.is_on() {
            return u64::MAX;
        }
        let w = weight.max(1);
        // 64-bit arithmetic for every realistic value; 128 bits only if it would overflow.
        let num = u64::from(self.factor_milli).checked_mul(self.total.saturating_add(1)).and_then(|x| x.checked_mul(w));
        let den = self.live_weight.checked_mul(1000);
        if let (Some(n), Some(d)) = (num, den) {
            return n.div_ceil(d);
        }
        let num = u128::from(self.factor_milli) * (u128::from(self.total) + 1) * u128::from(w);
        let den = 1000 * u128::from(self.live_weight);
        u64::try_from(num.div_ceil(den)).unwrap_or(u64::MAX)
    }

    /// Whether a server with `load` in flight and this weight may take one more movable
    /// request: `load < limit(weight)`, computed without a division, since for an integer
    /// `load`, `load < ceil(x / d)` exactly when `load * d < x`.
    #[inline]
    pub fn admits(&self, load: u64, weight: u64) -> bool {
        if !self.is_on() {
            return true;
        }
        let lhs = self.live_weight.checked_mul(1000).and_then(|d| d.checked_mul(load));
        let rhs = u64::from(self.factor_milli)
            .checked_mul(self.total.saturating_add(1))
            .and_then(|x| x.checked_mul(weight.max(1)));
        match (lhs, rhs) {
            (Some(l), Some(r)) => l < r,
            _ => self.admits_wide(load, weight),
        }
    }

    /// [`Bound::admits`] for values whose products overflow 64 bits (never in practice).
    #[cold]
    #[inline(never)]
    fn admits_wide(&self, load: u64, weight: u64) -> bool {
        load < self.limit(weight)
    }
}

/// Parses `kylin_balance_factor`: a decimal greater than 1 and at most 100 with up to three
/// decimals, in thousandths, or `off` (0).
pub fn parse_factor(v: &[u8]) -> Option<u32> {
    if v == b"off" {
        return Some(0);
    }
    let text = core::str::from_utf8(v).ok()?;
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || int.len() > 3 || !digits(int) || frac.len() > 3 || !digits(frac) || text.ends_with('.') {
        return None;
    }
    let int: u32 = int.parse().ok()?;
    let f = frac.bytes().zip([100u32, 10, 1]).map(|(d, m)| u32::from(d - b'0') * m).sum::<u32>();
    let milli = int * 1000 + f;
    (1000 < milli && milli <= 100_000).then_some(milli)
}

/// What moves when a server is busy (`kylin_balance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// Whole clients, rarely, off hot servers ([`crate::placement`]); no request-level bound.
    Clients,
    /// Single movable requests, off servers over their bound (`kylin_balance_factor`).
    Requests,
    /// Nothing: pure stickiness.
    Off,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Clients => "clients",
            Balance::Requests => "requests",
            Balance::Off => "off",
        }
    }
}

/// The facts about a request that the decision needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Hash of the stickiness key (client address or `kylin_hash`).
    pub key: u64,
    /// The primary server that created this request's session, if learned.
    pub learned: Option<usize>,
    /// Whether the request may move off its server ([`may_move`]).
    pub movable: bool,
    /// What moves ([`Balance`]).
    pub balance: Balance,
    /// With [`Balance::Clients`]: the server the request's client was moved to, if it was.
    pub moved: Option<usize>,
    /// `learned` is the server nginx's own `sticky` names (1.29.6+): the operator's pin,
    /// followed whatever moves (a request that may move still leaves it when it is over its
    /// bound with `requests`, as a learned route).
    pub sticky: bool,
}

impl Request {
    /// A request with nothing learned or moved, balanced by requests (for tests and tools).
    pub const fn new(key: u64, movable: bool) -> Request {
        Request { key, learned: None, movable, balance: Balance::Requests, moved: None, sticky: false }
    }

    /// Whether the request follows its client's placement rather than its learned route
    /// (nginx's `sticky` pins it otherwise).
    #[inline]
    pub fn follows_client(&self) -> bool {
        self.movable && self.balance == Balance::Clients && !self.sticky
    }

    /// Whether the request may leave a server that is over `bound` at all.
    #[inline(always)]
    fn bounded(&self, bound: Bound) -> bool {
        self.movable && self.balance == Balance::Requests && bound.is_on()
    }
}

/// One group of servers: its ring, its live view and its current bound.
pub struct Group<'a, S: Servers> {
    pub ring: &'a Ring,
    pub servers: &'a mut S,
    pub bound: Bound,
}

/// The decision: which server of which group, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub server: usize,
    pub backup: bool,
    pub route: Route,
    /// For [`Route::Spilled`]: the over-bound server the request would otherwise have taken.
    pub from: Option<usize>,
}

/// For a movable request whose `home` server is over its bound: the first usable server of
/// the key's order (other than `home`) that is under its bound.
fn spill<S: Servers>(g: &mut Group<'_, S>, key: u64, home: usize) -> Option<usize> {
    let bound = g.bound;
    let servers = &mut *g.servers;
    g.ring
        .order(key)
        .filter(|&i| i != home)
        .find(|&i| servers.usable(i) && bound.admits(servers.load(i), servers.weight(i)))
}

/// Whether `i` is over its bound (so a movable request should look further).
#[inline(always)]
fn over<S: Servers>(g: &Group<'_, S>, i: usize) -> bool {
    !g.bound.admits(g.servers.load(i), g.servers.weight(i))
}

/// Sticky/failover/spill within one group: (server, route, spilled from); `None` when no
/// server of the group is usable.
#[inline(never)]
fn within<S: Servers>(g: &mut Group<'_, S>, req: &Request, learned: Option<usize>) -> Option<(usize, Route, Option<usize>)> {
    let bounded = req.bounded(g.bound);
    // A client that placement moved: its movable requests go where it lives now.
    let learned = if req.follows_client() {
        if let Some(m) = req.moved.filter(|&m| m < g.ring.peers()) {
            if g.servers.usable(m) {
                return Some((m, Route::Moved, None));
            }
        }
        None
    } else {
        learned
    };
    if let Some(l) = learned {
        if l < g.ring.peers() && g.servers.usable_for_session(l) {
            if bounded && over(g, l) {
                if let Some(t) = spill(g, req.key, l) {
                    return Some((t, Route::Spilled, Some(l)));
                }
            }
            return Some((l, Route::Learned, None));
        }
    }
    // The common case: the key's own server is usable and need not be left.
    let (owner, at) = g.ring.locate(req.key)?;
    if g.servers.usable(owner) && !(bounded && over(g, owner)) {
        return Some((owner, Route::Sticky, None));
    }
    let mut order = g.ring.order_at(at);
    // One walk of the key's order: the first usable server is home; if a movable request must
    // leave it, the walk goes on from there (the servers before home are unusable anyway).
    let mut first = true;
    let mut found = None;
    for i in order.by_ref() {
        if g.servers.usable(i) {
            found = Some((i, if first { Route::Sticky } else { Route::Failover }));
            break;
        }
        first = false;
    }
    let (home, route) = found?;
    if bounded && over(g, home) {
        let bound = g.bound;
        let servers = &mut *g.servers;
        if let Some(t) = order.find(|&i| servers.usable(i) && bound.admits(servers.load(i), servers.weight(i))) {
            return Some((t, Route::Spilled, Some(home)));
        }
    }
    Some((home, route, None))
}

/// Chooses the server for a request. Returns `None` when no server in either group is usable.
///
/// The same as [`choose_primary`], then [`choose_backup`] if no primary server is usable. The
/// glue calls the two steps itself, because nginx's peer lists are locked one at a time: the
/// backup list only after the primary list is released, as round robin does.
pub fn choose<P, B>(req: &Request, primary: Group<'_, P>, backup: Option<Group<'_, B>>) -> Option<Choice>
where
    P: Servers,
    B: Servers,
{
    choose_primary(req, primary).or_else(|| choose_backup(req, backup?))
}

/// Steps 1 to 4: the choice among the primary servers; `None` when none is usable.
///
/// The most common request (nothing learned, its client not moved) whose own server is
/// usable and within its bound is answered here, inlined into the caller: the answer
/// `within` would give (`fast_path_is_within` checks it). `within`, out of line, handles
/// every other request.
#[inline(always)]
pub fn choose_primary<P: Servers>(req: &Request, mut primary: Group<'_, P>) -> Option<Choice> {
    if req.learned.is_none() && req.moved.is_none() {
        if let Some((owner, _)) = primary.ring.locate(req.key) {
            let bounded = req.bounded(primary.bound);
            if primary.servers.usable(owner) && !(bounded && over(&primary, owner)) {
                return Some(Choice { server: owner, backup: false, route: Route::Sticky, from: None });
            }
        }
    }
    within(&mut primary, req, req.learned).map(|(server, route, from)| Choice { server, backup: false, route, from })
}

/// Step 5: the choice among the backup servers, for a request no primary server can take.
/// Learned routes name primary servers, so they play no part here.
pub fn choose_backup<B: Servers>(req: &Request, mut backup: Group<'_, B>) -> Option<Choice> {
    let req = Request { moved: None, ..*req };
    within(&mut backup, &req, None).map(|(server, _, _)| Choice { server, backup: true, route: Route::Backup, from: None })
}

// ---------------------------------------------------------------------------------------------
// The rules around the choice: what a request's session is, what moves with it, what the
// backups see, and when asking the session store can matter. The glue gathers the facts and
// applies the answers.

/// The state of a request's session (one it carries): shared when the store is
/// `kylin_session_store shared`, else the precontent phase's answer (`checked`: from the
/// verdict cache or a lookup, [`crate::store::verdict_state`]; `Unknown` for an id the store cannot check, see
/// [`crate::store::shared_key`]), else unknown. An unknown session keeps its learned route
/// and never moves.
pub fn session_state(all_shared: bool, checked: Option<SessionState>) -> SessionState {
    match (all_shared, checked) {
        (true, _) => SessionState::Shared,
        (false, Some(s)) => s,
        (false, None) => SessionState::Unknown,
    }
}

/// Whether the session's learned route moves with the request to the server chosen: a
/// spilled (hence shared) session does, so that it stays on its new server instead of
/// bouncing back. Moved clients keep their learned routes: they follow placement, which
/// keeps them where they were moved.
pub fn moves_route(choice: &Choice, has_session: bool) -> bool {
    choice.route == Route::Spilled && has_session
}

/// The request as the backup servers see it, once no primary server can take it: its key
/// and whether it may move, but no learned route (a route names a primary server), no
/// placement and no bound. As with round robin, a request that moved to the backups stays
/// there for its retries, which start with none of the backups tried.
pub fn on_backup(key: u64, movable: bool) -> Request {
    Request::new(key, movable)
}

/// Whether a store lookup can change where a session's request goes, so that it is worth a
/// wait: when no route is known for the session while routes are shared between nginx
/// instances (Redis may know one), or when its server is near its bound (`near_bound`,
/// asked only then: only a shared session may leave it).
pub fn worth_asking(route_known: bool, shares_routes: bool, near_bound: impl FnOnce() -> bool) -> bool {
    (!route_known && shares_routes) || near_bound()
}

impl Bound {
    /// Whether a server with `load` in flight and this weight is near its bound ("near":
    /// within a quarter of it), so that whether its sessions are shared can matter soon.
    pub fn near(&self, load: u64, weight: u64) -> bool {
        (load + 1).saturating_mul(4) >= self.limit(weight).saturating_mul(3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::key_hash;
    use proptest::prelude::*;

    #[test]
    fn session_rules() {
        // `shared` stores make every session shared; else the precontent's answer; else unknown.
        assert_eq!(session_state(true, None), SessionState::Shared);
        assert_eq!(session_state(true, Some(SessionState::Local)), SessionState::Shared);
        assert_eq!(session_state(false, Some(SessionState::Local)), SessionState::Local);
        assert_eq!(session_state(false, None), SessionState::Unknown);
        // Only a spill moves a session's route.
        let c = |route| Choice { server: 1, backup: false, route, from: None };
        assert!(moves_route(&c(Route::Spilled), true));
        assert!(!moves_route(&c(Route::Spilled), false));
        for r in [Route::Sticky, Route::Learned, Route::Failover, Route::Backup, Route::Moved] {
            assert!(!moves_route(&c(r), true), "{r:?}");
        }
        // Backups see no learned route, placement or sticky hint.
        let b = on_backup(7, true);
        assert_eq!((b.key, b.learned, b.movable, b.moved, b.sticky), (7, None, true, None, false));
        // Ask when Redis may know a route, or when the server is near its bound (asked lazily).
        assert!(worth_asking(false, true, || panic!("not needed")));
        assert!(!worth_asking(true, true, || false));
        assert!(worth_asking(true, true, || true));
        assert!(!worth_asking(false, false, || false));
    }

    #[test]
    fn near_is_within_a_quarter_of_the_bound() {
        // 4 servers of weight 1, 39 in flight, c = 1.25: limit ceil(1.25 * 40 / 4) = 13.
        let b = Bound { factor_milli: 1250, total: 39, live_weight: 4 };
        assert_eq!(b.limit(1), 13);
        assert!(!b.near(8, 1)); // 9 * 4 = 36 < 39
        assert!(b.near(9, 1)); // 10 * 4 = 40 >= 39
        // Off: not near, and no overflow.
        assert!(!Bound::OFF.near(1 << 40, 1));
    }

    #[derive(Clone)]
    struct Set {
        up: Vec<bool>,
        load: Vec<u64>,
        weight: Vec<u64>,
    }

    impl Set {
        fn up(n: usize) -> Set {
            Set { up: vec![true; n], load: vec![0; n], weight: vec![1; n] }
        }
        fn bound(&self, factor_milli: u32) -> Bound {
            let live_weight = (0..self.up.len()).filter(|&i| self.up[i]).map(|i| self.weight[i]).sum();
            Bound { factor_milli, total: self.load.iter().sum(), live_weight }
        }
    }

    impl Servers for Set {
        fn usable(&mut self, i: usize) -> bool {
            self.up[i]
        }
        fn load(&self, i: usize) -> u64 {
            self.load[i]
        }
        fn weight(&self, i: usize) -> u64 {
            self.weight[i]
        }
    }

    fn ring(n: usize) -> Ring {
        let names: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
        Ring::new(names.iter().map(|s| (s.as_bytes(), 1))).unwrap()
    }

    fn pick(r: &Ring, s: &mut Set, req: Request, factor: u32) -> Option<Choice> {
        let bound = s.bound(factor);
        choose(&req, Group { ring: r, servers: s, bound }, None::<Group<'_, Set>>)
    }

    fn req(key: u64) -> Request {
        Request { key, learned: None, movable: true, ..Request::new(0, true) }
    }

    /// A view in which server `draining` takes only its own sessions.
    struct Draining {
        set: Set,
        draining: usize,
    }

    impl Servers for Draining {
        fn usable(&mut self, i: usize) -> bool {
            i != self.draining && self.set.usable(i)
        }
        fn usable_for_session(&mut self, i: usize) -> bool {
            self.set.usable(i)
        }
        fn load(&self, i: usize) -> u64 {
            self.set.load(i)
        }
        fn weight(&self, i: usize) -> u64 {
            self.set.weight(i)
        }
    }

    #[test]
    fn a_draining_server_keeps_its_sessions_and_takes_nothing_else() {
        let r = ring(4);
        for key in (0..400u64).map(|k| key_hash(&k.to_le_bytes())) {
            let d = r.owner(key).unwrap();
            let mut s = Draining { set: Set::up(4), draining: d };
            let bound = s.set.bound(1250);
            // Its own key: fails over, never the draining server.
            let c = choose(&Request { key, learned: None, movable: true, ..Request::new(0, true) }, Group { ring: &r, servers: &mut s, bound }, None::<Group<'_, Set>>).unwrap();
            assert_ne!(c.server, d);
            assert_eq!(c.route, Route::Failover);
            // A session learned there still goes there (node-local or not).
            for movable in [false, true] {
                let c = choose(&Request { key, learned: Some(d), movable, ..Request::new(0, true) }, Group { ring: &r, servers: &mut s, bound }, None::<Group<'_, Set>>).unwrap();
                assert_eq!((c.server, c.route), (d, Route::Learned));
            }
            // A session learned elsewhere never spills onto it.
            let other = (d + 1) % 4;
            s.set.load[other] = 100;
            let bound = s.set.bound(1250);
            let c = choose(&Request { key, learned: Some(other), movable: true, ..Request::new(0, true) }, Group { ring: &r, servers: &mut s, bound }, None::<Group<'_, Set>>).unwrap();
            assert_ne!(c.server, d);
        }
    }

    #[test]
    fn only_session_less_and_shared_sessions_move() {
        assert!(may_move(SessionState::None));
        assert!(may_move(SessionState::Shared));
        assert!(!may_move(SessionState::Local));
        assert!(!may_move(SessionState::Unknown));
    }

    #[test]
    fn sticky_when_owner_is_usable_and_under_bound() {
        let r = ring(4);
        for k in 0..500u32 {
            let h = key_hash(&k.to_le_bytes());
            let c = pick(&r, &mut Set::up(4), req(h), 1250).unwrap();
            assert_eq!(c, Choice { server: r.owner(h).unwrap(), backup: false, route: Route::Sticky, from: None });
        }
    }

    #[test]
    fn failover_goes_to_the_keys_second_choice() {
        let r = ring(4);
        for k in 0..500u32 {
            let h = key_hash(&k.to_le_bytes());
            let order: Vec<usize> = r.order(h).collect();
            let mut s = Set::up(4);
            s.up[order[0]] = false;
            let c = pick(&r, &mut s, req(h), 0).unwrap();
            assert_eq!((c.server, c.route), (order[1], Route::Failover));
            s.up[order[1]] = false;
            let c = pick(&r, &mut s, req(h), 0).unwrap();
            assert_eq!((c.server, c.route), (order[2], Route::Failover));
        }
    }

    #[test]
    fn backup_only_when_no_primary_is_usable() {
        let r = ring(3);
        let b = ring(2);
        let h = key_hash(b"client");
        let mut p = Set::up(3);
        p.up = vec![false, true, false];
        let mut bs = Set::up(2);
        let c = choose(&req(h), Group { ring: &r, servers: &mut p, bound: Bound::OFF }, Some(Group { ring: &b, servers: &mut bs, bound: Bound::OFF })).unwrap();
        assert!(!c.backup);
        p.up = vec![false; 3];
        let c = choose(&req(h), Group { ring: &r, servers: &mut p, bound: Bound::OFF }, Some(Group { ring: &b, servers: &mut bs, bound: Bound::OFF })).unwrap();
        assert_eq!((c.backup, c.route, c.server), (true, Route::Backup, b.owner(h).unwrap()));
        bs.up = vec![false; 2];
        assert_eq!(choose(&req(h), Group { ring: &r, servers: &mut p, bound: Bound::OFF }, Some(Group { ring: &b, servers: &mut bs, bound: Bound::OFF })), None);
        assert_eq!(pick(&r, &mut p, req(h), 0), None);
    }

    #[test]
    fn the_backup_step_alone_ignores_learned_routes() {
        let b = ring(3);
        let h = key_hash(b"client");
        let mut bs = Set::up(3);
        // A learned index names a primary server: on the backups it means nothing.
        let r = Request { key: h, learned: Some(b.order(h).nth(2).unwrap()), movable: false, ..Request::new(0, true) };
        let c = choose_backup(&r, Group { ring: &b, servers: &mut bs, bound: Bound::OFF }).unwrap();
        assert_eq!(c, Choice { server: b.owner(h).unwrap(), backup: true, route: Route::Backup, from: None });
        bs.up = vec![false; 3];
        assert_eq!(choose_backup(&r, Group { ring: &b, servers: &mut bs, bound: Bound::OFF }), None);
    }

    #[test]
    fn factors() {
        assert_eq!(parse_factor(b"1.25"), Some(1250));
        assert_eq!(parse_factor(b"1.5"), Some(1500));
        assert_eq!(parse_factor(b"2"), Some(2000));
        assert_eq!(parse_factor(b"1.001"), Some(1001));
        assert_eq!(parse_factor(b"100"), Some(100_000));
        assert_eq!(parse_factor(b"off"), Some(0));
        for bad in [&b"1"[..], b"1.0", b"0.9", b"1.2345", b"-1.5", b"1.", b".5", b"abc", b"", b"100.001", b"1e3", b"1,5", b"99999999999"] {
            assert_eq!(parse_factor(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn bound_formula() {
        // c = 1.25, 10 in flight, 4 equal servers: ceil(1.25 * 11 / 4) = ceil(3.4375) = 4.
        let b = Bound { factor_milli: 1250, total: 10, live_weight: 4 };
        assert_eq!(b.limit(1), 4);
        assert!(b.admits(3, 1));
        assert!(!b.admits(4, 1));
        // Weight 2 of 5: ceil(1.25 * 11 * 2 / 5) = ceil(5.5) = 6.
        let b = Bound { factor_milli: 1250, total: 10, live_weight: 5 };
        assert_eq!(b.limit(2), 6);
        // Idle cluster: every server admits its first request.
        let b = Bound { factor_milli: 1010, total: 0, live_weight: 100 };
        assert_eq!(b.limit(1), 1);
        assert!(Bound::OFF.admits(u64::MAX - 1, 1));
        // No overflow at extremes.
        let b = Bound { factor_milli: u32::MAX, total: u64::MAX, live_weight: 1 };
        assert_eq!(b.limit(u64::MAX), u64::MAX);
    }

    #[test]
    fn movable_request_spills_to_the_next_server_under_bound() {
        let r = ring(4);
        let h = key_hash(b"busy BI server");
        let order: Vec<usize> = r.order(h).collect();
        let mut s = Set::up(4);
        s.load[order[0]] = 10; // total 10, bound ceil(1.25*11/4) = 4
        let c = pick(&r, &mut s, req(h), 1250).unwrap();
        assert_eq!((c.server, c.route, c.from), (order[1], Route::Spilled, Some(order[0])));
        // Its second choice is full too: the third.
        s.load[order[1]] = 5; // total 15, bound ceil(1.25*16/4) = 5
        let c = pick(&r, &mut s, req(h), 1250).unwrap();
        assert_eq!((c.server, c.route), (order[2], Route::Spilled));
        // A request that may not move stays.
        let c = pick(&r, &mut s, Request { movable: false, ..req(h) }, 1250).unwrap();
        assert_eq!((c.server, c.route), (order[0], Route::Sticky));
        // Bounding off: stays.
        let c = pick(&r, &mut s, req(h), 0).unwrap();
        assert_eq!((c.server, c.route), (order[0], Route::Sticky));
    }

    #[test]
    fn learned_route_wins_while_its_server_is_usable() {
        let r = ring(4);
        let h = key_hash(b"office NAT");
        let order: Vec<usize> = r.order(h).collect();
        let l = order[3];
        let mut s = Set::up(4);
        let c = pick(&r, &mut s, Request { key: h, learned: Some(l), movable: false, ..Request::new(0, true) }, 1250).unwrap();
        assert_eq!((c.server, c.route), (l, Route::Learned));
        // Over its bound but not movable (node-local or unknown session): stays.
        s.load[l] = 50;
        let c = pick(&r, &mut s, Request { key: h, learned: Some(l), movable: false, ..Request::new(0, true) }, 1250).unwrap();
        assert_eq!((c.server, c.route), (l, Route::Learned));
        // Over its bound and shared: spills along the key's order.
        let c = pick(&r, &mut s, Request { key: h, learned: Some(l), movable: true, ..Request::new(0, true) }, 1250).unwrap();
        assert_eq!((c.server, c.route), (order[0], Route::Spilled));
        // Learned server down: the key's order decides.
        s.up[l] = false;
        let c = pick(&r, &mut s, Request { key: h, learned: Some(l), movable: false, ..Request::new(0, true) }, 1250).unwrap();
        assert_eq!((c.server, c.route), (order[0], Route::Sticky));
        // An out-of-range learned index (server list changed) is ignored.
        let c = pick(&r, &mut s, Request { key: h, learned: Some(99), movable: false, ..Request::new(0, true) }, 1250).unwrap();
        assert_eq!(c.route, Route::Sticky);
    }

    #[test]
    fn no_server_under_bound_means_stay() {
        let r = ring(2);
        let h = 7;
        let mut s = Set::up(2);
        s.load = vec![5, 5];
        // Bound with total passed explicitly lower than the loads (a racy snapshot).
        let bound = Bound { factor_milli: 1100, total: 2, live_weight: 2 };
        let c = choose(&req(h), Group { ring: &r, servers: &mut s, bound }, None::<Group<'_, Set>>).unwrap();
        assert_eq!(c.route, Route::Sticky);
    }

    proptest! {
        /// The division-free test agrees with the bound's definition, small values and extremes.
        #[test]
        fn admits_is_load_below_limit(
            factor_milli in prop_oneof![1001u32..100_000, any::<u32>()],
            total in prop_oneof![0u64..10_000, any::<u64>()],
            live_weight in prop_oneof![1u64..1_000, any::<u64>()],
            load in prop_oneof![0u64..10_000, any::<u64>()],
            weight in prop_oneof![1u64..100, any::<u64>()],
        ) {
            let b = Bound { factor_milli, total, live_weight };
            prop_assert_eq!(b.admits(load, weight), load < b.limit(weight));
        }

        /// `choose_primary`'s inline common case gives `within`'s answer, for any request,
        /// servers' state and bound.
        #[test]
        fn fast_path_is_within(
            n in 1usize..8,
            up in proptest::collection::vec(any::<bool>(), 8),
            // Idle and busy servers, so that some are over the bound.
            loads in proptest::collection::vec(prop_oneof![0u64..2, 40u64..60], 8),
            weights in proptest::collection::vec(1u64..3, 8),
            factor in prop_oneof![Just(0u32), 1010u32..2000],
            key in any::<u64>(),
            learned in proptest::option::of(0usize..9),
            moved in proptest::option::of(0usize..9),
            movable in any::<bool>(),
            sticky in any::<bool>(),
            balance in prop_oneof![Just(Balance::Requests), Just(Balance::Clients), Just(Balance::Off)],
        ) {
            let r = ring(n);
            let mut s = Set { up: up[..n].to_vec(), load: loads[..n].to_vec(), weight: weights[..n].to_vec() };
            let bound = s.bound(factor);
            let req = Request { key, learned, movable, balance, moved, sticky };
            let slow = within(&mut Group { ring: &r, servers: &mut s.clone(), bound }, &req, req.learned)
                .map(|(server, route, from)| Choice { server, backup: false, route, from });
            prop_assert_eq!(choose_primary(&req, Group { ring: &r, servers: &mut s, bound }), slow);
        }

        /// Feeding movable requests one by one (none finishing), no server ever exceeds its
        /// bound, and every request lands somewhere.
        #[test]
        fn movable_load_never_exceeds_the_bound(
            n in 2usize..12,
            weights in proptest::collection::vec(1u64..4, 12),
            factor in 1010u32..2000,
            keys in proptest::collection::vec(0u64..6, 1..300),
        ) {
            let r = {
                let names: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}:7070")).collect();
                Ring::new(names.iter().zip(&weights).map(|(s, &w)| (s.as_bytes(), w as u32))).unwrap()
            };
            let mut s = Set::up(n);
            s.weight = weights[..n].to_vec();
            let w_total: u64 = s.weight.iter().sum();
            for k in keys {
                let bound = s.bound(factor);
                let c = choose(&req(key_hash(&k.to_le_bytes())), Group { ring: &r, servers: &mut s, bound }, None::<Group<'_, Set>>).unwrap();
                // Admitted under the bound computed before this request.
                prop_assert!(s.load[c.server] < bound.limit(s.weight[c.server]));
                s.load[c.server] += 1;
                let _ = w_total;
            }
        }

        /// Requests that may not move always go to their sticky (or learned) server.
        #[test]
        fn pinned_requests_never_move(
            loads in proptest::collection::vec(0u64..100, 5),
            key in any::<u64>(),
            learned in proptest::option::of(0usize..5),
        ) {
            let r = ring(5);
            let mut s = Set::up(5);
            s.load = loads;
            let c = pick(&r, &mut s, Request { key, learned, movable: false, ..Request::new(0, true) }, 1250).unwrap();
            match learned {
                Some(l) => prop_assert_eq!((c.server, c.route), (l, Route::Learned)),
                None => prop_assert_eq!((c.server, c.route), (r.owner(key).unwrap(), Route::Sticky)),
            }
        }

        /// Load the nodes report (`kylin_load_report`) never moves a node-local session: with
        /// any servers saturated and placement asked (even for a pinned request, which the
        /// glue never does), a request whose session is pinned goes to its learned server while
        /// it is usable; a movable one lands on a usable server.
        #[test]
        fn a_report_never_moves_a_node_local_session(
            loads in proptest::collection::vec(0u64..12, 5),
            sat_mask in 0u8..32,
            key in any::<u64>(),
            learned in 0usize..5,
            movable in any::<bool>(),
            client_load in 0u64..5_000,
        ) {
            use crate::placement::{Params, Placement, Placed};
            let r = ring(5);
            let mut p = Placement::new(5, 16, Params::DEFAULT);
            let now = 1_000_000;
            for (i, &l) in loads.iter().enumerate() {
                p.server_inflight(i, l, now - 100_000);
                p.server_inflight(i, l, now);
            }
            // The client is known (first seen long ago) and carries `client_load` thousandths.
            p.key_done(key, 0, now - 5_000);
            for _ in 0..client_load / 100 {
                p.key_done(key, 100, now);
            }
            let sat = |i: usize| sat_mask & (1 << i) != 0;
            let placed = p.place_reported(key, r.order(key), |_| true, |_| 1, sat, now);
            let moved = placed.and_then(|(s, how)| matches!(how, Placed::Moved | Placed::MovedNow).then_some(s));
            let mut s = Set::up(5);
            s.load = loads.clone();
            let req = Request { key, learned: Some(learned), movable, balance: Balance::Clients, moved, sticky: false };
            let c = pick(&r, &mut s, req, 1250).unwrap();
            if !movable {
                prop_assert_eq!((c.server, c.route), (learned, Route::Learned));
            } else if let Some(m) = moved {
                prop_assert_eq!((c.server, c.route), (m, Route::Moved));
                prop_assert!(!sat(m) || placed.map(|x| x.1) == Some(Placed::Moved));
            }
        }

        /// With `kylin_balance clients`, nginx's `sticky` still pins: its server is followed by
        /// every request while usable, moved client or not.
        #[test]
        fn clients_mode_follows_nginx_sticky(
            key in any::<u64>(),
            pin in 0usize..5,
            moved in proptest::option::of(0usize..5),
            movable in any::<bool>(),
        ) {
            let r = ring(5);
            let req = Request { key, learned: Some(pin), movable, balance: Balance::Clients, moved, sticky: true };
            let c = pick(&r, &mut Set::up(5), req, 1250).unwrap();
            prop_assert_eq!((c.server, c.route), (pin, Route::Learned));
        }

        /// With `kylin_balance clients`: whatever the loads, the bound, the learned route and
        /// where the client was moved, a request lands on a usable server; a pinned request
        /// goes to its learned server while usable (never moved, never spilled); a movable one
        /// goes to its client's server while usable, else to its key's first usable server,
        /// and never by its learned route or a spill.
        #[test]
        fn clients_mode_moves_clients_never_pinned_sessions(
            loads in proptest::collection::vec(0u64..100, 5),
            up in proptest::collection::vec(proptest::bool::weighted(0.8), 5),
            key in any::<u64>(),
            learned in proptest::option::of(0usize..5),
            moved in proptest::option::of(0usize..7),
            movable in any::<bool>(),
        ) {
            let r = ring(5);
            let mut s = Set::up(5);
            s.load = loads;
            s.up = up.clone();
            let req = Request { key, learned, movable, balance: Balance::Clients, moved, sticky: false };
            let c = pick(&r, &mut s, req, 1250);
            let first_up = r.order(key).find(|&i| up[i]);
            let Some(c) = c else {
                prop_assert!(first_up.is_none());
                return Ok(());
            };
            prop_assert!(up[c.server]);
            prop_assert!(c.route != Route::Spilled);
            match (movable, learned.filter(|&l| up[l]), moved.filter(|&m| m < 5 && up[m])) {
                (false, Some(l), _) => prop_assert_eq!((c.server, c.route), (l, Route::Learned)),
                (true, _, Some(m)) => prop_assert_eq!((c.server, c.route), (m, Route::Moved)),
                _ => {
                    prop_assert_eq!(Some(c.server), first_up);
                    prop_assert!(matches!(c.route, Route::Sticky | Route::Failover));
                }
            }
        }
    }
}
