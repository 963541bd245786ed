//! Asking Redis whether a session is shared, without blocking the event loop.
//!
//! A precontent-phase handler finds the kylin upstream a location's `proxy_pass` names, reads
//! the request's session cookie and looks the session up in the shared verdict cache. It runs
//! after the preaccess and access phases, so a request that `limit_req`, `limit_conn`,
//! `allow`/`deny` or `auth_request` rejects never causes a lookup. On a
//! miss that can matter (the session's server is near its bound, or no route is known for it
//! while routes are shared between nginx instances), and while the store's circuit breaker
//! allows it, the lookup runs in nginx's thread pool; only this request is suspended, and it
//! resumes when the answer arrives or after the store's timeout, whichever comes first.
//! Concurrent requests of the same session find a "pending" mark and do not start another
//! lookup. Every Redis trouble means "unknown": the request stays on its server.

use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::time::Instant;

use ngx::ffi::{
    ngx_add_timer, ngx_conf_t, ngx_cycle, ngx_del_timer, ngx_event_t, ngx_http_core_main_conf_t,
    ngx_http_core_module, ngx_http_handler_pt, ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE,
    ngx_http_request_t, ngx_http_run_posted_requests, ngx_http_upstream_main_conf_t,
    ngx_http_upstream_module, ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_log_t, ngx_module_t,
    ngx_str_t, ngx_thread_pool_get, ngx_thread_pool_t, ngx_thread_task_post, ngx_thread_task_t,
    ngx_time, NGX_AGAIN, NGX_DECLINED, NGX_ERROR, NGX_LOG_WARN, NGX_OK,
};
use ngx::ngx_log_error;

use crate::balancer::SessionState;
use crate::conf::{srv_conf, SrvConf};
use crate::load::{Slot, Use};
use crate::redis_lookup::{self, Answer, LookupError};
use crate::session::{self, RequestSession};
use crate::store::{self, cell, RedisStore, SharedBreaker, StoreMode, Verdict};
use crate::{shm, upstream, variables};

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
unsafe fn proxied_upstream(r: *mut ngx_http_request_t) -> Option<(*mut ngx_http_upstream_srv_conf_t, &'static mut SrvConf)> {
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
        let umcf = *(*r).main_conf.add(ngx_http_upstream_module.ctx_index) as *mut ngx_http_upstream_main_conf_t;
        let ups: &[*mut ngx_http_upstream_srv_conf_t] = umcf.as_ref()?.upstreams.as_slice();
        let uscf = *ups.iter().find(|&&u| u == candidate)?;
        let kcf = srv_conf(uscf)?;
        (kcf.enabled && kcf.init_upstream_ran).then_some((uscf, kcf))
    }
}

/// The thread pool `default` (registered by `kylin_session_store`).
unsafe fn thread_pool() -> *mut ngx_thread_pool_t {
    let name = "default";
    let mut n = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
    // SAFETY: ngx_cycle is the running cycle.
    unsafe { ngx_thread_pool_get(ngx_cycle, &mut n) }
}

/// Work for a pool thread, and its answer. Owned by a Box from posting to completion.
struct Job {
    task: ngx_thread_task_t,
    store: RedisStore,
    kind: JobKind,
    result: Option<Result<Answer, LookupError>>,
    started: Instant,
    /// The suspended request (NULL once it resumed on the timer).
    waiting: *mut Wait,
}

enum JobKind {
    /// The periodic health check of a store (see `health_tick`).
    Health {
        upstream: Vec<u8>,
        breaker: Option<&'static Slot>,
        identity: Option<&'static Slot>,
    },
    Lookup {
        shared_key: Vec<u8>,
        route_key: Option<Vec<u8>>,
        upstream: Vec<u8>,
        cache_zone: *mut ngx::ffi::ngx_shm_zone_t,
        routes_zone: Option<*mut ngx::ffi::ngx_shm_zone_t>,
        cache_key: u128,
        session_id: Vec<u8>,
        cache_valid: i64,
        cache_invalid: i64,
        breaker: Option<&'static Slot>,
    },
    WriteRoute {
        route_key: Vec<u8>,
        server: Vec<u8>,
        ttl: i64,
        upstream: Vec<u8>,
        breaker: Option<&'static Slot>,
    },
}

/// A suspended request's side of a lookup, in the request pool.
struct Wait {
    r: *mut ngx_http_request_t,
    timer: ngx_event_t,
    job: *mut Job,
}

unsafe extern "C" fn run_job(data: *mut c_void, _log: *mut ngx_log_t) {
    // SAFETY: data is the Job posted below; only this thread touches it until completion.
    let job = unsafe { &mut *(data as *mut Job) };
    job.result = Some(match &job.kind {
        JobKind::Health { .. } => redis_lookup::health(&job.store).map(|id| Answer { shared: false, route: None, identity: id }),
        JobKind::Lookup { shared_key, route_key, .. } => redis_lookup::lookup(&job.store, shared_key, route_key.as_deref()),
        JobKind::WriteRoute { route_key, server, ttl, .. } => {
            redis_lookup::write_route(&job.store, route_key, server, *ttl).map(|_| Answer { shared: false, route: None, identity: 0 })
        }
    });
}

/// Posts a job; on failure the job is dropped and `false` returned.
unsafe fn post(job: Box<Job>) -> bool {
    // SAFETY: called from the event loop of a worker, where the cycle is set up.
    let tp = unsafe { thread_pool() };
    if tp.is_null() {
        return false;
    }
    let job = Box::into_raw(job);
    // SAFETY: job is a fresh, exclusively owned allocation; the task and its event are
    // zeroed (their initial state) and filled here; nginx owns the task until the completion
    // handler runs, which frees it.
    unsafe {
        let t = ptr::addr_of_mut!((*job).task);
        (*t).ctx = job as *mut c_void;
        (*t).handler = Some(run_job);
        (*t).event.data = job as *mut c_void;
        (*t).event.handler = Some(job_done);
        (*t).event.log = (*ngx_cycle).log;
        if ngx_thread_task_post(tp, t) != NGX_OK as ngx_int_t {
            drop(Box::from_raw(job));
            return false;
        }
    }
    true
}

fn new_job(store: &RedisStore, kind: JobKind) -> Box<Job> {
    Box::new(Job {
        // SAFETY: an all-zero ngx_thread_task_t is its initial state (as ngx_pcalloc gives).
        task: unsafe { core::mem::zeroed() },
        store: store.clone(),
        kind,
        result: None,
        started: Instant::now(),
        waiting: ptr::null_mut(),
    })
}

/// The load-zone key of the slot that remembers which Redis process a store is (its run id).
fn identity_key(kcf: &SrvConf) -> u64 {
    kcf.store_key ^ 0x5ed1
}

/// The load-zone slots of an upstream's session store (circuit breaker and statistics, Redis
/// identity), claimed with the configuration.
pub fn store_slot_keys(kcf: &SrvConf) -> impl Iterator<Item = (u64, Use)> {
    let redis = matches!(kcf.store_mode(), Some(StoreMode::Redis(_)));
    [kcf.store_key, identity_key(kcf)].into_iter().filter(move |_| redis).map(|k| (k, Use::State))
}

/// Whether learned routes of this upstream are shared through its session store.
pub fn shares_routes(kcf: &SrvConf) -> bool {
    matches!(kcf.store_mode(), Some(StoreMode::Redis(s)) if s.share_routes)
}

/// The circuit breaker of a store, over its slot's shared cells.
fn breaker_of(slot: &Slot) -> SharedBreaker<'_> {
    SharedBreaker { failures: slot.cell(cell::FAILURES), open_until: slot.cell(cell::OPEN_UNTIL), probe_at: slot.cell(cell::PROBE_AT) }
}

/// Writes a learned route to Redis for other nginx instances (fire and forget), when the
/// store's circuit breaker allows a call. A write that is not made, or fails, is not retried
/// by the next request: the route is written again when the store has recovered (every route
/// written before the recovery is due then, see `store_recovered_at`) or after `SHARE_EVERY`.
pub unsafe fn share_route(kcf: &SrvConf, session_id: &[u8], server: &[u8]) {
    let Some(StoreMode::Redis(store)) = kcf.store_mode() else { return };
    if !store.share_routes {
        return;
    }
    // SAFETY: the load zone is valid for the cycle.
    let breaker = unsafe { shm::load_slot(kcf.load_zone, kcf.store_key, Use::State) };
    if let Some(slot) = breaker {
        if !breaker_of(slot).allow(ngx_time(), store.fail_backoff) {
            slot.cell(cell::SKIPPED).fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            return;
        }
    }
    let kind = JobKind::WriteRoute {
        route_key: store::route_key(&kcf.name, session_id),
        server: server.to_vec(),
        ttl: kcf.routes_timeout(),
        upstream: kcf.name.clone(),
        breaker,
    };
    // SAFETY: posting from the event loop.
    unsafe { post(new_job(store, kind)) };
}

/// Resumes a request suspended for a lookup.
unsafe fn resume(w: &mut Wait, state: SessionState) {
    // SAFETY: w.r is the suspended, still-live request (it cannot finish while blocked).
    unsafe {
        let r = w.r;
        // The context preaccess created before suspending the request.
        if let Some(ctx) = variables::existing_ctx_mut(r) {
            ctx.session = state;
            ctx.checked = true;
        }
        if w.timer.timer_set() != 0 {
            ngx_del_timer(&mut w.timer);
        }
        w.job = ptr::null_mut();
        let m = (*r).main;
        let c = (*r).connection;
        (*m).set_blocked((*m).blocked().saturating_sub(1));
        (*r).set_aio(0);
        if terminated(r) {
            // The request was terminated while it waited (worker_shutdown_timeout, a failed
            // sibling subrequest, a client nginx gave up on): ngx_http_terminate_request saw
            // it blocked and left the finalizer as the write handler of the connection's
            // active request. Let the connection's event handler run it, as nginx's own
            // thread-task handlers do; running the phases now would proxy a request that is
            // already being closed.
            if let Some(h) = (*(*c).write).handler {
                h((*c).write);
            }
            return;
        }
        // Go on with the phases where the request stopped (precontent, which now declines).
        (*r).write_event_handler = Some(ngx::ffi::ngx_http_core_run_phases);
        ngx::ffi::ngx_http_core_run_phases(r);
        ngx_http_run_posted_requests(c);
    }
}

/// Whether `r` was terminated while it was blocked. nginx terminates a blocked request by
/// marking its connection as failed (`c->error`) and leaving the finalizer as the write
/// handler, in every version (1.25.4+ also sets `r->main->terminated`). The connection's flag
/// is read, not `terminated`: the bindings of nginx 1.30 and 1.31, whose request has a 16-bit
/// `port` before its bit fields, place every bit of `ngx_http_request_t` from `uri_changes` on
/// two bits early (`terminated()` reads another flag there). `blocked` and `aio`, which come
/// before, and `ngx_connection_t`'s bits are where the C compiler puts them (checked with a C
/// program built against each version's headers).
unsafe fn terminated(r: *mut ngx_http_request_t) -> bool {
    // SAFETY: r and its connection are live (a blocked request is not freed).
    unsafe { (*(*r).connection).error() != 0 }
}

unsafe extern "C" fn wait_timeout(ev: *mut ngx_event_t) {
    // SAFETY: ev is the Wait's timer; its data is the Wait in the request pool.
    unsafe {
        let w = &mut *((*ev).data as *mut Wait);
        if !w.job.is_null() {
            (*w.job).waiting = ptr::null_mut();
        }
        resume(w, SessionState::Unknown);
    }
}

/// Which kind of store call a result comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Lookup,
    Write,
    Health,
}

/// Feeds a store call's result to the store's circuit breaker and statistics; logs once when
/// the breaker opens, and notes when the store recovers (it may have lost routes written
/// before: they are written again on their next use).
fn account(slot: &Slot, store: &RedisStore, upstream: &[u8], result: &Option<Result<Answer, LookupError>>, now: i64, elapsed_us: u64, call: Call) {
    use core::sync::atomic::Ordering::Relaxed;
    if call == Call::Lookup {
        slot.cell(cell::LOOKUPS).fetch_add(1, Relaxed);
        slot.cell(cell::LATENCY_US).fetch_add(elapsed_us, Relaxed);
    }
    let b = breaker_of(slot);
    match result {
        // A health check that succeeds says only that Redis answers PING-like commands: it
        // must not close a breaker that lookups or writes opened (or reset their count of
        // failures). Only a real call that succeeds does.
        Some(Ok(_)) if call == Call::Health => {}
        Some(Ok(_)) => {
            if b.open_until.load(Relaxed) != 0 || b.failures.load(Relaxed) != 0 {
                slot.aux().store(now, Relaxed);
            }
            b.success();
        }
        Some(Err(e)) => {
            // Every failed call counts (lookups, route writes, health checks).
            slot.cell(if *e == LookupError::Timeout { cell::TIMEOUTS } else { cell::ERRORS }).fetch_add(1, Relaxed);
            if b.failure(now, store.fail_threshold, store.fail_backoff) {
                let why = match e {
                    LookupError::Timeout => format!("timed out after {} ms", store.timeout_ms),
                    LookupError::Failed(m) => m.clone(),
                };
                ngx_log_error!(
                    NGX_LOG_WARN,
                    // SAFETY: in a worker ngx_cycle is the running cycle and its log is valid.
                    unsafe { (*ngx_cycle).log },
                    "kylin: upstream \"{}\": session store {} failed {} times in a row ({}); not asking it for {} s, sessions stay on their servers",
                    String::from_utf8_lossy(upstream),
                    store.urls.iter().map(|u| store::redact(u)).collect::<Vec<_>>().join(" "),
                    store.fail_threshold,
                    why,
                    store.fail_backoff
                );
            }
        }
        None => {}
    }
}

/// When the store last came back after failing (0 if never): routes written before then may
/// be lost and are written again.
pub fn store_recovered_at(kcf: &SrvConf) -> i64 {
    // SAFETY: the load zone is valid for the cycle.
    unsafe { shm::load_table(kcf.load_zone) }
        .and_then(|t| t.find(kcf.store_key))
        .map_or(0, |s| s.aux().load(core::sync::atomic::Ordering::Relaxed))
}

unsafe extern "C" fn job_done(ev: *mut ngx_event_t) {
    // SAFETY: the event's data is the Job we posted; the thread is done with it.
    let job = unsafe { Box::from_raw((*ev).data as *mut Job) };
    let now = ngx_time();
    let elapsed_us = job.started.elapsed().as_micros() as u64;
    let result = job.result.clone();
    let store = &job.store;
    if let JobKind::Health { upstream, breaker, identity } = &job.kind {
        if let Some(slot) = breaker {
            account(slot, store, upstream, &result, now, elapsed_us, Call::Health);
            // A Redis that restarted (new run_id) may have lost the routes written to it:
            // they are written again on their next use.
            if let (Some(id_slot), Some(Ok(a))) = (identity, &result) {
                use core::sync::atomic::Ordering::Relaxed;
                let prev = id_slot.cell(0).swap(a.identity, Relaxed);
                if prev != 0 && a.identity != 0 && prev != a.identity {
                    slot.aux().store(now, Relaxed);
                }
            }
        }
        return;
    }
    if let JobKind::WriteRoute { upstream, breaker, .. } = &job.kind {
        if let Some(slot) = breaker {
            account(slot, store, upstream, &result, now, elapsed_us, Call::Write);
        }
        return;
    }
    let JobKind::Lookup { upstream, cache_zone, routes_zone, cache_key, session_id, cache_valid, cache_invalid, breaker, .. } = &job.kind
    else {
        return;
    };
    let verdict = match &result {
        Some(Ok(a)) => Some(if a.shared { Verdict::Shared } else { Verdict::Local }),
        _ => None,
    };
    if let Some(slot) = breaker {
        account(slot, store, upstream, &result, now, elapsed_us, Call::Lookup);
    }
    // SAFETY: zones are valid for the cycle; the closures only touch the tables.
    unsafe {
        match verdict {
            Some(v) => {
                let ttl = if v == Verdict::Shared { *cache_valid } else { *cache_invalid };
                shm::with_routes(*cache_zone, |t| t.insert(*cache_key, store::pack(v, now + ttl), now, i64::MAX / 4));
            }
            None => {
                shm::with_routes(*cache_zone, |t| t.remove(*cache_key));
            }
        }
        // A route learned by another nginx instance: adopt it unless we know one.
        if let (Some(Ok(Answer { route: Some(server), .. })), Some(rz)) = (&result, routes_zone) {
            let id = crate::ring::key_hash(server);
            shm::with_routes(*rz, |t| {
                let k = u128::from(session::session_key(t.header().secret, session::KeyUse::Route, upstream, session_id));
                if t.lookup(k, now, i64::MAX / 4).is_none() {
                    t.insert(k, id, now, i64::MAX / 4);
                }
            });
        }
        if !job.waiting.is_null() {
            let state = match verdict {
                Some(Verdict::Shared) => SessionState::Shared,
                Some(Verdict::Local) => SessionState::Local,
                _ => SessionState::Unknown,
            };
            resume(&mut *job.waiting, state);
        }
    }
}

/// The precontent handler.
unsafe extern "C" fn precontent(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls phase handlers with a live request.
    unsafe {
        if let Some(ctx) = variables::existing_ctx(r) {
            if ctx.checked {
                return NGX_DECLINED as ngx_int_t;
            }
        }
        let Some((_uscf, kcf)) = proxied_upstream(r) else { return NGX_DECLINED as ngx_int_t };
        let Some(StoreMode::Redis(store)) = kcf.store_mode() else { return NGX_DECLINED as ngx_int_t };
        let Some(cache_zone) = kcf.cache_zone else { return NGX_DECLINED as ngx_int_t };

        let cookies = upstream::request_cookies(r);
        let RequestSession::Id(id) = session::request_session(cookies, kcf.session_cookie()) else {
            return NGX_DECLINED as ngx_int_t;
        };
        let Some(ctx) = variables::ctx(r, id) else { return NGX_ERROR as ngx_int_t };
        ctx.checked = true;
        ctx.session = SessionState::Unknown;
        let Some(shared_key) = store::shared_key(&store.format, id) else {
            // Not an id of this store's format (a Tomcat id in front of format=spring, a
            // forged value): the store cannot tell whether it is shared, so it is never asked
            // and the session is `unknown`: it keeps its learned route and never moves.
            return NGX_DECLINED as ngx_int_t;
        };

        let now = ngx_time();
        let Some(k) = shm::session_key(cache_zone, &kcf.cache_keyer, session::KeyUse::Verdict, &kcf.name, id).map(u128::from) else {
            return NGX_DECLINED as ngx_int_t;
        };
        let cached = shm::with_routes(cache_zone, |t| (k, t.lookup(k, now, i64::MAX / 4).and_then(|x| store::unpack(x, now))));
        let Some((cache_key, verdict)) = cached else { return NGX_DECLINED as ngx_int_t };
        match verdict {
            Some(Verdict::Shared) => {
                ctx.session = SessionState::Shared;
                return NGX_DECLINED as ngx_int_t;
            }
            Some(Verdict::Local) => {
                ctx.session = SessionState::Local;
                return NGX_DECLINED as ngx_int_t;
            }
            Some(Verdict::Pending) => return NGX_DECLINED as ngx_int_t,
            None => {}
        }

        // Ask only when the answer can change where this request goes.
        let learned = kcf.routes_zone.and_then(|z| {
            let k = u128::from(shm::session_key(z, &kcf.routes_keyer, session::KeyUse::Route, &kcf.name, id)?);
            shm::with_routes(z, |t| t.lookup(k, now, kcf.routes_timeout())).flatten()
        });
        let need_route = learned.is_none() && store.share_routes;
        if !need_route && !upstream::near_bound(kcf, r, learned) {
            return NGX_DECLINED as ngx_int_t;
        }

        let breaker = shm::load_slot(kcf.load_zone, kcf.store_key, Use::State);
        if let Some(slot) = breaker {
            if !breaker_of(slot).allow(now, store.fail_backoff) {
                slot.cell(cell::SKIPPED).fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                return NGX_DECLINED as ngx_int_t;
            }
        }
        let timeout_s = (store.timeout_ms as i64 + 999) / 1000 + 1;
        shm::with_routes(cache_zone, |t| t.insert(cache_key, store::pack(Verdict::Pending, now + timeout_s), now, i64::MAX / 4));

        let w = ngx::ffi::ngx_pcalloc((*r).pool, core::mem::size_of::<Wait>()) as *mut Wait;
        if w.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        let mut job = new_job(
            store,
            JobKind::Lookup {
                shared_key,
                route_key: need_route.then(|| store::route_key(&kcf.name, id)),
                upstream: kcf.name.clone(),
                cache_zone,
                routes_zone: kcf.routes_zone,
                cache_key,
                session_id: id.to_vec(),
                cache_valid: store.cache_valid,
                cache_invalid: store.cache_invalid,
                breaker,
            },
        );
        job.waiting = w;
        let job_ptr: *mut Job = &mut *job;
        (*w).r = r;
        (*w).job = job_ptr;
        (*w).timer.data = w as *mut c_void;
        (*w).timer.handler = Some(wait_timeout);
        (*w).timer.log = (*(*r).connection).log;
        if !post(job) {
            // No thread pool: behave as if Redis did not answer.
            shm::with_routes(cache_zone, |t| t.remove(cache_key));
            return NGX_DECLINED as ngx_int_t;
        }
        ngx_add_timer(&mut (*w).timer, store.timeout_ms as ngx::ffi::ngx_msec_t);
        let m = (*r).main;
        (*m).set_blocked((*m).blocked() + 1);
        (*r).set_aio(1);
        // While waiting, connection events must not run the phases again (a kept-alive
        // connection's write event fires at once): `resume` restores the handler.
        (*r).write_event_handler = Some(ngx::ffi::ngx_http_request_empty_handler);
        NGX_AGAIN as ngx_int_t
    }
}

/// Installs the precontent handler (postconfiguration), if some upstream has a Redis store:
/// other configurations pay nothing per request. Precontent runs after access control and
/// rate limits; within the phase, handlers run in reverse order of registration, so this one
/// (registered by a dynamic module, after the static ones) runs before `mirror` and
/// `try_files`.
pub unsafe fn install(cf: *mut ngx_conf_t) -> ngx_int_t {
    if !REDIS_CONFIGURED.load(Ordering::Relaxed) {
        return NGX_OK as ngx_int_t;
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
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: cf is the http block's context; the core main conf holds the phase arrays.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t;
        let cmcf = *(*ctx).main_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_main_conf_t;
        let phase = &mut (*cmcf).phases[ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE as usize].handlers;
        let h = ngx::ffi::ngx_array_push(phase) as *mut ngx_http_handler_pt;
        if h.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        *h = Some(precontent);
    }
    NGX_OK as ngx_int_t
}

/// The status of a store, for `kylin_status`.
pub fn store_report(kcf: &SrvConf, now: i64) -> Option<crate::report::StoreReport> {
    let mode = kcf.store_mode()?;
    let StoreMode::Redis(store) = mode else {
        return (*mode == StoreMode::AllShared).then(|| crate::report::StoreReport { kind: "shared", ..Default::default() });
    };
    // SAFETY: the load zone is valid for the cycle.
    let slot = unsafe { shm::load_table(kcf.load_zone) }.and_then(|t| t.find(kcf.store_key));
    let get = |i: usize| slot.map_or(0, |s| s.cell(i).load(core::sync::atomic::Ordering::Relaxed));
    let breaker = slot.map_or("closed", |s| breaker_of(s).state(now));
    let lookups = get(cell::LOOKUPS);
    Some(crate::report::StoreReport {
        kind: if store.cluster { "redis-cluster" } else { "redis" },
        urls: store.urls.iter().map(|u| store::redact(u)).collect(),
        breaker,
        lookups,
        errors: get(cell::ERRORS),
        timeouts: get(cell::TIMEOUTS),
        skipped: get(cell::SKIPPED),
        latency_seconds: get(cell::LATENCY_US) as f64 / 1e6,
        // SAFETY: the cache zone is valid for the cycle.
        cache: kcf.cache_zone.and_then(|z| unsafe { shm::table_report(z) }),
    })
}

// -------------------------------------------------------------------------------------------
// Health checks: one worker (see `init_process`) asks each Redis store every few seconds
// whether it answers and whether it still holds what was written to it. Failures open the
// circuit breaker without traffic (successes never close it: see `account`), and a Redis
// that lost its data (which loses the routes written to it) is noticed, so that routes are
// written again.

/// Seconds between health checks.
const HEALTH_EVERY_MS: u64 = 3000;

struct Health {
    ev: ngx_event_t,
    kcf: *const SrvConf,
}

unsafe extern "C" fn health_tick(ev: *mut ngx_event_t) {
    // SAFETY: ev is the Health's event; its kcf lives as long as the cycle (the worker).
    unsafe {
        let h = &mut *((*ev).data as *mut Health);
        if ngx::ffi::ngx_exiting != 0 || ngx::ffi::ngx_quit != 0 || ngx::ffi::ngx_terminate != 0 {
            return;
        }
        let kcf = &*h.kcf;
        if let Some(StoreMode::Redis(store)) = kcf.store_mode() {
            let kind = JobKind::Health {
                upstream: kcf.name.clone(),
                breaker: shm::load_slot(kcf.load_zone, kcf.store_key, Use::State),
                identity: shm::load_slot(kcf.load_zone, identity_key(kcf), Use::State),
            };
            post(new_job(store, kind));
        }
        ngx_add_timer(ev, HEALTH_EVERY_MS as ngx::ffi::ngx_msec_t);
    }
}

/// Starts the health checks of a worker (init_process).
pub unsafe fn start_health_checks(cycle: *mut ngx::ffi::ngx_cycle_t) -> ngx_int_t {
    // SAFETY: cycle is the worker's cycle; the http main conf holds the upstream list.
    unsafe {
        let http = *(*cycle).conf_ctx.add(ngx::ffi::ngx_http_module.index) as *mut ngx::ffi::ngx_http_conf_ctx_t;
        let Some(http) = http.as_ref() else { return NGX_OK as ngx_int_t };
        let umcf = *http.main_conf.add(ngx_http_upstream_module.ctx_index) as *mut ngx_http_upstream_main_conf_t;
        let Some(umcf) = umcf.as_ref() else { return NGX_OK as ngx_int_t };
        let ups: &[*mut ngx_http_upstream_srv_conf_t] = umcf.upstreams.as_slice();
        // One prober per Redis (upstreams may share a store, e.g. the http-level one).
        let mut probed: Vec<u64> = Vec::new();
        for &uscf in ups {
            let Some(kcf) = srv_conf(uscf) else { continue };
            if !kcf.enabled || !matches!(kcf.store_mode(), Some(StoreMode::Redis(_))) || probed.contains(&kcf.store_key) {
                continue;
            }
            probed.push(kcf.store_key);
            let h = ngx::ffi::ngx_pcalloc((*cycle).pool, core::mem::size_of::<Health>()) as *mut Health;
            if h.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            (*h).kcf = kcf;
            (*h).ev.data = h as *mut c_void;
            (*h).ev.handler = Some(health_tick);
            (*h).ev.log = (*cycle).log;
            // Graceful shutdown does not wait for this timer.
            (*h).ev.set_cancelable(1);
            // The first check soon after start.
            ngx_add_timer(&mut (*h).ev, 200);
        }
    }
    NGX_OK as ngx_int_t
}
