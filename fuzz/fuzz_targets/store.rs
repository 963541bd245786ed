//! `kylin_session_store` arguments, `kylin_balance_factor` values and per-format session-id
//! checks on arbitrary input: never panic; a key is produced only for a well-formed id, and
//! never contains bytes that are not in the id or the configured template.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/ring.rs"]
mod ring;
#[allow(dead_code)]
#[path = "../../src/balancer.rs"]
mod balancer;
#[allow(dead_code)]
#[path = "../../src/store.rs"]
mod store;
#[allow(dead_code)]
#[path = "../../src/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "../../src/routes.rs"]
mod routes;
#[allow(dead_code)]
#[path = "../../src/session.rs"]
mod session;

fuzz_target!(|data: &[u8]| {
    let _ = balancer::parse_factor(data);
    if let Ok(text) = core::str::from_utf8(data) {
        let words: Vec<&str> = text.split_whitespace().collect();
        if let Ok(store::StoreMode::Redis(r)) = store::parse_store(&words) {
            assert!(!r.urls.is_empty());
        }
        let _ = store::redact(text);
    }
    let formats = [
        store::Format::Tomcat { strip_route: true },
        store::Format::Tomcat { strip_route: false },
        store::Format::Spring { namespace: "spring:session".into() },
        store::Format::Template { prefix: "app:".into(), suffix: ":v".into() },
    ];
    for f in &formats {
        if let Some(key) = store::shared_key(f, data) {
            assert!(!key.is_empty());
            assert!(!key.iter().any(|&b| b <= b' ' || b == 0x7f), "control or space in a key");
        }
    }
});
