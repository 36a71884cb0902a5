//! Validated identifiers: `TaskId` and `SessionId`. Parsing is the only way to make one, so every id
//! that reaches a backend, a key or an environment variable is already known to be safe.

use std::fmt;
use std::str::FromStr;

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest id accepted, in bytes (all allowed characters are ASCII).
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid id. The message quotes the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct InvalidId {
    /// `task id` or `session id`.
    pub kind: &'static str,
    /// The rejected input, as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

fn validate(kind: &'static str, value: &str) -> Result<(), InvalidId> {
    let fail = |reason: String| InvalidId {
        kind,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(fail("must not be empty".into()));
    }
    if value.len() > MAX_ID_LEN {
        return Err(fail(format!("longer than {MAX_ID_LEN} characters")));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')))
    {
        return Err(fail(format!(
            "character {bad:?} is not allowed (use letters, digits, '.', '-', '_', ':')"
        )));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        ///
        /// Cloning is a reference-count increment: ids travel in every event to every subscriber.
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Parses and validates an id: 1-128 characters of ASCII letters, digits, `.`, `-`, `_`, `:`.
            pub fn parse(value: &str) -> Result<Self, InvalidId> {
                validate($kind, value)?;
                Ok(Self(Arc::from(value)))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A task's id, e.g. `P0.5.4`.
    TaskId,
    "task id"
);
id_type!(
    /// A session's id, e.g. `session-1-ndi`.
    SessionId,
    "session id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_guide_ids() {
        for ok in [
            "P0.5.4",
            "session-1-ndi",
            "TEST-RACE",
            "a",
            "ns:task_1",
            &"x".repeat(128),
        ] {
            assert!(TaskId::parse(ok).is_ok(), "{ok}");
            assert!(SessionId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_and_quotes_bad_values() {
        let long = "x".repeat(129);
        for bad in [
            "",
            "a b",
            "../etc",
            "x;rm -rf",
            "t\n",
            "tâsk",
            "a/b",
            long.as_str(),
        ] {
            let err = TaskId::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
            assert!(err.to_string().starts_with("invalid task id"), "{err}");
        }
        let err = SessionId::parse("s 1").expect_err("space");
        assert_eq!(err.to_string(), "invalid session id \"s 1\": character ' ' is not allowed (use letters, digits, '.', '-', '_', ':')");
    }

    #[test]
    fn deserializing_validates() {
        let ok: TaskId = serde_json::from_str("\"P0.1\"").expect("valid");
        assert_eq!(ok.as_str(), "P0.1");
        assert!(serde_json::from_str::<TaskId>("\"a b\"").is_err());
    }
}
