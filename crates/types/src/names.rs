use crate::InvalidInput;

/// What a name names, for error messages.
#[derive(Clone, Copy, Debug)]
pub enum NameKind {
    Account,
    Group,
    Server,
    Site,
}

impl NameKind {
    fn as_str(self) -> &'static str {
        match self {
            NameKind::Account => "account name",
            NameKind::Group => "group name",
            NameKind::Server => "server name",
            NameKind::Site => "site name",
        }
    }
}

/// Names are 1..=64 characters of `[A-Za-z0-9._-]`, starting with a letter or
/// digit, so they are safe in paths, URLs and log lines.
pub fn validate_name(kind: NameKind, name: &str) -> Result<(), InvalidInput> {
    let malformed = |reason| InvalidInput::Malformed {
        what: kind.as_str(),
        value: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(malformed("must be 1 to 64 characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(malformed("must start with a letter or digit"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(malformed("may contain only letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name(NameKind::Account, "demo").is_ok());
        assert!(validate_name(NameKind::Account, "a.b_c-1").is_ok());
        assert!(validate_name(NameKind::Account, "").is_err());
        assert!(validate_name(NameKind::Account, "-x").is_err());
        assert!(validate_name(NameKind::Account, "a/b").is_err());
        assert!(validate_name(NameKind::Account, &"x".repeat(65)).is_err());
    }
}
