//! The status page's choice of format (`?format=` and `Accept`) on arbitrary bytes: never
//! panics, and `format=` in the query string always wins over `Accept`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/dashboard.rs"]
mod dashboard;

use dashboard::{choose, Format};

fuzz_target!(|data: &[u8]| {
    // Query string, then NUL-separated Accept header values.
    let mut parts = data.split(|&b| b == 0);
    let args = parts.next().unwrap_or(b"");
    let accept: Vec<&[u8]> = parts.collect();
    let f = choose(args, &accept);
    let asked: Vec<&[u8]> = args.split(|&b| b == b'&').filter_map(|a| a.strip_prefix(b"format=")).collect();
    if asked.iter().any(|v| *v == b"prometheus") {
        assert_eq!(f, Format::Prometheus);
    } else if let Some(last) = asked.last() {
        assert_eq!(f, if *last == b"html" { Format::Html } else { Format::Json });
    } else {
        // Accept alone: what a real browser sends gets HTML, whatever follows in other headers
        // cannot turn JSON into Prometheus.
        assert_ne!(f, Format::Prometheus);
    }
});
