//! Directives and configuration-time checks.
//!
//! `kylin_upstream NAME { ... }` (http level) declares an upstream group that uses the kylin
//! balancer. It reuses nginx's own `upstream` block handler, so every stock directive works
//! inside (`server` with all its parameters, `zone`, `keepalive`, ...): the upstream is
//! pre-created with the kylin balancer already installed, then the stock handler parses the
//! block into it. `keepalive` inside the block therefore wraps the kylin balancer, exactly as
//! it wraps `ip_hash`.
//!
//! `kylin;` inside a stock `upstream NAME { ... }` block selects the same balancer.
//!
//! Misuse is an `nginx -t` error naming the file and line: `kylin` twice (or inside
//! `kylin_upstream`), `kylin` after another balancing directive or after `keepalive`, and a
//! balancing directive (`ip_hash`, `hash`, `least_conn`, `random`) that replaced the kylin
//! balancer later in the block. nginx only warns about the last case ("load balancing method
//! redefined"); we detect it in postconfiguration, which runs after every upstream's
//! `init_upstream` (see `init_upstream_ran`).

use core::ffi::{c_char, c_void, CStr};
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_module_t, ngx_http_upstream_add,
    ngx_http_upstream_main_conf_t, ngx_http_upstream_module, ngx_http_upstream_srv_conf_t,
    ngx_int_t, ngx_module_t, ngx_str_t, ngx_uint_t, ngx_url_t, NGX_CONF_BLOCK, NGX_CONF_NOARGS,
    NGX_CONF_TAKE1, NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_MODULE,
    NGX_HTTP_SRV_CONF_OFFSET, NGX_HTTP_UPSTREAM_CREATE, NGX_HTTP_UPS_CONF, NGX_LOG_EMERG,
};
use ngx::http::{HttpModule, HttpModuleServerConf, Merge, MergeConfigError};
use ngx::{ngx_conf_log_error, ngx_log_error, ngx_string};

use crate::upstream::{self, UpstreamState};

/// Per-upstream configuration of this module (an `ngx_http_upstream_srv_conf_t` companion).
/// nginx also creates one for every `server {}` and the `http {}` level; those stay unused.
#[derive(Debug, Default)]
pub struct SrvConf {
    /// The kylin balancer was selected (`kylin_upstream` or `kylin`).
    pub enabled: bool,
    /// Our `init_upstream` ran: no other balancing method replaced us.
    pub init_upstream_ran: bool,
    /// Where the balancer was selected, for errors reported after parsing.
    pub file: Option<&'static CStr>,
    pub line: ngx_uint_t,
    /// Rings and peer tables; built at init or, with a `zone`, lazily in each worker.
    pub state: Option<Box<UpstreamState>>,
}

impl Merge for SrvConf {
    fn merge(&mut self, _prev: &SrvConf) -> Result<(), MergeConfigError> {
        Ok(())
    }
}

pub struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module table is only written by nginx while it loads modules, before any
        // callback of ours runs.
        unsafe { &*ptr::addr_of!(ngx_http_kylin_upstream_module) }
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // SAFETY: nginx calls postconfiguration with a valid cf inside the http block.
        unsafe { check_balancers(cf) }
    }
}

// SAFETY: SrvConf is the type allocated by `create_srv_conf` for this module.
unsafe impl HttpModuleServerConf for Module {
    type ServerConf = SrvConf;
}

static NGX_HTTP_KYLIN_UPSTREAM_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: None,
    init_main_conf: None,
    create_srv_conf: Some(Module::create_srv_conf),
    merge_srv_conf: Some(Module::merge_srv_conf),
    create_loc_conf: None,
    merge_loc_conf: None,
};

static mut NGX_HTTP_KYLIN_UPSTREAM_COMMANDS: [ngx_command_t; 3] = [
    ngx_command_t {
        name: ngx_string!("kylin_upstream"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_BLOCK | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(kylin_upstream_block),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("kylin"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(kylin_directive),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

#[used]
#[allow(non_upper_case_globals)]
#[cfg_attr(not(feature = "export-modules"), no_mangle)]
pub static mut ngx_http_kylin_upstream_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(NGX_HTTP_KYLIN_UPSTREAM_MODULE_CTX) as _,
    // SAFETY: taking the address of a static; nginx reads the table while parsing.
    commands: unsafe { ptr::addr_of_mut!(NGX_HTTP_KYLIN_UPSTREAM_COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

const CONF_OK: *mut c_char = ptr::null_mut();

fn conf_error() -> *mut c_char {
    ngx::core::NGX_CONF_ERROR as *mut c_char
}

/// The upstream whose `kylin_upstream` block is being parsed right now, so that `kylin`
/// inside it is reported as a duplicate. Configuration is parsed by one thread.
static PARSING_KYLIN_UPSTREAM: AtomicPtr<ngx_http_upstream_srv_conf_t> =
    AtomicPtr::new(ptr::null_mut());

/// Our configuration for an upstream, if the upstream has a block (`srv_conf`).
///
/// # Safety
/// `uscf` must be a valid upstream of the configuration being parsed or run.
pub unsafe fn srv_conf(uscf: *mut ngx_http_upstream_srv_conf_t) -> Option<&'static mut SrvConf> {
    // SAFETY: caller guarantees uscf is valid; srv_conf is NULL for implicit upstreams and
    // otherwise an array indexed by ctx_index holding our SrvConf.
    unsafe {
        let confs = (*uscf).srv_conf;
        if confs.is_null() {
            return None;
        }
        let p = *confs.add(Module::module().ctx_index) as *mut SrvConf;
        p.as_mut()
    }
}

/// The current configuration file and line, for messages emitted after parsing.
unsafe fn conf_position(cf: *mut ngx_conf_t) -> (Option<&'static CStr>, ngx_uint_t) {
    // SAFETY: cf is valid during parsing; conf_file names are NUL-terminated strings that live
    // in the cycle pool, as long as the configuration.
    unsafe {
        let file = (*cf).conf_file;
        if file.is_null() || (*file).file.name.data.is_null() {
            return (None, 0);
        }
        (Some(CStr::from_ptr((*file).file.name.data as *const c_char)), (*file).line)
    }
}

/// The stock `upstream` block handler of ngx_http_upstream_module.
unsafe fn stock_upstream_command() -> Option<&'static ngx_command_t> {
    // SAFETY: ngx_http_upstream_module is a static module whose command table ends with an
    // entry of zero-length name.
    unsafe {
        let mut cmd = ngx_http_upstream_module.commands;
        while !cmd.is_null() && (*cmd).name.len != 0 {
            if (*cmd).name.as_bytes() == b"upstream" {
                return Some(&*cmd);
            }
            cmd = cmd.add(1);
        }
        None
    }
}

/// Whether an upstream block named `name` was already declared (nginx will say "duplicate").
unsafe fn upstream_block_exists(cf: *mut ngx_conf_t, name: &[u8]) -> bool {
    // SAFETY: cf is valid at http level; the upstream main conf holds an array of pointers.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t;
        let umcf = *(*ctx).main_conf.add(ngx_http_upstream_module.ctx_index)
            as *mut ngx_http_upstream_main_conf_t;
        if umcf.is_null() {
            return false;
        }
        let ups: &[*mut ngx_http_upstream_srv_conf_t] = (*umcf).upstreams.as_slice();
        ups.iter().any(|&u| {
            (*u).flags & NGX_HTTP_UPSTREAM_CREATE as ngx_uint_t != 0
                && (*u).host.as_bytes().eq_ignore_ascii_case(name)
        })
    }
}

/// `kylin_upstream NAME { ... }`
unsafe extern "C" fn kylin_upstream_block(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes a valid cf whose args hold the directive name and one argument.
    let name: ngx_str_t = unsafe { (*cf).args.as_ref().map(|a| a.as_slice::<ngx_str_t>()[1]) }
        .unwrap_or_default();
    let bytes = name.as_bytes();

    if bytes.is_empty() || bytes.iter().any(|&c| c == b':' || c == b'/') {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "invalid upstream name \"{}\" in \"kylin_upstream\": a name may not contain \":\" or \"/\"",
            name
        );
        return conf_error();
    }

    // SAFETY: reading a static command table.
    let Some(stock) = (unsafe { stock_upstream_command() }).and_then(|c| c.set) else {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "nginx's \"upstream\" directive was not found");
        return conf_error();
    };

    // SAFETY: cf is valid while parsing.
    let (file, line) = unsafe { conf_position(cf) };

    // Pre-create the upstream with our balancer installed, so that directives inside the
    // block (keepalive) see it. If a block of this name exists, the stock handler reports it.
    let mut uscf = ptr::null_mut();
    // SAFETY: cf is valid; name points into the configuration buffer.
    if !unsafe { upstream_block_exists(cf, bytes) } {
        // SAFETY: a zeroed ngx_url_t is its documented initial state.
        let mut u: ngx_url_t = unsafe { core::mem::zeroed() };
        u.url = name;
        u.set_no_resolve(1);
        u.set_no_port(1);
        // SAFETY: cf and u are valid; flags 0 looks up or adds an implicit upstream.
        uscf = unsafe { ngx_http_upstream_add(cf, &mut u, 0) };
        if uscf.is_null() {
            return conf_error();
        }
        // SAFETY: uscf was just returned by nginx.
        unsafe { (*uscf).peer.init_upstream = Some(upstream::init_upstream) };
    }

    PARSING_KYLIN_UPSTREAM.store(uscf, Ordering::Relaxed);
    // SAFETY: the stock handler parses the block with the same cf/cmd; conf is unused by it.
    let rv = unsafe { stock(cf, cmd, conf) };
    PARSING_KYLIN_UPSTREAM.store(ptr::null_mut(), Ordering::Relaxed);

    if rv != CONF_OK || uscf.is_null() {
        return rv;
    }

    // SAFETY: the stock handler created the block's srv_conf array for this upstream.
    match unsafe { srv_conf(uscf) } {
        Some(kcf) => {
            kcf.enabled = true;
            kcf.file = file;
            kcf.line = line;
            CONF_OK
        }
        None => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upstream \"{}\" has no configuration", name);
            conf_error()
        }
    }
}

/// `kylin;` inside `upstream NAME { ... }`
unsafe extern "C" fn kylin_directive(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: conf is this module's SrvConf of the enclosing upstream block.
    let kcf = unsafe { &mut *(conf as *mut SrvConf) };
    // SAFETY: inside an upstream block the upstream module's srv conf is the upstream itself.
    let uscf = unsafe {
        let ctx = (*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t;
        *(*ctx).srv_conf.add(ngx_http_upstream_module.ctx_index) as *mut ngx_http_upstream_srv_conf_t
    };

    if kcf.enabled {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"kylin\" directive is duplicate");
        return conf_error();
    }
    if !uscf.is_null() && PARSING_KYLIN_UPSTREAM.load(Ordering::Relaxed) == uscf {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"kylin\" directive is duplicate: \"kylin_upstream\" already selects the kylin balancer"
        );
        return conf_error();
    }
    // SAFETY: uscf is valid inside the block.
    if !uscf.is_null() && unsafe { (*uscf).peer.init_upstream.is_some() } {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"kylin\" must be the first load balancing directive of the block: it cannot be combined with \"ip_hash\", \"hash\", \"least_conn\" or \"random\", and \"keepalive\" must follow it"
        );
        return conf_error();
    }

    // SAFETY: cf is valid while parsing.
    let (file, line) = unsafe { conf_position(cf) };
    kcf.enabled = true;
    kcf.file = file;
    kcf.line = line;
    if !uscf.is_null() {
        // SAFETY: uscf is valid inside the block.
        unsafe { (*uscf).peer.init_upstream = Some(upstream::init_upstream) };
    }
    CONF_OK
}

/// Fails the configuration when another balancing directive replaced the kylin balancer.
/// Runs after every upstream's `init_upstream` (init_main_conf precedes postconfiguration).
unsafe fn check_balancers(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: cf is the http block's configuration context.
    let ups: &[*mut ngx_http_upstream_srv_conf_t] = unsafe {
        let ctx = (*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t;
        let umcf = *(*ctx).main_conf.add(ngx_http_upstream_module.ctx_index)
            as *mut ngx_http_upstream_main_conf_t;
        if umcf.is_null() {
            return ngx::ffi::NGX_OK as ngx_int_t;
        }
        (*umcf).upstreams.as_slice()
    };
    for &uscf in ups {
        // SAFETY: every element is a valid upstream.
        let Some(kcf) = (unsafe { srv_conf(uscf) }) else { continue };
        if kcf.enabled && !kcf.init_upstream_ran {
            // SAFETY: uscf is valid.
            let host = unsafe { (*uscf).host };
            let file = kcf.file.map(|f| f.to_string_lossy()).unwrap_or_default();
            // SAFETY: cf->log is valid.
            ngx_log_error!(
                NGX_LOG_EMERG,
                unsafe { (*cf).log },
                "another load balancing method replaces \"kylin\" in upstream \"{}\": use only one of \"kylin\", \"ip_hash\", \"hash\", \"least_conn\", \"random\" in {}:{}",
                host,
                file,
                kcf.line
            );
            return ngx::ffi::NGX_ERROR as ngx_int_t;
        }
    }
    ngx::ffi::NGX_OK as ngx_int_t
}
