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
//!
//! The values are parsed by the pure modules (`balancer::parse_factor`, `store::parse_store`,
//! `health::parse_params`, ...); the handlers here only check placement and store them.

use ngx::core::Status;
use core::ffi::{c_char, c_void, CStr};
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_complex_value_t, ngx_http_upstream_add, ngx_http_upstream_module, ngx_http_upstream_srv_conf_t,
    ngx_http_compile_complex_value, ngx_http_compile_complex_value_t, ngx_int_t, ngx_parse_size, ngx_parse_time,
    ngx_pcalloc, ngx_str_t, ngx_uint_t, ngx_url_t, NGX_ERROR, NGX_CONF_BLOCK, NGX_CONF_NOARGS, NGX_CONF_1MORE,
    NGX_CONF_ANY, NGX_CONF_TAKE1, NGX_CONF_TAKE12, NGX_HTTP_LOC_CONF, NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET,
    NGX_HTTP_SRV_CONF_OFFSET, NGX_HTTP_UPSTREAM_CREATE, NGX_HTTP_UPS_CONF, NGX_LOG_EMERG,
};

use ngx::{ngx_conf_log_error, ngx_log_error, ngx_string};

use crate::balancer::Balance;
use crate::conf::{srv_conf, srv_conf_mut, upstreams, SrvConf};

/// A directive's entry: `conf` is where its configuration is (`NGX_HTTP_SRV_CONF_OFFSET` for
/// the upstream's [`SrvConf`]), `set` its handler.
const fn command(
    name: ngx_str_t,
    type_: u32,
    conf: ngx_uint_t,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
) -> ngx_command_t {
    ngx_command_t { name, type_: type_ as ngx_uint_t, set: Some(set), conf, offset: 0, post: ptr::null_mut() }
}

/// The module's directives.
pub static mut COMMANDS: [ngx_command_t; 13] = [
    command(ngx_string!("kylin_upstream"), NGX_HTTP_MAIN_CONF | NGX_CONF_BLOCK | NGX_CONF_TAKE1, NGX_HTTP_MAIN_CONF_OFFSET, kylin_upstream_block),
    command(ngx_string!("kylin"), NGX_HTTP_UPS_CONF | NGX_CONF_NOARGS, NGX_HTTP_SRV_CONF_OFFSET, kylin_directive),
    command(ngx_string!("kylin_hash"), NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1, NGX_HTTP_SRV_CONF_OFFSET, kylin_hash),
    command(ngx_string!("kylin_balance"), NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1, NGX_HTTP_SRV_CONF_OFFSET, kylin_balance),
    command(ngx_string!("kylin_balance_factor"), NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1, NGX_HTTP_SRV_CONF_OFFSET, kylin_balance_factor),
    command(ngx_string!("kylin_session_cookie"), NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1, NGX_HTTP_SRV_CONF_OFFSET, kylin_session_cookie),
    command(ngx_string!("kylin_session_store"), NGX_HTTP_MAIN_CONF | NGX_HTTP_UPS_CONF | NGX_CONF_1MORE, NGX_HTTP_SRV_CONF_OFFSET, kylin_session_store),
    command(ngx_string!("kylin_status"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1, 0, kylin_status),
    command(ngx_string!("kylin_session_routes"), NGX_HTTP_UPS_CONF | NGX_CONF_TAKE12, NGX_HTTP_SRV_CONF_OFFSET, kylin_session_routes),
    command(ngx_string!("kylin_health_check"), NGX_HTTP_UPS_CONF | NGX_CONF_ANY, NGX_HTTP_SRV_CONF_OFFSET, kylin_health_check),
    command(ngx_string!("kylin_load_report"), NGX_HTTP_UPS_CONF | NGX_CONF_ANY, NGX_HTTP_SRV_CONF_OFFSET, kylin_load_report),
    command(ngx_string!("kylin_slow_start"), NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1, NGX_HTTP_SRV_CONF_OFFSET, kylin_slow_start),
    ngx_command_t::empty(),
];

const CONF_OK: *mut c_char = ptr::null_mut();

fn conf_error() -> *mut c_char {
    ngx::core::NGX_CONF_ERROR as *mut c_char
}

/// The upstream whose `kylin_upstream` block is being parsed right now, so that `kylin`
/// inside it is reported as a duplicate. Configuration is parsed by one thread.
static PARSING_KYLIN_UPSTREAM: AtomicPtr<ngx_http_upstream_srv_conf_t> =
    AtomicPtr::new(ptr::null_mut());


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
        let ups = upstreams((*((*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t)).main_conf);
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
        unsafe { (*uscf).peer.init_upstream = Some(crate::peer::init_upstream) };
    }

    PARSING_KYLIN_UPSTREAM.store(uscf, Ordering::Relaxed);
    // SAFETY: the stock handler parses the block with the same cf/cmd; conf is unused by it.
    let rv = unsafe { stock(cf, cmd, conf) };
    PARSING_KYLIN_UPSTREAM.store(ptr::null_mut(), Ordering::Relaxed);

    if rv != CONF_OK || uscf.is_null() {
        return rv;
    }

    // SAFETY: the stock handler created the block's srv_conf array for this upstream.
    match unsafe { srv_conf_mut(uscf) } {
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
        // Another balancing method, or a directive that wraps the balancer when it is read
        // (and that kylin would replace): `keepalive` before 1.29.7, `sticky` since 1.29.6.
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"kylin\" must be the first load balancing directive of the block: it cannot be combined with {}, and {} must follow it",
            OTHER_METHODS,
            FOLLOWERS
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
        unsafe { (*uscf).peer.init_upstream = Some(crate::peer::init_upstream) };
    }
    CONF_OK
}

/// nginx's other load balancing methods, for messages (`least_time` since 1.31.0).
#[cfg(not(nginx1_31_0))]
const OTHER_METHODS: &str = "\"ip_hash\", \"hash\", \"least_conn\", \"random\"";
#[cfg(nginx1_31_0)]
const OTHER_METHODS: &str = "\"ip_hash\", \"hash\", \"least_conn\", \"least_time\", \"random\"";

/// The directives that must follow `kylin;` because they wrap the balancer when they are
/// read: `keepalive` until 1.29.7 made it the default (wrapping every balancer once the
/// configuration is read), `sticky` since 1.29.6.
#[cfg(not(nginx1_29_6))]
const FOLLOWERS: &str = "\"keepalive\"";
#[cfg(all(nginx1_29_6, not(nginx1_29_7)))]
const FOLLOWERS: &str = "\"keepalive\" and \"sticky\"";
#[cfg(nginx1_29_7)]
const FOLLOWERS: &str = "\"sticky\"";

/// Fails the configuration when another balancing directive replaced the kylin balancer.
/// Runs after every upstream's `init_upstream` (init_main_conf precedes postconfiguration).
pub unsafe fn check_balancers(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: cf is the http block's configuration context.
    let ups = unsafe { upstreams((*((*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t)).main_conf) };
    for &uscf in ups {
        // SAFETY: every element is a valid upstream.
        let Some(kcf) = (unsafe { srv_conf(uscf) }) else { continue };
        if let (false, Some((directive, file, line))) = (kcf.enabled, kcf.option_seen) {
            // SAFETY: uscf is valid.
            let host = unsafe { (*uscf).host };
            let file = file.map(|f| f.to_string_lossy()).unwrap_or_default();
            ngx_log_error!(
                NGX_LOG_EMERG,
                // SAFETY: cf->log is valid during configuration.
                unsafe { (*cf).log },
                "\"{}\" needs the kylin balancer: add \"kylin;\" to upstream \"{}\" or declare it with \"kylin_upstream\" in {}:{}",
                directive,
                host,
                file,
                line
            );
            return Status::NGX_ERROR.into();
        }
        // SAFETY: uscf is valid.
        if kcf.enabled && kcf.health.is_some() && unsafe { (*uscf).shm_zone.is_null() } {
            // SAFETY: uscf is valid.
            let host = unsafe { (*uscf).host };
            let (file, line) = kcf.health_at;
            ngx_log_error!(
                NGX_LOG_EMERG,
                // SAFETY: cf is the http block's configuration; its log lives as long as cf.
                unsafe { (*cf).log },
                "\"kylin_health_check\" requires \"zone\" in upstream \"{}\" (health states are shared by all worker processes) in {}:{}",
                host,
                file.map(|f| f.to_string_lossy()).unwrap_or_default(),
                line
            );
            return Status::NGX_ERROR.into();
        }
        // SAFETY: cf and uscf are valid.
        if unsafe { !load_report_needs_zone(cf, uscf, kcf) } {
            return Status::NGX_ERROR.into();
        }
        if kcf.enabled && !kcf.init_upstream_ran {
            // SAFETY: uscf is valid.
            let host = unsafe { (*uscf).host };
            let file = kcf.file.map(|f| f.to_string_lossy()).unwrap_or_default();
            ngx_log_error!(
                NGX_LOG_EMERG,
                // SAFETY: cf is the http block's configuration; its log lives as long as cf.
                unsafe { (*cf).log },
                "another load balancing method replaces \"kylin\" in upstream \"{}\": use only one of \"kylin\", {} in {}:{}",
                host,
                OTHER_METHODS,
                file,
                kcf.line
            );
            return Status::NGX_ERROR.into();
        }
    }
    Status::NGX_OK.into()
}

// -------------------------------------------------------------------------------------------
// Option directives (inside an upstream block that uses the kylin balancer)

/// The directive's arguments (name first).
unsafe fn args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: nginx sets cf->args to the directive's words while calling its handler.
    unsafe { (*cf).args.as_ref().map(|a| a.as_slice::<ngx_str_t>()).unwrap_or(&[]) }
}

/// The start of an option directive's handler: its upstream's configuration, with the
/// directive's position recorded; `None` (after logging) if the directive is a duplicate
/// (`already`).
///
/// # Safety
/// `cf` is the directive's, `conf` this module's SrvConf of the enclosing upstream block.
unsafe fn option<'a>(cf: *mut ngx_conf_t, conf: *mut c_void, directive: &'static str, already: impl FnOnce(&SrvConf) -> bool) -> Option<&'a mut SrvConf> {
    // SAFETY: the caller's contract.
    let kcf = unsafe { &mut *(conf as *mut SrvConf) };
    let dup = already(kcf);
    // SAFETY: cf is valid while parsing.
    unsafe { note_option(cf, kcf, directive, dup) }.then_some(kcf)
}

/// Records an option directive's position; `false` (after logging) if it is a duplicate.
unsafe fn note_option(cf: *mut ngx_conf_t, kcf: &mut SrvConf, directive: &'static str, already: bool) -> bool {
    if already {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"{}\" directive is duplicate", directive);
        return false;
    }
    if kcf.option_seen.is_none() {
        // SAFETY: cf is valid while parsing.
        let (file, line) = unsafe { conf_position(cf) };
        kcf.option_seen = Some((directive, file, line));
    }
    true
}

/// `kylin_hash key;`
unsafe extern "C" fn kylin_hash(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: nginx passes the directive's cf and this module's SrvConf of its upstream block.
    let Some(kcf) = (unsafe { option(cf, conf, "kylin_hash", |k| k.hash.is_some()) }) else { return conf_error() };
    // SAFETY: cf args hold the directive and one value.
    let mut value = unsafe { args(cf) }.get(1).copied().unwrap_or_default();
    if value.is_empty() {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "empty key in \"kylin_hash\" directive");
        return conf_error();
    }
    // SAFETY: allocating from the configuration pool; a zeroed ccv is its initial state.
    unsafe {
        let cv = ngx_pcalloc((*cf).pool, core::mem::size_of::<ngx_http_complex_value_t>()) as *mut ngx_http_complex_value_t;
        if cv.is_null() {
            return conf_error();
        }
        let mut ccv: ngx_http_compile_complex_value_t = core::mem::zeroed();
        ccv.cf = cf;
        ccv.value = &mut value;
        ccv.complex_value = cv;
        if !Status(ngx_http_compile_complex_value(&mut ccv)).is_ok() {
            return conf_error();
        }
        kcf.hash = Some(cv);
    }
    CONF_OK
}

/// The error for a `kylin_balance_factor` that cannot apply (a number with `kylin_balance`
/// other than `requests`); `None` if the two agree.
fn factor_conflict(kcf: &SrvConf) -> Option<&'static str> {
    match (kcf.balance, kcf.balance_factor) {
        (Some(b @ (Balance::Clients | Balance::Off)), Some(f)) if f > 0 => Some(b.as_str()),
        _ => None,
    }
}

/// `kylin_balance clients | requests | off;`
unsafe extern "C" fn kylin_balance(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: nginx passes the directive's cf and this module's SrvConf of its upstream block.
    let Some(kcf) = (unsafe { option(cf, conf, "kylin_balance", |k| k.balance.is_some()) }) else { return conf_error() };
    // SAFETY: cf args hold the directive and one value.
    let value = unsafe { args(cf) }.get(1).copied().unwrap_or_default();
    kcf.balance = match value.as_bytes() {
        b"clients" => Some(Balance::Clients),
        b"requests" => Some(Balance::Requests),
        b"off" => Some(Balance::Off),
        _ => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "invalid value \"{}\" in \"kylin_balance\" directive: it must be \"clients\", \"requests\" or \"off\"", value);
            return conf_error();
        }
    };
    if let Some(b) = factor_conflict(kcf) {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"kylin_balance {}\" cannot be used with \"kylin_balance_factor\", which bounds requests: use \"kylin_balance requests\" or remove \"kylin_balance_factor\"", b);
        return conf_error();
    }
    CONF_OK
}

/// `kylin_balance_factor number | off;`
unsafe extern "C" fn kylin_balance_factor(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: nginx passes the directive's cf and this module's SrvConf of its upstream block.
    let Some(kcf) = (unsafe { option(cf, conf, "kylin_balance_factor", |k| k.balance_factor.is_some()) }) else { return conf_error() };
    // SAFETY: cf args hold the directive and one value.
    let value = unsafe { args(cf) }.get(1).copied().unwrap_or_default();
    match crate::balancer::parse_factor(value.as_bytes()) {
        Some(m) => {
            kcf.balance_factor = Some(m);
            if let Some(b) = factor_conflict(kcf) {
                ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"kylin_balance_factor\" cannot be used with \"kylin_balance {}\": it bounds requests, which only \"kylin_balance requests\" moves", b);
                return conf_error();
            }
            CONF_OK
        }
        None => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{}\" in \"kylin_balance_factor\" directive: it must be a number greater than 1 and at most 100 with up to three decimals (for example 1.25), or \"off\"",
                value
            );
            conf_error()
        }
    }
}

/// `kylin_session_cookie name;`
unsafe extern "C" fn kylin_session_cookie(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: nginx passes the directive's cf and this module's SrvConf of its upstream block.
    let Some(kcf) = (unsafe { option(cf, conf, "kylin_session_cookie", |k| k.session_cookie.is_some()) }) else { return conf_error() };
    // SAFETY: cf args hold the directive and one value.
    let value = unsafe { args(cf) }.get(1).copied().unwrap_or_default();
    if !crate::session::valid_name(value.as_bytes()) {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "invalid cookie name \"{}\" in \"kylin_session_cookie\" directive: expected 1 to {} letters, digits or !#$%&'*+-.^_`|~",
            value,
            crate::session::MAX_NAME_LEN
        );
        return conf_error();
    }
    kcf.session_cookie = Some(value.as_bytes().to_vec());
    CONF_OK
}

/// `kylin_session_routes zone=name:size [timeout=time];`
unsafe extern "C" fn kylin_session_routes(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: nginx passes the directive's cf and this module's SrvConf of its upstream block.
    let Some(kcf) = (unsafe { option(cf, conf, "kylin_session_routes", |k| k.routes_zone.is_some()) }) else { return conf_error() };
    let mut zone: Option<(ngx_str_t, usize)> = None;
    let mut timeout = None;
    // SAFETY: cf args hold the directive and its parameters.
    for v in unsafe { args(cf) }.iter().skip(1) {
        let b = v.as_bytes();
        if let Some(rest) = v.strip_prefix("zone=") {
            let rb = rest.as_bytes();
            let Some(colon) = rb.iter().rposition(|&c| c == b':') else {
                ngx_conf_log_error!(NGX_LOG_EMERG, cf, "invalid zone \"{}\" in \"kylin_session_routes\": expected zone=name:size", v);
                return conf_error();
            };
            let (Some((name, size)), true) = (rest.split_at(colon), colon > 0) else {
                ngx_conf_log_error!(NGX_LOG_EMERG, cf, "invalid zone \"{}\" in \"kylin_session_routes\": expected zone=name:size", v);
                return conf_error();
            };
            // SAFETY: `size` starts with the ':' found above, so skipping one byte stays inside.
            let mut size = ngx_str_t { len: size.len - 1, data: unsafe { size.data.add(1) } };
            // SAFETY: size is a valid ngx_str_t into the configuration buffer.
            let n = unsafe { ngx_parse_size(&mut size) };
            if n == NGX_ERROR as isize || (n as usize) < crate::shm::MIN_ROUTES_SIZE {
                ngx_conf_log_error!(
                    NGX_LOG_EMERG,
                    cf,
                    "invalid zone size \"{}\" in \"kylin_session_routes\": it must be at least {}k",
                    size,
                    crate::shm::MIN_ROUTES_SIZE / 1024
                );
                return conf_error();
            }
            zone = Some((name, n as usize));
        } else if let Some(rest) = v.strip_prefix("timeout=") {
            let mut t = rest;
            // SAFETY: t is a valid ngx_str_t into the configuration buffer.
            let secs = unsafe { ngx_parse_time(&mut t, 1) };
            if Status(secs) == Status::NGX_ERROR || secs <= 0 {
                ngx_conf_log_error!(NGX_LOG_EMERG, cf, "invalid timeout \"{}\" in \"kylin_session_routes\": expected a time such as 8h or 30m", rest);
                return conf_error();
            }
            timeout = Some(secs as i64);
        } else {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid parameter \"{}\" in \"kylin_session_routes\": expected zone=name:size and optionally timeout=time",
                String::from_utf8_lossy(b)
            );
            return conf_error();
        }
    }
    let Some((mut name, size)) = zone else {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"kylin_session_routes\" needs zone=name:size");
        return conf_error();
    };
    // SAFETY: cf is valid; name points into the configuration buffer, which nginx copies.
    match unsafe { crate::shm::routes_zone(cf, &mut name, size) } {
        Some(z) => {
            kcf.routes_zone = Some(z);
            kcf.routes_timeout = timeout;
            CONF_OK
        }
        None => conf_error(),
    }
}


/// Default verdict cache of Redis session stores.
pub const DEFAULT_CACHE_ZONE: &str = "kylin_session_cache";
pub const DEFAULT_CACHE_SIZE: usize = 4 << 20;

/// `kylin_session_store redis://... [params] | shared | off;` (http or upstream)
unsafe extern "C" fn kylin_session_store(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: conf is this module's SrvConf of the enclosing block (http or upstream).
    let kcf = unsafe { &mut *(conf as *mut SrvConf) };
    // SAFETY: cf is valid while parsing.
    let in_upstream = unsafe { (*cf).cmd_type } & NGX_HTTP_UPS_CONF as ngx_uint_t != 0;
    if in_upstream {
        // SAFETY: cf is valid while parsing.
        if !unsafe { note_option(cf, kcf, "kylin_session_store", kcf.store.is_some()) } {
            return conf_error();
        }
    } else if kcf.store.is_some() {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"kylin_session_store\" directive is duplicate");
        return conf_error();
    }
    // SAFETY: cf args hold the directive and its parameters.
    let words: Vec<String> = unsafe { args(cf) }.iter().skip(1).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    let mode = match crate::store::parse_store(&refs).and_then(|mut m| {
        if let crate::store::StoreMode::Redis(s) = &mut m {
            s.prepare()?;
        }
        Ok(m)
    }) {
        Ok(m) => m,
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "invalid \"kylin_session_store\": {}", e);
            return conf_error();
        }
    };
    if let crate::store::StoreMode::Redis(store) = &mode {
        // Lookups run in the thread pool "default"; make sure it exists.
        // SAFETY: cf is valid; NULL names the default pool.
        if unsafe { ngx::ffi::ngx_thread_pool_add(cf, ptr::null_mut()) }.is_null() {
            return conf_error();
        }
        let mut name = ngx_str_t { len: DEFAULT_CACHE_ZONE.len(), data: DEFAULT_CACHE_ZONE.as_ptr() as *mut u8 };
        // SAFETY: cf is valid during configuration.
        match unsafe { crate::shm::routes_zone(cf, &mut name, DEFAULT_CACHE_SIZE) } {
            Some(z) => kcf.cache_zone = Some(z),
            None => return conf_error(),
        }
        kcf.store_key = crate::load::store_key(store.urls.join(" ").as_bytes());
        crate::phase::note_redis_store();
    }
    kcf.store = Some(mode);
    CONF_OK
}

/// `kylin_health_check [uri=/kylin/api/health] [interval=5s] [timeout=1s] [fails=1]
/// [passes=1] [status=200-399] [body=text] [port=number] [mandatory];`
unsafe extern "C" fn kylin_health_check(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: nginx passes the directive's cf and this module's SrvConf of its upstream block.
    let Some(kcf) = (unsafe { option(cf, conf, "kylin_health_check", |k| k.health.is_some()) }) else { return conf_error() };
    // SAFETY: cf args hold the directive and its parameters.
    let params: Vec<&[u8]> = unsafe { args(cf) }.iter().skip(1).map(|a| a.as_bytes()).collect();
    match crate::health::parse_params(&params) {
        Ok(c) => {
            kcf.health = Some(c);
            // SAFETY: cf is valid while parsing.
            kcf.health_at = unsafe { conf_position(cf) };
            CONF_OK
        }
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{} in \"kylin_health_check\" directive", e);
            conf_error()
        }
    }
}

/// `kylin_load_report [uri=/kylin/api/prometheus] [interval=5s] [timeout=1s] [stale=time]
/// [port=number] [busy=condition ...];`
unsafe extern "C" fn kylin_load_report(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: nginx passes the directive's cf and this module's SrvConf of its upstream block.
    let Some(kcf) = (unsafe { option(cf, conf, "kylin_load_report", |k| k.load_report.is_some()) }) else { return conf_error() };
    // SAFETY: cf args hold the directive and its parameters.
    let params: Vec<&[u8]> = unsafe { args(cf) }.iter().skip(1).map(|a| a.as_bytes()).collect();
    match crate::load_report::parse_params(&params) {
        Ok(c) => {
            kcf.load_report = Some(c);
            // SAFETY: cf is valid while parsing.
            kcf.load_report_at = unsafe { conf_position(cf) };
            CONF_OK
        }
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{} in \"kylin_load_report\" directive", e);
            conf_error()
        }
    }
}

/// `kylin_load_report` needs a `zone` (reports live in the shared load zone, written by one
/// process); without client placement it is fetched and shown but not used (a warning).
/// False when `nginx -t` must fail (logged).
unsafe fn load_report_needs_zone(cf: *mut ngx_conf_t, uscf: *mut ngx_http_upstream_srv_conf_t, kcf: &SrvConf) -> bool {
    if !kcf.enabled || kcf.load_report.is_none() {
        return true;
    }
    // SAFETY: uscf is valid (the caller's contract).
    let (host, no_zone) = unsafe { ((*uscf).host, (*uscf).shm_zone.is_null()) };
    let (file, line) = kcf.load_report_at;
    let file = file.map(|f| f.to_string_lossy()).unwrap_or_default();
    if no_zone {
        ngx_log_error!(
            NGX_LOG_EMERG,
            // SAFETY: cf is the http block's configuration; its log lives as long as cf.
            unsafe { (*cf).log },
            "\"kylin_load_report\" requires \"zone\" in upstream \"{}\" (reports are shared by all worker processes) in {}:{}",
            host,
            file,
            line
        );
        return false;
    }
    if kcf.balance() != Balance::Clients {
        ngx_log_error!(
            ngx::ffi::NGX_LOG_WARN,
            // SAFETY: as above.
            unsafe { (*cf).log },
            "\"kylin_load_report\" is used by client placement only (\"kylin_balance clients\"): upstream \"{}\" balances {}, so reports are shown but not used in {}:{}",
            host,
            kcf.balance().as_str(),
            file,
            line
        );
    }
    true
}

/// `kylin_slow_start time;`
unsafe extern "C" fn kylin_slow_start(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: nginx passes the directive's cf and this module's SrvConf of its upstream block.
    let Some(kcf) = (unsafe { option(cf, conf, "kylin_slow_start", |k| k.slow_start_ms.is_some()) }) else { return conf_error() };
    // SAFETY: cf args hold the directive and one value.
    let value = unsafe { args(cf) }.get(1).copied().unwrap_or_default();
    match crate::health::parse_time_ms(value.as_bytes()).filter(|&ms| (1..=3_600_000).contains(&ms)) {
        Some(ms) => {
            kcf.slow_start_ms = Some(ms);
            CONF_OK
        }
        None => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "invalid value \"{}\" in \"kylin_slow_start\" directive: it must be a time from 1ms to 1h (for example 30s)", value);
            conf_error()
        }
    }
}

/// `kylin_status [write=on|off];` in a location: that location serves the status document
/// (`status`), and with `write=on` also accepts drain commands (`admin`).
unsafe extern "C" fn kylin_status(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, _conf: *mut c_void) -> *mut c_char {
    // SAFETY: inside a location, cf->ctx is an http conf ctx whose loc_conf holds the core
    // module's location configuration; cf->args holds the directive's words.
    unsafe {
        let arg = args(cf).get(1).copied();
        let write = match arg.as_ref().map(|a| a.as_bytes()) {
            None | Some(b"write=off") => false,
            Some(b"write=on") => true,
            Some(_) => {
                ngx_conf_log_error!(NGX_LOG_EMERG, cf, "invalid parameter \"{}\" in \"kylin_status\" directive: it must be \"write=on\" or \"write=off\"", arg.unwrap_or_default());
                return conf_error();
            }
        };
        let ctx = (*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t;
        let clcf = *(*ctx).loc_conf.add(ngx::ffi::ngx_http_core_module.ctx_index) as *mut ngx::ffi::ngx_http_core_loc_conf_t;
        (*clcf).handler = Some(if write { crate::admin::write_handler } else { crate::status::status_handler });
    }
    CONF_OK
}
