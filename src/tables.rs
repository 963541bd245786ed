//! Per-process tables of an upstream: the consistent-hash rings, server names, weights and
//! identities, and where each server's shared counters are, built from a [`Snapshot`] of
//! nginx's peer lists, and rebuilt when `resolve` changes them. Only `get` and `free` touch
//! nginx's peers; everything else reads these copies.

use core::cell::{Cell, Ref};

use ngx::ngx_log_error;
use ngx::ffi::NGX_LOG_ERR;

use crate::load::{self, Slot, Use};
use crate::ngx_ext::{failed, Backup, Locked, Names, PeerRefs, Peers, Primary, ProcessLocal, Snapshot};
use crate::ring::{key_hash, Ring};
use crate::health::Gate;
use crate::shm;

/// An upstream's tables in one process: `None` until first built.
pub type Tables = ProcessLocal<Option<Box<UpstreamState>>>;

/// One group of servers (primary or backup) as the balancer sees it: per-process copies only.
/// nginx's peers themselves are reached through a [`Locked`] guard of their list.
#[derive(Debug)]
pub struct Group {
    pub ring: Ring,
    /// Ring index -> the server's address as nginx prints it.
    pub names: Names,
    /// Ring index -> the server's `weight` (at least 1).
    pub weights: Vec<u32>,
    /// Ring index -> hash of the server's address: its identity in the route table.
    pub ids: Vec<u64>,
    /// Ring index -> the server's shared counters (resolved in each worker).
    pub slots: Vec<Option<&'static Slot>>,
    /// Ring index -> the server's health slot (health checks; resolved in each worker).
    pub health: Vec<Option<&'static Slot>>,
    /// Ring index -> the server's load-report slot (`kylin_load_report`; resolved in each
    /// worker, `None` without the directive).
    pub reports: Vec<Option<&'static Slot>>,
    /// Hash of the servers' names and weights in ring index order: what the shared client
    /// placement's tables must describe (see `shm::with_placement`).
    pub layout: u64,
}

impl Group {
    #[inline]
    pub fn weight(&self, i: usize) -> u64 {
        self.weights.get(i).map_or(1, |&w| u64::from(w))
    }
}

/// The per-process view of one upstream's servers.
#[derive(Debug)]
pub struct UpstreamState {
    /// The primary peers the tables were built from (the zone copy differs from the
    /// configuration's), and their generation.
    pub primary_peers: PeerRefs<Primary>,
    pub backup_peers: Option<PeerRefs<Backup>>,
    pub primary: Group,
    pub backup: Option<Group>,
    /// (server identity, primary ring index), sorted, for learned routes.
    pub by_id: Vec<(u64, usize)>,
    /// The upstream's in-flight total.
    pub total: Option<&'static Slot>,
    pub slots_ready: bool,
    /// Sum of the weights of live primary servers, refreshed once a second.
    pub live_weight: Cell<u64>,
    pub live_at: Cell<i64>,
}

impl UpstreamState {
    /// The primary ring index of the server with this identity.
    #[inline]
    pub fn index_of(&self, id: u64) -> Option<usize> {
        // A few servers (the usual upstream) are found faster by a scan than by a search.
        if self.by_id.len() <= 8 {
            return self.by_id.iter().find(|&&(k, _)| k == id).map(|&(_, i)| i);
        }
        self.by_id.binary_search_by_key(&id, |&(k, _)| k).ok().map(|j| self.by_id[j].1)
    }
}

/// Builds a group's tables (ring allocation and sort: no lock is held).
fn build_group<K>(s: Snapshot<K>) -> Result<(Group, PeerRefs<K>), String> {
    let ids = s.names.iter().map(key_hash).collect();
    let ring = Ring::new(s.names.iter().zip(s.weights.iter().copied())).map_err(|e| e.to_string())?;
    let slots = vec![None; s.weights.len()];
    let health = vec![None; s.weights.len()];
    let reports = vec![None; s.weights.len()];
    let mut id = Vec::with_capacity(s.names.bytes.len() + 5 * s.weights.len());
    for (name, w) in s.names.iter().zip(&s.weights) {
        id.extend_from_slice(name);
        id.push(0);
        id.extend_from_slice(&w.to_le_bytes());
    }
    let layout = key_hash(&id);
    Ok((Group { ring, names: s.names, weights: s.weights, ids, slots, health, reports, layout }, s.refs))
}

/// Builds the state from snapshots of the primary list and its backup list.
pub fn build_state(primary: Snapshot<Primary>, backup: Option<Snapshot<Backup>>) -> Result<UpstreamState, String> {
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
pub fn snapshot_lists(primary: Locked<Primary>) -> Result<(Snapshot<Primary>, Option<Snapshot<Backup>>), String> {
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

/// How many times `get` rebuilds the tables when the servers keep changing meanwhile.
const REBUILD_TRIES: usize = 3;

/// Makes sure the per-process tables describe the primary list as it is now (built lazily
/// with a zone, rebuilt when `resolve` changed the zone's peers) and point at the shared
/// counters, and borrows them. Takes the list's guard and gives it back. A rebuild copies the
/// peers under their locks (one list at a time), then builds and installs the tables with no
/// lock held (ring allocation and sort, the counters' lookup, dropping the old tables), then
/// locks again and checks that nothing changed meanwhile. `Err` with nothing locked.
///
/// # Safety
/// `guard` holds the primary list of the upstream whose tables `tables` are; `load_zone` is
/// the configuration's load zone and `name` the upstream's name; `reports`: it has
/// `kylin_load_report` (each server has a report slot).
#[inline(always)]
pub unsafe fn ensure_state<'t>(
    tables: &'t Tables,
    load_zone: *mut ngx::ffi::ngx_shm_zone_t,
    name: &[u8],
    reports: bool,
    guard: Locked<Primary>,
) -> Result<(Locked<Primary>, Ref<'t, UpstreamState>), String> {
    if let Some(t) = tables.get() {
        if let Ok(state) = Ref::filter_map(t, |t| t.as_deref().filter(|s| s.slots_ready && guard.current(&s.primary_peers))) {
            return Ok((guard, state));
        }
    }
    // SAFETY: this function's contract.
    let guard = unsafe { rebuild(tables, load_zone, name, reports, guard)? };
    match tables.get().and_then(|t| Ref::filter_map(t, |t| t.as_deref()).ok()) {
        Some(state) => Ok((guard, state)),
        None => {
            drop(guard);
            Err("no tables".into())
        }
    }
}

/// [`ensure_state`]'s rebuild, until the tables describe the list as it is when locked again
/// and point at the shared counters.
///
/// # Safety
/// As for [`ensure_state`].
#[cold]
#[inline(never)]
unsafe fn rebuild(tables: &Tables, load_zone: *mut ngx::ffi::ngx_shm_zone_t, name: &[u8], reports: bool, mut guard: Locked<Primary>) -> Result<Locked<Primary>, String> {
    let list = guard.list();
    let current = |guard: &Locked<Primary>| tables.get().is_some_and(|t| t.as_deref().is_some_and(|s| guard.current(&s.primary_peers)));
    let mut tries = 0;
    while !current(&guard) {
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
            unsafe { point_at_counters(load_zone, name, reports, &mut state) };
            if !tables.set(Some(Box::new(state))) {
                return Err("the tables are in use".into());
            }
        }
        // SAFETY: list is the primary list the caller's guard held (this function's contract).
        guard = unsafe { Locked::primary(list) };
    }
    // Tables not pointed at the counters yet (those built at configuration time, used as
    // they are when the configuration's peers are the ones in use, e.g. without a zone)
    // point at them on first use, with the guard held as for any rebuild.
    let ready = tables.get().is_some_and(|t| t.as_deref().is_some_and(|s| s.slots_ready));
    if !ready {
        let pointed = tables.with_mut(|t| {
            if let Some(s) = t.as_deref_mut() {
                // SAFETY: the load zone is valid for the cycle.
                unsafe { point_at_counters(load_zone, name, reports, s) };
            }
        });
        if pointed.is_none() {
            drop(guard);
            return Err("the tables are in use".into());
        }
    }
    Ok(guard)
}

/// Points the state's servers at their shared counters (slots claimed by name in the load
/// zone: no peer is read).
#[cold]
#[inline(never)]
unsafe fn point_at_counters(load_zone: *mut ngx::ffi::ngx_shm_zone_t, name: &[u8], reports: bool, state: &mut UpstreamState) {
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
                    if reports {
                        g.reports[i] = table.claim(load::report_key(name, server), Use::Counts, generation);
                    }
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
pub fn live_weight(group: &Group, peers: &Peers<'_>, now: i64, gate: Gate) -> u64 {
    group
        .weights
        .iter()
        .enumerate()
        .filter(|&(i, _)| peers.get(i).is_some_and(|p| p.down == 0 && !failed(p, now)) && gate.live(group.health.get(i).copied().flatten()))
        .map(|(_, &w)| u64::from(w))
        .sum()
}
