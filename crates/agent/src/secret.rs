//! Where the passphrase comes from: `--password-file F`, else the
//! `DUPLEX_PASSWORD` environment variable (the passphrase itself), else a
//! prompt when stdin is a terminal. Never from argv, where any local user
//! could read it in /proc.

use std::io::IsTerminal;
use std::path::Path;

use zeroize::Zeroizing;

use crate::AgentError;

pub const ENV: &str = "DUPLEX_PASSWORD";

pub type Passphrase = Zeroizing<Vec<u8>>;

/// The account's passphrase, from the file, the environment or a prompt.
pub fn passphrase(file: Option<&Path>) -> Result<Passphrase, AgentError> {
    if let Some(file) = file {
        return from_file(file);
    }
    if let Ok(value) = std::env::var(ENV) {
        return non_empty(Zeroizing::new(value.into_bytes()), ENV);
    }
    if std::io::stdin().is_terminal() {
        let typed = rpassword::prompt_password("passphrase: ")
            .map_err(|e| AgentError::Invalid(format!("reading the passphrase: {e}")))?;
        return non_empty(Zeroizing::new(typed.into_bytes()), "the prompt");
    }
    Err(AgentError::Invalid(format!(
        "no passphrase: pass --password-file F or set {ENV} (the account's data is encrypted with it)"
    )))
}

/// A new passphrase for `key passwd` / `key add`: from the file, else
/// typed twice on a terminal.
pub fn new_passphrase(file: Option<&Path>) -> Result<Passphrase, AgentError> {
    if let Some(file) = file {
        return from_file(file);
    }
    if !std::io::stdin().is_terminal() {
        return Err(AgentError::Invalid(
            "no new passphrase: pass --new-password-file F (or run on a terminal to be asked)".into(),
        ));
    }
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt)
            .map(|s| Zeroizing::new(s.into_bytes()))
            .map_err(|e| AgentError::Invalid(format!("reading the passphrase: {e}")))
    };
    let first = ask("new passphrase: ")?;
    let again = ask("new passphrase again: ")?;
    if first != again {
        return Err(AgentError::Invalid(
            "the two passphrases differ; nothing was changed".into(),
        ));
    }
    non_empty(first, "the prompt")
}

/// The file's content without one trailing newline (as `echo` writes it).
fn from_file(path: &Path) -> Result<Passphrase, AgentError> {
    let mut bytes = Zeroizing::new(std::fs::read(path).map_err(AgentError::io(path))?);
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    non_empty(bytes, &path.display().to_string())
}

fn non_empty(p: Passphrase, source: &str) -> Result<Passphrase, AgentError> {
    if p.is_empty() {
        return Err(AgentError::Invalid(format!(
            "the passphrase from {source} is empty"
        )));
    }
    Ok(p)
}
