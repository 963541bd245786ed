//! Variables: `$kylin_route` (how the balancer chose the server: sticky, learned, spilled,
//! failover, backup) and `$kylin_session_state` (none, local, shared, unknown), read from the
//! balancer's per-request data; both are empty for requests that no kylin upstream balanced.
//! Also the small per-request context in which the precontent phase leaves a session verdict.

use ngx::core::Status;
use core::ffi::c_void;

use ngx::ffi::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_request_t, ngx_http_variable_value_t, ngx_int_t,
    ngx_str_t, ngx_uint_t, NGX_HTTP_VAR_NOCACHEABLE,
};

use crate::balancer::{Route, SessionState};
use crate::Module;
use ngx::http::HttpModule;

/// What the balancer decided for a request, kept in the request's module context.
#[derive(Clone, Copy, Debug)]
pub struct RequestCtx {
    pub route: Option<Route>,
    pub session: SessionState,
    /// The precontent phase already determined `session` (from the session store).
    pub checked: bool,
    /// This is the `ctx` of a [`CheckedCtx`], which holds the session id precontent found.
    has_id: bool,
}

impl RequestCtx {
    /// A context that does not carry the session id (the balancer's own).
    pub fn new(route: Option<Route>, session: SessionState, checked: bool) -> RequestCtx {
        RequestCtx { route, session, checked, has_id: false }
    }
}

/// The context the precontent phase creates: also the session id it found in the `Cookie`
/// headers (memory of the request, valid as long as it), so that the balancer does not read
/// the headers again.
#[repr(C)]
struct CheckedCtx {
    ctx: RequestCtx,
    id: *const u8,
    id_len: usize,
}

/// The request's context, created on first use in the request pool; a new one remembers `id`,
/// the request's session id.
///
/// # Safety
/// `r` is a live request; the context is used only while it lives (`'r`), and `id` lives as
/// long (it points into its headers).
pub unsafe fn ctx<'r>(r: *mut ngx_http_request_t, id: &[u8]) -> Option<&'r mut RequestCtx> {
    // SAFETY: r is a live request; ctx is an array of ngx_http_max_module pointers and our slot
    // holds NULL, a CheckedCtx allocated from the request pool below (whose first field is a
    // RequestCtx: repr(C)), or the RequestCtx inside the balancer's per-request data.
    unsafe {
        let slot = (*r).ctx.add(Module::module().ctx_index);
        if (*slot).is_null() {
            let p = ngx::ffi::ngx_palloc((*r).pool, core::mem::size_of::<CheckedCtx>()) as *mut CheckedCtx;
            if p.is_null() {
                return None;
            }
            p.write(CheckedCtx {
                ctx: RequestCtx { route: None, session: SessionState::None, checked: false, has_id: true },
                id: id.as_ptr(),
                id_len: id.len(),
            });
            *slot = p as *mut c_void;
        }
        (*slot as *mut RequestCtx).as_mut()
    }
}

/// The session id the precontent phase found, if this context remembers one.
pub fn checked_id<'a>(ctx: &'a RequestCtx) -> Option<&'a [u8]> {
    if !ctx.has_id {
        return None;
    }
    // SAFETY: has_id is set only in the RequestCtx at the start of a CheckedCtx (see `ctx`),
    // whose id points into the request's headers, alive as long as the request.
    unsafe {
        let c = &*(ctx as *const RequestCtx as *const CheckedCtx);
        Some(core::slice::from_raw_parts(c.id, c.id_len))
    }
}

fn set_value(v: *mut ngx_http_variable_value_t, s: &'static str) {
    // SAFETY: nginx passes a valid variable value to fill; s is static.
    unsafe {
        (*v).set_len(s.len() as u32);
        (*v).set_valid(1);
        (*v).set_no_cacheable(1);
        (*v).set_not_found(0);
        (*v).data = s.as_ptr() as *mut u8;
    }
}

fn set_not_found(v: *mut ngx_http_variable_value_t) {
    // SAFETY: nginx passes a valid variable value to fill.
    unsafe { (*v).set_not_found(1) };
}

unsafe extern "C" fn get_route(r: *mut ngx_http_request_t, v: *mut ngx_http_variable_value_t, _data: usize) -> ngx_int_t {
    // SAFETY: r is live; our ctx slot is NULL or ours.
    match unsafe { existing_ctx(r) }.and_then(|c| c.route) {
        Some(route) => set_value(v, route.as_str()),
        None => set_not_found(v),
    }
    Status::NGX_OK.into()
}

unsafe extern "C" fn get_session_state(r: *mut ngx_http_request_t, v: *mut ngx_http_variable_value_t, _data: usize) -> ngx_int_t {
    // SAFETY: r is live; our ctx slot is NULL or ours.
    match unsafe { existing_ctx(r) } {
        Some(c) if c.route.is_some() => set_value(v, c.session.as_str()),
        _ => set_not_found(v),
    }
    Status::NGX_OK.into()
}

/// Points the request's context at `ctx` (the balancer's per-request data, which lives in the
/// request pool as long as the request).
pub unsafe fn set_ctx(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) {
    // SAFETY: r is live; ctx has an entry per HTTP module.
    unsafe { *(*r).ctx.add(Module::module().ctx_index) = ctx as *mut c_void };
}

/// The request's context, if the precontent phase or the balancer made one.
///
/// # Safety
/// As for [`ctx`].
pub unsafe fn existing_ctx<'r>(r: *mut ngx_http_request_t) -> Option<&'r RequestCtx> {
    // SAFETY: see `ctx`.
    unsafe { ((*(*r).ctx.add(Module::module().ctx_index)) as *const RequestCtx).as_ref() }
}

/// ... to change (a lookup's answer, on resuming the request).
///
/// # Safety
/// As for [`ctx`], and no other reference to the context is alive.
pub unsafe fn existing_ctx_mut<'r>(r: *mut ngx_http_request_t) -> Option<&'r mut RequestCtx> {
    // SAFETY: see `ctx`.
    unsafe { ((*(*r).ctx.add(Module::module().ctx_index)) as *mut RequestCtx).as_mut() }
}

/// Registers the variables (preconfiguration).
pub unsafe fn add_variables(cf: *mut ngx_conf_t) -> ngx_int_t {
    type Getter = unsafe extern "C" fn(*mut ngx_http_request_t, *mut ngx_http_variable_value_t, usize) -> ngx_int_t;
    let vars: [(&'static str, Getter); 2] = [("kylin_route", get_route), ("kylin_session_state", get_session_state)];
    for (name, get) in vars {
        let mut n = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
        // SAFETY: cf is valid at preconfiguration; nginx copies the name.
        let var = unsafe { ngx_http_add_variable(cf, &mut n, NGX_HTTP_VAR_NOCACHEABLE as ngx_uint_t) };
        if var.is_null() {
            return Status::NGX_ERROR.into();
        }
        // SAFETY: var was just returned by nginx.
        unsafe {
            (*var).get_handler = Some(get);
            (*var).data = 0;
        }
    }
    Status::NGX_OK.into()
}
