//! scamper's control-socket protocol, without I/O: feed it bytes as they arrive, take replies
//! out. Lines end in `\n`; `DATA <len>` (or `DATA <len> id-<n>` in newer builds) is followed
//! by exactly `len` bytes of payload, which may arrive split across any number of reads.

/// One thing the daemon said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OK` or `OK id-<n>` (a command was accepted as task n).
    Ok {
        /// The task id, when given.
        id: Option<u32>,
    },
    /// `ERR <message>`: the last command was refused.
    Err(String),
    /// `MORE`: the daemon will take one more command.
    More,
    /// A `DATA` frame: one line of output (with its newline).
    Data {
        /// The task id, in builds that tag results.
        id: Option<u32>,
        /// The payload.
        payload: Vec<u8>,
    },
    /// A line this client does not know; skipped by callers, kept for logs.
    Unknown(String),
}

/// The stream broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// A line longer than any the protocol sends.
    #[error("control line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// A `DATA` header with a length that is not a number.
    #[error("malformed DATA header {0:?}")]
    BadDataHeader(String),
    /// A frame larger than one trace's output may be.
    #[error("DATA frame of {0} bytes is over the {MAX_FRAME}-byte bound")]
    FrameTooLarge(usize),
    /// The connection closed in the middle of a line or frame.
    #[error("connection closed mid-{0}")]
    Truncated(&'static str),
}

/// Longest control line accepted.
pub const MAX_LINE: usize = 4096;
/// Largest DATA payload accepted: what one trace may print in all.
pub const MAX_FRAME: usize = super::MAX_OUTPUT;

/// Splits the daemon's byte stream into [`Reply`]s.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Position in `buf` up to which bytes are consumed.
    pos: usize,
    /// A DATA header was read; its payload is still arriving.
    frame: Option<(usize, Option<u32>)>,
}

fn task_id(word: &str) -> Option<u32> {
    word.strip_prefix("id-")?.parse().ok()
}

impl Decoder {
    /// A decoder at the start of a connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the connection. What was consumed is dropped first, so the buffer
    /// holds at most one unfinished reply and the new bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete reply, if one has arrived.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, ControlError> {
        let pending = &self.buf[self.pos..];
        if let Some((len, id)) = self.frame {
            if pending.len() < len {
                return Ok(None);
            }
            let payload = pending[..len].to_vec();
            self.pos += len;
            self.frame = None;
            return Ok(Some(Reply::Data { id, payload }));
        }
        let Some(end) = pending.iter().position(|&b| b == b'\n') else {
            if pending.len() > MAX_LINE {
                return Err(ControlError::LineTooLong);
            }
            return Ok(None);
        };
        if end > MAX_LINE {
            return Err(ControlError::LineTooLong);
        }
        let line = String::from_utf8_lossy(&pending[..end])
            .trim_end_matches('\r')
            .to_owned();
        self.pos += end + 1;
        let mut words = line.split_whitespace();
        let reply = match words.next() {
            Some("OK") => Reply::Ok {
                id: words.next().and_then(task_id),
            },
            Some("MORE") => Reply::More,
            // After the word, wherever leading (Unicode) whitespace put it.
            Some("ERR") => Reply::Err(
                line.trim_start()
                    .strip_prefix("ERR")
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            ),
            Some("DATA") => {
                let len: usize = words
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| ControlError::BadDataHeader(line.clone()))?;
                if len > MAX_FRAME {
                    return Err(ControlError::FrameTooLarge(len));
                }
                self.frame = Some((len, words.next().and_then(task_id)));
                return self.next_reply();
            }
            _ => Reply::Unknown(line),
        };
        Ok(Some(reply))
    }

    /// Checks that the stream ended between replies (call at end of stream).
    pub fn finish(&self) -> Result<(), ControlError> {
        if self.frame.is_some() {
            Err(ControlError::Truncated("frame"))
        } else if self.pos < self.buf.len() {
            Err(ControlError::Truncated("line"))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the Debian build sent for one trace on one attach (recorded in the lab; the trace
    /// line shortened).
    const SESSION: &[u8] = b"OK\nMORE\nDATA 104\n{\"type\":\"cycle-start\", \"list_name\":\"/tmp/dmn.sock:1\", \"id\":1, \"hostname\":\"vm\", \"start_time\":1795320205}\nOK id-1\nMORE\nDATA 20\n{\"type\":\"trace\", x}\nOK\nDATA 102\n{\"type\":\"cycle-stop\", \"list_name\":\"/tmp/dmn.sock:1\", \"id\":1, \"hostname\":\"vm\", \"stop_time\":1795320205}\n";

    fn decode_all(chunks: &[&[u8]]) -> Result<Vec<Reply>, ControlError> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for chunk in chunks {
            d.feed(chunk);
            while let Some(r) = d.next_reply()? {
                out.push(r);
            }
        }
        d.finish()?;
        Ok(out)
    }

    fn expected() -> Vec<Reply> {
        let data = |s: &[u8]| Reply::Data {
            id: None,
            payload: s.to_vec(),
        };
        vec![
            Reply::Ok { id: None },
            Reply::More,
            data(&SESSION[17..121]),
            Reply::Ok { id: Some(1) },
            Reply::More,
            data(b"{\"type\":\"trace\", x}\n"),
            Reply::Ok { id: None },
            data(&SESSION[SESSION.len() - 102..]),
        ]
    }

    #[test]
    fn a_recorded_session_decodes_whole() {
        let replies = decode_all(&[SESSION]).expect("decodes");
        assert_eq!(replies, expected());
        let Reply::Data { payload, .. } = &replies[2] else {
            unreachable!()
        };
        assert!(payload.starts_with(b"{\"type\":\"cycle-start\""));
        assert!(payload.ends_with(b"}\n"));
    }

    #[test]
    fn frames_split_at_every_byte_decode_the_same() {
        for cut in 0..=SESSION.len() {
            let (a, b) = SESSION.split_at(cut);
            assert_eq!(
                decode_all(&[a, b]).expect("decodes"),
                expected(),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = SESSION.chunks(1).collect();
        assert_eq!(decode_all(&bytes).expect("decodes"), expected());
    }

    #[test]
    fn tagged_frames_errors_and_unknown_lines() {
        let replies =
            decode_all(&[b"DATA 3 id-7\nab\nERR command not accepted\nHELLO there\nOK id-x\n"])
                .expect("decodes");
        assert_eq!(
            replies,
            vec![
                Reply::Data {
                    id: Some(7),
                    payload: b"ab\n".to_vec()
                },
                Reply::Err("command not accepted".into()),
                Reply::Unknown("HELLO there".into()),
                Reply::Ok { id: None },
            ]
        );
    }

    #[test]
    fn a_connection_closing_mid_frame_or_mid_line_is_an_error() {
        assert_eq!(
            decode_all(&[b"OK\nDATA 10\nabc"]),
            Err(ControlError::Truncated("frame"))
        );
        assert_eq!(
            decode_all(&[b"OK\nMO"]),
            Err(ControlError::Truncated("line"))
        );
        assert_eq!(decode_all(&[b""]), Ok(vec![]));
    }

    #[test]
    fn hostile_headers_are_refused() {
        assert!(matches!(
            decode_all(&[b"DATA lots\n"]),
            Err(ControlError::BadDataHeader(_))
        ));
        assert_eq!(
            decode_all(&[b"DATA 999999999999\n"]),
            Err(ControlError::FrameTooLarge(999_999_999_999))
        );
        let long = vec![b'x'; MAX_LINE + 2];
        assert_eq!(decode_all(&[&long]), Err(ControlError::LineTooLong));
        // ERR after whitespace of several bytes: the message, not a panic on a char boundary.
        assert_eq!(
            decode_all(&[
                " \u{2000}ERR no such option\n".as_bytes(),
                "\u{85}\u{85}ERR\n".as_bytes()
            ])
            .expect("decodes")[0],
            Reply::Err("no such option".into())
        );
    }

    #[test]
    fn consumed_bytes_are_not_kept() {
        // Reads that each end part way into the next reply, as 64 KiB reads of long output do.
        let mut d = Decoder::new();
        let mut frames = 0;
        for _ in 0..10_000 {
            d.feed(b"DATA 4\nabc\nDA");
            while let Some(r) = d.next_reply().expect("decodes") {
                frames += usize::from(matches!(r, Reply::Data { .. }));
            }
            d.feed(b"TA 4\nabc\n");
            while let Some(r) = d.next_reply().expect("decodes") {
                frames += usize::from(matches!(r, Reply::Data { .. }));
            }
        }
        assert_eq!(frames, 20_000);
        assert!(d.buf.len() < 64, "{} bytes kept", d.buf.len());
    }
}
