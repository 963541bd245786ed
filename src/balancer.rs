//! How a peer is chosen (pure Rust, no FFI).
//!
//! The nginx glue (`upstream.rs`) computes the request's key hash, wraps nginx's peer list
//! in a [`Servers`] view, and calls [`choose`]. Everything that decides *which* server a
//! request goes to lives here, so it can be unit-tested without nginx.
//!
//! Selection today:
//! 1. Walk the key's preference list on the primary ring ([`Ring::order`]). The first server
//!    is the key's sticky server; if it is usable the request goes there ([`Route::Sticky`]).
//! 2. Otherwise the first usable server further down the list takes it
//!    ([`Route::Failover`]): the same key always fails over to the same second choice.
//! 3. When no primary server is usable, the same walk runs over the `backup` servers
//!    ([`Route::Backup`]).
//!
//! "Usable" is nginx's own notion (not `down`, not failed within `fail_timeout` after
//! `max_fails`, under `max_conns`, not already tried by this request), provided by the caller.

use crate::ring::Ring;

/// How the chosen server was reached; reported in logs and, later, in variables and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The key's own server.
    Sticky,
    /// A later server in the key's order, because the ones before were unusable.
    Failover,
    /// A backup server, because no primary server was usable.
    Backup,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Sticky => "sticky",
            Route::Failover => "failover",
            Route::Backup => "backup",
        }
    }
}

/// A view of one group of servers (primary or backup) at selection time.
pub trait Servers {
    /// Whether server `i` may take this request now.
    fn usable(&mut self, i: usize) -> bool;
}

/// The decision: which server of which group, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub server: usize,
    pub backup: bool,
    pub route: Route,
}

/// First usable server in `key`'s order on `ring`, and whether it is the key's first choice.
#[inline]
fn first_usable(ring: &Ring, servers: &mut impl Servers, key: u64) -> Option<(usize, bool)> {
    ring.order(key).enumerate().find(|&(_, i)| servers.usable(i)).map(|(n, i)| (i, n == 0))
}

/// Chooses the server for a request whose key hashes to `key`.
/// Returns `None` when no server in either group is usable.
pub fn choose<P, B>(key: u64, primary: (&Ring, &mut P), backup: Option<(&Ring, &mut B)>) -> Option<Choice>
where
    P: Servers,
    B: Servers,
{
    if let Some((server, first)) = first_usable(primary.0, primary.1, key) {
        let route = if first { Route::Sticky } else { Route::Failover };
        return Some(Choice { server, backup: false, route });
    }
    let (ring, servers) = backup?;
    first_usable(ring, servers, key).map(|(server, _)| Choice { server, backup: true, route: Route::Backup })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::key_hash;

    struct Set(Vec<bool>);
    impl Servers for Set {
        fn usable(&mut self, i: usize) -> bool {
            self.0[i]
        }
    }

    fn ring(n: usize) -> (Vec<String>, Ring) {
        let names: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
        let r = Ring::new(names.iter().map(|s| (s.as_bytes(), 1))).unwrap();
        (names, r)
    }

    #[test]
    fn sticky_when_owner_is_usable() {
        let (_, r) = ring(4);
        for k in 0..500u32 {
            let h = key_hash(&k.to_le_bytes());
            let c = choose(h, (&r, &mut Set(vec![true; 4])), None::<(&Ring, &mut Set)>).unwrap();
            assert_eq!(c, Choice { server: r.owner(h).unwrap(), backup: false, route: Route::Sticky });
        }
    }

    #[test]
    fn failover_goes_to_the_keys_second_choice() {
        let (_, r) = ring(4);
        for k in 0..500u32 {
            let h = key_hash(&k.to_le_bytes());
            let order: Vec<usize> = r.order(h).collect();
            let mut up = vec![true; 4];
            up[order[0]] = false;
            let c = choose(h, (&r, &mut Set(up.clone())), None::<(&Ring, &mut Set)>).unwrap();
            assert_eq!((c.server, c.route), (order[1], Route::Failover));
            up[order[1]] = false;
            let c = choose(h, (&r, &mut Set(up)), None::<(&Ring, &mut Set)>).unwrap();
            assert_eq!((c.server, c.route), (order[2], Route::Failover));
        }
    }

    #[test]
    fn backup_only_when_no_primary_is_usable() {
        let (_, r) = ring(3);
        let (_, b) = ring(2);
        let h = key_hash(b"client");
        let mut p = Set(vec![false, true, false]);
        let c = choose(h, (&r, &mut p), Some((&b, &mut Set(vec![true, true])))).unwrap();
        assert!(!c.backup);
        let mut p = Set(vec![false; 3]);
        let c = choose(h, (&r, &mut p), Some((&b, &mut Set(vec![true, true])))).unwrap();
        assert!(c.backup);
        assert_eq!(c.route, Route::Backup);
        assert_eq!(c.server, b.owner(h).unwrap());
        let mut p = Set(vec![false; 3]);
        assert_eq!(choose(h, (&r, &mut p), Some((&b, &mut Set(vec![false, false])))), None);
        let mut p = Set(vec![false; 3]);
        assert_eq!(choose(h, (&r, &mut p), None::<(&Ring, &mut Set)>), None);
    }
}
