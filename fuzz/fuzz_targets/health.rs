//! Health checks on arbitrary input: the probe answer parser, the `kylin_health_check`
//! parameters and the packed shared record never panic; a complete answer has a valid status
//! and a body no longer than the input; parsing is stable as more bytes arrive (a complete
//! answer stays complete with the same status and body); any word unpacks to a record that
//! packs back to a word unpacking the same.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/health.rs"]
mod health;
#[allow(dead_code)]
#[path = "../../src/load.rs"]
mod load;

fuzz_target!(|data: &[u8]| {
    let (split, rest) = match data.split_first() {
        Some((&s, rest)) => (s as usize, rest),
        None => return,
    };
    for eof in [false, true] {
        if let health::Parsed::Complete(a) = health::parse_answer(rest, eof) {
            assert!((100..=599).contains(&a.status));
            assert!(a.body.len() <= rest.len());
            let c = health::CheckConf::default();
            let _ = c.judge(a.status, &a.body);
        }
    }
    // A prefix that is already complete stays so, unchanged, with more bytes.
    let cut = split.min(rest.len());
    if let health::Parsed::Complete(a) = health::parse_answer(&rest[..cut], false) {
        if let health::Parsed::Complete(b) = health::parse_answer(rest, false) {
            assert_eq!((a.status, &a.body), (b.status, &b.body));
        } else if rest.len() <= health::MAX_RESPONSE {
            panic!("a complete answer became incomplete with more bytes");
        }
    }
    if let Ok(text) = core::str::from_utf8(rest) {
        let words: Vec<&[u8]> = text.split_whitespace().map(str::as_bytes).collect();
        if let Ok(c) = health::parse_params(&words) {
            assert!(c.interval_ms >= 100 && c.fails >= 1 && c.passes >= 1 && !c.status.is_empty());
            let _ = c.request(b"host");
        }
        let _ = health::parse_time_ms(rest);
    }
    if rest.len() >= 8 {
        let w = u64::from_le_bytes(rest[..8].try_into().unwrap_or([0; 8]));
        let h = health::Health::unpack(w);
        assert_eq!(health::Health::unpack(h.pack()), h);
    }
});
