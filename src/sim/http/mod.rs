//! A minimal HTTP/1.1 server for the simulators, written by hand on a tokio `TcpListener`.
//!
//! It owns the wire: reading request heads and bodies (Content-Length, chunked, `Expect:
//! 100-continue`), keep-alive, writing responses, and reporting whether a response write completed.
//! A server of our own (rather than hyper or axum) is what lets the simulators reproduce the
//! peers' quirks: header names are kept in the exact case the client sent (the CMS reads them with
//! PHP `getallheaders`), a request can be left unanswered forever or the connection closed without
//! an answer, a body can be written slowly, and the handler learns when a client abandoned a
//! response mid-write (which kills the real LookingGlass viewer). Turning bytes into a head and a
//! body is `parse`'s (with `httparse`, hyper's own parser, which hands out header names exactly as
//! sent); this file owns the socket: reading, keep-alive, writing and noticing a client leave.
//!
//! A client that closes its side of the connection (EOF) while its request is being handled
//! counts as gone: its response is not written and is reported as not written. Real HTTP clients
//! (curl, reqwest) do not half-close; a `nc -N` style client would be treated as leaving.
//!
//! It must not know anything about chat, the viewer or the CMS: routing and bodies belong to the
//! handlers. It never panics on network input; a malformed request gets `400` and the connection
//! is closed.

mod parse;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::sim::http::parse::{BodyFraming, ReadFailure, body_framing, parse_chunked, parse_head};

/// Largest request head (request line and headers) accepted; a larger one gets `413` and a close.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body accepted; a larger one gets `413` and a close.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Size of one socket read.
const READ_CHUNK: usize = 16 * 1024;

/// One parsed HTTP request, as the client sent it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The method exactly as sent (e.g. `GET`, or `get` if the client wrote it so).
    pub method: String,
    /// The raw request-target, e.g. `/api/chat?xx=1`.
    pub target: String,
    /// The target before `?`, not percent-decoded.
    pub path: String,
    /// The raw text after `?`, `""` if there is none.
    pub query: String,
    /// Header names in the exact case the client sent, in order; values with surrounding
    /// whitespace trimmed.
    pub headers: Vec<(String, String)>,
    /// The body: read by Content-Length, or de-chunked when it came chunked (see `chunked`).
    pub body: Vec<u8>,
    /// True if the body came with `Transfer-Encoding: chunked`. PHP and some peers treat such
    /// bodies differently, so the handler may want to know.
    pub chunked: bool,
    /// The client's address.
    pub peer: SocketAddr,
}

impl Request {
    /// The first value of header `name`, compared case-insensitively (HTTP semantics).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The first value of header `name`, compared case-sensitively: what PHP's `getallheaders()`
    /// followed by `$headers['Content-Type']` sees.
    pub fn header_exact(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The form-decoded (`+` → space, then `%XX`) value of the first `key=` in the query string;
    /// `Some("")` for a bare `key`. Invalid UTF-8 after decoding is replaced, not rejected.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((name, value)) => (form_decode(name), form_decode(value)),
                None => (form_decode(pair), String::new()),
            })
            .find(|(name, _)| name == key)
            .map(|(_, value)| value)
    }
}

/// `application/x-www-form-urlencoded` decoding of one name or value.
fn form_decode(text: &str) -> String {
    let spaced = text.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

/// A response to write.
#[derive(Debug)]
pub struct Response {
    /// The status code; the reason phrase is chosen by the server.
    pub status: u16,
    /// Headers written exactly as given, in order. `Content-Length` is added by the server unless
    /// one is given here (a handler may give a wrong one on purpose). `Connection: close` is added
    /// when the server is going to close the connection and no `Connection` header is given.
    pub headers: Vec<(String, String)>,
    /// The body (not written for a `HEAD` request, though its length is announced).
    pub body: Vec<u8>,
    /// Write the body in pieces of `chunk` bytes with `pause` between them (a slow peer).
    pub trickle: Option<(usize, Duration)>,
    /// Told whether the whole response reached the socket (true) or the client went away mid-write (false).
    pub written: Option<oneshot::Sender<bool>>,
}

impl Response {
    /// A response with one `Content-Type` header (none if `content_type` is empty) and `body`.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        let mut headers = Vec::new();
        if !content_type.is_empty() {
            headers.push(("Content-Type".to_owned(), content_type.to_owned()));
        }
        Response {
            status,
            headers,
            body: body.into(),
            trickle: None,
            written: None,
        }
    }

    /// Adds a header after those already present.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// What a handler wants done with a request.
#[derive(Debug)]
pub enum Reply {
    /// Write this response.
    Respond(Response),
    /// Keep the connection open and never answer, until the client gives up or the server shuts down.
    NoAnswer,
    /// Close the connection without answering (what a crashed or restarted server looks like).
    Close,
}

/// The reason phrase written after `status`.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Serve connections until `shutdown` is cancelled. Keep-alive supported (HTTP/1.1 default,
/// `Connection: close` honoured).
///
/// Limits: request head ≤ 64 KiB, body ≤ 64 MiB (larger → 413 and close). Malformed requests →
/// 400 and close. Never panics. On shutdown the listener is dropped at once, every connection is
/// closed (a handler still running is dropped, a response being written is reported as not
/// written), and the function returns when all connection tasks have ended.
pub async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: CancellationToken)
where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let handler = handler.clone();
                    let shutdown = shutdown.clone();
                    tracker.spawn(async move {
                        // The connection watches `shutdown` itself where it can report a response
                        // as not written; polling it first lets it do so before being dropped.
                        tokio::select! {
                            biased;
                            () = Connection::new(stream, peer).run(handler, &shutdown) => {}
                            _ = shutdown.cancelled() => {}
                        }
                    });
                }
                Err(error) => {
                    // Accept errors are mostly transient (EMFILE, ECONNABORTED); a short pause keeps
                    // a persistent one from spinning the CPU.
                    tracing::debug!(error = %error, "sim http accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// One client connection: the socket plus the bytes read but not yet consumed (a pipelined next
/// request may already be in there).
struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    buffer: Vec<u8>,
}

impl Connection {
    fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        Connection {
            stream,
            peer,
            buffer: Vec::new(),
        }
    }

    /// Serves requests on this connection until it closes or must close.
    async fn run<H, F>(mut self, handler: H, shutdown: &CancellationToken)
    where
        H: Fn(Request) -> F,
        F: Future<Output = Reply>,
    {
        // Nagle would delay the small pieces of a trickled body; the simulators want each write on
        // the wire when it is made.
        let _ = self.stream.set_nodelay(true);
        loop {
            let (request, keep_alive) = match self.read_request().await {
                Ok(parsed) => parsed,
                Err(ReadFailure::Gone) => return,
                Err(ReadFailure::Malformed(why)) => {
                    tracing::debug!(peer = %self.peer, why, "sim http malformed request");
                    self.write_error(400).await;
                    return;
                }
                Err(ReadFailure::TooLarge) => {
                    self.write_error(413).await;
                    return;
                }
            };
            let is_head = request.method.eq_ignore_ascii_case("HEAD");
            let (reply, client_gone) = self.run_handler(handler(request)).await;
            match reply {
                Reply::Close => return,
                Reply::NoAnswer => {
                    if !client_gone {
                        self.wait_until_client_gone(shutdown).await;
                    }
                    return;
                }
                Reply::Respond(mut response) => {
                    let written_to = response.written.take();
                    let close_after = !keep_alive
                        || response.headers.iter().any(|(key, value)| {
                            key.eq_ignore_ascii_case("connection")
                                && value.trim().eq_ignore_ascii_case("close")
                        });
                    let completed = !client_gone
                        && self
                            .write_response(response, is_head, close_after, shutdown)
                            .await;
                    if let Some(sender) = written_to {
                        // The handler may have stopped listening; that is its choice.
                        let _ = sender.send(completed);
                    }
                    if !completed || close_after {
                        return;
                    }
                }
            }
        }
    }

    /// Runs the handler while watching the socket, so a client that gives up while the handler
    /// is slow is noticed (its response then counts as not written). Bytes of a pipelined next
    /// request read meanwhile are kept.
    async fn run_handler<F>(&mut self, handler_future: F) -> (Reply, bool)
    where
        F: Future<Output = Reply>,
    {
        tokio::pin!(handler_future);
        let mut client_gone = false;
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            if client_gone || self.buffer.len() > MAX_HEAD_BYTES + MAX_BODY_BYTES {
                return (handler_future.await, client_gone);
            }
            tokio::select! {
                biased;
                reply = &mut handler_future => {
                    // The client may have gone in the same instant; look once more without waiting.
                    if !client_gone {
                        client_gone = self.client_gone_now(&mut chunk);
                    }
                    return (reply, client_gone);
                }
                readable = self.stream.readable() => {
                    if readable.is_err() {
                        client_gone = true;
                        continue;
                    }
                    match self.stream.try_read(&mut chunk) {
                        Ok(0) => client_gone = true,
                        Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => client_gone = true,
                    }
                }
            }
        }
    }

    /// A non-blocking look at the socket: true if the client has closed it or it failed.
    fn client_gone_now(&mut self, chunk: &mut [u8]) -> bool {
        loop {
            match self.stream.try_read(chunk) {
                Ok(0) => return true,
                Ok(n) => {
                    if self.buffer.len() > MAX_HEAD_BYTES + MAX_BODY_BYTES {
                        return false;
                    }
                    self.buffer.extend_from_slice(&chunk[..n]);
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }

    /// Holds the connection open, discarding input, until the client closes it or the server
    /// shuts down.
    async fn wait_until_client_gone(&mut self, shutdown: &CancellationToken) {
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                readable = self.stream.readable() => {
                    if readable.is_err() {
                        return;
                    }
                    match self.stream.try_read(&mut chunk) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
            }
        }
    }

    /// Reads more bytes into the buffer; `Gone` on EOF or error.
    async fn fill(&mut self) -> Result<(), ReadFailure> {
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            if self.stream.readable().await.is_err() {
                return Err(ReadFailure::Gone);
            }
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return Err(ReadFailure::Gone),
                Ok(n) => {
                    self.buffer.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(ReadFailure::Gone),
            }
        }
    }

    /// Reads one request: its head, then (after `100 Continue` if asked) its body. Returns the
    /// request and whether the connection may be kept alive after answering it.
    async fn read_request(&mut self) -> Result<(Request, bool), ReadFailure> {
        let (head, body_start) = loop {
            if let Some(parsed) = parse_head(&self.buffer)? {
                break parsed;
            }
            if self.buffer.len() > MAX_HEAD_BYTES {
                return Err(ReadFailure::TooLarge);
            }
            self.fill().await?;
        };
        self.buffer.drain(..body_start);

        let framing = body_framing(&head)?;
        let expects_body = match framing {
            BodyFraming::None => false,
            BodyFraming::Length(length) => length > 0,
            BodyFraming::Chunked => true,
        };
        let wants_continue = head
            .header("expect")
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("100-continue"));
        if wants_continue && head.http11 && expects_body && self.buffer.is_empty() {
            if let BodyFraming::Length(length) = framing {
                if length > MAX_BODY_BYTES {
                    return Err(ReadFailure::TooLarge);
                }
            }
            if self
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
            {
                return Err(ReadFailure::Gone);
            }
        }

        let (body, chunked) = match framing {
            BodyFraming::None => (Vec::new(), false),
            BodyFraming::Length(length) => {
                if length > MAX_BODY_BYTES {
                    return Err(ReadFailure::TooLarge);
                }
                while self.buffer.len() < length {
                    self.fill().await?;
                }
                (self.buffer.drain(..length).collect(), false)
            }
            BodyFraming::Chunked => loop {
                match parse_chunked(&self.buffer)? {
                    Some((body, consumed)) => {
                        self.buffer.drain(..consumed);
                        break (body, true);
                    }
                    None => {
                        if self.buffer.len() > MAX_BODY_BYTES + MAX_HEAD_BYTES {
                            return Err(ReadFailure::TooLarge);
                        }
                        self.fill().await?;
                    }
                }
            },
        };

        let keep_alive = head.keep_alive();
        let (path, query) = match head.target.split_once('?') {
            Some((path, query)) => (path.to_owned(), query.to_owned()),
            None => (head.target.clone(), String::new()),
        };
        let request = Request {
            method: head.method,
            target: head.target,
            path,
            query,
            headers: head.headers,
            body,
            chunked,
            peer: self.peer,
        };
        Ok((request, keep_alive))
    }

    /// Writes an error answer of the server's own (not the handler's) and ignores failures: the
    /// connection is closed right after.
    async fn write_error(&mut self, status: u16) {
        let body = format!("{status} {}\n", reason_phrase(status));
        let text = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            reason_phrase(status),
            body.len()
        );
        let _ = self.stream.write_all(text.as_bytes()).await;
        let _ = self.stream.shutdown().await;
    }

    /// Writes `response`; true if every byte reached the socket.
    async fn write_response(
        &mut self,
        response: Response,
        is_head: bool,
        close_after: bool,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            response.status,
            reason_phrase(response.status)
        );
        let mut has_length = false;
        let mut has_connection = false;
        for (name, value) in &response.headers {
            has_length |= name.eq_ignore_ascii_case("content-length");
            has_connection |= name.eq_ignore_ascii_case("connection");
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        if !has_length {
            head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
        }
        if close_after && !has_connection {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");

        let body: &[u8] = if is_head { &[] } else { &response.body };
        let write_all = async {
            match response.trickle {
                None => {
                    let mut whole = head.into_bytes();
                    whole.extend_from_slice(body);
                    self.stream.write_all(&whole).await?;
                }
                Some((chunk, pause)) => {
                    self.stream.write_all(head.as_bytes()).await?;
                    for (index, piece) in body.chunks(chunk.max(1)).enumerate() {
                        if index > 0 {
                            tokio::time::sleep(pause).await;
                        }
                        self.stream.write_all(piece).await?;
                    }
                }
            }
            self.stream.flush().await?;
            Ok::<(), std::io::Error>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => false,
            result = write_all => result.is_ok(),
        }
    }
}
