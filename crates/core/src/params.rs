//! OAuth request parameters, whatever the body encoding.
//!
//! Form and JSON bodies both become [`Params`] through [`Params::from_pairs`], so the same
//! rules hold for both: every parameter at most once (RFC 6749 §3.1), bounded name and value
//! sizes, bounded count, valid UTF-8 without NUL. An empty value counts as absent (RFC 6749
//! §3.1), which also covers SDKs that send `audience=` for "unset".

use std::collections::BTreeMap;

use crate::OAuthError;

/// Longest parameter value accepted (a signed JWT is the largest legitimate one).
pub const MAX_VALUE_LEN: usize = 8 * 1024;
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_PARAMS: usize = 32;

#[derive(Debug, Default, Clone)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    pub fn from_pairs<I>(pairs: I) -> Result<Self, OAuthError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut map = BTreeMap::new();
        for (count, (name, value)) in pairs.into_iter().enumerate() {
            if count >= MAX_PARAMS {
                return Err(OAuthError::invalid_request("too many parameters"));
            }
            if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
                return Err(OAuthError::invalid_request("malformed parameter name"));
            }
            if value.len() > MAX_VALUE_LEN {
                return Err(OAuthError::invalid_request(format!(
                    "parameter `{name}` is too long"
                )));
            }
            if value.contains('\0') {
                return Err(OAuthError::invalid_request(format!(
                    "parameter `{name}` contains a NUL byte"
                )));
            }
            if map.contains_key(&name) {
                return Err(OAuthError::invalid_request(format!(
                    "parameter `{name}` is repeated"
                )));
            }
            map.insert(name, value);
        }
        Ok(Self(map))
    }

    /// The value, or `None` when absent or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name)
            .ok_or_else(|| OAuthError::invalid_request(format!("parameter `{name}` is required")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[(&str, &str)]) -> Result<Params, OAuthError> {
        Params::from_pairs(v.iter().map(|(a, b)| (a.to_string(), b.to_string())))
    }

    #[test]
    fn rules() {
        assert!(p(&[("a", "1"), ("a", "2")]).is_err());
        assert!(p(&[("a", &"x".repeat(MAX_VALUE_LEN + 1))]).is_err());
        assert!(p(&[("", "1")]).is_err());
        assert!(p(&[("a", "x\0")]).is_err());
        let ok = p(&[("a", "1"), ("b", "")]).unwrap();
        assert_eq!(ok.get("a"), Some("1"));
        assert_eq!(ok.get("b"), None);
        assert_eq!(ok.require("b").unwrap_err().code, "invalid_request");
    }
}
