//! Redis access, run in nginx's thread pool (never on the event loop). No nginx FFI.
//!
//! Each pool thread keeps one connection per store (standalone or cluster), reconnecting after
//! an error. Every connect, read and write is bounded by the store's timeout.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use redis::cluster::{ClusterClientBuilder, ClusterConnection};
use redis::{Client, Connection, ConnectionLike, RedisError};

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

fn connect(store: &RedisStore) -> Result<Conn, LookupError> {
    let t = Duration::from_millis(store.timeout_ms);
    if store.cluster {
        let c = ClusterClientBuilder::new(store.urls.clone())
            .connection_timeout(t)
            .response_timeout(t)
            // One retry covers a moved slot or a node restart; the request itself never
            // waits longer than the store's timeout (nginx's timer), whatever the thread does.
            .retries(1)
            .build()?
            .get_connection()?;
        Ok(Conn::Cluster(c))
    } else {
        let url = store.urls.first().ok_or_else(|| LookupError::Failed("no URL".into()))?;
        let c = Client::open(url.as_str())?.get_connection_with_timeout(t)?;
        c.set_read_timeout(Some(t))?;
        c.set_write_timeout(Some(t))?;
        Ok(Conn::Single(c))
    }
}

/// Runs `f` on this thread's connection to `store`, connecting if needed; drops the
/// connection after an error so the next call reconnects.
fn with_conn<T>(store: &RedisStore, f: impl FnOnce(&mut dyn ConnectionLike) -> Result<T, RedisError>) -> Result<T, LookupError> {
    let id = store.urls.join(" ");
    CONNS.with(|cell| {
        let mut conns = cell.borrow_mut();
        if !conns.contains_key(&id) {
            let c = connect(store)?;
            conns.insert(id.clone(), c);
        }
        let conn = conns.get_mut(&id).ok_or_else(|| LookupError::Failed("no connection".into()))?;
        let r = f(conn.as_mut());
        if r.is_err() {
            conns.remove(&id);
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

/// Checks that the store answers, and returns an identity of the Redis process that answered
/// (a hash of `INFO server`'s `run_id`; 0 for a cluster, whose nodes each have their own).
/// A changed identity means Redis restarted, and may have lost what was written to it.
pub fn health(store: &RedisStore) -> Result<u64, LookupError> {
    with_conn(store, |c| {
        if store.cluster {
            let _: String = redis::cmd("PING").query(c)?;
            return Ok(0);
        }
        let info: String = redis::cmd("INFO").arg("server").query(c)?;
        let run_id = info.lines().find_map(|l| l.strip_prefix("run_id:")).unwrap_or("").trim();
        Ok(if run_id.is_empty() { 0 } else { xxhash_rust::xxh3::xxh3_64(run_id.as_bytes()) | 1 })
    })
}

/// Stores a learned route for other nginx instances, expiring after `ttl` seconds idle.
pub fn write_route(store: &RedisStore, route_key: &[u8], server: &[u8], ttl: i64) -> Result<(), LookupError> {
    with_conn(store, |c| redis::cmd("SET").arg(route_key).arg(server).arg("EX").arg(ttl.max(1)).query::<()>(c))
}
