//! The security-critical dependencies in `Cargo.lock` are at or above the first version that
//! fixes each known advisory against them (issue 12 item 7: "a check for the JOSE crate's
//! minimum safe version"). `cargo deny` checks licences, sources and bans in CI; its advisory
//! database cannot be fetched from CI's network, so the advisories that matter most are pinned
//! here by hand. Raise a floor when an advisory is published; never lower one.

/// (crate, first safe version, why).
const FLOORS: &[(&str, [u64; 3], &str)] = &[
    (
        "jsonwebtoken",
        [10, 3, 0],
        "CVE-2026-25537 / GHSA-h395-gr6q-cpjc: a claim of the wrong JSON type (exp or nbf as a \
         string) skipped its validation",
    ),
    (
        "aws-lc-sys",
        [0, 41, 0],
        "RUSTSEC-2026-0044..0048: X.509 name constraints, AES-CCM tag timing, PKCS7 and CRL checks",
    ),
    (
        "sqlx-postgres",
        [0, 9, 1],
        "launchbadge/sqlx#4393: a BEGIN cancelled in flight left the pooled connection inside an \
         open transaction",
    ),
    (
        "rustls",
        [0, 23, 18],
        "RUSTSEC-2024-0399: a panic on a fragmented TLS ClientHello (server side)",
    ),
];

/// Crates that must not be in the tree at all.
const BANNED: &[(&str, &str)] = &[(
    "rsa",
    "RUSTSEC-2023-0071 (Marvin: timing side channel on RSA decryption), no fixed version; RSA \
     comes from aws-lc-rs",
)];

fn locked() -> Vec<(String, [u64; 3])> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock"))
        .expect("the workspace's Cargo.lock");
    let mut out = Vec::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |key: &str| {
            block.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.trim().strip_prefix('='))
                    .map(|v| v.trim().trim_matches('"').to_owned())
            })
        };
        let (Some(name), Some(version)) = (field("name "), field("version ")) else {
            continue;
        };
        let core = version.split(['-', '+']).next().unwrap_or_default();
        let mut parts = core.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        let v = [
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        ];
        out.push((name, v));
    }
    out
}

#[test]
fn security_critical_crates_are_at_or_above_their_first_safe_version() {
    let locked = locked();
    assert!(
        locked.len() > 100,
        "Cargo.lock parsed: {} packages",
        locked.len()
    );
    for (name, floor, why) in FLOORS {
        let versions: Vec<_> = locked.iter().filter(|(n, _)| n == name).collect();
        assert!(
            !versions.is_empty(),
            "{name} is no longer in Cargo.lock: update FLOORS"
        );
        for (_, v) in versions {
            assert!(
                v >= floor,
                "{name} {v:?} is below {floor:?}, the first version without {why}"
            );
        }
    }
    for (name, why) in BANNED {
        assert!(
            !locked.iter().any(|(n, _)| n == name),
            "{name} is in Cargo.lock: {why}"
        );
    }
}
