//! Audit chain verification over entries built from the input: each chunk is one entry (its
//! fields from the bytes), chained correctly or — when the chunk says so — with its sequence
//! number, MAC or content disturbed. Oracle: the verifier accepts exactly the chains that were
//! built correctly and names the first disturbed entry.
#![no_main]

use latchkey_core::audit::{AuditKey, ChainVerifier};
use latchkey_core::model::{AuditEntry, AuditRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = AuditKey(zeroize::Zeroizing::new(vec![3; 32]));
    let mut verifier = ChainVerifier::default();
    let mut prev: Option<String> = None;
    let mut first_bad: Option<i64> = None;
    for (i, chunk) in data.chunks(24).enumerate() {
        let seq = i as i64 + 1;
        let text = String::from_utf8_lossy(&chunk[1..]).into_owned();
        let record = AuditRecord {
            at: i64::from(chunk[0]),
            actor_type: "agent".into(),
            actor_id: text.clone(),
            action: "token.release".into(),
            decision: "allow".into(),
            reason: (chunk[0] & 2 != 0).then(|| text.clone()),
            ..Default::default()
        };
        let mac = key.mac(prev.as_deref(), seq, &record);
        let mut entry = AuditEntry {
            seq,
            record,
            mac: Some(mac.clone()),
        };
        match chunk[0] % 16 {
            0 => entry.seq += 1,                      // a gap
            1 => entry.mac = Some(format!("{mac}0")), // a forged MAC
            2 => entry.record.action.push('x'),       // an edited field
            3 => entry.mac = None,                    // a stripped MAC
            _ => {}
        }
        let disturbed = chunk[0] % 16 < 4;
        let result = verifier.check(&key, &entry);
        match (first_bad, disturbed) {
            (None, false) => assert!(result.is_ok(), "entry {seq}: {result:?}"),
            (None, true) => {
                let brk = result.expect_err("a disturbed entry verified");
                assert_eq!(brk.seq, seq, "{brk}");
                first_bad = Some(seq);
            }
            (Some(_), _) => {}
        }
        if first_bad.is_some() {
            break;
        }
        prev = Some(mac);
    }
});
