//! What a tracer returns.

use crate::{ScamperJsonError, TraceSummary, scamper_json};

/// One finished measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceOutput {
    /// The three newline-terminated JSON lines that follow the metadata line in a trace file
    /// (`cycle-start`, `trace` or `tracelb`, `cycle-stop`), byte for byte as the backend wrote
    /// them.
    pub lines: String,
    /// The normalised view of `lines`.
    pub summary: TraceSummary,
}

impl TraceOutput {
    /// Checks `lines` and derives the summary from them; the only way to build an output, so
    /// the summary always agrees with the bytes.
    pub fn from_lines(lines: Vec<u8>) -> Result<Self, ScamperJsonError> {
        let summary = scamper_json::summarize(&lines)?;
        let lines = String::from_utf8(lines).map_err(|_| ScamperJsonError::NotUtf8)?;
        Ok(Self { lines, summary })
    }

    /// An output from a backend that writes the lines and builds the summary from the same
    /// result (the engine); its tests check that [`scamper_json::summarize`] agrees.
    pub(crate) fn from_parts(lines: String, summary: TraceSummary) -> Self {
        Self { lines, summary }
    }
}
