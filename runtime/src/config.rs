//! Configuration layering shared by every binary.
//!
//! A binary declares one struct that is both a `clap::Args` (flags, each with an
//! `env = "LLMCHAIN_…"` fallback, all `Option`s without clap defaults) and a serde struct with
//! `deny_unknown_fields` (the TOML file). [`layer`] overlays the values given on the command
//! line or in the environment onto the file's, so the order of precedence is
//! flags > environment > file; the binary then fills what is still `None` with its defaults
//! and validates once into a typed settings struct.
//!
//! The environment is read by clap alone (its `env` attribute), in one place, and tests pass
//! it to child processes instead of mutating their own.

use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};

use crate::{Error, Result};

/// Reads a TOML config file into `T` (which should use `#[serde(deny_unknown_fields)]`).
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::ConfigRead { path: path.display().to_string(), source })?;
    toml::from_str(&text)
        .map_err(|e| Error::ConfigInvalid { path: path.display().to_string(), message: e.to_string() })
}

/// Overlays every field that is set (not `None`/null) in `over` onto `base`.
///
/// Both are the same struct; nested tables merge field by field.
pub fn layer<T: Serialize + DeserializeOwned>(base: &T, over: &T) -> Result<T> {
    let invalid =
        |e: serde_json::Error| Error::ConfigInvalid { path: "<merged>".into(), message: e.to_string() };
    let mut merged = serde_json::to_value(base).map_err(invalid)?;
    let over = serde_json::to_value(over).map_err(invalid)?;
    merge(&mut merged, over);
    serde_json::from_value(merged).map_err(invalid)
}

fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    use serde_json::Value;
    match (base, over) {
        (_, Value::Null) => {}
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

/// Loads the layered configuration: `cli` (flags and environment) over the file at
/// `cli_file` (if any).
pub fn load<T: Serialize + DeserializeOwned + Default>(cli: &T, file: Option<&Path>) -> Result<T> {
    match file {
        Some(path) => layer(&read_file::<T>(path)?, cli),
        None => layer(&T::default(), cli),
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        listen: Option<String>,
        store: Option<String>,
        limits: Option<Limits>,
    }

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        max_streams: Option<u32>,
        timeout_s: Option<u32>,
    }

    #[test]
    fn flags_win_over_file_and_file_fills_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:1\"\nstore = \"embedded:x\"\n[limits]\nmax_streams = 4\ntimeout_s = 9\n",
        )
        .unwrap();
        let cli = Cfg {
            listen: Some("127.0.0.1:2".into()),
            store: None,
            limits: Some(Limits { max_streams: Some(8), timeout_s: None }),
        };
        let got = load(&cli, Some(&path)).unwrap();
        assert_eq!(
            got,
            Cfg {
                listen: Some("127.0.0.1:2".into()),
                store: Some("embedded:x".into()),
                limits: Some(Limits { max_streams: Some(8), timeout_s: Some(9) }),
            }
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listn = \"x\"\n").unwrap();
        let err = load(&Cfg::default(), Some(&path)).unwrap_err().to_string();
        assert!(err.contains("c.toml") && err.contains("listn"), "{err}");
        std::fs::write(&path, "listen = 5\n").unwrap();
        assert!(load(&Cfg::default(), Some(&path)).is_err());
        let err = load(&Cfg::default(), Some(&dir.path().join("missing.toml"))).unwrap_err().to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }
}
