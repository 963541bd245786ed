//! The peer callbacks, nginx's side of the balancer, in the order nginx calls them (as in
//! its own `ngx_http_upstream_hash_module.c`):
//! - `init_upstream` (configuration): round robin's setup, then the tables and shared zones;
//! - `init_peer` (per request): the session cookie, its state and its learned route;
//! - `get` (per try): under the primary list's lock ([`Locked`]), gathers loads and asks
//!   [`balancer::choose_primary`], then, only if no primary server is usable, releases it and
//!   asks [`balancer::choose_backup`] under the backup list's lock; does round robin's
//!   bookkeeping for the peer chosen and counts the try in flight;
//! - `free` (per try): uncounts it, lets [`learning`] learn from the response, then round
//!   robin's free.
//!
//! nginx's round-robin module keeps the peer list and all per-peer bookkeeping (`conns`,
//! `fails`, `checked`, the request's `tried` bitmap, the shared `zone` copy); we reuse it
//! unchanged and replace only the choice.

use core::ffi::c_void;
use core::ptr;
use std::net::{IpAddr, Ipv6Addr};

use ngx::core::Status;
use ngx::ffi::{
    ngx_conf_t, ngx_http_complex_value, ngx_http_request_t, ngx_http_upstream_free_round_robin_peer,
    ngx_http_upstream_init_round_robin, ngx_http_upstream_init_round_robin_peer,
    ngx_http_upstream_rr_peer_data_t, ngx_http_upstream_rr_peers_t, ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_palloc, ngx_peer_connection_t, ngx_str_t,
    ngx_time, ngx_uint_t, sockaddr_in, sockaddr_in6, NGX_LOG_EMERG, NGX_LOG_ERR, NGX_LOG_WARN, NGX_PEER_FAILED,
};
use ngx::http::HttpModule;
// Used by ngx_log_debug_mask!, which expands to nothing unless nginx is built --with-debug.
#[allow(unused_imports)]
use ngx::log::DebugMask;
use ngx::{ngx_conf_log_error, ngx_log_debug_mask, ngx_log_error};

use crate::balancer::{self, Balance, Bound, Choice, Group as Pick, Request, Route, Servers, SessionState};
use crate::conf::{srv_conf, srv_conf_mut, SrvConf};
use crate::health::Gate;
use crate::key::client_key;
use crate::load::{self, Counter, Slot, Use};
use crate::ngx_ext::{failed, request_cookies, server_count, server_names, Backup, Locked, Peers, DRAINING};
use crate::placement::Placed;
use crate::ring::key_hash;
use crate::routes::{RecentRoutes, RouteTable, Share, RECENT_ROUTES};
use crate::session::{self, RequestSession};
use crate::tables::{build_state, ensure_state, live_weight, snapshot_lists, Group, Tables, UpstreamState};
use crate::{learning, shm, store_io};

/// nginx's NGX_PEER_NEXT (403/404 passed to the next server): not a failure, not a response
/// to learn from.
const NGX_PEER_NEXT: ngx_uint_t = 2;

/// `peer.init_upstream`: round robin's setup, then our rings and shared zones.
pub unsafe extern "C" fn init_upstream(cf: *mut ngx_conf_t, us: *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t {
    // SAFETY: nginx passes valid cf and us.
    unsafe {
        if !Status(ngx_http_upstream_init_round_robin(cf, us)).is_ok() {
            return Status::NGX_ERROR.into();
        }
        (*us).peer.init = Some(init_peer);

        let Some(kcf) = srv_conf_mut(us) else {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "kylin balancer used outside an upstream block");
            return Status::NGX_ERROR.into();
        };
        kcf.init_upstream_ran = true;
        kcf.name = (*us).host.as_bytes().to_vec();
        // The http-level kylin_session_store applies to upstreams without their own.
        let ctx = (*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t;
        if let Some(http) = (*(*ctx).srv_conf.add(crate::Module::module().ctx_index) as *const SrvConf).as_ref() {
            if !ptr::eq(http, kcf) {
                kcf.inherit_store(http);
            }
        }

        let peers = (*us).peer.data as *mut ngx_http_upstream_rr_peers_t;
        let per_server = if kcf.load_report.is_some() { 3 } else { 2 };
        match shm::load_zone(cf, per_server * server_count(peers) + 2) {
            Some(z) => kcf.load_zone = z,
            None => return Status::NGX_ERROR.into(),
        }
        // The slots this configuration uses, claimed and stamped when the zone is set up.
        shm::note_load_keys(
            server_names(peers)
                .map(|n| (load::server_key(&kcf.name, n), Use::Counts))
                .chain([(load::upstream_key(&kcf.name), Use::Counts)])
                .chain(store_io::store_slot_keys(kcf)),
        );
        // Each server's health slot (health checks and run-time drain), kept across reloads
        // while the server stays.
        shm::note_fresh_keys(server_names(peers).map(|n| load::health_key(&kcf.name, n)));
        if kcf.load_report.is_some() {
            // ... and its load-report slot (`kylin_load_report`).
            shm::note_fresh_keys(server_names(peers).map(|n| load::report_key(&kcf.name, n)));
        }
        let primaries = (*peers).number;
        if kcf.balance.is_none() && kcf.balance_factor.is_none() && primaries > shm::PLACEMENT_SERVERS {
            // The default cannot place clients on this many servers: balance requests, and say so.
            ngx_log_error!(
                NGX_LOG_WARN,
                (*cf).log,
                "upstream \"{}\" has {} servers: client placement handles up to {}, so it balances requests (\"kylin_balance requests\") in {}:{}",
                (*us).host,
                primaries,
                shm::PLACEMENT_SERVERS,
                kcf.file.map(|f| f.to_string_lossy()).unwrap_or_default(),
                kcf.line
            );
            kcf.balance = Some(Balance::Requests);
        }
        if kcf.balance() == Balance::Clients {
            if primaries > shm::PLACEMENT_SERVERS {
                ngx_log_error!(
                    NGX_LOG_EMERG,
                    (*cf).log,
                    "upstream \"{}\" has {} servers: \"kylin_balance clients\" places clients on up to {}; use \"kylin_balance requests\" in {}:{}",
                    (*us).host,
                    primaries,
                    shm::PLACEMENT_SERVERS,
                    kcf.file.map(|f| f.to_string_lossy()).unwrap_or_default(),
                    kcf.line
                );
                return Status::NGX_ERROR.into();
            }
            match shm::placement_zone(cf, &kcf.name) {
                Some(z) => kcf.placement_zone = Some(z),
                None => return Status::NGX_ERROR.into(),
            }
        }
        if kcf.routes_zone.is_none() {
            let mut name = ngx_str_t { len: shm::DEFAULT_ROUTES_ZONE.len(), data: shm::DEFAULT_ROUTES_ZONE.as_ptr() as *mut u8 };
            match shm::routes_zone(cf, &mut name, shm::DEFAULT_ROUTES_SIZE) {
                Some(z) => kcf.routes_zone = Some(z),
                None => return Status::NGX_ERROR.into(),
            }
        }
        // Each worker's own copy (workers fork after this).
        kcf.recent_routes = RecentRoutes::new(RECENT_ROUTES);

        kcf.resolve();

        // With a zone, peers are copied to shared memory after this point: each worker builds
        // its tables from that copy on first use. Building them now as well shows a
        // configuration error in `nginx -t`, and workers without a zone inherit them.
        // SAFETY: peers is the upstream's primary list (nothing is shared yet: no lock taken).
        match snapshot_lists(Locked::primary(peers)).and_then(|(p, b)| build_state(p, b)) {
            Ok(state) => kcf.tables = Tables::new(Some(Box::new(state))),
            Err(e) => {
                ngx_log_error!(
                    NGX_LOG_EMERG,
                    (*cf).log,
                    "upstream \"{}\": {} in {}:{}",
                    (*us).host,
                    e,
                    kcf.file.map(|f| f.to_string_lossy()).unwrap_or_default(),
                    kcf.line
                );
                return Status::NGX_ERROR.into();
            }
        }
    }
    Status::NGX_OK.into()
}

/// Per-request balancer data. `rrp` comes first: round robin's callbacks receive `&rrp`.
///
/// No larger than ip_hash's (80 bytes): it comes from the request pool, whose first block the
/// whole request shares, and measurements showed larger per-request data pushing requests
/// into a second pool block (a malloc and a free per request, ~250 instructions). So the
/// configuration and the stickiness key are found again from the request when needed.
#[repr(C)]
struct PeerData {
    rrp: ngx_http_upstream_rr_peer_data_t,
    r: *mut ngx_http_request_t,
    /// The request's session, if it carries one (`key` 0 otherwise).
    sess: SessionData,
    /// Counters of the server this try went to, while it is counted in flight.
    counted: Option<&'static Slot>,
    /// Client placement was busy when this try was chosen: `free` measures its response.
    measure: bool,
    /// This request moved to the backup servers.
    on_backup: bool,
    /// The try went to a primary server that nginx held failed (`max_fails`) until its
    /// `fail_timeout` passed: if it succeeds, the server is back ([`learning::came_back`]).
    trial: bool,
    /// The try is also counted in the upstream's in-flight total.
    counted_total: bool,
    /// What the balancer decided, for `$kylin_route` and `$kylin_session_state`: the
    /// request's module context points here (no separate allocation).
    ctx: crate::variables::RequestCtx,
}

// The size argued for above; a compile error if a new field breaks it.
const _: () = assert!(core::mem::size_of::<PeerData>() <= 80);

/// The request's session.
#[repr(C)]
struct SessionData {
    /// Route-table key of the session id ([`crate::session::SessionKeyer::key`], never 0);
    /// 0 when the request carries no session.
    key: u64,
    /// Identity of the server that created the session; 0 if none is learned.
    learned: u64,
}

impl PeerData {
    /// The upstream's configuration (found from the request: not stored, see above).
    unsafe fn conf(&self) -> Option<&'static SrvConf> {
        // SAFETY: r is live and has an upstream using this balancer.
        unsafe { srv_conf((*(*self.r).upstream).upstream) }
    }

    /// Whether the request may leave its server ([`balancer::may_move`] of its session's state).
    #[inline]
    fn movable(&self) -> bool {
        balancer::may_move(self.ctx.session)
    }

    fn session(&self) -> Option<&SessionData> {
        (self.sess.key != 0).then_some(&self.sess)
    }
}

/// The route-table key of a session.
fn session_key_of(s: &SessionData) -> u128 {
    u128::from(s.key)
}

/// The request's stickiness key: the value of `kylin_hash`, else (also when that value is
/// empty, e.g. `$http_x_forwarded_for` of a request without the header) the client address.
#[inline(always)]
pub unsafe fn request_key(r: *mut ngx_http_request_t, kcf: &SrvConf) -> Option<u64> {
    // SAFETY: r is a live request.
    unsafe {
        if let Some(cv) = kcf.hash {
            let mut v = ngx_str_t::default();
            if !Status(ngx_http_complex_value(r, cv, &mut v)).is_ok() {
                return None;
            }
            if v.len != 0 {
                return Some(key_hash(v.as_bytes()));
            }
        }
        Some(client_address_key(r))
    }
}



/// The stickiness key of a request: its client address (after realip).
unsafe fn client_address_key(r: *mut ngx_http_request_t) -> u64 {
    // SAFETY: r and its connection are valid during the request; sockaddr matches its family.
    unsafe {
        let c = (*r).connection;
        let sa = (*c).sockaddr;
        let addr = match (*sa).sa_family as i32 {
            libc::AF_INET => {
                // The whole address, its bytes in network order: client_key's IPv4 key.
                let sin = sa as *const sockaddr_in;
                return key_hash(&(*sin).sin_addr.s_addr.to_ne_bytes());
            }
            libc::AF_INET6 => {
                let sin6 = sa as *const sockaddr_in6;
                IpAddr::V6(Ipv6Addr::from((*sin6).sin6_addr.__in6_u.__u6_addr8))
            }
            // Unix-domain clients have no address: they share one key.
            _ => return key_hash(b""),
        };
        let mut buf = [0u8; 8];
        key_hash(client_key(addr, &mut buf))
    }
}

/// `peer.init`: per request.
unsafe extern "C" fn init_peer(r: *mut ngx_http_request_t, us: *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t {
    // SAFETY: nginx passes a valid request with an upstream, and the upstream it uses.
    unsafe {
        let Some(kcf) = srv_conf(us) else { return Status::NGX_ERROR.into() };
        // The key is computed in `get`; evaluate kylin_hash now so that a failure fails here.
        if kcf.hash.is_some() && request_key(r, kcf).is_none() {
            return Status::NGX_ERROR.into();
        }

        // The session cookie (already found by the precontent phase when a store is used), and
        // the server that created the session.
        let pre = crate::variables::existing_ctx(r);
        let checked = pre.filter(|c| c.checked).map(|c| c.session);
        let found = match pre.and_then(crate::variables::checked_id) {
            Some(id) => RequestSession::Id(id),
            None => session::request_session(request_cookies(r), kcf.session_cookie()),
        };
        let (state, skey, learned) = match found {
            RequestSession::None => (SessionState::None, None, None),
            RequestSession::Id(id) => {
                let now = ngx_time();
                let timeout = kcf.routes_timeout();
                // With routes shared through Redis, a learned route is written there again
                // when it is due (see RouteTable::lookup_share): after a failed write, and
                // every SHARE_EVERY seconds of use, which also renews its expiry there.
                let sharing = store_io::shares_routes(kcf);
                let since = if sharing { store_io::store_recovered_at(kcf) } else { 0 };
                let share = sharing.then(|| Share { every: RouteTable::share_interval(timeout), since });
                let found = kcf.routes_zone.and_then(|z| {
                    let k = shm::session_key(z, &kcf.routes_keyer, session::KeyUse::Route, &kcf.name, id)?;
                    let hit = shm::lookup_route(z, &kcf.recent_routes, k, now, timeout, share)?;
                    Some((k, hit.map(|h| h.0), hit.is_some_and(|h| h.1)))
                });
                if let Some((_, Some(peer_id), true)) = found {
                    learning::share_again(kcf, id, peer_id);
                }
                let found = found.map(|(k, l, _)| (k, l));
                let all_shared = kcf.store_mode() == Some(&crate::store::StoreMode::AllShared);
                let state = balancer::session_state(all_shared, checked);
                (state, found.map(|f| f.0), found.and_then(|f| f.1))
            }
        };

        let pd = ngx_palloc((*r).pool, core::mem::size_of::<PeerData>()) as *mut PeerData;
        if pd.is_null() {
            return Status::NGX_ERROR.into();
        }
        pd.write(PeerData {
            // Filled in by round robin's init_peer below.
            rrp: core::mem::zeroed(),
            r,
            sess: SessionData { key: skey.unwrap_or(0), learned: learned.unwrap_or(0) },
            counted: None,
            measure: false,
            on_backup: false,
            trial: false,
            counted_total: false,
            ctx: crate::variables::RequestCtx::new(None, state, checked.is_some()),
        });
        crate::variables::set_ctx(r, ptr::addr_of_mut!((*pd).ctx));

        // Round robin fills in `rrp` (peers, tried bitmap, tries) when peer.data points at it.
        let u = (*r).upstream;
        (*u).peer.data = ptr::addr_of_mut!((*pd).rrp) as *mut c_void;
        if !Status(ngx_http_upstream_init_round_robin_peer(r, us)).is_ok() {
            return Status::NGX_ERROR.into();
        }
        (*u).peer.get = Some(get_peer);
        (*u).peer.free = Some(free_peer);
    }
    Status::NGX_OK.into()
}

/// nginx's cached time, Unix milliseconds (for the slow start's ramps, which the prober
/// stamps with wall-clock time).
fn cached_unix_ms() -> u64 {
    // SAFETY: nginx's cached time, updated by this process's event loop only.
    let t = unsafe { &*ngx::ffi::ngx_cached_time };
    (t.sec.max(0) as u64).saturating_mul(1000) + t.msec as u64
}

/// nginx's view of whether a peer may take this request: the same tests as its own
/// round-robin and hash balancers.
struct NginxServers<'a, 'g> {
    group: &'a Group,
    peers: Peers<'g>,
    tried: *mut usize,
    now: i64,
    /// A single server without backups is always tried (as round robin does).
    single: bool,
    gate: Gate,
}

impl NginxServers<'_, '_> {
    /// nginx's tests, with the `down` bits in `allowed` let through, and the module's own
    /// (health checks, run-time drain: a drained server takes only requests of sessions that
    /// live there, `own_session`).
    #[inline(always)]
    fn check(&mut self, i: usize, allowed: ngx_uint_t, own_session: bool) -> bool {
        let bits = usize::BITS as usize;
        // SAFETY: the tried bitmap covers every peer of the group (round robin sized it for
        // the larger list).
        if !self.tried.is_null() && unsafe { *self.tried.add(i / bits) } & (1 << (i % bits)) != 0 {
            return false;
        }
        let Some(p) = self.peers.get(i) else { return false };
        if p.down & !allowed != 0 {
            return false;
        }
        if p.max_conns != 0 && p.conns >= p.max_conns {
            return false;
        }
        if !self.single && failed(p, self.now) {
            return false;
        }
        self.gate.admits(self.group.health.get(i).copied().flatten(), own_session)
    }
}

impl Servers for NginxServers<'_, '_> {
    #[inline(always)]
    fn usable(&mut self, i: usize) -> bool {
        self.check(i, 0, false)
    }

    #[inline(always)]
    fn usable_for_session(&mut self, i: usize) -> bool {
        self.check(i, DRAINING, true)
    }

    #[inline]
    fn load(&self, i: usize) -> u64 {
        self.group.slots.get(i).copied().flatten().map_or(0, |s| s.inflight())
    }

    #[inline]
    fn weight(&self, i: usize) -> u64 {
        self.group.weights.get(i).map_or(1, |&w| u64::from(w))
    }
}

/// `peer.get`
///
/// The lock discipline is round robin's: the primary list is locked for the choice among the
/// primary servers; only if none is usable is it released and the backup list locked for the
/// choice among the backups. Anything that needs no peer happens outside the locks: the key
/// (`kylin_hash` may evaluate variables) before, moving a spilled session's route (the
/// routes zone's mutex, cookie parsing, posting a Redis write) after.
unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: data is the PeerData set up in init_peer; pc is the request's peer connection.
    unsafe {
        let pd = &mut *(data as *mut PeerData);
        (*pc).set_cached(0);
        (*pc).connection = ptr::null_mut();

        let Some(kcf) = pd.conf() else { return Status::NGX_ERROR.into() };
        let Some(key) = request_key(pd.r, kcf) else { return Status::NGX_ERROR.into() };
        let now = ngx_time();
        // `rrp.peers` is the primary list, or the backup list once a backup was chosen (then
        // this request stays on backups, as with round robin).
        let picked = if pd.on_backup {
            match kcf.tables.get().as_deref().and_then(|t| t.as_deref()) {
                // SAFETY: on backups, rrp.peers is the upstream's backup list (set in get_backup).
                Some(state) => get_backup(pd, pc, state, kcf.run.gate, Locked::backup(pd.rrp.peers), key, now),
                None => Err(Status::NGX_ERROR.into()),
            }
        } else {
            get_primary(pd, pc, kcf, key, now)
        };
        // No peer list is locked from here on.
        let choice = match picked {
            Ok(c) => c,
            Err(rc) => {
                // Both lists' `name` is the upstream's, valid for the cycle (in the zone with
                // one); rrp.peers changes only when a backup is taken.
                (*pc).name = (*pd.rrp.peers).name;
                return rc;
            }
        };
        pd.ctx.route = Some(choice.route);
        // (Spills happen among primary servers only.)
        if let Some(sd) = pd.session().filter(|_| balancer::moves_route(&choice, true)) {
            let tables = kcf.tables.get();
            let g = tables.as_deref().and_then(|t| t.as_deref()).map(|s| &s.primary);
            if let Some((id, name)) = g.and_then(|g| Some((*g.ids.get(choice.server)?, g.names.get(choice.server)?))) {
                learning::move_route(kcf, pd.r, session_key_of(sd), id, name);
            }
        }

        ngx_log_debug_mask!(DebugMask::Http, (*pc).log, "kylin peer: {} route: {}", *(*pc).name, choice.route.as_str());
    }
    Status::NGX_OK.into()
}

/// The choice among the primary servers, under the primary list's lock, then among the
/// backups (see [`get_backup`]) if no primary server is usable. `Err` is `get`'s return code.
#[inline(always)]
unsafe fn get_primary(pd: &mut PeerData, pc: *mut ngx_peer_connection_t, kcf: &SrvConf, key: u64, now: i64) -> Result<Choice, ngx_int_t> {
    let factor = kcf.run.balance_factor;
    let balance = kcf.run.balance;
    let placement = kcf.placement_zone;
    // Sessions are node-local (no shared session store): a moved client's open sessions stay
    // behind ([`crate::placement::Params::local_sessions`]).
    let local_sessions = kcf.run.node_local_sessions;
    let gate = kcf.run.gate.ramping(kcf.slow_start_ms, key, cached_unix_ms);
    // SAFETY: rrp.peers is the upstream's primary list while the request is not on backups.
    let guard = unsafe { Locked::primary(pd.rrp.peers) };
    // SAFETY: the guard is of the upstream's primary list.
    let (mut guard, state) = match unsafe { ensure_state(&kcf.tables, kcf.load_zone, &kcf.name, kcf.load_report.is_some(), guard) } {
        Ok(g) => g,
        Err(e) => {
            // SAFETY: the request and its log are live.
            unsafe {
                ngx_log_error!(NGX_LOG_ERR, (*pc).log, "kylin: upstream \"{}\": {}", String::from_utf8_lossy(&kcf.name), e);
            }
            return Err(Status::NGX_ERROR.into());
        }
    };
    if guard.changed_since(&pd.rrp) {
        return Err(Status::NGX_BUSY.into());
    }
    let single = guard.single();
    let Some(peers) = guard.peers(&state.primary_peers) else { return Err(Status::NGX_ERROR.into()) };
    if state.live_at.get() != now {
        state.live_weight.set(live_weight(&state.primary, &peers, now, gate));
        state.live_at.set(now);
    }
    // The server nginx's `sticky` names (its cookie, route or learned session), else the
    // session's learned server.
    // SAFETY: pc is the request's peer connection; the primary list is locked.
    let hinted = unsafe { sticky_hint(pd, pc) };
    let bound = Bound {
        factor_milli: factor,
        // (Read only where the bound is on: clients mode has none.)
        total: if factor > 0 { state.total.map_or(0, |t| t.inflight()) } else { 0 },
        live_weight: state.live_weight.get(),
    };
    let mut ps = NginxServers { group: &state.primary, peers, tried: pd.rrp.tried, now, single, gate };
    let mut req = Request {
        key,
        // (A learned server implies a session: `learned` is 0 without one.)
        learned: match hinted {
            Some(h) => Some(h),
            None if pd.sess.learned != 0 => state.index_of(pd.sess.learned),
            None => None,
        },
        movable: pd.movable(),
        balance,
        moved: None,
        sticky: hinted.is_some(),
    };
    // Client placement: where the request's client lives, asked on its first try only (a
    // retry walks the key's order, as with every balance).
    if let Some(z) = placement {
        // SAFETY: the zone is valid for the cycle; the primary list is locked (placement's lock
        // is only ever taken after it, never before).
        unsafe {
            let now_ms = ngx::ffi::ngx_current_msec as u64;
            let report = kcf.load_report.as_ref();
            let busy = sample_placement(z, &state.primary, report, now_ms);
            // While placement is busy, the try's response time is measured at `free`.
            pd.measure = busy;
            if busy && req.follows_client() && pd.ctx.route.is_none() {
                req.moved = place_client(z, &state.primary, &mut ps, report, key, local_sessions, now_ms);
            }
        }
    }
    // (One call site: choose_primary's common case is inlined here.)
    let choice = loop {
        let choice = balancer::choose_primary(&req, Pick { ring: &state.primary.ring, servers: &mut ps, bound });
        if choice.is_none() && ps.gate.slow_start_ms > 0 {
            // Every usable server is ramping up and none admits this key: the slow start never
            // turns a request away, so choose as if there were none.
            ps.gate = ps.gate.without_slow_start();
            continue;
        }
        break choice;
    };
    if let Some(choice) = choice {
        // SAFETY: pc is the request's peer connection.
        kcf.total.set(state.total);
        return match unsafe { take(pd, pc, &mut ps.peers, &state.primary, state.total, &choice, now) } {
            true => Ok(choice),
            false => Err(Status::NGX_ERROR.into()),
        };
    }
    // No primary server is usable: as round robin, release the primary list, then lock the
    // backup list.
    match guard.into_backup() {
        Some(b) => get_backup(pd, pc, &state, gate, b, key, now),
        None => Err(Status::NGX_BUSY.into()),
    }
}

/// Whether client placement has something to do (some server busy, some client moved), as
/// of the latest sample of the servers' in-flight counts; takes that sample when one is due
/// (every `shm::PLACEMENT_SAMPLE_MS`, by whichever worker's request comes first, without
/// waiting for the lock). Old workers of a reload (`ngx_exiting`) leave placement alone.
///
/// # Safety
/// `zone` is the upstream's placement zone.
#[inline]
unsafe fn sample_placement(zone: *mut ngx::ffi::ngx_shm_zone_t, g: &Group, report: Option<&crate::load_report::ReportConf>, now_ms: u64) -> bool {
    // SAFETY: the zone is valid for the cycle (the caller's contract); ngx_exiting is this
    // process's flag, written by its own event loop only.
    unsafe {
        if ngx::ffi::ngx_exiting != 0 || g.ring.peers() > shm::PLACEMENT_SERVERS {
            return false;
        }
        let Some((busy, due)) = shm::placement_state(zone, now_ms) else { return false };
        if !due {
            return busy;
        }
        take_placement_sample(zone, g, report, now_ms).unwrap_or(busy)
    }
}

/// [`sample_placement`]'s sample, when one is due: `None` if another process holds the lock.
///
/// # Safety
/// As for [`sample_placement`].
#[cold]
#[inline(never)]
unsafe fn take_placement_sample(zone: *mut ngx::ffi::ngx_shm_zone_t, g: &Group, report: Option<&crate::load_report::ReportConf>, now_ms: u64) -> Option<bool> {
    // SAFETY: the caller's contract.
    unsafe {
        shm::with_placement(zone, g.layout, false, |p, at, flag| {
            let n = g.slots.len();
            let inflight = |i: usize| g.slots.get(i).map(|s| s.map_or(0, |s| s.inflight()));
            let busy = match report {
                Some(conf) => {
                    let unix = crate::health::unix_ms();
                    p.sample_busy(n, inflight, |i| g.weight(i), |i| reported_saturated(g, conf, i, unix), now_ms)
                }
                None => p.sample_busy(n, inflight, |i| g.weight(i), |_| false, now_ms),
            };
            at.store(now_ms, core::sync::atomic::Ordering::Relaxed);
            flag.store(u64::from(busy), core::sync::atomic::Ordering::Relaxed);
            busy
        })
    }
}

/// Where the client `key` lives if placement moved it off its home (`None`: at home).
///
/// # Safety
/// `zone` is the upstream's placement zone; `ps` holds the primary list's lock.
#[cold]
#[inline(never)]
unsafe fn place_client(
    zone: *mut ngx::ffi::ngx_shm_zone_t,
    g: &Group,
    ps: &mut NginxServers<'_, '_>,
    report: Option<&crate::load_report::ReportConf>,
    key: u64,
    local_sessions: bool,
    now_ms: u64,
) -> Option<usize> {
    let unix = if report.is_some() { crate::health::unix_ms() } else { 0 };
    // SAFETY: the caller's contract.
    unsafe {
        shm::with_placement(zone, g.layout, true, |p, _, _| {
            p.set_local_sessions(local_sessions);
            let (server, how) = match report {
                Some(conf) => p.place_reported(key, g.ring.order(key), |i| ps.usable(i), |i| g.weight(i), |i| reported_saturated(g, conf, i, unix), now_ms)?,
                None => p.place(key, g.ring.order(key), |i| ps.usable(i), |i| g.weight(i), now_ms)?,
            };
            matches!(how, Placed::Moved | Placed::MovedNow).then_some(server)
        })
        .flatten()
    }
}

/// Whether primary server `i` reports saturation now (`kylin_load_report`: a fresh report
/// whose `busy=` condition holds; missing and stale reports say no).
fn reported_saturated(g: &Group, conf: &crate::load_report::ReportConf, i: usize, unix_ms: u64) -> bool {
    let Some(slot) = g.reports.get(i).copied().flatten() else { return false };
    let cells = slot.cells();
    use crate::load_report::{cell, verdict, MAX_CONDITIONS};
    verdict(conf, cells[cell::AT_MS], &cells[cell::VALUE..cell::VALUE + MAX_CONDITIONS], unix_ms).saturated()
}

/// The index in the request's peer list of the server that nginx's `sticky` (1.29.6+) names
/// for this request, if that server may take it (nginx's own test: not tried, not down but
/// for draining, not failed, not at max_conns); `None` without a hint.
///
/// # Safety
/// pc is the request's peer connection; the caller holds the lock of `pd.rrp.peers`.
#[cfg(ngx_upstream_sid)]
#[inline]
unsafe fn sticky_hint(pd: &mut PeerData, pc: *mut ngx_peer_connection_t) -> Option<usize> {
    // SAFETY: pc is live; hint is NULL or a string sticky's init_peer/get set for this try.
    let hint = unsafe { (*pc).hint };
    if hint.is_null() {
        return None;
    }
    let mut i: ngx_uint_t = 0;
    // SAFETY: rrp is this request's round-robin data, its list locked by the caller (lock 0:
    // nginx must not lock the peer again).
    let peer = unsafe { ngx::ffi::ngx_http_upstream_get_rr_peer_by_sid(&mut pd.rrp, hint, &mut i, 0) };
    (!peer.is_null()).then_some(i)
}

#[cfg(not(ngx_upstream_sid))]
#[inline]
unsafe fn sticky_hint(_pd: &mut PeerData, _pc: *mut ngx_peer_connection_t) -> Option<usize> {
    None
}

/// The choice among the backup servers, under the backup list's lock: for a request no
/// primary server can take (it then moves to the backup list, as with round robin), or one
/// already on it.
#[inline(never)]
unsafe fn get_backup(pd: &mut PeerData, pc: *mut ngx_peer_connection_t, state: &UpstreamState, gate: Gate, mut guard: Locked<Backup>, key: u64, now: i64) -> Result<Choice, ngx_int_t> {
    if guard.changed_since(&pd.rrp) {
        return Err(Status::NGX_BUSY.into());
    }
    let (Some(group), Some(refs)) = (state.backup.as_ref(), state.backup_peers.as_ref()) else {
        return Err(Status::NGX_BUSY.into());
    };
    let moving = !pd.on_backup;
    let number = guard.number();
    let list = guard.list();
    // Current when the generation did not change since the request's start (checked above):
    // the tables were built at that generation.
    let Some(peers) = guard.peers(refs) else { return Err(Status::NGX_BUSY.into()) };
    // Backups start with a clean tried bitmap when the request moves to them.
    let tried = if moving { ptr::null_mut() } else { pd.rrp.tried };
    // No slow start among backups.
    let mut bs = NginxServers { group, peers, tried, now, single: false, gate: gate.without_slow_start() };
    let req = balancer::on_backup(key, pd.movable());
    let Some(choice) = balancer::choose_backup(&req, Pick { ring: &group.ring, servers: &mut bs, bound: Bound::OFF }) else {
        return Err(Status::NGX_BUSY.into());
    };
    if moving {
        // Move this request to the backup list, as round robin does.
        let words = number.div_ceil(usize::BITS as usize);
        for w in 0..words {
            // SAFETY: round robin sized the bitmap for the larger of the two lists.
            unsafe { *pd.rrp.tried.add(w) = 0 };
        }
        pd.rrp.peers = list;
        pd.on_backup = true;
    }
    // SAFETY: pc is the request's peer connection.
    match unsafe { take(pd, pc, &mut bs.peers, group, None, &choice, now) } {
        true => Ok(choice),
        false => Err(Status::NGX_ERROR.into()),
    }
}

/// Round robin's bookkeeping for the chosen peer, under its list's lock, and the try counted
/// in flight until `free`. `false` if `choice` names no peer of the list.
#[inline(always)]
unsafe fn take(
    pd: &mut PeerData,
    pc: *mut ngx_peer_connection_t,
    peers: &mut Peers<'_>,
    group: &Group,
    total: Option<&'static Slot>,
    choice: &Choice,
    now: i64,
) -> bool {
    let Some(best) = peers.get_mut(choice.server) else { return false };
    // The pointers given to nginx outlive the lock, as round robin's do: the reference taken
    // here (`refs`, 1.27.3+) keeps a peer that `resolve` removes alive until `free`, and
    // before 1.27.3 peers are never freed during a cycle.
    #[cfg(nginx1_27_3)]
    {
        best.refs += 1;
    }
    // SAFETY: pc is the request's peer connection.
    unsafe {
        (*pc).sockaddr = best.sockaddr;
        (*pc).socklen = best.socklen;
        (*pc).name = ptr::addr_of_mut!(best.name);
        // nginx's `sticky` learns (or sets its cookie for) the server chosen.
        #[cfg(ngx_upstream_sid)]
        {
            (*pc).sid = ptr::addr_of_mut!(best.sid);
        }
    }
    best.conns += 1;
    // Back from nginx's failed state (fail_timeout over): what this try says matters to the
    // slow start. Backups do not ramp.
    pd.trial = total.is_some() && best.max_fails != 0 && best.fails >= best.max_fails;
    if now - best.checked > best.fail_timeout {
        best.checked = now;
    }
    pd.rrp.current = best;
    let bits = usize::BITS as usize;
    // SAFETY: the bitmap covers every peer of the list (see `usable`).
    unsafe { *pd.rrp.tried.add(choice.server / bits) |= 1 << (choice.server % bits) };

    // Count the try in flight until `free`.
    pd.counted = group.slots.get(choice.server).copied().flatten();
    pd.counted_total = total.is_some();
    if let Some(s) = pd.counted {
        s.start();
        s.count(match choice.route {
            Route::Sticky => Counter::Sticky,
            Route::Learned => Counter::Learned,
            Route::Spilled => Counter::SpilledIn,
            Route::Failover => Counter::Failover,
            Route::Backup => Counter::Backup,
            Route::Moved => Counter::Moved,
        });
    }
    if let Some(t) = total {
        t.start();
    }
    if let Some(home) = choice.from.and_then(|i| group.slots.get(i).copied().flatten()) {
        home.count(Counter::SpilledOut);
    }
    true
}

/// `peer.free`: uncount the try, learn a new session, then round robin's bookkeeping.
unsafe extern "C" fn free_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void, state: ngx_uint_t) {
    // SAFETY: data is our PeerData; rrp is its first field.
    unsafe {
        let pd = &mut *(data as *mut PeerData);
        let kcf = pd.conf();
        if let Some(s) = pd.counted.take() {
            s.finish();
            if state & NGX_PEER_FAILED as ngx_uint_t != 0 {
                s.count(Counter::Failures);
            }
        }
        if core::mem::take(&mut pd.counted_total) {
            if let Some(t) = kcf.and_then(|c| c.total.get()) {
                t.finish();
            }
        }
        if core::mem::take(&mut pd.trial) && state & NGX_PEER_FAILED as ngx_uint_t == 0 && !pd.rrp.current.is_null() {
            if let Some(kcf) = kcf {
                learning::came_back(kcf, (*pd.rrp.current).name.as_bytes());
            }
        }
        if !pd.rrp.current.is_null() && state & (NGX_PEER_FAILED as ngx_uint_t | NGX_PEER_NEXT) == 0 {
            let server = (*pd.rrp.current).name.as_bytes();
            let login = kcf.and_then(|kcf| learning::learn_session(kcf, pd.r, server, pd.session().map(session_key_of)));
            if !pd.on_backup && (core::mem::take(&mut pd.measure) || login.is_some()) {
                if let Some(kcf) = kcf {
                    learning::placement_learns(kcf, pd.r, || request_key(pd.r, kcf), pd.rrp.current, pd.sess.key, login);
                }
            }
        }
        ngx_http_upstream_free_round_robin_peer(pc, ptr::addr_of_mut!(pd.rrp) as *mut c_void, state);
    }
}
