//! Run-time drain (pure Rust, no FFI): the JSON document that `kylin_status write=on`
//! accepts, and the drain mark kept in a server's health slot.
//!
//! ```json
//! {"upstream": "kylin_nodes", "server": "10.0.0.7:7070", "drain": true}
//! ```
//!
//! `server` is an address as the status page lists it, or the `server` directive's text (a
//! name that resolved to several addresses marks them all). A draining server takes no new
//! clients, no new sessions and no spilled traffic; requests of sessions that live there
//! still go to it (the balancer's `usable_for_session`), as with nginx's `drain` (1.29.6+).

/// The health slot's cell that holds the drain mark: 0, or when it was set (Unix ms).
pub const CELL: usize = crate::health::cell::DRAIN;

/// Largest request body accepted.
pub const MAX_BODY: usize = 4096;

/// One change asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub upstream: String,
    pub server: String,
    pub drain: bool,
}

/// Parses a request body. Errors are meant for the client (HTTP 400).
pub fn parse_command(body: &[u8]) -> Result<Command, String> {
    if body.len() > MAX_BODY {
        return Err(format!("the document is larger than {MAX_BODY} bytes"));
    }
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("the document must be a JSON object")?;
    for k in obj.keys() {
        if !matches!(k.as_str(), "upstream" | "server" | "drain") {
            return Err(format!("unknown field \"{k}\": the fields are \"upstream\", \"server\" and \"drain\""));
        }
    }
    let text = |k: &str| -> Result<String, String> {
        match obj.get(k) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => Err(format!("\"{k}\" must be a non-empty string")),
            None => Err(format!("\"{k}\" is missing")),
        }
    };
    let upstream = text("upstream")?;
    let server = text("server")?;
    let drain = match obj.get("drain") {
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => return Err("\"drain\" must be true or false".into()),
        None => return Err("\"drain\" is missing".into()),
    };
    Ok(Command { upstream, server, drain })
}

/// The value the drain cell takes for a command at `now_ms`: keeps the time of an earlier
/// drain mark when draining again (so "draining since" stays true).
pub fn next_mark(current: u64, drain: bool, now_ms: u64) -> u64 {
    match (drain, current) {
        (false, _) => 0,
        (true, 0) => now_ms.max(1),
        (true, t) => t,
    }
}

/// Whether the server's drain mark is set in its health slot (in the load zone).
pub fn drained(table: Option<&crate::load::LoadTable<'_>>, upstream: &[u8], server: &[u8]) -> bool {
    table
        .and_then(|t| t.find(crate::load::health_key(upstream, server)))
        .is_some_and(|s| s.cell(CELL).load(core::sync::atomic::Ordering::Relaxed) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_mark_is_read_from_the_health_slot() {
        use crate::load::{health_key, Header, LoadTable, Slot, Use};
        let h = Header::default();
        let slots: Vec<Slot> = (0..8).map(|_| Slot::default()).collect();
        let t = LoadTable::new(&h, &slots);
        let k = health_key(b"up", b"10.0.0.1:7070");
        let p = t.prepare(&[(k, Use::Counts)]);
        t.commit(p.generation);
        assert!(!drained(Some(&t), b"up", b"10.0.0.1:7070"));
        t.find(k).unwrap().cell(CELL).store(next_mark(0, true, 5), core::sync::atomic::Ordering::Relaxed);
        assert!(drained(Some(&t), b"up", b"10.0.0.1:7070"));
        assert!(!drained(Some(&t), b"up", b"10.0.0.2:7070"));
        assert!(!drained(None, b"up", b"10.0.0.1:7070"));
    }
    use proptest::prelude::*;

    #[test]
    fn commands() {
        assert_eq!(
            parse_command(br#"{"upstream":"kylin_nodes","server":"10.0.0.1:7070","drain":true}"#),
            Ok(Command { upstream: "kylin_nodes".into(), server: "10.0.0.1:7070".into(), drain: true })
        );
        assert_eq!(parse_command(br#" {"drain":false,"server":"k1:7070","upstream":"u"} "#).map(|c| c.drain), Ok(false));
        for (bad, why) in [
            (&br#"{"upstream":"u","server":"s"}"#[..], "\"drain\" is missing"),
            (br#"{"upstream":"u","server":"s","drain":"yes"}"#, "true or false"),
            (br#"{"upstream":"u","server":"","drain":true}"#, "non-empty"),
            (br#"{"upstream":1,"server":"s","drain":true}"#, "non-empty string"),
            (br#"{"server":"s","drain":true}"#, "\"upstream\" is missing"),
            (br#"{"upstream":"u","server":"s","drain":true,"weight":2}"#, "unknown field \"weight\""),
            (br#"[1]"#, "JSON object"),
            (br#"{"upstream":"#, "invalid JSON"),
            (b"", "invalid JSON"),
        ] {
            let e = parse_command(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let big = format!(r#"{{"upstream":"{}","server":"s","drain":true}}"#, "u".repeat(MAX_BODY));
        assert!(parse_command(big.as_bytes()).unwrap_err().contains("larger"));
    }

    #[test]
    fn marks() {
        assert_eq!(next_mark(0, true, 5), 5);
        assert_eq!(next_mark(3, true, 5), 3);
        assert_eq!(next_mark(3, false, 5), 0);
        assert_eq!(next_mark(0, true, 0), 1);
    }

    proptest! {
        #[test]
        fn any_body_parses_or_errs(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_command(&body);
        }
    }
}
