//! Session cookies (pure Rust, no FFI): finding the session id in a request, recognising a
//! new session in a response, and the keyed hash under which a session is stored.
//!
//! Only well-formed ids are used: 1 to [`MAX_ID_LEN`] bytes of RFC 6265 cookie-octets. An
//! empty, oversized, binary or otherwise malformed value counts as "no session": it is never
//! looked up or stored, and the request is balanced like one without a cookie.
//! Session ids are never stored: tables hold a keyed SipHash of the id, keyed per upstream.

use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;

/// Longest session id accepted (Tomcat ids are 32 hex digits plus an optional `.jvmRoute`;
/// Spring Session ids are Base64 of a 36-character UUID).
pub const MAX_ID_LEN: usize = 256;

/// Longest cookie name accepted by `kylin_session_cookie`.
pub const MAX_NAME_LEN: usize = 128;

/// What a request carries under the session cookie's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestSession<'a> {
    /// No cookie of that name, or only malformed values.
    None,
    /// The first well-formed value.
    Id(&'a [u8]),
}

/// RFC 6265 cookie-octet: visible ASCII except DQUOTE, comma, semicolon and backslash; as a
/// table, since the range match measured ~10 instructions a byte on the request path.
const COOKIE_OCTET: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x21;
    while b <= 0x7E {
        t[b] = !matches!(b as u8, b'"' | b',' | b';' | b'\\');
        b += 1;
    }
    t
};

#[inline]
fn is_cookie_octet(b: u8) -> bool {
    COOKIE_OCTET[b as usize]
}

/// Whether `id` is acceptable as a session id.
#[inline]
pub fn valid_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.iter().all(|&b| is_cookie_octet(b))
}

/// Whether `name` is acceptable as a cookie name (an RFC 7230 token).
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.iter().all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// RFC 6265 optional whitespace.
#[inline]
fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `v` without surrounding whitespace and optional double quotes.
#[inline]
fn clean_value(v: &[u8]) -> &[u8] {
    let v = v.trim_ascii();
    match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    }
}

/// The value of the first pair named `name` in a `Cookie` header value (RFC 6265 section
/// 5.4: `name=value` pairs separated by `;` and optional whitespace) that is a valid id.
///
/// Written out byte by byte rather than taken from the `cookie` crate: that crate's parser
/// cost about 1,500 instructions per request under callgrind (it builds a `Cookie` with
/// attributes for every pair), against a budget of a few hundred for the whole balancer.
/// The pair with the right name is read in one pass that finds its end and checks its bytes;
/// other pairs are skipped with `memchr`.
fn find_pair<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let (n, m) = (header.len(), name.len());
    let mut i = 0;
    loop {
        while i < n && is_ws(header[i]) {
            i += 1;
        }
        if n - i > m && &header[i..i + m] == name {
            match pair_value(header, i + m) {
                Ok(v) => return Some(v),
                Err(at) => i = at,
            }
        }
        i += memchr::memchr(b';', &header[i..])? + 1;
    }
}

/// Reads `[ws] = [ws] value [ws]` up to the `;` that ends a pair, or the header's end, from
/// `k`; `value` is 1 to MAX_ID_LEN cookie-octets, optionally in double quotes. `Err` with a
/// position inside the pair (not past its `;`) when the pair is not such a value.
#[inline]
fn pair_value(h: &[u8], mut k: usize) -> Result<&[u8], usize> {
    let n = h.len();
    while k < n && is_ws(h[k]) {
        k += 1;
    }
    if k >= n || h[k] != b'=' {
        return Err(k);
    }
    k += 1;
    while k < n && is_trim(h[k]) {
        k += 1;
    }
    let quoted = k < n && h[k] == b'"';
    let start = k + usize::from(quoted);
    let mut e = start;
    while e < n && is_cookie_octet(h[e]) {
        e += 1;
    }
    let value = &h[start..e];
    if quoted {
        if e >= n || h[e] != b'"' {
            return Err(e);
        }
        e += 1;
    }
    while e < n && is_trim(h[e]) {
        e += 1;
    }
    if (e < n && h[e] != b';') || value.is_empty() || value.len() > MAX_ID_LEN {
        return Err(e.min(n));
    }
    Ok(value)
}

/// Whitespace trimmed around a cookie value (what `<[u8]>::trim_ascii` removes).
#[inline]
fn is_trim(b: u8) -> bool {
    b.is_ascii_whitespace()
}

/// Finds the session cookie `name` in the values of a request's `Cookie` headers: the first
/// well-formed value.
pub fn request_session<'a, I>(cookie_headers: I, name: &[u8]) -> RequestSession<'a>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    for header in cookie_headers {
        if let Some(v) = find_pair(header, name) {
            return RequestSession::Id(v);
        }
    }
    RequestSession::None
}

/// A response's `Set-Cookie` for the session cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetSession<'a> {
    /// A new or refreshed session id.
    Set(&'a [u8]),
    /// The cookie is being deleted (empty value, `Max-Age=0` or less).
    Delete,
}

/// Reads one `Set-Cookie` header value (RFC 6265 section 5.2: `name=value` then
/// `; attribute` parts); `None` when it is about another cookie or malformed.
pub fn response_session<'a>(set_cookie: &'a [u8], name: &[u8]) -> Option<SetSession<'a>> {
    let b = set_cookie;
    let mut i = 0;
    while i < b.len() && is_ws(b[i]) {
        i += 1;
    }
    if !b[i..].starts_with(name) {
        return None;
    }
    i += name.len();
    while i < b.len() && is_ws(b[i]) {
        i += 1;
    }
    if b.get(i) != Some(&b'=') {
        return None;
    }
    let vstart = i + 1;
    let vend = b[vstart..].iter().position(|&c| c == b';').map_or(b.len(), |p| vstart + p);
    let v = clean_value(&b[vstart..vend]);
    let mut expired = false;
    if vend < b.len() {
        for attr in b[vend + 1..].split(|&c| c == b';') {
            let attr = attr.trim_ascii_start();
            // Only Max-Age matters: a leading '-' or all zeros means "expire now" (RFC 6265);
            // a value that is not a number is ignored.
            if attr.len() > 7 && attr[..7].eq_ignore_ascii_case(b"max-age") {
                if let Some(eq) = attr.iter().position(|&c| c == b'=') {
                    let age = attr[eq + 1..].trim_ascii();
                    if attr[7..eq].trim_ascii().is_empty()
                        && (age.first() == Some(&b'-') || (!age.is_empty() && age.iter().all(|&c| c == b'0')))
                    {
                        expired = true;
                    }
                }
            }
        }
    }
    if v.is_empty() || expired {
        return Some(SetSession::Delete);
    }
    valid_id(v).then_some(SetSession::Set(v))
}

/// What a session key indexes. Routes and cached store verdicts get different keys for the
/// same session, so that the two tables stay apart even if both live in one zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUse {
    /// A learned route (`kylin_session_routes`).
    Route,
    /// A cached session-store answer (`kylin_session_cache`).
    Verdict,
}

/// Computes the keys under which one upstream's sessions are stored: 64 bits of SipHash-1-3
/// of the id, under a key derived from the zone's random secret, the table's use and the
/// upstream name (SipHash-1-3 of those under the secret). Deriving the per-upstream key once
/// per worker leaves one short SipHash per request, about half the cost of hashing name and
/// id together, with the same property: without the secret, keys reveal nothing about ids and
/// cannot be steered into collisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionKeyer {
    /// The zone secret the key was derived from (a cache is valid while the zone's is equal).
    secret: [u64; 2],
    key_use: KeyUse,
    key: [u64; 2],
}

impl SessionKeyer {
    pub fn new(secret: [u64; 2], key_use: KeyUse, upstream: &[u8]) -> SessionKeyer {
        let mut h = SipHasher13::new_with_keys(secret[0], secret[1]);
        h.write(match key_use {
            KeyUse::Route => b"kylin session route\0",
            KeyUse::Verdict => b"kylin store verdict\0",
        });
        h.write(upstream);
        let k = h.finish128();
        SessionKeyer { secret, key_use, key: [k.h1, k.h2] }
    }

    /// Whether this keyer was derived for this secret and use.
    pub fn is_for(&self, secret: [u64; 2], key_use: KeyUse) -> bool {
        self.secret == secret && self.key_use == key_use
    }

    /// The table key of session `id`; never 0 (0 marks an empty slot in the tables).
    ///
    /// 64 bits of SipHash-1-3 (half the finalization rounds of the 128-bit output): among
    /// the ~10^5 routes of a 4 MB zone two ids collide with probability ~10^-9, and without
    /// the secret nobody can produce a collision on purpose.
    #[inline]
    pub fn key(&self, id: &[u8]) -> u64 {
        let mut h = siphasher::sip::SipHasher13::new_with_keys(self.key[0], self.key[1]);
        h.write(id);
        h.finish().max(1)
    }
}

/// The key under which session `id` of `upstream` is stored in a table of this use with this
/// secret (see [`SessionKeyer`], which callers on the request path cache per worker).
pub fn session_key(secret: [u64; 2], key_use: KeyUse, upstream: &[u8], id: &[u8]) -> u64 {
    SessionKeyer::new(secret, key_use, upstream).key(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The straightforward reading of a `Cookie` header that `find_pair` must agree with:
    /// split at `;`, match the name, trim, unquote, validate.
    fn find_pair_reference<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
        for pair in header.split(|&b| b == b';') {
            let mut p = pair;
            while let [b, rest @ ..] = p {
                if !is_ws(*b) {
                    break;
                }
                p = rest;
            }
            let Some(rest) = p.strip_prefix(name) else { continue };
            let mut rest = rest;
            while let [b, r @ ..] = rest {
                if !is_ws(*b) {
                    break;
                }
                rest = r;
            }
            let Some(v) = rest.strip_prefix(b"=") else { continue };
            let v = v.trim_ascii();
            let v = match v {
                [b'"', inner @ .., b'"'] => inner,
                _ => v,
            };
            if valid_id(v) {
                return Some(v);
            }
        }
        None
    }

    proptest! {
        #[test]
        fn find_pair_agrees_with_the_reference(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just(b"JSESSIONID".to_vec()), Just(b"=".to_vec()), Just(b";".to_vec()),
                    Just(b" ".to_vec()), Just(b"\t".to_vec()), Just(b"\"".to_vec()),
                    Just(b"ABC123".to_vec()), Just(b"\r\n".to_vec()), Just(b",".to_vec()),
                    proptest::collection::vec(any::<u8>(), 0..4),
                    Just(vec![b'x'; 300]),
                ],
                0..12,
            )
        ) {
            let header: Vec<u8> = parts.concat();
            prop_assert_eq!(find_pair(&header, b"JSESSIONID"), find_pair_reference(&header, b"JSESSIONID"));
        }
    }

    fn req<'a>(headers: &[&'a str]) -> RequestSession<'a> {
        request_session(headers.iter().map(|h| h.as_bytes()), b"JSESSIONID")
    }

    #[test]
    fn finds_the_session_among_cookies() {
        assert_eq!(req(&["a=1; JSESSIONID=ABCDEF0123; b=2"]), RequestSession::Id(b"ABCDEF0123"));
        assert_eq!(req(&["a=1", "JSESSIONID=X1.node2"]), RequestSession::Id(b"X1.node2"));
        assert_eq!(req(&["JSESSIONID=\"quoted\""]), RequestSession::Id(b"quoted"));
        assert_eq!(req(&[]), RequestSession::None);
        assert_eq!(req(&["XJSESSIONID=1; JSESSIONIDX=2"]), RequestSession::None);
    }

    #[test]
    fn malformed_values_are_no_session() {
        assert_eq!(req(&["JSESSIONID="]), RequestSession::None);
        assert_eq!(req(&["JSESSIONID=a b"]), RequestSession::None);
        assert_eq!(req(&["JSESSIONID=a\\b"]), RequestSession::None);
        let long = format!("JSESSIONID={}", "A".repeat(MAX_ID_LEN + 1));
        assert_eq!(req(&[&long]), RequestSession::None);
        let ok = format!("JSESSIONID={}", "A".repeat(MAX_ID_LEN));
        assert!(matches!(req(&[&ok]), RequestSession::Id(_)));
        // Binary and non-UTF-8 bytes.
        let bin: &[u8] = b"JSESSIONID=\xff\xfe\x00";
        assert_eq!(request_session([bin], b"JSESSIONID"), RequestSession::None);
    }

    #[test]
    fn duplicates_take_the_first_well_formed_value() {
        assert_eq!(req(&["JSESSIONID=; JSESSIONID=B2"]), RequestSession::Id(b"B2"));
        assert_eq!(req(&["JSESSIONID=A1; JSESSIONID=B2"]), RequestSession::Id(b"A1"));
    }

    #[test]
    fn set_cookie() {
        let n = b"JSESSIONID";
        assert_eq!(
            response_session(b"JSESSIONID=9F2A; Path=/kylin; HttpOnly", n),
            Some(SetSession::Set(b"9F2A"))
        );
        assert_eq!(response_session(b"JSESSIONID=; Max-Age=0", n), Some(SetSession::Delete));
        assert_eq!(response_session(b"JSESSIONID=x; Max-Age=0", n), Some(SetSession::Delete));
        assert_eq!(response_session(b"other=1", n), None);
        assert_eq!(response_session(b"JSESSIONIDX=1", n), None);
        assert_eq!(response_session(b"JSESSIONID=a\\b", n), None);
        assert_eq!(response_session(b"JSESSIONID=x; max-age=-1", n), Some(SetSession::Delete));
        assert_eq!(response_session(b"JSESSIONID=x; Max-Age = 00", n), Some(SetSession::Delete));
        assert_eq!(response_session(b"JSESSIONID=x; Max-Age=3600; Secure", n), Some(SetSession::Set(b"x")));
        assert_eq!(response_session(b"JSESSIONID=x; Max-Age=soon", n), Some(SetSession::Set(b"x")));
        assert_eq!(response_session(b" JSESSIONID = \"q1\" ; Path=/", n), Some(SetSession::Set(b"q1")));
        assert_eq!(response_session(b"Path=/; JSESSIONID=x", n), None);
        assert_eq!(response_session(b"", n), None);
        assert_eq!(response_session(b"JSESSIONID", n), None);
    }

    proptest::proptest! {
        /// Whatever a client or server sends, parsing never panics and a found id is
        /// well-formed and part of the input.
        #[test]
        fn arbitrary_headers(h in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if let RequestSession::Id(id) = request_session([&h[..]], b"JSESSIONID") {
                proptest::prop_assert!(valid_id(id));
                let start = id.as_ptr() as usize - h.as_ptr() as usize;
                proptest::prop_assert!(start + id.len() <= h.len());
            }
            if let Some(SetSession::Set(id)) = response_session(&h, b"JSESSIONID") {
                proptest::prop_assert!(valid_id(id));
            }
        }
    }

    #[test]
    fn names() {
        assert!(valid_name(b"JSESSIONID"));
        assert!(valid_name(b"e1e6c2c8a5d1b4b7_SESSION"));
        assert!(!valid_name(b""));
        assert!(!valid_name(b"a=b"));
        assert!(!valid_name(b"a b"));
    }

    #[test]
    fn keys_depend_on_secret_use_upstream_and_id() {
        let (s, r) = ([1, 2], KeyUse::Route);
        let k = session_key(s, r, b"up", b"id");
        assert_eq!(k, session_key(s, r, b"up", b"id"));
        assert_ne!(k, session_key([1, 3], r, b"up", b"id"));
        assert_ne!(k, session_key(s, KeyUse::Verdict, b"up", b"id"));
        assert_ne!(k, session_key(s, r, b"up2", b"id"));
        assert_ne!(k, session_key(s, r, b"up", b"id2"));
        // Name and id are hashed separately: ("ab", "c") and ("a", "bc") stay apart.
        assert_ne!(session_key(s, r, b"ab", b"c"), session_key(s, r, b"a", b"bc"));
        // A cached keyer gives the same keys as the one-off function.
        let keyer = SessionKeyer::new(s, r, b"up");
        assert_eq!(keyer.key(b"id"), k);
        assert!(keyer.is_for(s, r));
        assert!(!keyer.is_for(s, KeyUse::Verdict) && !keyer.is_for([1, 3], r));
        assert_ne!(keyer.key(b""), 0);
    }
}
