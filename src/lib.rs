//! ngx_http_kylin_upstream_module: an nginx upstream balancer for Apache Kylin query nodes.
//!
//! Layout:
//! - [`ring`], [`key`], [`balancer`]: plain Rust, no FFI. *How a peer is chosen* is in
//!   [`balancer`].
//! - [`conf`]: the directives (`kylin_upstream`, `kylin`) and their `nginx -t` checks.
//! - [`upstream`]: the peer callbacks nginx calls per request (thin glue around
//!   [`balancer::choose`] and nginx's round-robin peer bookkeeping).

pub mod balancer;
pub mod drain;
pub mod health;
pub mod session;
pub mod store;
pub mod key;
pub mod load;
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
