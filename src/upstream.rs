//! Peer callbacks: the nginx side of the balancer.
//!
//! nginx's round-robin module keeps the peer list and all per-peer bookkeeping (`conns`,
//! `fails`, `checked`, the request's `tried` bitmap, the shared `zone` copy); we reuse it
//! unchanged and replace only the choice:
//! - `init_upstream` builds the consistent-hash rings and declares the shared zones;
//! - `init_peer` computes the request's key and reads its session cookie and learned route;
//! - `get` gathers loads and asks [`crate::balancer::choose`], then does the same bookkeeping
//!   as nginx's own `hash ... consistent` balancer and counts the request in flight;
//! - `free` uncounts it, learns the session a response created, and calls round robin's free.

use core::ffi::c_void;
use core::ptr;
use std::net::{IpAddr, Ipv6Addr};

#[cfg(not(nginx1_23_0))]
use ngx::ffi::ngx_list_t;
use ngx::ffi::{
    ngx_conf_t, ngx_http_complex_value, ngx_http_request_t, ngx_http_upstream_free_round_robin_peer,
    ngx_http_upstream_init_round_robin, ngx_http_upstream_init_round_robin_peer,
    ngx_http_upstream_rr_peer_data_t, ngx_http_upstream_rr_peer_t, ngx_http_upstream_rr_peers_t,
    ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_palloc, ngx_peer_connection_t,
    ngx_rwlock_unlock, ngx_rwlock_wlock, ngx_str_t, ngx_time, ngx_uint_t, sockaddr_in, sockaddr_in6,
    NGX_BUSY, NGX_ERROR, NGX_LOG_EMERG, NGX_LOG_ERR, NGX_LOG_WARN, NGX_OK, NGX_PEER_FAILED,
};
// Used by ngx_log_debug_mask!, which expands to nothing unless nginx is built --with-debug.
#[allow(unused_imports)]
use ngx::log::DebugMask;
use ngx::{ngx_conf_log_error, ngx_log_debug_mask, ngx_log_error};

use crate::balancer::{self, Bound, Choice, Group as Pick, Request, Route, Servers, SessionState};
use crate::conf::{srv_conf, SrvConf};
use ngx::http::HttpModule;
use crate::key::client_key;
use crate::load::{self, Counter, Slot, Use};
use crate::ring::{key_hash, Ring};
use crate::session::{self, RequestSession, SetSession};
use crate::shm;

/// nginx's NGX_PEER_NEXT (403/404 passed to the next server): not a failure, not a response
/// to learn from.
const NGX_PEER_NEXT: ngx_uint_t = 2;

/// One group of servers (primary or backup) as the balancer sees it.
#[derive(Debug)]
pub struct Group {
    ring: Ring,
    /// Ring index -> nginx peer, in list order.
    peers: Vec<*mut ngx_http_upstream_rr_peer_t>,
    /// Ring index -> hash of the server's address: its identity in the route table.
    ids: Vec<u64>,
    /// Ring index -> the server's shared counters (resolved in each worker).
    slots: Vec<Option<&'static Slot>>,
}

/// The per-process view of one upstream's servers.
#[derive(Debug)]
pub struct UpstreamState {
    /// The peer list the tables were built from (the zone copy differs from the config one).
    source: *mut ngx_http_upstream_rr_peers_t,
    /// `*peers->config` when built (changes when `resolve` updates a zone's peers).
    config: ngx_uint_t,
    primary: Group,
    backup: Option<Group>,
    /// (server identity, primary ring index), sorted, for learned routes.
    by_id: Vec<(u64, usize)>,
    /// The upstream's in-flight total.
    total: Option<&'static Slot>,
    slots_ready: bool,
    /// Sum of the weights of live primary servers, refreshed once a second.
    live_weight: u64,
    live_at: i64,
}

impl UpstreamState {
    /// The primary ring index of the server with this identity.
    fn index_of(&self, id: u64) -> Option<usize> {
        self.by_id.binary_search_by_key(&id, |&(k, _)| k).ok().map(|j| self.by_id[j].1)
    }
}

/// The zone's peer-list generation (bumped when `resolve` changes the servers); 0 without.
#[cfg(nginx1_27_3)]
unsafe fn peers_config(peers: *mut ngx_http_upstream_rr_peers_t) -> ngx_uint_t {
    // SAFETY: peers is valid; config is NULL or points into the same zone.
    unsafe { (*peers).config.as_ref().copied().unwrap_or(0) }
}

#[cfg(not(nginx1_27_3))]
unsafe fn peers_config(_peers: *mut ngx_http_upstream_rr_peers_t) -> ngx_uint_t {
    0
}

/// Whether the zone's peers changed since this request's round-robin data was set up
/// (round robin answers NGX_BUSY then, and so do we).
#[cfg(nginx1_27_3)]
unsafe fn config_changed(rrp: &ngx_http_upstream_rr_peer_data_t, peers: *mut ngx_http_upstream_rr_peers_t) -> bool {
    // SAFETY: peers is valid; config is NULL or points into the same zone.
    unsafe { (*peers).config.as_ref().is_some_and(|&c| c != rrp.config) }
}

#[cfg(not(nginx1_27_3))]
unsafe fn config_changed(_rrp: &ngx_http_upstream_rr_peer_data_t, _peers: *mut ngx_http_upstream_rr_peers_t) -> bool {
    false
}

/// Builds a group from an nginx peer list. The caller holds the list's lock if it is shared.
unsafe fn build_group(peers: *mut ngx_http_upstream_rr_peers_t) -> Result<Group, String> {
    let mut list = Vec::new();
    let mut names: Vec<(&[u8], u32)> = Vec::new();
    // SAFETY: peers is a valid list; its peers live as long as the list.
    unsafe {
        let mut p = (*peers).peer;
        while !p.is_null() {
            list.push(p);
            names.push(((*p).name.as_bytes(), (*p).weight.clamp(1, u32::MAX as ngx_int_t) as u32));
            p = (*p).next;
        }
    }
    let ids = names.iter().map(|(n, _)| key_hash(n)).collect();
    let ring = Ring::new(names).map_err(|e| e.to_string())?;
    let slots = vec![None; list.len()];
    Ok(Group { ring, peers: list, ids, slots })
}

/// Builds the state for `peers` (primary list, with backups in `peers->next`).
unsafe fn build_state(peers: *mut ngx_http_upstream_rr_peers_t) -> Result<UpstreamState, String> {
    // SAFETY: peers is a valid round-robin peer list.
    unsafe {
        let primary = build_group(peers)?;
        let next = (*peers).next;
        let backup = if next.is_null() { None } else { Some(build_group(next)?) };
        let mut by_id: Vec<(u64, usize)> = primary.ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        by_id.sort_unstable();
        Ok(UpstreamState {
            source: peers,
            config: peers_config(peers),
            primary,
            backup,
            by_id,
            total: None,
            slots_ready: false,
            live_weight: 0,
            live_at: i64::MIN,
        })
    }
}

/// Number of servers (primary and backup) of a peer list.
unsafe fn server_count(peers: *mut ngx_http_upstream_rr_peers_t) -> usize {
    // SAFETY: peers is a valid list.
    unsafe { (*peers).number + (*peers).next.as_ref().map_or(0, |b| b.number) }
}

/// Addresses of the servers (primary and backup) of a peer list.
unsafe fn server_names<'a>(peers: *mut ngx_http_upstream_rr_peers_t) -> impl Iterator<Item = &'a [u8]> {
    // SAFETY: peers is a valid list (its backups in `next`), whose peers live as long as it.
    let lists = unsafe { [peers.as_ref(), peers.as_ref().and_then(|p| p.next.as_ref())] };
    lists.into_iter().flatten().flat_map(|l| {
        // SAFETY: as above.
        core::iter::successors(unsafe { l.peer.as_ref() }, |p| unsafe { p.next.as_ref() }).map(|p| p.name.as_bytes())
    })
}

/// `peer.init_upstream`: round robin's setup, then our rings and shared zones.
pub unsafe extern "C" fn init_upstream(cf: *mut ngx_conf_t, us: *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t {
    // SAFETY: nginx passes valid cf and us.
    unsafe {
        if ngx_http_upstream_init_round_robin(cf, us) != NGX_OK as ngx_int_t {
            return NGX_ERROR as ngx_int_t;
        }
        (*us).peer.init = Some(init_peer);

        let Some(kcf) = srv_conf(us) else {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "kylin balancer used outside an upstream block");
            return NGX_ERROR as ngx_int_t;
        };
        kcf.init_upstream_ran = true;
        kcf.name = (*us).host.as_bytes().to_vec();
        // The http-level kylin_session_store applies to upstreams without their own.
        let ctx = (*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t;
        if let Some(http) = (*(*ctx).srv_conf.add(crate::conf::Module::module().ctx_index) as *const SrvConf).as_ref() {
            if !ptr::eq(http, kcf) {
                kcf.inherit_store(http);
            }
        }

        let peers = (*us).peer.data as *mut ngx_http_upstream_rr_peers_t;
        match shm::load_zone(cf, server_count(peers) + 2) {
            Some(z) => kcf.load_zone = z,
            None => return NGX_ERROR as ngx_int_t,
        }
        // The slots this configuration uses, claimed and stamped when the zone is set up.
        shm::note_load_keys(
            server_names(peers)
                .map(|n| (load::server_key(&kcf.name, n), Use::Counts))
                .chain([(load::upstream_key(&kcf.name), Use::Counts)])
                .chain(crate::session_check::store_slot_keys(kcf)),
        );
        if kcf.routes_zone.is_none() {
            let mut name = ngx_str_t { len: shm::DEFAULT_ROUTES_ZONE.len(), data: shm::DEFAULT_ROUTES_ZONE.as_ptr() as *mut u8 };
            match shm::routes_zone(cf, &mut name, shm::DEFAULT_ROUTES_SIZE) {
                Some(z) => kcf.routes_zone = Some(z),
                None => return NGX_ERROR as ngx_int_t,
            }
        }

        // With a zone, peers are copied to shared memory after this point: each worker builds
        // its tables from that copy on first use. Building them now as well shows a
        // configuration error in `nginx -t`, and workers without a zone inherit them.
        match build_state(peers) {
            Ok(state) => kcf.state = Some(Box::new(state)),
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
                return NGX_ERROR as ngx_int_t;
            }
        }
    }
    NGX_OK as ngx_int_t
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
    movable: bool,
    /// This request moved to the backup servers.
    on_backup: bool,
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
    unsafe fn conf(&self) -> Option<&'static mut SrvConf> {
        // SAFETY: r is live and has an upstream using this balancer.
        unsafe { srv_conf((*(*self.r).upstream).upstream) }
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
unsafe fn request_key(r: *mut ngx_http_request_t, kcf: &SrvConf) -> Option<u64> {
    // SAFETY: r is a live request.
    unsafe {
        if let Some(cv) = kcf.hash {
            let mut v = ngx_str_t::default();
            if ngx_http_complex_value(r, cv, &mut v) != NGX_OK as ngx_int_t {
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

/// How often (seconds of use) a learned route is written to the session store again.
const SHARE_EVERY: i64 = 300;

/// Writes a learned route to the session store again (see `SHARE_EVERY`).
unsafe fn share_again(kcf: &SrvConf, session_id: &[u8], peer_id: u64) {
    let Some(state) = kcf.state.as_deref() else { return };
    let Some(i) = state.index_of(peer_id) else { return };
    // SAFETY: config-time and zone peers both stay valid for the cycle; only the name is read.
    let name = unsafe { (*state.primary.peers[i]).name.as_bytes() };
    // SAFETY: called from the event loop.
    unsafe { crate::session_check::share_route(kcf, session_id, name) };
}

/// Values of a chain of headers of one name (nginx 1.23+ links same-name headers).
#[cfg(nginx1_23_0)]
unsafe fn chain<'a>(first: *mut ngx::ffi::ngx_table_elt_t) -> impl Iterator<Item = &'a [u8]> + 'a {
    // SAFETY: `first` is NULL or a header element of a live request, valid for 'a.
    let head = unsafe { first.as_ref() };
    core::iter::successors(head, |h| {
        // SAFETY: nginx links same-name headers through `next`: NULL or another element of
        // the same request.
        unsafe { h.next.as_ref() }
    })
    .map(|h| h.value.as_bytes())
}

/// Values of the request's `Cookie` headers.
pub unsafe fn request_cookies<'a>(r: *mut ngx_http_request_t) -> impl Iterator<Item = &'a [u8]> + 'a {
    #[cfg(nginx1_23_0)]
    // SAFETY: r is a live request; `cookie` is NULL or the first Cookie header.
    return unsafe { chain((*r).headers_in.cookie) };
    #[cfg(not(nginx1_23_0))]
    // SAFETY: r is a live request; its header list lives as long as it.
    return unsafe { header_values(&(*r).headers_in.headers, "Cookie") };
}

/// Values of the upstream response's `Set-Cookie` headers.
unsafe fn response_set_cookies<'a>(u: *mut ngx::ffi::ngx_http_upstream_t) -> impl Iterator<Item = &'a [u8]> + 'a {
    #[cfg(nginx1_23_0)]
    // SAFETY: u is the live request's upstream; `set_cookie` is NULL or the first Set-Cookie.
    return unsafe { chain((*u).headers_in.set_cookie) };
    #[cfg(not(nginx1_23_0))]
    // SAFETY: u is the live request's upstream; its header list lives as long as it.
    return unsafe { header_values(&(*u).headers_in.headers, "Set-Cookie") };
}

/// Values of the headers called `name` in an nginx header list (nginx before 1.23).
#[cfg(not(nginx1_23_0))]
pub unsafe fn header_values<'a>(list: &'a ngx_list_t, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    // SAFETY: the list belongs to a live request.
    unsafe { ngx::http::list_iterator(list) }
        .filter(move |(k, _)| k.as_bytes().eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v.as_bytes())
}

/// `peer.init`: per request.
unsafe extern "C" fn init_peer(r: *mut ngx_http_request_t, us: *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t {
    // SAFETY: nginx passes a valid request with an upstream, and the upstream it uses.
    unsafe {
        let Some(kcf) = srv_conf(us) else { return NGX_ERROR as ngx_int_t };
        // The key is computed in `get`; evaluate kylin_hash now so that a failure fails here.
        if kcf.hash.is_some() && request_key(r, kcf).is_none() {
            return NGX_ERROR as ngx_int_t;
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
                let sharing = crate::session_check::shares_routes(kcf);
                let since = if sharing { crate::session_check::store_recovered_at(kcf) } else { 0 };
                let found = kcf.routes_zone.and_then(|z| {
                    let k = shm::session_key(z, &kcf.routes_keyer, session::KeyUse::Route, &kcf.name, id)?;
                    let tk = u128::from(k);
                    shm::with_routes(z, |t| {
                        if sharing {
                            let hit = t.lookup_share(tk, now, timeout, SHARE_EVERY.min(timeout / 2).max(1), since);
                            (k, hit.map(|h| h.0), hit.is_some_and(|h| h.1))
                        } else {
                            (k, t.lookup(tk, now, timeout), false)
                        }
                    })
                });
                if let Some((_, Some(peer_id), true)) = found {
                    share_again(kcf, id, peer_id);
                }
                let found = found.map(|(k, l, _)| (k, l));
                let state = match (kcf.store_mode(), checked) {
                    (Some(crate::store::StoreMode::AllShared), _) => SessionState::Shared,
                    (_, Some(s)) => s,
                    _ => SessionState::Unknown,
                };
                (state, found.map(|f| f.0), found.and_then(|f| f.1))
            }
        };

        let pd = ngx_palloc((*r).pool, core::mem::size_of::<PeerData>()) as *mut PeerData;
        if pd.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        pd.write(PeerData {
            // Filled in by round robin's init_peer below.
            rrp: core::mem::zeroed(),
            r,
            sess: SessionData { key: skey.unwrap_or(0), learned: learned.unwrap_or(0) },
            counted: None,
            movable: balancer::may_move(state),
            on_backup: false,
            counted_total: false,
            ctx: crate::variables::RequestCtx::new(None, state, checked.is_some()),
        });
        crate::variables::set_ctx(r, ptr::addr_of_mut!((*pd).ctx));

        // Round robin fills in `rrp` (peers, tried bitmap, tries) when peer.data points at it.
        let u = (*r).upstream;
        (*u).peer.data = ptr::addr_of_mut!((*pd).rrp) as *mut c_void;
        if ngx_http_upstream_init_round_robin_peer(r, us) != NGX_OK as ngx_int_t {
            return NGX_ERROR as ngx_int_t;
        }
        (*u).peer.get = Some(get_peer);
        (*u).peer.free = Some(free_peer);
    }
    NGX_OK as ngx_int_t
}

/// Whether nginx considers a peer failed right now (`max_fails` within `fail_timeout`).
#[inline]
fn failed(p: &ngx_http_upstream_rr_peer_t, now: i64) -> bool {
    p.max_fails != 0 && p.fails >= p.max_fails && now - p.checked as i64 <= p.fail_timeout as i64
}

/// nginx's view of whether a peer may take this request: the same tests as its own
/// round-robin and hash balancers.
struct NginxServers<'a> {
    group: &'a Group,
    tried: *mut usize,
    now: i64,
    /// A single server without backups is always tried (as round robin does).
    single: bool,
}

impl Servers for NginxServers<'_> {
    #[inline]
    fn usable(&mut self, i: usize) -> bool {
        let bits = usize::BITS as usize;
        // SAFETY: the tried bitmap covers every peer of the group; the peer pointers are valid
        // while the caller holds the peers lock.
        unsafe {
            if !self.tried.is_null() && *self.tried.add(i / bits) & (1 << (i % bits)) != 0 {
                return false;
            }
            let p = &*self.group.peers[i];
            if p.down != 0 {
                return false;
            }
            if p.max_conns != 0 && p.conns >= p.max_conns {
                return false;
            }
            if !self.single && failed(p, self.now) {
                return false;
            }
        }
        true
    }

    #[inline]
    fn load(&self, i: usize) -> u64 {
        self.group.slots[i].map_or(0, |s| s.inflight())
    }

    #[inline]
    fn weight(&self, i: usize) -> u64 {
        // SAFETY: as in `usable`.
        unsafe { (*self.group.peers[i]).weight.max(1) as u64 }
    }
}

struct PeersLock(*mut ngx_http_upstream_rr_peers_t);

impl PeersLock {
    /// Takes the write lock of a zone-shared peer list (no-op without a zone), as round robin
    /// does in `get`.
    unsafe fn wlock(peers: *mut ngx_http_upstream_rr_peers_t) -> PeersLock {
        // SAFETY: peers is valid; rwlock lives in the same (shared) memory.
        unsafe {
            if !(*peers).shpool.is_null() {
                ngx_rwlock_wlock(ptr::addr_of_mut!((*peers).rwlock));
            }
        }
        PeersLock(peers)
    }
}

impl Drop for PeersLock {
    fn drop(&mut self) {
        // SAFETY: we took this lock in `wlock`.
        unsafe {
            if !(*self.0).shpool.is_null() {
                ngx_rwlock_unlock(ptr::addr_of_mut!((*self.0).rwlock));
            }
        }
    }
}

/// Makes sure the per-process tables describe `peers` (built lazily with a zone, rebuilt when
/// `resolve` changed the zone's peers) and point at the shared counters. Called with the
/// peers lock held.
unsafe fn ensure_state(kcf: &mut SrvConf, peers: *mut ngx_http_upstream_rr_peers_t) -> Result<&mut UpstreamState, String> {
    // SAFETY: peers is the valid primary list; its peers (and their names) stay valid while
    // the caller holds its lock; the zones are valid for the cycle; in a worker, ngx_cycle is
    // the running cycle and its log is valid.
    unsafe {
        let config = peers_config(peers);
        let fresh = matches!(&kcf.state, Some(s) if s.source == peers && s.config == config);
        if !fresh {
            kcf.state = Some(Box::new(build_state(peers)?));
        }
        let Some(state) = kcf.state.as_deref_mut() else { return Err("no state".into()) };
        if !state.slots_ready {
            // Claims are serialised with the zone's mutex; this runs once per table build.
            let name = &kcf.name;
            let claimed = shm::with_load_claims(kcf.load_zone, |table| {
                let generation = table.committed();
                state.total = table.claim(load::upstream_key(name), Use::Counts, generation);
                let mut missing = usize::from(state.total.is_none());
                let groups = core::iter::once(&mut state.primary).chain(state.backup.as_mut());
                for g in groups {
                    for (i, &p) in g.peers.iter().enumerate() {
                        g.slots[i] = table.claim(load::server_key(name, (*p).name.as_bytes()), Use::Counts, generation);
                        missing += usize::from(g.slots[i].is_none());
                    }
                }
                (missing, table.capacity())
            });
            if let Some((missing, capacity)) = claimed {
                state.slots_ready = true;
                if missing > 0 {
                    ngx_log_error!(
                        NGX_LOG_ERR,
                        (*ngx::ffi::ngx_cycle).log,
                        "kylin: upstream \"{}\": zone \"{}\" is full ({} slots): {} of its load counters have none, so the load of those servers is not counted and the bound does not apply to them; {}",
                        String::from_utf8_lossy(name),
                        shm::LOAD_ZONE,
                        capacity,
                        missing,
                        shm::FULL_FIX
                    );
                }
            }
        }
        Ok(state)
    }
}

/// Refreshes the live weight (sum of weights of primary servers not down or failed) once per
/// second: the denominator of the load bound.
fn refresh_live_weight(state: &mut UpstreamState, now: i64) {
    if state.live_at == now {
        return;
    }
    state.live_weight = state
        .primary
        .peers
        .iter()
        // SAFETY: the peer pointers are valid while the caller holds the peers lock.
        .map(|&p| unsafe { &*p })
        .filter(|p| p.down == 0 && !failed(p, now))
        .map(|p| p.weight.max(1) as u64)
        .sum();
    state.live_at = now;
}

/// `peer.get`
unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: data is the PeerData set up in init_peer; pc is the request's peer connection.
    unsafe {
        let pd = &mut *(data as *mut PeerData);
        (*pc).set_cached(0);
        (*pc).connection = ptr::null_mut();

        // `rrp.peers` is the primary list, or the backup list once a backup was chosen (then
        // this request stays on backups, as with round robin).
        let peers = pd.rrp.peers;
        let _lock = PeersLock::wlock(peers);

        if config_changed(&pd.rrp, peers) {
            (*pc).name = (*peers).name;
            return NGX_BUSY as ngx_int_t;
        }

        let Some(kcf) = pd.conf() else { return NGX_ERROR as ngx_int_t };
        let Some(key) = request_key(pd.r, kcf) else { return NGX_ERROR as ngx_int_t };
        let factor = kcf.balance_factor();
        let now = ngx_time();
        let state = if pd.on_backup {
            kcf.state.as_deref_mut()
        } else {
            match ensure_state(kcf, peers) {
                Ok(s) => Some(s),
                Err(e) => {
                    ngx_log_error!(NGX_LOG_ERR, (*pc).log, "kylin: upstream \"{}\": {}", *(*peers).name, e);
                    None
                }
            }
        };
        let Some(state) = state else {
            (*pc).name = (*peers).name;
            return NGX_ERROR as ngx_int_t;
        };
        refresh_live_weight(state, now);
        let state: &UpstreamState = state;
        let tried = pd.rrp.tried;

        let req = Request {
            key,
            learned: pd.session().filter(|s| s.learned != 0).and_then(|s| state.index_of(s.learned)),
            movable: pd.movable,
        };
        let choice = match (&state.backup, pd.on_backup) {
            (Some(b), true) => {
                let mut bs = NginxServers { group: b, tried, now, single: false };
                let req = Request { learned: None, ..req };
                balancer::choose(&req, Pick { ring: &b.ring, servers: &mut bs, bound: Bound::OFF }, None::<Pick<'_, NginxServers>>)
                    .map(|c| Choice { backup: true, route: Route::Backup, ..c })
            }
            (None, true) => None,
            (backup, false) => {
                let single = (*peers).single() != 0;
                let mut ps = NginxServers { group: &state.primary, tried, now, single };
                let bound = Bound {
                    factor_milli: factor,
                    total: state.total.map_or(0, |t| t.inflight()),
                    live_weight: state.live_weight,
                };
                // Backups start with a clean tried bitmap when the request moves to them.
                let mut bs = backup.as_ref().map(|b| NginxServers { group: b, tried: ptr::null_mut(), now, single: false });
                let b = backup
                    .as_ref()
                    .zip(bs.as_mut())
                    .map(|(g, s)| Pick { ring: &g.ring, servers: s, bound: Bound::OFF });
                balancer::choose(&req, Pick { ring: &state.primary.ring, servers: &mut ps, bound }, b)
            }
        };

        let Some(choice) = choice else {
            (*pc).name = (*peers).name;
            return NGX_BUSY as ngx_int_t;
        };

        let (group, list) = if choice.backup {
            let Some(b) = state.backup.as_ref() else { return NGX_ERROR as ngx_int_t };
            (b, if pd.on_backup { peers } else { (*peers).next })
        } else {
            (&state.primary, peers)
        };
        if choice.backup && !pd.on_backup {
            // Move this request to the backup list, as round robin does.
            let words = (*list).number.div_ceil(usize::BITS as usize);
            for w in 0..words {
                *tried.add(w) = 0;
            }
            pd.rrp.peers = list;
            pd.on_backup = true;
        }

        let best = group.peers[choice.server];
        pd.rrp.current = best;
        #[cfg(nginx1_27_3)]
        {
            (*best).refs += 1;
        }
        (*pc).sockaddr = (*best).sockaddr;
        (*pc).socklen = (*best).socklen;
        (*pc).name = ptr::addr_of_mut!((*best).name);
        (*best).conns += 1;
        if now - (*best).checked > (*best).fail_timeout {
            (*best).checked = now;
        }
        let bits = usize::BITS as usize;
        *tried.add(choice.server / bits) |= 1 << (choice.server % bits);

        // Count the try in flight until `free`.
        pd.counted = group.slots[choice.server];
        let total = if choice.backup { None } else { state.total };
        pd.counted_total = total.is_some();
        if let Some(s) = pd.counted {
            s.start();
            s.count(match choice.route {
                Route::Sticky => Counter::Sticky,
                Route::Learned => Counter::Learned,
                Route::Spilled => Counter::SpilledIn,
                Route::Failover => Counter::Failover,
                Route::Backup => Counter::Backup,
            });
        }
        if let Some(t) = total {
            t.start();
        }
        if let Some(home) = choice.from.and_then(|i| group.slots.get(i).copied().flatten()) {
            home.count(Counter::SpilledOut);
        }
        pd.ctx.route = Some(choice.route);
        // A shared session that moves takes its learned route along, so it stays on its new
        // server instead of bouncing back.
        if choice.route == Route::Spilled && pd.session().is_some() {
            move_route(pd, group.ids[choice.server], (*best).name.as_bytes());
        }

        ngx_log_debug_mask!(DebugMask::Http, (*pc).log, "kylin peer: {} route: {}", (*best).name, choice.route.as_str());
    }
    NGX_OK as ngx_int_t
}

/// The request's session id, if it carries one (found again in its `Cookie` headers: rarely
/// needed, so not kept per request).
unsafe fn session_id<'a>(pd: &PeerData) -> Option<&'a [u8]> {
    // SAFETY: pd.r is the live request.
    unsafe {
        let kcf = pd.conf()?;
        match session::request_session(request_cookies(pd.r), kcf.session_cookie()) {
            RequestSession::Id(id) => Some(id),
            RequestSession::None => None,
        }
    }
}

/// Records that the request's session now lives on the current server (locally and, when
/// routes are shared, in Redis).
unsafe fn move_route(pd: &PeerData, id: u64, server: &[u8]) {
    // SAFETY: zones are valid for the cycle.
    unsafe {
        let Some(kcf) = pd.conf() else { return };
        let (Some(zone), Some(sd)) = (kcf.routes_zone, pd.session()) else { return };
        let k = session_key_of(sd);
        let now = ngx_time();
        let timeout = kcf.routes_timeout();
        shm::with_routes(zone, |t| t.insert(k, id, now, timeout));
        if let Some(sid) = session_id(pd) {
            crate::session_check::share_route(kcf, sid, server);
        }
    }
}

/// Whether the server a session would go to (its learned server, else its sticky one) is
/// near its load bound, so that knowing whether the session is shared can matter. Errs on
/// the side of "yes" when the tables are not ready.
pub unsafe fn near_bound(kcf: &SrvConf, r: *mut ngx_http_request_t, learned: Option<u64>) -> bool {
    let factor = kcf.balance_factor();
    let Some(state) = kcf.state.as_deref() else { return true };
    if factor == 0 {
        return false;
    }
    if !state.slots_ready || state.live_weight == 0 {
        return true;
    }
    // SAFETY: r is live; the key computation reads its connection or variables.
    let Some(key) = (unsafe { request_key(r, kcf) }) else { return true };
    let home = learned.and_then(|id| state.index_of(id)).or_else(|| state.primary.ring.owner(key));
    let Some(home) = home else { return false };
    let load = state.primary.slots[home].map_or(0, |s| s.inflight());
    // SAFETY: config-time and zone peers are both valid for the cycle; only the weight is read.
    let weight = unsafe { (*state.primary.peers[home]).weight.max(1) as u64 };
    let bound = Bound { factor_milli: factor, total: state.total.map_or(0, |t| t.inflight()), live_weight: state.live_weight };
    // "Near": within a quarter of the bound.
    (load + 1) * 4 >= bound.limit(weight) * 3
}

/// Learns (or forgets) the session a response from the current server created.
unsafe fn learn_session(pd: &PeerData) {
    // SAFETY: pd.r is the live request; its upstream headers were parsed from this server.
    unsafe {
        let Some(kcf) = pd.conf() else { return };
        let Some(zone) = kcf.routes_zone else { return };
        let u = (*pd.r).upstream;
        if u.is_null() || (*u).headers_in.status_n == 0 {
            return;
        }
        let name = kcf.session_cookie();
        let Some(set) = response_set_cookies(u).find_map(|v| session::response_session(v, name))
        else {
            return;
        };
        let now = ngx_time();
        let timeout = kcf.routes_timeout();
        let peer = key_hash((*pd.rrp.current).name.as_bytes());
        let request_session = pd.session().map(session_key_of);
        let set_key = match set {
            SetSession::Set(id) => shm::session_key(zone, &kcf.routes_keyer, session::KeyUse::Route, &kcf.name, id).map(u128::from),
            SetSession::Delete => None,
        };
        let evicted = shm::with_routes(zone, |t| {
            match (&set, set_key) {
                (SetSession::Set(_), Some(k)) => {
                    t.insert(k, peer, now, timeout);
                }
                (SetSession::Set(_), None) => {}
                (SetSession::Delete, _) => {
                    if let Some(k) = request_session {
                        t.remove(k);
                    }
                }
            }
            t.evictions_to_log(now, 60)
        })
        .flatten();
        if let (SetSession::Set(id), false) = (&set, pd.rrp.current.is_null()) {
            crate::session_check::share_route(kcf, id, (*pd.rrp.current).name.as_bytes());
        }
        if let Some(n) = evicted {
            ngx_log_error!(
                NGX_LOG_WARN,
                (*(*pd.r).connection).log,
                "kylin: upstream \"{}\": session routes zone \"{}\" is full, {} least recently used routes evicted; increase its size with \"kylin_session_routes\"",
                String::from_utf8_lossy(&kcf.name),
                (*zone).shm.name,
                n
            );
        }
    }
}

/// `peer.free`: uncount the try, learn a new session, then round robin's bookkeeping.
unsafe extern "C" fn free_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void, state: ngx_uint_t) {
    // SAFETY: data is our PeerData; rrp is its first field.
    unsafe {
        let pd = &mut *(data as *mut PeerData);
        if let Some(s) = pd.counted.take() {
            s.finish();
            if state & NGX_PEER_FAILED as ngx_uint_t != 0 {
                s.count(Counter::Failures);
            }
        }
        if core::mem::take(&mut pd.counted_total) {
            if let Some(t) = pd.conf().and_then(|c| c.state.as_ref()).and_then(|s| s.total) {
                t.finish();
            }
        }
        if !pd.rrp.current.is_null() && state & (NGX_PEER_FAILED as ngx_uint_t | NGX_PEER_NEXT) == 0 {
            learn_session(pd);
        }
        ngx_http_upstream_free_round_robin_peer(pc, ptr::addr_of_mut!(pd.rrp) as *mut c_void, state);
    }
}
