//! Signed webhooks: events (an account needs the user to reconnect, an account recovered, …)
//! are enqueued in the same transaction as the change they report, through the audit record's
//! `notify`, and delivered at least once by [`Vault::deliver_webhooks`], retried with backoff.
//!
//! Each delivery is a `POST` of the JSON event with:
//! - `Latchkey-Event`: the event type, e.g. `account.needs_reauth`;
//! - `Latchkey-Delivery`: the delivery id, the same on every retry (receivers deduplicate on it);
//! - `Latchkey-Signature: t={unix seconds},v1={hex HMAC-SHA256(secret, "{t}.{body}")}`.
//!
//! A receiver recomputes the HMAC over the timestamp, a dot and the raw body, compares in
//! constant time, and rejects timestamps more than a few minutes old (replay).

use super::*;

/// Attempts before a delivery is given up (logged and counted): about two hours of retries.
const MAX_ATTEMPTS: i64 = 8;
/// How long a sender holds a claimed delivery before another may try it (seconds).
const CLAIM_SECS: i64 = 60;

/// Where webhooks go and the secret that signs them.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: SecretString,
    /// Also send every audit entry (`audit.entry`).
    pub audit_entries: bool,
}

/// What one delivery pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: usize,
    pub retrying: usize,
    pub given_up: usize,
}

/// The signature header value for `body` at time `t`.
pub fn webhook_signature(secret: &[u8], t: i64, body: &str) -> String {
    let mac = secrets::hmac_hex(secret, format!("{t}.{body}").as_bytes());
    format!("t={t},v1={mac}")
}

/// Seconds to wait after the `attempts`-th failure: 30 s doubling to an hour, with jitter.
fn backoff(attempts: i64) -> i64 {
    let base = (30i64 << attempts.clamp(1, 8).saturating_sub(1)).min(3600);
    base + i64::from(secrets::random_bytes(1)[0]) % (base / 10 + 1)
}

impl Vault {
    /// An event about a connected account, if webhooks are configured.
    pub(super) fn account_event(
        &self,
        event: &str,
        account: &ConnectedAccount,
        conn: &Connection,
        reason: Option<&str>,
    ) -> Option<Notification> {
        self.config.webhook.as_ref()?;
        let status = match event {
            "account.recovered" => "active",
            "account.needs_reauth" => "needs_reauth",
            _ => account.status.as_str(),
        };
        let body = serde_json::json!({
            "type": event,
            "created_at": self.now(),
            "data": {
                "account_id": account.id,
                "user_id": account.user_id,
                "connection": conn.name,
                "status": status,
                "reason": reason,
                "connect_uri": self.config.connect_uri(&conn.name),
            },
        });
        Some(Notification {
            event: event.to_owned(),
            body: body.to_string(),
        })
    }

    /// Send the deliveries that are due, one at a time, at most `limit`. Failures are retried
    /// later with backoff; after [`MAX_ATTEMPTS`] a delivery is given up.
    pub async fn deliver_webhooks(&self, limit: i64) -> DeliveryReport {
        let mut report = DeliveryReport::default();
        let Some(hook) = self.config.webhook.as_ref() else {
            return report;
        };
        let now = self.now();
        let items = match self
            .store
            .claim_webhooks(now, now + CLAIM_SECS, limit)
            .await
        {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(error = %e, "reading the webhook outbox failed");
                return report;
            }
        };
        for item in items {
            let t = self.now();
            let headers = [
                ("Latchkey-Event", item.event.clone()),
                ("Latchkey-Delivery", item.id.clone()),
                (
                    "Latchkey-Signature",
                    webhook_signature(hook.secret.expose_secret().as_bytes(), t, &item.body),
                ),
            ];
            let outcome = self
                .upstream
                .post_webhook(&hook.url, &headers, &item.body)
                .await;
            let attempts = item.attempts + 1;
            let stored = match &outcome {
                Ok(()) => {
                    report.delivered += 1;
                    self.store.webhook_delivered(&item.id, self.now()).await
                }
                Err(error) => {
                    let retry_at =
                        (attempts < MAX_ATTEMPTS).then(|| self.now() + backoff(attempts));
                    if retry_at.is_some() {
                        report.retrying += 1;
                        tracing::info!(delivery = %item.id, event = %item.event, %error, attempts, "webhook delivery failed; will retry");
                    } else {
                        report.given_up += 1;
                        tracing::warn!(delivery = %item.id, event = %item.event, %error, attempts, "webhook delivery given up");
                    }
                    self.store
                        .webhook_failed(&item.id, self.now(), retry_at, error)
                        .await
                }
            };
            if let Err(e) = stored {
                tracing::warn!(error = %e, delivery = %item.id, "recording a webhook attempt failed");
            }
            let result = if outcome.is_ok() {
                "delivered"
            } else {
                "failed"
            };
            metrics::counter!("latchkey_webhook_deliveries_total", "result" => result).increment(1);
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_over_timestamp_and_body() {
        // Independent check: HMAC-SHA256("key", "5.{}") computed with Python's hmac module.
        assert_eq!(
            webhook_signature(b"key", 5, "{}"),
            "t=5,v1=9be615aec64f0d044b5ad6854ab1d893ec88617fb728d2149dcd3a3428e8c45d"
        );
    }

    #[test]
    fn backoff_grows_to_an_hour_with_bounded_jitter() {
        for (attempts, base) in [(1, 30), (2, 60), (3, 120), (7, 1920), (8, 3600), (20, 3600)] {
            let d = backoff(attempts);
            assert!((base..=base + base / 10).contains(&d), "{attempts}: {d}");
        }
    }
}
