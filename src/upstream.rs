//! Peer callbacks: the nginx side of the balancer.
//!
//! nginx's round-robin module keeps the peer list and all per-peer bookkeeping (`conns`,
//! `fails`, `checked`, the request's `tried` bitmap, the shared `zone` copy); we reuse it
//! unchanged and replace only the choice:
//! - `init_upstream` builds the consistent-hash rings and declares the shared zones;
//! - `init_peer` computes the request's key and reads its session cookie and learned route;
//! - `get` gathers loads and asks [`crate::balancer::choose_primary`] under the primary list's
//!   lock, then, only if no primary server is usable, [`crate::balancer::choose_backup`] under
//!   the backup list's (see [`Locked`]); it does the same bookkeeping as nginx's own
//!   `hash ... consistent` balancer and counts the request in flight;
//! - `free` uncounts it, learns the session a response created, and calls round robin's free.

use core::cell::Cell;
use core::ffi::c_void;
use core::marker::PhantomData;
use core::ptr;
use std::net::{IpAddr, Ipv6Addr};

#[cfg(not(nginx1_23_0))]
use ngx::ffi::ngx_list_t;
use ngx::ffi::{
    ngx_conf_t, ngx_http_complex_value, ngx_http_request_t, ngx_http_upstream_free_round_robin_peer,
    ngx_http_upstream_init_round_robin, ngx_http_upstream_init_round_robin_peer,
    ngx_http_upstream_rr_peer_data_t, ngx_http_upstream_rr_peer_t, ngx_http_upstream_rr_peers_t,
    ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_palloc, ngx_peer_connection_t,
    ngx_rwlock_unlock, ngx_rwlock_wlock, ngx_str_t, ngx_time, ngx_uint_t, sockaddr_in, sockaddr_in6,
    NGX_BUSY, NGX_ERROR, NGX_LOG_EMERG, NGX_LOG_ERR, NGX_LOG_WARN, NGX_OK, NGX_PEER_FAILED,
};
// Used by ngx_log_debug_mask!, which expands to nothing unless nginx is built --with-debug.
#[allow(unused_imports)]
use ngx::log::DebugMask;
use ngx::{ngx_conf_log_error, ngx_log_debug_mask, ngx_log_error};

use crate::balancer::{self, Balance, Bound, Choice, Group as Pick, Request, Route, Servers, SessionState};
use crate::placement::Placed;
use crate::conf::{srv_conf, SrvConf};
use ngx::http::HttpModule;
use crate::key::client_key;
use crate::load::{self, Counter, Slot, Use};
use crate::ring::{key_hash, Ring};
use crate::session::{self, RequestSession, SetSession};
use crate::shm;
use crate::health::{self, Health};

/// nginx's NGX_PEER_NEXT (403/404 passed to the next server): not a failure, not a response
/// to learn from.
const NGX_PEER_NEXT: ngx_uint_t = 2;

/// Server addresses of one group, in list order, in one buffer (copied from nginx's peers, so
/// that nothing outside `get` and `free` reads a peer: with `resolve`, nginx frees the peers a
/// DNS change removes).
#[derive(Debug, Default)]
struct Names {
    bytes: Vec<u8>,
    /// Name `i` is `bytes[ends[i - 1]..ends[i]]`.
    ends: Vec<usize>,
}

impl Names {
    fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { *self.ends.get(i - 1)? };
        self.bytes.get(start..end)
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.ends.len()).filter_map(|i| self.get(i))
    }
}

/// One group of servers (primary or backup) as the balancer sees it: per-process copies only.
/// nginx's peers themselves are reached through a [`Locked`] guard of their list.
#[derive(Debug)]
pub struct Group {
    ring: Ring,
    /// Ring index -> the server's address as nginx prints it.
    names: Names,
    /// Ring index -> the server's `weight` (at least 1).
    weights: Vec<u32>,
    /// Ring index -> hash of the server's address: its identity in the route table.
    ids: Vec<u64>,
    /// Ring index -> the server's shared counters (resolved in each worker).
    slots: Vec<Option<&'static Slot>>,
    /// Ring index -> the server's health slot (health checks; resolved in each worker).
    health: Vec<Option<&'static Slot>>,
    /// Hash of the servers' names and weights in ring index order: what the shared client
    /// placement's tables must describe (see `shm::with_placement`).
    layout: u64,
}

impl Group {
    #[inline]
    fn weight(&self, i: usize) -> u64 {
        self.weights.get(i).map_or(1, |&w| u64::from(w))
    }
}

/// The kind of peer list a [`Locked`] guard or a [`PeerRefs`] belongs to: the primary
/// servers. In a `zone`, each list (primary, backup) has its own lock.
#[derive(Debug)]
pub enum Primary {}

/// ... the `backup` servers (the primary list's `next`).
#[derive(Debug)]
pub enum Backup {}

/// nginx's peers of one list, as they were when the per-process tables were built, and the
/// list's generation then. Only a [`Locked`] guard of the same list hands them out, and only
/// while the generation is unchanged: `resolve` (1.27.3+) frees the peers a DNS change
/// removes, and bumps the generation (shared by the primary and backup lists).
#[derive(Debug)]
pub struct PeerRefs<K> {
    list: *mut ngx_http_upstream_rr_peers_t,
    config: ngx_uint_t,
    peers: Vec<*mut ngx_http_upstream_rr_peer_t>,
    kind: PhantomData<K>,
}

/// What the tables of one group are built from, copied under the list's lock.
struct Snapshot<K> {
    refs: PeerRefs<K>,
    names: Names,
    weights: Vec<u32>,
}

/// A peer list with its lock held: the write lock with a `zone`, as round robin's `get` takes
/// it (without a zone each worker has its own peers and there is nothing to lock). Peers are
/// reached only through the guard, by borrows that cannot outlive it ([`Locked::peers`]).
/// The primary guard turns into the backup one only by releasing the primary list first
/// ([`Locked::into_backup`]), as round robin does: the two locks are never held together, and
/// backup peers are never read or changed under the primary list's lock.
pub struct Locked<K> {
    list: *mut ngx_http_upstream_rr_peers_t,
    kind: PhantomData<K>,
}

impl Locked<Primary> {
    /// Locks an upstream's primary peer list.
    ///
    /// # Safety
    /// `list` is a valid primary peer list (the upstream's `peer.data`, its zone copy in a
    /// worker), valid for the cycle.
    unsafe fn primary(list: *mut ngx_http_upstream_rr_peers_t) -> Locked<Primary> {
        // SAFETY: as this function requires.
        unsafe { Locked::wlock(list) }
    }

    /// Releases the primary list, then locks its backup list (`None`, with nothing locked,
    /// when there are no backup servers).
    fn into_backup(self) -> Option<Locked<Backup>> {
        // SAFETY: the list is valid (see `primary`); `next` is set before the workers start and
        // never changes.
        let next = unsafe { (*self.list).next };
        drop(self);
        // SAFETY: a primary list's `next` is its valid backup list, valid as long as it.
        (!next.is_null()).then(|| unsafe { Locked::backup(next) })
    }
}

impl Locked<Backup> {
    /// Locks a backup peer list.
    ///
    /// # Safety
    /// `list` is a valid backup list (a primary list's `next`), valid for the cycle.
    unsafe fn backup(list: *mut ngx_http_upstream_rr_peers_t) -> Locked<Backup> {
        // SAFETY: as this function requires.
        unsafe { Locked::wlock(list) }
    }
}

impl<K> Locked<K> {
    /// # Safety
    /// `list` is a valid peer list of kind `K`, valid for the cycle.
    unsafe fn wlock(list: *mut ngx_http_upstream_rr_peers_t) -> Locked<K> {
        // SAFETY: list is valid; its rwlock lives in the same (shared) memory.
        unsafe {
            if !(*list).shpool.is_null() {
                ngx_rwlock_wlock(ptr::addr_of_mut!((*list).rwlock));
            }
        }
        Locked { list, kind: PhantomData }
    }

    /// The list's generation (0 without `resolve`).
    #[inline]
    fn config(&self) -> ngx_uint_t {
        // SAFETY: the list is valid and locked.
        unsafe { peers_config(self.list) }
    }

    /// Whether the zone's peers changed since this request's round-robin data was set up
    /// (round robin answers NGX_BUSY then, and so do we).
    #[inline]
    fn changed_since(&self, rrp: &ngx_http_upstream_rr_peer_data_t) -> bool {
        // SAFETY: the list is valid and locked.
        unsafe { config_changed(rrp, self.list) }
    }

    /// Number of peers in the list.
    fn number(&self) -> usize {
        // SAFETY: the list is valid and locked.
        unsafe { (*self.list).number }
    }

    /// A single server and no backups: round robin always tries it.
    fn single(&self) -> bool {
        // SAFETY: the list is valid and locked.
        unsafe { (*self.list).single() != 0 }
    }

    /// Whether `refs` are this list's peers at its current generation.
    #[inline]
    fn current(&self, refs: &PeerRefs<K>) -> bool {
        ptr::eq(refs.list, self.list) && refs.config == self.config()
    }

    /// The peers of `refs`, while the lock is held; `None` if they are not this list's peers
    /// at its current generation (then some may have been freed).
    #[inline]
    fn peers<'g>(&'g mut self, refs: &'g PeerRefs<K>) -> Option<Peers<'g>> {
        self.current(refs).then_some(Peers { peers: &refs.peers, lock: PhantomData })
    }

    /// Copies what the per-process tables need: the peers' addresses, names and weights, and
    /// the generation. Allocates only with `try_reserve` (no abort while other workers wait
    /// for the lock); `None` if memory is short.
    fn snapshot(&self) -> Option<Snapshot<K>> {
        let mut refs = PeerRefs { list: self.list, config: self.config(), peers: Vec::new(), kind: PhantomData };
        let mut names = Names::default();
        let mut weights = Vec::new();
        // SAFETY: the lock is held: the list's peers are live and nobody changes them.
        unsafe {
            let mut count = 0;
            let mut bytes = 0;
            let mut p = (*self.list).peer;
            while !p.is_null() {
                count += 1;
                bytes += (*p).name.len;
                p = (*p).next;
            }
            refs.peers.try_reserve_exact(count).ok()?;
            names.ends.try_reserve_exact(count).ok()?;
            names.bytes.try_reserve_exact(bytes).ok()?;
            weights.try_reserve_exact(count).ok()?;
            let mut p = (*self.list).peer;
            while !p.is_null() {
                refs.peers.push(p);
                names.bytes.extend_from_slice((*p).name.as_bytes());
                names.ends.push(names.bytes.len());
                weights.push((*p).weight.clamp(1, u32::MAX as ngx_int_t) as u32);
                p = (*p).next;
            }
        }
        Some(Snapshot { refs, names, weights })
    }
}

impl<K> Drop for Locked<K> {
    fn drop(&mut self) {
        // SAFETY: we took this lock in `wlock`.
        unsafe {
            if !(*self.list).shpool.is_null() {
                ngx_rwlock_unlock(ptr::addr_of_mut!((*self.list).rwlock));
            }
        }
    }
}

/// The peers of a locked list, borrowed from its [`Locked`] guard: a peer reference cannot
/// outlive the lock.
pub struct Peers<'g> {
    peers: &'g [*mut ngx_http_upstream_rr_peer_t],
    lock: PhantomData<&'g mut ()>,
}

impl Peers<'_> {
    #[inline]
    fn get(&self, i: usize) -> Option<&ngx_http_upstream_rr_peer_t> {
        // SAFETY: the guard these are borrowed from holds the list's lock and checked that they
        // are its peers at its current generation: live, and changed by nobody else meanwhile.
        self.peers.get(i).map(|&p| unsafe { &*p })
    }

    #[inline]
    fn get_mut(&mut self, i: usize) -> Option<&mut ngx_http_upstream_rr_peer_t> {
        // SAFETY: as in `get`; `&mut self` borrows the guard exclusively.
        self.peers.get(i).map(|&p| unsafe { &mut *p })
    }
}

/// The per-process view of one upstream's servers.
#[derive(Debug)]
pub struct UpstreamState {
    /// The primary peers the tables were built from (the zone copy differs from the
    /// configuration's), and their generation.
    primary_peers: PeerRefs<Primary>,
    backup_peers: Option<PeerRefs<Backup>>,
    primary: Group,
    backup: Option<Group>,
    /// (server identity, primary ring index), sorted, for learned routes.
    by_id: Vec<(u64, usize)>,
    /// The upstream's in-flight total.
    total: Option<&'static Slot>,
    slots_ready: bool,
    /// Sum of the weights of live primary servers, refreshed once a second.
    live_weight: Cell<u64>,
    live_at: Cell<i64>,
}

impl UpstreamState {
    /// What the primary servers' placement tables describe (see `Group::layout`).
    pub fn primary_layout(&self) -> u64 {
        self.primary.layout
    }

    /// The primary ring index of the server with this identity.
    fn index_of(&self, id: u64) -> Option<usize> {
        self.by_id.binary_search_by_key(&id, |&(k, _)| k).ok().map(|j| self.by_id[j].1)
    }
}

/// The zone's peer-list generation (bumped when `resolve` changes the servers); 0 without.
#[cfg(nginx1_27_3)]
unsafe fn peers_config(peers: *mut ngx_http_upstream_rr_peers_t) -> ngx_uint_t {
    // SAFETY: peers is valid; config is NULL or points into the same zone.
    unsafe { (*peers).config.as_ref().copied().unwrap_or(0) }
}

#[cfg(not(nginx1_27_3))]
unsafe fn peers_config(_peers: *mut ngx_http_upstream_rr_peers_t) -> ngx_uint_t {
    0
}

/// See [`Locked::changed_since`].
#[cfg(nginx1_27_3)]
unsafe fn config_changed(rrp: &ngx_http_upstream_rr_peer_data_t, peers: *mut ngx_http_upstream_rr_peers_t) -> bool {
    // SAFETY: peers is valid; config is NULL or points into the same zone.
    unsafe { (*peers).config.as_ref().is_some_and(|&c| c != rrp.config) }
}

#[cfg(not(nginx1_27_3))]
unsafe fn config_changed(_rrp: &ngx_http_upstream_rr_peer_data_t, _peers: *mut ngx_http_upstream_rr_peers_t) -> bool {
    false
}

/// Builds a group's tables (ring allocation and sort: no lock is held).
fn build_group<K>(s: Snapshot<K>) -> Result<(Group, PeerRefs<K>), String> {
    let ids = s.names.iter().map(key_hash).collect();
    let ring = Ring::new(s.names.iter().zip(s.weights.iter().copied())).map_err(|e| e.to_string())?;
    let slots = vec![None; s.weights.len()];
    let health = vec![None; s.weights.len()];
    let mut id = Vec::with_capacity(s.names.bytes.len() + 5 * s.weights.len());
    for (name, w) in s.names.iter().zip(&s.weights) {
        id.extend_from_slice(name);
        id.push(0);
        id.extend_from_slice(&w.to_le_bytes());
    }
    let layout = key_hash(&id);
    Ok((Group { ring, names: s.names, weights: s.weights, ids, slots, health, layout }, s.refs))
}

/// Builds the state from snapshots of the primary list and its backup list.
fn build_state(primary: Snapshot<Primary>, backup: Option<Snapshot<Backup>>) -> Result<UpstreamState, String> {
    let (primary, primary_peers) = build_group(primary)?;
    let (backup, backup_peers) = match backup {
        Some(b) => build_group(b).map(|(g, r)| (Some(g), Some(r)))?,
        None => (None, None),
    };
    let mut by_id: Vec<(u64, usize)> = primary.ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    by_id.sort_unstable();
    Ok(UpstreamState {
        primary_peers,
        backup_peers,
        primary,
        backup,
        by_id,
        total: None,
        slots_ready: false,
        live_weight: Cell::new(0),
        live_at: Cell::new(i64::MIN),
    })
}

/// Snapshots an upstream's lists, locking one at a time (primary, then backup), as round
/// robin does. `Err` with nothing locked.
fn snapshot_lists(primary: Locked<Primary>) -> Result<(Snapshot<Primary>, Option<Snapshot<Backup>>), String> {
    const SHORT: &str = "out of memory copying the servers";
    let Some(p) = primary.snapshot() else {
        drop(primary);
        return Err(SHORT.into());
    };
    let backup = match primary.into_backup() {
        Some(b) => match b.snapshot() {
            Some(s) => Some(s),
            None => {
                drop(b);
                return Err(SHORT.into());
            }
        },
        None => None,
    };
    Ok((p, backup))
}

/// Number of servers (primary and backup) of a peer list.
unsafe fn server_count(peers: *mut ngx_http_upstream_rr_peers_t) -> usize {
    // SAFETY: peers is a valid list.
    unsafe { (*peers).number + (*peers).next.as_ref().map_or(0, |b| b.number) }
}

/// Addresses of the servers (primary and backup) of a peer list.
unsafe fn server_names<'a>(peers: *mut ngx_http_upstream_rr_peers_t) -> impl Iterator<Item = &'a [u8]> {
    // SAFETY: peers is a valid list (its backups in `next`), whose peers live as long as it.
    let lists = unsafe { [peers.as_ref(), peers.as_ref().and_then(|p| p.next.as_ref())] };
    lists.into_iter().flatten().flat_map(|l| {
        // SAFETY: as above.
        core::iter::successors(unsafe { l.peer.as_ref() }, |p| unsafe { p.next.as_ref() }).map(|p| p.name.as_bytes())
    })
}

/// `peer.init_upstream`: round robin's setup, then our rings and shared zones.
pub unsafe extern "C" fn init_upstream(cf: *mut ngx_conf_t, us: *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t {
    // SAFETY: nginx passes valid cf and us.
    unsafe {
        if ngx_http_upstream_init_round_robin(cf, us) != NGX_OK as ngx_int_t {
            return NGX_ERROR as ngx_int_t;
        }
        (*us).peer.init = Some(init_peer);

        let Some(kcf) = srv_conf(us) else {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "kylin balancer used outside an upstream block");
            return NGX_ERROR as ngx_int_t;
        };
        kcf.init_upstream_ran = true;
        kcf.name = (*us).host.as_bytes().to_vec();
        // The http-level kylin_session_store applies to upstreams without their own.
        let ctx = (*cf).ctx as *mut ngx::ffi::ngx_http_conf_ctx_t;
        if let Some(http) = (*(*ctx).srv_conf.add(crate::conf::Module::module().ctx_index) as *const SrvConf).as_ref() {
            if !ptr::eq(http, kcf) {
                kcf.inherit_store(http);
            }
        }

        let peers = (*us).peer.data as *mut ngx_http_upstream_rr_peers_t;
        match shm::load_zone(cf, 2 * server_count(peers) + 2) {
            Some(z) => kcf.load_zone = z,
            None => return NGX_ERROR as ngx_int_t,
        }
        // The slots this configuration uses, claimed and stamped when the zone is set up.
        shm::note_load_keys(
            server_names(peers)
                .map(|n| (load::server_key(&kcf.name, n), Use::Counts))
                .chain([(load::upstream_key(&kcf.name), Use::Counts)])
                .chain(crate::session_check::store_slot_keys(kcf)),
        );
        // Each server's health slot (health checks and run-time drain), kept across reloads
        // while the server stays.
        shm::note_fresh_keys(server_names(peers).map(|n| load::health_key(&kcf.name, n)));
        let primaries = (*peers).number;
        if kcf.balance.is_none() && kcf.balance_factor.is_none() && primaries > shm::PLACEMENT_SERVERS {
            // The default cannot place clients on this many servers: balance requests, and say so.
            ngx_log_error!(
                NGX_LOG_WARN,
                (*cf).log,
                "upstream \"{}\" has {} servers: client placement handles up to {}, so it balances requests (\"kylin_balance requests\") in {}:{}",
                (*us).host,
                primaries,
                shm::PLACEMENT_SERVERS,
                kcf.file.map(|f| f.to_string_lossy()).unwrap_or_default(),
                kcf.line
            );
            kcf.balance = Some(Balance::Requests);
        }
        if kcf.balance() == Balance::Clients {
            if primaries > shm::PLACEMENT_SERVERS {
                ngx_log_error!(
                    NGX_LOG_EMERG,
                    (*cf).log,
                    "upstream \"{}\" has {} servers: \"kylin_balance clients\" places clients on up to {}; use \"kylin_balance requests\" in {}:{}",
                    (*us).host,
                    primaries,
                    shm::PLACEMENT_SERVERS,
                    kcf.file.map(|f| f.to_string_lossy()).unwrap_or_default(),
                    kcf.line
                );
                return NGX_ERROR as ngx_int_t;
            }
            match shm::placement_zone(cf, &kcf.name) {
                Some(z) => kcf.placement_zone = Some(z),
                None => return NGX_ERROR as ngx_int_t,
            }
        }
        if kcf.routes_zone.is_none() {
            let mut name = ngx_str_t { len: shm::DEFAULT_ROUTES_ZONE.len(), data: shm::DEFAULT_ROUTES_ZONE.as_ptr() as *mut u8 };
            match shm::routes_zone(cf, &mut name, shm::DEFAULT_ROUTES_SIZE) {
                Some(z) => kcf.routes_zone = Some(z),
                None => return NGX_ERROR as ngx_int_t,
            }
        }

        // With a zone, peers are copied to shared memory after this point: each worker builds
        // its tables from that copy on first use. Building them now as well shows a
        // configuration error in `nginx -t`, and workers without a zone inherit them.
        // SAFETY: peers is the upstream's primary list (nothing is shared yet: no lock taken).
        match snapshot_lists(Locked::primary(peers)).and_then(|(p, b)| build_state(p, b)) {
            Ok(state) => kcf.state = Some(Box::new(state)),
            Err(e) => {
                ngx_log_error!(
                    NGX_LOG_EMERG,
                    (*cf).log,
                    "upstream \"{}\": {} in {}:{}",
                    (*us).host,
                    e,
                    kcf.file.map(|f| f.to_string_lossy()).unwrap_or_default(),
                    kcf.line
                );
                return NGX_ERROR as ngx_int_t;
            }
        }
    }
    NGX_OK as ngx_int_t
}

/// Per-request balancer data. `rrp` comes first: round robin's callbacks receive `&rrp`.
///
/// No larger than ip_hash's (80 bytes): it comes from the request pool, whose first block the
/// whole request shares, and measurements showed larger per-request data pushing requests
/// into a second pool block (a malloc and a free per request, ~250 instructions). So the
/// configuration and the stickiness key are found again from the request when needed.
#[repr(C)]
struct PeerData {
    rrp: ngx_http_upstream_rr_peer_data_t,
    r: *mut ngx_http_request_t,
    /// The request's session, if it carries one (`key` 0 otherwise).
    sess: SessionData,
    /// Counters of the server this try went to, while it is counted in flight.
    counted: Option<&'static Slot>,
    movable: bool,
    /// Client placement was busy when this try was chosen: `free` measures its response.
    measure: bool,
    /// This request moved to the backup servers.
    on_backup: bool,
    /// The try is also counted in the upstream's in-flight total.
    counted_total: bool,
    /// What the balancer decided, for `$kylin_route` and `$kylin_session_state`: the
    /// request's module context points here (no separate allocation).
    ctx: crate::variables::RequestCtx,
}

// The size argued for above; a compile error if a new field breaks it.
const _: () = assert!(core::mem::size_of::<PeerData>() <= 80);

/// The request's session.
#[repr(C)]
struct SessionData {
    /// Route-table key of the session id ([`crate::session::SessionKeyer::key`], never 0);
    /// 0 when the request carries no session.
    key: u64,
    /// Identity of the server that created the session; 0 if none is learned.
    learned: u64,
}

impl PeerData {
    /// The upstream's configuration (found from the request: not stored, see above).
    unsafe fn conf(&self) -> Option<&'static mut SrvConf> {
        // SAFETY: r is live and has an upstream using this balancer.
        unsafe { srv_conf((*(*self.r).upstream).upstream) }
    }

    fn session(&self) -> Option<&SessionData> {
        (self.sess.key != 0).then_some(&self.sess)
    }
}

/// The route-table key of a session.
fn session_key_of(s: &SessionData) -> u128 {
    u128::from(s.key)
}

/// The request's stickiness key: the value of `kylin_hash`, else (also when that value is
/// empty, e.g. `$http_x_forwarded_for` of a request without the header) the client address.
unsafe fn request_key(r: *mut ngx_http_request_t, kcf: &SrvConf) -> Option<u64> {
    // SAFETY: r is a live request.
    unsafe {
        if let Some(cv) = kcf.hash {
            let mut v = ngx_str_t::default();
            if ngx_http_complex_value(r, cv, &mut v) != NGX_OK as ngx_int_t {
                return None;
            }
            if v.len != 0 {
                return Some(key_hash(v.as_bytes()));
            }
        }
        Some(client_address_key(r))
    }
}



/// The stickiness key of a request: its client address (after realip).
unsafe fn client_address_key(r: *mut ngx_http_request_t) -> u64 {
    // SAFETY: r and its connection are valid during the request; sockaddr matches its family.
    unsafe {
        let c = (*r).connection;
        let sa = (*c).sockaddr;
        let addr = match (*sa).sa_family as i32 {
            libc::AF_INET => {
                // The whole address, its bytes in network order: client_key's IPv4 key.
                let sin = sa as *const sockaddr_in;
                return key_hash(&(*sin).sin_addr.s_addr.to_ne_bytes());
            }
            libc::AF_INET6 => {
                let sin6 = sa as *const sockaddr_in6;
                IpAddr::V6(Ipv6Addr::from((*sin6).sin6_addr.__in6_u.__u6_addr8))
            }
            // Unix-domain clients have no address: they share one key.
            _ => return key_hash(b""),
        };
        let mut buf = [0u8; 8];
        key_hash(client_key(addr, &mut buf))
    }
}

/// How often (seconds of use) a learned route is written to the session store again.
const SHARE_EVERY: i64 = 300;

/// Writes a learned route to the session store again (see `SHARE_EVERY`).
#[cold]
#[inline(never)]
unsafe fn share_again(kcf: &SrvConf, session_id: &[u8], peer_id: u64) {
    let Some(state) = kcf.state.as_deref() else { return };
    let Some(name) = state.index_of(peer_id).and_then(|i| state.primary.names.get(i)) else { return };
    // SAFETY: called from the event loop.
    unsafe { crate::session_check::share_route(kcf, session_id, name) };
}

/// Values of a chain of headers of one name (nginx 1.23+ links same-name headers).
#[cfg(nginx1_23_0)]
unsafe fn chain<'a>(first: *mut ngx::ffi::ngx_table_elt_t) -> impl Iterator<Item = &'a [u8]> + 'a {
    // SAFETY: `first` is NULL or a header element of a live request, valid for 'a.
    let head = unsafe { first.as_ref() };
    core::iter::successors(head, |h| {
        // SAFETY: nginx links same-name headers through `next`: NULL or another element of
        // the same request.
        unsafe { h.next.as_ref() }
    })
    .map(|h| h.value.as_bytes())
}

/// Values of the request's `Cookie` headers.
pub unsafe fn request_cookies<'a>(r: *mut ngx_http_request_t) -> impl Iterator<Item = &'a [u8]> + 'a {
    #[cfg(nginx1_23_0)]
    // SAFETY: r is a live request; `cookie` is NULL or the first Cookie header.
    return unsafe { chain((*r).headers_in.cookie) };
    #[cfg(not(nginx1_23_0))]
    // SAFETY: r is a live request; its header list lives as long as it.
    return unsafe { header_values(&(*r).headers_in.headers, "Cookie") };
}

/// Values of the upstream response's `Set-Cookie` headers.
unsafe fn response_set_cookies<'a>(u: *mut ngx::ffi::ngx_http_upstream_t) -> impl Iterator<Item = &'a [u8]> + 'a {
    #[cfg(nginx1_23_0)]
    // SAFETY: u is the live request's upstream; `set_cookie` is NULL or the first Set-Cookie.
    return unsafe { chain((*u).headers_in.set_cookie) };
    #[cfg(not(nginx1_23_0))]
    // SAFETY: u is the live request's upstream; its header list lives as long as it.
    return unsafe { header_values(&(*u).headers_in.headers, "Set-Cookie") };
}

/// Values of the headers called `name` in an nginx header list (nginx before 1.23).
#[cfg(not(nginx1_23_0))]
pub unsafe fn header_values<'a>(list: &'a ngx_list_t, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    // SAFETY: the list belongs to a live request.
    unsafe { ngx::http::list_iterator(list) }
        .filter(move |(k, _)| k.as_bytes().eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v.as_bytes())
}

/// `peer.init`: per request.
unsafe extern "C" fn init_peer(r: *mut ngx_http_request_t, us: *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t {
    // SAFETY: nginx passes a valid request with an upstream, and the upstream it uses.
    unsafe {
        let Some(kcf) = srv_conf(us) else { return NGX_ERROR as ngx_int_t };
        // The key is computed in `get`; evaluate kylin_hash now so that a failure fails here.
        if kcf.hash.is_some() && request_key(r, kcf).is_none() {
            return NGX_ERROR as ngx_int_t;
        }

        // The session cookie (already found by the precontent phase when a store is used), and
        // the server that created the session.
        let pre = crate::variables::existing_ctx(r);
        let checked = pre.filter(|c| c.checked).map(|c| c.session);
        let found = match pre.and_then(crate::variables::checked_id) {
            Some(id) => RequestSession::Id(id),
            None => session::request_session(request_cookies(r), kcf.session_cookie()),
        };
        let (state, skey, learned) = match found {
            RequestSession::None => (SessionState::None, None, None),
            RequestSession::Id(id) => {
                let now = ngx_time();
                let timeout = kcf.routes_timeout();
                // With routes shared through Redis, a learned route is written there again
                // when it is due (see RouteTable::lookup_share): after a failed write, and
                // every SHARE_EVERY seconds of use, which also renews its expiry there.
                let sharing = crate::session_check::shares_routes(kcf);
                let since = if sharing { crate::session_check::store_recovered_at(kcf) } else { 0 };
                let found = kcf.routes_zone.and_then(|z| {
                    let k = shm::session_key(z, &kcf.routes_keyer, session::KeyUse::Route, &kcf.name, id)?;
                    let tk = u128::from(k);
                    shm::with_routes(z, |t| {
                        if sharing {
                            let hit = t.lookup_share(tk, now, timeout, SHARE_EVERY.min(timeout / 2).max(1), since);
                            (k, hit.map(|h| h.0), hit.is_some_and(|h| h.1))
                        } else {
                            (k, t.lookup(tk, now, timeout), false)
                        }
                    })
                });
                if let Some((_, Some(peer_id), true)) = found {
                    share_again(kcf, id, peer_id);
                }
                let found = found.map(|(k, l, _)| (k, l));
                let state = match (kcf.store_mode(), checked) {
                    (Some(crate::store::StoreMode::AllShared), _) => SessionState::Shared,
                    (_, Some(s)) => s,
                    _ => SessionState::Unknown,
                };
                (state, found.map(|f| f.0), found.and_then(|f| f.1))
            }
        };

        let pd = ngx_palloc((*r).pool, core::mem::size_of::<PeerData>()) as *mut PeerData;
        if pd.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        pd.write(PeerData {
            // Filled in by round robin's init_peer below.
            rrp: core::mem::zeroed(),
            r,
            sess: SessionData { key: skey.unwrap_or(0), learned: learned.unwrap_or(0) },
            counted: None,
            movable: balancer::may_move(state),
            measure: false,
            on_backup: false,
            counted_total: false,
            ctx: crate::variables::RequestCtx::new(None, state, checked.is_some()),
        });
        crate::variables::set_ctx(r, ptr::addr_of_mut!((*pd).ctx));

        // Round robin fills in `rrp` (peers, tried bitmap, tries) when peer.data points at it.
        let u = (*r).upstream;
        (*u).peer.data = ptr::addr_of_mut!((*pd).rrp) as *mut c_void;
        if ngx_http_upstream_init_round_robin_peer(r, us) != NGX_OK as ngx_int_t {
            return NGX_ERROR as ngx_int_t;
        }
        (*u).peer.get = Some(get_peer);
        (*u).peer.free = Some(free_peer);
    }
    NGX_OK as ngx_int_t
}

/// Whether nginx considers a peer failed right now (`max_fails` within `fail_timeout`).
#[inline]
fn failed(p: &ngx_http_upstream_rr_peer_t, now: i64) -> bool {
    p.max_fails != 0 && p.fails >= p.max_fails && now - p.checked as i64 <= p.fail_timeout as i64
}

/// nginx's view of whether a peer may take this request: the same tests as its own
/// round-robin and hash balancers.
struct NginxServers<'a, 'g> {
    group: &'a Group,
    peers: Peers<'g>,
    tried: *mut usize,
    now: i64,
    /// A single server without backups is always tried (as round robin does).
    single: bool,
    gate: Gate,
}

/// What the module's own availability tests need from the configuration and the request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gate {
    /// `kylin_health_check` is set: unhealthy servers take nothing.
    pub health: bool,
    /// ... `mandatory`: servers not checked yet take nothing either.
    pub mandatory: bool,
    /// `kylin_slow_start`, ms (0: off): a server that came back takes a growing share of
    /// new clients ([`health::ramp_admits`]).
    pub slow_start_ms: u64,
    /// The request's stickiness key and the time (Unix ms), for the slow start.
    pub key: u64,
    pub now_ms: u64,
}

impl Gate {
    pub fn of(kcf: &SrvConf) -> Gate {
        Gate {
            health: kcf.health.is_some(),
            mandatory: kcf.health.as_ref().is_some_and(|h| h.mandatory),
            slow_start_ms: 0,
            key: 0,
            now_ms: 0,
        }
    }

    /// With the slow start of `kcf` for a request with `key`.
    pub fn ramping(mut self, kcf: &SrvConf, key: u64) -> Gate {
        if let Some(ms) = kcf.slow_start_ms {
            // SAFETY: nginx's cached time, updated by this process's event loop only.
            let t = unsafe { &*ngx::ffi::ngx_cached_time };
            self.slow_start_ms = ms;
            self.key = key;
            self.now_ms = (t.sec.max(0) as u64).saturating_mul(1000) + t.msec as u64;
        }
        self
    }

    /// Whether the server of `slot` counts as live (health and run-time drain, not the slow
    /// start), for the live weight.
    #[inline]
    pub fn live(&self, slot: Option<&Slot>) -> bool {
        Gate { slow_start_ms: 0, ..*self }.admits(slot, false)
    }

    /// Whether the health record in `slot` lets the server take requests (a server without a
    /// health slot, the zone being full, is not held back), and, unless the request's session
    /// lives there (`own_session`), whether it is not drained at run time.
    #[inline]
    pub fn admits(&self, slot: Option<&Slot>, own_session: bool) -> bool {
        let Some(h) = slot else { return true };
        if !own_session {
            if h.cell(crate::drain::CELL).load(core::sync::atomic::Ordering::Relaxed) != 0 {
                return false;
            }
            if self.slow_start_ms > 0 {
                let back = h.cell(health::cell::RAMP_MS).load(core::sync::atomic::Ordering::Relaxed);
                if back != 0 && !health::ramp_admits(self.key, self.now_ms.saturating_sub(back), self.slow_start_ms) {
                    return false;
                }
            }
        }
        !self.health || Health::unpack(h.cell(health::cell::STATE).load(core::sync::atomic::Ordering::Relaxed)).admits(self.mandatory)
    }
}

/// The `down` value of a draining server (`server ... drain`, nginx 1.29.6+), which still
/// serves its own sessions; 0 where nginx has no draining.
#[cfg(nginx1_29_6)]
pub const DRAINING: ngx_uint_t = ngx::ffi::NGX_HTTP_UPSTREAM_DRAINING as ngx_uint_t;
#[cfg(not(nginx1_29_6))]
pub const DRAINING: ngx_uint_t = 0;

impl NginxServers<'_, '_> {
    /// nginx's tests, with the `down` bits in `allowed` let through, and the module's own
    /// (health checks, run-time drain: a drained server takes only requests of sessions that
    /// live there, `own_session`).
    #[inline]
    fn check(&mut self, i: usize, allowed: ngx_uint_t, own_session: bool) -> bool {
        let bits = usize::BITS as usize;
        // SAFETY: the tried bitmap covers every peer of the group (round robin sized it for
        // the larger list).
        if !self.tried.is_null() && unsafe { *self.tried.add(i / bits) } & (1 << (i % bits)) != 0 {
            return false;
        }
        let Some(p) = self.peers.get(i) else { return false };
        if p.down & !allowed != 0 {
            return false;
        }
        if p.max_conns != 0 && p.conns >= p.max_conns {
            return false;
        }
        if !self.single && failed(p, self.now) {
            return false;
        }
        self.gate.admits(self.group.health.get(i).copied().flatten(), own_session)
    }
}

impl Servers for NginxServers<'_, '_> {
    #[inline]
    fn usable(&mut self, i: usize) -> bool {
        self.check(i, 0, false)
    }

    #[inline]
    fn usable_for_session(&mut self, i: usize) -> bool {
        self.check(i, DRAINING, true)
    }

    #[inline]
    fn load(&self, i: usize) -> u64 {
        self.group.slots.get(i).copied().flatten().map_or(0, |s| s.inflight())
    }

    #[inline]
    fn weight(&self, i: usize) -> u64 {
        self.group.weights.get(i).map_or(1, |&w| u64::from(w))
    }
}

/// How many times `get` rebuilds the tables when the servers keep changing meanwhile.
const REBUILD_TRIES: usize = 3;

/// Makes sure the per-process tables describe the primary list as it is now (built lazily
/// with a zone, rebuilt when `resolve` changed the zone's peers) and point at the shared
/// counters. Takes the list's guard and gives it back. A rebuild copies the peers under their
/// locks (one list at a time), then builds and installs the tables with no lock held (ring
/// allocation and sort, the counters' lookup, dropping the old tables), then locks again and
/// checks that nothing changed meanwhile. `Err` with nothing locked.
///
/// # Safety
/// `guard` holds the primary list of the upstream `kcf` configures.
#[inline(always)]
unsafe fn ensure_state(kcf: &mut SrvConf, guard: Locked<Primary>) -> Result<(Locked<Primary>, &UpstreamState), String> {
    let guard = if kcf.state.as_deref().is_some_and(|s| guard.current(&s.primary_peers)) {
        guard
    } else {
        // SAFETY: guard holds kcf's upstream's primary list (this function's contract).
        unsafe { rebuild(kcf, guard)? }
    };
    let Some(state) = kcf.state.as_deref_mut() else {
        drop(guard);
        return Err("no tables".into());
    };
    if !state.slots_ready {
        // The tables built at configuration time, used as they are without a zone (where
        // there is no lock).
        // SAFETY: the load zone is valid for the cycle.
        unsafe { point_at_counters(kcf.load_zone, &kcf.name, state) };
    }
    Ok((guard, state))
}

/// [`ensure_state`]'s rebuild, until the tables describe the list as it is when locked again.
///
/// # Safety
/// As for [`ensure_state`].
#[cold]
#[inline(never)]
unsafe fn rebuild(kcf: &mut SrvConf, mut guard: Locked<Primary>) -> Result<Locked<Primary>, String> {
    let list = guard.list;
    let mut tries = 0;
    while !kcf.state.as_deref().is_some_and(|s| guard.current(&s.primary_peers)) {
        if tries == REBUILD_TRIES {
            drop(guard);
            return Err("the servers changed during every rebuild of the tables".into());
        }
        tries += 1;
        let (primary, backup) = snapshot_lists(guard)?;
        // The two lists share one generation: copies of different ones are not installed.
        if backup.as_ref().map_or(true, |b| b.refs.config == primary.refs.config) {
            let mut state = build_state(primary, backup)?;
            // SAFETY: the load zone is valid for the cycle.
            unsafe { point_at_counters(kcf.load_zone, &kcf.name, &mut state) };
            kcf.state = Some(Box::new(state));
        }
        // SAFETY: list is the primary list the caller's guard held (this function's contract).
        guard = unsafe { Locked::primary(list) };
    }
    Ok(guard)
}

/// Points the state's servers at their shared counters (slots claimed by name in the load
/// zone: no peer is read).
#[cold]
#[inline(never)]
unsafe fn point_at_counters(load_zone: *mut ngx::ffi::ngx_shm_zone_t, name: &[u8], state: &mut UpstreamState) {
    // Claims are serialised with the zone's mutex; this runs once per table build.
    // SAFETY: the caller passes the configuration's load zone, valid for the cycle.
    let claimed = unsafe {
        shm::with_load_claims(load_zone, |table| {
            let generation = table.committed();
            state.total = table.claim(load::upstream_key(name), Use::Counts, generation);
            let mut missing = usize::from(state.total.is_none());
            let groups = core::iter::once(&mut state.primary).chain(state.backup.as_mut());
            for g in groups {
                for (i, server) in g.names.iter().enumerate() {
                    g.slots[i] = table.claim(load::server_key(name, server), Use::Counts, generation);
                    missing += usize::from(g.slots[i].is_none());
                    g.health[i] = table.claim(load::health_key(name, server), Use::Counts, generation);
                }
            }
            (missing, table.capacity())
        })
    };
    if let Some((missing, capacity)) = claimed {
        state.slots_ready = true;
        if missing > 0 {
            ngx_log_error!(
                NGX_LOG_ERR,
                // SAFETY: in a worker ngx_cycle is the running cycle and its log is valid.
                unsafe { (*ngx::ffi::ngx_cycle).log },
                "kylin: upstream \"{}\": zone \"{}\" is full ({} slots): {} of its load counters have none, so the load of those servers is not counted and the bound does not apply to them; {}",
                String::from_utf8_lossy(name),
                shm::LOAD_ZONE,
                capacity,
                missing,
                shm::FULL_FIX
            );
        }
    }
}

/// The live weight (sum of weights of primary servers not down or failed): the denominator
/// of the load bound.
fn live_weight(group: &Group, peers: &Peers<'_>, now: i64, gate: Gate) -> u64 {
    group
        .weights
        .iter()
        .enumerate()
        .filter(|&(i, _)| peers.get(i).is_some_and(|p| p.down == 0 && !failed(p, now)) && gate.live(group.health.get(i).copied().flatten()))
        .map(|(_, &w)| u64::from(w))
        .sum()
}

/// `peer.get`
///
/// The lock discipline is round robin's: the primary list is locked for the choice among the
/// primary servers; only if none is usable is it released and the backup list locked for the
/// choice among the backups. Anything that needs no peer happens outside the locks: the key
/// (`kylin_hash` may evaluate variables) before, moving a spilled session's route (the
/// routes zone's mutex, cookie parsing, posting a Redis write) after.
unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: data is the PeerData set up in init_peer; pc is the request's peer connection.
    unsafe {
        let pd = &mut *(data as *mut PeerData);
        (*pc).set_cached(0);
        (*pc).connection = ptr::null_mut();

        let Some(kcf) = pd.conf() else { return NGX_ERROR as ngx_int_t };
        let Some(key) = request_key(pd.r, kcf) else { return NGX_ERROR as ngx_int_t };
        let now = ngx_time();
        // `rrp.peers` is the primary list, or the backup list once a backup was chosen (then
        // this request stays on backups, as with round robin).
        let picked = if pd.on_backup {
            match kcf.state.as_deref() {
                // SAFETY: on backups, rrp.peers is the upstream's backup list (set in get_backup).
                Some(state) => get_backup(pd, pc, state, Gate::of(kcf), Locked::backup(pd.rrp.peers), key, now),
                None => Err(NGX_ERROR as ngx_int_t),
            }
        } else {
            get_primary(pd, pc, kcf, key, now)
        };
        // No peer list is locked from here on.
        let choice = match picked {
            Ok(c) => c,
            Err(rc) => {
                // Both lists' `name` is the upstream's, valid for the cycle (in the zone with
                // one); rrp.peers changes only when a backup is taken.
                (*pc).name = (*pd.rrp.peers).name;
                return rc;
            }
        };
        pd.ctx.route = Some(choice.route);
        // A shared session that moves takes its learned route along, so it stays on its new
        // server instead of bouncing back. (Spills happen among primary servers only.)
        if choice.route == Route::Spilled && pd.session().is_some() {
            let kcf: &SrvConf = kcf;
            let g = kcf.state.as_deref().map(|s| &s.primary);
            if let Some((id, name)) = g.and_then(|g| Some((*g.ids.get(choice.server)?, g.names.get(choice.server)?))) {
                move_route(kcf, pd, id, name);
            }
        }

        ngx_log_debug_mask!(DebugMask::Http, (*pc).log, "kylin peer: {} route: {}", *(*pc).name, choice.route.as_str());
    }
    NGX_OK as ngx_int_t
}

/// The choice among the primary servers, under the primary list's lock, then among the
/// backups (see [`get_backup`]) if no primary server is usable. `Err` is `get`'s return code.
#[inline(always)]
unsafe fn get_primary(pd: &mut PeerData, pc: *mut ngx_peer_connection_t, kcf: &mut SrvConf, key: u64, now: i64) -> Result<Choice, ngx_int_t> {
    let factor = kcf.balance_factor();
    let balance = kcf.balance();
    let placement = kcf.placement_zone;
    let local_sessions = kcf.store_mode().is_none();
    let gate = Gate::of(kcf).ramping(kcf, key);
    // SAFETY: rrp.peers is the upstream's primary list while the request is not on backups.
    let guard = unsafe { Locked::primary(pd.rrp.peers) };
    // SAFETY: the guard is of the upstream's primary list.
    let (mut guard, state) = match unsafe { ensure_state(kcf, guard) } {
        Ok(g) => g,
        Err(e) => {
            // SAFETY: the request and its log are live.
            unsafe {
                ngx_log_error!(NGX_LOG_ERR, (*pc).log, "kylin: upstream \"{}\": {}", String::from_utf8_lossy(&kcf.name), e);
            }
            return Err(NGX_ERROR as ngx_int_t);
        }
    };
    if guard.changed_since(&pd.rrp) {
        return Err(NGX_BUSY as ngx_int_t);
    }
    let single = guard.single();
    let Some(peers) = guard.peers(&state.primary_peers) else { return Err(NGX_ERROR as ngx_int_t) };
    if state.live_at.get() != now {
        state.live_weight.set(live_weight(&state.primary, &peers, now, gate));
        state.live_at.set(now);
    }
    // The server nginx's `sticky` names (its cookie, route or learned session), else the
    // session's learned server.
    // SAFETY: pc is the request's peer connection; the primary list is locked.
    let hinted = unsafe { sticky_hint(pd, pc) };
    let bound = Bound {
        factor_milli: factor,
        total: state.total.map_or(0, |t| t.inflight()),
        live_weight: state.live_weight.get(),
    };
    let mut ps = NginxServers { group: &state.primary, peers, tried: pd.rrp.tried, now, single, gate };
    let mut req = Request {
        key,
        learned: hinted.or_else(|| pd.session().filter(|s| s.learned != 0).and_then(|s| state.index_of(s.learned))),
        movable: pd.movable,
        balance,
        moved: None,
        sticky: hinted.is_some(),
    };
    // Client placement: where the request's client lives, asked on its first try only (a
    // retry walks the key's order, as with every balance).
    if let Some(z) = placement {
        // SAFETY: the zone is valid for the cycle; the primary list is locked (placement's lock
        // is only ever taken after it, never before).
        unsafe {
            let now_ms = ngx::ffi::ngx_current_msec as u64;
            let busy = sample_placement(z, &state.primary, now_ms);
            // While placement is busy, the try's response time is measured at `free`.
            pd.measure = busy;
            if busy && req.follows_client() && pd.ctx.route.is_none() {
                req.moved = place_client(z, &state.primary, &mut ps, key, local_sessions, now_ms);
            }
        }
    }
    let mut choice = balancer::choose_primary(&req, Pick { ring: &state.primary.ring, servers: &mut ps, bound });
    if choice.is_none() && ps.gate.slow_start_ms > 0 {
        // Every usable server is ramping up and none admits this key: the slow start never
        // turns a request away, so choose as if there were none.
        ps.gate.slow_start_ms = 0;
        choice = balancer::choose_primary(&req, Pick { ring: &state.primary.ring, servers: &mut ps, bound });
    }
    if let Some(choice) = choice {
        // SAFETY: pc is the request's peer connection.
        return match unsafe { take(pd, pc, &mut ps.peers, &state.primary, state.total, &choice, now) } {
            true => Ok(choice),
            false => Err(NGX_ERROR as ngx_int_t),
        };
    }
    // No primary server is usable: as round robin, release the primary list, then lock the
    // backup list.
    match guard.into_backup() {
        Some(b) => get_backup(pd, pc, state, gate, b, key, now),
        None => Err(NGX_BUSY as ngx_int_t),
    }
}

/// Whether client placement has something to do (some server busy, some client moved), as
/// of the latest sample of the servers' in-flight counts; takes that sample when one is due
/// (every `shm::PLACEMENT_SAMPLE_MS`, by whichever worker's request comes first, without
/// waiting for the lock). Old workers of a reload (`ngx_exiting`) leave placement alone.
///
/// # Safety
/// `zone` is the upstream's placement zone.
#[inline]
unsafe fn sample_placement(zone: *mut ngx::ffi::ngx_shm_zone_t, g: &Group, now_ms: u64) -> bool {
    // SAFETY: the zone is valid for the cycle (the caller's contract); ngx_exiting is this
    // process's flag, written by its own event loop only.
    unsafe {
        if ngx::ffi::ngx_exiting != 0 || g.ring.peers() > shm::PLACEMENT_SERVERS {
            return false;
        }
        let Some((busy, due)) = shm::placement_state(zone, now_ms) else { return false };
        if !due {
            return busy;
        }
        shm::with_placement(zone, g.layout, false, |p, at, flag| {
            let n = g.slots.len();
            p.sample(n, |i| g.slots.get(i).map(|s| s.map_or(0, |s| s.inflight())), now_ms);
            let busy = p.busy(n, |i| g.weight(i), now_ms);
            at.store(now_ms, core::sync::atomic::Ordering::Relaxed);
            flag.store(u64::from(busy), core::sync::atomic::Ordering::Relaxed);
            busy
        })
        .unwrap_or(busy)
    }
}

/// Where the client `key` lives if placement moved it off its home (`None`: at home).
/// `local_sessions`: the upstream's sessions are node-local (no shared session store), so a
/// moved client's open sessions stay behind ([`crate::placement::Params::local_sessions`]).
///
/// # Safety
/// `zone` is the upstream's placement zone; `ps` holds the primary list's lock.
#[cold]
#[inline(never)]
unsafe fn place_client(zone: *mut ngx::ffi::ngx_shm_zone_t, g: &Group, ps: &mut NginxServers<'_, '_>, key: u64, local_sessions: bool, now_ms: u64) -> Option<usize> {
    // SAFETY: the caller's contract.
    unsafe {
        shm::with_placement(zone, g.layout, true, |p, _, _| {
            p.set_local_sessions(local_sessions);
            let (server, how) = p.place(key, g.ring.order(key), |i| ps.usable(i), |i| g.weight(i), now_ms)?;
            matches!(how, Placed::Moved | Placed::MovedNow).then_some(server)
        })
        .flatten()
    }
}

/// Records what placement learns from a finished try on a primary server: the key's
/// response time (its load, by Little's law), while placement is busy (as it was when the try
/// was chosen, and still is), or a login (a response that set a session) on server `login`,
/// always.
///
/// # Safety
/// `pd.r` is the live request, its upstream set.
#[cold]
#[inline(never)]
unsafe fn placement_learns(kcf: &SrvConf, pd: &PeerData, login: Option<u64>) {
    let (Some(zone), Some(state)) = (kcf.placement_zone, kcf.state.as_deref()) else { return };
    // SAFETY: the zone is valid for the cycle; r and its upstream are live.
    unsafe {
        if ngx::ffi::ngx_exiting != 0 {
            return;
        }
        let now_ms = ngx::ffi::ngx_current_msec as u64;
        let busy = shm::placement_state(zone, now_ms).is_some_and(|(b, _)| b);
        let login = login.and_then(|id| state.index_of(id));
        if !busy && login.is_none() {
            return;
        }
        let Some(key) = request_key(pd.r, kcf) else { return };
        let u = (*pd.r).upstream;
        let response_ms = (now_ms as ngx::ffi::ngx_msec_t).wrapping_sub((*u).start_time) as u64;
        shm::with_placement(zone, state.primary.layout, true, |p, _, _| {
            if busy {
                // With the session it used: a client's active sessions shape its logins' priors.
                p.key_done_in(key, response_ms.min(3_600_000), pd.sess.key, now_ms);
            }
            if let Some(i) = login {
                p.login(key, i, now_ms);
            }
        });
    }
}

/// The index in the request's peer list of the server that nginx's `sticky` (1.29.6+) names
/// for this request, if that server may take it (nginx's own test: not tried, not down but
/// for draining, not failed, not at max_conns); `None` without a hint.
///
/// # Safety
/// pc is the request's peer connection; the caller holds the lock of `pd.rrp.peers`.
#[cfg(ngx_upstream_sid)]
#[inline]
unsafe fn sticky_hint(pd: &mut PeerData, pc: *mut ngx_peer_connection_t) -> Option<usize> {
    // SAFETY: pc is live; hint is NULL or a string sticky's init_peer/get set for this try.
    let hint = unsafe { (*pc).hint };
    if hint.is_null() {
        return None;
    }
    let mut i: ngx_uint_t = 0;
    // SAFETY: rrp is this request's round-robin data, its list locked by the caller (lock 0:
    // nginx must not lock the peer again).
    let peer = unsafe { ngx::ffi::ngx_http_upstream_get_rr_peer_by_sid(&mut pd.rrp, hint, &mut i, 0) };
    (!peer.is_null()).then_some(i)
}

#[cfg(not(ngx_upstream_sid))]
#[inline]
unsafe fn sticky_hint(_pd: &mut PeerData, _pc: *mut ngx_peer_connection_t) -> Option<usize> {
    None
}

/// The choice among the backup servers, under the backup list's lock: for a request no
/// primary server can take (it then moves to the backup list, as with round robin), or one
/// already on it.
#[inline(never)]
unsafe fn get_backup(pd: &mut PeerData, pc: *mut ngx_peer_connection_t, state: &UpstreamState, gate: Gate, mut guard: Locked<Backup>, key: u64, now: i64) -> Result<Choice, ngx_int_t> {
    if guard.changed_since(&pd.rrp) {
        return Err(NGX_BUSY as ngx_int_t);
    }
    let (Some(group), Some(refs)) = (state.backup.as_ref(), state.backup_peers.as_ref()) else {
        return Err(NGX_BUSY as ngx_int_t);
    };
    let moving = !pd.on_backup;
    let number = guard.number();
    let list = guard.list;
    // Current when the generation did not change since the request's start (checked above):
    // the tables were built at that generation.
    let Some(peers) = guard.peers(refs) else { return Err(NGX_BUSY as ngx_int_t) };
    // Backups start with a clean tried bitmap when the request moves to them.
    let tried = if moving { ptr::null_mut() } else { pd.rrp.tried };
    // No slow start among backups.
    let mut bs = NginxServers { group, peers, tried, now, single: false, gate: Gate { slow_start_ms: 0, ..gate } };
    let req = Request::new(key, pd.movable);
    let Some(choice) = balancer::choose_backup(&req, Pick { ring: &group.ring, servers: &mut bs, bound: Bound::OFF }) else {
        return Err(NGX_BUSY as ngx_int_t);
    };
    if moving {
        // Move this request to the backup list, as round robin does.
        let words = number.div_ceil(usize::BITS as usize);
        for w in 0..words {
            // SAFETY: round robin sized the bitmap for the larger of the two lists.
            unsafe { *pd.rrp.tried.add(w) = 0 };
        }
        pd.rrp.peers = list;
        pd.on_backup = true;
    }
    // SAFETY: pc is the request's peer connection.
    match unsafe { take(pd, pc, &mut bs.peers, group, None, &choice, now) } {
        true => Ok(choice),
        false => Err(NGX_ERROR as ngx_int_t),
    }
}

/// Round robin's bookkeeping for the chosen peer, under its list's lock, and the try counted
/// in flight until `free`. `false` if `choice` names no peer of the list.
#[inline(always)]
unsafe fn take(
    pd: &mut PeerData,
    pc: *mut ngx_peer_connection_t,
    peers: &mut Peers<'_>,
    group: &Group,
    total: Option<&'static Slot>,
    choice: &Choice,
    now: i64,
) -> bool {
    let Some(best) = peers.get_mut(choice.server) else { return false };
    // The pointers given to nginx outlive the lock, as round robin's do: the reference taken
    // here (`refs`, 1.27.3+) keeps a peer that `resolve` removes alive until `free`, and
    // before 1.27.3 peers are never freed during a cycle.
    #[cfg(nginx1_27_3)]
    {
        best.refs += 1;
    }
    // SAFETY: pc is the request's peer connection.
    unsafe {
        (*pc).sockaddr = best.sockaddr;
        (*pc).socklen = best.socklen;
        (*pc).name = ptr::addr_of_mut!(best.name);
        // nginx's `sticky` learns (or sets its cookie for) the server chosen.
        #[cfg(ngx_upstream_sid)]
        {
            (*pc).sid = ptr::addr_of_mut!(best.sid);
        }
    }
    best.conns += 1;
    if now - best.checked > best.fail_timeout {
        best.checked = now;
    }
    pd.rrp.current = best;
    let bits = usize::BITS as usize;
    // SAFETY: the bitmap covers every peer of the list (see `usable`).
    unsafe { *pd.rrp.tried.add(choice.server / bits) |= 1 << (choice.server % bits) };

    // Count the try in flight until `free`.
    pd.counted = group.slots.get(choice.server).copied().flatten();
    pd.counted_total = total.is_some();
    if let Some(s) = pd.counted {
        s.start();
        s.count(match choice.route {
            Route::Sticky => Counter::Sticky,
            Route::Learned => Counter::Learned,
            Route::Spilled => Counter::SpilledIn,
            Route::Failover => Counter::Failover,
            Route::Backup => Counter::Backup,
            Route::Moved => Counter::Moved,
        });
    }
    if let Some(t) = total {
        t.start();
    }
    if let Some(home) = choice.from.and_then(|i| group.slots.get(i).copied().flatten()) {
        home.count(Counter::SpilledOut);
    }
    true
}

/// The request's session id, if it carries one (found again in its `Cookie` headers: rarely
/// needed, so not kept per request).
unsafe fn session_id<'a>(kcf: &SrvConf, pd: &PeerData) -> Option<&'a [u8]> {
    // SAFETY: pd.r is the live request.
    match session::request_session(unsafe { request_cookies(pd.r) }, kcf.session_cookie()) {
        RequestSession::Id(id) => Some(id),
        RequestSession::None => None,
    }
}

/// Records that the request's session now lives on server `id`, called `server` (locally
/// and, when routes are shared, in Redis). Called with no peer list locked.
#[cold]
#[inline(never)]
unsafe fn move_route(kcf: &SrvConf, pd: &PeerData, id: u64, server: &[u8]) {
    let (Some(zone), Some(sd)) = (kcf.routes_zone, pd.session()) else { return };
    let k = session_key_of(sd);
    let now = ngx_time();
    let timeout = kcf.routes_timeout();
    // SAFETY: zones are valid for the cycle.
    unsafe { shm::with_routes(zone, |t| t.insert(k, id, now, timeout)) };
    // SAFETY: pd.r is the live request; called from the event loop.
    unsafe {
        if let Some(sid) = session_id(kcf, pd) {
            crate::session_check::share_route(kcf, sid, server);
        }
    }
}

/// Whether the server a session would go to (its learned server, else its sticky one) is
/// near its load bound, so that knowing whether the session is shared can matter. Errs on
/// the side of "yes" when the tables are not ready. Reads the per-process tables only (no
/// peer: this runs before `get`, when the peers the tables were built from may be gone).
pub unsafe fn near_bound(kcf: &SrvConf, r: *mut ngx_http_request_t, learned: Option<u64>) -> bool {
    if let Some(z) = kcf.placement_zone {
        // Clients move only while placement is busy: only then can a shared session follow.
        // SAFETY: the zone is valid for the cycle.
        return unsafe { shm::placement_state(z, ngx::ffi::ngx_current_msec as u64) }.map_or(true, |(busy, _)| busy);
    }
    let factor = kcf.balance_factor();
    let Some(state) = kcf.state.as_deref() else { return true };
    if factor == 0 {
        return false;
    }
    let live_weight = state.live_weight.get();
    if !state.slots_ready || live_weight == 0 {
        return true;
    }
    // SAFETY: r is live; the key computation reads its connection or variables.
    let Some(key) = (unsafe { request_key(r, kcf) }) else { return true };
    let home = learned.and_then(|id| state.index_of(id)).or_else(|| state.primary.ring.owner(key));
    let Some(home) = home else { return false };
    let load = state.primary.slots.get(home).copied().flatten().map_or(0, |s| s.inflight());
    let weight = state.primary.weights.get(home).map_or(1, |&w| u64::from(w));
    let bound = Bound { factor_milli: factor, total: state.total.map_or(0, |t| t.inflight()), live_weight };
    // "Near": within a quarter of the bound.
    (load + 1) * 4 >= bound.limit(weight) * 3
}

/// Learns (or forgets) the session a response from the current server created; the
/// server's identity if the response created one (a login).
unsafe fn learn_session(pd: &PeerData) -> Option<u64> {
    // SAFETY: pd.r is the live request; its upstream headers were parsed from this server.
    unsafe {
        let Some(kcf) = pd.conf() else { return None };
        let Some(zone) = kcf.routes_zone else { return None };
        let u = (*pd.r).upstream;
        if u.is_null() || (*u).headers_in.status_n == 0 {
            return None;
        }
        let name = kcf.session_cookie();
        let Some(set) = response_set_cookies(u).find_map(|v| session::response_session(v, name))
        else {
            return None;
        };
        let now = ngx_time();
        let timeout = kcf.routes_timeout();
        let peer = key_hash((*pd.rrp.current).name.as_bytes());
        let request_session = pd.session().map(session_key_of);
        let set_key = match set {
            SetSession::Set(id) => shm::session_key(zone, &kcf.routes_keyer, session::KeyUse::Route, &kcf.name, id).map(u128::from),
            SetSession::Delete => None,
        };
        let evicted = shm::with_routes(zone, |t| {
            match (&set, set_key) {
                (SetSession::Set(_), Some(k)) => {
                    t.insert(k, peer, now, timeout);
                }
                (SetSession::Set(_), None) => {}
                (SetSession::Delete, _) => {
                    if let Some(k) = request_session {
                        t.remove(k);
                    }
                }
            }
            t.evictions_to_log(now, 60)
        })
        .flatten();
        if let (SetSession::Set(id), false) = (&set, pd.rrp.current.is_null()) {
            crate::session_check::share_route(kcf, id, (*pd.rrp.current).name.as_bytes());
        }
        if let Some(n) = evicted {
            ngx_log_error!(
                NGX_LOG_WARN,
                (*(*pd.r).connection).log,
                "kylin: upstream \"{}\": session routes zone \"{}\" is full, {} least recently used routes evicted; increase its size with \"kylin_session_routes\"",
                String::from_utf8_lossy(&kcf.name),
                (*zone).shm.name,
                n
            );
        }
        matches!(set, SetSession::Set(_)).then_some(peer)
    }
}

/// `peer.free`: uncount the try, learn a new session, then round robin's bookkeeping.
unsafe extern "C" fn free_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void, state: ngx_uint_t) {
    // SAFETY: data is our PeerData; rrp is its first field.
    unsafe {
        let pd = &mut *(data as *mut PeerData);
        if let Some(s) = pd.counted.take() {
            s.finish();
            if state & NGX_PEER_FAILED as ngx_uint_t != 0 {
                s.count(Counter::Failures);
            }
        }
        if core::mem::take(&mut pd.counted_total) {
            if let Some(t) = pd.conf().and_then(|c| c.state.as_ref()).and_then(|s| s.total) {
                t.finish();
            }
        }
        if !pd.rrp.current.is_null() && state & (NGX_PEER_FAILED as ngx_uint_t | NGX_PEER_NEXT) == 0 {
            let login = learn_session(pd);
            if !pd.on_backup && (core::mem::take(&mut pd.measure) || login.is_some()) {
                if let Some(kcf) = pd.conf() {
                    placement_learns(kcf, pd, login);
                }
            }
        }
        ngx_http_upstream_free_round_robin_peer(pc, ptr::addr_of_mut!(pd.rrp) as *mut c_void, state);
    }
}
