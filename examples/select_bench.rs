//! Microbenchmark of the pure selection path: `balancer::choose` and `ring::Ring::order`.
//!
//!     select_bench SERVERS SCENARIO ITERATIONS
//!
//! Builds a ring of SERVERS equal servers (all usable, loads from a Vec) and runs ITERATIONS
//! operations over 65,536 pseudo-random keys (xorshift, fixed seed) inside `measured`, a
//! non-inlined function that `scripts/bench-select` counts with callgrind's `--toggle-collect`.
//! Scenarios:
//!   loop      the loop alone (key fetch + checksum): subtract it from the others
//!   sticky    `choose`, bounding on (c = 1.25), every server under its bound: no spill
//!   spill25   `choose`, c = 1.25, a quarter of the servers over their bound: ~25% spill
//!   spill75   `choose`, c = 1.25, three quarters over their bound: ~75% spill, longer walks
//!   off       `choose` with bounding off (pure consistent hashing)
//!   orderK    `Ring::order(key).nth(K - 1)`: the walk to a key's K-th distinct server, as when
//!             the first K - 1 servers of its order are over their bound (K = 1, 2, 4, ...)
//! Prints one `key=value` line, with the share of spilled choices and a checksum; when run
//! natively, `ns_per_op` is wall-clock time.
//!
//! The two modules are compiled from the crate's own `src/balancer.rs` and `src/ring.rs`
//! (`#[path]`) rather than through `use ngx_http_kylin_upstream_module::...`: the crate's rlib
//! also holds the nginx glue and the `ngx_modules` table, whose references to nginx's symbols
//! (`ngx_pcalloc`, `ngx_shmtx_lock`, ...) cannot be resolved in a program that is not nginx.
//! Both files are plain Rust without FFI, and `choose` is generic, so it is monomorphized in
//! the caller either way: the measured code is the same.
use std::hint::black_box;
use std::time::Instant;

#[allow(dead_code)]
#[path = "../src/ring.rs"]
mod ring;
#[allow(dead_code)]
#[path = "../src/balancer.rs"]
mod balancer;

use balancer::{Bound, Group, Request, Route, Servers};
use ring::Ring;

struct Fixed {
    load: Vec<u64>,
    weight: Vec<u64>,
}

impl Servers for Fixed {
    fn usable(&mut self, _i: usize) -> bool {
        true
    }
    fn load(&self, i: usize) -> u64 {
        self.load[i]
    }
    fn weight(&self, i: usize) -> u64 {
        self.weight[i]
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The measured loop; `scripts/bench-select` collects instructions only inside it.
#[inline(never)]
fn measured<F: FnMut(u64) -> usize>(keys: &[u64], iterations: usize, mut op: F) -> u64 {
    let mask = keys.len() - 1;
    let mut sum = 0u64;
    for i in 0..iterations {
        sum = sum.wrapping_add(op(keys[i & mask]) as u64);
    }
    sum
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: select_bench SERVERS SCENARIO ITERATIONS");
        std::process::exit(2);
    }
    let n: usize = args[1].parse().expect("SERVERS");
    let scenario = args[2].as_str();
    let iterations: usize = args[3].parse().expect("ITERATIONS");

    let names: Vec<String> = (0..n).map(|i| format!("10.0.{}.{}:7070", i / 250, i % 250 + 1)).collect();
    let ring = Ring::new(names.iter().map(|s| (s.as_bytes(), 1))).expect("ring");
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let keys: Vec<u64> = (0..65_536).map(|_| rng.next()).collect();

    // Over-bound servers: a fixed pseudo-random subset (`over` of every 4), load 100;
    // the others idle. With c = 1.25 the bound is ceil(1.25 * (total + 1) / n), below 100
    // whenever at most 3/4 of the servers are loaded, and at least 1 for the idle ones.
    let over_of_4 = match scenario {
        "spill25" => 1,
        "spill75" => 3,
        _ => 0,
    };
    let mut load = vec![0u64; n];
    let mut pick = XorShift(12345);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        idx.swap(i, (pick.next() % (i as u64 + 1)) as usize);
    }
    for &i in idx.iter().take(n * over_of_4 / 4) {
        load[i] = 100;
    }
    let mut servers = Fixed { load, weight: vec![1; n] };
    let factor = if scenario == "off" { 0 } else { 1250 };
    let bound = Bound { factor_milli: factor, total: servers.load.iter().sum(), live_weight: n as u64 };

    let mut spilled = 0u64;
    let start = Instant::now();
    let sum = match scenario {
        "loop" => measured(&keys, iterations, |k| (k >> 7) as usize & 7),
        "sticky" | "spill25" | "spill75" | "off" => measured(&keys, iterations, |k| {
            let req = Request::new(k, true);
            let c = balancer::choose(&req, Group { ring: &ring, servers: &mut servers, bound }, None::<Group<'_, Fixed>>);
            match c {
                Some(c) => {
                    spilled += u64::from(c.route == Route::Spilled);
                    c.server
                }
                None => usize::MAX,
            }
        }),
        s if s.starts_with("order") => {
            let k: usize = s[5..].parse().expect("orderK");
            assert!(k >= 1 && k <= n, "order{k} needs 1 <= K <= servers");
            measured(&keys, iterations, |key| black_box(&ring).order(key).nth(k - 1).unwrap_or(usize::MAX))
        }
        _ => {
            eprintln!("unknown scenario {scenario}");
            std::process::exit(2);
        }
    };
    let elapsed = start.elapsed();
    println!(
        "servers={n} scenario={scenario} iterations={iterations} spilled_share={:.4} checksum={sum} ns_per_op={:.1}",
        spilled as f64 / iterations as f64,
        elapsed.as_nanos() as f64 / iterations as f64
    );
}
