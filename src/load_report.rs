//! Load that the nodes report (pure Rust, no FFI): the `kylin_load_report` parameters, a
//! bounded parser for the part of the Prometheus text exposition format it needs, the record a
//! report leaves in shared memory, and the verdict the balancer reads from it.
//!
//! The prober (`probe.rs`, glue, worker 0) fetches `uri` from every server each `interval`,
//! on the same connection machinery as the health check, hands the body to [`scan`], and
//! stores the values of the `busy=` metrics with the time in the server's report slot
//! ([`cell`]). Every worker's placement then asks [`verdict`]: a fresh report in which some
//! `busy=` condition holds makes the server *saturated* (hot to client placement, and no move
//! target); a missing or stale report (older than `stale`) is no report: placement uses
//! nginx's own in-flight counts only, exactly as without the directive.
//!
//! Why not a crate: `cargo search` does not reach the registry from here, and the crates that
//! parse the format (`prometheus-parse`) build every sample of the page into owned maps with
//! regular expressions; we need a few values out of a page of thousands of lines, with bounded
//! work on untrusted input. The subset parsed: `name[{label="value",...}] value [timestamp]`
//! lines, label values with the escapes `\\`, `\"` and `\n`; comments (`#`), blank lines and
//! lines that do not parse are skipped; lines longer than [`MAX_LINE`] are skipped; at most
//! [`MAX_BODY`] bytes are read.

/// Largest metrics page read (the prober fails a longer answer).
pub const MAX_BODY: usize = 1024 * 1024;
/// Longest sample line looked at; longer lines are skipped.
pub const MAX_LINE: usize = 4096;
/// Most `busy=` conditions (one shared cell each).
pub const MAX_CONDITIONS: usize = 4;
/// Most labels in a selector, and most labels of a sample line looked at.
pub const MAX_LABELS: usize = 16;

/// Kylin 5's actuator metrics endpoint (under the default context path `/kylin`).
pub const DEFAULT_URI: &[u8] = b"/kylin/api/prometheus";

/// A metric name with the labels a sample must have (others may be there too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub name: Vec<u8>,
    pub labels: Vec<(Vec<u8>, Vec<u8>)>,
}

/// `>` or `>=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Gt,
    Ge,
}

/// One `busy=selector>value` (or `>=`) condition.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub selector: Selector,
    pub op: Op,
    pub threshold: f64,
    /// As written, for the status page.
    pub text: String,
}

impl Condition {
    /// Whether a reported value makes the server saturated (NaN never does).
    pub fn holds(&self, v: f64) -> bool {
        match self.op {
            Op::Gt => v > self.threshold,
            Op::Ge => v >= self.threshold,
        }
    }
}

/// Parameters of `kylin_load_report`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportConf {
    pub uri: Vec<u8>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// A report older than this is ignored.
    pub stale_ms: u64,
    pub port: Option<u16>,
    /// The server is saturated when any holds.
    pub busy: Vec<Condition>,
}

impl ReportConf {
    /// The probe's request (the same shape as the health check's).
    pub fn request(&self, host: &[u8]) -> Vec<u8> {
        let mut r = Vec::with_capacity(self.uri.len() + host.len() + 96);
        r.extend_from_slice(b"GET ");
        r.extend_from_slice(&self.uri);
        r.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        r.extend_from_slice(host);
        r.extend_from_slice(b"\r\nUser-Agent: nginx-kylin-load-report\r\nAccept: text/plain\r\n\r\n");
        r
    }
}

/// The default condition: Spark tasks waiting for a core.
pub const DEFAULT_BUSY: &[u8] = b"spark_tasks{state=\"pending\"}>0";

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// Reads a metric or label name from the start of `s`: (name, rest).
fn name(s: &[u8]) -> Option<(&[u8], &[u8])> {
    if !s.first().copied().is_some_and(is_name_start) {
        return None;
    }
    let n = s.iter().position(|&b| !is_name_char(b)).unwrap_or(s.len());
    Some((&s[..n], &s[n..]))
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(s.len());
    &s[n..]
}

/// Reads `{l="v",...}` (optional trailing comma) from the start of `s`, calling `each` with
/// every label (its value unescaped); returns the rest, or `None` when malformed or over
/// [`MAX_LABELS`].
fn labels<'a>(s: &'a [u8], mut each: impl FnMut(&'a [u8], Vec<u8>)) -> Option<&'a [u8]> {
    let mut s = s.strip_prefix(b"{")?;
    let mut count = 0;
    loop {
        s = skip_ws(s);
        if let Some(rest) = s.strip_prefix(b"}") {
            return Some(rest);
        }
        count += 1;
        if count > MAX_LABELS {
            return None;
        }
        let (l, rest) = name(s)?;
        let rest = skip_ws(rest).strip_prefix(b"=")?;
        let mut rest = skip_ws(rest).strip_prefix(b"\"")?;
        let mut value = Vec::new();
        loop {
            let (&b, r) = rest.split_first()?;
            rest = r;
            match b {
                b'"' => break,
                b'\\' => {
                    let (&e, r) = rest.split_first()?;
                    rest = r;
                    value.push(match e {
                        b'n' => b'\n',
                        b'\\' => b'\\',
                        b'"' => b'"',
                        _ => return None,
                    });
                }
                b'\n' => return None,
                _ => value.push(b),
            }
        }
        each(l, value);
        s = skip_ws(rest);
        if let Some(r) = s.strip_prefix(b",") {
            s = r;
        } else if !s.starts_with(b"}") {
            return None;
        }
    }
}

/// Parses a selector: `name` or `name{label="value",...}`.
pub fn parse_selector(s: &[u8]) -> Option<Selector> {
    let (n, rest) = name(s)?;
    let mut sel = Selector { name: n.to_vec(), labels: Vec::new() };
    let rest = if rest.starts_with(b"{") { labels(rest, |l, v| sel.labels.push((l.to_vec(), v)))? } else { rest };
    if !rest.is_empty() {
        return None;
    }
    Some(sel)
}

/// Parses `selector>value` or `selector>=value`.
pub fn parse_condition(s: &[u8]) -> Option<Condition> {
    // The operator is the last '>' outside the label values: after the selector's end.
    let (n, rest) = name(s)?;
    let sel_len = if rest.starts_with(b"{") { s.len() - labels(rest, |_, _| {})?.len() } else { n.len() };
    let (sel, op) = s.split_at(sel_len);
    let (op, value) = if let Some(v) = op.strip_prefix(b">=") {
        (Op::Ge, v)
    } else {
        (Op::Gt, op.strip_prefix(b">")?)
    };
    let threshold = number(value).filter(|t| t.is_finite())?;
    Some(Condition { selector: parse_selector(sel)?, op, threshold, text: String::from_utf8_lossy(s).into_owned() })
}

/// A sample value as the format writes it (`1`, `0.5`, `1e3`, `+Inf`, `NaN`).
fn number(s: &[u8]) -> Option<f64> {
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    let t = core::str::from_utf8(s).ok()?;
    match t {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if t.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E')) => t.parse().ok(),
        _ => None,
    }
}

/// Parses the directive's parameters (without its name). Errors name the parameter.
pub fn parse_params(args: &[&[u8]]) -> Result<ReportConf, String> {
    let mut c = ReportConf { uri: DEFAULT_URI.to_vec(), interval_ms: 5000, timeout_ms: 1000, stale_ms: 0, port: None, busy: Vec::new() };
    let mut seen: Vec<&[u8]> = Vec::new();
    let mut stale = None;
    for &a in args {
        let (key, value) = match a.iter().position(|&b| b == b'=') {
            Some(e) => (&a[..e], Some(&a[e + 1..])),
            None => (a, None),
        };
        let shown = String::from_utf8_lossy(a);
        if key != b"busy" && seen.contains(&key) {
            return Err(format!("duplicate parameter \"{}\"", String::from_utf8_lossy(key)));
        }
        seen.push(key);
        let bad = || format!("invalid parameter \"{shown}\"");
        match (key, value) {
            (b"uri", Some(v)) => {
                if v.first() != Some(&b'/') || v.iter().any(|&b| b <= b' ' || b == 0x7f) {
                    return Err(format!("{}: the uri must start with \"/\" and contain no spaces or control characters", bad()));
                }
                c.uri = v.to_vec();
            }
            (b"interval", Some(v)) => c.interval_ms = crate::health::parse_time_ms(v).filter(|&t| t >= 100).ok_or_else(|| format!("{}: at least 100ms", bad()))?,
            (b"timeout", Some(v)) => c.timeout_ms = crate::health::parse_time_ms(v).filter(|&t| t >= 10).ok_or_else(|| format!("{}: at least 10ms", bad()))?,
            (b"stale", Some(v)) => stale = Some(crate::health::parse_time_ms(v).filter(|&t| t >= 100).ok_or_else(|| format!("{}: at least 100ms", bad()))?),
            (b"port", Some(v)) => {
                let p: u16 = core::str::from_utf8(v).ok().and_then(|s| s.parse().ok()).filter(|&p| p > 0).ok_or_else(bad)?;
                c.port = Some(p);
            }
            (b"busy", Some(v)) => {
                if c.busy.len() == MAX_CONDITIONS {
                    return Err(format!("{}: at most {} \"busy\" conditions", bad(), MAX_CONDITIONS));
                }
                let cond = parse_condition(v).ok_or_else(|| {
                    format!("{}: a condition is metric{{label=\"value\",...}}>number or >=number, for example busy='spark_tasks{{state=\"pending\"}}>0'", bad())
                })?;
                c.busy.push(cond);
            }
            _ => return Err(bad()),
        }
    }
    if c.busy.is_empty() {
        c.busy.push(parse_condition(DEFAULT_BUSY).ok_or("the default condition does not parse")?);
    }
    if c.timeout_ms > c.interval_ms.saturating_mul(10) {
        return Err("\"timeout\" must not exceed ten times \"interval\"".into());
    }
    c.stale_ms = stale.unwrap_or(c.interval_ms.saturating_mul(3));
    if c.stale_ms < c.interval_ms {
        return Err("\"stale\" must be at least \"interval\"".into());
    }
    Ok(c)
}

/// Whether a sample with this name and these labels is one `sel` names.
fn matches(sel: &Selector, name: &[u8], labels: &[(&[u8], Vec<u8>)]) -> bool {
    sel.name == name && sel.labels.iter().all(|(l, v)| labels.iter().any(|(sl, sv)| sl == l && sv == v))
}

/// A sample line's name, labels (values unescaped) and value.
pub type Sample<'a> = (&'a [u8], Vec<(&'a [u8], Vec<u8>)>, f64);

/// Reads one sample line. `None` for anything else.
pub fn parse_line(line: &[u8]) -> Option<Sample<'_>> {
    if line.len() > MAX_LINE {
        return None;
    }
    let line = skip_ws(line);
    if line.starts_with(b"#") {
        return None;
    }
    let (n, rest) = name(line)?;
    let mut ls = Vec::new();
    let rest = if rest.starts_with(b"{") { labels(rest, |l, v| ls.push((l, v)))? } else { rest };
    // At least one blank, the value, then an optional timestamp (or an exemplar) we ignore.
    if !rest.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return None;
    }
    let rest = skip_ws(rest);
    let end = rest.iter().position(|&b| b == b' ' || b == b'\t' || b == b'\r').unwrap_or(rest.len());
    let v = number(&rest[..end])?;
    Some((n, ls, v))
}

/// The values of `sels` in a metrics page: for each, the largest value of the samples it
/// names (NaN samples ignored), `None` when the page has none. Reads at most [`MAX_BODY`]
/// bytes; total and bounded (each byte is looked at a bounded number of times).
pub fn scan(body: &[u8], sels: &[&Selector]) -> Vec<Option<f64>> {
    let mut out = vec![None; sels.len()];
    let body = &body[..body.len().min(MAX_BODY)];
    for line in body.split(|&b| b == b'\n') {
        // Cheap filter first: the line must start with one of the names.
        let l = skip_ws(line);
        if !sels.iter().any(|s| l.starts_with(&s.name)) {
            continue;
        }
        let Some((n, ls, v)) = parse_line(line) else { continue };
        if v.is_nan() {
            continue;
        }
        for (i, s) in sels.iter().enumerate() {
            if matches(s, n, &ls) {
                out[i] = Some(out[i].map_or(v, |o: f64| o.max(v)));
            }
        }
    }
    out
}

/// The cells of a server's report slot in the load zone (one slot per server, besides its
/// counters and its health slot). Written by the prober only; read by every worker.
pub mod cell {
    /// When the last good report arrived, Unix ms (0: never).
    pub const AT_MS: usize = 0;
    /// The `busy=` conditions' values (f64 bits; [`super::ABSENT`] for a metric the page
    /// lacked), cells 1 to 4.
    pub const VALUE: usize = 1;
    /// Fetches (low 32 bits) and failed fetches (high 32 bits).
    pub const COUNTS: usize = 5;
    /// When a fetch last failed, Unix ms (0: never).
    pub const LAST_FAIL_MS: usize = 6;
    /// Why it failed ([`super::Failure`]).
    pub const LAST_FAIL: usize = 7;
}

/// A metric the last report lacked (a NaN's bits: no condition holds for it).
pub const ABSENT: u64 = 0x7ff8_0000_0000_dead;

/// Why a fetch gave no report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Failure {
    None = 0,
    Connect = 1,
    Timeout = 2,
    /// A status other than 2xx.
    Status = 3,
    Invalid = 4,
    Closed = 5,
    /// The page has none of the `busy=` metrics.
    NoMetric = 6,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::None => "",
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Status => "status",
            Failure::Invalid => "invalid response",
            Failure::Closed => "closed",
            Failure::NoMetric => "no metric",
        }
    }

    pub fn from_bits(b: u64) -> Failure {
        match b {
            1 => Failure::Connect,
            2 => Failure::Timeout,
            3 => Failure::Status,
            4 => Failure::Invalid,
            5 => Failure::Closed,
            6 => Failure::NoMetric,
            _ => Failure::None,
        }
    }
}

/// What a fetched page amounts to: the cells to write ([`cell::VALUE`]..), or why none.
pub fn judge(conf: &ReportConf, status: u16, body: &[u8]) -> Result<[u64; MAX_CONDITIONS], Failure> {
    if !(200..300).contains(&status) {
        return Err(Failure::Status);
    }
    let sels: Vec<&Selector> = conf.busy.iter().map(|c| &c.selector).collect();
    let values = scan(body, &sels);
    if values.iter().all(Option::is_none) {
        return Err(Failure::NoMetric);
    }
    let mut out = [ABSENT; MAX_CONDITIONS];
    for (o, v) in out.iter_mut().zip(values) {
        *o = v.map_or(ABSENT, f64::to_bits);
    }
    Ok(out)
}

/// What the balancer makes of a server's report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No report yet (or no slot): nginx's own signals only.
    Missing,
    /// The last report is older than `stale`: ignored, as if missing.
    Stale,
    /// A fresh report; `saturated` when some `busy=` condition holds.
    Fresh { saturated: bool },
}

impl Verdict {
    /// Whether placement treats the server as saturated.
    pub fn saturated(self) -> bool {
        matches!(self, Verdict::Fresh { saturated: true })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Missing => "missing",
            Verdict::Stale => "stale",
            Verdict::Fresh { saturated: true } => "saturated",
            Verdict::Fresh { saturated: false } => "fresh",
        }
    }
}

/// The verdict on a report slot's cells `at_ms` and values at Unix time `now_ms`. A report
/// from the future (the clock stepped back) counts as fresh until `stale` has passed since.
pub fn verdict(conf: &ReportConf, at_ms: u64, values: &[u64], now_ms: u64) -> Verdict {
    if at_ms == 0 {
        return Verdict::Missing;
    }
    if now_ms.saturating_sub(at_ms) > conf.stale_ms {
        return Verdict::Stale;
    }
    let saturated = conf.busy.iter().zip(values).any(|(c, &v)| c.holds(f64::from_bits(v)));
    Verdict::Fresh { saturated }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn conf(args: &[&str]) -> Result<ReportConf, String> {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        parse_params(&a)
    }

    const PAGE: &[u8] = b"# HELP spark_tasks Spark tasks\n# TYPE spark_tasks gauge\n\
spark_tasks{state=\"pending\",} 3.0\n\
spark_tasks{state=\"running\",} 4.0\n\
spark_tasks_utilization 1.0 1700000000000\n\
jvm_memory_used_bytes{area=\"heap\",id=\"G1 Eden Space\",} 1.2E8\n\
weird{l=\"a\\\"b\\\\c\\nd\"} 7\n";

    #[test]
    fn defaults() {
        let c = conf(&[]).unwrap();
        assert_eq!(c.uri, DEFAULT_URI);
        assert_eq!((c.interval_ms, c.timeout_ms, c.stale_ms), (5000, 1000, 15000));
        assert_eq!(c.busy.len(), 1);
        assert_eq!(c.busy[0].selector.name, b"spark_tasks");
        assert_eq!(c.busy[0].selector.labels, vec![(b"state".to_vec(), b"pending".to_vec())]);
        assert_eq!((c.busy[0].op, c.busy[0].threshold), (Op::Gt, 0.0));
    }

    #[test]
    fn parameters() {
        let c = conf(&["uri=/m", "interval=1s", "timeout=200ms", "stale=10s", "port=7071", "busy=spark_tasks_utilization>=0.9", "busy=a{x=\"1\",y=\"2\"}>5"]).unwrap();
        assert_eq!((c.uri.as_slice(), c.interval_ms, c.timeout_ms, c.stale_ms, c.port), (b"/m".as_slice(), 1000, 200, 10000, Some(7071)));
        assert_eq!(c.busy.len(), 2);
        assert_eq!((c.busy[0].op, c.busy[0].threshold), (Op::Ge, 0.9));
        assert_eq!(c.busy[1].selector.labels.len(), 2);
        for bad in [
            &["uri=x"][..],
            &["interval=50ms"],
            &["timeout=5ms"],
            &["stale=1s", "interval=2s"],
            &["port=0"],
            &["busy=x"],
            &["busy=x>"],
            &["busy=x>inf"],
            &["busy=x{y=1}>0"],
            &["busy=>1"],
            &["busy=a>1", "busy=b>1", "busy=c>1", "busy=d>1", "busy=e>1"],
            &["interval=1s", "interval=2s"],
            &["fails=2"],
            &["interval=100ms", "timeout=2s"],
        ] {
            assert!(conf(bad).is_err(), "{bad:?}");
        }
        assert!(conf(&["busy=a>1", "busy=b>1"]).is_ok());
    }

    #[test]
    fn scans_the_page() {
        let sels = [
            parse_selector(b"spark_tasks{state=\"pending\"}").unwrap(),
            parse_selector(b"spark_tasks{state=\"running\"}").unwrap(),
            parse_selector(b"spark_tasks_utilization").unwrap(),
            parse_selector(b"spark_tasks").unwrap(),
            parse_selector(b"weird{l=\"a\\\"b\\\\c\\nd\"}").unwrap(),
            parse_selector(b"absent").unwrap(),
        ];
        let refs: Vec<&Selector> = sels.iter().collect();
        assert_eq!(scan(PAGE, &refs), vec![Some(3.0), Some(4.0), Some(1.0), Some(4.0), Some(7.0), None]);
    }

    #[test]
    fn lines() {
        assert!(parse_line(b"# a 1").is_none());
        assert!(parse_line(b"a").is_none());
        assert!(parse_line(b"a{} 1").is_some());
        assert!(parse_line(b"a{b=\"c\"}1").is_none());
        assert!(parse_line(b"a{b=\"c} 1").is_none());
        assert!(parse_line(b"a{b=\"\\x\"} 1").is_none());
        assert_eq!(parse_line(b"a +Inf").map(|l| l.2), Some(f64::INFINITY));
        assert!(parse_line(b"a NaN").unwrap().2.is_nan());
        assert!(parse_line(b"a 0x10").is_none());
        assert!(parse_line(&[b"a{b=\"".as_slice(), &vec![b'x'; MAX_LINE], b"\"} 1"].concat()).is_none());
    }

    #[test]
    fn judging_and_verdicts() {
        let c = conf(&["busy=spark_tasks{state=\"pending\"}>0", "busy=spark_tasks_utilization>=0.95"]).unwrap();
        let cells = judge(&c, 200, PAGE).unwrap();
        assert_eq!(f64::from_bits(cells[0]), 3.0);
        assert_eq!(cells[2], ABSENT);
        assert_eq!(judge(&c, 503, PAGE), Err(Failure::Status));
        assert_eq!(judge(&c, 200, b"other 1\n"), Err(Failure::NoMetric));
        let now = 1_000_000;
        assert_eq!(verdict(&c, 0, &cells, now), Verdict::Missing);
        assert_eq!(verdict(&c, now - c.stale_ms - 1, &cells, now), Verdict::Stale);
        assert_eq!(verdict(&c, now - 10, &cells, now), Verdict::Fresh { saturated: true });
        let calm = judge(&c, 200, b"spark_tasks{state=\"pending\"} 0\nspark_tasks_utilization 0.5\n").unwrap();
        assert_eq!(verdict(&c, now, &calm, now), Verdict::Fresh { saturated: false });
        let full = judge(&c, 200, b"spark_tasks{state=\"pending\"} 0\nspark_tasks_utilization 0.95\n").unwrap();
        assert!(verdict(&c, now, &full, now).saturated());
        assert!(!verdict(&c, now, &[ABSENT; 4], now).saturated());
    }

    proptest! {
        /// Any input: no panic, and every value found is one some line of the page holds.
        #[test]
        fn scan_is_total(page in proptest::collection::vec(any::<u8>(), 0..512)) {
            let sel = parse_selector(b"a").unwrap();
            let _ = scan(&page, &[&sel]);
            let _ = parse_condition(&page);
            let _ = parse_selector(&page);
        }

        /// A written sample is read back, whatever its label value.
        #[test]
        fn round_trip(value in "[ -~]{0,40}", v in -1e9f64..1e9) {
            let esc = value.replace('\\', "\\\\").replace('"', "\\\"");
            let page = format!("x_total{{a=\"1\",l=\"{esc}\"}} {v}\n");
            let sel = Selector { name: b"x_total".to_vec(), labels: vec![(b"l".to_vec(), value.into_bytes())] };
            prop_assert_eq!(scan(page.as_bytes(), &[&sel]), vec![Some(v)]);
        }

        /// Past `stale`, or before any report, the verdict is never saturated.
        #[test]
        fn stale_is_no_report(age in 0u64..100_000, v in 0f64..10.0) {
            let c = conf(&["stale=10s", "interval=1s"]).unwrap();
            let now = 1_000_000_000;
            let cells = [v.to_bits(), ABSENT, ABSENT, ABSENT];
            let got = verdict(&c, now - age, &cells, now);
            if age > 10_000 {
                prop_assert_eq!(got, Verdict::Stale);
            } else {
                prop_assert_eq!(got, Verdict::Fresh { saturated: v > 0.0 });
            }
            prop_assert_eq!(verdict(&c, 0, &cells, now), Verdict::Missing);
        }
    }
}
