//! The module's configuration: [`SrvConf`], one per upstream, what each directive set (the
//! directives themselves are parsed in `directives`), its defaults, and how the glue finds it
//! ([`srv_conf`] at run time, shared; [`srv_conf_mut`] while parsing; [`kylin_upstreams`]).
//! After configuration nothing writes to it but its per-process caches ([`crate::ngx_ext::ProcessLocal`],
//! `Cell`).

use core::ffi::{c_void, CStr};
use core::ptr;

use ngx::ffi::{
    ngx_http_complex_value_t, ngx_http_upstream_main_conf_t, ngx_http_upstream_module, ngx_http_upstream_srv_conf_t,
    ngx_shm_zone_t, ngx_uint_t,
};
use ngx::http::{HttpModule, Merge, MergeConfigError};

use crate::balancer::Balance;
use crate::tables::Tables;
use crate::Module;

/// Per-upstream configuration of this module (an `ngx_http_upstream_srv_conf_t` companion).
/// nginx also creates one for every `server {}` and the `http {}` level; those stay unused.
#[derive(Debug)]
pub struct SrvConf {
    /// The kylin balancer was selected (`kylin_upstream` or `kylin`).
    pub enabled: bool,
    /// Our `init_upstream` ran: no other balancing method replaced us.
    pub init_upstream_ran: bool,
    /// Where the balancer was selected, for errors reported after parsing.
    pub file: Option<&'static CStr>,
    pub line: ngx_uint_t,
    /// Rings and peer tables; built at init or, with a `zone`, lazily in each worker.
    pub tables: Tables,
    /// The upstream's in-flight total slot, as the tables in use found it: for `free`, which
    /// then need not borrow the tables.
    pub total: core::cell::Cell<Option<&'static crate::load::Slot>>,

    /// `kylin_hash`: the stickiness key; the client address when unset.
    pub hash: Option<*mut ngx_http_complex_value_t>,
    /// `kylin_balance`; `None` until set (see [`SrvConf::balance`]).
    pub balance: Option<crate::balancer::Balance>,
    /// `kylin_balance_factor` in thousandths; `None` until set (default
    /// [`DEFAULT_BALANCE_FACTOR`]), `Some(0)` for `off`.
    pub balance_factor: Option<u32>,
    /// The upstream's client placement zone (`kylin_balance clients`).
    pub placement_zone: Option<*mut ngx_shm_zone_t>,
    /// `kylin_session_cookie`; default `JSESSIONID`.
    pub session_cookie: Option<Vec<u8>>,
    /// `kylin_session_routes zone=`; the default zone when unset.
    pub routes_zone: Option<*mut ngx_shm_zone_t>,
    /// `kylin_session_routes timeout=`, seconds.
    pub routes_timeout: Option<i64>,
    /// The first kylin_* option directive of the block, to reject it without `kylin`.
    pub option_seen: Option<(&'static str, Option<&'static CStr>, ngx_uint_t)>,
    /// `kylin_session_store`; `None` when not set here (the http-level setting applies).
    pub store: Option<crate::store::StoreMode>,
    /// The shared verdict cache of a Redis store.
    pub cache_zone: Option<*mut ngx_shm_zone_t>,
    /// The store's slot key in the load zone (circuit breaker and statistics).
    pub store_key: u64,
    /// The module-wide load zone.
    pub load_zone: *mut ngx_shm_zone_t,
    /// The upstream's name.
    pub name: Vec<u8>,
    /// Per-worker caches of this upstream's session key derivation in the routes zone and in
    /// the store's verdict cache zone (see `shm::session_key`).
    pub routes_keyer: core::cell::Cell<Option<crate::session::SessionKeyer>>,
    pub cache_keyer: core::cell::Cell<Option<crate::session::SessionKeyer>>,
    /// The routes this worker found in the routes zone this second (empty until
    /// `init_upstream`).
    pub recent_routes: crate::routes::RecentRoutes,
    /// `kylin_health_check`, and where it was written (for the `zone` check after parsing).
    pub health: Option<crate::health::CheckConf>,
    pub health_at: (Option<&'static CStr>, ngx_uint_t),
    /// `kylin_slow_start`, ms.
    pub slow_start_ms: Option<u64>,
    /// `kylin_load_report`, and where it was written (for the `zone` check after parsing).
    pub load_report: Option<crate::load_report::ReportConf>,
    pub load_report_at: (Option<&'static CStr>, ngx_uint_t),
    /// What `peer.get` reads of the above on every request, resolved once by `init_upstream`.
    pub run: Resolved,
}

/// The settings `peer.get` needs on every request, resolved by `init_upstream` once the
/// http-level store is inherited and the default balance settled (from [`SrvConf::balance`],
/// [`SrvConf::balance_factor`], [`SrvConf::node_local_sessions`] and the health check).
#[derive(Clone, Copy, Debug)]
pub struct Resolved {
    pub balance: Balance,
    pub balance_factor: u32,
    pub node_local_sessions: bool,
    /// The availability rules without the slow start (added per request).
    pub gate: crate::health::Gate,
}

impl Default for SrvConf {
    fn default() -> SrvConf {
        SrvConf {
            enabled: false,
            init_upstream_ran: false,
            file: None,
            line: 0,
            tables: Tables::default(),
            total: core::cell::Cell::new(None),
            hash: None,
            balance: None,
            balance_factor: None,
            placement_zone: None,
            session_cookie: None,
            routes_zone: None,
            routes_timeout: None,
            option_seen: None,
            store: None,
            cache_zone: None,
            store_key: 0,
            load_zone: ptr::null_mut(),
            name: Vec::new(),
            routes_keyer: core::cell::Cell::new(None),
            cache_keyer: core::cell::Cell::new(None),
            recent_routes: crate::routes::RecentRoutes::default(),
            health: None,
            health_at: (None, 0),
            slow_start_ms: None,
            load_report: None,
            load_report_at: (None, 0),
            run: Resolved { balance: DEFAULT_BALANCE, balance_factor: 0, node_local_sessions: true, gate: crate::health::Gate::new(false, false) },
        }
    }
}

/// Default `kylin_balance`; see README "Choosing what moves".
pub const DEFAULT_BALANCE: Balance = Balance::Clients;
/// Default `kylin_balance_factor` (1.25), in thousandths; see README "Choosing what moves".
pub const DEFAULT_BALANCE_FACTOR: u32 = 1250;
/// Default `kylin_session_cookie`.
pub const DEFAULT_SESSION_COOKIE: &[u8] = b"JSESSIONID";
/// Default idle timeout of learned routes: Kylin's own session timeout, 8 hours.
pub const DEFAULT_ROUTES_TIMEOUT: i64 = 8 * 3600;

impl SrvConf {
    /// What moves (`kylin_balance`): as set; else `requests` (or `off`) when only
    /// `kylin_balance_factor` is set, as before `kylin_balance` existed; else
    /// [`DEFAULT_BALANCE`].
    pub fn balance(&self) -> Balance {
        match (self.balance, self.balance_factor) {
            (Some(b), _) => b,
            (None, Some(0)) => Balance::Off,
            (None, Some(_)) => Balance::Requests,
            (None, None) => DEFAULT_BALANCE,
        }
    }

    /// The request-level bound in effect, thousandths: 0 (off) unless requests are balanced.
    pub fn balance_factor(&self) -> u32 {
        match self.balance() {
            Balance::Requests => self.balance_factor.unwrap_or(DEFAULT_BALANCE_FACTOR),
            Balance::Clients | Balance::Off => 0,
        }
    }

    pub fn session_cookie(&self) -> &[u8] {
        self.session_cookie.as_deref().unwrap_or(DEFAULT_SESSION_COOKIE)
    }

    pub fn routes_timeout(&self) -> i64 {
        self.routes_timeout.unwrap_or(DEFAULT_ROUTES_TIMEOUT)
    }

    /// The session store in effect; `None` when off.
    pub fn store_mode(&self) -> Option<&crate::store::StoreMode> {
        self.store.as_ref().filter(|m| **m != crate::store::StoreMode::Off)
    }

    /// Sessions are node-local: no session store can say one is shared
    /// ([`crate::placement::Params::local_sessions`]).
    pub fn node_local_sessions(&self) -> bool {
        self.store_mode().is_none()
    }

    /// The settings `peer.get` reads on every request, as this configuration gives them.
    pub fn resolve(&mut self) {
        self.run = Resolved {
            balance: self.balance(),
            balance_factor: self.balance_factor(),
            node_local_sessions: self.node_local_sessions(),
            gate: crate::health::Gate::new(self.health.is_some(), self.health.as_ref().is_some_and(|h| h.mandatory)),
        };
    }

    /// Takes the http-level `kylin_session_store` if this upstream sets none.
    pub fn inherit_store(&mut self, http: &SrvConf) {
        if self.store.is_none() {
            self.store = http.store.clone();
            self.cache_zone = http.cache_zone;
            self.store_key = http.store_key;
        }
    }
}

impl Merge for SrvConf {
    fn merge(&mut self, _prev: &SrvConf) -> Result<(), MergeConfigError> {
        Ok(())
    }
}

/// Our configuration for an upstream, if the upstream has a block (`srv_conf`), for reading
/// at run time.
///
/// # Safety
/// `uscf` must be a valid upstream of the configuration being run (or parsed).
pub unsafe fn srv_conf(uscf: *mut ngx_http_upstream_srv_conf_t) -> Option<&'static SrvConf> {
    // SAFETY: the caller's contract; see srv_conf_ptr.
    unsafe { srv_conf_ptr(uscf).as_ref() }
}

/// ... for writing, while the configuration is parsed (`init_upstream`, the block handler):
/// no reference from [`srv_conf`] exists then.
///
/// # Safety
/// `uscf` must be a valid upstream of the configuration being parsed, and no other
/// reference to its configuration alive.
pub unsafe fn srv_conf_mut(uscf: *mut ngx_http_upstream_srv_conf_t) -> Option<&'static mut SrvConf> {
    // SAFETY: the caller's contract; see srv_conf_ptr.
    unsafe { srv_conf_ptr(uscf).as_mut() }
}

unsafe fn srv_conf_ptr(uscf: *mut ngx_http_upstream_srv_conf_t) -> *mut SrvConf {
    // SAFETY: the caller guarantees uscf is valid; srv_conf is NULL for implicit upstreams
    // and otherwise an array indexed by ctx_index holding our SrvConf.
    unsafe {
        let confs = (*uscf).srv_conf;
        if confs.is_null() {
            return ptr::null_mut();
        }
        *confs.add(Module::module().ctx_index) as *mut SrvConf
    }
}

/// Every upstream of an http configuration (`main_conf`: its main_conf array, as in a
/// request or the http block's context), kylin or not.
///
/// # Safety
/// `main_conf` is the main_conf array of a configuration that lives for `'a`.
pub unsafe fn upstreams<'a>(main_conf: *mut *mut c_void) -> &'a [*mut ngx_http_upstream_srv_conf_t] {
    // SAFETY: the caller's contract; the upstream module's main conf holds the list.
    unsafe {
        let umcf = *main_conf.add(ngx_http_upstream_module.ctx_index) as *mut ngx_http_upstream_main_conf_t;
        umcf.as_ref().map_or(&[], |u| u.upstreams.as_slice())
    }
}

/// The upstreams that use the kylin balancer, with their configuration.
///
/// # Safety
/// As for [`upstreams`], with a configuration that lives as long as the process.
pub unsafe fn kylin_upstreams(main_conf: *mut *mut c_void) -> impl Iterator<Item = (*mut ngx_http_upstream_srv_conf_t, &'static SrvConf)> {
    // SAFETY: the caller's contract; every element is a valid upstream.
    unsafe { upstreams(main_conf) }.iter().filter_map(|&u| {
        // SAFETY: as above.
        let kcf = unsafe { srv_conf(u) }?;
        (kcf.enabled && kcf.init_upstream_ran).then_some((u, kcf))
    })
}

/// The http main_conf array of a running cycle, if it has an http block.
///
/// # Safety
/// `cycle` is the process's cycle.
pub unsafe fn cycle_main_conf(cycle: *mut ngx::ffi::ngx_cycle_t) -> Option<*mut *mut c_void> {
    // SAFETY: the cycle's conf_ctx has an entry per core module; http's is its conf ctx.
    unsafe {
        let http = *(*cycle).conf_ctx.add(ngx::ffi::ngx_http_module.index) as *mut ngx::ffi::ngx_http_conf_ctx_t;
        http.as_ref().map(|h| h.main_conf)
    }
}
