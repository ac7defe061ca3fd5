//! The audit chain seen from the vault: signed checkpoints and verification.

use super::*;
use crate::audit::{ChainBreak, ChainVerifier};

/// Entries read per batch while verifying.
const VERIFY_BATCH: i64 = 5_000;
/// The reason of an `audit.prune` entry, followed by the last sequence number deleted.
const PRUNED_THROUGH: &str = "entries pruned through ";

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerification {
    pub entries: u64,
    /// The last sequence number, if any entry exists.
    pub last_seq: Option<i64>,
    pub checkpoints: usize,
}

impl Vault {
    /// The Ed25519 public key (base64url) that signs this vault's audit checkpoints.
    pub fn audit_public_key(&self) -> String {
        self.checkpoints.public_key()
    }

    /// Sign and store a checkpoint of the chain's current head (`None` if the chain is empty).
    pub async fn audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>, OAuthError> {
        let head = self.store.list_audit(1).await.map_err(store_err)?;
        let Some(AuditEntry {
            seq,
            mac: Some(mac),
            ..
        }) = head.into_iter().next()
        else {
            return Ok(None);
        };
        self.write_checkpoint(seq, mac).await.map(Some)
    }

    /// Sign a checkpoint of entry `seq` (whose MAC is `mac`) and store it.
    async fn write_checkpoint(&self, seq: i64, mac: String) -> Result<AuditCheckpoint, OAuthError> {
        let at = self.now();
        let cp = AuditCheckpoint {
            signature: self.checkpoints.sign(seq, &mac, at),
            public_key: self.audit_public_key(),
            seq,
            mac,
            at,
        };
        self.store
            .insert_audit_checkpoint(&cp)
            .await
            .map_err(store_err)?;
        Ok(cp)
    }

    /// A checkpoint when the last one is older than `every` seconds and entries came since,
    /// written by one process or node only (the job is claimed through the database).
    pub async fn periodic_audit_checkpoint(&self, every: i64) -> Result<(), OAuthError> {
        let last = self.store.audit_checkpoints().await.map_err(store_err)?;
        let head = self.store.list_audit(1).await.map_err(store_err)?;
        let due = match (last.last(), head.first()) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(cp), Some(h)) => h.seq > cp.seq && self.now() - cp.at >= every,
        };
        if due
            && self
                .store
                .claim_job("audit.checkpoint", self.now(), every)
                .await
                .map_err(store_err)?
        {
            self.audit_checkpoint().await?;
        }
        Ok(())
    }

    /// Retention: delete entries written before `before`, after signing a checkpoint of the
    /// last one deleted (the chain resumes from it) and in the same transaction as an
    /// `audit.prune` entry naming it. The newest entry always stays. The number deleted.
    pub async fn prune_audit(&self, before: i64) -> Result<u64, OAuthError> {
        let head = self.store.list_audit(1).await.map_err(store_err)?;
        let Some(head) = head.first().map(|e| e.seq) else {
            return Ok(0);
        };
        let Some(through) = self
            .store
            .audit_seq_before(before)
            .await
            .map_err(store_err)?
            .map(|s| s.min(head - 1))
            .filter(|s| *s >= 1)
        else {
            return Ok(0);
        };
        let last = self
            .store
            .audit_range(through - 1, 1)
            .await
            .map_err(store_err)?;
        let Some(AuditEntry {
            seq,
            mac: Some(mac),
            ..
        }) = last.into_iter().next()
        else {
            return Ok(0); // already pruned, or not chained: nothing safe to do
        };
        if seq != through {
            return Ok(0);
        }
        self.write_checkpoint(seq, mac).await?;
        let audit = AuditRecord {
            reason: Some(format!("{PRUNED_THROUGH}{through}")),
            ..self.audit(
                &Actor {
                    kind: "operator",
                    id: "vault".into(),
                    method: "retention",
                },
                "audit.prune",
            )
        };
        self.store
            .prune_audit(through, &audit)
            .await
            .map_err(store_err)
    }

    /// Walk the whole chain in order and check every stored checkpoint and `extra` (one
    /// exported earlier): the first bad or missing entry is named.
    pub async fn verify_audit(
        &self,
        extra: Option<&AuditCheckpoint>,
    ) -> Result<Result<AuditVerification, ChainBreak>, OAuthError> {
        let mut checkpoints = self.store.audit_checkpoints().await.map_err(store_err)?;
        checkpoints.extend(extra.cloned());
        let wanted: std::collections::HashSet<i64> = checkpoints.iter().map(|c| c.seq).collect();
        let mut macs_at = std::collections::HashMap::new();
        let key = &self.audit_key;
        let public_key = self.audit_public_key();
        // After retention pruning the chain resumes from the signed checkpoint of the last
        // entry deleted; the (chained) `audit.prune` entry must name it.
        let first = self.store.audit_range(0, 1).await.map_err(store_err)?;
        let pruned_through = first.first().map_or(0, |e| e.seq - 1);
        let mut v = match checkpoints.iter().find(|c| c.seq == pruned_through) {
            _ if pruned_through == 0 => ChainVerifier::default(),
            Some(cp)
                if cp.public_key == public_key
                    && latchkey_crypto::audit::verify_checkpoint(
                        &public_key,
                        cp.seq,
                        &cp.mac,
                        cp.at,
                        &cp.signature,
                    ) =>
            {
                ChainVerifier::after(cp.seq, &cp.mac)
            }
            _ => {
                return Ok(Err(ChainBreak {
                    seq: 1,
                    why: format!(
                        "missing: the chain starts at {} with no signed checkpoint of a pruning",
                        pruned_through + 1
                    ),
                }));
            }
        };
        let mut prune_recorded = pruned_through == 0;
        let mut after = 0;
        loop {
            let batch = self
                .store
                .audit_range(after, VERIFY_BATCH)
                .await
                .map_err(store_err)?;
            let Some(last) = batch.last() else { break };
            after = last.seq;
            for e in &batch {
                if let Err(b) = v.check(key, e) {
                    return Ok(Err(b));
                }
                if wanted.contains(&e.seq) {
                    macs_at.insert(e.seq, e.mac.clone().unwrap_or_default());
                }
                if e.record.action == "audit.prune"
                    && e.record.reason.as_deref()
                        == Some(format!("{PRUNED_THROUGH}{pruned_through}").as_str())
                {
                    prune_recorded = true;
                }
            }
        }
        if !prune_recorded {
            return Ok(Err(ChainBreak {
                seq: 1,
                why: format!(
                    "missing: entries 1 to {pruned_through} are gone but no pruning recorded it"
                ),
            }));
        }
        macs_at.extend(
            checkpoints
                .iter()
                .filter(|c| c.seq == pruned_through)
                .map(|c| (c.seq, c.mac.clone())),
        );
        for cp in checkpoints.iter().filter(|c| c.seq >= pruned_through) {
            let at = macs_at.get(&cp.seq).map(String::as_str);
            if let Err(b) = v.check_checkpoint(cp, &public_key, at) {
                return Ok(Err(b));
            }
        }
        Ok(Ok(AuditVerification {
            entries: v.count,
            last_seq: v.head().map(|(s, _)| s),
            checkpoints: checkpoints.len(),
        }))
    }
}
