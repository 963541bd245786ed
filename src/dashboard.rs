//! The status page's formats (pure Rust, no FFI): which one a request asks for, and the HTML
//! dashboard served to browsers (`src/dashboard.html`, embedded in the module).
//!
//! `?format=` wins over `Accept`: `format=prometheus`, `format=html`, any other `format=`
//! value is JSON. Without it, `Accept` chooses HTML only when it prefers `text/html` to
//! `application/json` (a browser's navigation does; curl's `*/*`, `fetch()`'s default and
//! Prometheus' scrape header do not, and keep getting JSON, as before the dashboard).

/// The dashboard: one self-contained page (no external scripts, styles or fonts) that polls
/// the JSON document (`?format=json`) and redraws.
pub const PAGE: &str = include_str!("dashboard.html");

/// What the status location serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Prometheus,
    Html,
}

/// The format a request asks for, from its query string and its `Accept` header values.
pub fn choose(args: &[u8], accept: &[&[u8]]) -> Format {
    let mut asked = None;
    for a in args.split(|&b| b == b'&') {
        if let Some(v) = a.strip_prefix(b"format=") {
            let f = match v {
                b"prometheus" => Format::Prometheus,
                b"html" => Format::Html,
                _ => Format::Json,
            };
            // As before the dashboard: format=prometheus anywhere wins.
            if asked != Some(Format::Prometheus) {
                asked = Some(f);
            }
        }
    }
    if let Some(f) = asked {
        return f;
    }
    let html = quality(accept, b"text", b"html");
    let json = quality(accept, b"application", b"json");
    if html > json {
        Format::Html
    } else {
        Format::Json
    }
}

/// The quality (0 to 1000) that `Accept` header values give `type/subtype`: that of the most
/// specific matching media range (RFC 9110 12.5.1). No header at all accepts everything.
fn quality(accept: &[&[u8]], ty: &[u8], sub: &[u8]) -> u32 {
    if accept.is_empty() {
        return 1000;
    }
    // (specificity, quality) of the best match so far.
    let mut best: Option<(u8, u32)> = None;
    for value in accept {
        for range in value.split(|&b| b == b',') {
            let mut parts = range.split(|&b| b == b';');
            let media = trim(parts.next().unwrap_or(b""));
            let Some(slash) = media.iter().position(|&b| b == b'/') else { continue };
            let (t, s) = (&media[..slash], &media[slash + 1..]);
            let specificity = if t == b"*" && s == b"*" {
                1
            } else if t.eq_ignore_ascii_case(ty) && s == b"*" {
                2
            } else if t.eq_ignore_ascii_case(ty) && s.eq_ignore_ascii_case(sub) {
                3
            } else {
                continue;
            };
            let mut q = 1000;
            for p in parts {
                let p = trim(p);
                if p.len() >= 2 && p[..2].eq_ignore_ascii_case(b"q=") {
                    q = parse_q(&p[2..]);
                }
            }
            if best.map_or(true, |(sp, _)| specificity > sp) {
                best = Some((specificity, q));
            }
        }
    }
    best.map_or(0, |(_, q)| q)
}

/// A qvalue (`0`, `0.5`, `1.000`) in thousandths; anything malformed counts as 0.
fn parse_q(v: &[u8]) -> u32 {
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &b""[..]),
    };
    if int.len() != 1 || !int[0].is_ascii_digit() || frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return 0;
    }
    let mut q = u32::from(int[0] - b'0') * 1000;
    for (i, d) in frac.iter().enumerate() {
        q += u32::from(d - b'0') * [100, 10, 1][i];
    }
    q.min(1000)
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &s[start..end]
}

/// The page's entity tag, `"kylin-<FNV-1a 64 of the page, hex>"`: made at compile time, so a
/// browser revalidates the page (`Cache-Control: no-cache`) and gets 304 until the module is
/// upgraded to another page. (Static data: nothing allocated that a dlclose() would leak.)
static ETAG: [u8; 24] = etag_of(PAGE.as_bytes());

const fn etag_of(page: &[u8]) -> [u8; 24] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < page.len() {
        h ^= page[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    let mut out = *b"\"kylin-0000000000000000\"";
    let mut d = 0;
    while d < 16 {
        let nibble = ((h >> (60 - 4 * d)) & 0xf) as u8;
        out[7 + d] = if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 };
        d += 1;
    }
    out
}

pub fn etag() -> &'static str {
    core::str::from_utf8(&ETAG).unwrap_or("\"kylin\"")
}

/// Headers of the HTML response besides Content-Type, ETag and Vary. The policy lets the
/// page run its own inline script and style and fetch from its own origin only, so a page
/// that tried to load anything from elsewhere would be refused by the browser.
pub const HTML_HEADERS: [(&str, &str); 4] = [
    ("Cache-Control", "no-cache"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
];

#[cfg(test)]
mod tests {
    use super::*;

    const CHROMIUM: &[u8] = b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7";
    const FIREFOX: &[u8] = b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    const PROMETHEUS: &[u8] = b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn accept_chooses_html_for_browsers_only() {
        assert_eq!(choose(b"", &[CHROMIUM]), Format::Html);
        assert_eq!(choose(b"", &[FIREFOX]), Format::Html);
        assert_eq!(choose(b"", &[b"text/html"]), Format::Html);
        // curl, fetch(), Prometheus, no header, JSON clients.
        assert_eq!(choose(b"", &[b"*/*"]), Format::Json);
        assert_eq!(choose(b"", &[PROMETHEUS]), Format::Json);
        assert_eq!(choose(b"", &[]), Format::Json);
        assert_eq!(choose(b"", &[b"application/json"]), Format::Json);
        assert_eq!(choose(b"", &[b"application/json, text/html;q=0.9"]), Format::Json);
        assert_eq!(choose(b"", &[b"text/html;q=0.9, application/json;q=0.5"]), Format::Html);
        assert_eq!(choose(b"", &[b"text/html;q=0, */*"]), Format::Json);
        assert_eq!(choose(b"", &[b"text/*"]), Format::Html);
        assert_eq!(choose(b"", &[b"TEXT/HTML ; Q=1"]), Format::Html);
        // Two Accept headers count as one list.
        assert_eq!(choose(b"", &[b"application/json;q=0.2", b"text/html"]), Format::Html);
        // Malformed ranges and qvalues are ignored, not trusted.
        assert_eq!(choose(b"", &[b"text/html;q=2x, html, ;;, /"]), Format::Json);
        assert_eq!(choose(b"", &[b"\xff\x00text/html"]), Format::Json);
    }

    #[test]
    fn format_argument_wins_over_accept() {
        assert_eq!(choose(b"format=prometheus", &[CHROMIUM]), Format::Prometheus);
        assert_eq!(choose(b"format=json", &[CHROMIUM]), Format::Json);
        assert_eq!(choose(b"format=html", &[b"*/*"]), Format::Html);
        assert_eq!(choose(b"x=1&format=html", &[]), Format::Html);
        assert_eq!(choose(b"format=yaml", &[CHROMIUM]), Format::Json);
        assert_eq!(choose(b"format=html&format=prometheus", &[]), Format::Prometheus);
        assert_eq!(choose(b"format=prometheus&format=html", &[]), Format::Prometheus);
        assert_eq!(choose(b"xformat=html", &[b"*/*"]), Format::Json);
    }

    #[test]
    fn qvalues() {
        assert_eq!(parse_q(b"1"), 1000);
        assert_eq!(parse_q(b"0.8"), 800);
        assert_eq!(parse_q(b"0.125"), 125);
        assert_eq!(parse_q(b"1.000"), 1000);
        assert_eq!(parse_q(b"0.1234"), 0);
        assert_eq!(parse_q(b""), 0);
        assert_eq!(parse_q(b"."), 0);
        assert_eq!(parse_q(b"9"), 1000);
    }

    #[test]
    fn page_is_self_contained() {
        // No URL of another origin anywhere in the page: it must work offline.
        for needle in ["http://", "https://", "//cdn", "@import", "<link", "src=\"", "url("] {
            assert!(!PAGE.contains(needle), "the page contains {needle}");
        }
        assert!(PAGE.starts_with("<!DOCTYPE html>"));
        assert!(etag().starts_with("\"kylin-") && etag().ends_with('"') && etag().len() == 24, "{}", etag());
        assert_ne!(etag_of(b"a"), etag_of(b"b"));
        assert_eq!(&etag_of(b"")[7..23], b"cbf29ce484222325");
    }
}
