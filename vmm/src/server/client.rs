//! A small blocking HTTP/1.1 client for `ember serve`, over TCP or a Unix
//! socket, with keep-alive: what the load test (`ember bench http`) and
//! the tests use. Only loopback addresses are accepted: it is meant for a
//! server on the same machine.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::guard::AuthToken;

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `http://127.0.0.1:PORT` (any loopback address, or `localhost`).
    Tcp(SocketAddr),
    /// `unix:/path/to.sock`.
    Unix(PathBuf),
}

impl FromStr for Target {
    type Err = ClientError;

    /// Parses `http://HOST:PORT[/]` with a loopback HOST, or `unix:PATH`.
    fn from_str(url: &str) -> Result<Self, ClientError> {
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ClientError::Url("unix: needs a socket path".into()));
            }
            return Ok(Target::Unix(path.into()));
        }
        let bad = || ClientError::Url(format!("{url:?} is not http://HOST:PORT or unix:PATH"));
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.trim_end_matches('/');
        let addr: SocketAddr = match authority.strip_prefix("localhost:") {
            Some(port) => SocketAddr::from(([127, 0, 0, 1], port.parse().map_err(|_| bad())?)),
            None => authority.parse().map_err(|_| bad())?,
        };
        if !addr.ip().is_loopback() {
            return Err(ClientError::Url(format!(
                "{addr} is not a loopback address: this client only talks to a local server"
            )));
        }
        Ok(Target::Tcp(addr))
    }
}

/// A request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not usable.
    #[error("bad server address: {0}")]
    Url(String),
    /// Connecting, writing or reading failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The answer is not HTTP/1.1 as expected.
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// Response headers: names (lower case) and values, in order.
pub type Headers = Vec<(String, String)>;

/// A response with its whole body.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Headers,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ClientError::Malformed(format!("body is not JSON: {e}")))
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// Longest status line or header line accepted.
const MAX_LINE: usize = 16 << 10;
/// Largest body accepted.
const MAX_BODY: usize = 256 << 20;

/// One keep-alive connection to the server, reopened as needed.
pub struct Client {
    target: Target,
    timeout: Duration,
    token: Option<AuthToken>,
    conn: Option<BufReader<Conn>>,
}

impl Client {
    /// A client for `target`; each read or write may take up to `timeout`.
    pub fn new(target: Target, timeout: Duration) -> Self {
        Client {
            target,
            timeout,
            token: None,
            conn: None,
        }
    }

    /// Sends `token` as `Authorization: Bearer` with every request.
    pub fn with_token(mut self, token: Option<AuthToken>) -> Self {
        self.token = token;
        self
    }

    /// The `Host` header: the loopback address itself (a loopback server
    /// accepts no other name), `localhost` over a Unix socket.
    fn host(&self) -> String {
        match &self.target {
            Target::Tcp(addr) => addr.to_string(),
            Target::Unix(_) => "localhost".into(),
        }
    }

    fn connect(&self) -> io::Result<BufReader<Conn>> {
        let conn = match &self.target {
            Target::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, self.timeout)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(self.timeout))?;
                s.set_write_timeout(Some(self.timeout))?;
                Conn::Tcp(s)
            }
            Target::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(self.timeout))?;
                s.set_write_timeout(Some(self.timeout))?;
                Conn::Unix(s)
            }
        };
        Ok(BufReader::new(conn))
    }

    /// Sends one request and reads the whole answer.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let mut data = Vec::new();
        let (status, headers) = self.request_streaming(method, path, body, |chunk| {
            data.extend_from_slice(chunk);
        })?;
        Ok(Response {
            status,
            headers,
            body: data,
        })
    }

    /// Sends one request whose body is of `content_type` (e.g. a bundle,
    /// `application/zip`) and reads the whole answer.
    pub fn request_as(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        content_type: &str,
    ) -> Result<Response, ClientError> {
        let mut data = Vec::new();
        let (status, headers) = self.send(method, path, Some(body), content_type, |chunk| {
            data.extend_from_slice(chunk);
        })?;
        Ok(Response {
            status,
            headers,
            body: data,
        })
    }

    /// `POST path` with a JSON body.
    pub fn post_json(
        &mut self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Response, ClientError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| ClientError::Malformed(format!("cannot encode the body: {e}")))?;
        self.request("POST", path, Some(&body))
    }

    /// Sends one request and hands the body to `on_data` as it arrives;
    /// returns the status and headers.
    pub fn request_streaming(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        on_data: impl FnMut(&[u8]),
    ) -> Result<(u16, Headers), ClientError> {
        self.send(method, path, body, "application/json", on_data)
    }

    fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: &str,
        on_data: impl FnMut(&[u8]),
    ) -> Result<(u16, Headers), ClientError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let head = Head {
            method,
            path,
            host: &self.host(),
            token: self.token.as_ref().map(AuthToken::as_str),
            content_type,
        };
        let result = exchange(&mut conn, &head, body, on_data);
        if matches!(result, Ok((_, _, true))) {
            self.conn = Some(conn);
        }
        result.map(|(status, headers, _)| (status, headers))
    }
}

/// What a request says before its body.
struct Head<'a> {
    method: &'a str,
    path: &'a str,
    host: &'a str,
    token: Option<&'a str>,
    content_type: &'a str,
}

/// One request and response on `conn`; the flag says whether the
/// connection can be used again.
fn exchange(
    conn: &mut BufReader<Conn>,
    head: &Head<'_>,
    body: Option<&[u8]>,
    on_data: impl FnMut(&[u8]),
) -> Result<(u16, Headers, bool), ClientError> {
    let Head {
        method,
        path,
        host,
        token,
        content_type,
    } = *head;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    let out = conn.get_mut();
    let sent = out
        .write_all(request.as_bytes())
        .and_then(|()| out.write_all(body.unwrap_or_default()))
        .and_then(|()| out.flush());
    // A server may answer (e.g. 413) and close before reading the whole
    // body: its answer is still there to read.
    if let Err(e) = sent {
        return read_response(conn, method, on_data).map_err(|_| ClientError::Io(e));
    }
    read_response(conn, method, on_data)
}

/// Reads one response from `conn`.
fn read_response(
    conn: &mut BufReader<Conn>,
    method: &str,
    mut on_data: impl FnMut(&[u8]),
) -> Result<(u16, Headers, bool), ClientError> {
    let status_line = read_line(conn)?;
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(ClientError::Malformed(format!(
            "status line {status_line:?}"
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ClientError::Malformed(format!(
            "status line {status_line:?}"
        )));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| ClientError::Malformed(format!("status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(conn)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ClientError::Malformed(format!("header line {line:?}")));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let reusable = header(&headers, "connection") != Some("close");
    if method == "HEAD" || status == 204 || status == 304 {
        return Ok((status, headers, reusable));
    }
    let chunked =
        header(&headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        loop {
            let size_line = read_line(conn)?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| ClientError::Malformed(format!("chunk size {size_line:?}")))?;
            if size > MAX_BODY {
                return Err(ClientError::Malformed(format!("chunk of {size} bytes")));
            }
            if size == 0 {
                // Trailers, then the empty line.
                while !read_line(conn)?.is_empty() {}
                return Ok((status, headers, reusable));
            }
            let mut chunk = vec![0; size];
            conn.read_exact(&mut chunk)?;
            on_data(&chunk);
            if !read_line(conn)?.is_empty() {
                return Err(ClientError::Malformed("chunk not followed by CRLF".into()));
            }
        }
    }
    match header(&headers, "content-length") {
        Some(len) => {
            let len: usize = len
                .parse()
                .map_err(|_| ClientError::Malformed(format!("content-length {len:?}")))?;
            if len > MAX_BODY {
                return Err(ClientError::Malformed(format!("body of {len} bytes")));
            }
            let mut data = vec![0; len];
            conn.read_exact(&mut data)?;
            on_data(&data);
            Ok((status, headers, reusable))
        }
        None => {
            // Until the server closes the connection.
            let mut data = Vec::new();
            conn.take(MAX_BODY as u64).read_to_end(&mut data)?;
            on_data(&data);
            Ok((status, headers, false))
        }
    }
}

fn read_line(conn: &mut BufReader<Conn>) -> Result<String, ClientError> {
    let mut line = Vec::new();
    let n = conn
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(ClientError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if line.last() != Some(&b'\n') {
        return Err(ClientError::Malformed("line too long or cut".into()));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| ClientError::Malformed("line is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_loopback_only() {
        assert_eq!(
            "http://127.0.0.1:8080".parse::<Target>().unwrap(),
            Target::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            "http://localhost:1/".parse::<Target>().unwrap(),
            Target::Tcp("127.0.0.1:1".parse().unwrap())
        );
        assert!("http://[::1]:80".parse::<Target>().is_ok());
        assert_eq!(
            "unix:/tmp/s".parse::<Target>().unwrap(),
            Target::Unix("/tmp/s".into())
        );
        for bad in [
            "http://10.0.0.1:80",
            "http://8.8.8.8:80",
            "https://127.0.0.1:1",
            "127.0.0.1:80",
            "http://example.com:80",
            "unix:",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }
}
