//! `kylin_status;`: a read-only JSON document about every kylin upstream, with
//! `?format=prometheus` the same data as Prometheus metrics, and for browsers the dashboard
//! page that polls the JSON (glue; the documents are built in [`crate::report`], the format
//! is chosen and the page embedded in [`crate::dashboard`]). The `kylin_status` directive
//! (`directives`) installs [`status_handler`] as the location's content handler, or `admin`'s
//! handler with `write=on`, which answers `GET`/`HEAD` with this one.

use ngx::core::Status;
use ngx::ffi::{
    ngx_http_discard_request_body, ngx_http_request_t, ngx_http_upstream_rr_peers_t, ngx_http_upstream_srv_conf_t,
    ngx_int_t, ngx_time, NGINX_VERSION, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_NOT_ALLOWED,
};

use crate::balancer::Bound;
use crate::conf::{kylin_upstreams, SrvConf};
use crate::dashboard::{self, Format};
use crate::load::{self, Counter, LoadTable};
use crate::ngx_ext::{add_header, failed, read_locked, send_whole, DRAINING};
use crate::report::{self, ServerReport, UpstreamReport};
use crate::{drain, health, shm, store_io};

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
            let failed = failed(peer, now);
            let health = health.map(|h| report::HealthReport::of(table, upstream, peer.name.as_bytes(), h.mandatory));
            let state = if let Some(hs) = health.as_ref().filter(|h| h.holds_back() && peer.down == 0) {
                hs.state
            } else if (peer.down != 0 && peer.down == DRAINING) || (peer.down == 0 && drain::drained(table, upstream, peer.name.as_bytes())) {
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
        if let Some(held) = sessions_held(kcf, &refs, now) {
            for (s, n) in servers.iter_mut().zip(held) {
                s.sessions = Some(n);
            }
        }
        let now_ms = health::unix_ms();
        for s in servers.iter_mut().filter(|s| !s.backup) {
            s.slow_start = health::ramp_share(table.as_ref(), kcf.slow_start_ms, &kcf.name, s.address.as_bytes(), now_ms);
        }
        if let Some(conf) = kcf.load_report.as_ref() {
            // Placement (primary servers, kylin_balance clients) is what uses reports.
            let places = kcf.balance() == crate::balancer::Balance::Clients;
            for s in servers.iter_mut() {
                s.load_report = Some(report::LoadReportReport::of(table.as_ref(), conf, &kcf.name, s.address.as_bytes(), now_ms, places && !s.backup));
            }
        }
        let in_flight = table.as_ref().and_then(|t| t.find(load::upstream_key(&kcf.name))).map_or(0, |s| s.inflight());
        let factor = kcf.balance_factor();
        let bound = Bound { factor_milli: factor, total: in_flight, live_weight };
        let routes = kcf.routes_zone.and_then(|z| shm::table_report(z));
        // Clients moved, per primary server in list order (the tables' index order), when the
        // shared tables describe this worker's servers.
        let layout = kcf.tables.get().as_deref().and_then(|t| t.as_deref()).map(|s| s.primary.layout);
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
            store: store_io::store_report(kcf, now),
        }
    }
}

/// The JSON document or the Prometheus text, and its content type.
unsafe fn documents(r: *mut ngx_http_request_t, prometheus: bool) -> (String, &'static str) {
    // SAFETY: r is a valid request; its main conf holds the upstream module's configuration.
    unsafe {
        let now = ngx_time();
        let mut reports = Vec::new();
        let mut load_zone = None;
        for (uscf, kcf) in kylin_upstreams((*r).main_conf) {
            reports.push(upstream_report(uscf, kcf, now));
            // One module-wide zone.
            if load_zone.is_none() {
                load_zone = shm::load_report(kcf.load_zone);
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

pub unsafe extern "C" fn status_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a valid request.
    unsafe {
        if (*r).method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as usize == 0 {
            return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
        }
        let rc = ngx_http_discard_request_body(r);
        if !Status(rc).is_ok() {
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

/// Learned sessions that each of `addresses` still holds (live routes in the upstream's
/// routes zone); `None` without a routes zone.
pub fn sessions_held(kcf: &SrvConf, addresses: &[&[u8]], now: i64) -> Option<Vec<u64>> {
    let zone = kcf.routes_zone?;
    let ids: Vec<u64> = addresses.iter().map(|a| crate::ring::key_hash(a)).collect();
    // SAFETY: the zone is valid for the cycle.
    unsafe { shm::with_routes(zone, |t| t.count_by_peer(&ids, now, kcf.routes_timeout())) }
}
