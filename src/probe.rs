//! The active health-check prober (glue): one process (worker 0, see `conf::init_process`)
//! probes every server of each upstream with `kylin_health_check`, on nginx's event loop,
//! with nginx's own connection API (`ngx_event_connect_peer`, the connection's `send` and
//! `recv`, read/write handlers and timers). Answers are parsed and judged by the pure
//! [`crate::health`] module; the results go to each server's health slot in the load zone,
//! where every worker's balancer reads them.
//!
//! Every `interval`, a timer starts a probe of each server that has none in flight. A probe
//! reuses the server's kept-alive connection when the last answer allowed it, and otherwise
//! connects afresh; a kept-alive connection found closed when reused is replaced once,
//! without counting a failure. One timer per probe bounds it by `timeout`. During graceful
//! shutdown (`ngx_exiting`) no new probe starts, probes in flight finish (at most `timeout`),
//! and nginx closes the idle kept-alive connections (they are marked `idle`).

use ngx::core::Status;
use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::Ordering;

use ngx::ffi::{
    ngx_add_timer, ngx_close_connection, ngx_connection_t, ngx_cycle_t, ngx_del_timer, ngx_event_connect_peer,
    ngx_event_get_peer, ngx_event_t, ngx_handle_read_event, ngx_handle_write_event,
    ngx_http_upstream_rr_peers_t, ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_msec_t,
    ngx_peer_connection_t, ngx_str_t, NGX_AGAIN, NGX_LOG_WARN,
};
use ngx::ngx_log_error;

use crate::conf::{cycle_main_conf, kylin_upstreams, SrvConf};
use crate::ngx_ext::for_each_peer;
use crate::health::{self, cell, Health, Outcome, Parsed, Reason, Transition};
use crate::load::{self, Slot, Use};
use crate::load_report::{self, Failure};
use crate::shm;

/// The probers of this process (raw `Box<Prober>` pointers), freed at `exit_process`.
static PROBERS: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

fn probers() -> std::sync::MutexGuard<'static, Vec<usize>> {
    // Only this process's event loop thread uses it: a poisoned lock still holds the list.
    PROBERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a prober fetches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `kylin_health_check`: the answer is judged, the server's health slot updated.
    Health,
    /// `kylin_load_report`: the metrics page is scanned, the server's report slot updated.
    Load,
}

/// The probes of one upstream (of one kind).
struct Prober {
    kind: Kind,
    tick: ngx_event_t,
    /// The cycle the prober belongs to: with `master_process off` a reload swaps the cycle in
    /// the same process, and the old configuration's prober stops.
    cycle: *mut ngx_cycle_t,
    kcf: *const SrvConf,
    uscf: *mut ngx_http_upstream_srv_conf_t,
    /// Boxed: each probe's address is its connection's and its timer's `data`, and must not
    /// move when the vector grows.
    #[allow(clippy::vec_box)]
    probes: Vec<Box<Probe>>,
}

/// One server's probe state; boxed, so that its address (the connection's and the timer's
/// `data`) stays put.
struct Probe {
    prober: *mut Prober,
    /// The peer's address as nginx prints it: the server's identity.
    name: Vec<u8>,
    name_str: ngx_str_t,
    sockaddr: Vec<u8>,
    /// The connection of the probe in flight, or kept alive between probes.
    conn: *mut ngx_connection_t,
    /// Bounds a probe in flight.
    timer: ngx_event_t,
    /// The connection's log: the cycle's, saying what the connection is for.
    log: ngx::ffi::ngx_log_t,
    in_flight: bool,
    /// The probe runs on a kept-alive connection (not yet known to be alive).
    reused: bool,
    request: Vec<u8>,
    sent: usize,
    answer: Vec<u8>,
    started_ms: ngx_msec_t,
    slot: Option<&'static Slot>,
    /// Seen in the peer list at the last tick (`resolve` may drop servers).
    seen: bool,
    /// A load probe's result, set when its answer is complete.
    load: Option<Result<[u64; load_report::MAX_CONDITIONS], Failure>>,
}

unsafe fn conf_of(p: &Probe) -> Option<&health::CheckConf> {
    // SAFETY: the prober and its configuration live as long as the worker.
    unsafe { (*(*p.prober).kcf).health.as_ref() }
}

unsafe fn kind_of(p: &Probe) -> Kind {
    // SAFETY: the prober lives as long as the worker.
    unsafe { (*p.prober).kind }
}

/// The prober's interval, timeout and port (its directive's).
unsafe fn timing(pr: &Prober) -> Option<(u64, u64, Option<u16>)> {
    // SAFETY: the configuration lives as long as the worker.
    let kcf = unsafe { &*pr.kcf };
    match pr.kind {
        Kind::Health => kcf.health.as_ref().map(|c| (c.interval_ms, c.timeout_ms, c.port)),
        Kind::Load => kcf.load_report.as_ref().map(|c| (c.interval_ms, c.timeout_ms, c.port)),
    }
}

/// Starts the probers of a worker (init_process of the one process that probes).
pub unsafe fn start(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: cycle is the worker's cycle; the http main conf holds the upstream list.
    unsafe {
        let Some(main_conf) = cycle_main_conf(cycle) else { return Status::NGX_OK.into() };
        for (uscf, kcf) in kylin_upstreams(main_conf) {
            if (*uscf).shm_zone.is_null() {
                continue;
            }
            for kind in [Kind::Health, Kind::Load] {
                if kind == Kind::Health && kcf.health.is_none() || kind == Kind::Load && kcf.load_report.is_none() {
                    continue;
                }
                // Lives as long as the worker process (never freed: the process ends with it).
                let p = Box::into_raw(Box::new(Prober {
                    kind,
                    // SAFETY: an all-zero event is its initial state (as ngx_pcalloc gives).
                    tick: core::mem::zeroed(),
                    cycle,
                    kcf,
                    uscf,
                    probes: Vec::new(),
                }));
                (*p).tick.data = p as *mut c_void;
                (*p).tick.handler = Some(tick);
                (*p).tick.log = (*cycle).log;
                // Graceful shutdown does not wait for the next round.
                (*p).tick.set_cancelable(1);
                // The first round right away (the first event loop iteration).
                ngx_add_timer(&mut (*p).tick, 1);
                probers().push(p as usize);
            }
        }
    }
    Status::NGX_OK.into()
}

/// Frees the probers of this process (`exit_process`): timers deleted, connections closed.
pub unsafe fn stop() {
    let all = core::mem::take(&mut *probers());
    for p in all {
        // SAFETY: p came from Box::into_raw in `start` and is freed only here, once; its
        // timers and connections are its own.
        unsafe {
            let mut pr = Box::from_raw(p as *mut Prober);
            if pr.tick.timer_set() != 0 {
                ngx_del_timer(&mut pr.tick);
            }
            for probe in &mut pr.probes {
                if probe.timer.timer_set() != 0 {
                    ngx_del_timer(&mut probe.timer);
                }
                close(probe);
            }
        }
    }
}

/// One server as the peer list has it.
struct Peer {
    name: Vec<u8>,
    host: Vec<u8>,
    sockaddr: Vec<u8>,
}

/// The servers (primary, then backup) of an upstream, copied under each list's read lock.
unsafe fn peers_of(uscf: *mut ngx_http_upstream_srv_conf_t) -> Vec<Peer> {
    let mut out = Vec::new();
    // SAFETY: in a worker, peer.data is the upstream's (zone) primary list, `next` its backup
    // list; each list's peers are read with its lock held, one list at a time.
    unsafe {
        for_each_peer((*uscf).peer.data as *mut ngx_http_upstream_rr_peers_t, |peer| {
            if !peer.sockaddr.is_null() && peer.socklen > 0 {
                let host = if peer.server.len > 0 { peer.server.as_bytes() } else { peer.name.as_bytes() };
                out.push(Peer {
                    name: peer.name.as_bytes().to_vec(),
                    host: host.to_vec(),
                    // SAFETY: sockaddr points to socklen bytes, live while the lock is held.
                    sockaddr: core::slice::from_raw_parts(peer.sockaddr as *const u8, peer.socklen as usize).to_vec(),
                });
            }
        });
    }
    out
}

/// Sets the port of a copied IPv4/IPv6 socket address (others, such as unix sockets, keep
/// theirs).
fn set_port(sa: &mut [u8], port: u16) {
    if sa.len() < 4 {
        return;
    }
    let family = u16::from_ne_bytes([sa[0], sa[1]]);
    if family == libc::AF_INET as u16 || family == libc::AF_INET6 as u16 {
        // sin_port and sin6_port follow the family, in network order.
        sa[2..4].copy_from_slice(&port.to_be_bytes());
    }
}

unsafe extern "C" fn tick(ev: *mut ngx_event_t) {
    // SAFETY: ev is a Prober's tick; the prober lives as long as the worker.
    unsafe {
        let pr = &mut *((*ev).data as *mut Prober);
        if ngx::ffi::ngx_exiting != 0 || ngx::ffi::ngx_quit != 0 || ngx::ffi::ngx_terminate != 0 || !ptr::eq(ngx::ffi::ngx_cycle, pr.cycle) {
            return;
        }
        let kcf = &*pr.kcf;
        let Some((interval_ms, _, port)) = timing(pr) else { return };
        for p in &mut pr.probes {
            p.seen = false;
        }
        for peer in peers_of(pr.uscf) {
            let i = match pr.probes.iter().position(|p| p.name == peer.name) {
                Some(i) => i,
                None => {
                    let mut sockaddr = peer.sockaddr;
                    if let Some(port) = port {
                        set_port(&mut sockaddr, port);
                    }
                    let (key, request) = match (pr.kind, kcf.health.as_ref(), kcf.load_report.as_ref()) {
                        (Kind::Health, Some(c), _) => (load::health_key(&kcf.name, &peer.name), c.request(&peer.host)),
                        (Kind::Load, _, Some(c)) => (load::report_key(&kcf.name, &peer.name), c.request(&peer.host)),
                        _ => return,
                    };
                    let slot = shm::load_slot(kcf.load_zone, key, Use::Counts);
                    let mut p = Box::new(Probe {
                        prober: pr,
                        name: peer.name,
                        name_str: ngx_str_t::default(),
                        request,
                        sockaddr,
                        conn: ptr::null_mut(),
                        // SAFETY: an all-zero event is its initial state.
                        timer: core::mem::zeroed(),
                        log: *(*ngx::ffi::ngx_cycle).log,
                        in_flight: false,
                        reused: false,
                        sent: 0,
                        answer: Vec::new(),
                        started_ms: 0,
                        slot,
                        seen: false,
                        load: None,
                    });
                    p.name_str = ngx_str_t { len: p.name.len(), data: p.name.as_mut_ptr() };
                    let raw: *mut Probe = &mut *p;
                    p.timer.data = raw as *mut c_void;
                    p.timer.handler = Some(probe_timeout);
                    p.timer.log = (*ngx::ffi::ngx_cycle).log;
                    // nginx's own messages about the connection end "while checking the health
                    // of ..." (see log_handler).
                    p.log.action = ptr::null_mut();
                    p.log.handler = Some(log_handler);
                    p.log.data = raw as *mut c_void;
                    pr.probes.push(p);
                    pr.probes.len() - 1
                }
            };
            let p = &mut pr.probes[i];
            p.seen = true;
            if !p.in_flight {
                begin(p);
            }
        }
        // Servers gone from the list (`resolve`): forget them once idle.
        pr.probes.retain_mut(|p| {
            if p.seen || p.in_flight {
                return true;
            }
            close(p);
            false
        });
        ngx_add_timer(ev, interval_ms as ngx_msec_t);
    }
}

/// Ends nginx's messages about a probe's connection with what it is for.
unsafe extern "C" fn log_handler(log: *mut ngx::ffi::ngx_log_t, buf: *mut u8, len: usize) -> *mut u8 {
    // SAFETY: nginx passes the log (whose data is its probe, alive as long as the log) and the
    // room left in its message buffer.
    unsafe {
        let p = &*((*log).data as *const Probe);
        let kcf = &*(*p.prober).kcf;
        let what = if (*p.prober).kind == Kind::Load { "fetching the load report" } else { "checking the health" };
        let text = format!(
            " while {} of server {} of upstream \"{}\"",
            what,
            String::from_utf8_lossy(&p.name),
            String::from_utf8_lossy(&kcf.name)
        );
        let n = text.len().min(len);
        ptr::copy_nonoverlapping(text.as_ptr(), buf, n);
        buf.add(n)
    }
}

/// Closes the probe's connection, if any.
unsafe fn close(p: &mut Probe) {
    if !p.conn.is_null() {
        // SAFETY: conn is a connection this probe opened and still owns.
        unsafe { ngx_close_connection(p.conn) };
        p.conn = ptr::null_mut();
    }
}

/// Starts a probe: on the kept-alive connection if there is one, else on a new one.
unsafe fn begin(p: &mut Probe) {
    // SAFETY: the prober's configuration lives as long as the worker.
    let Some(timeout) = (unsafe { timing(&*p.prober) }).map(|t| t.1) else { return };
    p.in_flight = true;
    p.load = None;
    p.sent = 0;
    p.answer.clear();
    // SAFETY: reading nginx's cached clock in its own thread.
    p.started_ms = unsafe { ngx::ffi::ngx_current_msec };
    // SAFETY: the timer is the probe's own, not armed while no probe is in flight.
    unsafe { ngx_add_timer(&mut p.timer, timeout as ngx_msec_t) };
    if !p.conn.is_null() {
        p.reused = true;
        // SAFETY: the kept-alive connection is ours; it is no longer idle.
        unsafe {
            (*p.conn).set_idle(0);
            send(p);
        }
        return;
    }
    // SAFETY: as in connect.
    unsafe { connect(p) };
}

/// Opens a new connection and sends the request on it (or waits for it to be writable).
unsafe fn connect(p: &mut Probe) {
    p.reused = false;
    // SAFETY: a zeroed peer connection is its initial state; nginx reads sockaddr, socklen,
    // name and log from it and calls `get` (a no-op); the sockaddr and name buffers live in the
    // probe, which outlives the connection attempt.
    unsafe {
        let mut pc: ngx_peer_connection_t = core::mem::zeroed();
        pc.sockaddr = p.sockaddr.as_mut_ptr() as *mut ngx::ffi::sockaddr;
        pc.socklen = p.sockaddr.len() as ngx::ffi::socklen_t;
        pc.name = &mut p.name_str;
        pc.get = Some(ngx_event_get_peer);
        pc.log = &mut p.log;
        pc.set_log_error(ngx::ffi::ngx_connection_log_error_e_NGX_ERROR_INFO as _);
        let rc = ngx_event_connect_peer(&mut pc);
        if Status(rc) == Status::NGX_ERROR || Status(rc) == Status::NGX_BUSY || Status(rc) == Status::NGX_DECLINED {
            if !pc.connection.is_null() {
                ngx_close_connection(pc.connection);
            }
            finish(p, Outcome::Fail(Reason::Connect, 0), false);
            return;
        }
        let c = pc.connection;
        p.conn = c;
        (*c).data = p as *mut Probe as *mut c_void;
        (*(*c).read).handler = Some(on_read);
        (*(*c).write).handler = Some(on_write);
        if Status(rc) == Status::NGX_AGAIN {
            // Connecting: the write event says when it is done.
            return;
        }
        send(p);
    }
}

unsafe extern "C" fn on_write(wev: *mut ngx_event_t) {
    // SAFETY: wev belongs to a connection whose data is its probe.
    unsafe {
        let c = (*wev).data as *mut ngx_connection_t;
        let p = &mut *((*c).data as *mut Probe);
        if p.in_flight && p.sent < p.request.len() {
            send(p);
        }
    }
}

/// Sends what is left of the request, then reads.
unsafe fn send(p: &mut Probe) {
    // SAFETY: the probe's connection is open; its send function is nginx's.
    unsafe {
        let c = p.conn;
        let Some(send) = (*c).send else {
            fail_conn(p, Reason::Connect);
            return;
        };
        while p.sent < p.request.len() {
            let n = send(c, p.request.as_mut_ptr().add(p.sent), p.request.len() - p.sent);
            if n > 0 {
                p.sent += n as usize;
            } else if n == NGX_AGAIN as isize {
                if !Status(ngx_handle_write_event((*c).write, 0)).is_ok() {
                    fail_conn(p, Reason::Connect);
                }
                return;
            } else if p.reused {
                // The kept-alive connection had been closed: once more, on a new one.
                close(p);
                connect(p);
                return;
            } else {
                fail_conn(p, Reason::Connect);
                return;
            }
        }
        read(p);
    }
}

unsafe extern "C" fn on_read(rev: *mut ngx_event_t) {
    // SAFETY: rev belongs to a connection whose data is its probe.
    unsafe {
        let c = (*rev).data as *mut ngx_connection_t;
        let p = &mut *((*c).data as *mut Probe);
        if !p.in_flight || (*c).close() != 0 {
            // An idle kept-alive connection: the server closed it, sent something unasked,
            // or nginx is shutting down (it closes idle connections this way).
            if p.in_flight {
                fail_conn(p, Reason::Closed);
            } else {
                close(p);
            }
            return;
        }
        if p.sent < p.request.len() {
            // Readable before the request is sent: wait for the write side.
            return;
        }
        read(p);
    }
}

/// Reads and parses what has arrived.
unsafe fn read(p: &mut Probe) {
    let mut buf = [0u8; 16384];
    // SAFETY: the probe's connection is open; its recv function is nginx's.
    unsafe {
        let c = p.conn;
        let Some(recv) = (*c).recv else {
            fail_conn(p, Reason::Closed);
            return;
        };
        loop {
            let n = recv(c, buf.as_mut_ptr(), buf.len());
            let eof = n == 0;
            if n > 0 {
                p.answer.extend_from_slice(&buf[..n as usize]);
            } else if n == NGX_AGAIN as isize {
                if !Status(ngx_handle_read_event((*c).read, 0)).is_ok() {
                    fail_conn(p, Reason::Closed);
                }
                return;
            } else if !eof {
                fail_conn(p, Reason::Closed);
                return;
            }
            if (eof || n < 0) && p.answer.is_empty() && p.reused {
                // The kept-alive connection had been closed: once more, on a new one.
                close(p);
                connect(p);
                return;
            }
            let kind = kind_of(p);
            let max = if kind == Kind::Load { load_report::MAX_BODY } else { health::MAX_RESPONSE };
            match health::parse_answer_max(&p.answer, eof, max) {
                Parsed::Partial if !eof => continue,
                Parsed::Partial | Parsed::Invalid => {
                    fail_conn(p, if eof && p.answer.len() < max { Reason::Closed } else { Reason::Invalid });
                    return;
                }
                Parsed::Complete(a) => {
                    let outcome = if kind == Kind::Load {
                        let kcf = &*(*p.prober).kcf;
                        p.load = kcf.load_report.as_ref().map(|c| load_report::judge(c, a.status, &a.body));
                        Outcome::Pass
                    } else {
                        conf_of(p).map_or(Outcome::Pass, |conf| conf.judge(a.status, &a.body))
                    };
                    let keep = a.keepalive && !eof && ngx::ffi::ngx_exiting == 0;
                    finish(p, outcome, keep);
                    return;
                }
            }
        }
    }
}

/// Fails the probe and closes its connection.
unsafe fn fail_conn(p: &mut Probe, reason: Reason) {
    // SAFETY: as in finish.
    unsafe { finish(p, Outcome::Fail(reason, 0), false) };
}

unsafe extern "C" fn probe_timeout(ev: *mut ngx_event_t) {
    // SAFETY: ev is a probe's timer; the probe lives while its timer is armed.
    unsafe {
        let p = &mut *((*ev).data as *mut Probe);
        if p.in_flight {
            finish(p, Outcome::Fail(Reason::Timeout, 0), false);
        }
    }
}

/// Ends a probe: records its outcome in the server's health slot, and keeps the connection
/// for the next probe (`keep`) or closes it.
unsafe fn finish(p: &mut Probe, outcome: Outcome, keep: bool) {
    p.in_flight = false;
    // SAFETY: the timer is the probe's own.
    unsafe {
        if p.timer.timer_set() != 0 {
            ngx_del_timer(&mut p.timer);
        }
    }
    if keep && !p.conn.is_null() {
        // SAFETY: the connection is ours and open.
        unsafe {
            let c = p.conn;
            (*c).set_idle(1);
            if (*(*c).read).timer_set() != 0 {
                ngx_del_timer((*c).read);
            }
            if (*(*c).write).timer_set() != 0 {
                ngx_del_timer((*c).write);
            }
        }
    } else {
        // SAFETY: as in close.
        unsafe { close(p) };
    }
    // SAFETY: the prober lives as long as the worker.
    if unsafe { kind_of(p) } == Kind::Load {
        record_load(p, outcome);
        return;
    }
    // SAFETY: the configuration lives as long as the worker.
    let Some(conf) = (unsafe { conf_of(p) }) else { return };
    let Some(slot) = p.slot else { return };
    // SAFETY: reading nginx's cached clock in its own thread.
    let elapsed = unsafe { ngx::ffi::ngx_current_msec }.wrapping_sub(p.started_ms) as u64;
    let now_ms = health::unix_ms();
    // Only this process writes a server's record (one prober per upstream, in worker 0).
    let mut h = Health::unpack(slot.cell(cell::STATE).load(Ordering::Relaxed));
    let before = h.state();
    let t = h.record(conf, outcome);
    slot.cell(cell::STATE).store(h.pack(), Ordering::Relaxed);
    slot.cell(cell::LAST_CHECK_MS).store(now_ms, Ordering::Relaxed);
    slot.cell(cell::LAST_DURATION_US).store(elapsed.saturating_mul(1000), Ordering::Relaxed);
    let failed = matches!(outcome, Outcome::Fail(..));
    slot.cell(cell::COUNTS).fetch_add(1 | (u64::from(failed) << 32), Ordering::Relaxed);
    if failed {
        slot.cell(cell::LAST_FAIL_MS).store(now_ms, Ordering::Relaxed);
    }
    if t == Transition::Up {
        slot.cell(cell::UP_SINCE_MS).store(now_ms, Ordering::Relaxed);
        // Back from unhealthy: its slow start begins (a first check passing is no return).
        if before == health::State::Unhealthy {
            slot.cell(cell::RAMP_MS).store(now_ms, Ordering::Relaxed);
        }
    }
    if t != Transition::None {
        // SAFETY: the prober's configuration lives as long as the worker; the cycle's log too.
        unsafe {
            let kcf = &*(*p.prober).kcf;
            let reason = match outcome {
                Outcome::Fail(r, _) => r.as_str(),
                Outcome::Pass => "",
            };
            ngx_log_error!(
                NGX_LOG_WARN,
                (*ngx::ffi::ngx_cycle).log,
                "kylin: upstream \"{}\": server {} is {} (health check {}{}{}, was {})",
                String::from_utf8_lossy(&kcf.name),
                String::from_utf8_lossy(&p.name),
                h.state().as_str(conf.mandatory),
                if reason.is_empty() { "passed" } else { "failed: " },
                reason,
                match outcome {
                    Outcome::Fail(Reason::Status, s) => format!(" {s}"),
                    _ => String::new(),
                },
                before.as_str(conf.mandatory)
            );
        }
    }
}

/// Records a load probe's result in the server's report slot: the values and the time of a
/// good report, or the failure (the last good report stays, and turns stale in time).
fn record_load(p: &mut Probe, outcome: Outcome) {
    let Some(slot) = p.slot else { return };
    let result = p.load.take().unwrap_or(Err(match outcome {
        Outcome::Fail(Reason::Connect, _) => Failure::Connect,
        Outcome::Fail(Reason::Timeout, _) => Failure::Timeout,
        Outcome::Fail(Reason::Closed, _) => Failure::Closed,
        _ => Failure::Invalid,
    }));
    let now_ms = health::unix_ms();
    // Only this process writes a server's report (one prober per upstream, in worker 0).
    match result {
        Ok(values) => {
            for (i, v) in values.iter().enumerate() {
                slot.cell(load_report::cell::VALUE + i).store(*v, Ordering::Relaxed);
            }
            slot.cell(load_report::cell::AT_MS).store(now_ms, Ordering::Relaxed);
            slot.cell(load_report::cell::COUNTS).fetch_add(1, Ordering::Relaxed);
        }
        Err(f) => {
            slot.cell(load_report::cell::COUNTS).fetch_add(1 | (1 << 32), Ordering::Relaxed);
            slot.cell(load_report::cell::LAST_FAIL_MS).store(now_ms, Ordering::Relaxed);
            slot.cell(load_report::cell::LAST_FAIL).store(f as u64, Ordering::Relaxed);
        }
    }
}
