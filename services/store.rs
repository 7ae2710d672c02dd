//! The trace store: M-Lab-compatible JSONL files, written atomically.
//!
//! Path `<root>/YYYY/MM/DD/<YYYYMMDDTHHMMSSZ>_<UUID>.jsonl` (UTC, the trace's start), exactly
//! four newline-terminated lines: the metadata line, then the backend's three lines byte for
//! byte. A file is written as temp file → fsync → rename (never replacing an existing trace)
//! → fsync of the directory, so a reader sees a whole file or none.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::conn_id::ConnectionId;

/// Files the ETL accepts are at most this large.
pub const MAX_FILE_BYTES: usize = 90_000_000;

/// The metadata line. Field order is the wire contract: serde writes fields in declaration
/// order, and the names are M-Lab's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The connection id of this file.
    #[serde(rename = "UUID")]
    pub uuid: String,
    /// The program version.
    #[serde(rename = "TracerouteCallerVersion")]
    pub version: String,
    /// Whether the measurement lines were reused from another trace.
    #[serde(rename = "CachedResult")]
    pub cached: bool,
    /// The trace that actually ran, when cached; empty otherwise.
    #[serde(rename = "CachedUUID")]
    pub cached_uuid: String,
}

/// Why the store could not write or read a file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system refused (full disk, read-only directory, …).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A file for this connection id already exists; traces are never overwritten.
    #[error("a trace file for {0} already exists")]
    Exists(String),
    /// The file would exceed the ETL's size limit.
    #[error("trace file would be {0} bytes, over the {MAX_FILE_BYTES}-byte limit")]
    TooLarge(usize),
    /// A stored file is not in the four-line shape.
    #[error("{path}: not a trace file: {why}")]
    Malformed {
        /// Which file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

impl StoreError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Io { .. } => "io",
            StoreError::Exists(_) => "exists",
            StoreError::TooLarge(_) => "too_large",
            StoreError::Malformed { .. } => "malformed",
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A file the store wrote (or read back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// Path relative to the root, with `/` separators.
    pub rel_path: String,
    /// The whole file.
    pub contents: String,
    /// Its metadata line.
    pub metadata: Metadata,
}

impl StoredFile {
    /// The three lines after the metadata line.
    pub fn measurement(&self) -> &str {
        self.contents.split_once('\n').map_or("", |(_, rest)| rest)
    }

    /// Parses a stored file into its metadata; checks the four-line shape.
    pub fn parse(rel_path: String, contents: String) -> Result<Self, StoreError> {
        let malformed = |why: String| StoreError::Malformed {
            path: rel_path.clone(),
            why,
        };
        let pieces: Vec<&str> = contents.split('\n').collect();
        if pieces.len() != 5 || !pieces[4].is_empty() {
            return Err(malformed(format!(
                "{} newline-separated pieces, expected four lines",
                pieces.len().saturating_sub(1)
            )));
        }
        let metadata: Metadata = serde_json::from_str(pieces[0])
            .map_err(|e| malformed(format!("metadata line: {e}")))?;
        Ok(Self {
            rel_path,
            contents,
            metadata,
        })
    }
}

/// `(YYYY/MM/DD, YYYYMMDDTHHMMSSZ)` for a unix time in seconds, UTC.
fn date_parts(unix: i64) -> (String, String) {
    let (y, m, d) = hoptrace_backends::civil::civil_from_days(unix.div_euclid(86_400));
    let secs = unix.rem_euclid(86_400);
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    (
        format!("{y:04}/{m:02}/{d:02}"),
        format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z"),
    )
}

/// How old a temporary file must be to be taken for a crash's leftover.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);
/// Day directories searched for leftovers (a crash leaves them where its traces were going).
const TEMP_DAYS: usize = 3;

/// Writes and reads trace files under one root.
#[derive(Debug)]
pub struct TraceStore {
    root: PathBuf,
    version: String,
    temp_seq: AtomicU64,
}

impl TraceStore {
    /// Opens (creating) the root and today's directory, so an uploader can watch them before
    /// the first trace, and removes the temporary files a crash left in the newest days.
    /// `version` goes into every metadata line.
    pub fn open(root: impl Into<PathBuf>, version: impl Into<String>) -> Result<Self, StoreError> {
        let store = Self {
            root: root.into(),
            version: version.into(),
            temp_seq: AtomicU64::new(0),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        store.ensure_dir(&date_parts(now).0)?;
        let removed = store.remove_stale_temps();
        if removed > 0 {
            tracing::warn!(removed, "removed temporary trace files a crash left behind");
        }
        Ok(store)
    }

    /// Removes the temporary files (`.<name>.<pid>.<seq>.tmp`) older than [`STALE_TEMP`] in
    /// the newest [`TEMP_DAYS`] day directories: writes a crash cut short (a running writer's
    /// file is seconds old, whichever process it is); returns how many. Best effort: what
    /// cannot be listed or removed is left.
    fn remove_stale_temps(&self) -> usize {
        let mut removed = 0;
        for day in self.newest_days(TEMP_DAYS).unwrap_or_default() {
            let Ok(entries) = fs::read_dir(self.root.join(&day)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TEMP));
                if name.starts_with('.')
                    && name.ends_with(".tmp")
                    && stale
                    && fs::remove_file(entry.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates `rel` under the root, fsyncing each new directory's parent so the directory
    /// entry itself survives a crash.
    fn ensure_dir(&self, rel: &str) -> Result<PathBuf, StoreError> {
        let mut dir = self.root.clone();
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        }
        for part in rel.split('/') {
            let parent = dir.clone();
            dir.push(part);
            match fs::create_dir(&dir) {
                Ok(()) => sync_dir(&parent)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("create directory", &dir)(e)),
            }
        }
        Ok(dir)
    }

    /// Writes the file for `uuid`: the metadata line, then `measurement` (the backend's three
    /// lines) unchanged. `cached_from` names the trace that ran when this is a cached copy.
    /// `start_time` (unix seconds, the trace's start) places the file.
    pub fn write(
        &self,
        uuid: &ConnectionId,
        measurement: &str,
        start_time: i64,
        cached_from: Option<&str>,
    ) -> Result<StoredFile, StoreError> {
        let metadata = Metadata {
            uuid: uuid.to_string(),
            version: self.version.clone(),
            cached: cached_from.is_some(),
            cached_uuid: cached_from.unwrap_or_default().to_owned(),
        };
        let mut contents = serde_json::to_string(&metadata).map_err(|e| StoreError::Malformed {
            path: uuid.to_string(),
            why: e.to_string(),
        })?;
        contents.push('\n');
        contents.push_str(measurement);
        if contents.len() > MAX_FILE_BYTES {
            return Err(StoreError::TooLarge(contents.len()));
        }
        let (day, stamp) = date_parts(start_time);
        let dir = self.ensure_dir(&day)?;
        let name = format!("{stamp}_{uuid}.jsonl");
        self.write_atomic(&dir, &name, contents.as_bytes())
            .map_err(|e| match e {
                StoreError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists => {
                    StoreError::Exists(uuid.to_string())
                }
                e => e,
            })?;
        Ok(StoredFile {
            rel_path: format!("{day}/{name}"),
            contents,
            metadata,
        })
    }

    fn write_atomic(&self, dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{name}.{}.{seq}.tmp", std::process::id()));
        let target = dir.join(name);
        let mut renamed = false;
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
                .map_err(io_err("create", &temp))?;
            file.write_all(bytes).map_err(io_err("write", &temp))?;
            file.sync_all().map_err(io_err("fsync", &temp))?;
            drop(file);
            // RENAME_NOREPLACE: a trace file, once written, is never replaced.
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &temp,
                nix::fcntl::AT_FDCWD,
                &target,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            )
            .map_err(|errno| io_err("rename into", &target)(io::Error::from(errno)))?;
            renamed = true;
            sync_dir(dir)
        })();
        if result.is_err() {
            // Nothing is left behind, whatever failed: not the temp file, and not a file
            // under its final name that was reported as not written (an uploader would
            // archive it, a retry would find it taken).
            let _ = fs::remove_file(&temp);
            if renamed {
                let _ = fs::remove_file(&target);
            }
        }
        result
    }

    /// Reads a file back by its path relative to the root.
    pub fn read(&self, rel_path: &str) -> Result<StoredFile, StoreError> {
        if rel_path.split('/').any(|p| p.is_empty() || p == "..") {
            return Err(StoreError::Malformed {
                path: rel_path.to_owned(),
                why: "not a path inside the store".into(),
            });
        }
        let path = self.root.join(rel_path);
        let contents = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        StoredFile::parse(rel_path.to_owned(), contents)
    }

    /// Finds the file for `uuid`, looking through the newest `days` day directories.
    pub fn find(&self, uuid: &ConnectionId, days: usize) -> Result<Option<StoredFile>, StoreError> {
        // `<stamp>_<uuid>.jsonl`, and the stamp has no '_': everything after the first '_'
        // must be the id, or `1_2` would find the file of `host_1_2`.
        let wanted = format!("{uuid}.jsonl");
        for day in self.newest_days(days)? {
            let dir = self.root.join(&day);
            let entries = fs::read_dir(&dir).map_err(io_err("list", &dir))?;
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.split_once('_').is_some_and(|(_, rest)| rest == wanted) {
                    return self.read(&format!("{day}/{name}")).map(Some);
                }
            }
        }
        Ok(None)
    }

    /// Day directories (`YYYY/MM/DD`), newest first, at most `limit`.
    fn newest_days(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let list = |rel: &str| -> Result<Vec<String>, StoreError> {
            let dir = self.root.join(rel);
            let mut names: Vec<String> = match fs::read_dir(&dir) {
                Ok(entries) => entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    .collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(io_err("list", &dir)(e)),
            };
            names.sort_unstable_by(|a, b| b.cmp(a));
            Ok(names)
        };
        let mut days = Vec::new();
        for y in list("")? {
            for m in list(&y)? {
                for d in list(&format!("{y}/{m}"))? {
                    days.push(format!("{y}/{m}/{d}"));
                    if days.len() == limit {
                        return Ok(days);
                    }
                }
            }
        }
        Ok(days)
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn_id::ConnectionIds;

    const LINES: &str = concat!(
        "{\"type\":\"cycle-start\", \"list_name\":\"default\", \"id\":0, \"hostname\":\"vm\", \"start_time\":1795314448}\n",
        "{\"type\":\"trace\", \"version\":\"0.1\", \"dst\":\"10.77.100.5\"}\n",
        "{\"type\":\"cycle-stop\", \"list_name\":\"default\", \"id\":0, \"hostname\":\"vm\", \"stop_time\":1795314448}\n"
    );

    fn id(s: &str) -> ConnectionId {
        ConnectionIds::default().validate(s).expect("valid id")
    }

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(
            date_parts(0),
            ("1970/01/01".into(), "19700101T000000Z".into())
        );
        assert_eq!(
            date_parts(1_648_772_345),
            ("2022/04/01".into(), "20220401T001905Z".into())
        );
        assert_eq!(
            date_parts(1_709_164_799),
            ("2024/02/28".into(), "20240228T235959Z".into())
        );
        assert_eq!(date_parts(1_709_251_199).0, "2024/02/29");
        assert_eq!(date_parts(-1).1, "19691231T235959Z");
    }

    #[test]
    fn writes_the_exact_four_line_file_at_the_mlab_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TraceStore::open(dir.path(), "v1.2.3").expect("open");
        let uuid = id("ndt-plh7v_1566050090_000000000004D64D");
        let file = store
            .write(&uuid, LINES, 1_795_314_448, None)
            .expect("write");
        assert_eq!(
            file.rel_path,
            "2026/11/22/20261122T022728Z_ndt-plh7v_1566050090_000000000004D64D.jsonl"
        );
        let on_disk = fs::read_to_string(dir.path().join(&file.rel_path)).expect("read");
        let expected = format!(
            "{}\n{LINES}",
            r#"{"UUID":"ndt-plh7v_1566050090_000000000004D64D","TracerouteCallerVersion":"v1.2.3","CachedResult":false,"CachedUUID":""}"#
        );
        assert_eq!(on_disk, expected);
        // The ETL's check: split on '\n' gives 5 pieces, the last empty.
        let pieces: Vec<&str> = on_disk.split('\n').collect();
        assert_eq!(pieces.len(), 5);
        assert_eq!(pieces[4], "");
        assert_eq!(file.measurement(), LINES);
        assert_eq!(store.read(&file.rel_path).expect("read back"), file);
        // No temp file is left beside it.
        let names: Vec<_> = fs::read_dir(dir.path().join("2026/11/22"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn opening_removes_a_crash_s_old_temporary_files_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let day = dir.path().join("2026/11/22");
        fs::create_dir_all(&day).expect("day");
        let old = day.join(".20261122T000000Z_x.jsonl.4242.0.tmp");
        let fresh = day.join(".20261122T000001Z_y.jsonl.4243.0.tmp");
        let trace = day.join("20261122T000002Z_z.jsonl");
        for path in [&old, &fresh, &trace] {
            fs::write(path, "x").expect("write");
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for path in [&old, &trace] {
            File::options()
                .write(true)
                .open(path)
                .and_then(|f| f.set_modified(two_hours_ago))
                .expect("age the file");
        }
        TraceStore::open(dir.path(), "v").expect("open");
        assert!(!old.exists(), "a crash's leftover is removed");
        assert!(fresh.exists(), "a running writer's file is kept");
        assert!(trace.exists(), "trace files are never touched");
    }

    #[test]
    fn a_cached_copy_rewrites_only_the_metadata_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TraceStore::open(dir.path(), "v").expect("open");
        let original = store
            .write(
                &id("ndt-zmm9m_1572302065_000000000002A76F"),
                LINES,
                1_795_314_448,
                None,
            )
            .expect("write");
        let copy = store
            .write(
                &id("ndt-zmm9m_1572302065_000000000002A773"),
                original.measurement(),
                1_795_314_448,
                Some(&original.metadata.uuid),
            )
            .expect("write copy");
        let first_line = copy.contents.lines().next().expect("a line");
        assert_eq!(
            first_line,
            r#"{"UUID":"ndt-zmm9m_1572302065_000000000002A773","TracerouteCallerVersion":"v","CachedResult":true,"CachedUUID":"ndt-zmm9m_1572302065_000000000002A76F"}"#
        );
        assert_eq!(copy.measurement(), original.measurement());
    }

    #[test]
    fn an_existing_trace_is_never_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TraceStore::open(dir.path(), "v").expect("open");
        let uuid = id("host_1_0000000000000001");
        store.write(&uuid, LINES, 100, None).expect("first");
        let err = store
            .write(&uuid, LINES, 100, Some("other"))
            .expect_err("second");
        assert!(matches!(err, StoreError::Exists(_)), "{err}");
        let file = store.find(&uuid, 31).expect("find").expect("found");
        assert!(!file.metadata.cached, "the original is still there");
        // An id that is a suffix of another id is a different trace.
        assert!(
            store
                .find(&id("1_0000000000000001"), 31)
                .expect("find")
                .is_none()
        );
    }

    #[test]
    fn a_read_only_directory_is_an_error_and_leaves_nothing() {
        if nix::unistd::geteuid().is_root() {
            // Root ignores directory permissions; the full-disk case is covered by the
            // integration test that writes to a tiny filesystem.
            eprintln!("skip: root bypasses read-only permissions");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TraceStore::open(dir.path(), "v").expect("open");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o555)).expect("chmod");
        let err = store
            .write(&id("a"), LINES, 0, None)
            .expect_err("read-only");
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
    }

    #[test]
    fn find_and_read_refuse_what_is_not_a_trace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TraceStore::open(dir.path(), "v").expect("open");
        assert!(store.find(&id("nothing"), 31).expect("find").is_none());
        assert!(store.read("../etc/passwd").is_err());
        fs::write(dir.path().join("junk"), "one line\n").expect("write");
        assert!(matches!(
            store.read("junk"),
            Err(StoreError::Malformed { .. })
        ));
    }
}
