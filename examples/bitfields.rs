//! Prints where the bindings put the bit fields of nginx's structures that the module reads
//! or writes, as bit offsets from the start of each structure; `scripts/check-bitfields`
//! compares them with where the C compiler puts them, for each nginx the module is built for.
//! bindgen can disagree with gcc: on nginx 1.30 and 1.31 it places the bits of
//! `ngx_http_request_t` from `uri_changes` on two bits early (after the 16-bit `port`), so
//! the module reads none of those (see `session_check::terminated`).
use core::mem::{size_of, MaybeUninit};
use nginx_sys::*;

/// The first set bit of `x`, as a bit offset from its start.
fn first_bit<T>(x: &T) -> Option<usize> {
    // SAFETY: x is a plain C structure of size_of::<T>() initialised bytes.
    let bytes = unsafe { core::slice::from_raw_parts(x as *const T as *const u8, size_of::<T>()) };
    bytes.iter().enumerate().find(|(_, &b)| b != 0).map(|(i, &b)| i * 8 + b.trailing_zeros() as usize)
}

macro_rules! show {
    ($t:ty, $name:literal, |$x:ident| $set:expr) => {{
        // SAFETY: bindgen's structures of nginx's C structures: integers, pointers and
        // optional function pointers, for which all-zero bytes are valid.
        let mut $x: $t = unsafe { MaybeUninit::zeroed().assume_init() };
        $set;
        println!("{} {}", $name, first_bit(&$x).map_or(-1, |b| b as i64));
    }};
}

fn main() {
    show!(ngx_http_request_t, "request.blocked", |x| x.set_blocked(1));
    show!(ngx_http_request_t, "request.aio", |x| x.set_aio(1));
    show!(ngx_connection_t, "connection.error", |x| x.set_error(1));
    show!(ngx_http_upstream_rr_peers_t, "rr_peers.single", |x| x.set_single(1));
    show!(ngx_peer_connection_t, "peer_connection.cached", |x| x.set_cached(1));
    show!(ngx_event_t, "event.cancelable", |x| x.set_cancelable(1));
    show!(ngx_buf_t, "buf.last_buf", |x| x.set_last_buf(1));
    show!(ngx_buf_t, "buf.last_in_chain", |x| x.set_last_in_chain(1));
    show!(ngx_url_t, "url.no_resolve", |x| x.set_no_resolve(1));
    show!(ngx_url_t, "url.no_port", |x| x.set_no_port(1));
}
