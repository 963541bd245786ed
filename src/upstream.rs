//! Peer callbacks: the nginx side of the balancer.
//!
//! nginx's round-robin module keeps the peer list and all per-peer bookkeeping (`conns`,
//! `fails`, `checked`, the request's `tried` bitmap, the shared `zone` copy); we reuse it
//! unchanged and replace only the choice. `init_upstream` builds the consistent-hash rings,
//! `init_peer` computes the request's key, `get` asks [`crate::balancer::choose`] and then
//! does the same bookkeeping as nginx's own `hash ... consistent` balancer, and `free` is
//! round robin's.

use core::ffi::c_void;
use core::ptr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ngx::ffi::{
    ngx_conf_t, ngx_http_request_t, ngx_http_upstream_free_round_robin_peer,
    ngx_http_upstream_init_round_robin, ngx_http_upstream_init_round_robin_peer,
    ngx_http_upstream_rr_peer_data_t, ngx_http_upstream_rr_peer_t, ngx_http_upstream_rr_peers_t,
    ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_palloc, ngx_peer_connection_t, ngx_rwlock_unlock,
    ngx_rwlock_wlock, ngx_time, ngx_uint_t, sockaddr_in, sockaddr_in6, NGX_BUSY, NGX_ERROR,
    NGX_LOG_EMERG, NGX_LOG_ERR, NGX_OK,
};
// Used by ngx_log_debug_mask!, which expands to nothing unless nginx is built --with-debug.
#[allow(unused_imports)]
use ngx::log::DebugMask;
use ngx::{ngx_conf_log_error, ngx_log_debug_mask, ngx_log_error};

use crate::balancer::{self, Choice, Route, Servers};
use crate::conf::{srv_conf, SrvConf};
use crate::key::client_key;
use crate::ring::{key_hash, Ring};

/// One group of servers (primary or backup) as the balancer sees it.
#[derive(Debug)]
pub struct Group {
    ring: Ring,
    /// Ring index -> nginx peer, in list order.
    peers: Vec<*mut ngx_http_upstream_rr_peer_t>,
}

/// The per-process view of one upstream's servers.
#[derive(Debug)]
pub struct UpstreamState {
    /// The peer list the tables were built from (the zone copy differs from the config one).
    source: *mut ngx_http_upstream_rr_peers_t,
    /// `*peers->config` when built (changes when `resolve` updates a zone's peers).
    config: ngx_uint_t,
    primary: Group,
    backup: Option<Group>,
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

/// Whether the zone's peers changed since this request's round-robin data was set up
/// (round robin answers NGX_BUSY then, and so do we).
#[cfg(nginx1_27_3)]
unsafe fn config_changed(rrp: &ngx_http_upstream_rr_peer_data_t, peers: *mut ngx_http_upstream_rr_peers_t) -> bool {
    // SAFETY: peers is valid; config is NULL or points into the same zone.
    unsafe { (*peers).config.as_ref().is_some_and(|&c| c != rrp.config) }
}

#[cfg(not(nginx1_27_3))]
unsafe fn config_changed(_rrp: &ngx_http_upstream_rr_peer_data_t, _peers: *mut ngx_http_upstream_rr_peers_t) -> bool {
    false
}

/// Builds a group from an nginx peer list. The caller holds the list's lock if it is shared.
unsafe fn build_group(peers: *mut ngx_http_upstream_rr_peers_t) -> Result<Group, String> {
    let mut list = Vec::new();
    let mut ids: Vec<(&[u8], u32)> = Vec::new();
    // SAFETY: peers is a valid list; its peers live as long as the list.
    unsafe {
        let mut p = (*peers).peer;
        while !p.is_null() {
            list.push(p);
            ids.push(((*p).name.as_bytes(), (*p).weight.clamp(1, u32::MAX as ngx_int_t) as u32));
            p = (*p).next;
        }
    }
    let ring = Ring::new(ids).map_err(|e| e.to_string())?;
    Ok(Group { ring, peers: list })
}

/// Builds the state for `peers` (primary list, with backups in `peers->next`).
unsafe fn build_state(peers: *mut ngx_http_upstream_rr_peers_t) -> Result<UpstreamState, String> {
    // SAFETY: peers is a valid round-robin peer list.
    unsafe {
        let primary = build_group(peers)?;
        let next = (*peers).next;
        let backup = if next.is_null() { None } else { Some(build_group(next)?) };
        let config = peers_config(peers);
        Ok(UpstreamState { source: peers, config, primary, backup })
    }
}

/// `peer.init_upstream`: round robin's setup, then our rings.
pub unsafe extern "C" fn init_upstream(
    cf: *mut ngx_conf_t,
    us: *mut ngx_http_upstream_srv_conf_t,
) -> ngx_int_t {
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

        // With a zone, peers are copied to shared memory after this point: each worker builds
        // its tables from that copy on first use. Without one, build them now, so that a
        // configuration error shows in `nginx -t` and workers inherit the tables.
        let peers = (*us).peer.data as *mut ngx_http_upstream_rr_peers_t;
        match build_state(peers) {
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
#[repr(C)]
struct PeerData {
    rrp: ngx_http_upstream_rr_peer_data_t,
    conf: *mut SrvConf,
    key: u64,
    /// This request moved to the backup servers.
    on_backup: bool,
}

/// The stickiness key of a request: its client address (after realip).
unsafe fn request_key(r: *mut ngx_http_request_t) -> u64 {
    // SAFETY: r and its connection are valid during the request; sockaddr matches its family.
    unsafe {
        let c = (*r).connection;
        let sa = (*c).sockaddr;
        let addr = match (*sa).sa_family as i32 {
            libc::AF_INET => {
                let sin = sa as *const sockaddr_in;
                IpAddr::V4(Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr)))
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

/// `peer.init`: per request.
unsafe extern "C" fn init_peer(
    r: *mut ngx_http_request_t,
    us: *mut ngx_http_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: nginx passes a valid request with an upstream, and the upstream it uses.
    unsafe {
        let Some(kcf) = srv_conf(us) else { return NGX_ERROR as ngx_int_t };
        let pd = ngx_palloc((*r).pool, core::mem::size_of::<PeerData>()) as *mut PeerData;
        if pd.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        ptr::addr_of_mut!((*pd).conf).write(kcf);
        ptr::addr_of_mut!((*pd).key).write(request_key(r));
        ptr::addr_of_mut!((*pd).on_backup).write(false);

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

/// nginx's view of whether a peer may take this request: the same tests as its own
/// round-robin and hash balancers.
struct NginxServers<'a> {
    group: &'a Group,
    tried: *mut usize,
    now: i64,
    /// A single server without backups is always tried (as round robin does).
    single: bool,
}

impl Servers for NginxServers<'_> {
    #[inline]
    fn usable(&mut self, i: usize) -> bool {
        let bits = usize::BITS as usize;
        // SAFETY: the tried bitmap covers every peer of the group; the peer pointers are valid
        // while the caller holds the peers lock.
        unsafe {
            if !self.tried.is_null() && *self.tried.add(i / bits) & (1 << (i % bits)) != 0 {
                return false;
            }
            let p = &*self.group.peers[i];
            if p.down != 0 {
                return false;
            }
            if p.max_conns != 0 && p.conns >= p.max_conns {
                return false;
            }
            if !self.single
                && p.max_fails != 0
                && p.fails >= p.max_fails
                && self.now - p.checked as i64 <= p.fail_timeout as i64
            {
                return false;
            }
        }
        true
    }
}

struct PeersLock(*mut ngx_http_upstream_rr_peers_t);

impl PeersLock {
    /// Takes the write lock of a zone-shared peer list (no-op without a zone), as round robin
    /// does in `get`.
    unsafe fn wlock(peers: *mut ngx_http_upstream_rr_peers_t) -> PeersLock {
        // SAFETY: peers is valid; rwlock lives in the same (shared) memory.
        unsafe {
            if !(*peers).shpool.is_null() {
                ngx_rwlock_wlock(ptr::addr_of_mut!((*peers).rwlock));
            }
        }
        PeersLock(peers)
    }
}

impl Drop for PeersLock {
    fn drop(&mut self) {
        // SAFETY: we took this lock in `wlock`.
        unsafe {
            if !(*self.0).shpool.is_null() {
                ngx_rwlock_unlock(ptr::addr_of_mut!((*self.0).rwlock));
            }
        }
    }
}

/// Makes sure the per-process tables describe `peers` (built lazily with a zone, rebuilt when
/// `resolve` changed the zone's peers). Called with the peers lock held.
unsafe fn ensure_state(kcf: &mut SrvConf, peers: *mut ngx_http_upstream_rr_peers_t) -> Result<(), String> {
    // SAFETY: peers is the valid primary list; config points into the same memory.
    unsafe {
        let config = peers_config(peers);
        let fresh = matches!(&kcf.state, Some(s) if s.source == peers && s.config == config);
        if !fresh {
            kcf.state = Some(Box::new(build_state(peers)?));
        }
    }
    Ok(())
}

/// `peer.get`
unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: data is the PeerData set up in init_peer; pc is the request's peer connection.
    unsafe {
        let pd = &mut *(data as *mut PeerData);
        (*pc).set_cached(0);
        (*pc).connection = ptr::null_mut();

        // `rrp.peers` is the primary list, or the backup list once a backup was chosen (then
        // this request stays on backups, as with round robin).
        let peers = pd.rrp.peers;
        let _lock = PeersLock::wlock(peers);

        if config_changed(&pd.rrp, peers) {
            (*pc).name = (*peers).name;
            return NGX_BUSY as ngx_int_t;
        }

        let kcf = &mut *pd.conf;
        if !pd.on_backup {
            if let Err(e) = ensure_state(kcf, peers) {
                ngx_log_error!(NGX_LOG_ERR, (*pc).log, "kylin: upstream \"{}\": {}", *(*peers).name, e);
                (*pc).name = (*peers).name;
                return NGX_ERROR as ngx_int_t;
            }
        }
        let Some(state) = kcf.state.as_deref() else { return NGX_ERROR as ngx_int_t };
        let now = ngx_time();
        let tried = pd.rrp.tried;

        let choice = match (&state.backup, pd.on_backup) {
            (Some(b), true) => {
                let mut bs = NginxServers { group: b, tried, now, single: false };
                balancer::choose(pd.key, (&b.ring, &mut bs), None::<(&Ring, &mut NginxServers)>)
                    .map(|c| Choice { backup: true, route: Route::Backup, ..c })
            }
            (None, true) => None,
            (backup, false) => {
                let single = (*peers).single() != 0;
                let mut ps = NginxServers { group: &state.primary, tried, now, single };
                // Backups start with a clean tried bitmap when the request moves to them.
                let mut bs = backup.as_ref().map(|b| NginxServers { group: b, tried: ptr::null_mut(), now, single: false });
                let b = backup.as_ref().zip(bs.as_mut()).map(|(g, s)| (&g.ring, s));
                balancer::choose(pd.key, (&state.primary.ring, &mut ps), b)
            }
        };

        let Some(choice) = choice else {
            (*pc).name = (*peers).name;
            return NGX_BUSY as ngx_int_t;
        };

        let (group, list) = if choice.backup {
            let Some(b) = state.backup.as_ref() else { return NGX_ERROR as ngx_int_t };
            (b, if pd.on_backup { peers } else { (*peers).next })
        } else {
            (&state.primary, peers)
        };
        if choice.backup && !pd.on_backup {
            // Move this request to the backup list, as round robin does.
            let words = (*list).number.div_ceil(usize::BITS as usize);
            for w in 0..words {
                *tried.add(w) = 0;
            }
            pd.rrp.peers = list;
            pd.on_backup = true;
        }

        let best = group.peers[choice.server];
        pd.rrp.current = best;
        #[cfg(nginx1_27_3)]
        {
            (*best).refs += 1;
        }
        (*pc).sockaddr = (*best).sockaddr;
        (*pc).socklen = (*best).socklen;
        (*pc).name = ptr::addr_of_mut!((*best).name);
        (*best).conns += 1;
        if now - (*best).checked > (*best).fail_timeout {
            (*best).checked = now;
        }
        let bits = usize::BITS as usize;
        *tried.add(choice.server / bits) |= 1 << (choice.server % bits);

        ngx_log_debug_mask!(
            DebugMask::Http,
            (*pc).log,
            "kylin peer: {} route: {}",
            (*best).name,
            choice.route.as_str()
        );
    }
    NGX_OK as ngx_int_t
}

/// `peer.free`: round robin's bookkeeping (conns, fails, tries).
unsafe extern "C" fn free_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void, state: ngx_uint_t) {
    // SAFETY: data is our PeerData; rrp is its first field.
    unsafe {
        let pd = data as *mut PeerData;
        ngx_http_upstream_free_round_robin_peer(pc, ptr::addr_of_mut!((*pd).rrp) as *mut c_void, state);
    }
}
