//! Trace records: a stored file plus what the service knows about it, and their cursors.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use hoptrace_backends::{TraceSummary, scamper_json};

use crate::store::{StoreError, StoredFile};

/// A position in the record stream: the server run that published the record and its sequence
/// number in that run. Text form `<run hex>-<seq>`; clients treat it as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cursor {
    /// Identifies one run of the server (its start time in microseconds).
    pub run: u64,
    /// Position within the run, from 1.
    pub seq: u64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{}", self.run, self.seq)
    }
}

/// A cursor that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cursor {0:?} is not one this server hands out (expected <hex>-<number>)")]
pub struct BadCursor(pub String);

impl FromStr for Cursor {
    type Err = BadCursor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCursor(s.chars().take(64).collect());
        let (run, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(Cursor {
            run: u64::from_str_radix(run, 16).map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// One trace file as subscribers and callers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRecord {
    /// Where it stands in the stream; set by the hub when published.
    pub cursor: Option<Cursor>,
    /// The file (path, contents, metadata).
    pub file: StoredFile,
    /// The backend that ran the trace (empty when read from disk alone).
    pub backend: String,
    /// The normalised view of the measurement lines.
    pub summary: TraceSummary,
    /// Labels of the event that produced this record.
    pub labels: BTreeMap<String, String>,
}

/// A stored file whose measurement cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file is missing or not in the four-line shape.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Its measurement lines are not scamper JSON.
    #[error("{path}: {source}")]
    Measurement {
        /// Which file.
        path: String,
        /// What is wrong.
        source: scamper_json::ScamperJsonError,
    },
}

impl TraceRecord {
    /// A record for a file, its summary derived from the file's own measurement lines.
    pub fn from_file(
        file: StoredFile,
        backend: impl Into<String>,
        labels: BTreeMap<String, String>,
    ) -> Result<Self, RecordError> {
        let summary = scamper_json::summarize(file.measurement().as_bytes()).map_err(|source| {
            RecordError::Measurement {
                path: file.rel_path.clone(),
                source,
            }
        })?;
        Ok(Self {
            cursor: None,
            file,
            backend: backend.into(),
            summary,
            labels,
        })
    }

    /// The destination traced.
    pub fn destination(&self) -> IpAddr {
        self.summary.dst
    }

    /// Whether this record reused another trace.
    pub fn cached(&self) -> bool {
        self.file.metadata.cached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        let c = Cursor {
            run: 0x5f3a_1234,
            seq: 42,
        };
        assert_eq!(c.to_string(), "5f3a1234-42");
        assert_eq!("5f3a1234-42".parse::<Cursor>(), Ok(c));
        for junk in ["", "42", "x-1", "1-", "-1", "1-2-3", "1--2"] {
            assert!(junk.parse::<Cursor>().is_err(), "{junk:?}");
        }
    }
}
