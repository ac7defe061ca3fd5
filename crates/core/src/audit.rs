//! The audit chain: how an entry is encoded for its MAC, and how a chain is verified.
//!
//! Entries are written by the store inside the transaction of the change they record; the
//! store computes each MAC with the [`AuditKey`] the vault installs after unsealing. Verifying
//! needs the same key (so the KEK): `latchkey audit verify` walks the chain in sequence order
//! and names the first entry that is missing, altered, out of place or forged; checkpoints
//! (kept in the database and, exported, off the machine) catch a truncated tail.

use latchkey_crypto::audit::{GENESIS, entry_mac, verify_checkpoint};
use zeroize::Zeroizing;

use crate::model::{AuditCheckpoint, AuditEntry, AuditRecord};

/// The chain's HMAC key (32 bytes), sealed in the database under the KEK.
pub struct AuditKey(pub Zeroizing<Vec<u8>>);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(…)")
    }
}

impl AuditKey {
    /// The MAC of entry `seq` holding `r`, after an entry whose MAC is `prev` (`None`: first).
    pub fn mac(&self, prev: Option<&str>, seq: i64, r: &AuditRecord) -> String {
        entry_mac(&self.0, prev.unwrap_or(GENESIS), &canonical(seq, r))
    }
}

/// The fields an entry's MAC covers, in a fixed order (a JSON array: unambiguous).
pub fn canonical(seq: i64, r: &AuditRecord) -> String {
    serde_json::json!([
        seq,
        r.at,
        r.actor_type,
        r.actor_id,
        r.auth_method,
        r.subject_user,
        r.action,
        r.connection,
        r.account_id,
        r.agent_id,
        r.scopes,
        r.decision,
        r.reason,
        r.audit_context,
        r.request_id,
        r.client_ip,
    ])
    .to_string()
}

/// Where a chain stops being trustworthy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit entry {seq}: {why}")]
pub struct ChainBreak {
    /// The first sequence number that is bad (or missing).
    pub seq: i64,
    pub why: String,
}

/// Walks a chain in sequence order, one entry at a time (so it can stream from the store).
#[derive(Default)]
pub struct ChainVerifier {
    prev_mac: Option<String>,
    next_seq: Option<i64>,
    /// Entries checked.
    pub count: u64,
}

impl ChainVerifier {
    /// Resume after a checkpoint-trusted entry (e.g. when older entries were pruned).
    pub fn after(seq: i64, mac: &str) -> Self {
        Self {
            prev_mac: Some(mac.to_owned()),
            next_seq: Some(seq + 1),
            count: 0,
        }
    }

    /// The last sequence number and MAC accepted.
    pub fn head(&self) -> Option<(i64, &str)> {
        Some((self.next_seq? - 1, self.prev_mac.as_deref()?))
    }

    pub fn check(&mut self, key: &AuditKey, e: &AuditEntry) -> Result<(), ChainBreak> {
        let brk = |seq, why: &str| ChainBreak {
            seq,
            why: why.to_owned(),
        };
        // A chain starts at 1 (or right after the checkpoint it resumes from).
        let expected = self.next_seq.unwrap_or(1);
        if e.seq > expected {
            return Err(brk(
                expected,
                "missing (deleted, or the entries were renumbered)",
            ));
        }
        if e.seq < expected {
            return Err(brk(e.seq, "out of order or duplicated"));
        }
        let Some(mac) = e.mac.as_deref() else {
            return Err(brk(e.seq, "has no MAC"));
        };
        let want = key.mac(self.prev_mac.as_deref(), e.seq, &e.record);
        if !latchkey_crypto::secrets::ct_eq(want.as_bytes(), mac.as_bytes()) {
            return Err(brk(
                e.seq,
                "does not match its MAC (altered, moved or forged)",
            ));
        }
        self.prev_mac = Some(mac.to_owned());
        self.next_seq = Some(e.seq + 1);
        self.count += 1;
        Ok(())
    }

    /// After the last entry: does the chain reach this checkpoint, with the same MAC? The
    /// checkpoint's signature must be `public_key`'s.
    pub fn check_checkpoint(
        &self,
        cp: &AuditCheckpoint,
        public_key: &str,
        mac_at: Option<&str>,
    ) -> Result<(), ChainBreak> {
        let brk = |seq, why: String| ChainBreak { seq, why };
        if cp.public_key != public_key
            || !verify_checkpoint(public_key, cp.seq, &cp.mac, cp.at, &cp.signature)
        {
            return Err(brk(
                cp.seq,
                "the checkpoint is not signed by this vault's audit key".into(),
            ));
        }
        let last = self.head().map_or(0, |(s, _)| s);
        if cp.seq > last {
            return Err(brk(
                last + 1,
                format!(
                    "missing: the chain ends at {last} but a checkpoint covers {}",
                    cp.seq
                ),
            ));
        }
        match mac_at {
            Some(m) if m == cp.mac => Ok(()),
            _ => Err(brk(cp.seq, "differs from the signed checkpoint".into())),
        }
    }
}

/// How an entry is shown (admin API, `latchkey audit export`, the audit webhook): every
/// stored field and its MAC, times as RFC 3339.
#[derive(serde::Serialize)]
pub struct ActorView {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub auth_method: String,
}

#[derive(serde::Serialize)]
pub struct TargetView {
    pub connection: Option<String>,
    pub account_id: Option<String>,
    pub agent_id: Option<String>,
}

#[derive(serde::Serialize)]
pub struct EntryView {
    pub seq: i64,
    pub at: String,
    pub actor: ActorView,
    pub subject_user: Option<String>,
    pub action: String,
    pub target: TargetView,
    pub decision: String,
    pub reason: Option<String>,
    pub scopes: Vec<String>,
    pub audit_context: Option<serde_json::Value>,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// An entry as stored (it never holds a secret: tokens appear only as hashes). An
/// `audit_context` that is a JSON object or array is shown as that JSON, anything else as
/// the string it is.
pub fn entry_view(e: &AuditEntry) -> EntryView {
    let r = e.record.clone();
    let audit_context =
        r.audit_context
            .map(|c| match serde_json::from_str::<serde_json::Value>(&c) {
                Ok(v) if v.is_object() || v.is_array() => v,
                _ => serde_json::Value::String(c),
            });
    EntryView {
        seq: e.seq,
        at: rfc3339(r.at),
        actor: ActorView {
            kind: r.actor_type,
            id: r.actor_id,
            auth_method: r.auth_method,
        },
        subject_user: r.subject_user,
        action: r.action,
        target: TargetView {
            connection: r.connection,
            account_id: r.account_id,
            agent_id: r.agent_id,
        },
        decision: r.decision,
        reason: r.reason,
        scopes: r
            .scopes
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        audit_context,
        request_id: r.request_id,
        client_ip: r.client_ip,
        mac: e.mac.clone().filter(|m| !m.is_empty()),
    }
}

/// A Unix time as RFC 3339 (UTC), as every JSON surface shows times.
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AuditKey {
        AuditKey(Zeroizing::new(vec![1; 32]))
    }

    fn chain(n: i64) -> Vec<AuditEntry> {
        let k = key();
        let mut prev: Option<String> = None;
        (1..=n)
            .map(|seq| {
                let record = AuditRecord {
                    at: seq,
                    action: format!("a{seq}"),
                    ..Default::default()
                };
                let mac = k.mac(prev.as_deref(), seq, &record);
                prev = Some(mac.clone());
                AuditEntry {
                    seq,
                    record,
                    mac: Some(mac),
                }
            })
            .collect()
    }

    fn verify(entries: &[AuditEntry]) -> Result<u64, ChainBreak> {
        let mut v = ChainVerifier::default();
        for e in entries {
            v.check(&key(), e)?;
        }
        Ok(v.count)
    }

    #[test]
    fn every_kind_of_tampering_names_the_first_bad_entry() {
        let good = chain(5);
        assert_eq!(verify(&good), Ok(5));
        let mut edited = good.clone();
        edited[2].record.reason = Some("x".into());
        assert_eq!(verify(&edited).unwrap_err().seq, 3);
        let mut deleted = good.clone();
        deleted.remove(1);
        assert_eq!(verify(&deleted).unwrap_err().seq, 2);
        let mut swapped = good.clone();
        swapped.swap(1, 3);
        assert_eq!(verify(&swapped).unwrap_err().seq, 2);
        // Contents swapped but sequence numbers kept in place.
        let mut moved = good.clone();
        let (a, b) = (moved[1].record.clone(), moved[3].record.clone());
        moved[1].record = b;
        moved[3].record = a;
        assert_eq!(verify(&moved).unwrap_err().seq, 2);
        let mut forged = good.clone();
        forged.push(AuditEntry {
            seq: 6,
            record: AuditRecord::default(),
            mac: Some("0".repeat(64)),
        });
        assert_eq!(verify(&forged).unwrap_err().seq, 6);
        let mut unmac = good.clone();
        unmac[4].mac = None;
        assert_eq!(verify(&unmac).unwrap_err().seq, 5);
        // Another key cannot verify (nor forge).
        let mut v = ChainVerifier::default();
        assert!(
            v.check(&AuditKey(Zeroizing::new(vec![2; 32])), &good[0])
                .is_err()
        );
    }

    #[test]
    fn a_checkpoint_catches_truncation() {
        let signer = latchkey_crypto::audit::CheckpointSigner::from_seed(&[9; 32]).unwrap();
        let good = chain(5);
        let mac4 = good[3].mac.clone().unwrap();
        let cp = AuditCheckpoint {
            seq: 4,
            mac: mac4.clone(),
            at: 10,
            public_key: signer.public_key(),
            signature: signer.sign(4, &mac4, 10),
        };
        let mut v = ChainVerifier::default();
        for e in &good {
            v.check(&key(), e).unwrap();
        }
        assert_eq!(
            v.check_checkpoint(&cp, &signer.public_key(), Some(&mac4)),
            Ok(())
        );
        // Truncated to 2 entries: the first missing one is named.
        let mut short = ChainVerifier::default();
        for e in &good[..2] {
            short.check(&key(), e).unwrap();
        }
        assert_eq!(
            short
                .check_checkpoint(&cp, &signer.public_key(), None)
                .unwrap_err()
                .seq,
            3
        );
        // A checkpoint signed by someone else, or altered, is refused.
        let other = latchkey_crypto::audit::CheckpointSigner::from_seed(&[8; 32]).unwrap();
        assert!(
            v.check_checkpoint(&cp, &other.public_key(), Some(&mac4))
                .is_err()
        );
        let altered = AuditCheckpoint {
            at: 11,
            ..cp.clone()
        };
        assert!(
            v.check_checkpoint(&altered, &signer.public_key(), Some(&mac4))
                .is_err()
        );
    }
}
