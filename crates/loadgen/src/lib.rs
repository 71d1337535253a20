//! The pure parts of `lattice-loadgen`: an HTTP/1.1 response parser over a byte buffer (status,
//! keep-alive, a body framed by `Content-Length`, chunked encoding or the end of the connection)
//! and the latency summary. The I/O shell is `main.rs`.

use thiserror::Error;

/// Most bytes of a response head (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most bytes of a response body, decoded.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The connection may carry another request.
    pub keep_alive: bool,
    /// The body, with any chunked framing removed.
    pub body: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Incomplete,
    /// A whole response; `consumed` bytes of the buffer belong to it.
    Done { response: Response, consumed: usize },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("malformed status line")]
    StatusLine,
    #[error("malformed header line")]
    Header,
    #[error("malformed chunk")]
    Chunk,
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("response body over {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("connection closed before the response ended")]
    Truncated,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Parses one response from the front of `buf`; `eof` says the peer closed the connection (so
/// a body without framing ends here, and anything incomplete is an error).
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Parse, ParseError> {
    let Some(head_len) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(ParseError::HeadTooLarge);
        }
        return if eof {
            Err(ParseError::Truncated)
        } else {
            Ok(Parse::Incomplete)
        };
    };
    if head_len > MAX_HEAD {
        return Err(ParseError::HeadTooLarge);
    }
    let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| ParseError::Header)?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(ParseError::StatusLine)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().ok_or(ParseError::StatusLine)?;
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(ParseError::StatusLine)?;
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(ParseError::StatusLine),
    };
    let mut keep_alive = http11;
    let mut framing = Framing::UntilClose;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(ParseError::Header)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().map_err(|_| ParseError::Header)?;
            if n > MAX_BODY {
                return Err(ParseError::BodyTooLarge);
            }
            if !matches!(framing, Framing::Chunked) {
                framing = Framing::Length(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.to_ascii_lowercase().contains("chunked") {
                framing = Framing::Chunked;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    let start = head_len + 4;
    let rest = &buf[start..];
    // No body, whatever the headers say: informational, 204 No Content, 304 Not Modified.
    if status < 200 || status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    match framing {
        Framing::Length(n) => {
            if rest.len() < n {
                return if eof {
                    Err(ParseError::Truncated)
                } else {
                    Ok(Parse::Incomplete)
                };
            }
            Ok(Parse::Done {
                response: Response {
                    status,
                    keep_alive,
                    body: rest[..n].to_vec(),
                },
                consumed: start + n,
            })
        }
        Framing::UntilClose => {
            if rest.len() > MAX_BODY {
                return Err(ParseError::BodyTooLarge);
            }
            if !eof {
                return Ok(Parse::Incomplete);
            }
            Ok(Parse::Done {
                response: Response {
                    status,
                    keep_alive: false,
                    body: rest.to_vec(),
                },
                consumed: buf.len(),
            })
        }
        Framing::Chunked => match parse_chunked(rest)? {
            Some((body, used)) => Ok(Parse::Done {
                response: Response {
                    status,
                    keep_alive,
                    body,
                },
                consumed: start + used,
            }),
            None if eof => Err(ParseError::Truncated),
            None => Ok(Parse::Incomplete),
        },
    }
}

/// Decodes a chunked body at the front of `buf`: `Some((body, bytes used))` when it is whole.
fn parse_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ParseError> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = find(&buf[pos..], b"\r\n") else {
            return if buf.len() - pos > 1024 {
                Err(ParseError::Chunk)
            } else {
                Ok(None)
            };
        };
        let line = std::str::from_utf8(&buf[pos..pos + eol]).map_err(|_| ParseError::Chunk)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| ParseError::Chunk)?;
        pos += eol + 2;
        if size == 0 {
            // Optional trailers, then an empty line.
            if buf[pos..].starts_with(b"\r\n") {
                return Ok(Some((body, pos + 2)));
            }
            return match find(&buf[pos..], b"\r\n\r\n") {
                Some(end) => Ok(Some((body, pos + end + 4))),
                None => Ok(None),
            };
        }
        if size > MAX_BODY || body.len() + size > MAX_BODY {
            return Err(ParseError::BodyTooLarge);
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(ParseError::Chunk);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

/// Percentiles over latencies (seconds), the same way the Python client computed them: the
/// sorted sample at index ⌊p·n⌋ (clamped to the last).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

pub fn summarize(latencies: &mut [f64]) -> Option<Summary> {
    if latencies.is_empty() {
        return None;
    }
    latencies.sort_by(f64::total_cmp);
    let n = latencies.len();
    let pct = |p: f64| latencies[((p * n as f64) as usize).min(n - 1)];
    Some(Summary {
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: latencies[n - 1],
        mean: latencies.iter().sum::<f64>() / n as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(buf: &[u8]) -> (Response, usize) {
        match parse_response(buf, false).unwrap() {
            Parse::Done { response, consumed } => (response, consumed),
            Parse::Incomplete => panic!("incomplete"),
        }
    }

    #[test]
    fn content_length_body_and_the_next_response_left_over() {
        let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 404";
        let (r, used) = done(buf);
        assert_eq!(
            (r.status, r.keep_alive, r.body.as_slice()),
            (200, true, &b"hello"[..])
        );
        assert_eq!(&buf[used..], b"HTTP/1.1 404");
    }

    #[test]
    fn every_prefix_of_a_response_is_incomplete() {
        let buf = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n8\r\n[DONE]\n\n\r\n0\r\n\r\n";
        for cut in 0..buf.len() {
            assert_eq!(
                parse_response(&buf[..cut], false),
                Ok(Parse::Incomplete),
                "cut {cut}"
            );
        }
        let (r, used) = done(buf);
        assert_eq!(r.body, b"data: [DONE]\n\n");
        assert_eq!(used, buf.len());
    }

    #[test]
    fn chunk_extensions_and_trailers() {
        let buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\nrest";
        let (r, used) = done(buf);
        assert_eq!(r.body, b"abc");
        assert_eq!(&buf[used..], b"rest");
    }

    #[test]
    fn connection_close_and_http10() {
        let (r, _) = done(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!r.keep_alive);
        let (r, _) = done(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(!r.keep_alive);
        let (r, _) =
            done(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert!(r.keep_alive);
    }

    #[test]
    fn bodiless_statuses_end_at_their_head() {
        let (r, used) = done(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1");
        assert_eq!((r.status, r.body.len(), used), (204, 0, 27));
    }

    #[test]
    fn unframed_body_ends_at_eof() {
        let buf = b"HTTP/1.1 200 OK\r\n\r\nall of it";
        assert_eq!(parse_response(buf, false), Ok(Parse::Incomplete));
        match parse_response(buf, true).unwrap() {
            Parse::Done { response, consumed } => {
                assert_eq!(response.body, b"all of it");
                assert!(!response.keep_alive);
                assert_eq!(consumed, buf.len());
            }
            Parse::Incomplete => panic!("incomplete at eof"),
        }
    }

    #[test]
    fn malformed_and_truncated_responses_are_errors() {
        assert_eq!(
            parse_response(b"SPDY/9 200 OK\r\n\r\n", false),
            Err(ParseError::StatusLine)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 abc OK\r\n\r\n", false),
            Err(ParseError::StatusLine)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n", false),
            Err(ParseError::Header)
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                false
            ),
            Err(ParseError::Chunk)
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n",
                false
            ),
            Err(ParseError::Chunk)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", true),
            Err(ParseError::Truncated)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200", true),
            Err(ParseError::Truncated)
        );
        assert_eq!(
            parse_response(&vec![b'a'; MAX_HEAD + 1], false),
            Err(ParseError::HeadTooLarge)
        );
        let huge = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(
            parse_response(huge.as_bytes(), false),
            Err(ParseError::BodyTooLarge)
        );
        let chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n";
        assert_eq!(parse_response(chunk, false), Err(ParseError::BodyTooLarge));
    }

    #[test]
    fn percentiles_index_the_sorted_samples() {
        assert_eq!(summarize(&mut []), None);
        let mut v: Vec<f64> = (0..200).rev().map(f64::from).collect();
        let s = summarize(&mut v).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (100.0, 180.0, 198.0, 199.0));
        assert!((s.mean - 99.5).abs() < 1e-9);
        let s = summarize(&mut [7.0]).unwrap();
        assert_eq!((s.p50, s.p99, s.max), (7.0, 7.0, 7.0));
    }
}
