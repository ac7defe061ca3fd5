//! Scope sets. Providers differ in separators (GitHub and Slack use commas); Latchkey stores
//! and answers with space-delimited scopes, as the SDKs expect.

use std::collections::BTreeSet;

/// An ordered set of scope tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(BTreeSet<String>);

impl Scopes {
    /// Parse a space- or comma-separated list; empty tokens are dropped.
    pub fn parse(text: &str) -> Self {
        Self(
            text.split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn is_subset(&self, other: &Scopes) -> bool {
        self.0.is_subset(&other.0)
    }

    pub fn union(&self, other: &Scopes) -> Scopes {
        Scopes(self.0.union(&other.0).cloned().collect())
    }

    pub fn intersection(&self, other: &Scopes) -> Scopes {
        Scopes(self.0.intersection(&other.0).cloned().collect())
    }

    /// Tokens of `self` not in `other`.
    pub fn missing_from(&self, other: &Scopes) -> Vec<String> {
        self.0.difference(&other.0).cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// Space-delimited.
    pub fn to_string_spaced(&self) -> String {
        self.0.iter().cloned().collect::<Vec<_>>().join(" ")
    }
}

impl<S: Into<String>> FromIterator<S> for Scopes {
    fn from_iter<I: IntoIterator<Item = S>>(items: I) -> Self {
        Self(items.into_iter().map(Into::into).collect())
    }
}

impl std::fmt::Display for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string_spaced())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spaces_and_commas() {
        let s = Scopes::parse("repo,read:user  issues");
        assert_eq!(s.to_string_spaced(), "issues read:user repo");
        assert!(Scopes::parse("repo").is_subset(&s));
        assert!(!Scopes::parse("admin").is_subset(&s));
        assert_eq!(Scopes::parse("admin repo").missing_from(&s), vec!["admin"]);
        assert!(Scopes::parse(" , ").is_empty());
    }
}
