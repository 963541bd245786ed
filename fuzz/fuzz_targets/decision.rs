//! The decision function with arbitrary rings, load states, availability and bounds: never
//! panics; a choice is a usable server; a movable request that lands on a server other than
//! its sticky one was admitted under the bound; a pinned request never spills.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/ring.rs"]
mod ring;
#[allow(dead_code)]
#[path = "../../src/balancer.rs"]
mod balancer;

use balancer::{Balance, Bound, Group, Request, Route, Servers};

struct S {
    up: Vec<bool>,
    load: Vec<u64>,
    weight: Vec<u64>,
}

impl Servers for S {
    fn usable(&mut self, i: usize) -> bool {
        self.up[i]
    }
    fn load(&self, i: usize) -> u64 {
        self.load[i]
    }
    fn weight(&self, i: usize) -> u64 {
        self.weight[i]
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let n = (data[0] % 12) as usize + 1;
    let key = u64::from_le_bytes(data[1..9].try_into().unwrap_or([0; 8]));
    let factor = u32::from(u16::from_le_bytes([data[9], data[10]]));
    let flags = data[11];
    let rest = &data[12..];
    let at = |i: usize| rest.get(i).copied().unwrap_or(0);
    let names: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}:7070")).collect();
    let weights: Vec<u64> = (0..n).map(|i| u64::from(at(i) % 4) + 1).collect();
    let ring = match ring::Ring::new(names.iter().zip(&weights).map(|(s, &w)| (s.as_bytes(), w as u32))) {
        Ok(r) => r,
        Err(_) => return,
    };
    let mut s = S {
        up: (0..n).map(|i| at(n + i) % 5 != 0).collect(),
        load: (0..n).map(|i| u64::from(at(2 * n + i))).collect(),
        weight: weights,
    };
    let total: u64 = s.load.iter().sum::<u64>() + u64::from(at(3 * n));
    let live_weight = (0..n).filter(|&i| s.up[i]).map(|i| s.weight[i]).sum();
    let bound = Bound { factor_milli: factor, total, live_weight };
    let learned = (flags & 1 != 0).then(|| (at(3 * n + 1) as usize) % (n + 2));
    let balance = match flags >> 2 & 3 {
        0 => Balance::Requests,
        1 => Balance::Clients,
        _ => Balance::Off,
    };
    let moved = (flags & 16 != 0).then(|| (at(3 * n + 2) as usize) % (n + 2));
    let req = Request { key, learned, movable: flags & 2 != 0, balance, moved, sticky: flags & 32 != 0 };
    let loads = s.load.clone();
    let up = s.up.clone();
    let weights = s.weight.clone();
    let c = balancer::choose(&req, Group { ring: &ring, servers: &mut s, bound }, None::<Group<'_, S>>);
    match c {
        None => assert!(up.iter().all(|&u| !u)),
        Some(c) => {
            assert!(up[c.server]);
            if c.route == Route::Spilled {
                assert!(req.movable);
                assert!(bound.admits(loads[c.server], weights[c.server]));
            }
            if !req.movable || balance != Balance::Requests {
                assert_ne!(c.route, Route::Spilled);
            }
            if c.route == Route::Moved {
                assert!(req.follows_client() && req.moved == Some(c.server));
            }
            if let (true, Some(m)) = (req.follows_client(), req.moved) {
                if m < n && up[m] {
                    assert_eq!((c.server, c.route), (m, Route::Moved));
                }
            }
        }
    }
});
