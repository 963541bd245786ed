//! Discrete-event model of the issue #13 benchmark (see the header of `factor_sim.rs`).
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};

use crate::balancer::{self, Bound, Group, Request, Route, Servers};
use crate::placement::{Params, Placement, Placed};
use crate::ring::{key_hash, Ring};
use crate::XorShift;

pub const NODES: usize = 4;

/// The workload and cluster; defaults are the issue's benchmark.
#[derive(Clone, Debug)]
pub struct Config {
    pub slots: usize,
    pub hit_ms: f64,
    pub miss_ms: f64,
    /// Entries per node cache; `None` = unbounded.
    pub cache: Option<usize>,
    pub shared: bool,
    pub bi_servers: usize,
    pub bi_sessions: usize,
    pub bi_think_ms: f64,
    pub bi_queries: (u32, u32),
    pub bi_hot: usize,
    pub bi_adhoc: f64,
    pub light: usize,
    pub light_think_ms: f64,
    pub light_set: usize,
    /// Network + nginx + node overhead per request (ms), outside the query slots.
    pub overhead_ms: f64,
    pub duration_ms: f64,
    pub warmup_ms: f64,
}

impl Config {
    pub fn issue() -> Config {
        Config {
            slots: 4,
            hit_ms: 5.0,
            miss_ms: 60.0,
            cache: Some(256),
            shared: false,
            bi_servers: 3,
            bi_sessions: 6,
            bi_think_ms: 80.0,
            bi_queries: (15, 40),
            bi_hot: 100,
            bi_adhoc: 0.10,
            light: 9,
            light_think_ms: 1500.0,
            light_set: 10,
            overhead_ms: 1.0,
            duration_ms: 30_000.0,
            warmup_ms: 5_000.0,
        }
    }
}

/// One layout: every client's IPv4 address (all in 127/8, each in its own /24).
#[derive(Clone, Debug)]
pub struct Layout {
    pub addrs: Vec<[u8; 4]>,
}

impl Layout {
    pub fn random(seed: u64, clients: usize) -> Layout {
        let mut r = XorShift::new(seed.wrapping_mul(7919) ^ 0x1a2b_3c4d);
        let mut seen = HashSet::new();
        let mut addrs = Vec::new();
        while addrs.len() < clients {
            let x = r.next();
            let a = [127u8, (x & 0xff) as u8, ((x >> 8) & 0xff) as u8, 1 + ((x >> 16) % 254) as u8];
            if seen.insert((a[1], a[2])) {
                addrs.push(a);
            }
        }
        Layout { addrs }
    }
}

// ------------------------------------------------------------------------------------------
// Stock nginx hashing, reimplemented bit for bit.

fn crc32_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    for (i, e) in t.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
        *e = c;
    }
    t
}

fn crc32_update(t: &[u32; 256], mut c: u32, data: &[u8]) -> u32 {
    for &b in data {
        c = t[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    c
}

/// nginx's `hash ... consistent` ring: 160 points per weight, crc32(HOST \0 PORT PREV_HASH).
pub struct Ketama {
    points: Vec<(u32, usize)>,
    table: [u32; 256],
}

impl Ketama {
    pub fn new(servers: &[&str]) -> Ketama {
        let table = crc32_table();
        let mut points = Vec::new();
        for (i, s) in servers.iter().enumerate() {
            let (host, port) = s.rsplit_once(':').unwrap();
            let mut base = 0xFFFF_FFFFu32;
            base = crc32_update(&table, base, host.as_bytes());
            base = crc32_update(&table, base, b"\0");
            base = crc32_update(&table, base, port.as_bytes());
            let mut prev = 0u32;
            for _ in 0..160 {
                let h = crc32_update(&table, base, &prev.to_le_bytes()) ^ 0xFFFF_FFFF;
                points.push((h, i));
                prev = h;
            }
        }
        points.sort_by_key(|p| p.0);
        points.dedup_by_key(|p| p.0);
        Ketama { points, table }
    }

    pub fn owner(&self, key: &[u8]) -> usize {
        let h = crc32_update(&self.table, 0xFFFF_FFFF, key) ^ 0xFFFF_FFFF;
        let i = self.points.partition_point(|p| p.0 < h);
        self.points[i % self.points.len()].1
    }
}

/// nginx's `ip_hash` for IPv4 with equal weights: the first three octets only.
pub fn ip_hash(addr: [u8; 4], n: usize) -> usize {
    let mut hash: u32 = 89;
    for &o in &addr[..3] {
        hash = (hash * 113 + u32::from(o)) % 6271;
    }
    (hash as usize) % n
}

// ------------------------------------------------------------------------------------------
// Policies.

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    IpHash,
    Hash,
    RoundRobin,
    LeastConn,
    LeastConnSticky,
    /// Today's module: bounded load per request with this factor (thousandths).
    Kylin(u32),
    /// Request-level bound, but a request leaves only a node at or over `sat` in flight, for
    /// one under `sat` (and under the bound).
    KylinSat(u32, u64),
    /// Client placement (`src/placement.rs`) with these parameters.
    Place(Params),
    /// Request-level bound (factor, thousandths), but a request leaves only a node whose EWMA
    /// response time (nginx `least_time`'s average: 0.95 old + 0.05 new) is at least `x`
    /// (thousandths) times the mean of the nodes' averages, for a node below the mean.
    KylinRt(u32, u32),
    /// Client placement plus today's request bound as a safety valve at factor (thousandths)
    /// for requests that may move, gated at `sat` in flight.
    PlaceValve(Params, u32, u64),
}

pub struct Req<'a> {
    pub client: usize,
    pub addr: [u8; 4],
    pub key: u64,
    pub session: Option<u64>,
    pub inflight: &'a [u64; NODES],
    pub now: f64,
}

pub struct Policy {
    kind: Kind,
    ring: Ring,
    ketama: Ketama,
    rr: usize,
    routes: HashMap<u64, usize>,
    placement: Option<Placement>,
    shared: bool,
    /// Per node, nginx-style EWMA of response times (ms).
    rt: [f64; NODES],
    pub moves: u64,
}

struct View<'a>(&'a [u64; NODES]);

impl Servers for View<'_> {
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

impl Policy {
    pub fn new(kind: Kind, names: &[&str], shared: bool) -> Policy {
        let ring = Ring::new(names.iter().map(|s| (s.as_bytes(), 1))).unwrap();
        let placement = match kind {
            Kind::Place(p) | Kind::PlaceValve(p, _, _) => Some(Placement::new(NODES, 256, Params { local_sessions: p.local_sessions && !shared, ..p })),
            _ => None,
        };
        Policy { kind, ring, ketama: Ketama::new(names), rr: 0, routes: HashMap::new(), placement, shared, rt: [0.0; NODES], moves: 0 }
    }

    fn least_conn(&mut self, inflight: &[u64; NODES]) -> usize {
        // nginx: the fewest connections; ties by (smooth) round robin among the tied.
        let min = *inflight.iter().min().unwrap();
        for j in 0..NODES {
            let i = (self.rr + j) % NODES;
            if inflight[i] == min {
                self.rr = i + 1;
                return i;
            }
        }
        0
    }

    fn kylin_choose(&self, r: &Req, factor: u32, learned: Option<usize>, movable: bool) -> (usize, Route) {
        let bound = Bound { factor_milli: factor, total: r.inflight.iter().sum(), live_weight: NODES as u64 };
        let mut view = View(r.inflight);
        let c = balancer::choose(&Request { learned, ..Request::new(r.key, movable) }, Group { ring: &self.ring, servers: &mut view, bound }, None::<Group<'_, View>>)
            .unwrap();
        (c.server, c.route)
    }

    /// Where the request goes.
    pub fn route(&mut self, r: &Req) -> usize {
        let learned = r.session.and_then(|s| self.routes.get(&s).copied());
        let now = r.now as u64;
        match self.kind {
            Kind::IpHash => ip_hash(r.addr, NODES),
            Kind::Hash => self.ketama.owner(format!("{}.{}.{}.{}", r.addr[0], r.addr[1], r.addr[2], r.addr[3]).as_bytes()),
            Kind::RoundRobin => {
                let i = self.rr % NODES;
                self.rr += 1;
                i
            }
            Kind::LeastConn => self.least_conn(r.inflight),
            Kind::LeastConnSticky => match learned {
                Some(l) => l,
                None => self.least_conn(r.inflight),
            },
            Kind::Kylin(f) => {
                let movable = r.session.is_none() || self.shared;
                let (s, route) = self.kylin_choose(r, f, learned, movable);
                if route == Route::Spilled {
                    self.moves += 1;
                    if let Some(id) = r.session {
                        self.routes.insert(id, s);
                    }
                }
                s
            }
            Kind::KylinSat(f, sat) => {
                let movable = r.session.is_none() || self.shared;
                let home = learned.unwrap_or_else(|| self.ring.owner(r.key).unwrap());
                if movable && r.inflight[home] >= sat {
                    let bound = Bound { factor_milli: f, total: r.inflight.iter().sum(), live_weight: NODES as u64 };
                    if let Some(t) = self.ring.order(r.key).find(|&t| t != home && r.inflight[t] < sat && bound.admits(r.inflight[t], 1)) {
                        self.moves += 1;
                        if let Some(id) = r.session {
                            self.routes.insert(id, t);
                        }
                        return t;
                    }
                }
                home
            }
            Kind::KylinRt(f, x) => {
                let movable = r.session.is_none() || self.shared;
                let home = learned.unwrap_or_else(|| self.ring.owner(r.key).unwrap());
                let mean = self.rt.iter().sum::<f64>() / NODES as f64;
                if movable && mean > 0.0 && self.rt[home] * 1000.0 >= f64::from(x) * mean {
                    let bound = Bound { factor_milli: f, total: r.inflight.iter().sum(), live_weight: NODES as u64 };
                    if !bound.admits(r.inflight[home], 1) {
                        if let Some(t) = self.ring.order(r.key).find(|&t| t != home && self.rt[t] < mean && bound.admits(r.inflight[t], 1)) {
                            self.moves += 1;
                            if let Some(id) = r.session {
                                self.routes.insert(id, t);
                            }
                            return t;
                        }
                    }
                }
                home
            }
            Kind::Place(_) | Kind::PlaceValve(..) => {
                // Node-local sessions stay where they were created.
                if let (Some(l), false) = (learned, self.shared) {
                    return l;
                }
                let pl = self.placement.as_mut().unwrap();
                let (s, how) = pl.place(r.key, self.ring.order(r.key), |_| true, |_| 1, now).unwrap();
                if how == Placed::MovedNow || how == Placed::Returned {
                    self.moves += 1;
                    if std::env::var_os("SIM_TRACE").is_some() {
                        let loads: Vec<u64> = (0..NODES).map(|i| pl.server_load(i, now)).collect();
                        eprintln!("t={now} client={} {how:?} -> n{} key load {} server loads {loads:?}", r.client, s + 1, pl.key_load(r.key, now));
                    }
                }
                if let Kind::PlaceValve(_, f, sat) = self.kind {
                    if r.inflight[s] >= sat {
                        let bound = Bound { factor_milli: f, total: r.inflight.iter().sum(), live_weight: NODES as u64 };
                        if let Some(t) = self.ring.order(r.key).find(|&t| t != s && r.inflight[t] < sat && bound.admits(r.inflight[t], 1)) {
                            return t;
                        }
                    }
                }
                s
            }
        }
    }

    /// A login of `key` answered by `node` created session `id`.
    pub fn learn(&mut self, id: u64, node: usize, key: u64, now: f64) {
        if let Some(p) = self.placement.as_mut() {
            p.login(key, node, now as u64);
            if std::env::var_os("SIM_TRACE_LOGINS").is_some() {
                let loads: Vec<u64> = (0..NODES).map(|i| p.server_load(i, now as u64)).collect();
                eprintln!("t={now:.0} login key {key:x} -> n{} key load {} loads {loads:?}", node + 1, p.key_load(key, now as u64));
            }
        }
        match self.kind {
            Kind::LeastConnSticky | Kind::Kylin(_) | Kind::KylinSat(..) | Kind::KylinRt(..) | Kind::Place(_) | Kind::PlaceValve(..) => {
                self.routes.insert(id, node);
            }
            _ => {}
        }
    }

    /// Server `node`'s in-flight count changed.
    pub fn inflight(&mut self, node: usize, level: u64, now: f64) {
        if let Some(p) = self.placement.as_mut() {
            p.server_inflight(node, level, now as u64);
        }
    }

    /// A request of `key` (with session `session`, 0: none) finished on `node` after `rt` ms.
    pub fn done(&mut self, node: usize, key: u64, session: u64, rt: f64, now: f64) {
        let avg = &mut self.rt[node];
        *avg = if *avg == 0.0 { rt } else { 0.95 * *avg + 0.05 * rt };
        if let Some(p) = self.placement.as_mut() {
            p.key_done_on(key, node, rt.round() as u64, session, now as u64);
        }
    }
}

// ------------------------------------------------------------------------------------------
// The cluster.

struct Lru {
    cap: Option<usize>,
    tick: u64,
    map: HashMap<u64, u64>,
    order: std::collections::BTreeMap<u64, u64>,
}

impl Lru {
    fn new(cap: Option<usize>) -> Lru {
        Lru { cap, tick: 0, map: HashMap::new(), order: Default::default() }
    }
    /// Looks `q` up and fills it: whether it was there.
    fn lookup_and_fill(&mut self, q: u64) -> bool {
        self.tick += 1;
        let hit = if let Some(t) = self.map.get_mut(&q) {
            if self.cap.is_some() {
                self.order.remove(t);
                self.order.insert(self.tick, q);
            }
            *t = self.tick;
            true
        } else {
            self.map.insert(q, self.tick);
            if self.cap.is_some() {
                self.order.insert(self.tick, q);
            }
            false
        };
        if let Some(c) = self.cap {
            while self.map.len() > c {
                let (&t, &old) = self.order.iter().next().unwrap();
                self.order.remove(&t);
                self.map.remove(&old);
            }
        }
        hit
    }
}

struct Job {
    user: usize,
    issued: f64,
    service: f64,
}

struct Node {
    running: usize,
    queue: VecDeque<Job>,
    cache: Lru,
    sessions: HashSet<u64>,
}

#[derive(Clone, Copy, PartialEq)]
enum Ev {
    /// A user sends its next request (login or query).
    Issue(usize),
    /// A query finishes on a node.
    Done(usize, usize, f64),
}

struct Timed(f64, u64, Ev);
impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0 && self.1 == o.1
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.total_cmp(&self.0).then(o.1.cmp(&self.1))
    }
}

struct User {
    client: usize,
    bi: Option<usize>,
    rng: XorShift,
    session: Option<u64>,
    left: u32,
}

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub qps: f64,
    pub p99: f64,
    pub p50: f64,
    pub hit: f64,
    pub unauthorized: u64,
    pub logins: u64,
    pub busiest: f64,
    pub moves: u64,
    /// Per BI server: share of its queries per node.
    pub bi_nodes: Vec<[f64; NODES]>,
}

pub fn names() -> Vec<String> {
    (1..=NODES).map(|i| format!("127.0.0.1:{}", 7070 + i)).collect()
}

pub fn run(cfg: &Config, layout: &Layout, kind: Kind, seed: u64) -> Outcome {
    let names = names();
    let name_refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let mut pol = Policy::new(kind, &name_refs, cfg.shared);
    let clients = cfg.bi_servers + cfg.light;
    let keys: Vec<u64> = layout.addrs.iter().map(|a| key_hash(a)).collect();
    let mut nodes: Vec<Node> =
        (0..NODES).map(|_| Node { running: 0, queue: VecDeque::new(), cache: Lru::new(cfg.cache), sessions: HashSet::new() }).collect();
    let mut inflight = [0u64; NODES];
    let mut users = Vec::new();
    let mut master = XorShift::new(seed ^ 0x5eed);
    for b in 0..cfg.bi_servers {
        for _ in 0..cfg.bi_sessions {
            users.push(User { client: b, bi: Some(b), rng: XorShift::new(master.next()), session: None, left: 0 });
        }
    }
    for l in 0..cfg.light {
        users.push(User { client: cfg.bi_servers + l, bi: None, rng: XorShift::new(master.next()), session: None, left: 0 });
    }
    assert!(clients <= layout.addrs.len());
    let mut heap = BinaryHeap::new();
    let mut seq = 0u64;
    for u in 0..users.len() {
        let t = master.unit() * 500.0;
        heap.push(Timed(t, seq, Ev::Issue(u)));
        seq += 1;
    }
    let mut next_session = 1u64;
    let mut adhoc = 0u64;
    let (mut ok, mut hits, mut lookups, mut unauthorized, mut logins) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut lat = Vec::new();
    let mut area = [0.0f64; NODES];
    let mut last_t = 0.0f64;
    let mut bi_nodes = vec![[0u64; NODES]; cfg.bi_servers];

    // Time-averaged in-flight over the measured window.
    macro_rules! advance {
        ($t:expr) => {{
            let t: f64 = $t;
            let from = last_t.max(cfg.warmup_ms);
            if t > from {
                for i in 0..NODES {
                    area[i] += (t - from) * inflight[i] as f64;
                }
            }
            last_t = t;
        }};
    }

    while let Some(Timed(t, _, ev)) = heap.pop() {
        if t > cfg.duration_ms {
            break;
        }
        advance!(t);
        match ev {
            Ev::Issue(u) => {
                let measured = t >= cfg.warmup_ms;
                let client = users[u].client;
                let req_base = |session, login, inflight: &[u64; NODES]| -> (usize, [u8; 4], u64, Option<u64>, bool, [u64; NODES]) {
                    (client, layout.addrs[client], keys[client], session, login, *inflight)
                };
                // Log in first when the user has no session (instantly answered by the node).
                if users[u].session.is_none() {
                    let (c, addr, key, _, _, infl) = req_base(None, true, &inflight);
                    let node = pol.route(&Req { client: c, addr, key, session: None, inflight: &infl, now: t });
                    let id = next_session;
                    next_session += 1;
                    nodes[node].sessions.insert(id);
                    pol.learn(id, node, key, t);
                    users[u].session = Some(id);
                    users[u].left = match users[u].bi {
                        Some(_) => {
                            let (lo, hi) = cfg.bi_queries;
                            lo + (users[u].rng.next() % u64::from(hi - lo + 1)) as u32
                        }
                        None => u32::MAX,
                    };
                    if measured {
                        logins += 1;
                    }
                }
                // The query.
                let q = match users[u].bi {
                    Some(b) => {
                        let r = &mut users[u].rng;
                        if r.unit() < cfg.bi_adhoc {
                            adhoc += 1;
                            (1u64 << 62) | adhoc
                        } else {
                            let idx = if r.unit() < 0.5 {
                                // Pareto(1.2) index, as loadgen.py.
                                let p = r.unit().powf(-1.0 / 1.2);
                                ((p as usize).max(1) - 1).min(cfg.bi_hot - 1)
                            } else {
                                (r.next() % cfg.bi_hot as u64) as usize
                            };
                            ((b as u64) << 32) | idx as u64
                        }
                    }
                    None => (1u64 << 40) | ((client as u64) << 16) | (users[u].rng.next() % cfg.light_set as u64),
                };
                let session = users[u].session;
                let (c, addr, key, _, _, infl) = req_base(session, false, &inflight);
                let node = pol.route(&Req { client: c, addr, key, session, inflight: &infl, now: t });
                let known = nodes[node].sessions.contains(&session.unwrap()) || cfg.shared;
                if !known {
                    if measured {
                        unauthorized += 1;
                    }
                    users[u].session = None;
                    heap.push(Timed(t + cfg.overhead_ms, seq, Ev::Issue(u)));
                    seq += 1;
                    continue;
                }
                if let Some(b) = users[u].bi {
                    if measured {
                        bi_nodes[b][node] += 1;
                    }
                }
                let hit = nodes[node].cache.lookup_and_fill(q);
                if measured {
                    lookups += 1;
                    hits += u64::from(hit);
                }
                let service = if hit { cfg.hit_ms } else { cfg.miss_ms };
                inflight[node] += 1;
                pol.inflight(node, inflight[node], t);
                let job = Job { user: u, issued: t, service };
                let n = &mut nodes[node];
                if n.running < cfg.slots {
                    n.running += 1;
                    heap.push(Timed(t + service, seq, Ev::Done(node, u, t)));
                    seq += 1;
                } else {
                    n.queue.push_back(job);
                }
            }
            Ev::Done(node, u, issued) => {
                inflight[node] -= 1;
                pol.inflight(node, inflight[node], t);
                let n = &mut nodes[node];
                if let Some(j) = n.queue.pop_front() {
                    heap.push(Timed(t + j.service, seq, Ev::Done(node, j.user, j.issued)));
                    seq += 1;
                } else {
                    n.running -= 1;
                }
                let rt = t - issued + cfg.overhead_ms;
                pol.done(node, keys[users[u].client], users[u].session.unwrap_or(0), rt, t);
                if issued >= cfg.warmup_ms {
                    ok += 1;
                    lat.push(rt);
                }
                let user = &mut users[u];
                user.left = user.left.saturating_sub(1);
                if user.left == 0 {
                    user.session = None;
                }
                let think = if user.bi.is_some() { cfg.bi_think_ms } else { cfg.light_think_ms };
                let wait = (-think * user.rng.unit().ln()).min(think * 10.0);
                heap.push(Timed(t + cfg.overhead_ms + wait, seq, Ev::Issue(u)));
                seq += 1;
            }
        }
    }
    // The rest of the window, at the last levels.
    let from = last_t.max(cfg.warmup_ms);
    for i in 0..NODES {
        area[i] += (cfg.duration_ms - from).max(0.0) * inflight[i] as f64;
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| if lat.is_empty() { f64::NAN } else { lat[((lat.len() - 1) as f64 * p).round() as usize] };
    let mean = area.iter().sum::<f64>() / NODES as f64;
    let max = area.iter().cloned().fold(0.0, f64::max);
    let span = (cfg.duration_ms - cfg.warmup_ms) / 1000.0;
    Outcome {
        qps: ok as f64 / span,
        p99: pct(0.99),
        p50: pct(0.5),
        hit: hits as f64 / lookups.max(1) as f64,
        unauthorized,
        logins,
        busiest: if mean > 0.0 { max / mean } else { 1.0 },
        moves: pol.moves,
        bi_nodes: bi_nodes
            .iter()
            .map(|c| {
                let s = c.iter().sum::<u64>().max(1) as f64;
                [c[0] as f64 / s, c[1] as f64 / s, c[2] as f64 / s, c[3] as f64 / s]
            })
            .collect(),
    }
}
