//! OAuth request parameters, whatever the body encoding.
//!
//! Form and JSON bodies both become [`Params`] through [`Params::from_pairs`], so the same
//! rules hold for both: every parameter at most once (RFC 6749 §3.1), bounded name and value
//! sizes, bounded count, valid UTF-8 without NUL. An empty value counts as absent (RFC 6749
//! §3.1), which also covers SDKs that send `audience=` for "unset".

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

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

    /// A request body as the token endpoint takes it: `application/x-www-form-urlencoded`
    /// (valid UTF-8) or `application/json` (an object of string, number or boolean members;
    /// `null` is absent), by its `Content-Type` (parameters such as `charset` ignored). Any
    /// other type, or a body that does not decode, is `invalid_request`.
    pub fn from_body(content_type: Option<&str>, bytes: &[u8]) -> Result<Self, OAuthError> {
        let content_type = content_type
            .and_then(|v| v.split(';').next())
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match content_type.as_str() {
            "application/x-www-form-urlencoded" => {
                std::str::from_utf8(bytes)
                    .map_err(|_| OAuthError::invalid_request("the body is not valid UTF-8"))?;
                Params::from_pairs(
                    url::form_urlencoded::parse(bytes)
                        .map(|(k, v)| (k.into_owned(), v.into_owned())),
                )
            }
            "application/json" => {
                let pairs: JsonPairs = serde_json::from_slice(bytes).map_err(|_| {
                    OAuthError::invalid_request(
                        "the body is not a JSON object of string parameters",
                    )
                })?;
                Params::from_pairs(pairs.0)
            }
            _ => Err(OAuthError::invalid_request(
                "unsupported Content-Type: send application/x-www-form-urlencoded or application/json",
            )),
        }
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

/// A JSON object read as a list of pairs, so a repeated member is seen (serde_json's maps
/// would silently keep the last). `null` means absent; numbers and booleans become strings.
struct JsonPairs(Vec<(String, String)>);

impl<'de> Deserialize<'de> for JsonPairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonPairs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonPairs, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    let v = match v {
                        serde_json::Value::Null => continue,
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Number(n) => n.to_string(),
                        serde_json::Value::Bool(b) => b.to_string(),
                        _ => {
                            return Err(serde::de::Error::custom(
                                "parameter values must be strings",
                            ));
                        }
                    };
                    out.push((k, v));
                    if out.len() > MAX_PARAMS {
                        return Err(serde::de::Error::custom("too many parameters"));
                    }
                }
                Ok(JsonPairs(out))
            }
        }
        d.deserialize_map(V)
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
