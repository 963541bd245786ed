//! What runs in the background, in one process only (worker 0, or the single process:
//! see `init_process` in `lib.rs`), since its results live in shared memory for every worker:
//! - the session stores' health checks, a timer per Redis store (below; the calls are made by
//!   `store_io` in the thread pool);
//! - the node health prober (`probe`: `kylin_health_check`, on the event loop).
//!
//! Timers are `cancelable`: graceful shutdown does not wait for them.

use core::ffi::c_void;

use ngx::core::Status;
use ngx::ffi::{ngx_add_timer, ngx_event_t, ngx_int_t};

use crate::conf::{cycle_main_conf, kylin_upstreams, SrvConf};
use crate::store::StoreMode;
use crate::store_io;

// Store health checks: one worker (see `init_process`) asks each Redis store every few seconds
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
        store_io::check_health(&*h.kcf);
        ngx_add_timer(ev, HEALTH_EVERY_MS as ngx::ffi::ngx_msec_t);
    }
}

/// Starts the store health checks (one per Redis: upstreams may share a store, e.g. the
/// http-level one).
///
/// # Safety
/// `cycle` is the worker's cycle.
unsafe fn start_store_checks(cycle: *mut ngx::ffi::ngx_cycle_t) -> ngx_int_t {
    // SAFETY: cycle is the worker's cycle; its configuration lives as long as the process.
    unsafe {
        let Some(main_conf) = cycle_main_conf(cycle) else { return Status::NGX_OK.into() };
        let mut probed: Vec<u64> = Vec::new();
        for (_, kcf) in kylin_upstreams(main_conf) {
            if !matches!(kcf.store_mode(), Some(StoreMode::Redis(_))) || probed.contains(&kcf.store_key) {
                continue;
            }
            probed.push(kcf.store_key);
            let h = ngx::ffi::ngx_pcalloc((*cycle).pool, core::mem::size_of::<Health>()) as *mut Health;
            if h.is_null() {
                return Status::NGX_ERROR.into();
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
    Status::NGX_OK.into()
}

/// Starts the background work, in the one process that runs it (`init_process` of worker 0).
///
/// # Safety
/// `cycle` is the process's cycle.
pub unsafe fn start(cycle: *mut ngx::ffi::ngx_cycle_t) -> ngx_int_t {
    // SAFETY: the caller's contract.
    let rc = unsafe { start_store_checks(cycle) };
    if !Status(rc).is_ok() {
        return rc;
    }
    // SAFETY: as above.
    unsafe { crate::probe::start(cycle) }
}

/// Stops it (`exit_process`): frees the probers, if this process runs them.
///
/// # Safety
/// Called once, from the process's event loop's end.
pub unsafe fn stop() {
    // SAFETY: the caller's contract.
    unsafe { crate::probe::stop() }
}
