//! Deterministic simulation to choose the default `kylin_balance_factor`.
//!
//!     factor_sim [REQUESTS_PER_RUN [RUNS [LOAD]]]      defaults: 200000 20 0.8
//!
//! Model: 4 equal servers, each a FIFO queue serving one request at a time with exponential
//! service times (mean 1). Clients: 3 hot BI clients sending half of all requests (1/6 each)
//! and 200 light clients sharing the other half. Requests arrive as a Poisson process at LOAD
//! times the total capacity (4). Each request is movable (cookie-less) with probability 0.5,
//! else pinned. Every request is placed by the real `balancer::choose`, with the bound computed
//! from the current in-flight counts: `Bound { factor_milli, total, live_weight: 4 }`.
//! Each configuration runs RUNS times with different client addresses (so the hot clients'
//! sticky servers sometimes coincide and sometimes do not), all from fixed xorshift seeds.
//!
//! Prints a markdown table. Reported per balance factor (and for least-connections as the no-stickiness reference):
//! - peak/mean: time average of the most loaded server's in-flight count over the time average
//!   of the mean in-flight count (1.0 = perfectly even); mean over runs, and the worst run;
//! - p99 queue: 99th percentile of a server's in-flight count (time-weighted, all servers);
//! - latency: mean and p99 of the time a request spends queued and served (service mean = 1);
//! - moved: share of requests not served by their sticky server (lost cache locality), of all
//!   requests and of the movable ones.
//!
//! `ring.rs` and `balancer.rs` are compiled from the crate's sources (see select_bench.rs).
use std::collections::VecDeque;

#[allow(dead_code)]
#[path = "../src/ring.rs"]
mod ring;
#[allow(dead_code)]
#[path = "../src/balancer.rs"]
mod balancer;

use balancer::{Bound, Group, Request, Route, Servers};
use ring::{key_hash, Ring};

const SERVERS: usize = 4;
const HOT: usize = 3;
const LIGHT: usize = 200;
const HOT_SHARE: f64 = 0.5;
const MOVABLE: f64 = 0.5;

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // Any nonzero state works; mix the seed so that nearby seeds diverge at once.
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * self.unit().ln()
    }
}

struct InFlight<'a>(&'a [u64]);

impl Servers for InFlight<'_> {
    fn usable(&mut self, _i: usize) -> bool {
        true
    }
    fn load(&self, i: usize) -> u64 {
        self.0[i]
    }
    fn weight(&self, _i: usize) -> u64 {
        1
    }
}

#[derive(Clone, Copy)]
enum Policy {
    /// `choose` with this factor in thousandths (0 = off).
    Kylin(u32),
    /// Least in-flight server, ignoring stickiness (ties: lowest index).
    LeastConn,
}

#[derive(Default)]
struct Stats {
    peak_to_mean: f64,
    p99_queue: f64,
    mean_latency: f64,
    p99_latency: f64,
    moved: f64,
    moved_of_movable: f64,
    /// Most requests in flight on one server when the run ends.
    final_max: u64,
}

/// A run ends with a runaway queue when some server still holds more than this many requests
/// (a stable server at 93% utilization exceeds it with probability about 0.1%).
const RUNAWAY: u64 = 100;

/// Time-weighted integration of the in-flight counts between events.
struct Clock {
    now: f64,
    area_max: f64,
    area_sum: f64,
    /// Time spent by any server at each in-flight level.
    level_time: Vec<f64>,
}

impl Clock {
    fn advance(&mut self, to: f64, inflight: &[u64]) {
        let dt = to - self.now;
        if dt > 0.0 {
            let max = *inflight.iter().max().unwrap_or(&0);
            let sum: u64 = inflight.iter().sum();
            self.area_max += dt * max as f64;
            self.area_sum += dt * sum as f64;
            for &l in inflight {
                let l = l as usize;
                if l >= self.level_time.len() {
                    self.level_time.resize(l + 1, 0.0);
                }
                self.level_time[l] += dt;
            }
            self.now = to;
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn run(ring: &Ring, policy: Policy, seed: u64, requests: usize, load: f64) -> Stats {
    // Client addresses depend on the seed only, so every policy sees the same clients and the
    // same arrival sequence in a given run.
    let mut addr = XorShift::new(seed);
    let keys: Vec<u64> = (0..HOT + LIGHT)
        .map(|_| {
            let a = addr.next();
            key_hash(format!("10.{}.{}.{}", a & 0xff, (a >> 8) & 0xff, (a >> 16) & 0xff).as_bytes())
        })
        .collect();
    let mut rng = XorShift::new(seed ^ 0xDEAD_BEEF);
    let rate = load * SERVERS as f64;

    let mut inflight = [0u64; SERVERS];
    let mut queues: Vec<VecDeque<f64>> = vec![VecDeque::new(); SERVERS];
    let mut clock = Clock { now: 0.0, area_max: 0.0, area_sum: 0.0, level_time: Vec::new() };
    let mut latencies = Vec::with_capacity(requests);
    let (mut moved, mut movable_n, mut moved_movable) = (0u64, 0u64, 0u64);
    let mut t = 0.0;

    for _ in 0..requests {
        t += rng.exp(1.0 / rate);
        // Departures up to t, in time order.
        loop {
            let next = (0..SERVERS)
                .filter_map(|s| queues[s].front().map(|&d| (d, s)))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            match next {
                Some((d, s)) if d <= t => {
                    clock.advance(d, &inflight);
                    queues[s].pop_front();
                    inflight[s] -= 1;
                }
                _ => break,
            }
        }
        clock.advance(t, &inflight);

        let client = if rng.unit() <= HOT_SHARE {
            (rng.next() % HOT as u64) as usize
        } else {
            HOT + (rng.next() % LIGHT as u64) as usize
        };
        let movable = rng.unit() <= MOVABLE;
        let key = keys[client];
        let sticky = ring.owner(key).expect("ring");
        let server = match policy {
            Policy::Kylin(factor) => {
                let bound = Bound { factor_milli: factor, total: inflight.iter().sum(), live_weight: SERVERS as u64 };
                let mut view = InFlight(&inflight);
                let c = balancer::choose(
                    &Request { key, learned: None, movable },
                    Group { ring, servers: &mut view, bound },
                    None::<Group<'_, InFlight>>,
                )
                .expect("a server");
                debug_assert!(c.route == Route::Sticky || c.route == Route::Spilled);
                c.server
            }
            Policy::LeastConn => (0..SERVERS).min_by_key(|&s| inflight[s]).unwrap_or(0),
        };
        if server != sticky {
            moved += 1;
        }
        if movable {
            movable_n += 1;
            if server != sticky {
                moved_movable += 1;
            }
        }
        let start = queues[server].back().copied().unwrap_or(t).max(t);
        let done = start + rng.exp(1.0);
        queues[server].push_back(done);
        inflight[server] += 1;
        latencies.push(done - t);
    }

    let total_time: f64 = clock.level_time.iter().sum();
    let mut acc = 0.0;
    let mut p99_queue = 0.0;
    for (level, &time) in clock.level_time.iter().enumerate() {
        acc += time;
        if acc >= 0.99 * total_time {
            p99_queue = level as f64;
            break;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let mean_inflight = clock.area_sum / SERVERS as f64;
    Stats {
        peak_to_mean: if mean_inflight > 0.0 { clock.area_max / mean_inflight } else { 1.0 },
        p99_queue,
        mean_latency: latencies.iter().sum::<f64>() / latencies.len() as f64,
        p99_latency: percentile(&latencies, 0.99),
        moved: moved as f64 / requests as f64,
        moved_of_movable: moved_movable as f64 / movable_n.max(1) as f64,
        final_max: *inflight.iter().max().unwrap_or(&0),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let requests: usize = args.get(1).map_or(200_000, |v| v.parse().expect("REQUESTS_PER_RUN"));
    let runs: u64 = args.get(2).map_or(20, |v| v.parse().expect("RUNS"));
    let load: f64 = args.get(3).map_or(0.8, |v| v.parse().expect("LOAD"));

    let names: Vec<String> = (1..=SERVERS).map(|i| format!("10.0.0.{i}:7070")).collect();
    let ring = Ring::new(names.iter().map(|s| (s.as_bytes(), 1))).expect("ring");

    let policies: Vec<(String, Policy)> = [0u32, 1100, 1250, 1500, 2000, 3000]
        .iter()
        .map(|&f| {
            let label = if f == 0 { "off".to_string() } else { format!("{}", f as f64 / 1000.0) };
            (label, Policy::Kylin(f))
        })
        .chain(std::iter::once(("least_conn (no stickiness)".to_string(), Policy::LeastConn)))
        .collect();

    println!(
        "{SERVERS} equal servers, arrivals at {:.0}% of capacity, {HOT} hot clients sending {:.0}% of requests + {LIGHT} light clients, \
         {:.0}% of requests movable; {runs} runs x {requests} requests (different client addresses per run, fixed seeds).\n",
        load * 100.0,
        HOT_SHARE * 100.0,
        MOVABLE * 100.0
    );
    println!("| factor | peak/mean in-flight (mean of runs) | worst run | p99 in-flight per server (median run) | latency mean / p99 (median run) | runs with a runaway queue | moved, all requests | moved, movable requests |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (label, policy) in &policies {
        let all: Vec<Stats> = (1..=runs).map(|seed| run(&ring, *policy, seed, requests, load)).collect();
        let mean = |f: fn(&Stats) -> f64| all.iter().map(f).sum::<f64>() / all.len() as f64;
        let median = |f: fn(&Stats) -> f64| {
            let mut v: Vec<f64> = all.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let worst = all.iter().map(|s| s.peak_to_mean).fold(0.0, f64::max);
        let runaway = all.iter().filter(|s| s.final_max > RUNAWAY).count();
        println!(
            "| {label} | {:.3} | {:.3} | {:.0} | {:.2} / {:.2} | {runaway} of {runs} | {:.1}% | {:.1}% |",
            mean(|s| s.peak_to_mean),
            worst,
            median(|s| s.p99_queue),
            median(|s| s.mean_latency),
            median(|s| s.p99_latency),
            mean(|s| s.moved) * 100.0,
            mean(|s| s.moved_of_movable) * 100.0,
        );
    }
}
