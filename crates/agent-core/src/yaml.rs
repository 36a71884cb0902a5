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
    serde_yaml::from_str(text).map_err(|e| YamlError {
        file: file.display().to_string(),
        line: e.location().map(|l| l.line()),
        message: e.to_string(),
    })
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
    }
}
