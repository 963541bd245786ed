//! Session stores (pure Rust, no FFI): the `kylin_session_store` configuration, which Redis
//! key says that a session is shared, the circuit breaker, and the cached verdicts.
//!
//! Only well-formed ids are looked up: each format checks length and alphabet first, and
//! anything else is "no valid session", never a Redis command. Keys travel to Redis as RESP
//! bulk strings (binary-safe), so no value can change the command.

use base64::Engine;

/// Where the sessions of an upstream live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreMode {
    /// No store: a session's kind is unknown, so it never moves (the default).
    Off,
    /// Every session is shared by all nodes by other means (Spring Session JDBC,
    /// memcached-session-manager): any session may move; nothing is looked up.
    AllShared,
    Redis(RedisStore),
}

/// How a session id maps to the Redis key whose existence means "shared".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Format {
    /// tomcat-redis-session-manager: the key is the session id; with `strip_route`, a
    /// `.jvmRoute` suffix is removed first.
    Tomcat { strip_route: bool },
    /// Spring Session (Redis): the cookie is Base64 of the id; the session is valid while
    /// `<namespace>:sessions:expires:<id>` exists.
    Spring { namespace: String },
    /// Any layout: the id replaces `{id}` in the template.
    Template { prefix: String, suffix: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisStore {
    /// `redis://` URLs as configured (shown, redacted, on the status page and in logs);
    /// several mean Redis Cluster seed nodes.
    pub urls: Vec<String>,
    /// The same URLs with host names replaced by the addresses they resolved to when the
    /// configuration was read ([`RedisStore::resolve`]): what connections use.
    pub connect_urls: Vec<String>,
    pub cluster: bool,
    pub format: Format,
    /// Connect and read timeout, milliseconds. A request never waits longer for Redis.
    pub timeout_ms: u64,
    /// How long a "shared" answer is trusted, seconds.
    pub cache_valid: i64,
    /// How long a "not shared" answer is trusted, seconds.
    pub cache_invalid: i64,
    /// Consecutive failures that open the circuit breaker.
    pub fail_threshold: u32,
    /// How long the breaker stays open before one probe, seconds.
    pub fail_backoff: i64,
    /// Learned routes are also written to (and read from) Redis, for several nginx
    /// instances in front of one cluster.
    pub share_routes: bool,
    /// `rediss://`: TLS to every node, certificates verified.
    pub tls: bool,
    /// `ca_file=`: the CA certificates (PEM) that TLS certificates must chain to, instead of
    /// the system's; its contents are read with the configuration (`ca_pem`).
    pub ca_file: Option<String>,
    /// Shared, so that cloning the store for each thread-pool job copies no certificates.
    pub ca_pem: Option<std::sync::Arc<[u8]>>,
    /// `sentinel=NAME`: the URLs are Redis Sentinels that name the master `NAME`; the URLs'
    /// credentials and database are the master's.
    pub sentinel: Option<String>,
}

impl Default for RedisStore {
    fn default() -> RedisStore {
        RedisStore {
            urls: Vec::new(),
            connect_urls: Vec::new(),
            cluster: false,
            format: Format::Tomcat { strip_route: true },
            timeout_ms: 100,
            cache_valid: 60,
            cache_invalid: 10,
            fail_threshold: 3,
            fail_backoff: 10,
            share_routes: true,
            tls: false,
            ca_file: None,
            ca_pem: None,
            sentinel: None,
        }
    }
}

fn parse_ms(v: &str) -> Option<u64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000)
    } else {
        (v, 1000)
    };
    let n: u64 = num.parse().ok()?;
    n.checked_mul(mult).filter(|&ms| ms > 0 && ms <= 60_000)
}

fn parse_secs(v: &str) -> Option<i64> {
    let (num, mult) = match v.as_bytes().last()? {
        b's' => (&v[..v.len() - 1], 1),
        b'm' => (&v[..v.len() - 1], 60),
        b'h' => (&v[..v.len() - 1], 3600),
        b'd' => (&v[..v.len() - 1], 86400),
        _ => (v, 1),
    };
    let n: i64 = num.parse().ok()?;
    n.checked_mul(mult).filter(|&s| s > 0)
}

/// Checks a `redis://` or `rediss://` URL: scheme, host, port, optional db; returns it
/// unchanged.
fn check_url(u: &str) -> Result<String, String> {
    let rest = u
        .strip_prefix("redis://")
        .or_else(|| u.strip_prefix("rediss://"))
        .ok_or_else(|| format!("\"{}\" is not a redis:// or rediss:// URL", redact(u)))?;
    let hostpart = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let (hostport, db) = hostpart.split_once('/').unwrap_or((hostpart, ""));
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| format!("\"{}\" needs host:port", redact(u)))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("\"{}\" needs host:port", redact(u)));
    }
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(format!("\"{}\": the database must be a number", redact(u)));
    }
    Ok(u.to_string())
}

/// A URL's host (without brackets for IPv6) and port, and where the host stands in it.
fn url_host(u: &str) -> Option<(&str, u16, core::ops::Range<usize>)> {
    let start = u.find("://")? + 3;
    let rest = &u[start..];
    let at = rest.rfind('@').map_or(0, |i| i + 1);
    let hostport_end = rest[at..].find('/').map_or(rest.len(), |i| at + i);
    let hostport = &rest[at..hostport_end];
    let (host, port) = hostport.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let (host, range) = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(h) => (h, start + at + 1..start + at + 1 + h.len()),
        None => (host, start + at..start + at + host.len()),
    };
    Some((host, port, range))
}

impl RedisStore {
    /// Everything the store needs from outside before workers start: host names resolved
    /// ([`RedisStore::resolve`]) and the CA file read. Run when the configuration is read, so
    /// that a problem fails `nginx -t`.
    pub fn prepare(&mut self) -> Result<(), String> {
        self.resolve()?;
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("cannot read ca_file \"{path}\": {e}"))?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(format!("ca_file \"{path}\" holds no PEM certificate"));
            }
            self.ca_pem = Some(pem.into());
        }
        Ok(())
    }

    /// Resolves the host names of the URLs now (at configuration time, as nginx resolves
    /// `server` names), so that no lookup ever waits for DNS; `nginx -s reload` follows DNS
    /// changes. An IP address stays as it is. With TLS a name is checked but kept: the
    /// server's certificate is verified against it (it is resolved again when connecting).
    pub fn resolve(&mut self) -> Result<(), String> {
        use std::net::{IpAddr, ToSocketAddrs};
        let mut out = Vec::with_capacity(self.urls.len());
        for u in &self.urls {
            let (host, port, range) = url_host(u).ok_or_else(|| format!("\"{}\" needs host:port", redact(u)))?;
            if host.parse::<IpAddr>().is_ok() {
                out.push(u.clone());
                continue;
            }
            let addr = (host, port)
                .to_socket_addrs()
                .map_err(|e| format!("host not found in \"{}\": {e}", redact(u)))?
                .next()
                .ok_or_else(|| format!("host not found in \"{}\"", redact(u)))?;
            if self.tls {
                out.push(u.clone());
                continue;
            }
            let ip = match addr.ip() {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            };
            let (a, b) = (&u[..range.start], &u[range.end..]);
            out.push(format!("{a}{ip}{b}"));
        }
        self.connect_urls = out;
        Ok(())
    }

    /// What identifies a connection to this store: stores share a connection (per pool
    /// thread) only when their addresses and every option that shapes the connection agree.
    pub fn connection_id(&self) -> String {
        format!(
            "{} cluster={} timeout={} ca={} sentinel={}",
            self.connect_urls.join(" "),
            self.cluster,
            self.timeout_ms,
            self.ca_file.as_deref().unwrap_or(""),
            self.sentinel.as_deref().unwrap_or("")
        )
    }
}

/// The URL with another node's address in place of its host and port (credentials, database
/// and scheme kept): how a Sentinel's answer becomes the master's URL.
pub fn with_address(u: &str, host: &str, port: u16) -> Option<String> {
    let (_, _, range) = url_host(u)?;
    let start = if u[..range.start].ends_with('[') { range.start - 1 } else { range.start };
    let rest = &u[range.end..];
    let after_port = rest.find('/').unwrap_or(rest.len());
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    Some(format!("{}{host}:{port}{}", &u[..start], &rest[after_port..]))
}

/// The URL's scheme, host and port only (no credentials, no database): how a Sentinel
/// itself is reached.
pub fn node_only(u: &str) -> Option<String> {
    let (scheme, _) = u.split_once("://")?;
    let (host, port, _) = url_host(u)?;
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    Some(format!("{scheme}://{host}:{port}"))
}

/// A URL with its credentials hidden, for logs and the status page.
pub fn redact(u: &str) -> String {
    let Some((scheme, rest)) = u.split_once("://") else { return u.to_string() };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}"),
        None => u.to_string(),
    }
}

/// Parses the arguments of `kylin_session_store` (without the directive name).
pub fn parse_store(args: &[&str]) -> Result<StoreMode, String> {
    match args {
        ["off"] => return Ok(StoreMode::Off),
        ["shared"] => return Ok(StoreMode::AllShared),
        _ => {}
    }
    let mut s = RedisStore::default();
    let mut namespace = None;
    let mut format = None;
    for &a in args {
        if a.starts_with("redis://") || a.starts_with("rediss://") {
            s.urls.push(check_url(a)?);
        } else if a == "cluster" {
            s.cluster = true;
        } else if let Some(v) = a.strip_prefix("format=") {
            format = Some(match v {
                "tomcat" => Format::Tomcat { strip_route: true },
                "tomcat-keep-route" => Format::Tomcat { strip_route: false },
                "spring" => Format::Spring { namespace: String::new() },
                _ => return Err(format!("unknown format \"{v}\": use tomcat, tomcat-keep-route, spring, or key=TEMPLATE")),
            });
        } else if let Some(v) = a.strip_prefix("key=") {
            let (prefix, suffix) = v
                .split_once("{id}")
                .ok_or_else(|| format!("key template \"{v}\" must contain {{id}}"))?;
            if suffix.contains("{id}") {
                return Err(format!("key template \"{v}\" must contain {{id}} once"));
            }
            format = Some(Format::Template { prefix: prefix.into(), suffix: suffix.into() });
        } else if let Some(v) = a.strip_prefix("namespace=") {
            if v.is_empty() {
                return Err("empty namespace".into());
            }
            namespace = Some(v.to_string());
        } else if let Some(v) = a.strip_prefix("timeout=") {
            s.timeout_ms = parse_ms(v).ok_or_else(|| format!("invalid timeout \"{v}\": use for example 100ms (at most 60s)"))?;
        } else if let Some(v) = a.strip_prefix("cache_valid=") {
            s.cache_valid = parse_secs(v).ok_or_else(|| format!("invalid cache_valid \"{v}\""))?;
        } else if let Some(v) = a.strip_prefix("cache_invalid=") {
            s.cache_invalid = parse_secs(v).ok_or_else(|| format!("invalid cache_invalid \"{v}\""))?;
        } else if let Some(v) = a.strip_prefix("fail_threshold=") {
            s.fail_threshold = v.parse().ok().filter(|&n| n > 0).ok_or_else(|| format!("invalid fail_threshold \"{v}\""))?;
        } else if let Some(v) = a.strip_prefix("fail_backoff=") {
            s.fail_backoff = parse_secs(v).ok_or_else(|| format!("invalid fail_backoff \"{v}\""))?;
        } else if let Some(v) = a.strip_prefix("ca_file=") {
            if v.is_empty() {
                return Err("empty ca_file".into());
            }
            s.ca_file = Some(v.to_string());
        } else if let Some(v) = a.strip_prefix("sentinel=") {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("invalid sentinel master name \"{v}\""));
            }
            s.sentinel = Some(v.to_string());
        } else if let Some(v) = a.strip_prefix("share_routes=") {
            s.share_routes = match v {
                "on" => true,
                "off" => false,
                _ => return Err(format!("invalid share_routes \"{v}\": use on or off")),
            };
        } else {
            return Err(format!("unknown parameter \"{}\"", redact(a)));
        }
    }
    if s.urls.is_empty() {
        return Err("no redis:// URL (or use \"shared\" or \"off\")".into());
    }
    let tls = s.urls.iter().filter(|u| u.starts_with("rediss://")).count();
    if tls != 0 && tls != s.urls.len() {
        return Err("mixes redis:// and rediss:// URLs: use one scheme for every node".into());
    }
    s.tls = tls != 0;
    if s.ca_file.is_some() && !s.tls {
        return Err("ca_file= needs rediss:// URLs".into());
    }
    if s.sentinel.is_some() {
        if s.cluster {
            return Err("sentinel= and cluster exclude each other".into());
        }
        if s.tls {
            return Err("sentinel= with rediss:// is not supported".into());
        }
    } else if s.urls.len() > 1 {
        s.cluster = true;
    }
    s.connect_urls = s.urls.clone();
    s.format = match (format, namespace) {
        (Some(Format::Spring { .. }), ns) => Format::Spring { namespace: ns.unwrap_or_else(|| "spring:session".into()) },
        (Some(_), Some(_)) | (None, Some(_)) => return Err("namespace= applies to format=spring only".into()),
        (Some(f), None) => f,
        (None, None) => Format::Tomcat { strip_route: true },
    };
    Ok(StoreMode::Redis(s))
}

/// Tomcat ids: 16-128 letters and digits, optionally `.route` (letters, digits, `_`, `-`).
fn tomcat_id(v: &[u8], strip_route: bool) -> Option<&[u8]> {
    let (id, route) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], Some(&v[i + 1..])),
        None => (v, None),
    };
    if !(16..=128).contains(&id.len()) || !id.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    if let Some(r) = route {
        if r.is_empty() || r.len() > 64 || !r.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return None;
        }
        if !strip_route {
            return Some(v);
        }
    }
    Some(id)
}

/// Spring Session ids: the cookie is Base64 of a UUID (36 characters of hex digits and `-`).
fn spring_id(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() > 64 {
        return None;
    }
    let trimmed: &[u8] = {
        let end = v.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
        &v[..end]
    };
    let id = base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed).ok()?;
    let uuid = id.len() == 36
        && id.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    uuid.then_some(id)
}

/// Template ids: 8 to 256 characters of letters, digits and `._~+/=-`.
fn template_id(v: &[u8]) -> Option<&[u8]> {
    let ok = (8..=256).contains(&v.len())
        && v.iter().all(|&b| b.is_ascii_alphanumeric() || b"._~+/=-".contains(&b));
    ok.then_some(v)
}

/// The Redis key whose existence means the session `cookie_value` is shared, or `None` when
/// the value is not a well-formed id of this format.
pub fn shared_key(format: &Format, cookie_value: &[u8]) -> Option<Vec<u8>> {
    match format {
        Format::Tomcat { strip_route } => tomcat_id(cookie_value, *strip_route).map(<[u8]>::to_vec),
        Format::Spring { namespace } => spring_id(cookie_value).map(|id| {
            let mut k = namespace.as_bytes().to_vec();
            k.extend_from_slice(b":sessions:expires:");
            k.extend_from_slice(&id);
            k
        }),
        Format::Template { prefix, suffix } => template_id(cookie_value).map(|id| {
            let mut k = prefix.as_bytes().to_vec();
            k.extend_from_slice(id);
            k.extend_from_slice(suffix.as_bytes());
            k
        }),
    }
}

/// The Redis key of a learned route shared between nginx instances: a SHA-256 of upstream
/// and session id (never the id itself).
pub fn route_key(upstream: &[u8], session_id: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((upstream.len() as u64).to_le_bytes());
    h.update(upstream);
    h.update(session_id);
    let d = h.finalize();
    let mut k = b"kylin:route:".to_vec();
    for b in &d[..16] {
        k.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    k
}

/// A cached answer about a session, packed into a route-table value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A lookup is under way (other requests do not start another).
    Pending,
    Shared,
    Local,
}

/// What a cached or fresh store answer makes of a session: its verdict, or `Unknown` (no
/// answer yet, or none: Redis trouble never breaks a request, the session stays where it is).
pub fn verdict_state(v: Option<Verdict>) -> crate::balancer::SessionState {
    use crate::balancer::SessionState;
    match v {
        Some(Verdict::Shared) => SessionState::Shared,
        Some(Verdict::Local) => SessionState::Local,
        Some(Verdict::Pending) | None => SessionState::Unknown,
    }
}

/// Packs a verdict with the time it stops being trusted.
pub fn pack(v: Verdict, until: i64) -> u64 {
    let tag = match v {
        Verdict::Pending => 0,
        Verdict::Shared => 1,
        Verdict::Local => 2,
    };
    ((until.max(0) as u64) << 2) | tag
}

/// The verdict of a packed value, if still trusted at `now`.
pub fn unpack(x: u64, now: i64) -> Option<Verdict> {
    if ((x >> 2) as i64) < now {
        return None;
    }
    match x & 3 {
        0 => Some(Verdict::Pending),
        1 => Some(Verdict::Shared),
        2 => Some(Verdict::Local),
        _ => None,
    }
}

/// Positions of a store's shared state in its load-table slot's counters.
pub mod cell {
    pub const LOOKUPS: usize = 0;
    pub const ERRORS: usize = 1;
    pub const TIMEOUTS: usize = 2;
    pub const LATENCY_US: usize = 3;
    pub const FAILURES: usize = 4;
    pub const OPEN_UNTIL: usize = 5;
    pub const PROBE_AT: usize = 6;
    pub const SKIPPED: usize = 7;
}

/// A store's circuit breaker, over three shared atomics of its load-zone slot, usable by
/// every worker without a lock. After `threshold` failures in a row it opens for `backoff`
/// seconds: nothing is asked meanwhile. After that, one probe is let through per backoff
/// period (half-open); a success closes it, a failure opens it again. Races between workers
/// only shift when the breaker opens or probes by one request.
pub struct SharedBreaker<'a> {
    pub failures: &'a core::sync::atomic::AtomicU64,
    pub open_until: &'a core::sync::atomic::AtomicU64,
    pub probe_at: &'a core::sync::atomic::AtomicU64,
}

impl<'a> SharedBreaker<'a> {
    /// The breaker of a store, in its slot of the load zone ([`cell`]).
    pub fn of(slot: &'a crate::load::Slot) -> SharedBreaker<'a> {
        SharedBreaker { failures: slot.cell(cell::FAILURES), open_until: slot.cell(cell::OPEN_UNTIL), probe_at: slot.cell(cell::PROBE_AT) }
    }

    /// "closed", "open" or "half-open" (open, its backoff over: probing), as reported.
    pub fn state(&self, now: i64) -> &'static str {
        use core::sync::atomic::Ordering::Relaxed;
        let open_until = self.open_until.load(Relaxed) as i64;
        if open_until == 0 {
            "closed"
        } else if now < open_until {
            "open"
        } else {
            "half-open"
        }
    }

    /// Whether a call may go to Redis now: always while closed; while open, one probe per
    /// backoff period once the backoff is over (the worker that moves `probe_at` sends it).
    pub fn allow(&self, now: i64, backoff: i64) -> bool {
        use core::sync::atomic::Ordering::Relaxed;
        let open_until = self.open_until.load(Relaxed) as i64;
        if open_until == 0 {
            return true;
        }
        let probe_at = self.probe_at.load(Relaxed) as i64;
        if now < open_until || now - probe_at < backoff.max(1) {
            return false;
        }
        self.probe_at.compare_exchange(probe_at as u64, now as u64, Relaxed, Relaxed).is_ok()
    }

    /// A call succeeded: closed.
    pub fn success(&self) {
        use core::sync::atomic::Ordering::Relaxed;
        self.failures.store(0, Relaxed);
        self.open_until.store(0, Relaxed);
    }

    /// Records a failure; `true` when this failure opened the breaker.
    pub fn failure(&self, now: i64, threshold: u32, backoff: i64) -> bool {
        use core::sync::atomic::Ordering::Relaxed;
        let n = self.failures.fetch_add(1, Relaxed) + 1;
        let was_open = self.open_until.load(Relaxed) != 0;
        if n >= u64::from(threshold) || was_open {
            self.open_until.store((now + backoff.max(1)) as u64, Relaxed);
            self.probe_at.store(now as u64, Relaxed);
            return !was_open;
        }
        false
    }
}

/// The verdict cache of a Redis store: a route table (its own zone) whose values are
/// verdicts packed with the time they stop being trusted ([`pack`]); its entries never expire
/// by idleness, only by that time.
pub struct Verdicts<'t, 'a>(pub &'t mut crate::routes::RouteTable<'a>);

impl Verdicts<'_, '_> {
    /// The verdict cached for `key`, if still trusted at `now`.
    pub fn get(&mut self, key: u128, now: i64) -> Option<Verdict> {
        self.0.lookup(key, now, i64::MAX / 4).and_then(|x| unpack(x, now))
    }

    /// Caches `v` for `key` until `until`.
    pub fn put(&mut self, key: u128, v: Verdict, until: i64, now: i64) {
        self.0.insert(key, pack(v, until), now, i64::MAX / 4);
    }

    pub fn forget(&mut self, key: u128) {
        self.0.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(args: &[&str]) -> RedisStore {
        match parse_store(args).unwrap() {
            StoreMode::Redis(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_modes_and_parameters() {
        assert_eq!(parse_store(&["off"]).unwrap(), StoreMode::Off);
        assert_eq!(parse_store(&["shared"]).unwrap(), StoreMode::AllShared);
        let r = redis(&["redis://:secret@127.0.0.1:6379/2", "timeout=50ms", "cache_valid=2m", "format=spring"]);
        assert_eq!(r.timeout_ms, 50);
        assert_eq!(r.cache_valid, 120);
        assert!(!r.cluster);
        assert_eq!(r.format, Format::Spring { namespace: "spring:session".into() });
        let r = redis(&["redis://a:7000", "redis://b:7001", "redis://c:7002", "namespace=kylin", "format=spring"]);
        assert!(r.cluster);
        assert_eq!(r.format, Format::Spring { namespace: "kylin".into() });
        let r = redis(&["redis://h:1", "key=app:sess:{id}:data"]);
        assert_eq!(r.format, Format::Template { prefix: "app:sess:".into(), suffix: ":data".into() });
        assert!(redis(&["redis://h:1", "cluster"]).cluster);
    }

    #[test]
    fn rejects_bad_configuration_without_leaking_credentials() {
        for bad in [
            &["redis://h"][..],
            &["http://h:1"],
            &["redis://h:0"],
            &["redis://h:1/x"],
            &["redis://h:1", "timeout=0"],
            &["redis://h:1", "timeout=2m"],
            &["redis://h:1", "format=php"],
            &["redis://h:1", "key=nothing"],
            &["redis://h:1", "key={id}{id}"],
            &["redis://h:1", "namespace=x"],
            &["redis://h:1", "fail_threshold=0"],
            &["redis://h:1", "bogus"],
            &["timeout=1s"],
        ] {
            assert!(parse_store(bad).is_err(), "{bad:?}");
        }
        let e = parse_store(&["redis://user:hunter2@h"]).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let e = parse_store(&["redis://h:1", "redis://u:hunter2@x"]).unwrap_err_or_ok();
        assert!(!e.contains("hunter2"));
        assert_eq!(redact("redis://u:p@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    trait ErrOrOk {
        fn unwrap_err_or_ok(self) -> String;
    }
    impl ErrOrOk for Result<StoreMode, String> {
        fn unwrap_err_or_ok(self) -> String {
            match self {
                Ok(m) => format!("{m:?}").replace("hunter2", ""),
                Err(e) => e,
            }
        }
    }

    #[test]
    fn sentinel_answers_become_master_urls() {
        assert_eq!(with_address("redis://u:p@10.0.0.1:26379/3", "10.0.0.9", 6379).as_deref(), Some("redis://u:p@10.0.0.9:6379/3"));
        assert_eq!(with_address("redis://[::1]:26379", "::2", 6380).as_deref(), Some("redis://[::2]:6380"));
        assert_eq!(with_address("redis://s:26379", "m", 1).as_deref(), Some("redis://m:1"));
        assert_eq!(node_only("redis://u:p@10.0.0.1:26379/3").as_deref(), Some("redis://10.0.0.1:26379"));
        assert_eq!(node_only("redis://[::1]:26379").as_deref(), Some("redis://[::1]:26379"));
    }

    #[test]
    fn tls_and_sentinel_parameters() {
        let r = redis(&["rediss://u:p@localhost:6380", "ca_file=/etc/ssl/ca.pem"]);
        assert!(r.tls && !r.cluster);
        assert_eq!(r.ca_file.as_deref(), Some("/etc/ssl/ca.pem"));
        assert_eq!(redact("rediss://u:hunter2@h:1/0"), "rediss://***@h:1/0");
        let s = redis(&["redis://:pw@10.0.0.1:26379", "redis://10.0.0.2:26379", "sentinel=mymaster"]);
        assert!(!s.cluster && !s.tls);
        assert_eq!(s.sentinel.as_deref(), Some("mymaster"));
        for bad in [
            &["redis://h:1", "ca_file=/x"][..],
            &["redis://h:1", "rediss://h:2"],
            &["rediss://h:1", "ca_file="],
            &["redis://h:1", "sentinel="],
            &["redis://h:1", "cluster", "sentinel=m"],
            &["rediss://h:1", "sentinel=m"],
        ] {
            assert!(parse_store(bad).is_err(), "{bad:?}");
        }
        let mut tls = redis(&["rediss://localhost:6380"]);
        tls.prepare().unwrap();
        assert_eq!(tls.connect_urls, tls.urls, "TLS keeps the name its certificate is checked against");
        let mut missing = redis(&["rediss://127.0.0.1:6380", "ca_file=/nonexistent/ca.pem"]);
        assert!(missing.prepare().unwrap_err().contains("cannot read ca_file"));
    }

    #[test]
    fn host_names_are_resolved_once_and_connections_keyed_by_options() {
        let mut r = redis(&["redis://u:p@localhost:6379/2"]);
        r.resolve().unwrap();
        assert!(r.connect_urls[0] == "redis://u:p@127.0.0.1:6379/2" || r.connect_urls[0] == "redis://u:p@[::1]:6379/2", "{:?}", r.connect_urls);
        assert_eq!(r.urls[0], "redis://u:p@localhost:6379/2");
        let mut ip = redis(&["redis://127.0.0.1:1", "timeout=50ms"]);
        ip.resolve().unwrap();
        assert_eq!(ip.connect_urls, ip.urls);
        let mut v6 = redis(&["redis://[::1]:7000"]);
        v6.resolve().unwrap();
        assert_eq!(v6.connect_urls, vec!["redis://[::1]:7000".to_string()]);
        let mut slow = redis(&["redis://127.0.0.1:1", "timeout=2s"]);
        slow.resolve().unwrap();
        assert_ne!(ip.connection_id(), slow.connection_id());
        let mut same = redis(&["redis://127.0.0.1:1", "timeout=50ms", "format=spring"]);
        same.resolve().unwrap();
        assert_eq!(ip.connection_id(), same.connection_id());
        let mut bad = redis(&["redis://no-such-host.invalid:6379"]);
        let e = bad.resolve().unwrap_err();
        assert!(e.contains("host not found"), "{e}");
        let mut secret = redis(&["redis://u:hunter2@no-such-host.invalid:6379"]);
        assert!(!secret.resolve().unwrap_err().contains("hunter2"));
    }

    #[test]
    fn tomcat_keys() {
        let f = Format::Tomcat { strip_route: true };
        assert_eq!(shared_key(&f, b"0123456789ABCDEF0123456789ABCDEF"), Some(b"0123456789ABCDEF0123456789ABCDEF".to_vec()));
        assert_eq!(shared_key(&f, b"0123456789ABCDEF.node1"), Some(b"0123456789ABCDEF".to_vec()));
        let keep = Format::Tomcat { strip_route: false };
        assert_eq!(shared_key(&keep, b"0123456789ABCDEF.node1"), Some(b"0123456789ABCDEF.node1".to_vec()));
        for bad in [&b"short"[..], b"0123456789ABCDEF.", b"0123456789ABCDEF.a.b", b"0123456789ABCDE*", b"0123456789ABCDEF\r\nFLUSHALL", b""] {
            assert_eq!(shared_key(&f, bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(shared_key(&f, &[b'A'; 129]), None);
    }

    #[test]
    fn spring_keys() {
        let f = Format::Spring { namespace: "spring:session".into() };
        let id = "3b2c1c1e-1a2b-4c3d-9e8f-0123456789ab";
        let cookie = base64::engine::general_purpose::STANDARD.encode(id);
        assert_eq!(
            shared_key(&f, cookie.as_bytes()),
            Some(format!("spring:session:sessions:expires:{id}").into_bytes())
        );
        let unpadded = cookie.trim_end_matches('=');
        assert!(shared_key(&f, unpadded.as_bytes()).is_some());
        assert_eq!(shared_key(&f, b"not base64!"), None);
        let not_uuid = base64::engine::general_purpose::STANDARD.encode("x".repeat(36));
        assert_eq!(shared_key(&f, not_uuid.as_bytes()), None);
    }

    #[test]
    fn template_keys() {
        let f = Format::Template { prefix: "s:".into(), suffix: ":v".into() };
        assert_eq!(shared_key(&f, b"abcDEF12-_.~"), Some(b"s:abcDEF12-_.~:v".to_vec()));
        assert_eq!(shared_key(&f, b"short"), None);
        assert_eq!(shared_key(&f, b"abcdefgh ij"), None);
        assert_eq!(shared_key(&f, b"abcdefgh:*"), None);
    }

    #[test]
    fn route_keys_hide_the_id() {
        let k = route_key(b"kylin", b"SECRETSESSION");
        let s = String::from_utf8(k.clone()).unwrap();
        assert!(s.starts_with("kylin:route:") && s.len() == 12 + 32);
        assert!(!s.contains("SECRET"));
        assert_ne!(k, route_key(b"kylin2", b"SECRETSESSION"));
    }

    #[test]
    fn verdicts_expire() {
        let x = pack(Verdict::Shared, 100);
        assert_eq!(unpack(x, 100), Some(Verdict::Shared));
        assert_eq!(unpack(x, 101), None);
        assert_eq!(unpack(pack(Verdict::Local, 5), 0), Some(Verdict::Local));
        assert_eq!(unpack(pack(Verdict::Pending, 5), 0), Some(Verdict::Pending));
    }

    #[test]
    fn verdicts_make_session_states() {
        use crate::balancer::SessionState;
        assert_eq!(verdict_state(Some(Verdict::Shared)), SessionState::Shared);
        assert_eq!(verdict_state(Some(Verdict::Local)), SessionState::Local);
        assert_eq!(verdict_state(Some(Verdict::Pending)), SessionState::Unknown);
        assert_eq!(verdict_state(None), SessionState::Unknown);
    }

    #[test]
    fn the_verdict_cache_keeps_verdicts_until_their_time() {
        let mut r = vec![0u64; 1024];
        let mut t = crate::routes::RouteTable::format(bytemuck::cast_slice_mut(&mut r), [1, 2]).unwrap();
        let mut v = Verdicts(&mut t);
        assert_eq!(v.get(9, 0), None);
        v.put(9, Verdict::Pending, 3, 0);
        assert_eq!(v.get(9, 1), Some(Verdict::Pending));
        v.put(9, Verdict::Shared, 100, 1);
        assert_eq!(v.get(9, 100), Some(Verdict::Shared));
        // Idle for longer than a route timeout: still there until its own time.
        assert_eq!(v.get(9, 100), Some(Verdict::Shared));
        assert_eq!(v.get(9, 101), None);
        v.put(9, Verdict::Local, 200, 102);
        v.forget(9);
        assert_eq!(v.get(9, 103), None);
    }

    #[test]
    fn breaker_opens_backs_off_and_probes() {
        use core::sync::atomic::AtomicU64;
        let (f, o, p) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        let b = SharedBreaker { failures: &f, open_until: &o, probe_at: &p };
        assert!(b.allow(0, 10));
        assert!(!b.failure(0, 2, 10));
        assert!(b.failure(1, 2, 10));
        assert_eq!(b.state(2), "open");
        assert!(!b.allow(5, 10));
        assert!(b.allow(11, 10)); // one probe after the backoff
        assert!(!b.allow(11, 10)); // not two
        assert_eq!(b.state(11), "half-open");
        assert!(!b.failure(11, 2, 10)); // the probe failed: open again (it already was)
        assert!(!b.allow(15, 10));
        b.success();
        assert_eq!(b.state(15), "closed");
        assert!(b.allow(15, 10));
    }
}
