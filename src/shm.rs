//! Shared memory zones: the load counters (one module-wide zone, `kylin_load`), the learned
//! session routes (`kylin_session_routes zone=...`, or the default zone) and each upstream's
//! client placement (`kylin_placement:NAME`, with `kylin_balance clients`). Thin glue around
//! [`crate::load`] and [`crate::routes`].
//!
//! Zones are reused across `nginx -s reload` when their name and size stay the same, so
//! counters and learned routes survive a reload; nginx creates a fresh zone otherwise.

use core::cell::Cell;
use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_pagesize, ngx_shared_memory_add, ngx_shm_zone_t,
    ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t, NGX_LOG_EMERG, NGX_LOG_ERR, NGX_LOG_NOTICE,
};
use ngx::core::{SlabPool, Status};
use ngx::ngx_log_error;

use crate::load::{self, LoadTable, Slot, Use};
use crate::placement::{KeyEntry, Params, Placement, ServerLoad};
use crate::routes::{self, RecentRoutes, RouteTable};
use crate::session::{KeyUse, SessionKeyer};

/// The module's tag for its shared zones.
fn tag() -> *mut c_void {
    ptr::addr_of_mut!(crate::ngx_http_kylin_upstream_module) as *mut c_void
}

// ---------------------------------------------------------------------------------------------
// Load counters

/// Name of the module-wide load zone.
pub const LOAD_ZONE: &str = "kylin_load";

/// Minimum size of the load zone; it grows with the number of servers.
const LOAD_ZONE_MIN: usize = 1 << 20;

/// The load zone of the configuration being parsed, and the slots it must hold.
static LOAD_ZONE_PTR: AtomicPtr<ngx_shm_zone_t> = AtomicPtr::new(ptr::null_mut());
static LOAD_SLOTS_NEEDED: AtomicUsize = AtomicUsize::new(0);
/// The keys the configuration being parsed uses (collected by `init_upstream`, claimed and
/// stamped when the zone is set up; see [`crate::load`] on generations).
static LOAD_KEYS: Mutex<Vec<(u64, Use)>> = Mutex::new(Vec::new());
/// Keys of slots whose state must not outlive their server's removal (health slots): cleared
/// when the running configuration does not name them (see `LoadTable::reset_stale`).
static FRESH_KEYS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[repr(C)]
struct LoadRegion {
    magic: u64,
    nslots: u64,
    header: load::Header,
    // followed by `nslots` Slot
}

/// Version 2: slots carry a generation stamp, the header generations and statistics.
const LOAD_MAGIC: u64 = 0x6b796c_696e_6c64_02;

/// Called at the start of each configuration's http block.
pub fn reset_for_new_configuration() {
    LOAD_ZONE_PTR.store(ptr::null_mut(), Ordering::Relaxed);
    LOAD_SLOTS_NEEDED.store(0, Ordering::Relaxed);
    load_keys().clear();
    fresh_keys().clear();
}

fn fresh_keys() -> std::sync::MutexGuard<'static, Vec<u64>> {
    // As load_keys.
    FRESH_KEYS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Notes slots of the configuration whose state a configuration without them must not leave
/// behind (see [`FRESH_KEYS`]); also claims them as counting slots.
pub fn note_fresh_keys(keys: impl IntoIterator<Item = u64>) {
    let keys: Vec<u64> = keys.into_iter().collect();
    load_keys().extend(keys.iter().map(|&k| (k, Use::Counts)));
    fresh_keys().extend(keys);
}

fn load_keys() -> std::sync::MutexGuard<'static, Vec<(u64, Use)>> {
    // Only the master's configuration code uses it, one thread: a poisoned lock still holds
    // a usable list.
    LOAD_KEYS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Notes the keys of an upstream's slots: the zone setup claims them and stamps them with
/// the configuration's generation, so that they are not reclaimed while it runs.
pub fn note_load_keys(keys: impl IntoIterator<Item = (u64, Use)>) {
    load_keys().extend(keys);
}

/// Declares the load zone (once per configuration) and reserves `slots` in it.
pub unsafe fn load_zone(cf: *mut ngx_conf_t, slots: usize) -> Option<*mut ngx_shm_zone_t> {
    LOAD_SLOTS_NEEDED.fetch_add(slots, Ordering::Relaxed);
    let z = LOAD_ZONE_PTR.load(Ordering::Relaxed);
    if !z.is_null() {
        return Some(z);
    }
    let mut name = ngx_str_t { len: LOAD_ZONE.len(), data: LOAD_ZONE.as_ptr() as *mut u8 };
    // SAFETY: cf is valid during configuration; size 0 is set in `size_load_zone`.
    let z = unsafe { ngx_shared_memory_add(cf, &mut name, 0, tag()) };
    if z.is_null() {
        return None;
    }
    // SAFETY: z was just returned by nginx.
    unsafe {
        (*z).init = Some(init_load_zone);
        (*z).data = ptr::null_mut();
    }
    LOAD_ZONE_PTR.store(z, Ordering::Relaxed);
    Some(z)
}

/// Sizes the load zone after every upstream reserved its slots (postconfiguration). The size
/// is rounded up to whole megabytes so that small changes keep the zone (and its counters)
/// across reloads.
pub unsafe fn size_load_zone() {
    let z = LOAD_ZONE_PTR.load(Ordering::Relaxed);
    if z.is_null() {
        return;
    }
    let slots = LOAD_SLOTS_NEEDED.load(Ordering::Relaxed).max(64) * 4;
    let bytes = (slots * core::mem::size_of::<Slot>()).saturating_add(256 * 1024);
    let size = bytes.max(LOAD_ZONE_MIN).next_multiple_of(LOAD_ZONE_MIN);
    // SAFETY: the zone is not created yet; nginx reads shm.size when it creates it.
    unsafe { (*z).shm.size = size };
}

/// Largest block the slab allocator of a fresh zone can hand out, in bytes.
unsafe fn largest_alloc(shpool: *mut ngx_slab_pool_t) -> usize {
    // SAFETY: shpool is a freshly initialised slab pool.
    unsafe { (*shpool).pfree.saturating_sub(1) * ngx_pagesize }
}

unsafe extern "C" fn init_load_zone(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx calls zone init (in the master, or the single process) with a valid zone;
    // `data` is the previous cycle's data for a reused zone: a region allocated in an earlier
    // cycle, which starts with `magic` in every version.
    unsafe {
        if !data.is_null() {
            // A zone kept across a reload (same name, size and tag: this very build made it).
            // Another layout would mean something else wrote it: refuse rather than guess,
            // since the running workers keep using it.
            if (*(data as *const LoadRegion)).magic != LOAD_MAGIC {
                ngx_log_error!(NGX_LOG_EMERG, (*zone).shm.log, "kylin: zone \"{}\" does not hold load counters of this module version; restart nginx", (*zone).shm.name);
                return Status::NGX_ERROR.into();
            }
            (*zone).data = data;
        } else {
            let shpool = (*zone).shm.addr as *mut ngx_slab_pool_t;
            let bytes = largest_alloc(shpool);
            let nslots = bytes.saturating_sub(core::mem::size_of::<LoadRegion>()) / core::mem::size_of::<Slot>();
            let p = ngx_slab_alloc(shpool, bytes) as *mut LoadRegion;
            if p.is_null() || nslots == 0 {
                ngx_log_error!(NGX_LOG_EMERG, (*zone).shm.log, "kylin: cannot allocate the \"{}\" zone", LOAD_ZONE);
                return Status::NGX_ERROR.into();
            }
            // All-zero bytes are a valid header and valid empty slots (atomics only).
            ptr::write_bytes(p as *mut u8, 0, bytes);
            (*p).magic = LOAD_MAGIC;
            (*p).nslots = nslots as u64;
            (*zone).data = p as *mut c_void;
        }
        // The new configuration's generation: stamp and claim its slots, reclaim unused ones.
        let keys = core::mem::take(&mut *load_keys());
        let fresh = core::mem::take(&mut *fresh_keys());
        // A reload (the zone kept): servers that are new to the running configuration begin
        // their slow start now (`kylin_slow_start`).
        let reload = !data.is_null();
        let now_ms = crate::health::unix_ms();
        let Some(prepared) = with_load_claims(zone, |t| {
            let mut added = Vec::new();
            for &k in &fresh {
                if (t.find(k).is_none() || t.reset_stale(k)) && reload {
                    added.push(k);
                }
            }
            let p = t.prepare(&keys);
            for k in added {
                if let Some(s) = t.find(k) {
                    s.cell(crate::health::cell::RAMP_MS).store(now_ms, Ordering::Relaxed);
                }
            }
            (p, t.capacity())
        }) else {
            return Status::NGX_ERROR.into();
        };
        let (p, capacity) = prepared;
        if p.reclaimed > 0 {
            ngx_log_error!(NGX_LOG_NOTICE, (*zone).shm.log, "kylin: zone \"{}\": {} slots of servers no longer configured reclaimed", LOAD_ZONE, p.reclaimed);
        }
        if p.failed > 0 {
            ngx_log_error!(
                NGX_LOG_ERR,
                (*zone).shm.log,
                "kylin: zone \"{}\" is full ({} slots): {} load counters of this configuration have none, so the load of their servers is not counted and the bound does not apply to them; {}",
                LOAD_ZONE,
                capacity,
                p.failed,
                FULL_FIX
            );
        }
    }
    Status::NGX_OK.into()
}

/// What to do about a full load zone, for error messages.
pub const FULL_FIX: &str = "slots of servers no longer configured are reclaimed at the second reload after their removal, once no request of an older configuration is in flight on them; restart nginx to start with an empty zone";

/// The load table of a zone, once nginx has created it: for finding slots and counting,
/// which need no lock. Claims go through [`with_load_claims`] or [`load_slot`].
pub unsafe fn load_table(zone: *mut ngx_shm_zone_t) -> Option<LoadTable<'static>> {
    // SAFETY: zone is valid for the cycle; data points at a LoadRegion in shared memory that
    // lives as long as the zone (init_load_zone checked its magic), followed by nslots Slots
    // formatted as all-zero bytes (valid atomics) and since only changed through atomics.
    unsafe {
        let r = zone.as_ref()?.data as *const LoadRegion;
        if r.is_null() || (*r).magic != LOAD_MAGIC {
            return None;
        }
        let slots = r.add(1) as *const Slot;
        Some(LoadTable::new(&(*r).header, core::slice::from_raw_parts(slots, (*r).nslots as usize)))
    }
}

/// Runs `f` on the zone's load table with its mutex held, which serialises claims and
/// sweeps (see [`crate::load`]). `None` if the zone is not ready.
pub unsafe fn with_load_claims<R>(zone: *mut ngx_shm_zone_t, f: impl FnOnce(&LoadTable<'static>) -> R) -> Option<R> {
    // SAFETY: as in load_table; the zone's slab pool header (with its mutex) is at shm.addr,
    // initialised by nginx when it created the zone and inherited by every worker.
    unsafe {
        let t = load_table(zone)?;
        let _locked = SlabPool::from_shm_zone(&*zone)?.lock();
        Some(f(&t))
    }
}

/// The slot of `key`: found without a lock (the usual case: the configuration's keys are
/// claimed when nginx sets it up), else claimed with the zone's mutex held and stamped with
/// the running configuration's generation. `None` if the zone is not ready or full.
pub unsafe fn load_slot(zone: *mut ngx_shm_zone_t, key: u64, use_: Use) -> Option<&'static Slot> {
    // SAFETY: zone is valid for the cycle (the caller's contract).
    unsafe {
        load_table(zone)?
            .find(key)
            .or_else(|| with_load_claims(zone, |t| t.claim(key, use_, t.committed())).flatten())
    }
}

/// Records that the configuration nginx just set up runs (`init_module`, reached only by a
/// cycle that is committed): its generation becomes the one slots are kept for.
pub unsafe fn commit_load_zone(cycle: *mut ngx::ffi::ngx_cycle_t) {
    // SAFETY: cycle is the new cycle; its shared_memory list holds ngx_shm_zone_t elements,
    // every one set up (zone init ran) before init_module.
    unsafe {
        let mut part: *const ngx::ffi::ngx_list_part_t = ptr::addr_of!((*cycle).shared_memory.part);
        while let Some(p) = part.as_ref() {
            let zones = core::slice::from_raw_parts(p.elts as *const ngx_shm_zone_t, p.nelts);
            for z in zones {
                if z.tag == tag() && z.shm.name.as_bytes() == LOAD_ZONE.as_bytes() {
                    if let Some(t) = load_table(z as *const ngx_shm_zone_t as *mut ngx_shm_zone_t) {
                        // Only the master begins generations, so the newest is this cycle's.
                        t.commit(t.generation());
                    }
                }
            }
            part = p.next;
        }
    }
}

/// The load zone's statistics, for the status page.
pub unsafe fn load_report(zone: *mut ngx_shm_zone_t) -> Option<crate::report::LoadZoneReport> {
    // SAFETY: zone is valid for the cycle.
    let t = unsafe { load_table(zone)? };
    Some(crate::report::LoadZoneReport {
        zone: LOAD_ZONE.to_string(),
        capacity: t.capacity() as u64,
        slots_used: t.used() as u64,
        claims_failed: t.claims_failed(),
        reclaimed: t.reclaimed(),
        generation: t.committed(),
    })
}

// ---------------------------------------------------------------------------------------------
// Session routes

/// Default session routes zone, used by upstreams without `kylin_session_routes`.
pub const DEFAULT_ROUTES_ZONE: &str = "kylin_session_routes";
pub const DEFAULT_ROUTES_SIZE: usize = 4 << 20;
/// Smallest zone `kylin_session_routes` accepts.
pub const MIN_ROUTES_SIZE: usize = 64 * 1024;

#[repr(C)]
struct RoutesRegion {
    magic: u64,
    len: u64,
    /// Where the table's parts lie in the `len` bytes that follow, formatted by RouteTable.
    layout: routes::Layout,
    /// The table's change count ([`RouteTable::changes`]) as of the last time its lock was
    /// released, for reading without the lock ([`lookup_route`]).
    changes: AtomicU64,
    /// Lookups answered from a worker's recent routes (the table's `hits` counts the others);
    /// on a cache line of its own, so that counting them does not take from every worker the
    /// line it reads `changes` from.
    recent_hits: CacheLine<AtomicU64>,
}

#[repr(C, align(64))]
struct CacheLine<T>(T);

/// Version 2 added `layout`, version 3 `changes` and `recent_hits`.
const ROUTES_MAGIC: u64 = 0x6b796c_696e_7273_03;

/// Declares (or finds) a session routes zone.
pub unsafe fn routes_zone(cf: *mut ngx_conf_t, name: &mut ngx_str_t, size: usize) -> Option<*mut ngx_shm_zone_t> {
    // SAFETY: cf is valid during configuration.
    let z = unsafe { ngx_shared_memory_add(cf, name, size, tag()) };
    if z.is_null() {
        return None;
    }
    // SAFETY: z was just returned by nginx.
    unsafe {
        (*z).init = Some(init_routes_zone);
    }
    Some(z)
}

fn random_secret() -> [u64; 2] {
    let mut b = [0u8; 16];
    // SAFETY: b is a valid writable buffer of 16 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut c_void, b.len(), 0) };
    if n != 16 {
        // getrandom cannot fail for 16 bytes after boot; fall back to time and pid.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return [t, u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15];
    }
    [
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    ]
}

unsafe extern "C" fn init_routes_zone(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: as in init_load_zone.
    unsafe {
        if !data.is_null() {
            // A zone kept across a reload. nginx keeps a zone only for the same tag (the
            // address of this module's structure), so it was made by this very build; another
            // layout would mean something else wrote it: refuse rather than guess (the old
            // workers are still using it).
            if (*(data as *const RoutesRegion)).magic != ROUTES_MAGIC {
                ngx_log_error!(NGX_LOG_EMERG, (*zone).shm.log, "kylin: zone \"{}\" does not hold session routes of this module version; restart nginx", (*zone).shm.name);
                return Status::NGX_ERROR.into();
            }
            (*zone).data = data;
            return Status::NGX_OK.into();
        }
        let shpool = (*zone).shm.addr as *mut ngx_slab_pool_t;
        let bytes = largest_alloc(shpool);
        let p = ngx_slab_alloc(shpool, bytes) as *mut RoutesRegion;
        if p.is_null() {
            ngx_log_error!(NGX_LOG_EMERG, (*zone).shm.log, "kylin: cannot allocate session routes in zone \"{}\"", (*zone).shm.name);
            return Status::NGX_ERROR.into();
        }
        let len = bytes.saturating_sub(core::mem::size_of::<RoutesRegion>());
        let region = core::slice::from_raw_parts_mut(p.add(1) as *mut u8, len);
        let layout = match RouteTable::format(region, random_secret()) {
            Ok(t) => t.layout(),
            Err(e) => {
                ngx_log_error!(NGX_LOG_EMERG, (*zone).shm.log, "kylin: zone \"{}\": {}", (*zone).shm.name, e);
                return Status::NGX_ERROR.into();
            }
        };
        p.write(RoutesRegion { magic: ROUTES_MAGIC, len: len as u64, layout, changes: AtomicU64::new(0), recent_hits: CacheLine(AtomicU64::new(0)) });
        (*zone).data = p as *mut c_void;
    }
    Status::NGX_OK.into()
}

/// The secret of a zone's route table, read without the lock (it never changes once the
/// table is formatted). `None` if the zone is not ready (or not a routes zone).
pub unsafe fn routes_secret(zone: *mut ngx_shm_zone_t) -> Option<[u64; 2]> {
    // SAFETY: zone is valid for the cycle; its data is a RoutesRegion in shared memory whose
    // table header (magic and secret) was written before any worker started and is never
    // written again; only those two fields are read, through raw pointers, so no reference
    // covers the header fields other workers update under the lock.
    unsafe {
        let z = zone.as_ref()?;
        let r = z.data as *const RoutesRegion;
        if r.is_null() || (*r).magic != ROUTES_MAGIC || ((*r).len as usize) < routes::SECRET_OFFSET + 16 {
            return None;
        }
        let base = r.add(1) as *const u8;
        if !routes::is_table(ptr::read(base.add(routes::MAGIC_OFFSET) as *const u64)) {
            return None;
        }
        Some(ptr::read(base.add(routes::SECRET_OFFSET) as *const [u64; 2]))
    }
}

/// The table key of session `id` of an upstream in `zone`, for a table of `key_use`, with the
/// upstream's key derivation cached in `cache` (per worker; derived again if the zone's secret
/// differs).
pub unsafe fn session_key(
    zone: *mut ngx_shm_zone_t,
    cache: &Cell<Option<SessionKeyer>>,
    key_use: KeyUse,
    upstream: &[u8],
    id: &[u8],
) -> Option<u64> {
    // SAFETY: as in routes_secret.
    let secret = unsafe { routes_secret(zone)? };
    let keyer = match cache.get() {
        Some(k) if k.is_for(secret, key_use) => k,
        _ => {
            let k = SessionKeyer::new(secret, key_use, upstream);
            cache.set(Some(k));
            k
        }
    };
    Some(keyer.key(id))
}

/// The statistics of a zone's table (learned routes or cached answers).
pub unsafe fn table_report(zone: *mut ngx_shm_zone_t) -> Option<crate::report::TableReport> {
    // SAFETY: zone is valid for the cycle (as in with_routes); its name is nginx's copy.
    unsafe {
        let recent_hits = routes_region(zone)?.recent_hits.0.load(Ordering::Relaxed);
        with_routes(zone, |t| {
            let h = t.header();
            crate::report::TableReport {
                zone: String::from_utf8_lossy((*zone).shm.name.as_bytes()).into_owned(),
                entries: t.len() as u64,
                capacity: t.capacity() as u64,
                hits: h.hits + recent_hits,
                misses: h.misses,
                inserts: h.inserts,
                evictions: h.evictions,
                expired: h.expired,
            }
        })
    }
}

/// A routes zone's region, if the zone is ready (and a routes zone).
#[inline(always)]
unsafe fn routes_region<'z>(zone: *mut ngx_shm_zone_t) -> Option<&'z RoutesRegion> {
    // SAFETY: zone is valid for the cycle; its data, once set, is a RoutesRegion in shared
    // memory, whose fields other than the atomics are written once, before any worker started.
    unsafe {
        let r = (zone.as_ref()?.data as *const RoutesRegion).as_ref()?;
        (r.magic == ROUTES_MAGIC).then_some(r)
    }
}

/// The route of `key` (a table key of [`session_key`]) as [`RouteTable::lookup_noting`] finds
/// it (`share`: see there): from this worker's `recent` routes while they still hold the
/// table's answer (see [`RecentRoutes`]; counted as a hit of the table, no lock taken), else
/// from the table under the zone's lock, noting what it found. `None` if the zone is not ready.
///
/// # Safety
/// `zone` is a routes zone, valid for the cycle (as for [`with_routes`]).
#[inline]
pub unsafe fn lookup_route(zone: *mut ngx_shm_zone_t, recent: &RecentRoutes, key: u64, now: i64, timeout: i64, share: Option<routes::Share>) -> Option<Option<(u64, bool)>> {
    // SAFETY: the caller's contract (zone valid for the cycle); ngx_current_msec is this
    // process's clock, written by its own event loop only.
    unsafe {
        let r = routes_region(zone)?;
        let ms = ngx::ffi::ngx_current_msec as u64;
        // Acquire: pairs with the Release in with_routes, after the table changed.
        if let Some(peer) = recent.get(key, now, ms, r.changes.load(Ordering::Acquire), share) {
            r.recent_hits.0.fetch_add(1, Ordering::Relaxed);
            return Some(Some((peer, false)));
        }
        with_routes(zone, |t| t.lookup_noting(u128::from(key), now, timeout, share, Some((recent, ms))))
    }
}

/// Runs `f` on a zone's route table with the zone's mutex held. `None` if the zone is not
/// ready (or not a routes zone).
pub unsafe fn with_routes<R>(zone: *mut ngx_shm_zone_t, f: impl FnOnce(&mut RouteTable<'_>) -> R) -> Option<R> {
    // SAFETY: zone is valid for the cycle; its data is a RoutesRegion in shared memory whose
    // table RouteTable::format laid out at `layout` (written once, before any worker started:
    // the header, `capacity` bucket and `capacity` entry slots, all within `len` and 8-byte
    // aligned), guarded by the slab pool's mutex, which every worker inherited from the
    // master; the references exist only while the mutex is held.
    unsafe {
        let z = zone.as_ref()?;
        let r = z.data as *mut RoutesRegion;
        if r.is_null() || (*r).magic != ROUTES_MAGIC {
            return None;
        }
        let base = r.add(1) as *mut u8;
        let l = (*r).layout;
        let _locked = SlabPool::from_shm_zone(z)?.lock();
        let mut t = RouteTable::from_parts(
            &mut *(base as *mut routes::Header),
            core::slice::from_raw_parts_mut(base.add(l.buckets_at) as *mut u32, l.capacity),
            core::slice::from_raw_parts_mut(base.add(l.entries_at) as *mut routes::Entry, l.capacity),
        );
        let out = f(&mut t);
        // Published while the lock is held, so the count never goes back.
        (*r).changes.store(t.changes(), Ordering::Release);
        Some(out)
    }
}

/// Runs `f` on a store's verdict cache (a routes zone of its own), under its lock.
///
/// # Safety
/// As for [`with_routes`]: `zone` is a verdict cache zone, valid for the cycle.
pub unsafe fn with_verdicts<R>(zone: *mut ngx_shm_zone_t, f: impl FnOnce(&mut crate::store::Verdicts<'_, '_>) -> R) -> Option<R> {
    // SAFETY: the caller's contract.
    unsafe { with_routes(zone, |t| f(&mut crate::store::Verdicts(t))) }
}

// ---------------------------------------------------------------------------------------------
// Client placement (`kylin_balance clients`)

/// Servers a placement zone tracks: the first this many primary servers of an upstream (the
/// others stay at home; placement works on the stack for up to 64, see `Placement::place`).
pub const PLACEMENT_SERVERS: usize = 64;
/// Clients (stickiness keys) a placement zone tracks; a full probe window evicts its lightest
/// client that has not moved.
pub const PLACEMENT_KEYS: usize = 4096;
/// How often the servers' in-flight counts are sampled into their averages, milliseconds.
pub const PLACEMENT_SAMPLE_MS: u64 = 10;
// A search for a server that found none stands for one sample period (placement.rs).
const _: () = assert!(crate::placement::NO_TARGET_MS == PLACEMENT_SAMPLE_MS);

#[repr(C)]
struct PlacementRegion {
    magic: u64,
    /// Identity of the servers the tables describe ([`crate::tables::Group`]'s layout hash): a
    /// worker whose servers differ (a reload or `resolve` changed them) starts afresh.
    layout: u64,
    /// When the servers were last sampled (ngx_current_msec).
    sampled_at: AtomicU64,
    /// 1 while placement has something to do (`Placement::sample_busy`), as of the last sample.
    busy: AtomicU64,
    servers: [ServerLoad; PLACEMENT_SERVERS],
    keys: [KeyEntry; PLACEMENT_KEYS],
}

const PLACEMENT_MAGIC: u64 = 0x6b796c_696e_706c_04;

/// The name of an upstream's placement zone.
fn placement_zone_name(upstream: &[u8]) -> Vec<u8> {
    [b"kylin_placement:".as_slice(), upstream].concat()
}

/// Declares an upstream's placement zone (a fixed size: kept across reloads, counters and
/// moved clients with it, unless its servers change).
pub unsafe fn placement_zone(cf: *mut ngx_conf_t, upstream: &[u8]) -> Option<*mut ngx_shm_zone_t> {
    let name = placement_zone_name(upstream);
    // SAFETY: cf is valid during configuration; nginx copies nothing of `name` but keeps the
    // pointer, so it is allocated from the configuration pool.
    unsafe {
        let data = ngx::ffi::ngx_pnalloc((*cf).pool, name.len()) as *mut u8;
        if data.is_null() {
            return None;
        }
        ptr::copy_nonoverlapping(name.as_ptr(), data, name.len());
        let mut s = ngx_str_t { len: name.len(), data };
        // Region, slab pool header and page bookkeeping, in whole pages.
        let size = (core::mem::size_of::<PlacementRegion>() + 64 * 1024).next_multiple_of(64 * 1024);
        let z = ngx_shared_memory_add(cf, &mut s, size, tag());
        if z.is_null() {
            return None;
        }
        (*z).init = Some(init_placement_zone);
        Some(z)
    }
}

unsafe extern "C" fn init_placement_zone(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: as in init_load_zone; a zero-filled PlacementRegion is valid (integers and
    // atomics only).
    unsafe {
        if !data.is_null() {
            if (*(data as *const PlacementRegion)).magic != PLACEMENT_MAGIC {
                ngx_log_error!(NGX_LOG_EMERG, (*zone).shm.log, "kylin: zone \"{}\" does not hold client placement of this module version; restart nginx", (*zone).shm.name);
                return Status::NGX_ERROR.into();
            }
            (*zone).data = data;
            return Status::NGX_OK.into();
        }
        let shpool = (*zone).shm.addr as *mut ngx_slab_pool_t;
        let p = ngx_slab_alloc(shpool, core::mem::size_of::<PlacementRegion>()) as *mut PlacementRegion;
        if p.is_null() {
            ngx_log_error!(NGX_LOG_EMERG, (*zone).shm.log, "kylin: cannot allocate client placement in zone \"{}\"", (*zone).shm.name);
            return Status::NGX_ERROR.into();
        }
        ptr::write_bytes(p as *mut u8, 0, core::mem::size_of::<PlacementRegion>());
        (*p).magic = PLACEMENT_MAGIC;
        (*zone).data = p as *mut c_void;
    }
    Status::NGX_OK.into()
}

/// The region of a placement zone, once nginx has created it.
unsafe fn placement_region(zone: *mut ngx_shm_zone_t) -> Option<*mut PlacementRegion> {
    // SAFETY: zone is valid for the cycle; data is NULL or a PlacementRegion that
    // init_placement_zone checked or made.
    unsafe {
        let r = zone.as_ref()?.data as *mut PlacementRegion;
        (!r.is_null() && (*r).magic == PLACEMENT_MAGIC).then_some(r)
    }
}

/// Whether placement had something to do at the last sample, and whether a new sample is due
/// at `now`: two atomic loads, no lock (the per-request fast path).
#[inline]
pub unsafe fn placement_state(zone: *mut ngx_shm_zone_t, now: u64) -> Option<(bool, bool)> {
    // SAFETY: as in placement_region; only the atomics are read.
    unsafe {
        let r = placement_region(zone)?;
        let busy = (*r).busy.load(Ordering::Relaxed) != 0;
        let due = now.wrapping_sub((*r).sampled_at.load(Ordering::Relaxed)) >= PLACEMENT_SAMPLE_MS;
        Some((busy, due))
    }
}

/// A zone's slab-pool mutex taken without waiting (ngx's [`SlabPool::lock`] always waits);
/// released on drop.
struct TryLocked(*mut ngx::ffi::ngx_shmtx_t);

impl TryLocked {
    /// # Safety
    /// `zone` is a shared zone of this cycle (its slab pool header is at `shm.addr`).
    unsafe fn new(zone: &ngx_shm_zone_t) -> Option<TryLocked> {
        // SAFETY: the caller's contract: the pool header, with its mutex, is at shm.addr.
        unsafe {
            let shpool = zone.shm.addr as *mut ngx_slab_pool_t;
            let mutex = ptr::addr_of_mut!((*shpool).mutex);
            (ngx::ffi::ngx_shmtx_trylock(mutex) != 0).then_some(TryLocked(mutex))
        }
    }
}

impl Drop for TryLocked {
    fn drop(&mut self) {
        // SAFETY: taken in `new` by this process, and not released since.
        unsafe { ngx::ffi::ngx_shmtx_unlock(self.0) };
    }
}

/// A zone's mutex, held either way until dropped.
#[allow(dead_code)]
enum Held {
    Waited(ngx::core::slab::LockedSlabPool),
    Tried(TryLocked),
}

/// Runs `f` on the zone's placement with its mutex held (waiting for it when `wait`, else
/// giving up if another process holds it). Tables that describe other servers than
/// `layout` are reset first. `f` also gets the region's sample clock and busy flag, which it
/// updates after a sample. `None` if the zone is not ready or the lock was not taken.
pub unsafe fn with_placement<R>(
    zone: *mut ngx_shm_zone_t,
    layout: u64,
    wait: bool,
    f: impl FnOnce(&mut Placement<&mut [ServerLoad], &mut [KeyEntry]>, &AtomicU64, &AtomicU64) -> R,
) -> Option<R> {
    // SAFETY: the region lives in the zone for the cycle; its tables are read and written
    // only with the slab pool's mutex held (inherited from the master by every worker), and
    // the references made here exist only while it is held. The atomics are shared freely.
    unsafe {
        let r = placement_region(zone)?;
        let pool = SlabPool::from_shm_zone(&*zone)?;
        let _held = if wait { Held::Waited(pool.lock()) } else { Held::Tried(TryLocked::new(&*zone)?) };
        let servers = &mut *ptr::addr_of_mut!((*r).servers);
        let keys = &mut *ptr::addr_of_mut!((*r).keys);
        let out = Placement::over(Params::DEFAULT, servers, keys).map(|mut p| {
            if (*r).layout != layout {
                p.reset();
                (*r).layout = layout;
                (*r).busy.store(0, Ordering::Relaxed);
            }
            f(&mut p, &(*r).sampled_at, &(*r).busy)
        });
        out
    }
}

/// Clients moved to each server (in the tables' index order), read with the zone's mutex
/// held; `None` if the zone is not ready or its tables describe other servers than `layout`
/// (nothing is reset: a status request never changes placement). Tables not used yet
/// (layout 0) describe every layout: nothing is moved.
pub unsafe fn placement_moved(zone: *mut ngx_shm_zone_t, layout: u64) -> Option<Vec<u64>> {
    // SAFETY: as in with_placement.
    unsafe {
        let r = placement_region(zone)?;
        let _locked = SlabPool::from_shm_zone(&*zone)?.lock();
        ((*r).layout == layout || (*r).layout == 0).then(|| (*r).servers.iter().map(|s| s.moved_in()).collect())
    }
}
