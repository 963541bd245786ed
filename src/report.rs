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
    pub in_flight: u64,
    pub requests: u64,
    pub sticky: u64,
    pub learned: u64,
    pub spilled_in: u64,
    pub spilled_out: u64,
    pub failover: u64,
    pub backup_requests: u64,
    pub failures: u64,
}

/// A session routes zone.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutesReport {
    pub zone: String,
    pub entries: u64,
    pub capacity: u64,
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: u64,
    pub expired: u64,
    pub timeout_seconds: i64,
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
    pub mean_latency_ms: f64,
}

/// One kylin upstream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpstreamReport {
    pub name: String,
    /// `None` when bounding is off.
    pub balance_factor_milli: Option<u32>,
    pub session_cookie: String,
    pub in_flight: u64,
    pub live_weight: u64,
    /// The most requests a server of weight 1 may have in flight before movable requests
    /// spill, right now; `None` when bounding is off.
    pub bound_per_weight: Option<u64>,
    pub servers: Vec<ServerReport>,
    pub routes: Option<RoutesReport>,
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
        "in_flight": s.in_flight,
        "requests": s.requests,
        "sticky": s.sticky,
        "learned": s.learned,
        "spilled_in": s.spilled_in,
        "spilled_out": s.spilled_out,
        "failover": s.failover,
        "backup_requests": s.backup_requests,
        "failures": s.failures,
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
        "mean_latency_ms": s.mean_latency_ms,
    })
}

fn routes_json(r: &RoutesReport) -> Value {
    json!({
        "zone": r.zone,
        "entries": r.entries,
        "capacity": r.capacity,
        "hits": r.hits,
        "misses": r.misses,
        "inserts": r.inserts,
        "evictions": r.evictions,
        "expired": r.expired,
        "timeout_seconds": r.timeout_seconds,
    })
}

/// The JSON document.
pub fn to_json(nginx_version: &str, now: i64, upstreams: &[UpstreamReport]) -> String {
    let mut ups = Map::new();
    for u in upstreams {
        ups.insert(
            u.name.clone(),
            json!({
                "balance_factor": u.balance_factor_milli.map(|m| f64::from(m) / 1000.0),
                "session_cookie": u.session_cookie,
                "in_flight": u.in_flight,
                "live_weight": u.live_weight,
                "bound_per_weight": u.bound_per_weight,
                "decisions": u.decisions(),
                "session_routes": u.routes.as_ref().map(routes_json),
                "session_store": u.store.as_ref().map(store_json),
                "servers": u.servers.iter().map(server_json).collect::<Vec<_>>(),
            }),
        );
    }
    let doc = json!({
        "version": 1,
        "nginx_version": nginx_version,
        "time": now,
        "upstreams": ups,
    });
    let mut s = doc.to_string();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> UpstreamReport {
        UpstreamReport {
            name: "kylin_nodes".into(),
            balance_factor_milli: Some(1250),
            session_cookie: "JSESSIONID".into(),
            in_flight: 3,
            live_weight: 2,
            bound_per_weight: Some(3),
            servers: vec![
                ServerReport { address: "10.0.0.1:7070".into(), server: "10.0.0.1:7070".into(), weight: 1, state: "up", in_flight: 2, requests: 10, sticky: 7, spilled_in: 3, ..Default::default() },
                ServerReport { address: "10.0.0.2:7070".into(), server: "kylin2:7070".into(), weight: 1, state: "failed", learned: 4, spilled_out: 3, failures: 1, ..Default::default() },
            ],
            routes: Some(RoutesReport { zone: "kylin_session_routes".into(), entries: 4, capacity: 100, ..Default::default() }),
            store: Some(StoreReport { kind: "redis", urls: vec!["redis://***@h:1".into()], breaker: "open", lookups: 2, ..Default::default() }),
        }
    }

    #[test]
    fn json_document() {
        let text = to_json("1.28.3", 1_700_000_000, &[sample()]);
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
    }

    #[test]
    fn bounding_off_and_names_are_escaped() {
        let mut u = sample();
        u.balance_factor_milli = None;
        u.bound_per_weight = None;
        u.name = "a\"b".into();
        let v: Value = serde_json::from_str(&to_json("1", 0, &[u])).unwrap();
        assert!(v["upstreams"]["a\"b"]["balance_factor"].is_null());
        assert!(v["upstreams"]["a\"b"]["bound_per_weight"].is_null());
    }
}
