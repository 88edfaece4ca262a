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
pub fn validate_relative_path(path: &str) -> Result<PathBuf, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute(path.to_owned()));
    }
    if path.contains('\0') {
        return Err(PathError::Unclean(path.to_owned()));
    }
    for part in path.split('/') {
        match part {
            ".." => return Err(PathError::ParentDir(path.to_owned())),
            "" | "." => return Err(PathError::Unclean(path.to_owned())),
            _ => {}
        }
    }
    let parsed = PathBuf::from(path);
    // Belt and braces: std's own view of the components must agree.
    if !Path::new(path)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(PathError::Unclean(path.to_owned()));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        assert_eq!(
            validate_relative_path("a/b c/d.txt"),
            Ok(PathBuf::from("a/b c/d.txt"))
        );
    }

    #[test]
    fn refuses_escapes() {
        assert!(matches!(
            validate_relative_path("../x"),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            validate_relative_path("a/../../x"),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            validate_relative_path("/etc/x"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(
            validate_relative_path("a//b"),
            Err(PathError::Unclean(_))
        ));
        assert!(matches!(
            validate_relative_path("./a"),
            Err(PathError::Unclean(_))
        ));
        assert!(matches!(
            validate_relative_path("a\0b"),
            Err(PathError::Unclean(_))
        ));
        assert_eq!(validate_relative_path(""), Err(PathError::Empty));
    }
}
