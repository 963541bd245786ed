//! Safe wrappers for what the nginx glue does again and again, so that each `unsafe` rule is
//! argued once, here:
//! - peer lists: [`Locked`] holds a list's lock (the write lock, as round robin's `get`, or the
//!   read lock with [`read_locked`]); peers are reached only through borrows of the guard
//!   ([`Peers`]), which cannot outlive it; [`Snapshot`] copies what the per-process tables need;
//! - request and response headers: [`request_cookies`], [`response_set_cookies`];
//! - per-process state in configuration memory: [`ProcessLocal`], instead of `&'static mut`;
//! - a whole response from a content handler: [`send_whole`].

use core::cell::{Ref, RefCell};
use core::marker::PhantomData;
use core::ptr;

#[cfg(not(nginx1_23_0))]
use ngx::ffi::ngx_list_t;
use ngx::ffi::{
    ngx_alloc_chain_link, ngx_create_temp_buf, ngx_http_output_filter, ngx_http_request_t, ngx_http_send_header,
    ngx_http_upstream_rr_peer_data_t, ngx_http_upstream_rr_peer_t, ngx_http_upstream_rr_peers_t, ngx_int_t,
    ngx_list_push, ngx_rwlock_rlock, ngx_rwlock_unlock, ngx_rwlock_wlock, ngx_table_elt_t, ngx_uint_t, NGX_HTTP_HEAD,
    NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_NOT_MODIFIED, NGX_HTTP_NO_CONTENT, NGX_HTTP_VERSION_10,
};
use ngx::core::Status;

/// Server addresses of one group, in list order, in one buffer (copied from nginx's peers, so
/// that nothing outside `get` and `free` reads a peer: with `resolve`, nginx frees the peers a
/// DNS change removes).
#[derive(Debug, Default)]
pub struct Names {
    pub bytes: Vec<u8>,
    /// Name `i` is `bytes[ends[i - 1]..ends[i]]`.
    pub ends: Vec<usize>,
}

impl Names {
    #[inline]
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { *self.ends.get(i - 1)? };
        self.bytes.get(start..end)
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.ends.len()).filter_map(|i| self.get(i))
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
    pub config: ngx_uint_t,
    peers: Vec<*mut ngx_http_upstream_rr_peer_t>,
    kind: PhantomData<K>,
}

impl<K> PeerRefs<K> {
    /// The index of peer `p` among these (a pointer comparison: nothing is read through the
    /// pointers, so no lock is needed), `None` if it is not one of them.
    pub fn index_of(&self, p: *const ngx_http_upstream_rr_peer_t) -> Option<usize> {
        self.peers.iter().position(|&q| ptr::eq(q, p))
    }
}

/// What the tables of one group are built from, copied under the list's lock.
pub struct Snapshot<K> {
    pub refs: PeerRefs<K>,
    pub names: Names,
    pub weights: Vec<u32>,
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
    #[inline]
    pub unsafe fn primary(list: *mut ngx_http_upstream_rr_peers_t) -> Locked<Primary> {
        // SAFETY: as this function requires.
        unsafe { Locked::wlock(list) }
    }

    /// Releases the primary list, then locks its backup list (`None`, with nothing locked,
    /// when there are no backup servers).
    #[inline]
    pub fn into_backup(self) -> Option<Locked<Backup>> {
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
    #[inline]
    pub unsafe fn backup(list: *mut ngx_http_upstream_rr_peers_t) -> Locked<Backup> {
        // SAFETY: as this function requires.
        unsafe { Locked::wlock(list) }
    }
}

impl<K> Locked<K> {
    /// # Safety
    /// `list` is a valid peer list of kind `K`, valid for the cycle.
    #[inline]
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
    pub fn config(&self) -> ngx_uint_t {
        // SAFETY: the list is valid and locked.
        unsafe { peers_config(self.list) }
    }

    /// Whether the zone's peers changed since this request's round-robin data was set up
    /// (round robin answers NGX_BUSY then, and so do we).
    #[inline]
    pub fn changed_since(&self, rrp: &ngx_http_upstream_rr_peer_data_t) -> bool {
        // SAFETY: the list is valid and locked.
        unsafe { config_changed(rrp, self.list) }
    }

    /// The locked list (to name it to nginx, e.g. as the request's `rrp.peers`).
    #[inline]
    pub fn list(&self) -> *mut ngx_http_upstream_rr_peers_t {
        self.list
    }

    /// Number of peers in the list.
    #[inline]
    pub fn number(&self) -> usize {
        // SAFETY: the list is valid and locked.
        unsafe { (*self.list).number }
    }

    /// A single server and no backups: round robin always tries it.
    #[inline]
    pub fn single(&self) -> bool {
        // SAFETY: the list is valid and locked.
        unsafe { (*self.list).single() != 0 }
    }

    /// Whether `refs` are this list's peers at its current generation.
    #[inline]
    pub fn current(&self, refs: &PeerRefs<K>) -> bool {
        ptr::eq(refs.list, self.list) && refs.config == self.config()
    }

    /// The peers of `refs`, while the lock is held; `None` if they are not this list's peers
    /// at its current generation (then some may have been freed).
    #[inline]
    pub fn peers<'g>(&'g mut self, refs: &'g PeerRefs<K>) -> Option<Peers<'g>> {
        self.current(refs).then_some(Peers { peers: &refs.peers, lock: PhantomData })
    }

    /// Copies what the per-process tables need: the peers' addresses, names and weights, and
    /// the generation. Allocates only with `try_reserve` (no abort while other workers wait
    /// for the lock); `None` if memory is short.
    pub fn snapshot(&self) -> Option<Snapshot<K>> {
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
    #[inline]
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
    pub fn get(&self, i: usize) -> Option<&ngx_http_upstream_rr_peer_t> {
        // SAFETY: the guard these are borrowed from holds the list's lock and checked that they
        // are its peers at its current generation: live, and changed by nobody else meanwhile.
        self.peers.get(i).map(|&p| unsafe { &*p })
    }

    #[inline]
    pub fn get_mut(&mut self, i: usize) -> Option<&mut ngx_http_upstream_rr_peer_t> {
        // SAFETY: as in `get`; `&mut self` borrows the guard exclusively.
        self.peers.get(i).map(|&p| unsafe { &mut *p })
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

/// Number of servers (primary and backup) of a peer list.
pub unsafe fn server_count(peers: *mut ngx_http_upstream_rr_peers_t) -> usize {
    // SAFETY: peers is a valid list.
    unsafe { (*peers).number + (*peers).next.as_ref().map_or(0, |b| b.number) }
}

/// Addresses of the servers (primary and backup) of a peer list.
pub unsafe fn server_names<'a>(peers: *mut ngx_http_upstream_rr_peers_t) -> impl Iterator<Item = &'a [u8]> {
    // SAFETY: peers is a valid list (its backups in `next`), whose peers live as long as it.
    let lists = unsafe { [peers.as_ref(), peers.as_ref().and_then(|p| p.next.as_ref())] };
    lists.into_iter().flatten().flat_map(|l| {
        // SAFETY: as above.
        core::iter::successors(unsafe { l.peer.as_ref() }, |p| unsafe { p.next.as_ref() }).map(|p| p.name.as_bytes())
    })
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
pub unsafe fn response_set_cookies<'a>(u: *mut ngx::ffi::ngx_http_upstream_t) -> impl Iterator<Item = &'a [u8]> + 'a {
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

/// Whether nginx considers a peer failed right now (`max_fails` within `fail_timeout`).
#[inline]
pub fn failed(p: &ngx_http_upstream_rr_peer_t, now: i64) -> bool {
    p.max_fails != 0 && p.fails >= p.max_fails && now - p.checked as i64 <= p.fail_timeout as i64
}

/// The `down` value of a draining server (`server ... drain`, nginx 1.29.6+), which still
/// serves its own sessions; 0 where nginx has no draining.
#[cfg(nginx1_29_6)]
pub const DRAINING: ngx_uint_t = ngx::ffi::NGX_HTTP_UPSTREAM_DRAINING as ngx_uint_t;
#[cfg(not(nginx1_29_6))]
pub const DRAINING: ngx_uint_t = 0;

/// Runs `f` with the read lock of a peer list held (a list in a `zone`; nothing to lock
/// without one), as nginx's own status readers do.
///
/// # Safety
/// `peers` is a valid peer list, valid for the cycle; `f` reads its peers only.
pub unsafe fn read_locked<R>(peers: *mut ngx_http_upstream_rr_peers_t, f: impl FnOnce() -> R) -> R {
    // SAFETY: peers is a valid list; its rwlock lives in the same (shared) memory, and `f`
    // runs between taking and releasing it.
    unsafe {
        let shared = !(*peers).shpool.is_null();
        if shared {
            ngx_rwlock_rlock(ptr::addr_of_mut!((*peers).rwlock));
        }
        let r = f();
        if shared {
            ngx_rwlock_unlock(ptr::addr_of_mut!((*peers).rwlock));
        }
        r
    }
}

/// Calls `f` for every peer of an upstream, primary then backup, each list under its read
/// lock ([`read_locked`]), one list at a time. `f` copies what it needs: the peers may be
/// freed (`resolve`) once the lock is released.
///
/// # Safety
/// `primary` is the upstream's primary peer list (in a worker with a `zone`, its shared copy),
/// valid for the cycle.
pub unsafe fn for_each_peer(primary: *mut ngx_http_upstream_rr_peers_t, mut f: impl FnMut(&ngx_http_upstream_rr_peer_t)) {
    // SAFETY: the caller's contract; a primary list's `next` is NULL or its backup list, valid
    // as long as it; a list's peers are live while its lock is held.
    unsafe {
        let backup = primary.as_ref().map_or(ptr::null_mut(), |p| p.next);
        for list in [primary, backup] {
            if list.is_null() {
                continue;
            }
            read_locked(list, || {
                let mut p = (*list).peer;
                while let Some(peer) = p.as_ref() {
                    f(peer);
                    p = peer.next;
                }
            });
        }
    }
}

/// State of one nginx process kept in configuration memory (which every worker has its own
/// copy of, after fork), such as an upstream's per-process tables. nginx runs a process's
/// callbacks on one thread, and no pool thread is given it, so a `RefCell` is enough; its
/// borrows are checked, and a conflicting one is refused (`None`/`false`), never a panic.
#[derive(Debug, Default)]
pub struct ProcessLocal<T>(RefCell<T>);

impl<T> ProcessLocal<T> {
    pub fn new(v: T) -> ProcessLocal<T> {
        ProcessLocal(RefCell::new(v))
    }

    /// A shared borrow; `None` while [`ProcessLocal::set`] replaces the value.
    #[inline]
    pub fn get(&self) -> Option<Ref<'_, T>> {
        self.0.try_borrow().ok()
    }

    /// Runs `f` on the value, borrowed exclusively; `None` while a borrow from
    /// [`ProcessLocal::get`] is alive.
    pub fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        self.0.try_borrow_mut().ok().map(|mut v| f(&mut v))
    }

    /// Replaces the value; `false` (and `v` dropped) while a borrow from [`ProcessLocal::get`]
    /// is alive.
    pub fn set(&self, v: T) -> bool {
        match self.0.try_borrow_mut() {
            Ok(mut slot) => {
                *slot = v;
                true
            }
            Err(_) => false,
        }
    }
}

/// Adds a response header with static key and value; returns it (None if out of memory).
///
/// # Safety
/// `r` is a live request in its content phase.
pub unsafe fn add_header(r: *mut ngx_http_request_t, key: &'static str, value: &'static str) -> Option<*mut ngx_table_elt_t> {
    // SAFETY: r is a valid request whose headers_out.headers list is initialised (content
    // handlers run after that); the element is zeroed before it is filled, and the key and
    // value point to static memory that outlives the request (nginx only reads them).
    unsafe {
        let h = ngx_list_push(ptr::addr_of_mut!((*r).headers_out.headers)) as *mut ngx_table_elt_t;
        if h.is_null() {
            return None;
        }
        ptr::write_bytes(h, 0, 1);
        (*h).hash = 1;
        (*h).key.len = key.len();
        (*h).key.data = key.as_ptr() as *mut u8;
        (*h).value.len = value.len();
        (*h).value.data = value.as_ptr() as *mut u8;
        Some(h)
    }
}

/// Whether the response sent has no body: what nginx's header filter marks `r->header_only`
/// (a HEAD request, or a 204 or 304 answer such as the not-modified filter's, in a main request
/// of HTTP/1.0 or later), decided here from the request itself. Not read from the
/// `header_only` bit: the bindings of nginx 1.30 and 1.31 (whose request has a 16-bit `port`
/// before its bit fields) place every bit from `uri_changes` on two bits early, so
/// `header_only()` reads `pipeline` there and a HEAD request got the body.
unsafe fn header_only(r: *mut ngx_http_request_t) -> bool {
    // SAFETY: r is a valid request whose header has been sent.
    unsafe {
        r == (*r).main
            && (*r).http_version >= NGX_HTTP_VERSION_10 as usize
            && ((*r).method == NGX_HTTP_HEAD as usize
                || (*r).headers_out.status == NGX_HTTP_NOT_MODIFIED as usize
                || (*r).headers_out.status == NGX_HTTP_NO_CONTENT as usize)
    }
}

/// Sends `body` with `status` and content type `ct` (static) as the whole response; no body
/// when the response has none (HEAD, 304), see [`header_only`].
///
/// # Safety
/// `r` is a live request in its content phase.
pub unsafe fn send_whole(r: *mut ngx_http_request_t, status: usize, ct: &'static str, body: &[u8]) -> ngx_int_t {
    // SAFETY: r is live (the caller's contract); the buffer and chain link come from its pool,
    // and `body` is copied into the buffer before this returns.
    unsafe {
        (*r).headers_out.status = status;
        (*r).headers_out.content_length_n = body.len() as i64;
        (*r).headers_out.content_type_len = ct.len();
        (*r).headers_out.content_type.len = ct.len();
        (*r).headers_out.content_type.data = ct.as_ptr() as *mut u8;
        (*r).headers_out.content_type_lowcase = ptr::null_mut();

        let rc = ngx_http_send_header(r);
        if Status(rc) == Status::NGX_ERROR || Status(rc) > Status::NGX_OK || header_only(r) {
            return rc;
        }
        let b = ngx_create_temp_buf((*r).pool, body.len().max(1));
        let out = ngx_alloc_chain_link((*r).pool);
        if b.is_null() || out.is_null() {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        }
        ptr::copy_nonoverlapping(body.as_ptr(), (*b).last, body.len());
        (*b).last = (*b).last.add(body.len());
        (*b).set_last_buf(if r == (*r).main { 1 } else { 0 });
        (*b).set_last_in_chain(1);
        (*out).buf = b;
        (*out).next = ptr::null_mut();
        ngx_http_output_filter(r, out)
    }
}
