//! The status document (pure Rust, no FFI): what `kylin_status` reports, as JSON.
//!
//! The glue (`status.rs`) fills these structures from nginx's peers and the shared counters;
//! this module only formats them, so the format is unit-tested. Schema version 1.

use serde_json::{json, Map, Value};

/// One server of a kylin upstream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerReport {
    /// The address nginx connects to (`10.0.0.7:7070`).
    pub address: String,
    /// The `server` directive's argument as written (a name may resolve to several addresses).
    pub server: String,
    pub weight: u64,
    pub backup: bool,
    /// `up`, `down` (marked `down`), `failed` (max_fails reached within fail_timeout).
    pub state: &'static str,
    /// The server has a slot in the load zone. Without one (the zone is full) its load is
    /// not counted: `in_flight` and the request counts read 0 and the bound ignores it.
    pub load_slot: bool,
    pub in_flight: u64,
    pub requests: u64,
    pub sticky: u64,
    pub learned: u64,
    pub spilled_in: u64,
    pub spilled_out: u64,
    pub failover: u64,
    pub backup_requests: u64,
    pub failures: u64,
    /// Requests that came here because placement moved their client here.
    pub moved: u64,
    /// Clients placement has moved here (`kylin_balance clients`; `None` otherwise).
    pub clients_moved_in: Option<u64>,
    /// The server's active health check (`kylin_health_check`; `None` otherwise).
    pub health: Option<HealthReport>,
    /// Learned sessions (live routes) that lead to this server: what it still holds while it
    /// drains; `None` without a routes zone.
    pub sessions: Option<u64>,
    /// The share (0 to 1) of new clients the server takes while it ramps up after coming back
    /// (`kylin_slow_start`); `None` when it is not ramping.
    pub slow_start: Option<f64>,
    /// The load the server reports (`kylin_load_report`; `None` otherwise).
    pub load_report: Option<LoadReportReport>,
}

/// A server's load report, from its report slot's cells ([`crate::load_report::cell`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReportReport {
    /// `missing` (no report yet, or no slot), `stale`, `fresh`, `saturated`.
    pub state: &'static str,
    /// Placement uses the report now: it is fresh and the upstream places clients.
    pub used: bool,
    /// Unix ms of the last good report; 0 for never.
    pub last_report_ms: u64,
    /// Milliseconds since then (`None` for never).
    pub age_ms: Option<u64>,
    /// Each `busy=` condition as written, its metric's last value (`None`: absent from the
    /// page, or never reported), and whether it holds.
    pub conditions: Vec<(String, Option<f64>, bool)>,
    pub fetches: u64,
    pub failures: u64,
    pub last_failure_ms: u64,
    pub last_failure_reason: Option<&'static str>,
}

impl LoadReportReport {
    /// The load report of a server, from its report slot (`missing` without one: the zone
    /// is full).
    pub fn of(table: Option<&crate::load::LoadTable<'_>>, conf: &crate::load_report::ReportConf, upstream: &[u8], server: &[u8], now_ms: u64, used: bool) -> LoadReportReport {
        let cells = table.and_then(|t| t.find(crate::load::report_key(upstream, server))).map(|s| s.cells());
        LoadReportReport::from_cells(conf, cells.as_ref(), now_ms, used)
    }

    /// The report of a report slot's cells (`None`: the server has no slot), at Unix `now_ms`;
    /// `places` says the upstream places clients (`kylin_balance clients`).
    pub fn from_cells(conf: &crate::load_report::ReportConf, cells: Option<&[u64; 8]>, now_ms: u64, places: bool) -> LoadReportReport {
        use crate::load_report::{cell, verdict, Failure, ABSENT, MAX_CONDITIONS};
        let c = cells.copied().unwrap_or([0; 8]);
        let at = c[cell::AT_MS];
        let values = &c[cell::VALUE..cell::VALUE + MAX_CONDITIONS];
        let v = verdict(conf, at, values, now_ms);
        let fresh = matches!(v, crate::load_report::Verdict::Fresh { .. });
        let failure = Failure::from_bits(c[cell::LAST_FAIL]);
        LoadReportReport {
            state: v.as_str(),
            used: fresh && places,
            last_report_ms: at,
            age_ms: (at != 0).then(|| now_ms.saturating_sub(at)),
            conditions: conf
                .busy
                .iter()
                .zip(values)
                .map(|(b, &bits)| {
                    let value = (at != 0 && bits != ABSENT).then(|| f64::from_bits(bits)).filter(|x| !x.is_nan());
                    (b.text.clone(), value, fresh && value.is_some_and(|x| b.holds(x)))
                })
                .collect(),
            fetches: c[cell::COUNTS] & 0xffff_ffff,
            failures: c[cell::COUNTS] >> 32,
            last_failure_ms: c[cell::LAST_FAIL_MS],
            last_failure_reason: (failure != Failure::None).then(|| failure.as_str()),
        }
    }
}

fn load_report_json(r: &LoadReportReport) -> Value {
    json!({
        "state": r.state,
        "used": r.used,
        "last_report": unix_seconds(r.last_report_ms),
        "age": r.age_ms.map(|a| a as f64 / 1000.0),
        "conditions": r.conditions.iter().map(|(busy, value, holds)| json!({"busy": busy, "value": value, "holds": holds})).collect::<Vec<_>>(),
        "fetches": r.fetches,
        "failures": r.failures,
        "last_failure": unix_seconds(r.last_failure_ms),
        "last_failure_reason": r.last_failure_reason,
    })
}

/// A server's health-check record, from its health slot's cells
/// ([`crate::health::cell`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HealthReport {
    pub state: &'static str,
    pub checks: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    pub consecutive_passes: u64,
    /// Unix ms; 0 for never.
    pub last_check_ms: u64,
    pub last_duration_us: u64,
    pub last_failure_ms: u64,
    pub last_failure_reason: Option<String>,
    pub healthy_since_ms: u64,
}

impl HealthReport {
    /// The health-check report of a server, from its health slot (an unchecked record when
    /// the slot is missing: the zone is full).
    pub fn of(table: Option<&crate::load::LoadTable<'_>>, upstream: &[u8], server: &[u8], mandatory: bool) -> HealthReport {
        let slot = table.and_then(|t| t.find(crate::load::health_key(upstream, server)));
        let mut cells = [0u64; 8];
        if let Some(s) = slot {
            for (i, c) in cells.iter_mut().enumerate() {
                *c = s.cell(i).load(core::sync::atomic::Ordering::Relaxed);
            }
        }
        HealthReport::from_cells(&cells, mandatory)
    }

    /// The report of a health slot's cells.
    pub fn from_cells(cells: &[u64; 8], mandatory: bool) -> HealthReport {
        use crate::health::{cell, Health, Reason};
        let h = Health::unpack(cells[cell::STATE]);
        let reason = match h.last_reason {
            Reason::None => None,
            Reason::Status => Some(format!("status {}", h.last_status)),
            r => Some(r.as_str().to_string()),
        };
        HealthReport {
            state: h.state().as_str(mandatory),
            checks: cells[cell::COUNTS] & 0xffff_ffff,
            failures: cells[cell::COUNTS] >> 32,
            consecutive_failures: u64::from(h.fails),
            consecutive_passes: u64::from(h.passes),
            last_check_ms: cells[cell::LAST_CHECK_MS],
            last_duration_us: cells[cell::LAST_DURATION_US],
            last_failure_ms: cells[cell::LAST_FAIL_MS],
            last_failure_reason: reason,
            healthy_since_ms: cells[cell::UP_SINCE_MS],
        }
    }

    /// Whether it keeps the server from taking requests.
    pub fn holds_back(&self) -> bool {
        matches!(self.state, "unhealthy" | "checking")
    }
}

/// Unix ms as seconds, `null` for 0 (never).
fn unix_seconds(ms: u64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        Value::from(ms as f64 / 1000.0)
    }
}

fn health_json(h: &HealthReport) -> Value {
    json!({
        "state": h.state,
        "checks": h.checks,
        "failures": h.failures,
        "consecutive_failures": h.consecutive_failures,
        "consecutive_passes": h.consecutive_passes,
        "last_check": unix_seconds(h.last_check_ms),
        "last_check_ms": h.last_duration_us as f64 / 1000.0,
        "last_failure": unix_seconds(h.last_failure_ms),
        "last_failure_reason": h.last_failure_reason,
        "healthy_since": unix_seconds(h.healthy_since_ms),
    })
}

/// A shared session table, zone-wide: the learned routes, or a store's cache of answers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableReport {
    pub zone: String,
    pub entries: u64,
    pub capacity: u64,
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: u64,
    pub expired: u64,
}

/// The module-wide load zone (`kylin_load`): its slots hold the shared counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadZoneReport {
    pub zone: String,
    pub capacity: u64,
    pub slots_used: u64,
    /// Claims that found the zone full, since it was created (each attempt counts).
    pub claims_failed: u64,
    /// Slots of servers no longer configured that were reclaimed, since it was created.
    pub reclaimed: u64,
    /// The running configuration's generation (one more per reload, failed ones included).
    pub generation: u64,
}

/// A session store.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreReport {
    /// `redis`, `redis-cluster` or `shared`.
    pub kind: &'static str,
    /// URLs with credentials hidden.
    pub urls: Vec<String>,
    /// `closed`, `open`, `half-open`.
    pub breaker: &'static str,
    pub lookups: u64,
    pub errors: u64,
    pub timeouts: u64,
    /// Lookups not made because the breaker was open.
    pub skipped: u64,
    /// Total time of all lookups, seconds.
    pub latency_seconds: f64,
    /// The shared cache of answers (zone-wide): entries, capacity, hits, misses, evictions.
    pub cache: Option<TableReport>,
}

/// One kylin upstream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpstreamReport {
    pub name: String,
    /// `kylin_balance`: `clients`, `requests` or `off`.
    pub balance: &'static str,
    /// Clients moved off their home right now (`kylin_balance clients`; `None` otherwise).
    pub moved_clients: Option<u64>,
    /// `None` when bounding is off.
    pub balance_factor_milli: Option<u32>,
    pub session_cookie: String,
    pub in_flight: u64,
    pub live_weight: u64,
    /// The most requests a server of weight 1 may have in flight before movable requests
    /// spill, right now; `None` when bounding is off.
    pub bound_per_weight: Option<u64>,
    pub servers: Vec<ServerReport>,
    pub routes: Option<TableReport>,
    /// `kylin_session_routes timeout=`, seconds.
    pub routes_timeout_seconds: i64,
    pub store: Option<StoreReport>,
}

impl UpstreamReport {
    fn decisions(&self) -> Value {
        let sum = |f: fn(&ServerReport) -> u64| self.servers.iter().map(f).sum::<u64>();
        json!({
            "sticky": sum(|s| s.sticky),
            "learned": sum(|s| s.learned),
            "spilled": sum(|s| s.spilled_in),
            "failover": sum(|s| s.failover),
            "backup": sum(|s| s.backup_requests),
            "moved": sum(|s| s.moved),
        })
    }
}

fn server_json(s: &ServerReport) -> Value {
    json!({
        "address": s.address,
        "server": s.server,
        "weight": s.weight,
        "backup": s.backup,
        "state": s.state,
        "load_slot": s.load_slot,
        "in_flight": s.in_flight,
        "requests": s.requests,
        "sticky": s.sticky,
        "learned": s.learned,
        "spilled_in": s.spilled_in,
        "spilled_out": s.spilled_out,
        "failover": s.failover,
        "backup_requests": s.backup_requests,
        "failures": s.failures,
        "moved": s.moved,
        "clients_moved_in": s.clients_moved_in,
        "health": s.health.as_ref().map(health_json),
        "sessions": s.sessions,
        "slow_start": s.slow_start,
        "load_report": s.load_report.as_ref().map(load_report_json),
    })
}

fn store_json(s: &StoreReport) -> Value {
    json!({
        "kind": s.kind,
        "urls": s.urls,
        "breaker": if s.kind == "shared" { Value::Null } else { Value::from(s.breaker) },
        "lookups": s.lookups,
        "errors": s.errors,
        "timeouts": s.timeouts,
        "skipped": s.skipped,
        "mean_latency_ms": if s.lookups > 0 { s.latency_seconds * 1000.0 / s.lookups as f64 } else { 0.0 },
        "cache": s.cache.as_ref().map(|c| json!({
            "zone": c.zone,
            "entries": c.entries,
            "capacity": c.capacity,
            "hits": c.hits,
            "misses": c.misses,
            "evictions": c.evictions,
        })),
    })
}

fn routes_json(r: &TableReport, timeout_seconds: i64) -> Value {
    json!({
        "zone": r.zone,
        "entries": r.entries,
        "capacity": r.capacity,
        "hits": r.hits,
        "misses": r.misses,
        "inserts": r.inserts,
        "evictions": r.evictions,
        "expired": r.expired,
        "timeout_seconds": timeout_seconds,
    })
}

fn load_zone_json(z: &LoadZoneReport) -> Value {
    json!({
        "zone": z.zone,
        "capacity": z.capacity,
        "slots_used": z.slots_used,
        "claims_failed": z.claims_failed,
        "reclaimed": z.reclaimed,
        "generation": z.generation,
    })
}

/// The JSON document.
pub fn to_json(nginx_version: &str, now: i64, upstreams: &[UpstreamReport], load_zone: Option<&LoadZoneReport>) -> String {
    let mut ups = Map::new();
    for u in upstreams {
        ups.insert(
            u.name.clone(),
            json!({
                "balance": u.balance,
                "moved_clients": u.moved_clients,
                "balance_factor": u.balance_factor_milli.map(|m| f64::from(m) / 1000.0),
                "session_cookie": u.session_cookie,
                "in_flight": u.in_flight,
                "live_weight": u.live_weight,
                "bound_per_weight": u.bound_per_weight,
                "decisions": u.decisions(),
                "session_routes": u.routes.as_ref().map(|r| routes_json(r, u.routes_timeout_seconds)),
                "session_store": u.store.as_ref().map(store_json),
                "servers": u.servers.iter().map(server_json).collect::<Vec<_>>(),
            }),
        );
    }
    let doc = json!({
        "version": 1,
        "nginx_version": nginx_version,
        "time": now,
        "load_zone": load_zone.map(load_zone_json),
        "upstreams": ups,
    });
    let mut s = doc.to_string();
    s.push('\n');
    s
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Accumulates metric families so that each has one HELP/TYPE header followed by its samples.
struct Families {
    order: Vec<&'static str>,
    help: std::collections::HashMap<&'static str, (&'static str, &'static str, Vec<String>)>,
}

impl Families {
    fn new() -> Families {
        Families { order: Vec::new(), help: std::collections::HashMap::new() }
    }

    fn add(&mut self, name: &'static str, kind: &'static str, help: &'static str, labels: &[(&str, &str)], value: f64) {
        let entry = self.help.entry(name).or_insert_with(|| (kind, help, Vec::new()));
        if entry.2.is_empty() && !self.order.contains(&name) {
            self.order.push(name);
        }
        let ls: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", label(v))).collect();
        let v = if value.fract() == 0.0 && value.abs() < 1e15 { format!("{}", value as i64) } else { format!("{value}") };
        entry.2.push(if ls.is_empty() { format!("{name} {v}") } else { format!("{name}{{{}}} {v}", ls.join(",")) });
    }

    fn render(self) -> String {
        let mut out = String::new();
        for name in self.order {
            let (kind, help, samples) = &self.help[name];
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for s in samples {
                out.push_str(s);
                out.push('\n');
            }
        }
        out
    }
}

/// The same data in the Prometheus text exposition format (version 0.0.4).
pub fn to_prometheus(upstreams: &[UpstreamReport], load_zone: Option<&LoadZoneReport>) -> String {
    let mut f = Families::new();
    if let Some(z) = load_zone {
        let l = [("zone", z.zone.as_str())];
        f.add("kylin_load_zone_slots", "gauge", "Slots of the load zone (each holds one server's, upstream's or store's counters).", &l, z.capacity as f64);
        f.add("kylin_load_zone_slots_used", "gauge", "Slots of the load zone in use.", &l, z.slots_used as f64);
        f.add("kylin_load_zone_claims_failed_total", "counter", "Slot claims that found the load zone full (servers left uncounted).", &l, z.claims_failed as f64);
        f.add("kylin_load_zone_reclaimed_total", "counter", "Slots of servers no longer configured that were reclaimed.", &l, z.reclaimed as f64);
    }
    for u in upstreams {
        let up = u.name.as_str();
        f.add("kylin_upstream_in_flight_requests", "gauge", "Requests in flight on the upstream, all workers.", &[("upstream", up)], u.in_flight as f64);
        f.add("kylin_upstream_live_weight", "gauge", "Sum of the weights of primary servers neither down nor failed.", &[("upstream", up)], u.live_weight as f64);
        for b in ["clients", "requests", "off"] {
            f.add("kylin_upstream_balance", "gauge", "1 for what the upstream moves off busy servers (kylin_balance: clients, requests, off).", &[("upstream", up), ("balance", b)], f64::from(u8::from(u.balance == b)));
        }
        if let Some(n) = u.moved_clients {
            f.add("kylin_upstream_moved_clients", "gauge", "Clients that placement has moved off their hot home, right now.", &[("upstream", up)], n as f64);
        }
        if let Some(m) = u.balance_factor_milli {
            f.add("kylin_upstream_balance_factor", "gauge", "The load bound factor c (absent when bounding is off).", &[("upstream", up)], f64::from(m) / 1000.0);
        }
        if let Some(b) = u.bound_per_weight {
            f.add("kylin_upstream_bound_requests", "gauge", "Most requests a server of weight 1 may have in flight before movable requests spill.", &[("upstream", up)], b as f64);
        }
        for s in &u.servers {
            let srv = s.address.as_str();
            let base = [("upstream", up), ("server", srv)];
            for state in ["up", "down", "failed", "draining", "unhealthy", "checking"] {
                let l = [("upstream", up), ("server", srv), ("state", state)];
                f.add("kylin_server_state", "gauge", "1 for the server's current state (up, down, failed, draining, unhealthy, checking).", &l, f64::from(u8::from(s.state == state)));
            }
            if let Some(h) = &s.health {
                for state in ["unchecked", "checking", "healthy", "unhealthy"] {
                    let l = [("upstream", up), ("server", srv), ("state", state)];
                    f.add("kylin_server_health", "gauge", "1 for the server's health-check state (unchecked, checking, healthy, unhealthy).", &l, f64::from(u8::from(h.state == state)));
                }
                f.add("kylin_server_health_checks_total", "counter", "Health-check probes made.", &base, h.checks as f64);
                f.add("kylin_server_health_failures_total", "counter", "Health-check probes that failed.", &base, h.failures as f64);
                f.add("kylin_server_health_consecutive_failures", "gauge", "Health-check probes failed in a row, up to now.", &base, h.consecutive_failures as f64);
                f.add("kylin_server_health_last_check_timestamp_seconds", "gauge", "When the last health-check probe ended (Unix time; 0 if never).", &base, h.last_check_ms as f64 / 1000.0);
                f.add("kylin_server_health_last_check_duration_seconds", "gauge", "How long the last health-check probe took.", &base, h.last_duration_us as f64 / 1e6);
                f.add("kylin_server_health_last_failure_timestamp_seconds", "gauge", "When a health-check probe last failed (Unix time; 0 if never).", &base, h.last_failure_ms as f64 / 1000.0);
                if let Some(r) = &h.last_failure_reason {
                    let l = [("upstream", up), ("server", srv), ("reason", r.as_str())];
                    f.add("kylin_server_health_last_failure_info", "gauge", "Why the last failed health-check probe failed (the reason label).", &l, 1.0);
                }
            }
            if let Some(r) = &s.load_report {
                for state in ["missing", "stale", "fresh", "saturated"] {
                    let l = [("upstream", up), ("server", srv), ("state", state)];
                    f.add("kylin_server_load_report", "gauge", "1 for the state of the load the server reports (missing, stale, fresh, saturated).", &l, f64::from(u8::from(r.state == state)));
                }
                f.add("kylin_server_load_report_used", "gauge", "1 while client placement uses the server's report (fresh, kylin_balance clients).", &base, f64::from(u8::from(r.used)));
                if let Some(a) = r.age_ms {
                    f.add("kylin_server_load_report_age_seconds", "gauge", "Age of the server's last good load report.", &base, a as f64 / 1000.0);
                }
                for (busy, value, _) in &r.conditions {
                    if let Some(v) = value {
                        let l = [("upstream", up), ("server", srv), ("busy", busy.as_str())];
                        f.add("kylin_server_load_report_value", "gauge", "The metric of a busy= condition in the server's last good load report.", &l, *v);
                    }
                }
                f.add("kylin_server_load_report_fetches_total", "counter", "Load-report fetches made.", &base, r.fetches as f64);
                f.add("kylin_server_load_report_failures_total", "counter", "Load-report fetches that gave no report.", &base, r.failures as f64);
            }
            f.add("kylin_server_backup", "gauge", "1 for backup servers.", &base, f64::from(u8::from(s.backup)));
            f.add("kylin_server_weight", "gauge", "The server's weight.", &base, s.weight as f64);
            f.add("kylin_server_load_slot", "gauge", "1 if the server's load is counted (it has a slot in the load zone), 0 if the zone was full.", &base, f64::from(u8::from(s.load_slot)));
            f.add("kylin_server_in_flight_requests", "gauge", "Requests in flight on the server, all workers.", &base, s.in_flight as f64);
            f.add("kylin_server_requests_total", "counter", "Requests sent to the server (every try).", &base, s.requests as f64);
            for (route, n) in [("sticky", s.sticky), ("learned", s.learned), ("spilled", s.spilled_in), ("failover", s.failover), ("backup", s.backup_requests), ("moved", s.moved)] {
                let l = [("upstream", up), ("server", srv), ("route", route)];
                f.add("kylin_server_decisions_total", "counter", "Requests sent to the server, by how the balancer chose it.", &l, n as f64);
            }
            if let Some(n) = s.clients_moved_in {
                f.add("kylin_server_clients_moved_in", "gauge", "Clients that placement moved to this server from their hot home, right now.", &base, n as f64);
            }
            if let Some(r) = s.slow_start {
                f.add("kylin_server_slow_start_ratio", "gauge", "Share of new clients a server ramping up after coming back takes now (absent when not ramping).", &base, r);
            }
            if let Some(n) = s.sessions {
                f.add("kylin_server_sessions", "gauge", "Learned sessions (live routes) that lead to the server: what it still holds while it drains.", &base, n as f64);
            }
            f.add("kylin_server_spilled_out_total", "counter", "Movable requests that left this server because it was over its bound.", &base, s.spilled_out as f64);
            f.add("kylin_server_failures_total", "counter", "Tries that failed (nginx's proxy_next_upstream failures).", &base, s.failures as f64);
        }
        if let Some(r) = &u.routes {
            let l = [("upstream", up), ("zone", r.zone.as_str())];
            f.add("kylin_session_routes_entries", "gauge", "Learned session routes stored (zone-wide).", &l, r.entries as f64);
            f.add("kylin_session_routes_capacity", "gauge", "Learned session routes the zone can hold.", &l, r.capacity as f64);
            f.add("kylin_session_routes_hits_total", "counter", "Session route lookups that found a route (zone-wide).", &l, r.hits as f64);
            f.add("kylin_session_routes_misses_total", "counter", "Session route lookups that found none (zone-wide).", &l, r.misses as f64);
            f.add("kylin_session_routes_inserts_total", "counter", "Session routes learned (zone-wide).", &l, r.inserts as f64);
            f.add("kylin_session_routes_evictions_total", "counter", "Routes evicted because the zone was full (zone-wide).", &l, r.evictions as f64);
            f.add("kylin_session_routes_expired_total", "counter", "Routes dropped after their idle timeout (zone-wide).", &l, r.expired as f64);
        }
        if let Some(st) = &u.store {
            if st.kind != "shared" {
                let l = [("upstream", up)];
                f.add("kylin_session_store_lookups_total", "counter", "Session lookups sent to the store.", &l, st.lookups as f64);
                f.add("kylin_session_store_errors_total", "counter", "Lookups that failed (connection, protocol, cluster).", &l, st.errors as f64);
                f.add("kylin_session_store_timeouts_total", "counter", "Lookups that timed out.", &l, st.timeouts as f64);
                f.add("kylin_session_store_skipped_total", "counter", "Lookups not made because the circuit breaker was open.", &l, st.skipped as f64);
                f.add("kylin_session_store_lookup_seconds_total", "counter", "Time spent in lookups.", &l, st.latency_seconds);
                if let Some(c) = &st.cache {
                    let l = [("upstream", up), ("zone", c.zone.as_str())];
                    f.add("kylin_session_cache_entries", "gauge", "Answers in the session-store cache (zone-wide).", &l, c.entries as f64);
                    f.add("kylin_session_cache_hits_total", "counter", "Cache lookups that found an answer (zone-wide).", &l, c.hits as f64);
                    f.add("kylin_session_cache_misses_total", "counter", "Cache lookups that found none (zone-wide).", &l, c.misses as f64);
                    f.add("kylin_session_cache_evictions_total", "counter", "Answers evicted because the cache was full (zone-wide).", &l, c.evictions as f64);
                }
                for state in ["closed", "open", "half-open"] {
                    let l = [("upstream", up), ("state", state)];
                    f.add("kylin_session_store_breaker_state", "gauge", "1 for the circuit breaker's current state.", &l, f64::from(u8::from(st.breaker == state)));
                }
            }
        }
    }
    f.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> UpstreamReport {
        UpstreamReport {
            name: "kylin_nodes".into(),
            balance: "requests",
            moved_clients: None,
            balance_factor_milli: Some(1250),
            session_cookie: "JSESSIONID".into(),
            in_flight: 3,
            live_weight: 2,
            bound_per_weight: Some(3),
            servers: vec![
                ServerReport { address: "10.0.0.1:7070".into(), server: "10.0.0.1:7070".into(), weight: 1, state: "up", load_slot: true, in_flight: 2, requests: 10, sticky: 7, spilled_in: 3, ..Default::default() },
                ServerReport { address: "10.0.0.2:7070".into(), server: "kylin2:7070".into(), weight: 1, state: "failed", learned: 4, spilled_out: 3, failures: 1, ..Default::default() },
            ],
            routes: Some(TableReport { zone: "kylin_session_routes".into(), entries: 4, capacity: 100, ..Default::default() }),
            routes_timeout_seconds: 28800,
            store: Some(StoreReport { kind: "redis", urls: vec!["redis://***@h:1".into()], breaker: "open", lookups: 2, latency_seconds: 0.5, ..Default::default() }),
        }
    }

    #[test]
    fn load_report_fields() {
        use crate::load_report::{cell, parse_params, ABSENT};
        let conf = parse_params(&[b"busy=spark_tasks{state=\"pending\"}>0".as_slice(), b"busy=spark_tasks_utilization>=0.9"]).unwrap();
        let now = 1_700_000_010_000;
        let mut cells = [0u64; 8];
        cells[cell::AT_MS] = now - 1500;
        cells[cell::VALUE] = 2f64.to_bits();
        cells[cell::VALUE + 1] = ABSENT;
        cells[cell::COUNTS] = 5 | (1 << 32);
        cells[cell::LAST_FAIL] = 2;
        cells[cell::LAST_FAIL_MS] = now - 4000;
        let r = LoadReportReport::from_cells(&conf, Some(&cells), now, true);
        assert_eq!((r.state, r.used, r.age_ms, r.fetches, r.failures), ("saturated", true, Some(1500), 5, 1));
        assert_eq!(r.last_failure_reason, Some("timeout"));
        assert_eq!(r.conditions[0], ("spark_tasks{state=\"pending\"}>0".to_string(), Some(2.0), true));
        assert_eq!(r.conditions[1].1, None);
        let stale = LoadReportReport::from_cells(&conf, Some(&cells), now + 60_000, true);
        assert_eq!((stale.state, stale.used, stale.conditions[0].2), ("stale", false, false));
        let none = LoadReportReport::from_cells(&conf, None, now, true);
        assert_eq!((none.state, none.used, none.age_ms), ("missing", false, None));
        assert!(!LoadReportReport::from_cells(&conf, Some(&cells), now, false).used);
        let mut u = sample();
        u.servers[0].load_report = Some(r);
        let v: Value = serde_json::from_str(&to_json("1.28.0", 1, &[u.clone()], None)).unwrap();
        let j = &v["upstreams"]["kylin_nodes"]["servers"][0]["load_report"];
        assert_eq!(j["state"], "saturated");
        assert_eq!(j["age"], 1.5);
        assert_eq!(j["conditions"][0]["value"], 2.0);
        assert_eq!(v["upstreams"]["kylin_nodes"]["servers"][1]["load_report"], Value::Null);
        let text = to_prometheus(&[u], None);
        assert!(text.contains("kylin_server_load_report{upstream=\"kylin_nodes\",server=\"10.0.0.1:7070\",state=\"saturated\"} 1\n"), "{text}");
        assert!(text.contains("kylin_server_load_report_value{upstream=\"kylin_nodes\",server=\"10.0.0.1:7070\",busy=\"spark_tasks{state=\\\"pending\\\"}>0\"} 2\n"), "{text}");
        assert!(text.contains("kylin_server_load_report_age_seconds{upstream=\"kylin_nodes\",server=\"10.0.0.1:7070\"} 1.5\n"));
    }

    #[test]
    fn health_fields() {
        use crate::health::{cell, Health, Reason, StateBits};
        let mut cells = [0u64; 8];
        let r = HealthReport::from_cells(&cells, false);
        assert_eq!((r.state, r.last_failure_reason.as_deref()), ("unchecked", None));
        assert!(!r.holds_back());
        assert_eq!(HealthReport::from_cells(&cells, true).state, "checking");
        cells[cell::STATE] = Health { state: StateBits(2), fails: 3, passes: 0, last_reason: Reason::Status, last_status: 503 }.pack();
        cells[cell::COUNTS] = 9 | (4 << 32);
        cells[cell::LAST_CHECK_MS] = 1_700_000_000_250;
        cells[cell::LAST_DURATION_US] = 1500;
        let r = HealthReport::from_cells(&cells, false);
        assert!(r.holds_back());
        assert_eq!((r.checks, r.failures), (9, 4));
        let mut u = sample();
        u.servers[0].health = Some(r);
        u.servers[0].state = "unhealthy";
        let v: Value = serde_json::from_str(&to_json("1.28.3", 0, &[u.clone()], None)).unwrap();
        let h = &v["upstreams"]["kylin_nodes"]["servers"][0]["health"];
        assert_eq!(h["state"], "unhealthy");
        assert_eq!(h["consecutive_failures"], 3);
        assert_eq!(h["last_failure_reason"], "status 503");
        assert_eq!(h["last_check"], 1_700_000_000.25);
        assert_eq!(h["last_check_ms"], 1.5);
        assert_eq!(h["last_failure"], Value::Null);
        assert_eq!(v["upstreams"]["kylin_nodes"]["servers"][1]["health"], Value::Null);
        let text = to_prometheus(&[u], None);
        assert!(text.contains("kylin_server_health{upstream=\"kylin_nodes\",server=\"10.0.0.1:7070\",state=\"unhealthy\"} 1\n"), "{text}");
        assert!(text.contains("kylin_server_health_last_failure_info{upstream=\"kylin_nodes\",server=\"10.0.0.1:7070\",reason=\"status 503\"} 1\n"));
        assert!(text.contains("kylin_server_state{upstream=\"kylin_nodes\",server=\"10.0.0.1:7070\",state=\"unhealthy\"} 1\n"));
        assert!(!text.contains("kylin_server_health{upstream=\"kylin_nodes\",server=\"10.0.0.2:7070\""));
    }

    #[test]
    fn json_document() {
        let text = to_json("1.28.3", 1_700_000_000, &[sample()], Some(&load_zone()));
        assert!(text.ends_with('\n'));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        let u = &v["upstreams"]["kylin_nodes"];
        assert_eq!(u["balance_factor"], 1.25);
        assert_eq!(u["decisions"]["sticky"], 7);
        assert_eq!(u["decisions"]["spilled"], 3);
        assert_eq!(u["decisions"]["learned"], 4);
        assert_eq!(u["servers"][1]["state"], "failed");
        assert_eq!(u["servers"][1]["server"], "kylin2:7070");
        assert_eq!(u["session_routes"]["capacity"], 100);
        assert_eq!(u["session_store"]["breaker"], "open");
        assert_eq!(u["session_store"]["urls"][0], "redis://***@h:1");
        assert_eq!(u["servers"][0]["load_slot"], true);
        assert_eq!(u["servers"][1]["load_slot"], false);
        assert_eq!(v["load_zone"]["zone"], "kylin_load");
        assert_eq!(v["load_zone"]["slots_used"], 5);
        assert_eq!(v["load_zone"]["capacity"], 8);
        assert_eq!(v["load_zone"]["claims_failed"], 2);
        assert_eq!(v["load_zone"]["reclaimed"], 3);
        assert_eq!(v["load_zone"]["generation"], 4);
    }

    fn load_zone() -> LoadZoneReport {
        LoadZoneReport { zone: "kylin_load".into(), capacity: 8, slots_used: 5, claims_failed: 2, reclaimed: 3, generation: 4 }
    }

    #[test]
    fn prometheus_text() {
        let mut u = sample();
        u.name = "kylin\"q\\".into();
        let text = to_prometheus(&[u], Some(&load_zone()));
        // One HELP/TYPE per family, before its samples.
        assert_eq!(text.matches("# TYPE kylin_server_requests_total counter").count(), 1);
        assert!(text.contains("kylin_server_requests_total{upstream=\"kylin\\\"q\\\\\",server=\"10.0.0.1:7070\"} 10\n"), "{text}");
        assert!(text.contains("route=\"spilled\"} 3\n"));
        assert!(text.contains("kylin_upstream_balance_factor{upstream=\"kylin\\\"q\\\\\"} 1.25\n"));
        assert!(text.contains("state=\"failed\"} 1\n"));
        assert!(text.contains("kylin_session_store_lookup_seconds_total{upstream=\"kylin\\\"q\\\\\"} 0.5\n"));
        assert!(text.contains("kylin_session_store_breaker_state{upstream=\"kylin\\\"q\\\\\",state=\"open\"} 1\n"));
        assert!(text.contains("kylin_load_zone_slots{zone=\"kylin_load\"} 8\n"));
        assert!(text.contains("kylin_load_zone_slots_used{zone=\"kylin_load\"} 5\n"));
        assert!(text.contains("kylin_load_zone_claims_failed_total{zone=\"kylin_load\"} 2\n"));
        assert!(text.contains("kylin_load_zone_reclaimed_total{zone=\"kylin_load\"} 3\n"));
        assert!(text.contains("kylin_server_load_slot{upstream=\"kylin\\\"q\\\\\",server=\"10.0.0.2:7070\"} 0\n"), "{text}");
        // Every sample line: name{labels} value; counters end in _total.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, _) = line.split_once(['{', ' ']).unwrap();
            assert!(name.starts_with("kylin_"), "{line}");
            assert!(line.rsplit(' ').next().unwrap().parse::<f64>().is_ok(), "{line}");
        }
        for t in text.lines().filter(|l| l.starts_with("# TYPE") && l.ends_with("counter")) {
            assert!(t.split(' ').nth(2).unwrap().ends_with("_total"), "{t}");
        }
    }

    #[test]
    fn bounding_off_and_names_are_escaped() {
        let mut u = sample();
        u.balance_factor_milli = None;
        u.bound_per_weight = None;
        u.name = "a\"b".into();
        let v: Value = serde_json::from_str(&to_json("1", 0, &[u], None)).unwrap();
        assert!(v["upstreams"]["a\"b"]["balance_factor"].is_null());
        assert!(v["upstreams"]["a\"b"]["bound_per_weight"].is_null());
        assert!(v["load_zone"].is_null());
    }
}
