//! State on disk is the owner's alone: the store's log and snapshots hold every Secret, the
//! PKI directory the CA's key. Directories are 0700 and files 0600, also when they already
//! existed with looser modes (a store written by an older version is tightened on start).

use std::fs::{File, OpenOptions, Permissions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context as _, Result};

/// Creates `dir` (and its parents) and makes it 0700.
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", dir.display()))
}

/// Options that create a file 0600; `open` tightens one that exists with a looser mode.
pub fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// Opens `path` with `opts` (made from [`private_options`]) and makes sure it is 0600.
pub fn open_private(path: &Path, opts: &OpenOptions) -> Result<File> {
    let f = opts
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.set_permissions(Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private (0600)", path.display()))?;
    Ok(f)
}

/// A new (or truncated) private file.
pub fn create_private(path: &Path) -> Result<File> {
    let mut o = private_options();
    o.create(true).write(true).truncate(true);
    open_private(path, &o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_and_files_are_the_owners_alone_even_when_they_existed() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        let f = d.join("f");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        create_private(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
    }
}
