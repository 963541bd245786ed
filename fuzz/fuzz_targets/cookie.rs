//! Request `Cookie` and response `Set-Cookie` parsing on arbitrary bytes: never panics, and a
//! session id found is well-formed and lies inside the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/session.rs"]
mod session;

fn inside(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    i >= o && i + inner.len() <= o + outer.len()
}

fuzz_target!(|data: &[u8]| {
    let (name, header) = match data.iter().position(|&b| b == 0) {
        Some(i) if session::valid_name(&data[..i]) => (&data[..i], &data[i + 1..]),
        _ => (&b"JSESSIONID"[..], data),
    };
    let halves: Vec<&[u8]> = header.split(|&b| b == b'\n').collect();
    if let session::RequestSession::Id(id) = session::request_session(halves.iter().copied(), name) {
        assert!(session::valid_id(id));
        assert!(halves.iter().any(|h| inside(h, id)));
    }
    if let Some(session::SetSession::Set(id)) = session::response_session(header, name) {
        assert!(session::valid_id(id));
        assert!(inside(header, id));
    }
    let _ = session::session_key([1, 2], session::KeyUse::Route, name, header);
});
