//! The demo provider's scope vocabulary as a tiny bit set.
//!
//! The list of known scopes lives in `latchkey_core::catalog::demo_paths::SCOPES` so the vault's
//! catalog and this provider cannot drift apart; a bit set keeps grants `Copy` and makes
//! subset checks (refresh narrowing, API checks) one instruction.

use latchkey_core::catalog::demo_paths::SCOPES;

// One bit per known scope.
const _: () = assert!(SCOPES.len() <= 8);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ScopeSet(u8);

impl ScopeSet {
    /// Parse an RFC 6749 `scope` value (space-delimited). Every token must be known; the error
    /// carries the first unknown token. Repeated tokens are harmless.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut bits = 0u8;
        for token in text.split(' ').filter(|t| !t.is_empty()) {
            match SCOPES.iter().position(|s| *s == token) {
                Some(i) => bits |= 1 << i,
                None => return Err(token.to_owned()),
            }
        }
        Ok(Self(bits))
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn contains(self, name: &str) -> bool {
        SCOPES
            .iter()
            .position(|s| *s == name)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }

    pub(crate) fn is_subset_of(self, other: ScopeSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// Scope names in the catalog's canonical order.
    pub(crate) fn names(self) -> impl Iterator<Item = &'static str> {
        SCOPES
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, s)| *s)
    }

    /// Space-delimited, canonical order: the form token responses use.
    pub(crate) fn to_spaced(self) -> String {
        self.names().collect::<Vec<_>>().join(" ")
    }
}

/// A human description for the consent page.
pub(crate) fn describe(name: &str) -> &'static str {
    match name {
        "read:user" => "Read your profile (login, id and name)",
        "repo:read" => "List your repositories and read their issues",
        "repo:write" => "Write to your repositories",
        "issues:write" => "Open issues and post comments",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_scopes_canonically() {
        let s = ScopeSet::parse("issues:write  read:user read:user").unwrap();
        assert_eq!(s.to_spaced(), "read:user issues:write");
        assert!(s.contains("read:user"));
        assert!(!s.contains("repo:read"));
        assert!(!s.contains("nope"));
        assert!(ScopeSet::parse("read:user").unwrap().is_subset_of(s));
        assert!(!ScopeSet::parse("repo:read").unwrap().is_subset_of(s));
        assert!(ScopeSet::parse("").unwrap().is_empty());
    }

    #[test]
    fn rejects_unknown_and_comma_separated() {
        assert_eq!(ScopeSet::parse("read:user admin"), Err("admin".into()));
        // RFC 6749 scopes are space-delimited; a comma list is one unknown token.
        assert!(ScopeSet::parse("read:user,repo:read").is_err());
    }

    #[test]
    fn every_catalog_scope_is_described() {
        for s in SCOPES {
            assert!(!describe(s).is_empty(), "{s}");
        }
    }
}
