//! Deterministic simulations: the placement model of issue #13 (`cluster`, the default) and
//! the older queueing model used to choose the default `kylin_balance_factor` (`factor`).
//!
//!     factor_sim [cluster] [--layouts N | --layout L] [--seeds S] [--duration SECONDS] [--warmup SECONDS] [--think MS]
//!                [--adhoc SHARE] [--bi N] [--sessions N] [--per-session LO,HI] [--only NAME]
//!                [--detail]
//!     factor_sim factor [REQUESTS_PER_RUN [RUNS [LOAD]]]      defaults: 200000 20 0.8
//!     factor_sim REQUESTS_PER_RUN [RUNS [LOAD]]                (same as `factor`, for scripts/bench-factor)
//!
//! ## `cluster`: a discrete-event model of the issue #13 benchmark
//!
//! Cluster: 4 Kylin nodes (`127.0.0.1:7071..7074`, weight 1), each with 4 query slots and a
//! FIFO queue; a per-node result cache, an LRU of 256 entries (or unbounded): a query is
//! answered in 5 ms if the node answered it recently, else 60 ms (the node stand-in
//! `scripts/kylin_node.py --slots 4 --cache --cache-size 256 --hit-ms 5 --miss-ms 60`; like it,
//! the cache is looked up and filled when the query arrives, and logins and 401s take no slot).
//! 1 ms of overhead per request (network, nginx), outside the slots.
//! Load (`scripts/loadgen.py`'s workload at the issue's size; loadgen.py now defaults to the heavy
//! setting below, think 5 ms and 3% ad hoc), closed loop: 3 BI servers with 6
//! concurrent user sessions each (think time exponential, mean 80 ms, capped at 800 ms; 15 to
//! 40 queries per session, then a new login; each BI server's queries come from its own hot set
//! of 100, half Pareto(1.2)-ranked, half uniform, 10% ad hoc never repeated), and 9 light
//! clients (one session each, a query every 1.5 s on average from their own 10). A 401 makes
//! the user log in again at once. Sessions are node-local (a query with a session another node
//! created gets 401) or Redis-shared (every node accepts every session).
//! Layouts: each client gets a random 127.x.y.z address in its own /24 (seeded, layout 1..N);
//! `ip_hash` hashes the first three octets exactly as nginx does, `hash $remote_addr
//! consistent` is nginx's ketama ring (crc32, 160 points per server, rebuilt bit for bit), the
//! module's ring is `src/ring.rs` keyed by the four address bytes as `src/key.rs` does.
//! Anchors: ip_hash, hash consistent, round robin, least_conn (fewest in flight, ties by round
//! robin), least_conn + sticky learn (nginx 1.31: a session stays where it was created, logins
//! by least_conn); hash consistent + sticky learn equals hash consistent here (no failures).
//! With node-local sessions, round robin and least_conn send a login and its first query to
//! different nodes here, so nearly every query gets 401 (the real benchmark, with 2 nginx
//! workers and concurrent users, lets some through); they are never the best anchor there.
//! Candidates: today's module (`src/balancer.rs` `choose`, factor 1.25 and others), request
//! spills gated by saturation or by an EWMA of response times (as nginx's `least_time`
//! averages them), and client placement (`src/placement.rs`) with several settings.
//! Defaults: 16 layouts, 3 seeds, 30 s runs of which the first 5 s (`--warmup`) are not counted;
//! `--layout L` runs layout L alone. `SIM_TRACE=1` prints every client move to stderr,
//! `SIM_TRACE_LOGINS=1` every login.
//! Each
//! cell (layout x session kind x cache kind) is the mean of S workload seeds (default 3), the
//! same seeds for every balancer. Reported: queries/s, p99 latency, cache hit rate, 401s,
//! busiest/mean time-averaged in-flight, and per candidate its ratio to the best anchor of the
//! cell (by queries/s): worst and geometric mean over all cells. `--think` (default 80 ms, as
//! loadgen.py had it), `--adhoc` (0.10), `--bi` (3 BI servers), `--sessions` (6 per BI server) and `--per-session` (15,40)
//! change the workload; `--think 5 --adhoc 0.03` is the heavy setting that reproduces the
//! issue's table (bench/placement.md). `--only` keeps the candidates whose name contains
//! NAME; `--detail` adds every balancer's numbers per cell. Output: markdown on stdout.
//!
//! ## `factor`: the balance-factor model
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
#[allow(dead_code)]
#[path = "../src/placement.rs"]
mod placement;
#[path = "sim/cluster.rs"]
mod cluster;

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
                    &Request::new(key, movable),
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
    let mut args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        None | Some("cluster") => return cluster_main(&args[args.len().min(2)..]),
        Some(a) if a.starts_with("--") => return cluster_main(&args[1..]),
        Some("factor") => {
            args.remove(1);
        }
        _ => {}
    }
    factor_main(&args);
}

fn factor_main(args: &[String]) {
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

// ------------------------------------------------------------------------------------------
// `cluster`: the issue #13 benchmark model (examples/sim/cluster.rs).

use cluster::{Config, Kind, Layout, Outcome};
use placement::Params;

/// Mean outcome of one cell over `seeds` workload seeds.
fn cell(cfg: &Config, layout: &Layout, kind: Kind, seeds: u64) -> Outcome {
    let runs: Vec<Outcome> = (1..=seeds).map(|s| cluster::run(cfg, layout, kind, s)).collect();
    let n = runs.len() as f64;
    let mean = |f: fn(&Outcome) -> f64| runs.iter().map(f).sum::<f64>() / n;
    Outcome {
        qps: mean(|o| o.qps),
        p99: mean(|o| o.p99),
        p50: mean(|o| o.p50),
        hit: mean(|o| o.hit),
        unauthorized: runs.iter().map(|o| o.unauthorized).sum(),
        logins: runs.iter().map(|o| o.logins).sum(),
        busiest: mean(|o| o.busiest),
        moves: runs.iter().map(|o| o.moves).sum(),
        bi_nodes: runs[0].bi_nodes.clone(),
    }
}

fn anchors() -> Vec<(&'static str, Kind)> {
    vec![
        ("ip_hash", Kind::IpHash),
        ("hash consistent", Kind::Hash),
        ("round robin", Kind::RoundRobin),
        ("least_conn", Kind::LeastConn),
        ("least_conn + sticky learn", Kind::LeastConnSticky),
    ]
}

fn candidates() -> Vec<(String, Kind)> {
    // As the module runs it: `local_sessions` where sessions are node-local (the policy
    // clears it in the Redis-shared cells, as the glue does with a session store).
    let d = Params { local_sessions: true, ..Params::DEFAULT };
    vec![
        ("kylin today (bound 1.25)".into(), Kind::Kylin(1250)),
        ("kylin, bound 2".into(), Kind::Kylin(2000)),
        ("kylin, bound 3".into(), Kind::Kylin(3000)),
        ("bound 1.25, only off a node with >= 4 in flight".into(), Kind::KylinSat(1250, 4)),
        ("bound 1.25, only off a node with >= 6 in flight".into(), Kind::KylinSat(1250, 6)),
        ("bound 1.25, only off a node whose EWMA response time is >= 1.5x the mean".into(), Kind::KylinRt(1250, 1500)),
        ("placement (recommended defaults)".into(), Kind::Place(d)),
        ("placement hot=1".into(), Kind::Place(Params { hot_milli: 1_000, ..d })),
        ("placement hot=3".into(), Kind::Place(Params { hot_milli: 3_000, ..d })),
        ("placement tau=2s".into(), Kind::Place(Params { tau_ms: 2_000, ..d })),
        ("placement cooldown=2s".into(), Kind::Place(Params { cooldown_ms: 2_000, ..d })),
        ("placement without login priors (session=0)".into(), Kind::Place(Params { session_milli: 0, local_session_milli: 0, ..d })),
        ("placement session=1 margin=1 (both kinds of sessions)".into(), Kind::Place(Params { session_milli: 1_000, local_session_milli: 1_000, margin_milli: 1_000, ..d })),
        ("placement session=0.25 (both kinds of sessions)".into(), Kind::Place(Params { session_milli: 250, local_session_milli: 250, ..d })),
        ("placement session=1 (shared sessions too)".into(), Kind::Place(Params { session_milli: 1_000, ..d })),
        ("placement local_session=0.5 (as shared sessions)".into(), Kind::Place(Params { local_session_milli: 500, ..d })),
        ("placement cold_logins=8".into(), Kind::Place(Params { cold_logins: 8, ..d })),
        ("placement cold_logins=32".into(), Kind::Place(Params { cold_logins: 32, ..d })),
        ("placement session_max=0.5".into(), Kind::Place(Params { session_max_milli: 500, ..d })),
        ("placement session_max=2".into(), Kind::Place(Params { session_max_milli: 2_000, ..d })),
        ("placement active=250ms".into(), Kind::Place(Params { active_ms: 250, ..d })),
        ("placement active=500ms".into(), Kind::Place(Params { active_ms: 500, ..d })),
        ("placement active=2s".into(), Kind::Place(Params { active_ms: 2_000, ..d })),
        ("placement without the node-local move rule (local_sessions off)".into(), Kind::Place(Params { local_sessions: false, ..d })),
        ("placement residence=10s".into(), Kind::Place(Params { residence_ms: 10_000, ..d })),
        ("placement share=0".into(), Kind::Place(Params { share_milli: 0, ..d })),
        ("placement margin=0.25".into(), Kind::Place(Params { margin_milli: 250, ..d })),
        ("placement + request valve at 8 in flight".into(), Kind::PlaceValve(d, 1250, 8)),
    ]
}

fn cluster_main(args: &[String]) {
    let mut layouts = 16u64;
    let mut only_layout: Option<u64> = None;
    let mut seeds = 3u64;
    let mut duration = 30.0f64;
    let mut warmup = 5.0f64;
    let mut detail = false;
    let mut only: Option<String> = None;
    let mut base = Config::issue();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--layouts" => {
                layouts = args[i + 1].parse().expect("--layouts N");
                i += 1;
            }
            "--layout" => {
                only_layout = Some(args[i + 1].parse().expect("--layout L"));
                i += 1;
            }
            "--seeds" => {
                seeds = args[i + 1].parse().expect("--seeds S");
                i += 1;
            }
            "--duration" => {
                duration = args[i + 1].parse().expect("--duration SECONDS");
                i += 1;
            }
            "--warmup" => {
                warmup = args[i + 1].parse().expect("--warmup SECONDS");
                i += 1;
            }
            "--only" => {
                only = Some(args[i + 1].clone());
                i += 1;
            }
            "--think" => {
                base.bi_think_ms = args[i + 1].parse().expect("--think MS");
                i += 1;
            }
            "--adhoc" => {
                base.bi_adhoc = args[i + 1].parse().expect("--adhoc SHARE");
                i += 1;
            }
            "--per-session" => {
                let (lo, hi) = args[i + 1].split_once(',').expect("--per-session LO,HI");
                base.bi_queries = (lo.parse().expect("LO"), hi.parse().expect("HI"));
                i += 1;
            }
            "--bi" => {
                base.bi_servers = args[i + 1].parse().expect("--bi N");
                i += 1;
            }
            "--sessions" => {
                base.bi_sessions = args[i + 1].parse().expect("--sessions N");
                i += 1;
            }
            "--detail" => detail = true,
            a => panic!("unknown argument {a}"),
        }
        i += 1;
    }
    let started = std::time::Instant::now();
    let base = Config { duration_ms: duration * 1000.0, warmup_ms: warmup * 1000.0, ..base };
    let clients = base.bi_servers + base.light;
    let cands: Vec<(String, Kind)> = candidates().into_iter().filter(|(n, _)| only.as_ref().is_none_or(|o| n.contains(o.as_str()))).collect();
    println!(
        "Workload: {} BI servers x {} sessions (think {} ms, {:.0}% ad hoc, {}-{} queries per session), {} light clients.\n",
        base.bi_servers, base.bi_sessions, base.bi_think_ms, base.bi_adhoc * 100.0, base.bi_queries.0, base.bi_queries.1, base.light
    );
    println!(
        "{layouts} layouts x node-local/Redis-shared sessions x bounded (256)/unbounded caches; {seeds} workload seeds per cell, \
         {duration:.0} s per run (first {warmup:.0} s not counted).\n"
    );
    // results[candidate] = per cell (label, qps ratio, p99 ratio, 401s, hit)
    let mut results: Vec<Vec<(String, f64, f64, u64, f64, f64)>> = vec![Vec::new(); cands.len()];
    let mut validation = String::new();
    for (cache_label, cache) in [("bounded", Some(256usize)), ("unbounded", None)] {
        for (sess_label, shared) in [("node-local", false), ("Redis-shared", true)] {
            let cfg = Config { cache, shared, ..base.clone() };
            if detail {
                validation += &format!("\n### {sess_label} sessions, {cache_label} cache\n\n| layout | balancer | queries/s | p50 ms | p99 ms | cache hits | 401s | busiest/mean | BI servers' nodes |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n");
            }
            for l in (1..=layouts).filter(|&l| only_layout.is_none_or(|o| o == l)) {
                let layout = Layout::random(l, clients);
                let stock: Vec<(&str, Outcome)> = anchors().into_iter().map(|(n, k)| (n, cell(&cfg, &layout, k, seeds))).collect();
                let (best_name, best) = stock.iter().max_by(|a, b| a.1.qps.total_cmp(&b.1.qps)).unwrap();
                let mut rows: Vec<(String, Outcome)> = Vec::new();
                for (ci, (name, kind)) in cands.iter().enumerate() {
                    let o = cell(&cfg, &layout, *kind, seeds);
                    results[ci].push((
                        format!("{l} | {sess_label} | {cache_label} | {best_name} {:.0} q/s, p99 {:.0}", best.qps, best.p99),
                        o.qps / best.qps,
                        o.p99 / best.p99,
                        o.unauthorized,
                        o.hit,
                        o.moves as f64 / seeds as f64,
                    ));
                    rows.push((name.clone(), o));
                }
                if detail {
                    let bi = |o: &Outcome| {
                        o.bi_nodes
                            .iter()
                            .map(|s| {
                                let (n, share) = s.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
                                format!("n{}:{:.0}%", n + 1, share * 100.0)
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    };
                    for (n, o) in stock.iter().map(|(n, o)| (n.to_string(), o.clone())).chain(rows.into_iter()) {
                        validation += &format!(
                            "| {l} | {n} | {:.1} | {:.1} | {:.1} | {:.0}% | {} | {:.2} | {} |\n",
                            o.qps,
                            o.p50,
                            o.p99,
                            o.hit * 100.0,
                            o.unauthorized,
                            o.busiest,
                            bi(&o)
                        );
                    }
                }
            }
        }
    }
    println!("## Summary: candidate / best anchor of each cell\n");
    println!("Goal (issue #13): queries/s >= 0.98x and p99 <= 1.05x the best anchor in every cell, zero 401.\n");
    println!("| candidate | worst qps ratio | geomean qps ratio | worst p99 ratio | geomean p99 ratio | cells meeting the goal | 401s | client moves per run |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (ci, (name, _)) in cands.iter().enumerate() {
        let r = &results[ci];
        let gm = |f: fn(&(String, f64, f64, u64, f64, f64)) -> f64| (r.iter().map(|x| f(x).ln()).sum::<f64>() / r.len() as f64).exp();
        let worst_q = r.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        let worst_p = r.iter().map(|x| x.2).fold(0.0, f64::max);
        let good = r.iter().filter(|x| x.1 >= 0.98 && x.2 <= 1.05 && x.3 == 0).count();
        let moves = r.iter().map(|x| x.5).sum::<f64>() / r.len() as f64;
        println!(
            "| {name} | {worst_q:.3} | {:.3} | {worst_p:.3} | {:.3} | {good} of {} | {} | {moves:.1} |",
            gm(|x| x.1),
            gm(|x| x.2),
            r.len(),
            r.iter().map(|x| x.3).sum::<u64>()
        );
    }
    for (ci, (name, _)) in cands.iter().enumerate() {
        println!("\n### {name}\n");
        println!("| layout | sessions | cache | best anchor | qps ratio | p99 ratio | cache hits | 401s |");
        println!("|---|---|---|---|---:|---:|---:|---:|");
        for (label, q, p, u, h, _) in &results[ci] {
            println!("| {label} | {q:.3} | {p:.3} | {:.0}% | {u} |", h * 100.0);
        }
    }
    if detail {
        println!("\n## Every balancer in every cell\n{validation}");
    }
    println!("\nSimulated in {:.0} s.", started.elapsed().as_secs_f64());
}
