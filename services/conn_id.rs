//! Connection ids: the opaque M-Lab "UUID" that names a trace file.

use std::fmt;

use regex::Regex;

/// The default allow-list: an M-Lab id (`<host>_<boottime>_<cookie %016X>`) or any similar
/// token of letters, digits, `.`, `_` and `-` that starts with a letter or digit.
pub const DEFAULT_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,159}$";

/// Longest id accepted whatever the pattern says, so a file name stays under NAME_MAX.
const MAX_LEN: usize = 200;

/// A validated connection id: safe to use as part of a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(String);

impl ConnectionId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadConnectionId {
    /// Empty.
    #[error("connection id is empty")]
    Empty,
    /// Longer than any file name may be.
    #[error("connection id is {0} bytes long, the limit is {MAX_LEN}")]
    TooLong(usize),
    /// Holds a character that could escape the output directory or confuse a reader.
    #[error(
        "connection id {0:?} contains '/', '\\\\', NUL, a control character or starts with '.'"
    )]
    Unsafe(String),
    /// Does not match the configured allow-list.
    #[error("connection id {id:?} does not match the allowed pattern {pattern}")]
    NotAllowed {
        /// The refused id.
        id: String,
        /// The pattern it had to match.
        pattern: String,
    },
}

/// Validates connection ids against an allow-list pattern.
#[derive(Debug, Clone)]
pub struct ConnectionIds {
    pattern: Regex,
}

impl ConnectionIds {
    /// Ids must match `pattern` (anchor it: `^…$`).
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        Ok(Self {
            pattern: Regex::new(pattern)?,
        })
    }

    /// Checks `id`. Whatever the configured pattern allows, an id can never hold a path
    /// separator, NUL or control character, nor start with a dot, so it cannot leave the
    /// output directory or hide a file.
    pub fn validate(&self, id: &str) -> Result<ConnectionId, BadConnectionId> {
        if id.is_empty() {
            return Err(BadConnectionId::Empty);
        }
        if id.len() > MAX_LEN {
            return Err(BadConnectionId::TooLong(id.len()));
        }
        if id.starts_with('.') || id.chars().any(|c| c == '/' || c == '\\' || c.is_control()) {
            return Err(BadConnectionId::Unsafe(id.to_owned()));
        }
        if !self.pattern.is_match(id) {
            return Err(BadConnectionId::NotAllowed {
                id: id.to_owned(),
                pattern: self.pattern.as_str().to_owned(),
            });
        }
        Ok(ConnectionId(id.to_owned()))
    }
}

impl Default for ConnectionIds {
    fn default() -> Self {
        Self::new(DEFAULT_PATTERN).expect("the default pattern compiles")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlab_ids_pass() {
        let ids = ConnectionIds::default();
        for id in [
            "ndt-plh7v_1566050090_000000000004D64D",
            "host_1696950000_00000000000084FF",
            "a",
            "x.y-z_1",
        ] {
            assert_eq!(ids.validate(id).map(|c| c.to_string()), Ok(id.to_owned()));
        }
    }

    #[test]
    fn hostile_ids_are_refused_even_by_a_permissive_pattern() {
        let permissive = ConnectionIds::new(r"^.*$").expect("compiles");
        for id in [
            "../etc/passwd",
            "a/b",
            "..",
            ".hidden",
            "nul\0byte",
            "new\nline",
            "back\\slash",
        ] {
            assert!(permissive.validate(id).is_err(), "{id:?} accepted");
        }
        assert_eq!(permissive.validate(""), Err(BadConnectionId::Empty));
        let long = "a".repeat(201);
        assert_eq!(
            permissive.validate(&long),
            Err(BadConnectionId::TooLong(201))
        );
    }

    #[test]
    fn the_default_pattern_refuses_odd_characters() {
        let ids = ConnectionIds::default();
        for id in ["has space", "semi;colon", "-leading-dash", "ünïcode", "a*b"] {
            assert!(
                matches!(ids.validate(id), Err(BadConnectionId::NotAllowed { .. })),
                "{id:?}"
            );
        }
    }
}
