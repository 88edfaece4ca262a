//! Configuration precedence: command-line flag > `DUPLEX_*` environment >
//! TOML file > built-in default.
//!
//! clap already resolves flag > env > default. A TOML file slots in below
//! the environment by exporting each of its keys as `DUPLEX_<KEY>` when that
//! variable is not already set, before clap parses.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("config file {path}: key {key:?} must be a string, number or boolean")]
    Value { path: String, key: String },
}

/// Finds `--config FILE` / `--config=FILE` / `DUPLEX_CONFIG` and exports the
/// file's keys as environment defaults. Call before parsing arguments.
pub fn load_config_file_into_env() -> Result<(), ConfigError> {
    let args: Vec<String> = std::env::args().collect();
    let from_args = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=")
            .map(str::to_owned)
            .or_else(|| (a == "--config").then(|| args.get(i + 1).cloned()).flatten())
    });
    let Some(path) = from_args.or_else(|| std::env::var("DUPLEX_CONFIG").ok()) else {
        return Ok(());
    };
    for (key, value) in read_config_file(Path::new(&path))? {
        let var = format!("DUPLEX_{}", key.to_uppercase().replace('-', "_"));
        if std::env::var_os(&var).is_none() {
            set_env(&var, &value);
        }
    }
    Ok(())
}

#[allow(unsafe_code)]
fn set_env(key: &str, value: &str) {
    // SAFETY: called from `main` before the tokio runtime or any other
    // thread exists, so no other thread reads the environment concurrently.
    unsafe { std::env::set_var(key, value) }
}

/// The file's top-level keys as strings.
pub fn read_config_file(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: display.clone(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: display.clone(),
        source,
    })?;
    table
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(ConfigError::Value {
                        path: display.clone(),
                        key,
                    });
                }
            };
            Ok((key, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_scalars_and_refuses_tables() {
        let dir = std::env::temp_dir().join(format!("duplex-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ok = dir.join("ok.toml");
        std::fs::write(&ok, "listen = \"127.0.0.1:1\"\nsync-wait = 5\nverbose = true\n").expect("write");
        let pairs = read_config_file(&ok).expect("parse");
        assert!(pairs.contains(&("listen".into(), "127.0.0.1:1".into())));
        assert!(pairs.contains(&("sync-wait".into(), "5".into())));
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[nested]\nx = 1\n").expect("write");
        assert!(matches!(read_config_file(&bad), Err(ConfigError::Value { .. })));
    }
}
