//! Redis access, run in nginx's thread pool (never on the event loop). No nginx FFI.
//!
//! Each pool thread keeps one connection per store (standalone or cluster), reconnecting after
//! an error. Every connect, read and write is bounded by the store's timeout; host names
//! were resolved when the configuration was read (see `RedisStore::resolve`), so connecting
//! never waits for DNS (but for `rediss://` host names, kept for certificate checks). A kept connection that the server (its `timeout`), a proxy or a managed
//! Redis closed while idle fails its next command: the command is sent once more on a fresh
//! connection before it counts as a failure. Every command the module sends is idempotent
//! (EXISTS, GET, SET), so sending it twice is harmless.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use redis::cluster::{ClusterClientBuilder, ClusterConnection};
use redis::{Client, Connection, ConnectionLike, RedisError, TlsCertificates};

use crate::store::RedisStore;

/// What Redis said about a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The session's key exists: every node can serve it.
    pub shared: bool,
    /// The server another nginx instance learned for this session, if shared routes are on.
    pub route: Option<Vec<u8>>,
    /// For health checks: which Redis process answered (see [`health`]).
    pub identity: u64,
}

/// Why a lookup failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupError {
    Timeout,
    /// Connection refused, protocol error, cluster down, ...: the message never contains
    /// credentials (redis-rs does not print them).
    Failed(String),
}

impl From<RedisError> for LookupError {
    fn from(e: RedisError) -> LookupError {
        if e.is_timeout() {
            LookupError::Timeout
        } else {
            LookupError::Failed(e.to_string())
        }
    }
}

enum Conn {
    Single(Connection),
    Cluster(ClusterConnection),
}

impl Conn {
    fn as_mut(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c,
        }
    }
}

thread_local! {
    /// Connections of this pool thread, by store identity.
    static CONNS: RefCell<HashMap<String, Conn>> = RefCell::new(HashMap::new());
}

/// The CA certificates TLS connections verify against: `ca_file=`, else the system's.
fn certificates(store: &RedisStore) -> Option<TlsCertificates> {
    let pem = store.ca_pem.as_ref().filter(|_| store.tls)?;
    Some(TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) })
}

/// A connection to one node, every connect, read and write bounded by `t`.
fn single(store: &RedisStore, url: &str, t: Duration) -> Result<Connection, LookupError> {
    let client = match certificates(store) {
        Some(certs) => Client::build_with_tls(url, certs)?,
        None => Client::open(url)?,
    };
    let c = client.get_connection_with_timeout(t)?;
    c.set_read_timeout(Some(t))?;
    c.set_write_timeout(Some(t))?;
    Ok(c)
}

/// A connection to the master that the Sentinels name `name`: each Sentinel in turn is asked
/// (`SENTINEL get-master-addr-by-name`), then the master is reached with the URLs' credentials
/// and database. Written here rather than with redis's own Sentinel client because that one
/// connects to Sentinels and reads their answers without a timeout, which would let a silent
/// Sentinel hold a pool thread indefinitely. After a failover the old master refuses writes
/// (or fails); the connection is then dropped and the next call asks the Sentinels again.
fn sentinel_master(store: &RedisStore, name: &str, t: Duration) -> Result<Connection, LookupError> {
    let mut last = LookupError::Failed("no Sentinel configured".into());
    for url in &store.connect_urls {
        let asked = (|| {
            let sentinel_url = crate::store::node_only(url).ok_or_else(|| LookupError::Failed("bad Sentinel URL".into()))?;
            let mut s = single(store, &sentinel_url, t)?;
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(name).query(&mut s)?;
            let (host, port) = addr.ok_or_else(|| LookupError::Failed(format!("the Sentinel knows no master \"{name}\"")))?;
            let master = crate::store::with_address(url, &host, port).ok_or_else(|| LookupError::Failed("bad master address".into()))?;
            single(store, &master, t)
        })();
        match asked {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn connect(store: &RedisStore) -> Result<Conn, LookupError> {
    let t = Duration::from_millis(store.timeout_ms);
    if store.cluster {
        let mut b = ClusterClientBuilder::new(store.connect_urls.clone())
            .connection_timeout(t)
            .response_timeout(t)
            // One retry covers a moved slot or a node restart; the request itself never
            // waits longer than the store's timeout (nginx's timer), whatever the thread does.
            .retries(1);
        if let Some(certs) = certificates(store) {
            b = b.certs(certs);
        }
        Ok(Conn::Cluster(b.build()?.get_connection()?))
    } else if let Some(name) = &store.sentinel {
        Ok(Conn::Single(sentinel_master(store, name, t)?))
    } else {
        let url = store.connect_urls.first().ok_or_else(|| LookupError::Failed("no URL".into()))?;
        Ok(Conn::Single(single(store, url, t)?))
    }
}

/// Whether an error on a kept connection means the peer closed it (not that Redis failed to
/// answer in time or refused the command): worth one more try on a new connection.
fn closed_while_idle(e: &RedisError) -> bool {
    !e.is_timeout() && (e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error())
}

/// Runs `f` on this thread's connection to `store`, connecting if needed; drops the
/// connection after an error so the next call reconnects. A kept connection that turns out
/// closed gets one more try on a fresh one.
fn with_conn<T>(store: &RedisStore, f: impl Fn(&mut dyn ConnectionLike) -> Result<T, RedisError>) -> Result<T, LookupError> {
    // Stores share connections only when everything that shapes a connection is the same.
    let id = store.connection_id();
    CONNS.with(|cell| {
        let mut conns = cell.borrow_mut();
        let kept = conns.remove(&id);
        let was_kept = kept.is_some();
        let mut conn = match kept {
            Some(c) => c,
            None => connect(store)?,
        };
        let r = match f(conn.as_mut()) {
            // A Sentinel's master that became a replica (failover) refuses writes: the fresh
            // connection asks the Sentinels for the new master.
            Err(e) if was_kept && (closed_while_idle(&e) || (store.sentinel.is_some() && e.kind() == redis::ErrorKind::ReadOnly)) => {
                conn = connect(store)?;
                f(conn.as_mut())
            }
            r => r,
        };
        if r.is_ok() {
            conns.insert(id, conn);
        }
        r.map_err(LookupError::from)
    })
}

/// Asks whether `shared_key` exists and, if `route_key` is given, which server it names.
pub fn lookup(store: &RedisStore, shared_key: &[u8], route_key: Option<&[u8]>) -> Result<Answer, LookupError> {
    with_conn(store, |c| {
        if store.cluster {
            // Cluster connections route each command to its key's master; they do not take
            // pipelines of keys in different slots.
            let exists: i64 = redis::cmd("EXISTS").arg(shared_key).query(c)?;
            let route = match route_key {
                Some(rk) => redis::cmd("GET").arg(rk).query(c)?,
                None => None,
            };
            return Ok(Answer { shared: exists > 0, route, identity: 0 });
        }
        let mut p = redis::pipe();
        p.cmd("EXISTS").arg(shared_key);
        if let Some(rk) = route_key {
            p.cmd("GET").arg(rk);
        }
        let (exists, route): (i64, Option<Vec<u8>>) = if route_key.is_some() {
            p.query(c)?
        } else {
            let (e,): (i64,) = p.query(c)?;
            (e, None)
        };
        Ok(Answer { shared: exists > 0, route, identity: 0 })
    })
}

/// The key that marks what a Redis holds: set once with a random token (`SET NX`), read back
/// by every health check.
pub const EPOCH_KEY: &[u8] = b"kylin:epoch";

/// Checks that the store answers, and returns an identity of what it holds (a hash of the
/// token in [`EPOCH_KEY`]; 0 for a cluster, whose nodes each hold their own part). A changed
/// identity means Redis lost its data (restarted without persistence, flushed, failed over to
/// an empty replica), and with it the routes written to it.
///
/// Only `SET` and `GET` (and `PING` for a cluster): commands a least-privilege ACL user of the
/// module has anyway (`INFO` is in `@dangerous`).
pub fn health(store: &RedisStore) -> Result<u64, LookupError> {
    use std::hash::BuildHasher;
    // A fresh random token: RandomState is seeded from the OS once per thread and stepped for
    // every new state.
    let token = format!("{:016x}", std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now()));
    with_conn(store, |c| {
        if store.cluster {
            let _: String = redis::cmd("PING").query(c)?;
            return Ok(0);
        }
        let (held,): (Option<Vec<u8>>,) =
            redis::pipe().cmd("SET").arg(EPOCH_KEY).arg(&token).arg("NX").ignore().cmd("GET").arg(EPOCH_KEY).query(c)?;
        Ok(held.map_or(0, |t| xxhash_rust::xxh3::xxh3_64(&t) | 1))
    })
}

/// Stores a learned route for other nginx instances, expiring after `ttl` seconds idle.
pub fn write_route(store: &RedisStore, route_key: &[u8], server: &[u8], ttl: i64) -> Result<(), LookupError> {
    with_conn(store, |c| redis::cmd("SET").arg(route_key).arg(server).arg("EX").arg(ttl.max(1)).query::<()>(c))
}
