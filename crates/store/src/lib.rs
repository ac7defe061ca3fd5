//! Storage backends for Latchkey's `Store` trait (defined in `latchkey-core`).
//!
//! Today: [`sqlite::SqliteStore`], the embedded default (WAL, `synchronous=FULL`, writes in
//! `BEGIN IMMEDIATE` transactions so concurrent writers queue instead of failing). PostgreSQL
//! joins as a second implementation of the same trait, with its own migrations.

pub mod sqlite;

pub use sqlite::SqliteStore;
