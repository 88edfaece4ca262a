//! Configuration precedence: command-line flag > `DUPLEX_*` environment >
//! TOML file (`--config FILE` or `DUPLEX_CONFIG`) > built-in default.
//!
//! clap is the one schema: it already resolves flag > env > default and
//! knows every option's name, type and parser. A file's keys are the
//! options' long names; each is checked against that schema (an unknown
//! key or a bad value names the file and the key) and handed to clap as
//! the option itself, unless the command line or the environment already
//! set it. Nothing touches the process environment.
//!
//! figment was the other candidate; it merges into serde structs, and our
//! options are clap structs flattened into each binary's, which serde's
//! `deny_unknown_fields` cannot check through `flatten`: it would mean a
//! second schema to keep in step with the first.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::ArgAction;
use clap::parser::ValueSource;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("config file {path}: unknown key {key:?}{hint}")]
    Unknown { path: String, key: String, hint: String },
    #[error("config file {path}: key {key:?}: {reason}")]
    Value {
        path: String,
        key: String,
        reason: String,
    },
}

/// Parses this process's command line into `C`, with the config file's
/// keys below flags and environment. clap's own errors (and `--help`,
/// `--version`) exit as clap does; the file's errors are returned.
pub fn parse<C: clap::Parser>() -> Result<C, ConfigError> {
    parse_from(std::env::args_os().collect())
}

/// [`parse`] for a given command line (the first item is the program).
pub fn parse_from<C: clap::Parser>(args: Vec<OsString>) -> Result<C, ConfigError> {
    let command = C::command();
    // A first, forgiving pass: where is the file, and what did the
    // command line and the environment already set?
    let first = command.clone().ignore_errors(true).get_matches_from(&args);
    let file = first.try_get_one::<PathBuf>("config").ok().flatten().cloned();
    let Some(path) = file else {
        return Ok(C::parse_from(args));
    };
    let from_file = file_args(&command, &first, &path)?;
    let mut merged = Vec::with_capacity(args.len() + from_file.len());
    let mut args = args.into_iter();
    merged.extend(args.next());
    // Right after the program name, so they are read as the top-level
    // options they are even when a subcommand follows.
    merged.extend(from_file);
    merged.extend(args);
    let matches = command.get_matches_from(merged);
    Ok(C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

/// The file's keys as command-line options, checked against `command`,
/// leaving out those the command line or environment set.
fn file_args(
    command: &clap::Command,
    first: &clap::ArgMatches,
    path: &Path,
) -> Result<Vec<OsString>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: shown.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (key, value) in table {
        let value_error = |reason: String| ConfigError::Value {
            path: shown.clone(),
            key: key.clone(),
            reason,
        };
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
        else {
            return Err(ConfigError::Unknown {
                hint: hint(command, &key),
                path: shown.clone(),
                key,
            });
        };
        if key == "config" {
            return Err(value_error("a config file cannot name another".into()));
        }
        let id = arg.get_id().as_str();
        let set_above = matches!(
            first.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        let values = scalars(&value).map_err(value_error)?;
        if let ArgAction::SetTrue = arg.get_action() {
            let list = value_list(&value);
            let [toml::Value::Boolean(on)] = list.as_slice() else {
                return Err(value_error("must be true or false".into()));
            };
            if *on && !set_above {
                out.push(OsString::from(format!("--{key}")));
            }
            continue;
        }
        if values.len() > 1 && !matches!(arg.get_action(), ArgAction::Append) {
            return Err(value_error("takes one value, not a list".into()));
        }
        if set_above {
            continue;
        }
        for v in &values {
            check(arg, &key, v).map_err(value_error)?;
        }
        out.extend(values.into_iter().map(|v| OsString::from(format!("--{key}={v}"))));
    }
    Ok(out)
}

fn value_list(value: &toml::Value) -> Vec<toml::Value> {
    match value {
        toml::Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    }
}

/// A key's values as text: a scalar, or an array of scalars for an
/// option that may be given more than once.
fn scalars(value: &toml::Value) -> Result<Vec<String>, String> {
    value_list(value)
        .into_iter()
        .map(|v| match v {
            toml::Value::String(s) => Ok(s),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            _ => Err("must be a string, number, boolean or an array of them".to_owned()),
        })
        .collect()
}

/// Runs `value` through the option's own parser, so a bad value is
/// blamed on the file rather than on a flag nobody typed.
fn check(arg: &clap::Arg, key: &str, value: &str) -> Result<(), String> {
    let alone = arg
        .clone()
        .required(false)
        .global(false)
        .env(None::<&'static str>);
    clap::Command::new("config")
        .no_binary_name(true)
        .arg(alone)
        .try_get_matches_from([format!("--{key}={value}")])
        .map(drop)
        .map_err(|e| {
            // clap's message without its "error: " prefix and usage footer.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            first.strip_prefix("error: ").unwrap_or(first).to_owned()
        })
}

/// "; did you mean \"listen\"?" for a near miss.
fn hint(command: &clap::Command, key: &str) -> String {
    let close = command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|long| strsim::levenshtein(long, key) <= 2)
        .min_by_key(|long| long.len().abs_diff(key.len()));
    close.map_or_else(String::new, |long| format!("; did you mean {long:?}?"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, env = "DUPLEX_TEST_CONFIG_FILE")]
        config: Option<PathBuf>,
        #[arg(long, env = "DUPLEX_TEST_CONFIG_NAME", default_value = "default")]
        name: String,
        #[arg(long, value_parser = humantime_parse)]
        lease: Option<Duration>,
        #[arg(long)]
        quiet: bool,
        #[arg(long)]
        peer: Vec<String>,
    }

    fn humantime_parse(s: &str) -> Result<Duration, String> {
        s.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is not a duration like 5s"))
    }

    fn run(file: &str, extra: &[&str]) -> Result<Cli, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).expect("write");
        let mut args: Vec<OsString> = vec!["prog".into(), "--config".into(), path.into()];
        args.extend(extra.iter().map(OsString::from));
        parse_from(args)
    }

    #[test]
    fn the_file_sits_below_flags() {
        let cli = run(
            "name = \"file\"\nlease = \"5s\"\nquiet = true\npeer = [\"a\", \"b\"]\n",
            &[],
        )
        .expect("parse");
        assert_eq!(cli.name, "file");
        assert_eq!(cli.lease, Some(Duration::from_secs(5)));
        assert!(cli.quiet);
        assert_eq!(cli.peer, ["a", "b"]);
        let cli = run("name = \"file\"\n", &["--name", "flag"]).expect("parse");
        assert_eq!(cli.name, "flag");
    }

    #[test]
    fn typos_and_bad_values_name_the_file_and_the_key() {
        let e = run("nmae = \"x\"\n", &[]).expect_err("unknown key").to_string();
        assert!(e.contains("unknown key \"nmae\"; did you mean \"name\"?"), "{e}");
        let e = run("lease = \"soon\"\n", &[]).expect_err("bad value").to_string();
        assert!(e.contains("c.toml: key \"lease\""), "{e}");
        assert!(e.contains("\"soon\" is not a duration"), "{e}");
        let e = run("quiet = \"yes\"\n", &[]).expect_err("bad flag").to_string();
        assert!(e.contains("key \"quiet\": must be true or false"), "{e}");
        let e = run("[nested]\nx = 1\n", &[]).expect_err("table").to_string();
        assert!(e.contains("unknown key \"nested\""), "{e}");
        let e = run("name = { a = 1 }\n", &[])
            .expect_err("inline table")
            .to_string();
        assert!(e.contains("key \"name\": must be a string"), "{e}");
        let e = run("name = [\"a\", \"b\"]\n", &[]).expect_err("list").to_string();
        assert!(e.contains("key \"name\": takes one value, not a list"), "{e}");
    }
}
