//! ngx_http_kylin_upstream_module: an nginx upstream balancer for Apache Kylin query nodes.
//!
//! Layout. Decisions and data structures are plain Rust without FFI, unit- and
//! property-tested; the nginx glue gathers facts, calls them and applies the answer. Glue
//! files are named after the nginx hook or machinery they implement, and import only
//! downwards (`peer` and `phase` use `learning`, `store_io`, `tables`, `conf`, `shm`,
//! `ngx_ext`; nothing uses `peer` but `directives`, which installs it).
//!
//! | question | pure Rust | nginx glue |
//! |---|---|---|
//! | how is a peer chosen | [`balancer`] (the decision and the rules around it), [`ring`] (consistent hashing), [`key`] | `peer` (`init_upstream`, `init_peer`, `get`, `free`), `tables` (the per-process rings and names) |
//! | where does a busy client go | [`placement`] (`kylin_balance clients`) | `peer` (sampling, placing), `learning` (measuring at `free`) |
//! | what is a session, may it move | [`session`] (cookies), [`store`] (`kylin_session_store`, breaker, verdicts), [`redis_lookup`] (Redis, in the thread pool) | `phase` (precontent), `store_io` (thread-pool calls and their completion), `learning` (routes learned) |
//! | is a node healthy, draining, ramping | [`health`] (`kylin_health_check`, [`health::Gate`], slow start), [`drain`] | `probe` (the prober), `admin` (`kylin_status write=on`) |
//! | what load does a node report | [`load_report`] (`kylin_load_report`, the metrics page's parser, saturation verdicts; used by [`placement`]) | `probe` (fetches the page, same machinery), `peer` (passes verdicts to placement) |
//! | where is shared state | [`load`] (in-flight counters, health and store slots), [`routes`] (learned routes, each worker's memory of this second's; the verdict cache) | `shm` (every zone: `kylin_load`, routes, `kylin_placement:NAME`) |
//! | what runs in the background | | `background` (worker 0: store health timers, `probe`) |
//! | what operators see | [`report`] (JSON, Prometheus), [`dashboard`] | `status` (`kylin_status`), `variables` |
//! | directives, `nginx -t` | parsers in [`balancer`], [`store`], [`session`], [`health`] | `directives` (the directives, checks), `conf` (`SrvConf`, finding it) |
//! | repeated nginx idioms | | `ngx_ext` (peer-list guards, headers, `ProcessLocal`, `send_whole`) |
//!
//! A request: `phase`'s precontent handler (only with a Redis store) learns whether its
//! session is shared, from the verdict cache or, when [`balancer::worth_asking`], by a lookup
//! in the thread pool (`store_io`), the request suspended; `peer::init_peer` reads the session
//! cookie and its learned route ([`balancer::session_state`]); `peer::get_peer` locks the
//! primary list, has `tables` current, samples placement, asks
//! [`balancer::choose_primary`] (else [`balancer::choose_backup`] under the backup list's lock)
//! and counts the try in flight; `peer::free_peer` uncounts it and `learning` records the
//! session a response created and the client's response time. This file holds the module
//! definition and its process hooks; worker 0 starts `background` in `init_process`.

pub mod balancer;
pub mod dashboard;
pub mod drain;
pub mod health;
pub mod session;
pub mod store;
pub mod key;
pub mod load;
pub mod load_report;
pub mod placement;
pub mod report;
pub mod redis_lookup;
pub mod ring;
pub mod routes;

#[cfg(not(test))]
mod admin;
#[cfg(not(test))]
mod background;
#[cfg(not(test))]
mod conf;
#[cfg(not(test))]
mod directives;
#[cfg(not(test))]
mod learning;
#[cfg(not(test))]
mod ngx_ext;
#[cfg(not(test))]
mod peer;
#[cfg(not(test))]
mod phase;
#[cfg(not(test))]
mod probe;
#[cfg(not(test))]
mod shm;
#[cfg(not(test))]
mod status;
#[cfg(not(test))]
mod store_io;
#[cfg(not(test))]
mod tables;
#[cfg(not(test))]
mod variables;


#[cfg(not(test))]
use core::ptr;

#[cfg(not(test))]
use ngx::core::Status;
#[cfg(not(test))]
use ngx::ffi::{ngx_conf_t, ngx_http_module_t, ngx_int_t, ngx_module_t, ngx_uint_t, NGX_HTTP_MODULE};
#[cfg(not(test))]
use ngx::http::{HttpModule, HttpModuleServerConf};

// -------------------------------------------------------------------------------------------
// The module itself: `ngx_http_kylin_upstream_module`, its HTTP context and the hooks nginx
// calls around configurations and processes. Its directives are in `directives`.

#[cfg(not(test))]
pub struct Module;

#[cfg(not(test))]
impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module table is only written by nginx while it loads modules, before any
        // callback of ours runs.
        unsafe { &*ptr::addr_of!(ngx_http_kylin_upstream_module) }
    }

    unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        crate::shm::reset_for_new_configuration();
        crate::phase::reset_for_new_configuration();
        // SAFETY: nginx calls preconfiguration with a valid cf at the start of the http block.
        unsafe { crate::variables::add_variables(cf) }
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // SAFETY: nginx calls postconfiguration with a valid cf inside the http block.
        let rc = unsafe { crate::directives::check_balancers(cf) };
        if !Status(rc).is_ok() {
            return rc;
        }
        // SAFETY: as above; adds the precontent handler that asks session stores.
        let rc = unsafe { crate::phase::install(cf) };
        // SAFETY: runs during configuration, before nginx creates shared zones.
        unsafe { crate::shm::size_load_zone() };
        rc
    }
}

#[cfg(not(test))]
// SAFETY: SrvConf is the type allocated by `create_srv_conf` for this module.
unsafe impl HttpModuleServerConf for Module {
    type ServerConf = conf::SrvConf;
}

#[cfg(not(test))]
static NGX_HTTP_KYLIN_UPSTREAM_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(Module::preconfiguration),
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: None,
    init_main_conf: None,
    create_srv_conf: Some(Module::create_srv_conf),
    merge_srv_conf: Some(Module::merge_srv_conf),
    create_loc_conf: None,
    merge_loc_conf: None,
};

#[cfg(not(test))]
/// `init_module`: nginx committed the new configuration (see `shm::commit_load_zone`).
unsafe extern "C" fn init_module(cycle: *mut ngx::ffi::ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx calls init_module with the new cycle, after creating its shared zones.
    unsafe { crate::shm::commit_load_zone(cycle) };
    Status::NGX_OK.into()
}

#[cfg(not(test))]
unsafe extern "C" fn init_process(cycle: *mut ngx::ffi::ngx_cycle_t) -> ngx_int_t {
    // nginx calls init_process in the cache manager and cache loader too
    // (ngx_cache_manager_process_cycle), where thread pools are not set up: background work
    // runs only in a worker (or the single process with `master_process off`), and in one of
    // them, since its results live in shared memory for all.
    // SAFETY: ngx_process and ngx_worker are set by nginx before it calls init_process and
    // are only read here, in the process's only thread.
    let (process, worker) = unsafe { (ngx::ffi::ngx_process, ngx::ffi::ngx_worker) };
    let background = matches!(process as u32, ngx::ffi::NGX_PROCESS_WORKER | ngx::ffi::NGX_PROCESS_SINGLE) && worker == 0;
    if !background {
        return Status::NGX_OK.into();
    }
    // SAFETY: nginx calls init_process with the process's cycle.
    unsafe { crate::background::start(cycle) }
}

#[cfg(not(test))]
unsafe extern "C" fn exit_process(_cycle: *mut ngx::ffi::ngx_cycle_t) {
    // SAFETY: nginx calls exit_process in the process's only thread, from its event loop's
    // end.
    unsafe { crate::background::stop() }
}

#[cfg(not(test))]
#[used]
#[allow(non_upper_case_globals)]
#[cfg_attr(not(feature = "export-modules"), no_mangle)]
pub static mut ngx_http_kylin_upstream_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(NGX_HTTP_KYLIN_UPSTREAM_MODULE_CTX) as _,
    init_module: Some(init_module),
    init_process: Some(init_process),
    exit_process: Some(exit_process),
    // SAFETY: taking the address of a static; nginx reads the table while parsing.
    commands: unsafe { ptr::addr_of_mut!(crate::directives::COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

// Generate the `ngx_modules` table with exported modules, so the cdylib loads with
// `load_module`.
#[cfg(all(feature = "export-modules", not(test)))]
ngx::ngx_modules!(ngx_http_kylin_upstream_module);
