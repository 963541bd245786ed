//! `kylin_status write=on;`: the status location also accepts `POST`/`PATCH` of a drain
//! command ([`crate::drain`]), which marks servers draining (or not) at run time, in their
//! health slots in the load zone: every worker sees it at once, and it survives
//! `nginx -s reload` while the server stays configured (a reload that removes the server
//! clears it). Glue; the document is parsed in [`crate::drain`].

use core::sync::atomic::Ordering;

use ngx::core::Status;
use ngx::ffi::{
    ngx_http_finalize_request, ngx_http_read_client_request_body, ngx_http_request_t, ngx_http_upstream_rr_peers_t,
    ngx_int_t, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_NOT_ALLOWED, NGX_HTTP_PATCH, NGX_HTTP_POST,
    NGX_HTTP_SPECIAL_RESPONSE, NGX_LOG_NOTICE,
};
use ngx::ngx_log_error;
use serde_json::json;

use crate::conf::kylin_upstreams;
use crate::drain;
use crate::load::{self, Use};
use crate::ngx_ext::{for_each_peer, send_whole};
use crate::shm;

/// The content handler of `kylin_status write=on`: `GET`/`HEAD` as `kylin_status`, `POST`
/// and `PATCH` a drain command.
pub unsafe extern "C" fn write_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a valid request.
    unsafe {
        let method = (*r).method;
        if method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as usize != 0 {
            return crate::status::status_handler(r);
        }
        if method & (NGX_HTTP_POST | NGX_HTTP_PATCH) as usize == 0 {
            return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
        }
        let rc = ngx_http_read_client_request_body(r, Some(body_read));
        if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
            return rc;
        }
        Status::NGX_DONE.into()
    }
}

/// The request body, if it is all in memory and at most [`drain::MAX_BODY`] bytes.
unsafe fn body_bytes(r: *mut ngx_http_request_t) -> Result<Vec<u8>, (u32, String)> {
    let mut out = Vec::new();
    // SAFETY: r is live and its body was read (request_body set, bufs a chain of buffers).
    unsafe {
        let Some(rb) = (*r).request_body.as_ref() else { return Ok(out) };
        let mut cl = rb.bufs;
        while let Some(link) = cl.as_ref() {
            let b = link.buf;
            if let Some(b) = b.as_ref() {
                if b.in_file() != 0 || out.len() + (b.last as usize - b.pos as usize) > drain::MAX_BODY {
                    return Err((413, format!("the document is larger than {} bytes", drain::MAX_BODY)));
                }
                out.extend_from_slice(core::slice::from_raw_parts(b.pos, b.last as usize - b.pos as usize));
            }
            cl = link.next;
        }
    }
    Ok(out)
}

unsafe extern "C" fn body_read(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls the body handler with the live request.
    unsafe {
        let (status, doc) = match body_bytes(r).and_then(|b| drain::parse_command(&b).map_err(|e| (400, e))) {
            Ok(cmd) => apply(r, &cmd),
            Err((status, e)) => (status, json!({ "error": e })),
        };
        let rc = send_json(r, status, &doc);
        ngx_http_finalize_request(r, rc);
    }
}

/// Applies a command: (HTTP status, answer document).
unsafe fn apply(r: *mut ngx_http_request_t, cmd: &drain::Command) -> (u32, serde_json::Value) {
    // SAFETY: r is live; its main conf holds the upstream module's, whose upstreams are valid;
    // in a worker their peer.data is the (zone) primary list, `next` its backups, each read
    // with its own lock held.
    unsafe {
        let found = kylin_upstreams((*r).main_conf).find(|(_, k)| k.name == cmd.upstream.as_bytes());
        let Some((uscf, kcf)) = found else {
            return (404, json!({ "error": format!("no kylin upstream \"{}\"", cmd.upstream) }));
        };
        let mut names: Vec<Vec<u8>> = Vec::new();
        for_each_peer((*uscf).peer.data as *mut ngx_http_upstream_rr_peers_t, |peer| {
            if peer.name.as_bytes() == cmd.server.as_bytes() || peer.server.as_bytes() == cmd.server.as_bytes() {
                names.push(peer.name.as_bytes().to_vec());
            }
        });
        if names.is_empty() {
            return (404, json!({ "error": format!("no server \"{}\" in upstream \"{}\"", cmd.server, cmd.upstream) }));
        }
        let now_ms = crate::health::unix_ms();
        let mut marked = Vec::new();
        for n in &names {
            let Some(slot) = shm::load_slot(kcf.load_zone, load::health_key(&kcf.name, n), Use::Counts) else {
                return (500, json!({ "error": "the load zone is full: the drain mark cannot be kept" }));
            };
            let cell = slot.cell(drain::CELL);
            // A compare-and-swap loop: two writers never lose a mark or its time.
            let mut cur = cell.load(Ordering::Relaxed);
            while let Err(now) = cell.compare_exchange_weak(cur, drain::next_mark(cur, cmd.drain, now_ms), Ordering::Relaxed, Ordering::Relaxed) {
                cur = now;
            }
            if cur != 0 && !cmd.drain {
                // Back from draining: its slow start (`kylin_slow_start`) begins.
                slot.cell(crate::health::cell::RAMP_MS).store(now_ms, Ordering::Relaxed);
            }
            marked.push(n.as_slice());
        }
        ngx_log_error!(
            NGX_LOG_NOTICE,
            (*(*r).connection).log,
            "kylin: upstream \"{}\": {} {} through the status API",
            cmd.upstream,
            names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>().join(", "),
            if cmd.drain { "draining" } else { "no longer draining" }
        );
        let held = crate::status::sessions_held(kcf, &marked, ngx::ffi::ngx_time());
        let servers: Vec<_> = marked
            .iter()
            .enumerate()
            .map(|(i, n)| json!({ "address": String::from_utf8_lossy(n), "draining": cmd.drain, "sessions": held.as_ref().and_then(|h| h.get(i)) }))
            .collect();
        (200, json!({ "upstream": cmd.upstream, "servers": servers }))
    }
}

/// Sends a JSON document as the whole response.
unsafe fn send_json(r: *mut ngx_http_request_t, status: u32, doc: &serde_json::Value) -> ngx_int_t {
    let mut body = doc.to_string();
    body.push('\n');
    // SAFETY: r is live, in its content phase.
    unsafe { send_whole(r, status as usize, "application/json", body.as_bytes()) }
}
