//! Calls to a Redis session store, in nginx's thread pool: lookups for the precontent phase
//! (the request suspended meanwhile, [`ask`]), route writes for other nginx instances
//! ([`share_route`]), health checks (`background`); their completion on the event loop
//! (verdict cache, adopted routes, resuming the request), and the breaker and statistics they
//! feed, in the store's slot of the load zone. The calls themselves are in
//! [`crate::redis_lookup`], the breaker's rules in [`crate::store`].

use core::ffi::c_void;
use core::ptr;
use std::time::Instant;

use ngx::core::Status;
use ngx::ffi::{
    ngx_add_timer, ngx_cycle, ngx_del_timer, ngx_event_t, ngx_http_request_t, ngx_http_run_posted_requests, ngx_int_t,
    ngx_log_t, ngx_str_t, ngx_thread_pool_get, ngx_thread_pool_t, ngx_thread_task_post, ngx_thread_task_t, ngx_time,
    NGX_LOG_WARN,
};
use ngx::ngx_log_error;

use crate::balancer::SessionState;
use crate::conf::SrvConf;
use crate::load::{Slot, Use};
use crate::redis_lookup::{self, Answer, LookupError};
use crate::session;
use crate::store::{self, cell, RedisStore, SharedBreaker, StoreMode, Verdict};
use crate::{shm, variables};

/// The thread pool `default` (registered by `kylin_session_store`).
unsafe fn thread_pool() -> *mut ngx_thread_pool_t {
    let name = "default";
    let mut n = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
    // SAFETY: ngx_cycle is the running cycle.
    unsafe { ngx_thread_pool_get(ngx_cycle, &mut n) }
}

/// Work for a pool thread, and its answer. Owned by a Box from posting to completion.
pub struct Job {
    task: ngx_thread_task_t,
    store: RedisStore,
    kind: JobKind,
    result: Option<Result<Answer, LookupError>>,
    started: Instant,
    /// The suspended request (NULL once it resumed on the timer).
    waiting: *mut Wait,
}

pub enum JobKind {
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
pub unsafe fn post(job: Box<Job>) -> bool {
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
        if !Status(ngx_thread_task_post(tp, t)).is_ok() {
            drop(Box::from_raw(job));
            return false;
        }
    }
    true
}

pub fn new_job(store: &RedisStore, kind: JobKind) -> Box<Job> {
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
pub fn identity_key(kcf: &SrvConf) -> u64 {
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
        if !SharedBreaker::of(slot).allow(ngx_time(), store.fail_backoff) {
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
    let b = SharedBreaker::of(slot);
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
                shm::with_verdicts(*cache_zone, |c| c.put(*cache_key, v, now + ttl, now));
            }
            None => {
                shm::with_verdicts(*cache_zone, |c| c.forget(*cache_key));
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
            resume(&mut *job.waiting, crate::store::verdict_state(verdict));
        }
    }
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
    let breaker = slot.map_or("closed", |s| SharedBreaker::of(s).state(now));
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

/// A lookup the precontent phase wants: whether `session_id` is shared (its key in the
/// store's format, `shared_key`), and its route too when routes are shared and none is known
/// here.
pub struct Lookup<'a> {
    pub shared_key: Vec<u8>,
    pub share_routes: bool,
    pub cache_zone: *mut ngx::ffi::ngx_shm_zone_t,
    /// The session's key in the verdict cache.
    pub cache_key: u128,
    pub session_id: &'a [u8],
}

/// Asks the store, unless its circuit breaker is open: marks the session `Pending` in the
/// verdict cache (concurrent requests of it do not ask again), posts the lookup to the thread
/// pool and suspends the request until the answer or the store's timeout (`NGX_AGAIN`);
/// `NGX_DECLINED` when it does not ask (the session stays unknown).
///
/// # Safety
/// `r` is the live request in its precontent phase; `kcf` its upstream's configuration.
pub unsafe fn ask(r: *mut ngx_http_request_t, kcf: &SrvConf, store: &RedisStore, l: Lookup<'_>, now: i64) -> ngx_int_t {
    // SAFETY: the load zone is valid for the cycle.
    let breaker = unsafe { shm::load_slot(kcf.load_zone, kcf.store_key, Use::State) };
    if let Some(slot) = breaker {
        if !SharedBreaker::of(slot).allow(now, store.fail_backoff) {
            slot.cell(cell::SKIPPED).fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            return Status::NGX_DECLINED.into();
        }
    }
    let timeout_s = (store.timeout_ms as i64 + 999) / 1000 + 1;
    let cache_key = l.cache_key;
    let cache_zone = l.cache_zone;
    // SAFETY: r is live (this function's contract); zones are valid for the cycle; the Wait
    // comes zeroed from the request pool and lives as long as the request, which cannot
    // finish while it is blocked.
    unsafe {
        shm::with_verdicts(cache_zone, |c| c.put(cache_key, Verdict::Pending, now + timeout_s, now));
        let w = ngx::ffi::ngx_pcalloc((*r).pool, core::mem::size_of::<Wait>()) as *mut Wait;
        if w.is_null() {
            return Status::NGX_ERROR.into();
        }
        let mut job = new_job(
            store,
            JobKind::Lookup {
                shared_key: l.shared_key,
                route_key: l.share_routes.then(|| store::route_key(&kcf.name, l.session_id)),
                upstream: kcf.name.clone(),
                cache_zone,
                routes_zone: kcf.routes_zone,
                cache_key,
                session_id: l.session_id.to_vec(),
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
            shm::with_verdicts(cache_zone, |c| c.forget(cache_key));
            return Status::NGX_DECLINED.into();
        }
        ngx_add_timer(&mut (*w).timer, store.timeout_ms as ngx::ffi::ngx_msec_t);
        let m = (*r).main;
        (*m).set_blocked((*m).blocked() + 1);
        (*r).set_aio(1);
        // While waiting, connection events must not run the phases again (a kept-alive
        // connection's write event fires at once): `resume` restores the handler.
        (*r).write_event_handler = Some(ngx::ffi::ngx_http_request_empty_handler);
    }
    Status::NGX_AGAIN.into()
}

/// Posts a health check of the store of `kcf` (see `background`).
///
/// # Safety
/// Called from the event loop of a worker.
pub unsafe fn check_health(kcf: &SrvConf) {
    let Some(StoreMode::Redis(store)) = kcf.store_mode() else { return };
    // SAFETY: the load zone is valid for the cycle; posting from the event loop.
    unsafe {
        let kind = JobKind::Health {
            upstream: kcf.name.clone(),
            breaker: shm::load_slot(kcf.load_zone, kcf.store_key, Use::State),
            identity: shm::load_slot(kcf.load_zone, identity_key(kcf), Use::State),
        };
        post(new_job(store, kind));
    }
}
