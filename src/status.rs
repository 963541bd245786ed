//! `kylin_status;`: a read-only JSON document about every kylin upstream, with
//! `?format=prometheus` the same data as Prometheus metrics, and for browsers the dashboard
//! page that polls the JSON (glue; the documents are built in [`crate::report`], the format
//! is chosen and the page embedded in [`crate::dashboard`]).

use core::ffi::{c_char, c_void};
use core::ptr;

use ngx::ffi::{
    ngx_alloc_chain_link, ngx_command_t, ngx_conf_t, ngx_create_temp_buf, ngx_http_conf_ctx_t,
    ngx_http_core_loc_conf_t, ngx_http_core_module, ngx_http_discard_request_body,
    ngx_http_output_filter, ngx_http_request_t, ngx_http_send_header, ngx_http_upstream_main_conf_t,
    ngx_http_upstream_module, ngx_http_upstream_rr_peers_t, ngx_http_upstream_srv_conf_t, ngx_int_t,
    ngx_list_push, ngx_rwlock_rlock, ngx_rwlock_unlock, ngx_table_elt_t, ngx_time, NGINX_VERSION,
    NGX_ERROR, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_NOT_ALLOWED,
    NGX_HTTP_NOT_MODIFIED, NGX_HTTP_NO_CONTENT, NGX_HTTP_VERSION_10, NGX_OK,
};

use crate::balancer::Bound;
use crate::conf::{srv_conf, SrvConf};
use crate::dashboard::{self, Format};
use crate::load::{self, Counter, LoadTable};
use crate::report::{self, ServerReport, UpstreamReport};
use crate::shm;

/// `kylin_status [write=on|off];` in a location: that location serves the status document
/// (and with `write=on` accepts drain commands, see [`crate::admin`]).
pub unsafe extern "C" fn kylin_status(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, _conf: *mut c_void) -> *mut c_char {
    // SAFETY: inside a location, cf->ctx is an http conf ctx whose loc_conf holds the core
    // module's location configuration; cf->args holds the directive's words.
    unsafe {
        let arg = (*cf).args.as_ref().and_then(|a| a.as_slice::<ngx::ffi::ngx_str_t>().get(1).copied());
        let write = match arg.as_ref().map(|a| a.as_bytes()) {
            None | Some(b"write=off") => false,
            Some(b"write=on") => true,
            Some(_) => {
                ngx::ngx_conf_log_error!(ngx::ffi::NGX_LOG_EMERG, cf, "invalid parameter \"{}\" in \"kylin_status\" directive: it must be \"write=on\" or \"write=off\"", arg.unwrap_or_default());
                return ngx::core::NGX_CONF_ERROR as *mut c_char;
            }
        };
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        let clcf = *(*ctx).loc_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_loc_conf_t;
        (*clcf).handler = Some(if write { crate::admin::write_handler } else { status_handler });
    }
    ptr::null_mut()
}

/// Fills the report of one peer list (primary or backup).
unsafe fn servers_of(
    peers: *mut ngx_http_upstream_rr_peers_t,
    backup: bool,
    upstream: &[u8],
    table: Option<&LoadTable<'static>>,
    now: i64,
    health: Option<&crate::health::CheckConf>,
    out: &mut Vec<ServerReport>,
) -> u64 {
    let mut live_weight = 0;
    // SAFETY: peers is a valid list; the caller holds its read lock if shared.
    unsafe {
        let mut p = (*peers).peer;
        while !p.is_null() {
            let peer = &*p;
            let failed = peer.max_fails != 0 && peer.fails >= peer.max_fails && now - peer.checked <= peer.fail_timeout;
            let health = health.map(|h| crate::probe::health_report(table, upstream, peer.name.as_bytes(), h.mandatory));
            let state = if let Some(hs) = health.as_ref().filter(|h| h.holds_back() && peer.down == 0) {
                hs.state
            } else if (peer.down != 0 && peer.down == crate::upstream::DRAINING) || (peer.down == 0 && crate::admin::drained(table, upstream, peer.name.as_bytes())) {
                "draining"
            } else if peer.down != 0 {
                "down"
            } else if failed {
                "failed"
            } else {
                "up"
            };
            if !backup && state == "up" {
                live_weight += peer.weight.max(1) as u64;
            }
            let slot = table.and_then(|t| t.find(load::server_key(upstream, peer.name.as_bytes())));
            let c = |k: Counter| slot.map_or(0, |s| s.counter(k));
            out.push(ServerReport {
                address: String::from_utf8_lossy(peer.name.as_bytes()).into_owned(),
                server: String::from_utf8_lossy(peer.server.as_bytes()).into_owned(),
                weight: peer.weight.max(1) as u64,
                backup,
                state,
                load_slot: slot.is_some(),
                in_flight: slot.map_or(0, |s| s.inflight()),
                requests: [Counter::Sticky, Counter::Learned, Counter::SpilledIn, Counter::Failover, Counter::Backup, Counter::Moved]
                    .into_iter()
                    .map(c)
                    .sum(),
                sticky: c(Counter::Sticky),
                learned: c(Counter::Learned),
                spilled_in: c(Counter::SpilledIn),
                spilled_out: c(Counter::SpilledOut),
                failover: c(Counter::Failover),
                backup_requests: c(Counter::Backup),
                failures: c(Counter::Failures),
                moved: c(Counter::Moved),
                clients_moved_in: None,
                health,
                sessions: None,
                slow_start: None,
                load_report: None,
            });
            p = peer.next;
        }
    }
    live_weight
}

/// Runs `f` with the read lock of a peer list held (a list in a `zone`; nothing to lock
/// without one).
unsafe fn read_locked<R>(peers: *mut ngx_http_upstream_rr_peers_t, f: impl FnOnce() -> R) -> R {
    // SAFETY: peers is a valid list; its rwlock lives in the same (shared) memory, and `f`
    // runs between taking and releasing it.
    unsafe {
        let shared = !(*peers).shpool.is_null();
        if shared {
            ngx_rwlock_rlock(ptr::addr_of_mut!((*peers).rwlock));
        }
        let r = f();
        if shared {
            ngx_rwlock_unlock(ptr::addr_of_mut!((*peers).rwlock));
        }
        r
    }
}

/// The report of one kylin upstream.
unsafe fn upstream_report(uscf: *mut ngx_http_upstream_srv_conf_t, kcf: &SrvConf, now: i64) -> UpstreamReport {
    // SAFETY: uscf is a valid upstream; in a worker its peer.data is the (zone) peer list; the
    // configuration's zones are valid for the cycle.
    unsafe {
        let table = shm::load_table(kcf.load_zone);
        let peers = (*uscf).peer.data as *mut ngx_http_upstream_rr_peers_t;
        let mut servers = Vec::new();
        let mut live_weight = 0;
        if !peers.is_null() {
            live_weight = read_locked(peers, || servers_of(peers, false, &kcf.name, table.as_ref(), now, kcf.health.as_ref(), &mut servers));
            // The backup list has a lock of its own, taken once the primary one is released.
            let backup = (*peers).next;
            if !backup.is_null() {
                read_locked(backup, || servers_of(backup, true, &kcf.name, table.as_ref(), now, kcf.health.as_ref(), &mut servers));
            }
        }
        let addresses: Vec<Vec<u8>> = servers.iter().map(|s| s.address.as_bytes().to_vec()).collect();
        let refs: Vec<&[u8]> = addresses.iter().map(|a| a.as_slice()).collect();
        if let Some(held) = crate::admin::sessions_held(kcf, &refs, now) {
            for (s, n) in servers.iter_mut().zip(held) {
                s.sessions = Some(n);
            }
        }
        for s in servers.iter_mut().filter(|s| !s.backup) {
            s.slow_start = crate::admin::ramp(table.as_ref(), kcf, s.address.as_bytes());
        }
        if let Some(conf) = kcf.load_report.as_ref() {
            // Placement (primary servers, kylin_balance clients) is what uses reports.
            let places = kcf.balance() == crate::balancer::Balance::Clients;
            for s in servers.iter_mut() {
                s.load_report = Some(crate::probe::load_report(table.as_ref(), conf, &kcf.name, s.address.as_bytes(), places && !s.backup));
            }
        }
        let in_flight = table.as_ref().and_then(|t| t.find(load::upstream_key(&kcf.name))).map_or(0, |s| s.inflight());
        let factor = kcf.balance_factor();
        let bound = Bound { factor_milli: factor, total: in_flight, live_weight };
        let routes = kcf.routes_zone.and_then(|z| shm::table_report(z));
        // Clients moved, per primary server in list order (the tables' index order), when the
        // shared tables describe this worker's servers.
        let layout = kcf.state.as_deref().map(|s| s.primary_layout());
        let moved = kcf.placement_zone.zip(layout).and_then(|(z, l)| shm::placement_moved(z, l));
        if let Some(moved) = &moved {
            for (i, s) in servers.iter_mut().filter(|s| !s.backup).enumerate() {
                s.clients_moved_in = Some(moved.get(i).copied().unwrap_or(0));
            }
        }
        UpstreamReport {
            name: String::from_utf8_lossy(&kcf.name).into_owned(),
            balance: kcf.balance().as_str(),
            moved_clients: moved.map(|m| m.iter().sum()),
            balance_factor_milli: (factor > 0).then_some(factor),
            session_cookie: String::from_utf8_lossy(kcf.session_cookie()).into_owned(),
            in_flight,
            live_weight,
            bound_per_weight: bound.is_on().then(|| bound.limit(1)),
            servers,
            routes,
            routes_timeout_seconds: kcf.routes_timeout(),
            store: crate::session_check::store_report(kcf, now),
        }
    }
}

/// The JSON document or the Prometheus text, and its content type.
unsafe fn documents(r: *mut ngx_http_request_t, prometheus: bool) -> (String, &'static str) {
    // SAFETY: r is a valid request; its main conf holds the upstream module's configuration.
    unsafe {
        let now = ngx_time();
        let umcf = *(*r).main_conf.add(ngx_http_upstream_module.ctx_index) as *mut ngx_http_upstream_main_conf_t;
        let mut reports = Vec::new();
        let mut load_zone = None;
        if let Some(umcf) = umcf.as_ref() {
            let ups: &[*mut ngx_http_upstream_srv_conf_t] = umcf.upstreams.as_slice();
            for &uscf in ups {
                if let Some(kcf) = srv_conf(uscf) {
                    if kcf.enabled && kcf.init_upstream_ran {
                        reports.push(upstream_report(uscf, kcf, now));
                        // One module-wide zone.
                        if load_zone.is_none() {
                            load_zone = shm::load_report(kcf.load_zone);
                        }
                    }
                }
            }
        }
        let version = NGINX_VERSION.to_str().unwrap_or("");
        if prometheus {
            (report::to_prometheus(&reports, load_zone.as_ref()), "text/plain; version=0.0.4; charset=utf-8")
        } else {
            (report::to_json(version, now, &reports, load_zone.as_ref()), "application/json")
        }
    }
}

/// Adds a response header with static key and value; returns it (None if out of memory).
unsafe fn add_header(r: *mut ngx_http_request_t, key: &'static str, value: &'static str) -> Option<*mut ngx_table_elt_t> {
    // SAFETY: r is a valid request whose headers_out.headers list is initialised (content
    // handlers run after that); the element is zeroed before it is filled, and the key and
    // value point to static memory that outlives the request (nginx only reads them).
    unsafe {
        let h = ngx_list_push(ptr::addr_of_mut!((*r).headers_out.headers)) as *mut ngx_table_elt_t;
        if h.is_null() {
            return None;
        }
        ptr::write_bytes(h, 0, 1);
        (*h).hash = 1;
        (*h).key.len = key.len();
        (*h).key.data = key.as_ptr() as *mut u8;
        (*h).value.len = value.len();
        (*h).value.data = value.as_ptr() as *mut u8;
        Some(h)
    }
}

/// Whether the response sent has no body: what nginx's header filter marks `r->header_only`
/// (a HEAD request, or a 204 or 304 answer such as the not-modified filter's, in a main request
/// of HTTP/1.0 or later), decided here from the request itself. Not read from the
/// `header_only` bit: the bindings of nginx 1.30 and 1.31 (whose request has a 16-bit `port`
/// before its bit fields) place every bit from `uri_changes` on two bits early, so
/// `header_only()` reads `pipeline` there and a HEAD request got the body.
unsafe fn header_only(r: *mut ngx_http_request_t) -> bool {
    // SAFETY: r is a valid request whose header has been sent.
    unsafe {
        r == (*r).main
            && (*r).http_version >= NGX_HTTP_VERSION_10 as usize
            && ((*r).method == NGX_HTTP_HEAD as usize
                || (*r).headers_out.status == NGX_HTTP_NOT_MODIFIED as usize
                || (*r).headers_out.status == NGX_HTTP_NO_CONTENT as usize)
    }
}

pub unsafe extern "C" fn status_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a valid request.
    unsafe {
        if (*r).method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as usize == 0 {
            return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
        }
        let rc = ngx_http_discard_request_body(r);
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }

        // The request's headers list is complete before content handlers run.
        let accept: Vec<&[u8]> = ngx::http::list_iterator(&(*r).headers_in.headers)
            .filter(|(k, _)| k.as_bytes().eq_ignore_ascii_case(b"accept"))
            .map(|(_, v)| v.as_bytes())
            .collect();
        let format = dashboard::choose((*r).args.as_bytes(), &accept);
        // The response depends on Accept unless ?format= chose it; say so to caches anyway.
        if add_header(r, "Vary", "Accept").is_none() {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        }
        let (body, ct): (std::borrow::Cow<'static, str>, &str) = if format == Format::Html {
            for (k, v) in dashboard::HTML_HEADERS {
                if add_header(r, k, v).is_none() {
                    return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
                }
            }
            // With the ETag set, nginx's not-modified filter answers If-None-Match with 304.
            let Some(etag) = add_header(r, "ETag", dashboard::etag()) else {
                return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
            };
            (*r).headers_out.etag = etag;
            (dashboard::PAGE.into(), "text/html; charset=utf-8")
        } else {
            let (doc, ct) = documents(r, format == Format::Prometheus);
            (doc.into(), ct)
        };

        send_whole(r, 200, ct, body.as_bytes())
    }
}

/// Sends `body` with `status` and content type `ct` (static) as the whole response; no body
/// when the response has none (HEAD, 304), see [`header_only`].
///
/// # Safety
/// `r` is a live request in its content phase.
pub unsafe fn send_whole(r: *mut ngx_http_request_t, status: usize, ct: &'static str, body: &[u8]) -> ngx_int_t {
    // SAFETY: r is live (the caller's contract); the buffer and chain link come from its pool,
    // and `body` is copied into the buffer before this returns.
    unsafe {
        (*r).headers_out.status = status;
        (*r).headers_out.content_length_n = body.len() as i64;
        (*r).headers_out.content_type_len = ct.len();
        (*r).headers_out.content_type.len = ct.len();
        (*r).headers_out.content_type.data = ct.as_ptr() as *mut u8;
        (*r).headers_out.content_type_lowcase = ptr::null_mut();

        let rc = ngx_http_send_header(r);
        if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || header_only(r) {
            return rc;
        }
        let b = ngx_create_temp_buf((*r).pool, body.len().max(1));
        let out = ngx_alloc_chain_link((*r).pool);
        if b.is_null() || out.is_null() {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        }
        ptr::copy_nonoverlapping(body.as_ptr(), (*b).last, body.len());
        (*b).last = (*b).last.add(body.len());
        (*b).set_last_buf(if r == (*r).main { 1 } else { 0 });
        (*b).set_last_in_chain(1);
        (*out).buf = b;
        (*out).next = ptr::null_mut();
        ngx_http_output_filter(r, out)
    }
}
