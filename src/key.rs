//! The default stickiness key: the client address (pure Rust, no FFI).
//!
//! Unlike stock `ip_hash`, which keeps only the first three octets of an IPv4 address (so a
//! whole NATed office or subnet of BI servers lands on one node), the whole IPv4 address is
//! used. IPv6 clients are keyed by their /64, the prefix a single site or host normally keeps
//! while its interface identifier changes (privacy addresses). IPv4-mapped IPv6 addresses
//! (`::ffff:a.b.c.d`, seen on dual-stack listeners) are treated as the IPv4 address.

use std::net::IpAddr;

/// Key bytes for a client address; up to 8 bytes, written into `buf`.
#[inline]
pub fn client_key(addr: IpAddr, buf: &mut [u8; 8]) -> &[u8] {
    match addr {
        IpAddr::V4(v4) => {
            buf[..4].copy_from_slice(&v4.octets());
            &buf[..4]
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                buf[..4].copy_from_slice(&v4.octets());
                return &buf[..4];
            }
            buf.copy_from_slice(&v6.octets()[..8]);
            &buf[..8]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Vec<u8> {
        let mut b = [0u8; 8];
        client_key(s.parse().unwrap(), &mut b).to_vec()
    }

    #[test]
    fn ipv4_uses_the_whole_address() {
        assert_eq!(key("10.1.2.3"), vec![10, 1, 2, 3]);
        assert_ne!(key("10.1.2.3"), key("10.1.2.4"));
    }

    #[test]
    fn ipv6_uses_the_slash_64() {
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("2001:db8:1:2::1").len(), 8);
    }

    #[test]
    fn mapped_ipv4_is_ipv4() {
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
    }
}
