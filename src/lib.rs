//! ngx_http_kylin_upstream_module: an nginx upstream balancer for Apache Kylin query nodes.
//!
//! Layout. Decisions and data structures are plain Rust without FFI, unit- and
//! property-tested; the nginx glue gathers facts, calls them and applies the answer.
//!
//! | question | pure Rust | nginx glue |
//! |---|---|---|
//! | how is a peer chosen | [`balancer`] (the decision), [`ring`] (consistent hashing), [`key`] (the client-address key) | `upstream` (`init_upstream`, `init_peer`, `get`, `free`) |
//! | where does a busy client go | [`placement`] (client placement, `kylin_balance clients`) | `upstream` (sampling, `place`, measuring at `free`), `shm` (its zone) |
//! | what is a session, may it move | [`session`] (cookies), [`store`] (`kylin_session_store`, breaker, verdicts), [`redis_lookup`] (Redis, in the thread pool) | `session_check` (the precontent phase, thread-pool tasks, the health timer) |
//! | is a node healthy, draining, ramping | [`health`] (`kylin_health_check`, state machine, probe answers, slow start), [`drain`] (the drain document) | `probe` (the prober on the event loop, worker 0), `admin` (`kylin_status write=on`) |
//! | what load does a node report | [`load_report`] (`kylin_load_report`, the metrics page's parser, saturation verdicts; used by [`placement`]) | `probe` (fetches the page, same machinery), `upstream` (passes verdicts to placement) |
//! | where is shared state | [`load`] (in-flight counters, health slots), [`routes`] (learned routes, verdict cache) | `shm` (every zone: `kylin_load`, routes, `kylin_placement:NAME`) |
//! | what operators see | [`report`] (JSON, Prometheus), [`dashboard`] (format choice, the HTML page) | `status` (`kylin_status`), `variables` (`$kylin_route`, `$kylin_session_state`) |
//! | directives, `nginx -t` | parsers in [`balancer`], [`store`], [`session`] | `conf` (the module, its directives, `init_process`) |
//!
//! A request: `session_check`'s precontent handler (only with a Redis store) learns whether
//! its session is shared, without blocking; `upstream::init_peer` reads the session cookie
//! and its learned route; `upstream::get_peer` locks the peer list, samples placement, asks
//! [`balancer::choose_primary`] (then `choose_backup`) and counts the try in flight; `free`
//! uncounts it, measures its response for placement and learns a session the response created.
//! Background work (store health checks, node health probes) runs only in worker 0 (`conf`'s
//! `init_process`).

pub mod balancer;
pub mod dashboard;
pub mod drain;
pub mod health;
pub mod session;
pub mod store;
pub mod key;
pub mod load;
pub mod load_report;
pub mod placement;
pub mod report;
pub mod redis_lookup;
pub mod ring;
pub mod routes;

#[cfg(not(test))]
mod conf;
#[cfg(not(test))]
mod admin;
#[cfg(not(test))]
mod probe;
#[cfg(not(test))]
mod session_check;
#[cfg(not(test))]
mod shm;
#[cfg(not(test))]
mod status;
#[cfg(not(test))]
mod upstream;
#[cfg(not(test))]
mod variables;

#[cfg(not(test))]
pub use conf::ngx_http_kylin_upstream_module;

// Generate the `ngx_modules` table with exported modules, so the cdylib loads with
// `load_module`.
#[cfg(all(feature = "export-modules", not(test)))]
ngx::ngx_modules!(ngx_http_kylin_upstream_module);
