//! Latchkey's domain: what an exchange may release, to whom, and what is recorded.
//!
//! No HTTP framework and no SQL here. Adapters implement the traits:
//! - [`store::Store`] — persistence (SQLite today, PostgreSQL later), one implementation per
//!   backend, each operation that must be atomic is one trait method;
//! - [`upstream::Upstream`] — the OAuth client that talks to providers;
//! - [`clock::Clock`] — time, so tests can move it.
//!
//! [`vault::Vault`] is the service the server's thin handlers and the CLI call: client
//! authentication, the privileged-worker token exchange, single-flight upstream refresh, the
//! connect flow, the registry and key management.

pub mod audit;
pub mod catalog;
pub mod clock;
pub mod error;
pub mod keys;
pub mod model;
pub mod params;
pub mod policy;
pub mod rate;
pub mod refresh;
pub mod scope;
pub mod store;
pub mod upstream;
pub mod vault;

pub use error::OAuthError;
pub use vault::{Vault, VaultConfig};
