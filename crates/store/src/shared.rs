//! What every backend shares: the audit chain's linking rule, the `audit.entry` webhook, the
//! list of sealed columns, and how sqlx errors become [`StoreError`]s. One definition here keeps
//! the backends from drifting apart on what a chain link or a sealed field is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use latchkey_core::audit::AuditKey;
use latchkey_core::model::{AuditEntry, AuditRecord, Notification};
use latchkey_core::store::StoreError;

pub(crate) fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Map a unique-constraint violation to `Conflict(what)`.
pub(crate) fn conflict(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| match e.as_database_error() {
        Some(d) if d.is_unique_violation() => StoreError::Conflict(what.into()),
        _ => unavailable(e),
    }
}

/// The audit chain's key (once the vault has unsealed it) and whether every entry is also sent
/// as a webhook: set on the store, read by each audited write.
#[derive(Clone, Debug, Default)]
pub(crate) struct AuditSettings {
    pub key: Arc<RwLock<Option<Arc<AuditKey>>>>,
    pub webhook: Arc<AtomicBool>,
}

impl AuditSettings {
    pub fn install_key(&self, key: Arc<AuditKey>) {
        *self.key.write().expect("audit key lock") = Some(key);
    }

    pub fn enable_webhook(&self) {
        self.webhook.store(true, Ordering::Relaxed);
    }

    /// What the next entry is written with.
    pub fn sink(&self) -> AuditSink {
        AuditSink {
            key: self.key.read().expect("audit key lock").clone(),
            webhook: self.webhook.load(Ordering::Relaxed),
        }
    }
}

/// What an audit entry is written with: the chain's MAC key (once the vault unsealed it), and
/// whether every entry is also sent as a webhook.
pub(crate) struct AuditSink {
    pub key: Option<Arc<AuditKey>>,
    pub webhook: bool,
}

/// The link after `last` (the chain's last entry, `(seq, mac)`, read while no other writer
/// can append): the next sequence number and the MAC over it, the record and the previous MAC.
pub(crate) fn audit_link(
    sink: &AuditSink,
    last: Option<(i64, Option<String>)>,
    a: &AuditRecord,
) -> Result<(i64, Option<String>), StoreError> {
    let seq = last.as_ref().map_or(1, |(s, _)| s + 1);
    let prev = last.as_ref().and_then(|(_, m)| m.as_deref());
    let mac = match (sink.key.as_deref(), &last) {
        (Some(k), _) => Some(k.mac(prev, seq, a)),
        // Before the key is installed, only an unchained beginning may be written.
        (None, None) | (None, Some((_, None))) => None,
        (None, Some((_, Some(_)))) => {
            return Err(StoreError::Unavailable(
                "the audit chain key is not installed".into(),
            ));
        }
    };
    Ok((seq, mac))
}

/// The `audit.entry` webhook of an entry, when the sink sends every entry. (The record's own
/// `notify` goes to the outbox too.)
pub(crate) fn audit_entry_event(
    sink: &AuditSink,
    seq: i64,
    a: &AuditRecord,
    mac: &Option<String>,
) -> Option<Notification> {
    sink.webhook.then(|| {
        let entry = AuditEntry {
            seq,
            record: a.clone(),
            mac: mac.clone(),
        };
        Notification {
            event: "audit.entry".into(),
            body: serde_json::to_string(&latchkey_core::audit::entry_view(&entry))
                .unwrap_or_default(),
        }
    })
}

/// Every sealed column, for key rotation: (table, column, the row's key column).
pub(crate) const SEALED_COLUMNS: &[(&str, &str, &str)] = &[
    ("connected_accounts", "access_token", "id"),
    ("connected_accounts", "refresh_token", "id"),
    ("connections", "client_secret", "id"),
    ("server_secrets", "value", "name"),
    ("connect_flows", "code_verifier", "state_hash"),
    ("scoped_tokens", "access_token", "id"),
    ("users", "totp_seed", "id"),
];
