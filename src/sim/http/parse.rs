//! The pure half of the simulators' HTTP server: bytes in, a request head, its body framing and a
//! de-chunked body out. Request heads, chunk-size lines and trailers are parsed by `httparse`
//! (hyper's parser, which keeps header names exactly as sent); the framing rules of RFC 9112 §6.3
//! and the size limits are applied here.
//!
//! It must not do I/O or wait: the connection in `sim::http` reads the socket, calls these on
//! what it has, and reads more while they answer "incomplete".

use crate::sim::http::{MAX_BODY_BYTES, MAX_HEAD_BYTES};

/// Why a request could not be read.
pub(super) enum ReadFailure {
    /// The client closed the connection or the socket failed: nothing to answer.
    Gone,
    /// The request is malformed: answer 400 and close.
    Malformed(&'static str),
    /// The head or body is over the limit: answer 413 and close.
    TooLarge,
}

/// A parsed request head, before the body is read.
pub(super) struct Head {
    pub(super) method: String,
    pub(super) target: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) http11: bool,
}

impl Head {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Whether the `Connection` header lists `token` (case-insensitive, comma-separated).
    fn connection_has(&self, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, value)| value.split(','))
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    }

    pub(super) fn keep_alive(&self) -> bool {
        if self.http11 {
            !self.connection_has("close")
        } else {
            self.connection_has("keep-alive")
        }
    }
}

/// How the request body is framed.
pub(super) enum BodyFraming {
    None,
    Length(usize),
    Chunked,
}

/// Parses the request head at the start of `buffer` with `httparse`, which also skips empty lines
/// before the request line (RFC 9112 §2.2: some clients leave a previous body's CRLF) and accepts
/// bare `\n` line ends. `Ok(None)` while the head is incomplete, else the head (header names as
/// sent) and where the body starts. Only the first `MAX_HEAD_BYTES` are looked at, so a longer
/// head stays incomplete and the caller refuses it.
pub(super) fn parse_head(buffer: &[u8]) -> Result<Option<(Head, usize)>, ReadFailure> {
    let window = &buffer[..buffer.len().min(MAX_HEAD_BYTES)];
    // Every header needs a line of its own, so the slots never run out.
    let mut slots = vec![httparse::EMPTY_HEADER; count_line_ends(window)];
    let mut parsed = httparse::Request::new(&mut slots);
    let body_start = match parsed.parse(window) {
        Ok(httparse::Status::Complete(body_start)) => body_start,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ReadFailure::TooLarge),
        Err(error) => return Err(ReadFailure::Malformed(head_error(error))),
    };
    let headers = parsed
        .headers
        .iter()
        .map(|header| (header.name.to_owned(), header_value(header.value)))
        .collect();
    let head = Head {
        // A complete parse has both; the empty defaults are never used.
        method: parsed.method.unwrap_or_default().to_owned(),
        target: parsed.path.unwrap_or_default().to_owned(),
        headers,
        http11: parsed.version == Some(1),
    };
    Ok(Some((head, body_start)))
}

/// The number of `\n` in `bytes`: an upper bound of the header lines in them.
fn count_line_ends(bytes: &[u8]) -> usize {
    bytes.iter().filter(|byte| **byte == b'\n').count()
}

/// A header value as the handlers see it: surrounding blanks trimmed, invalid UTF-8 replaced.
fn header_value(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .trim_matches([' ', '\t'])
        .to_owned()
}

/// Why `httparse` refused a head, for the debug log.
fn head_error(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "bad header name",
        httparse::Error::HeaderValue => "bad header value",
        httparse::Error::NewLine => "bad line end",
        httparse::Error::Status | httparse::Error::Token => "bad request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "unsupported version",
    }
}

/// How the body is framed (RFC 9112 §6.3): chunked wins over Content-Length; differing
/// Content-Length values or a transfer coding other than chunked are malformed.
pub(super) fn body_framing(head: &Head) -> Result<BodyFraming, ReadFailure> {
    let codings: Vec<String> = head
        .headers
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, value)| value.split(','))
        .map(|item| item.trim().to_ascii_lowercase())
        .filter(|item| !item.is_empty())
        .collect();
    if !codings.is_empty() {
        return if codings.last().map(String::as_str) == Some("chunked") {
            Ok(BodyFraming::Chunked)
        } else {
            Err(ReadFailure::Malformed("unsupported transfer coding"))
        };
    }
    let mut length = None;
    for (_, value) in head
        .headers
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case("content-length"))
    {
        for item in value.split(',') {
            let item = item.trim();
            if item.is_empty() || !item.bytes().all(|byte| byte.is_ascii_digit()) {
                return Err(ReadFailure::Malformed("bad content-length"));
            }
            // Too many digits to fit is certainly over the limit.
            let parsed = item.parse::<usize>().unwrap_or(usize::MAX);
            if length.is_some_and(|previous| previous != parsed) {
                return Err(ReadFailure::Malformed("conflicting content-length"));
            }
            length = Some(parsed);
        }
    }
    Ok(length.map_or(BodyFraming::None, BodyFraming::Length))
}

/// Decodes a complete chunked body at the start of `buffer`: `Ok(None)` if more bytes are
/// needed, else the body and the number of bytes consumed (trailers included). Chunk-size lines
/// (CRLF-terminated, as RFC 9112 §7.1 writes them) and trailer fields are read by `httparse`. It
/// skips over chunk data without copying until the body is complete, so re-parsing after each
/// read stays cheap.
pub(super) fn parse_chunked(buffer: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ReadFailure> {
    let mut position = 0;
    let mut pieces: Vec<(usize, usize)> = Vec::new();
    let mut total = 0usize;
    loop {
        let rest = &buffer[position..];
        // `httparse` reads a size line without a digit as 0, the last chunk; it is malformed.
        match rest.first() {
            None => return Ok(None),
            Some(byte) if !byte.is_ascii_hexdigit() => {
                return Err(ReadFailure::Malformed("bad chunk size"));
            }
            Some(_) => {}
        }
        let (line_length, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::InvalidChunkSize) => {
                return Err(ReadFailure::Malformed("bad chunk size"));
            }
        };
        position += line_length;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).map_err(|_| ReadFailure::TooLarge)?;
        total = total.saturating_add(size);
        if total > MAX_BODY_BYTES {
            return Err(ReadFailure::TooLarge);
        }
        // Within the buffer's length plus 64 MiB: no overflow.
        let data_end = position + size;
        if buffer.len() < data_end {
            return Ok(None);
        }
        pieces.push((position, data_end));
        position = match &buffer[data_end..] {
            [b'\r', b'\n', ..] => data_end + 2,
            [b'\n', ..] => data_end + 1,
            [] | [b'\r'] => return Ok(None),
            _ => return Err(ReadFailure::Malformed("chunk data longer than its size")),
        };
    }
    // Trailer fields, ended by an empty line.
    let rest = &buffer[position..];
    let mut slots =
        vec![httparse::EMPTY_HEADER; count_line_ends(&rest[..rest.len().min(MAX_HEAD_BYTES)])];
    match httparse::parse_headers(rest, &mut slots) {
        Ok(httparse::Status::Complete((trailers_length, _))) => position += trailers_length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ReadFailure::TooLarge),
        Err(_) => return Err(ReadFailure::Malformed("bad trailer field")),
    }
    let mut body = Vec::with_capacity(total);
    for (start, end) in pieces {
        body.extend_from_slice(&buffer[start..end]);
    }
    Ok(Some((body, position)))
}
