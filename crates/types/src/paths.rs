use std::path::{Component, Path, PathBuf};

/// Why a manifest path cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {:?} is absolute", crate::shown(.0))]
    Absolute(String),
    #[error("path {:?} contains '..'", crate::shown(.0))]
    ParentDir(String),
    #[error("path {:?} contains '.', an empty component or a NUL byte", crate::shown(.0))]
    Unclean(String),
}

/// A manifest path must be relative, '/'-separated, and made only of normal
/// components, so that joining it to a restore target can never leave it.
/// It is bytes, as Unix names are: a name that is not UTF-8 is kept exactly.
pub fn validate_relative_path(path: &[u8]) -> Result<PathBuf, PathError> {
    use std::os::unix::ffi::OsStrExt;
    let shown = || String::from_utf8_lossy(path).into_owned();
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.starts_with(b"/") {
        return Err(PathError::Absolute(shown()));
    }
    if path.contains(&0) {
        return Err(PathError::Unclean(shown()));
    }
    for part in path.split(|b| *b == b'/') {
        match part {
            b".." => return Err(PathError::ParentDir(shown())),
            b"" | b"." => return Err(PathError::Unclean(shown())),
            _ => {}
        }
    }
    let parsed = Path::new(std::ffi::OsStr::from_bytes(path));
    // Belt and braces: std's own view of the components must agree.
    if !parsed.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(PathError::Unclean(shown()));
    }
    Ok(parsed.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        assert_eq!(
            validate_relative_path(b"a/b c/d.txt"),
            Ok(PathBuf::from("a/b c/d.txt"))
        );
        use std::os::unix::ffi::OsStrExt;
        let latin1 = validate_relative_path(b"a/caf\xe9").expect("a name that is not UTF-8 is kept");
        assert_eq!(latin1.as_os_str().as_bytes(), b"a/caf\xe9");
    }

    #[test]
    fn refuses_escapes() {
        assert!(matches!(
            validate_relative_path(b"../x"),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            validate_relative_path(b"a/../../x"),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            validate_relative_path(b"/etc/x"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(
            validate_relative_path(b"a//b"),
            Err(PathError::Unclean(_))
        ));
        assert!(matches!(
            validate_relative_path(b"./a"),
            Err(PathError::Unclean(_))
        ));
        assert!(matches!(
            validate_relative_path(b"a\0b"),
            Err(PathError::Unclean(_))
        ));
        assert_eq!(validate_relative_path(b""), Err(PathError::Empty));
    }
}
