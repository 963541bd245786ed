//! What a finished or moved try teaches the shared tables: the session route a response
//! created (a login) or deleted, a spilled session's new route, the re-sharing of routes
//! through the session store, and client placement's measurements (a key's response time
//! while placement is busy, logins). Called from `peer`'s `get` and `free`, with no peer list
//! locked.

use ngx::ffi::{ngx_http_request_t, ngx_time, NGX_LOG_WARN};
use ngx::ngx_log_error;

use crate::conf::SrvConf;
use crate::ngx_ext::{request_cookies, response_set_cookies};
use crate::ring::key_hash;
use crate::session::{self, RequestSession, SetSession};
use crate::{shm, store_io};

/// Writes a learned route to the session store again, when it is due
/// ([`crate::routes::RouteTable::share_interval`]).
#[cold]
#[inline(never)]
pub unsafe fn share_again(kcf: &SrvConf, session_id: &[u8], peer_id: u64) {
    let tables = kcf.tables.get();
    let Some(state) = tables.as_deref().and_then(|t| t.as_deref()) else { return };
    let Some(name) = state.index_of(peer_id).and_then(|i| state.primary.names.get(i)) else { return };
    // SAFETY: called from the event loop.
    unsafe { store_io::share_route(kcf, session_id, name) };
}

/// Records what placement learns from a finished try on a primary server: the key's
/// response time (its load, by Little's law), while placement is busy (as it was when the try
/// was chosen, and still is), or a login (a response that set a session) on server `login`,
/// always. `key` computes the request's stickiness key; `peer` is the primary peer that
/// answered; `session` is the route-table key of the session the request carried (0: none).
///
/// # Safety
/// `r` is the live request, its upstream set.
#[cold]
#[inline(never)]
pub unsafe fn placement_learns(kcf: &SrvConf, r: *mut ngx_http_request_t, key: impl FnOnce() -> Option<u64>, peer: *const ngx::ffi::ngx_http_upstream_rr_peer_t, session: u64, login: Option<u64>) {
    let tables = kcf.tables.get();
    let (Some(zone), Some(state)) = (kcf.placement_zone, tables.as_deref().and_then(|t| t.as_deref())) else { return };
    // SAFETY: the zone is valid for the cycle; r and its upstream are live.
    unsafe {
        if ngx::ffi::ngx_exiting != 0 {
            return;
        }
        let now_ms = ngx::ffi::ngx_current_msec as u64;
        let busy = shm::placement_state(zone, now_ms).is_some_and(|(b, _)| b);
        let login = login.and_then(|id| state.index_of(id));
        if !busy && login.is_none() {
            return;
        }
        let Some(key) = key() else { return };
        let u = (*r).upstream;
        let response_ms = (now_ms as ngx::ffi::ngx_msec_t).wrapping_sub((*u).start_time) as u64;
        shm::with_placement(zone, state.primary.layout, true, |p, _, _| {
            // Without a session store, sessions are node-local (their logins' priors differ).
            p.set_local_sessions(kcf.node_local_sessions());
            if busy {
                // With the session it used (a client's active sessions shape its logins' priors)
                // and the server that served it (what a moved client left behind there), found
                // by its peer among the tables' own (a peer `resolve` removed is not there).
                let response_ms = response_ms.min(3_600_000);
                match state.primary_peers.index_of(peer) {
                    Some(i) => p.key_done_on(key, i, response_ms, session, now_ms),
                    None => p.key_done_in(key, response_ms, session, now_ms),
                }
            }
            if let Some(i) = login {
                p.login(key, i, now_ms);
            }
        });
    }
}

/// The request's session id, if it carries one (found again in its `Cookie` headers: rarely
/// needed, so not kept per request).
unsafe fn session_id<'a>(kcf: &SrvConf, r: *mut ngx_http_request_t) -> Option<&'a [u8]> {
    // SAFETY: r is the live request.
    match session::request_session(unsafe { request_cookies(r) }, kcf.session_cookie()) {
        RequestSession::Id(id) => Some(id),
        RequestSession::None => None,
    }
}

/// Records that the request's session now lives on server `id`, called `server` (locally
/// and, when routes are shared, in Redis). Called with no peer list locked.
#[cold]
#[inline(never)]
pub unsafe fn move_route(kcf: &SrvConf, r: *mut ngx_http_request_t, k: u128, id: u64, server: &[u8]) {
    let Some(zone) = kcf.routes_zone else { return };
    let now = ngx_time();
    let timeout = kcf.routes_timeout();
    // SAFETY: zones are valid for the cycle.
    unsafe { shm::with_routes(zone, |t| t.insert(k, id, now, timeout)) };
    // SAFETY: r is the live request; called from the event loop.
    unsafe {
        if let Some(sid) = session_id(kcf, r) {
            store_io::share_route(kcf, sid, server);
        }
    }
}

/// Learns (or forgets) the session a response from server `server` created or deleted
/// (`request_session`: the route-table key of the session the request carried); the
/// server's identity if the response created one (a login).
///
/// # Safety
/// `r` is the live request; its upstream headers were parsed from that server.
#[inline(always)]
pub unsafe fn learn_session(kcf: &SrvConf, r: *mut ngx_http_request_t, server: &[u8], request_session: Option<u128>) -> Option<u64> {
    // SAFETY: the caller's contract.
    unsafe {
        let zone = kcf.routes_zone?;
        let u = (*r).upstream;
        if u.is_null() || (*u).headers_in.status_n == 0 {
            return None;
        }
        let name = kcf.session_cookie();
        let set = response_set_cookies(u).find_map(|v| session::response_session(v, name))?;
        let now = ngx_time();
        let timeout = kcf.routes_timeout();
        let peer = key_hash(server);
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
        if let SetSession::Set(id) = &set {
            store_io::share_route(kcf, id, server);
        }
        if let Some(n) = evicted {
            ngx_log_error!(
                NGX_LOG_WARN,
                (*(*r).connection).log,
                "kylin: upstream \"{}\": session routes zone \"{}\" is full, {} least recently used routes evicted; increase its size with \"kylin_session_routes\"",
                String::from_utf8_lossy(&kcf.name),
                (*zone).shm.name,
                n
            );
        }
        matches!(set, SetSession::Set(_)).then_some(peer)
    }
}

/// A primary server nginx held failed (`max_fails`) answered a try: it is back, and with
/// `kylin_slow_start` its ramp begins (stamped in its health slot, as the prober does for a
/// server that turns healthy again). A rare path: the slot is looked up by name.
#[cold]
#[inline(never)]
pub unsafe fn came_back(kcf: &SrvConf, server: &[u8]) {
    if kcf.slow_start_ms.is_none() {
        return;
    }
    // SAFETY: the load zone is valid for the cycle.
    let slot = unsafe { shm::load_slot(kcf.load_zone, crate::load::health_key(&kcf.name, server), crate::load::Use::Counts) };
    if let Some(slot) = slot {
        slot.cell(crate::health::cell::RAMP_MS).store(crate::health::unix_ms(), core::sync::atomic::Ordering::Relaxed);
    }
}
