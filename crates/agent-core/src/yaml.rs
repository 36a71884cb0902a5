//! YAML reading, the one place that knows `serde_yaml`: errors name the file, line and key.

use std::path::Path;

use serde::de::DeserializeOwned;

/// A YAML document that could not be read into the expected type.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct YamlError {
    /// The file (or other source name).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong, naming the key where the parser knows it.
    pub message: String,
}

/// Parses `text` (read from `file`) as `T`. Use `#[serde(deny_unknown_fields)]` on `T` so unknown keys
/// are errors.
pub fn from_str<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, YamlError> {
    serde_yaml::from_str(text).map_err(|e| {
        let mut message = e.to_string();
        let line = e.location().map(|l| {
            match duplicate_line(text, &message, l.line(), l.column()) {
                Some(dup) => {
                    // serde's own "at line N column M" names the mapping, not the duplicate.
                    if let Some(at) = message.rfind(" at line ") {
                        message.truncate(at);
                    }
                    dup
                }
                None => l.line(),
            }
        });
        YamlError {
            file: file.display().to_string(),
            line,
            message,
        }
    })
}

/// The line of the second `key:` of a mapping that has it twice: serde names the mapping's
/// first line (`line`, keys at `column`), which is not where the mistake is.
fn duplicate_line(text: &str, message: &str, line: usize, column: usize) -> Option<usize> {
    let (_, after) = message.split_once("duplicate field `")?;
    let key = after.split('`').next()?;
    let indent = column.saturating_sub(1);
    text.lines()
        .enumerate()
        .skip(line.saturating_sub(1))
        .filter(|(_, l)| {
            l.len() > indent
                && l[..indent].chars().all(|c| c == ' ')
                && l[indent..]
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .nth(1)
        .map(|(i, _)| i + 1)
}

/// Reads a map whose keys may appear once (`#[serde(deserialize_with = "unique_map")]`):
/// serde_yaml keeps the last of a nested map's duplicate keys without a word (the tester's
/// report: `env:` with `FOO` twice ran with the second). The error names the key, and
/// `from_str` finds its line.
pub fn unique_map<'de, D, K, V>(d: D) -> Result<std::collections::BTreeMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: serde::Deserialize<'de> + Ord + std::fmt::Display,
    V: serde::Deserialize<'de>,
{
    struct Unique<K, V>(std::marker::PhantomData<(K, V)>);
    impl<'de, K, V> serde::de::Visitor<'de> for Unique<K, V>
    where
        K: serde::Deserialize<'de> + Ord + std::fmt::Display,
        V: serde::Deserialize<'de>,
    {
        type Value = std::collections::BTreeMap<K, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = std::collections::BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<K, V>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!("duplicate field `{k}`")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique(std::marker::PhantomData))
}

/// Writes `value` as a YAML document.
pub fn to_string<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_yaml::to_string(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Conf {
        name: String,
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let err =
            from_str::<Conf>(Path::new("a.yaml"), "name: x\nnmae: y\n").expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.starts_with("a.yaml:2:"), "{msg}");
        assert!(msg.contains("nmae"), "{msg}");
        // Issue 16: a duplicate key was reported on the mapping's first line.
        let err = from_str::<Conf>(Path::new("a.yaml"), "# c\nname: x\n\nname: y\n")
            .expect_err("duplicate key");
        let msg = err.to_string();
        assert!(msg.starts_with("a.yaml:4:"), "{msg}");
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Conf,
        other: Option<Conf>,
    }

    #[test]
    fn a_nested_duplicate_key_is_found_in_its_own_mapping() {
        let text = "other:\n  name: a\ninner:\n  name: x\n  name: y\n";
        let err = from_str::<Outer>(Path::new("b.yaml"), text).expect_err("duplicate key");
        let msg = err.to_string();
        assert!(msg.starts_with("b.yaml:5:"), "{msg}");
    }
}
