//! The precontent phase: learns whether a request's session is shared (Redis), without
//! blocking the event loop, before the balancer runs.
//!
//! The handler finds the kylin upstream a location's `proxy_pass` names, reads the request's
//! session cookie and looks the session up in the shared verdict cache. It runs after the
//! preaccess and access phases, so a request that `limit_req`, `limit_conn`, `allow`/`deny`
//! or `auth_request` rejects never causes a lookup. On a miss that can matter (the session's
//! server is near its bound, or no route is known for it while routes are shared between
//! nginx instances: [`balancer::worth_asking`]), `store_io` asks the store in nginx's thread
//! pool; only this request is suspended, and it resumes when the answer arrives or after the
//! store's timeout, whichever comes first. Every Redis trouble means "unknown": the request
//! stays on its server.

use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use ngx::core::Status;
use ngx::ffi::{
    ngx_conf_t, ngx_http_core_main_conf_t, ngx_http_core_module, ngx_http_handler_pt,
    ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE, ngx_http_request_t, ngx_http_upstream_srv_conf_t, ngx_int_t,
    ngx_module_t, ngx_time,
};

use crate::balancer::{self, Bound, SessionState};
use crate::conf::{kylin_upstreams, SrvConf};
use crate::ngx_ext::request_cookies;
use crate::session::{self, RequestSession};
use crate::store::{self, StoreMode};
use crate::{shm, store_io, variables};

/// The proxy module, found once per configuration (it may be compiled out of nginx).
static PROXY_MODULE: AtomicPtr<ngx_module_t> = AtomicPtr::new(ptr::null_mut());

/// Whether the configuration being parsed has a Redis session store.
static REDIS_CONFIGURED: AtomicBool = AtomicBool::new(false);

/// Called at the start of each configuration's http block.
pub fn reset_for_new_configuration() {
    REDIS_CONFIGURED.store(false, Ordering::Relaxed);
}

/// `kylin_session_store redis://...` was read.
pub fn note_redis_store() {
    REDIS_CONFIGURED.store(true, Ordering::Relaxed);
}

fn proxy_module() -> Option<&'static ngx_module_t> {
    // SAFETY: set once at configuration time to nginx's static module struct (or NULL).
    unsafe { PROXY_MODULE.load(Ordering::Relaxed).as_ref() }
}

/// The kylin upstream a request's location proxies to with a static `proxy_pass`.
///
/// ngx_http_proxy_module's location configuration starts with an `ngx_http_upstream_conf_t`,
/// which starts with the `ngx_http_upstream_srv_conf_t *` of `proxy_pass` (both stable since
/// nginx 0.8). The pointer read there is only compared with the known upstreams, never
/// dereferenced unless it is one of them.
unsafe fn proxied_upstream(r: *mut ngx_http_request_t) -> Option<&'static SrvConf> {
    let pm = proxy_module()?;
    // SAFETY: r is a live request; loc_conf has an entry per HTTP module; the proxy module's
    // entry is its ngx_http_proxy_loc_conf_t (see above).
    unsafe {
        let plcf = *(*r).loc_conf.add(pm.ctx_index) as *const *mut ngx_http_upstream_srv_conf_t;
        if plcf.is_null() {
            return None;
        }
        let candidate = *plcf;
        if candidate.is_null() {
            return None;
        }
        kylin_upstreams((*r).main_conf).find(|&(u, _)| u == candidate).map(|(_, kcf)| kcf)
    }
}

/// The precontent handler: finds the request's session and what the store says about it,
/// from the verdict cache, or by asking the store (in the thread pool, the request suspended)
/// when the answer can change where the request goes ([`balancer::worth_asking`]). What it
/// learns is left in the request's context for `init_peer`.
unsafe extern "C" fn precontent(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls phase handlers with a live request.
    unsafe {
        if variables::existing_ctx(r).is_some_and(|ctx| ctx.checked) {
            return Status::NGX_DECLINED.into();
        }
        let Some(kcf) = proxied_upstream(r) else { return Status::NGX_DECLINED.into() };
        let Some(StoreMode::Redis(store)) = kcf.store_mode() else { return Status::NGX_DECLINED.into() };
        let Some(cache_zone) = kcf.cache_zone else { return Status::NGX_DECLINED.into() };

        let RequestSession::Id(id) = session::request_session(request_cookies(r), kcf.session_cookie()) else {
            return Status::NGX_DECLINED.into();
        };
        let Some(ctx) = variables::ctx(r, id) else { return Status::NGX_ERROR.into() };
        ctx.checked = true;
        ctx.session = SessionState::Unknown;
        let Some(shared_key) = store::shared_key(&store.format, id) else {
            // Not an id of this store's format (a Tomcat id in front of format=spring, a
            // forged value): the store cannot tell whether it is shared, so it is never asked
            // and the session stays `unknown`.
            return Status::NGX_DECLINED.into();
        };

        let now = ngx_time();
        let Some(k) = shm::session_key(cache_zone, &kcf.cache_keyer, session::KeyUse::Verdict, &kcf.name, id).map(u128::from) else {
            return Status::NGX_DECLINED.into();
        };
        let Some(verdict) = shm::with_verdicts(cache_zone, |v| v.get(k, now)) else { return Status::NGX_DECLINED.into() };
        if let Some(v) = verdict {
            // Cached, or a lookup already under way (`Pending`: unknown meanwhile).
            ctx.session = store::verdict_state(Some(v));
            return Status::NGX_DECLINED.into();
        }

        let learned = kcf.routes_zone.and_then(|z| {
            let k = shm::session_key(z, &kcf.routes_keyer, session::KeyUse::Route, &kcf.name, id)?;
            shm::lookup_route(z, &kcf.recent_routes, k, now, kcf.routes_timeout(), None).flatten().map(|h| h.0)
        });
        if !balancer::worth_asking(learned.is_some(), store.share_routes, || near_bound(kcf, r, learned)) {
            return Status::NGX_DECLINED.into();
        }
        let lookup = store_io::Lookup { shared_key, share_routes: store.share_routes && learned.is_none(), cache_zone, cache_key: k, session_id: id };
        store_io::ask(r, kcf, store, lookup, now)
    }
}

/// Whether the server a session would go to (its learned server, else its sticky one) is
/// near its load bound ([`Bound::near`]), or, with client placement, whether placement is
/// busy (clients move only then): so that knowing whether the session is shared can matter.
/// Errs on the side of "yes" when the tables are not ready. Reads the per-process tables
/// only (no peer: this runs before `get`, when the peers the tables were built from may be
/// gone).
unsafe fn near_bound(kcf: &SrvConf, r: *mut ngx_http_request_t, learned: Option<u64>) -> bool {
    if let Some(z) = kcf.placement_zone {
        // SAFETY: the zone is valid for the cycle.
        return unsafe { shm::placement_state(z, ngx::ffi::ngx_current_msec as u64) }.map_or(true, |(busy, _)| busy);
    }
    let Some(tables) = kcf.tables.get() else { return true };
    let Some(state) = tables.as_deref() else { return true };
    let factor = kcf.balance_factor();
    if factor == 0 {
        return false;
    }
    let live_weight = state.live_weight.get();
    if !state.slots_ready || live_weight == 0 {
        return true;
    }
    // SAFETY: r is live; the key computation reads its connection or variables.
    let Some(key) = (unsafe { crate::peer::request_key(r, kcf) }) else { return true };
    let home = learned.and_then(|id| state.index_of(id)).or_else(|| state.primary.ring.owner(key));
    let Some(home) = home else { return false };
    let load = state.primary.slots.get(home).copied().flatten().map_or(0, |s| s.inflight());
    let bound = Bound { factor_milli: factor, total: state.total.map_or(0, |t| t.inflight()), live_weight };
    bound.near(load, state.primary.weight(home))
}

/// Installs the precontent handler (postconfiguration), if some upstream has a Redis store:
/// other configurations pay nothing per request. Precontent runs after access control and
/// rate limits; within the phase, handlers run in reverse order of registration, so this one
/// (registered by a dynamic module, after the static ones) runs before `mirror` and
/// `try_files`.
pub unsafe fn install(cf: *mut ngx_conf_t) -> ngx_int_t {
    if !REDIS_CONFIGURED.load(Ordering::Relaxed) {
        return Status::NGX_OK.into();
    }
    // SAFETY: dlsym with RTLD_DEFAULT looks the symbol up in the nginx binary; the module
    // struct, if present, is a static of nginx that lives for the whole process.
    let pm = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"ngx_http_proxy_module".as_ptr()) };
    PROXY_MODULE.store(pm as *mut ngx_module_t, Ordering::Relaxed);
    if pm.is_null() {
        ngx::ngx_conf_log_error!(
            ngx::ffi::NGX_LOG_WARN,
            cf,
            "kylin: nginx has no proxy module: kylin_session_store cannot check sessions"
        );
        return Status::NGX_OK.into();
    }
    // SAFETY: cf is the http block's context; the core main conf holds the phase arrays.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t;
        let cmcf = *(*ctx).main_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_main_conf_t;
        let phase = &mut (*cmcf).phases[ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE as usize].handlers;
        let h = ngx::ffi::ngx_array_push(phase) as *mut ngx_http_handler_pt;
        if h.is_null() {
            return Status::NGX_ERROR.into();
        }
        *h = Some(precontent);
    }
    Status::NGX_OK.into()
}
