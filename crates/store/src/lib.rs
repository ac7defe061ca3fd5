//! Storage backends for Latchkey's `Store` trait (defined in `latchkey-core`), one
//! implementation per backend, each with its own migrations:
//!
//! - [`sqlite::SqliteStore`], the embedded default: one file in the data directory (WAL,
//!   `synchronous=FULL`), writes in `BEGIN IMMEDIATE` transactions so concurrent writers queue
//!   instead of failing, and token releases group-committed by one writer thread.
//! - [`postgres::PgStore`], for several Latchkey nodes sharing one PostgreSQL database: the
//!   guarantees SQLite gets from its single writer (one audit chain, single-use `jti`s, fenced
//!   token updates, claims that never overlap, no release after a revocation commits) come from
//!   PostgreSQL's row locks, unique indexes and advisory locks (see its module docs).
//!
//! Both pass the same conformance suite (`conformance.rs`, run against each backend).

pub mod postgres;
mod shared;
pub mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[cfg(test)]
mod conformance;
