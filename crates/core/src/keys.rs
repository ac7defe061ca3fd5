//! The vault's keys at run time: the KEK, the unwrapped data keys, and rotation.
//!
//! Start is "sealed" until [`KeyService::unseal`] proves the KEK opens every data key in the
//! database; a wrong key refuses to start rather than serving garbage. Data keys sealed by a
//! later `latchkey key rotate` (another process, same database) are loaded on first sight, so
//! rotation works while the server runs.

use std::sync::{Arc, RwLock};

use latchkey_crypto::envelope::{DataKeyMaterial, EnvelopeError, Kek, Keyring, Slot, blob_version};
use zeroize::Zeroizing;

use crate::model::AuditRecord;
use crate::store::{DataKeyRow, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "sealed: the key-encryption key {fingerprint} does not open this database (data key v{version} was \
         wrapped by key {wrapped_by}). Start Latchkey with the key this database was created with \
         (the `kek` file in the data directory, LATCHKEY_KEK or LATCHKEY_KEK_FILE)"
    )]
    Sealed {
        fingerprint: String,
        version: u32,
        wrapped_by: String,
    },
    #[error("a stored secret does not decrypt: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

type KekReloader = Box<dyn Fn() -> Option<Kek> + Send + Sync>;

pub struct KeyService {
    store: Arc<dyn Store>,
    kek: RwLock<Arc<Kek>>,
    reload_kek: Option<KekReloader>,
    ring: RwLock<Keyring>,
}

/// What a data-key rotation did.
#[derive(Debug, Clone, Copy)]
pub struct RotationReport {
    pub new_version: u32,
    pub resealed: usize,
}

impl KeyService {
    /// Open every data key with `kek`, creating the first one in a fresh database.
    /// `reload_kek` re-reads the KEK source after another process rotated it.
    pub async fn unseal(
        store: Arc<dyn Store>,
        kek: Kek,
        reload_kek: Option<KekReloader>,
        now: i64,
    ) -> Result<Self, KeyError> {
        let mut rows = store.data_keys().await?;
        if rows.is_empty() {
            let row = DataKeyRow {
                version: 1,
                kek_id: kek.fingerprint(),
                wrapped: kek.wrap(&DataKeyMaterial::generate(), 1),
                created_at: now,
            };
            let audit = operator_audit(now, "key.create", "first data key");
            match store.insert_data_key(&row, &audit).await {
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
            rows = store.data_keys().await?;
        }
        let mut ring = Keyring::default();
        for row in &rows {
            let material = kek
                .unwrap(&row.wrapped, row.version)
                .map_err(|_| KeyError::Sealed {
                    fingerprint: kek.fingerprint(),
                    version: row.version,
                    wrapped_by: row.kek_id.clone(),
                })?;
            ring.insert(row.version, &material);
        }
        Ok(Self {
            store,
            kek: RwLock::new(Arc::new(kek)),
            reload_kek,
            ring: RwLock::new(ring),
        })
    }

    /// Seal a value for its slot under the active data key.
    pub fn seal(&self, slot: Slot<'_>, plain: &[u8]) -> Vec<u8> {
        self.ring
            .read()
            .expect("keyring lock")
            .seal(slot, plain)
            .expect("the active data key is always loaded")
    }

    /// Open a sealed value; loads a data key this process has not seen yet.
    pub async fn open(&self, slot: Slot<'_>, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let version = blob_version(blob)?;
        if !self.ring.read().expect("keyring lock").has(version) {
            self.load_new_keys().await?;
        }
        Ok(self.ring.read().expect("keyring lock").open(slot, blob)?)
    }

    /// A server secret kept sealed in `server_secrets` (the client-secret pepper, the signing
    /// key, the demo provider's client secret), made by `create` on first use. Concurrent first
    /// uses agree on one value: the first insert wins and everyone reads it back.
    pub async fn server_secret(
        &self,
        name: &str,
        create: impl FnOnce() -> Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let slot = Slot {
            table: "server_secrets",
            field: "value",
            row: name,
        };
        let blob = match self.store.server_secret(name).await? {
            Some(b) => b,
            None => {
                let sealed = self.seal(slot, &create());
                self.store.init_server_secret(name, &sealed).await?
            }
        };
        self.open(slot, &blob).await
    }

    /// Open a sealed UTF-8 secret.
    pub async fn open_string(
        &self,
        slot: Slot<'_>,
        blob: &[u8],
    ) -> Result<secrecy::SecretString, KeyError> {
        let plain = self.open(slot, blob).await?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| EnvelopeError::Malformed)?;
        Ok(secrecy::SecretString::from(text))
    }

    async fn load_new_keys(&self) -> Result<(), KeyError> {
        let rows = self.store.data_keys().await?;
        for attempt in 0..2 {
            let kek = self.kek.read().expect("kek lock").clone();
            let mut failed = None;
            {
                let mut ring = self.ring.write().expect("keyring lock");
                for row in &rows {
                    if ring.has(row.version) {
                        continue;
                    }
                    match kek.unwrap(&row.wrapped, row.version) {
                        Ok(m) => ring.insert(row.version, &m),
                        Err(_) => failed = Some(row.clone()),
                    }
                }
            }
            let Some(row) = failed else { return Ok(()) };
            // The KEK itself may have been rotated by another process: re-read it once.
            match (&self.reload_kek, attempt) {
                (Some(reload), 0) => {
                    if let Some(new) = reload() {
                        *self.kek.write().expect("kek lock") = Arc::new(new);
                    }
                }
                _ => {
                    return Err(KeyError::Sealed {
                        fingerprint: kek.fingerprint(),
                        version: row.version,
                        wrapped_by: row.kek_id,
                    });
                }
            }
        }
        Ok(())
    }

    /// Start a new data key and re-seal every stored secret with it.
    pub async fn rotate_data_key(&self, now: i64) -> Result<RotationReport, KeyError> {
        self.load_new_keys().await?;
        let kek = self.kek.read().expect("kek lock").clone();
        let version = self.ring.read().expect("keyring lock").active_version() + 1;
        let material = DataKeyMaterial::generate();
        let row = DataKeyRow {
            version,
            kek_id: kek.fingerprint(),
            wrapped: kek.wrap(&material, version),
            created_at: now,
        };
        self.store
            .insert_data_key(
                &row,
                &operator_audit(now, "key.rotate", &format!("data key v{version}")),
            )
            .await?;
        self.ring
            .write()
            .expect("keyring lock")
            .insert(version, &material);
        let mut pairs = Vec::new();
        for field in self.store.sealed_fields().await? {
            let slot = Slot {
                table: field.table,
                field: field.field,
                row: &field.row,
            };
            let plain = self.open(slot, &field.blob).await?;
            let new = self.seal(slot, &plain);
            pairs.push((field, new));
        }
        let resealed = self.store.reseal_fields(&pairs).await?;
        Ok(RotationReport {
            new_version: version,
            resealed,
        })
    }

    /// Re-wrap every data key under `new_kek`. The caller persists the new KEK first.
    pub async fn rotate_kek(&self, new_kek: Kek, now: i64) -> Result<(), KeyError> {
        self.load_new_keys().await?;
        let old = self.kek.read().expect("kek lock").clone();
        let mut rows = self.store.data_keys().await?;
        for row in &mut rows {
            let material = old
                .unwrap(&row.wrapped, row.version)
                .map_err(|_| KeyError::Sealed {
                    fingerprint: old.fingerprint(),
                    version: row.version,
                    wrapped_by: row.kek_id.clone(),
                })?;
            row.wrapped = new_kek.wrap(&material, row.version);
            row.kek_id = new_kek.fingerprint();
        }
        let audit = operator_audit(
            now,
            "key.rotate_kek",
            &format!("new KEK {}", new_kek.fingerprint()),
        );
        self.store.rewrap_data_keys(&rows, &audit).await?;
        *self.kek.write().expect("kek lock") = Arc::new(new_kek);
        Ok(())
    }

    pub fn active_version(&self) -> u32 {
        self.ring.read().expect("keyring lock").active_version()
    }

    pub fn kek_fingerprint(&self) -> String {
        self.kek.read().expect("kek lock").fingerprint()
    }
}

fn operator_audit(now: i64, action: &str, reason: &str) -> AuditRecord {
    AuditRecord {
        at: now,
        actor_type: "operator".into(),
        actor_id: "local".into(),
        auth_method: "cli".into(),
        action: action.into(),
        decision: "allow".into(),
        reason: Some(reason.into()),
        ..Default::default()
    }
}
