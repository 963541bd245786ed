//! Active health checks (pure Rust, no FFI): the `kylin_health_check` parameters, the
//! per-server state machine, its packed form in shared memory, and the parser of a probe's
//! HTTP response.
//!
//! The prober (`probe.rs`, glue) sends `GET uri` to every server of an upstream every
//! `interval`, feeds the answer to an [`Answer`] parser, turns it into an [`Outcome`] with
//! [`CheckConf::judge`], and records it with [`Health::record`] in the server's shared slot.
//! The balancer reads [`Health::admits`]: an unhealthy server takes no request at all (like
//! `down`); a server never checked since it was added takes traffic unless the check is
//! `mandatory` (NGINX Plus semantics: healthy until proven otherwise; `mandatory` starts it
//! in the "checking" state).

/// Parameters of `kylin_health_check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckConf {
    /// Request path (and query) of the probe.
    pub uri: Vec<u8>,
    /// Time between the end of one probe of a server and the start of the next, ms.
    pub interval_ms: u64,
    /// Longest a probe may take (connect, send, whole answer), ms.
    pub timeout_ms: u64,
    /// Consecutive failed probes that make a healthy server unhealthy.
    pub fails: u32,
    /// Consecutive passed probes that make an unhealthy server healthy.
    pub passes: u32,
    /// Status codes that pass, as inclusive ranges.
    pub status: Vec<(u16, u16)>,
    /// Text the body must contain, if any.
    pub body: Option<Vec<u8>>,
    /// A server never checked takes no traffic until its first probe passes.
    pub mandatory: bool,
    /// Port to probe instead of the server's own.
    pub port: Option<u16>,
}

impl Default for CheckConf {
    fn default() -> CheckConf {
        CheckConf {
            uri: DEFAULT_URI.to_vec(),
            interval_ms: 5000,
            timeout_ms: 1000,
            fails: 1,
            passes: 1,
            status: vec![(200, 399)],
            body: None,
            mandatory: false,
            port: None,
        }
    }
}

/// Kylin 5's actuator health endpoint (under the default context path `/kylin`).
pub const DEFAULT_URI: &[u8] = b"/kylin/api/health";

/// Largest answer a probe reads; a longer one fails the probe.
pub const MAX_RESPONSE: usize = 64 * 1024;

/// Parses an nginx time (`500ms`, `2s`, `1m30s`; a bare number is seconds) into ms.
pub fn parse_time_ms(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut i = 0;
    while i < v.len() {
        let start = i;
        while i < v.len() && v[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 9 {
            return None;
        }
        let n: u64 = core::str::from_utf8(&v[start..i]).ok()?.parse().ok()?;
        let ustart = i;
        while i < v.len() && v[i].is_ascii_alphabetic() {
            i += 1;
        }
        let mult = match &v[ustart..i] {
            b"ms" => 1,
            b"" | b"s" => 1000,
            b"m" => 60_000,
            b"h" => 3_600_000,
            b"d" => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(mult)?)?;
    }
    Some(total)
}

/// Parses `200`, `200-299`, or several separated by commas (`200,204,300-399`).
fn parse_status(v: &[u8]) -> Option<Vec<(u16, u16)>> {
    let code = |s: &[u8]| -> Option<u16> {
        let n: u16 = core::str::from_utf8(s).ok()?.parse().ok()?;
        (s.len() == 3 && (100..=599).contains(&n)).then_some(n)
    };
    let mut out = Vec::new();
    for part in v.split(|&b| b == b',') {
        let r = match part.iter().position(|&b| b == b'-') {
            Some(d) => (code(&part[..d])?, code(&part[d + 1..])?),
            None => {
                let c = code(part)?;
                (c, c)
            }
        };
        if r.0 > r.1 {
            return None;
        }
        out.push(r);
    }
    (!out.is_empty()).then_some(out)
}

/// Parses the directive's parameters (without the directive's name). Errors name the
/// parameter, for `nginx -t`.
pub fn parse_params(args: &[&[u8]]) -> Result<CheckConf, String> {
    let mut c = CheckConf::default();
    let mut seen: Vec<&[u8]> = Vec::new();
    for &a in args {
        let (name, value) = match a.iter().position(|&b| b == b'=') {
            Some(e) => (&a[..e], Some(&a[e + 1..])),
            None => (a, None),
        };
        let shown = String::from_utf8_lossy(a);
        if seen.contains(&name) {
            return Err(format!("duplicate parameter \"{}\"", String::from_utf8_lossy(name)));
        }
        seen.push(name);
        let bad = || format!("invalid parameter \"{shown}\"");
        match (name, value) {
            (b"mandatory", None) => c.mandatory = true,
            (b"uri", Some(v)) => {
                if v.first() != Some(&b'/') || v.iter().any(|&b| b <= b' ' || b == 0x7f) {
                    return Err(format!("invalid parameter \"{shown}\": the uri must start with \"/\" and contain no spaces or control characters"));
                }
                c.uri = v.to_vec();
            }
            (b"interval", Some(v)) => c.interval_ms = parse_time_ms(v).filter(|&t| t >= 100).ok_or_else(|| format!("{}: at least 100ms", bad()))?,
            (b"timeout", Some(v)) => c.timeout_ms = parse_time_ms(v).filter(|&t| t >= 10).ok_or_else(|| format!("{}: at least 10ms", bad()))?,
            (b"fails", Some(v)) => c.fails = count(v).ok_or_else(bad)?,
            (b"passes", Some(v)) => c.passes = count(v).ok_or_else(bad)?,
            (b"status", Some(v)) => c.status = parse_status(v).ok_or_else(|| format!("{}: status codes 100-599, ranges (200-299) and lists (200,204)", bad()))?,
            (b"body", Some(v)) => {
                if v.is_empty() {
                    return Err(format!("{}: empty text", bad()));
                }
                c.body = Some(v.to_vec());
            }
            (b"port", Some(v)) => {
                let p: u16 = core::str::from_utf8(v).ok().and_then(|s| s.parse().ok()).filter(|&p| p > 0).ok_or_else(bad)?;
                c.port = Some(p);
            }
            _ => return Err(bad()),
        }
    }
    if c.timeout_ms > c.interval_ms.saturating_mul(10) {
        return Err("\"timeout\" must not exceed ten times \"interval\"".into());
    }
    Ok(c)
}

/// A count of 1 to 1000.
fn count(v: &[u8]) -> Option<u32> {
    core::str::from_utf8(v).ok()?.parse().ok().filter(|n| (1..=1000).contains(n))
}

/// Why a probe failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    #[default]
    None = 0,
    /// The connection could not be made (refused, unreachable).
    Connect = 1,
    /// No complete answer within `timeout`.
    Timeout = 2,
    /// The status code is not one that passes.
    Status = 3,
    /// The body lacks the `body` text.
    Body = 4,
    /// Not an HTTP/1.x answer, or one too large.
    Invalid = 5,
    /// The connection closed (or failed) before the answer was complete.
    Closed = 6,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::None => "",
            Reason::Connect => "connect",
            Reason::Timeout => "timeout",
            Reason::Status => "status",
            Reason::Body => "body",
            Reason::Invalid => "invalid response",
            Reason::Closed => "closed",
        }
    }

    fn from_bits(b: u64) -> Reason {
        match b {
            1 => Reason::Connect,
            2 => Reason::Timeout,
            3 => Reason::Status,
            4 => Reason::Body,
            5 => Reason::Invalid,
            6 => Reason::Closed,
            _ => Reason::None,
        }
    }
}

/// A probe's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Failed for this reason; the status code when there was an answer.
    Fail(Reason, u16),
}

impl CheckConf {
    /// Judges a complete answer.
    pub fn judge(&self, status: u16, body: &[u8]) -> Outcome {
        if !self.status.iter().any(|&(lo, hi)| (lo..=hi).contains(&status)) {
            return Outcome::Fail(Reason::Status, status);
        }
        if let Some(text) = &self.body {
            if !contains(body, text) {
                return Outcome::Fail(Reason::Body, status);
            }
        }
        Outcome::Pass
    }

    /// The probe's request.
    pub fn request(&self, host: &[u8]) -> Vec<u8> {
        let mut r = Vec::with_capacity(self.uri.len() + host.len() + 96);
        r.extend_from_slice(b"GET ");
        r.extend_from_slice(&self.uri);
        r.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        r.extend_from_slice(host);
        r.extend_from_slice(b"\r\nUser-Agent: nginx-kylin-health-check\r\nAccept: */*\r\n\r\n");
        r
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Health of a server as the balancer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Not checked since the server was added (or nginx started).
    Unchecked = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl State {
    pub fn as_str(self, mandatory: bool) -> &'static str {
        match self {
            State::Unchecked if mandatory => "checking",
            State::Unchecked => "unchecked",
            State::Healthy => "healthy",
            State::Unhealthy => "unhealthy",
        }
    }
}

/// One server's health record: what the prober keeps in the server's shared slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub state: StateBits,
    /// Consecutive failed probes (saturating).
    pub fails: u32,
    /// Consecutive passed probes (saturating).
    pub passes: u32,
    pub last_reason: Reason,
    /// Status code of the last failed probe's answer (0 if none).
    pub last_status: u16,
}

/// [`State`] as stored (a plain newtype so that `Health` can derive `Default`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateBits(pub u8);


/// What a recorded probe changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    /// The server became healthy (from unhealthy, or checked for the first time).
    Up,
    /// The server became unhealthy.
    Down,
}

impl Health {
    pub fn state(&self) -> State {
        match self.state.0 {
            1 => State::Healthy,
            2 => State::Unhealthy,
            _ => State::Unchecked,
        }
    }

    fn set(&mut self, s: State) {
        self.state = StateBits(s as u8);
    }

    /// Whether the server may take requests.
    #[inline]
    pub fn admits(&self, mandatory: bool) -> bool {
        match self.state() {
            State::Healthy => true,
            State::Unhealthy => false,
            State::Unchecked => !mandatory,
        }
    }

    /// Records a probe's outcome. A healthy (or unchecked) server turns unhealthy after
    /// `fails` consecutive failures, an unhealthy one healthy after `passes` consecutive
    /// passes; the first probe of an unchecked server decides at once when `mandatory`.
    pub fn record(&mut self, c: &CheckConf, outcome: Outcome) -> Transition {
        let before = self.state();
        match outcome {
            Outcome::Pass => {
                self.fails = 0;
                self.passes = self.passes.saturating_add(1).min(PASSES_MAX);
                let up = match before {
                    State::Unchecked => true,
                    State::Unhealthy => self.passes >= c.passes,
                    State::Healthy => false,
                };
                if up {
                    self.set(State::Healthy);
                    return Transition::Up;
                }
            }
            Outcome::Fail(reason, status) => {
                self.passes = 0;
                self.fails = self.fails.saturating_add(1).min(FAILS_MAX);
                self.last_reason = reason;
                self.last_status = status;
                let down = match before {
                    State::Unchecked => c.mandatory || self.fails >= c.fails,
                    State::Healthy => self.fails >= c.fails,
                    State::Unhealthy => false,
                };
                if down {
                    self.set(State::Unhealthy);
                    return Transition::Down;
                }
            }
        }
        Transition::None
    }

    /// Packs the record into one word (see [`Health::unpack`]).
    pub fn pack(&self) -> u64 {
        u64::from(self.state.0)
            | (u64::from(self.fails.min(FAILS_MAX)) << 8)
            | (u64::from(self.passes.min(PASSES_MAX)) << 32)
            | ((self.last_reason as u64 & 0xf) << 48)
            | ((u64::from(self.last_status) & 0xfff) << 52)
    }

    /// The record of a packed word. Every word decodes to some record (zero: unchecked).
    pub fn unpack(w: u64) -> Health {
        Health {
            state: StateBits(match (w & 0xff) as u8 {
                s @ 0..=2 => s,
                _ => 0,
            }),
            fails: ((w >> 8) & u64::from(FAILS_MAX)) as u32,
            passes: ((w >> 32) & u64::from(PASSES_MAX)) as u32,
            last_reason: Reason::from_bits((w >> 48) & 0xf),
            last_status: ((w >> 52) & 0xfff) as u16,
        }
    }
}

const FAILS_MAX: u32 = (1 << 24) - 1;
const PASSES_MAX: u32 = (1 << 16) - 1;

/// Cells of a server's health slot in the load zone.
pub mod cell {
    /// The packed [`super::Health`] (written by the prober).
    pub const STATE: usize = 0;
    /// When the last probe finished, Unix ms.
    pub const LAST_CHECK_MS: usize = 1;
    /// When the last probe failed, Unix ms.
    pub const LAST_FAIL_MS: usize = 2;
    /// When the server last became healthy, Unix ms (0: never seen turn healthy).
    pub const UP_SINCE_MS: usize = 3;
    /// Probes made (low 32 bits) and failed (high 32 bits), added to in one atomic step
    /// (`1 | failed << 32`; the low half would carry over after 2^32 probes, 136 years at one
    /// a second).
    pub const COUNTS: usize = 4;
    /// When the server came back (healthy again after being unhealthy, undrained, or added
    /// by a reload), Unix ms: the start of its slow start; 0 for never.
    pub const RAMP_MS: usize = 5;
    /// Duration of the last probe, microseconds.
    pub const LAST_DURATION_US: usize = 6;
    /// The run-time drain mark ([`crate::drain`]): 0, or when it was set (Unix ms).
    pub const DRAIN: usize = 7;
}

// ---------------------------------------------------------------------------------------------
// Slow start

/// Whether a new client with stickiness key `key` may go to a server that came back
/// `elapsed_ms` ago, with `kylin_slow_start` `slow_start_ms`: a share of the keys that grows
/// linearly from 0 to all over the ramp. The same keys keep being admitted as the share grows
/// (a client admitted once stays), and which keys depends on the key alone, so a key turned
/// away goes to its usual next server.
#[inline]
pub fn ramp_admits(key: u64, elapsed_ms: u64, slow_start_ms: u64) -> bool {
    if elapsed_ms >= slow_start_ms {
        return true;
    }
    // A fixed bijective mix of the key (the ring uses the key's own bits) to 0..2^16.
    let mut x = key ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let point = x >> 48;
    // point / 2^16 < elapsed / slow_start, without division.
    u128::from(point) * u128::from(slow_start_ms) < u128::from(elapsed_ms) << 16
}

/// Wall-clock time, Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The share of new clients a server ramping up (`kylin_slow_start` `slow_start_ms`) takes
/// at `now_ms`, from its health slot; `None` when it is not ramping (or there is no slow
/// start).
pub fn ramp_share(table: Option<&crate::load::LoadTable<'_>>, slow_start_ms: Option<u64>, upstream: &[u8], server: &[u8], now_ms: u64) -> Option<f64> {
    let slow = slow_start_ms?;
    let slot = table?.find(crate::load::health_key(upstream, server))?;
    let back = slot.cell(cell::RAMP_MS).load(core::sync::atomic::Ordering::Relaxed);
    let elapsed = now_ms.saturating_sub(back);
    (back != 0 && elapsed < slow).then(|| ramp_ratio(elapsed, slow))
}

/// The share of new clients a server ramping up takes now (1 when not ramping).
pub fn ramp_ratio(elapsed_ms: u64, slow_start_ms: u64) -> f64 {
    if slow_start_ms == 0 || elapsed_ms >= slow_start_ms {
        1.0
    } else {
        elapsed_ms as f64 / slow_start_ms as f64
    }
}

/// Whether a server may take a request as far as the module's own availability rules go:
/// health checks, run-time drain and slow start (nginx's own tests, `down`, `max_fails`,
/// `max_conns`, are the glue's). Built per request from the configuration; reads a server's
/// health slot (in the load zone) with relaxed loads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gate {
    /// `kylin_health_check` is set: unhealthy servers take nothing.
    pub health: bool,
    /// ... `mandatory`: servers not checked yet take nothing either.
    pub mandatory: bool,
    /// `kylin_slow_start`, ms (0: off): a server that came back takes a growing share of
    /// new clients ([`ramp_admits`]).
    pub slow_start_ms: u64,
    /// The request's stickiness key and the time (Unix ms), for the slow start.
    pub key: u64,
    pub now_ms: u64,
}

impl Gate {
    /// The gate of an upstream: `health` is whether it has `kylin_health_check`, `mandatory`
    /// its `mandatory` parameter.
    pub fn new(health: bool, mandatory: bool) -> Gate {
        Gate { health, mandatory, ..Gate::default() }
    }

    /// With a slow start of `slow_start_ms` (if set) for a request with `key` at `now_ms()`
    /// (asked only with a slow start).
    #[inline]
    pub fn ramping(mut self, slow_start_ms: Option<u64>, key: u64, now_ms: impl FnOnce() -> u64) -> Gate {
        if let Some(ms) = slow_start_ms {
            self.slow_start_ms = ms;
            self.key = key;
            self.now_ms = now_ms();
        }
        self
    }

    /// Without the slow start: what a request gets when every usable server is ramping up
    /// and none admits its key (the slow start never turns a request away), and backups.
    pub fn without_slow_start(self) -> Gate {
        Gate { slow_start_ms: 0, ..self }
    }

    /// Whether the server of `slot` counts as live (health and run-time drain, not the slow
    /// start), for the live weight.
    #[inline]
    pub fn live(&self, slot: Option<&crate::load::Slot>) -> bool {
        self.without_slow_start().admits(slot, false)
    }

    /// Whether the health record in `slot` lets the server take requests (a server without a
    /// health slot, the zone being full, is not held back), and, unless the request's session
    /// lives there (`own_session`), whether it is not drained at run time nor ramping up past
    /// this key.
    #[inline(always)]
    pub fn admits(&self, slot: Option<&crate::load::Slot>, own_session: bool) -> bool {
        use core::sync::atomic::Ordering::Relaxed;
        let Some(h) = slot else { return true };
        if !own_session {
            if h.cell(cell::DRAIN).load(Relaxed) != 0 {
                return false;
            }
            if self.slow_start_ms > 0 {
                let back = h.cell(cell::RAMP_MS).load(Relaxed);
                if back != 0 && !ramp_admits(self.key, self.now_ms.saturating_sub(back), self.slow_start_ms) {
                    return false;
                }
            }
        }
        !self.health || Health::unpack(h.cell(cell::STATE).load(Relaxed)).admits(self.mandatory)
    }
}

// ---------------------------------------------------------------------------------------------
// The probe's answer

/// An HTTP/1.x answer, parsed from everything read so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// The connection may carry the next probe.
    pub keepalive: bool,
}

/// What the bytes read so far amount to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    Complete(Answer),
    Invalid,
}

/// Parses an answer from `buf` (everything read on the connection for this probe); `eof`
/// says the peer closed the connection after it. Pure and total: any input gives some
/// [`Parsed`], and no input panics.
pub fn parse_answer(buf: &[u8], eof: bool) -> Parsed {
    parse_answer_max(buf, eof, MAX_RESPONSE)
}

/// [`parse_answer`] with another size limit than [`MAX_RESPONSE`] (the load report's metrics
/// page is larger than a health answer).
pub fn parse_answer_max(buf: &[u8], eof: bool, max: usize) -> Parsed {
    if buf.len() > max {
        return Parsed::Invalid;
    }
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if eof || buf.len() >= max { Parsed::Invalid } else { Parsed::Partial };
    };
    let head = &buf[..head_end];
    let body = &buf[head_end + 4..];
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let Some(status_line) = lines.next() else { return Parsed::Invalid };
    // HTTP/1.x NNN[ reason]
    if status_line.len() < 12 || !status_line.starts_with(b"HTTP/1.") || status_line.get(8) != Some(&b' ') {
        return Parsed::Invalid;
    }
    let http10 = status_line[7] == b'0';
    let code = &status_line[9..12];
    if !code.iter().all(u8::is_ascii_digit) || status_line.get(12).is_some_and(|&b| b != b' ') {
        return Parsed::Invalid;
    }
    let status = code.iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&status) {
        return Parsed::Invalid;
    }
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = http10;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { return Parsed::Invalid };
        let name = &line[..colon];
        let value = trim(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            let Some(n) = core::str::from_utf8(value).ok().and_then(|s| s.parse::<usize>().ok()) else { return Parsed::Invalid };
            if length.is_some_and(|l| l != n) {
                return Parsed::Invalid;
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value.eq_ignore_ascii_case(b"chunked");
            if !chunked {
                return Parsed::Invalid;
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in value.split(|&b| b == b',') {
                let t = trim(t);
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    close = false;
                }
            }
        }
    }
    // 1xx, 204 and 304 have no body.
    if status < 200 || status == 204 || status == 304 {
        return Parsed::Complete(Answer { status, body: Vec::new(), keepalive: !close && body.is_empty() });
    }
    if chunked {
        return match dechunk(body) {
            Some(Some((b, used))) => Parsed::Complete(Answer { status, body: b, keepalive: !close && used == body.len() }),
            Some(None) if eof => Parsed::Invalid,
            Some(None) => Parsed::Partial,
            None => Parsed::Invalid,
        };
    }
    match length {
        Some(n) if body.len() >= n => Parsed::Complete(Answer { status, body: body[..n].to_vec(), keepalive: !close && body.len() == n }),
        Some(_) if eof => Parsed::Invalid,
        Some(_) => Parsed::Partial,
        // Until the peer closes.
        None if eof => Parsed::Complete(Answer { status, body: body.to_vec(), keepalive: false }),
        None => Parsed::Partial,
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let e = v.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(s, |e| e + 1);
    &v[s..e.max(s)]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a chunked body: `Some(Some((body, bytes used)))` when complete, `Some(None)` when
/// more is needed, `None` when malformed.
fn dechunk(mut b: &[u8]) -> Option<Option<(Vec<u8>, usize)>> {
    let total = b.len();
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(b, b"\r\n") else {
            return if b.len() > 32 { None } else { Some(None) };
        };
        let size_text = b[..eol].split(|&c| c == b';').next().unwrap_or(&[]);
        let size_text = trim(size_text);
        if size_text.is_empty() || size_text.len() > 8 || !size_text.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let size = usize::from_str_radix(core::str::from_utf8(size_text).ok()?, 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = find(b, b"\r\n") else { return Some(None) };
                let line = &b[..eol];
                b = &b[eol + 2..];
                if line.is_empty() {
                    return Some(Some((out, total - b.len())));
                }
            }
        }
        if b.len() < size + 2 {
            return Some(None);
        }
        out.extend_from_slice(&b[..size]);
        if &b[size..size + 2] != b"\r\n" {
            return None;
        }
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_gate_reads_health_drain_and_ramp() {
        use crate::load::Slot;
        use core::sync::atomic::Ordering::Relaxed;
        let slot = Slot::default();
        let gate = Gate::new(true, false);
        // An unchecked server takes traffic unless the check is mandatory; no slot: never held.
        assert!(gate.admits(Some(&slot), false));
        assert!(!Gate::new(true, true).admits(Some(&slot), false));
        assert!(Gate::new(true, true).admits(None, false));
        // Drained: only its own sessions.
        slot.cell(cell::DRAIN).store(1, Relaxed);
        assert!(!gate.admits(Some(&slot), false));
        assert!(gate.admits(Some(&slot), true));
        assert!(!gate.live(Some(&slot)));
        slot.cell(cell::DRAIN).store(0, Relaxed);
        // Ramping since t = 1000 over 10 s: at 1 s in, about a tenth of keys are admitted.
        slot.cell(cell::RAMP_MS).store(1000, Relaxed);
        let admitted = (0..1000u64).filter(|&k| gate.ramping(Some(10_000), crate::ring::key_hash(&k.to_le_bytes()), || 2000).admits(Some(&slot), false)).count();
        assert!((50..=150).contains(&admitted), "{admitted}");
        // The ramp does not hold back the live weight, sessions of the server, or a gate
        // without slow start.
        let g = gate.ramping(Some(10_000), 1, || 2000);
        assert!(g.live(Some(&slot)));
        assert!((0..100u64).all(|k| g.ramping(Some(10_000), k, || 2000).admits(Some(&slot), true)));
        assert!((0..100u64).all(|k| g.ramping(Some(10_000), k, || 2000).without_slow_start().admits(Some(&slot), false)));
        // Past the ramp, everyone.
        assert!((0..100u64).all(|k| gate.ramping(Some(10_000), k, || 11_000).admits(Some(&slot), false)));
    }

    fn conf(args: &[&str]) -> Result<CheckConf, String> {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        parse_params(&a)
    }

    #[test]
    fn parameters() {
        let c = conf(&[]).unwrap();
        assert_eq!(c, CheckConf::default());
        assert_eq!(c.uri, b"/kylin/api/health");
        let c = conf(&["uri=/kylin/api/health?x=1", "interval=2s", "timeout=500ms", "fails=2", "passes=3", "status=200,204,300-302", "body=\"status\":\"UP\"", "mandatory", "port=7071"]).unwrap();
        assert_eq!(c.interval_ms, 2000);
        assert_eq!(c.timeout_ms, 500);
        assert_eq!((c.fails, c.passes), (2, 3));
        assert_eq!(c.status, vec![(200, 200), (204, 204), (300, 302)]);
        assert_eq!(c.body.as_deref(), Some(&b"\"status\":\"UP\""[..]));
        assert!(c.mandatory);
        assert_eq!(c.port, Some(7071));
        for bad in [
            "uri=health", "uri=/a b", "interval=50ms", "interval=x", "timeout=0", "fails=0", "fails=1001", "passes=-1", "status=99", "status=200-100",
            "status=2000", "status=", "body=", "port=0", "port=65536", "bogus", "mandatory=1", "uri",
        ] {
            assert!(conf(&[bad]).is_err(), "{bad}");
        }
        assert!(conf(&["fails=2", "fails=3"]).unwrap_err().contains("duplicate"));
        assert!(conf(&["interval=1s", "timeout=11s"]).is_err());
    }

    #[test]
    fn times() {
        assert_eq!(parse_time_ms(b"2"), Some(2000));
        assert_eq!(parse_time_ms(b"1m30s"), Some(90_000));
        assert_eq!(parse_time_ms(b"250ms"), Some(250));
        assert_eq!(parse_time_ms(b"1h"), Some(3_600_000));
        for bad in [&b""[..], b"s", b"1x", b"1.5s", b"-1", b"9999999999s"] {
            assert_eq!(parse_time_ms(bad), None);
        }
    }

    #[test]
    fn judging() {
        let c = conf(&["body=UP"]).unwrap();
        assert_eq!(c.judge(200, b"{\"status\":\"UP\"}"), Outcome::Pass);
        assert_eq!(c.judge(200, b"{\"status\":\"DOWN\"}"), Outcome::Fail(Reason::Body, 200));
        assert_eq!(c.judge(503, b"UP"), Outcome::Fail(Reason::Status, 503));
        assert_eq!(conf(&[]).unwrap().judge(302, b""), Outcome::Pass);
    }

    #[test]
    fn state_machine() {
        let c = conf(&["fails=2", "passes=3"]).unwrap();
        let fail = Outcome::Fail(Reason::Timeout, 0);
        let mut h = Health::default();
        assert_eq!(h.state(), State::Unchecked);
        assert!(h.admits(false));
        assert!(!h.admits(true));
        assert_eq!(h.record(&c, fail), Transition::None);
        assert!(h.admits(false));
        assert_eq!(h.record(&c, fail), Transition::Down);
        assert!(!h.admits(false));
        assert_eq!((h.fails, h.last_reason), (2, Reason::Timeout));
        assert_eq!(h.record(&c, Outcome::Pass), Transition::None);
        assert_eq!(h.record(&c, Outcome::Pass), Transition::None);
        // A failure in between starts the passes over.
        assert_eq!(h.record(&c, fail), Transition::None);
        assert_eq!(h.record(&c, Outcome::Pass), Transition::None);
        assert_eq!(h.record(&c, Outcome::Pass), Transition::None);
        assert_eq!(h.record(&c, Outcome::Pass), Transition::Up);
        assert!(h.admits(true));
        // The first probe of an unchecked server decides when mandatory.
        let m = conf(&["fails=3", "passes=3", "mandatory"]).unwrap();
        let mut h = Health::default();
        assert_eq!(h.record(&m, fail), Transition::Down);
        let mut h = Health::default();
        assert_eq!(h.record(&m, Outcome::Pass), Transition::Up);
    }

    #[test]
    fn answers() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"status\":\"UP\"}";
        assert_eq!(parse_answer(ok, false), Parsed::Complete(Answer { status: 200, body: b"{\"status\":\"UP\"}".to_vec(), keepalive: true }));
        for cut in 0..ok.len() {
            assert_eq!(parse_answer(&ok[..cut], false), Parsed::Partial, "{cut}");
            assert_eq!(parse_answer(&ok[..cut], true), Parsed::Invalid, "{cut}");
        }
        let chunked = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{\"statu\r\n9;x=y\r\ns\":\"DOWN\"\r\n1\r\n}\r\n0\r\n\r\n";
        assert_eq!(parse_answer(chunked, false), Parsed::Complete(Answer { status: 503, body: b"{\"status\":\"DOWN\"}".to_vec(), keepalive: true }));
        for cut in 0..chunked.len() {
            assert_eq!(parse_answer(&chunked[..cut], false), Parsed::Partial, "{cut}");
        }
        let close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nUP";
        assert!(matches!(parse_answer(close, false), Parsed::Complete(Answer { keepalive: false, .. })));
        let http10 = b"HTTP/1.0 200 OK\r\n\r\nUP";
        assert_eq!(parse_answer(http10, false), Parsed::Partial);
        assert_eq!(parse_answer(http10, true), Parsed::Complete(Answer { status: 200, body: b"UP".to_vec(), keepalive: false }));
        let no_content = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert!(matches!(parse_answer(no_content, false), Parsed::Complete(Answer { status: 204, keepalive: true, .. })));
        for bad in [&b"SSH-2.0-OpenSSH\r\n\r\n"[..], b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 20x OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"] {
            assert_eq!(parse_answer(bad, false), Parsed::Invalid, "{}", String::from_utf8_lossy(bad));
        }
        // Bytes after the answer: the connection is not reused.
        let extra = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nUPjunk";
        assert!(matches!(parse_answer(extra, false), Parsed::Complete(Answer { keepalive: false, .. })));
        let big = [b"HTTP/1.1 200 OK\r\n\r\n".as_slice(), &vec![b'x'; MAX_RESPONSE]].concat();
        assert_eq!(parse_answer(&big, false), Parsed::Invalid);
    }

    #[test]
    fn the_request() {
        let c = conf(&["uri=/kylin/api/health"]).unwrap();
        assert_eq!(c.request(b"10.0.0.1:7070"), b"GET /kylin/api/health HTTP/1.1\r\nHost: 10.0.0.1:7070\r\nUser-Agent: nginx-kylin-health-check\r\nAccept: */*\r\n\r\n".to_vec());
    }

    #[test]
    fn slow_start_share() {
        let keys: Vec<u64> = (0..20_000u64).map(|k| crate::ring::key_hash(&k.to_le_bytes())).collect();
        for (elapsed, want) in [(0u64, 0.0), (2_500, 0.25), (5_000, 0.5), (7_500, 0.75), (10_000, 1.0)] {
            let share = keys.iter().filter(|&&k| ramp_admits(k, elapsed, 10_000)).count() as f64 / keys.len() as f64;
            assert!((share - want).abs() < 0.02, "{elapsed}: {share}");
            assert!((ramp_ratio(elapsed, 10_000) - want).abs() < 1e-9);
        }
        assert_eq!(ramp_ratio(5, 0), 1.0);
    }

    proptest! {
        /// A key admitted at some point of the ramp stays admitted later.
        #[test]
        fn ramp_is_monotonic(key in any::<u64>(), a in 0u64..100_000, b in 0u64..100_000, slow in 1u64..100_000) {
            let (early, late) = (a.min(b), a.max(b));
            if ramp_admits(key, early, slow) {
                prop_assert!(ramp_admits(key, late, slow));
            }
            prop_assert!(ramp_admits(key, slow, slow));
        }

        #[test]
        fn parser_is_total_and_prefix_stable(bytes in proptest::collection::vec(any::<u8>(), 0..400), eof in any::<bool>()) {
            let _ = parse_answer(&bytes, eof);
        }

        #[test]
        fn packing_round_trips(state in 0u8..3, fails in 0u32..FAILS_MAX, passes in 0u32..PASSES_MAX, reason in 0u64..7, status in 0u16..600) {
            let h = Health { state: StateBits(state), fails, passes, last_reason: Reason::from_bits(reason), last_status: status };
            prop_assert_eq!(Health::unpack(h.pack()), h);
        }

        #[test]
        fn any_word_unpacks(w in any::<u64>()) {
            let h = Health::unpack(w);
            prop_assert!(h.state.0 <= 2);
        }

        /// Whatever the outcomes, the state follows the thresholds: unhealthy exactly after
        /// `fails` consecutive failures from healthy, healthy after `passes` passes.
        #[test]
        fn thresholds(fails in 1u32..5, passes in 1u32..5, mandatory in any::<bool>(), seq in proptest::collection::vec(any::<bool>(), 1..60)) {
            let c = CheckConf { fails, passes, mandatory, ..CheckConf::default() };
            let mut h = Health::default();
            let (mut run_f, mut run_p) = (0u32, 0u32);
            let mut expect = State::Unchecked;
            for ok in seq {
                let was = h.state();
                h.record(&c, if ok { Outcome::Pass } else { Outcome::Fail(Reason::Connect, 0) });
                if ok { run_p += 1; run_f = 0; } else { run_f += 1; run_p = 0; }
                expect = match (was, ok) {
                    (State::Unchecked, true) => State::Healthy,
                    (State::Unchecked, false) if mandatory || run_f >= fails => State::Unhealthy,
                    (State::Healthy, false) if run_f >= fails => State::Unhealthy,
                    (State::Unhealthy, true) if run_p >= passes => State::Healthy,
                    (s, _) => s,
                };
                prop_assert_eq!(h.state(), expect);
                prop_assert_eq!((h.fails, h.passes), (run_f, run_p));
            }
            let _ = expect;
        }
    }
}
