//! Named network namespaces (`ip netns add NAME`), where probes leave from.

use std::{
    fs::File,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
};

/// Error opening a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    /// The name could escape `/run/netns` or is empty.
    #[error("invalid network namespace name {0:?}: use letters, digits, '.', '_' and '-'")]
    InvalidName(String),
    /// `/run/netns/NAME` could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        /// The path tried.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The namespace could not be entered: not a network namespace, or no permission
    /// (joining one needs CAP_SYS_ADMIN).
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// What setns(2) said.
        source: nix::Error,
    },
}

/// An open handle on a named network namespace. Holding the file keeps the namespace usable
/// even if its name is removed.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    file: File,
}

impl NetNs {
    /// Opens `/run/netns/NAME` and checks that it is a network namespace.
    pub fn open(name: &str) -> Result<Self, NetNsError> {
        let valid = !name.is_empty()
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return Err(NetNsError::InvalidName(name.to_owned()));
        }
        let path = PathBuf::from("/run/netns").join(name);
        let file = File::open(&path).map_err(|source| NetNsError::Open {
            path: path.clone(),
            source,
        })?;
        let ns = Self {
            name: name.to_owned(),
            file,
        };
        // Entering it once proves it is a network namespace we may join, so a bad name fails
        // at start-up with a clear message rather than at the first trace.
        ns.run_inside(|| ())
            .map_err(|source| NetNsError::Enter { path, source })?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns its result. Sockets
    /// opened by `f` stay in the namespace after the thread ends.
    pub fn run_inside<R: Send>(&self, f: impl FnOnce() -> R + Send) -> nix::Result<R> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&self.file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// `(st_dev, st_ino)` of the namespace: equal ids mean the same namespace.
    pub fn id(&self) -> std::io::Result<(u64, u64)> {
        let meta = self.file.metadata()?;
        Ok((meta.dev(), meta.ino()))
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_run_netns_are_refused() {
        for name in ["", ".", "..", "../etc", "a/b", "sp ace", "nul\0"] {
            assert!(
                matches!(NetNs::open(name), Err(NetNsError::InvalidName(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_missing_namespace_names_its_path() {
        let err = NetNs::open("hoptrace-test-no-such-namespace").expect_err("missing");
        assert!(matches!(err, NetNsError::Open { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("/run/netns/hoptrace-test-no-such-namespace"),
            "{err}"
        );
    }
}
