//! The guest-facing HTTP/1.x server: request parsing with hard limits, and Firecracker's
//! answers for V1/V2 reads and token requests.

use std::time::Instant;

use crate::config::MmdsVersion;
use crate::store::{Format, LookupError};
use crate::token::{MAX_TTL_SECONDS, MIN_TTL_SECONDS};
use crate::Mmds;

/// Largest request (line, headers and body) the server buffers; more is answered with 413.
pub const MAX_REQUEST_SIZE: usize = 4096;

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];
const FORWARDED_FOR: &str = "x-forwarded-for";
const TEXT: &str = "text/plain";
const JSON: &str = "application/json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Http10,
    Http11,
}

struct Request<'a> {
    method: &'a str,
    path: &'a str,
    version: Version,
    headers: Vec<(&'a str, &'a str)>,
    keep_alive: bool,
}

impl Request<'_> {
    /// The first header with one of `names` (matched case-insensitively), with its name as sent.
    fn header(&self, names: &[&str]) -> Option<(&str, &str)> {
        self.headers
            .iter()
            .find(|(name, _)| names.iter().any(|n| name.eq_ignore_ascii_case(n)))
            .copied()
    }
}

/// An answer, rendered by [`Response::into_bytes`].
pub(crate) struct Response {
    status: u16,
    version: Version,
    content_type: &'static str,
    headers: Vec<(String, String)>,
    body: String,
    /// The connection closes after this response.
    pub(crate) close: bool,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            version: Version::Http11,
            content_type,
            headers: Vec::new(),
            body,
            close: false,
        }
    }

    fn error(status: u16, body: impl Into<String>) -> Response {
        Response::new(status, TEXT, body.into())
    }

    /// The response as it goes on the wire.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            _ => "Not Implemented",
        };
        let version = match self.version {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        };
        let mut head = format!(
            "{version} {} {reason}\r\nServer: kiln MMDS\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        match (self.close, self.version) {
            (true, _) => head.push_str("Connection: close\r\n"),
            (false, Version::Http10) => head.push_str("Connection: keep-alive\r\n"),
            (false, Version::Http11) => {}
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

/// What the bytes buffered so far on a connection amount to.
pub(crate) enum Parsed {
    /// Not a whole request yet: wait for more bytes.
    Incomplete,
    /// A whole request (or a hopeless one) of `consumed` bytes, and its answer.
    Done { consumed: usize, response: Response },
}

/// Parses the request at the start of `buf` and answers it from `mmds`.
///
/// `mmds` is only called for a complete, well-formed request, so the caller can hold its lock
/// just for that moment.
pub(crate) fn serve<G>(buf: &[u8], now: Instant, mmds: impl FnOnce() -> G) -> Parsed
where
    G: std::ops::DerefMut<Target = Mmds>,
{
    match parse(buf) {
        Err(ParseError::Incomplete) => Parsed::Incomplete,
        Err(ParseError::Bad(status, message)) => {
            let mut response = Response::error(status, message);
            response.close = true;
            Parsed::Done {
                consumed: buf.len(),
                response,
            }
        }
        Ok((request, consumed)) => {
            let mut guard = mmds();
            let mut response = respond(&mut guard, &request, now);
            response.version = request.version;
            response.close = !request.keep_alive;
            Parsed::Done { consumed, response }
        }
    }
}

/// The answer to a request whose sender stopped before its end.
pub(crate) fn truncated_request() -> Response {
    let mut response = Response::error(400, "The request is incomplete.");
    response.close = true;
    response
}

enum ParseError {
    Incomplete,
    Bad(u16, String),
}

fn bad(message: &str) -> ParseError {
    ParseError::Bad(400, message.to_string())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse(buf: &[u8]) -> Result<(Request<'_>, usize), ParseError> {
    let window = &buf[..buf.len().min(MAX_REQUEST_SIZE)];
    // RFC 9112 lets a server skip empty lines before the request line.
    let mut start = 0;
    while window[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let Some(head_len) = find(&window[start..], b"\r\n\r\n") else {
        if buf.len() >= MAX_REQUEST_SIZE {
            return Err(ParseError::Bad(
                413,
                format!("The request exceeds the {MAX_REQUEST_SIZE}-byte limit."),
            ));
        }
        // A request line that already cannot be valid need not wait for more bytes.
        if window[start..].iter().any(|&b| b == 0 || b >= 0x80) {
            return Err(bad("The request is not valid HTTP."));
        }
        return Err(ParseError::Incomplete);
    };
    let head_end = start + head_len;
    let Ok(head) = std::str::from_utf8(&buf[start..head_end]) else {
        return Err(bad("The request head is not valid UTF-8."));
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("The request line is malformed."));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad("The request method is malformed."));
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        _ => return Err(bad("Unsupported HTTP version.")),
    };
    let path = absolute_path(target).ok_or_else(|| bad("Invalid URI."))?;

    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("A header line is malformed."));
        };
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad("A header name is malformed."));
        }
        if value.bytes().any(|b| b < b' ' && b != b'\t') {
            return Err(bad("A header value is malformed."));
        }
        headers.push((name, value.trim_matches([' ', '\t'])));
    }

    let mut request = Request {
        method,
        path,
        version,
        headers,
        keep_alive: false,
    };
    if request.header(&["transfer-encoding"]).is_some() {
        return Err(ParseError::Bad(
            501,
            "Transfer-Encoding is not supported by MMDS.".into(),
        ));
    }
    let mut body_len = 0usize;
    for (name, value) in &request.headers {
        if name.eq_ignore_ascii_case("content-length") {
            let Ok(len) = value.parse::<usize>() else {
                return Err(bad("Invalid Content-Length."));
            };
            if body_len != 0 && body_len != len {
                return Err(bad("Conflicting Content-Length headers."));
            }
            body_len = len;
        }
    }
    let total = head_end.saturating_add(4).saturating_add(body_len);
    if total > MAX_REQUEST_SIZE {
        return Err(ParseError::Bad(
            413,
            format!("The request exceeds the {MAX_REQUEST_SIZE}-byte limit."),
        ));
    }
    if buf.len() < total {
        return Err(ParseError::Incomplete);
    }
    let connection = request.header(&["connection"]).map(|(_, v)| v);
    let has_token = |token: &str| {
        connection.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    request.keep_alive = match version {
        Version::Http11 => !has_token("close"),
        Version::Http10 => has_token("keep-alive"),
    };
    Ok((request, total))
}

/// The path of an origin-form (`/a/b`) or absolute-form (`http://host/a/b`) target, without
/// query or fragment; `None` if there is none (Firecracker's "Invalid URI").
fn absolute_path(target: &str) -> Option<&str> {
    let target = target.split(['?', '#']).next().unwrap_or_default();
    if target.starts_with('/') {
        return Some(target);
    }
    let scheme = target.get(..7)?;
    if !scheme.eq_ignore_ascii_case("http://") {
        return None;
    }
    let rest = &target[7..];
    let slash = rest.find('/')?;
    Some(&rest[slash..])
}

/// Collapses runs of `/` (Firecracker compares the token path after this).
fn collapse_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

fn respond(mmds: &mut Mmds, request: &Request<'_>, now: Instant) -> Response {
    match request.method {
        "GET" => respond_get(mmds, request, now),
        "PUT" => respond_put(mmds, request, now),
        _ => {
            let mut response = Response::error(405, "Not allowed HTTP method.");
            response.headers.push(("Allow".into(), "GET, PUT".into()));
            response
        }
    }
}

fn respond_get(mmds: &Mmds, request: &Request<'_>, now: Instant) -> Response {
    let token = request.header(&TOKEN_HEADERS).map(|(_, v)| v);
    // V1 serves reads whatever the token; V2 wants a valid, unexpired one.
    if mmds.version == MmdsVersion::V2 {
        match token {
            None => {
                return Response::error(
                    401,
                    "No MMDS token provided. Use the X-metadata-token or \
                     X-aws-ec2-metadata-token header to specify the session token.",
                )
            }
            Some(token) if !mmds.tokens.is_valid(token, now) => {
                return Response::error(401, "MMDS token not valid.")
            }
            Some(_) => {}
        }
    }
    let wants_json = request.header(&["accept"]).is_some_and(|(_, value)| {
        value.split(',').any(|range| {
            range
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(JSON))
        })
    });
    let format = if wants_json && !mmds.imds_compat {
        Format::Json
    } else {
        Format::Imds
    };
    match mmds.store.lookup(request.path, format) {
        Ok(body) => {
            let content_type = match format {
                Format::Json => JSON,
                Format::Imds => TEXT,
            };
            Response::new(200, content_type, body)
        }
        Err(LookupError::NotFound) => {
            Response::error(404, format!("Resource not found: {}.", request.path))
        }
        Err(LookupError::UnsupportedType) => Response::error(
            501,
            "Cannot retrieve value. The value has an unsupported type.",
        ),
    }
}

fn respond_put(mmds: &mut Mmds, request: &Request<'_>, now: Instant) -> Response {
    // Tokens must not be obtainable through a forwarding proxy in the guest (IMDSv2's rule).
    if let Some((name, _)) = request.header(&[FORWARDED_FOR]) {
        return Response::error(
            400,
            format!("Invalid header. Reason: Unsupported header name. Key: {name}"),
        );
    }
    if collapse_slashes(request.path) != TOKEN_PATH {
        return Response::error(404, format!("Resource not found: {}.", request.path));
    }
    let Some((name, value)) = request.header(&TTL_HEADERS) else {
        return Response::error(
            400,
            "Token time to live value not found. Use the X-metadata-token-ttl-seconds or \
             X-aws-ec2-metadata-token-ttl-seconds header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Response::error(
            400,
            format!("Invalid header. Reason: Invalid value. Key:{name}; Value:{value}"),
        );
    };
    if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&ttl) {
        return Response::error(
            400,
            format!(
                "Invalid time to live value provided for token: {ttl}. Please provide a value \
                 between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}."
            ),
        );
    }
    let token = mmds.tokens.mint(ttl, now);
    let mut response = Response::new(200, TEXT, token);
    response.headers.push((name.to_string(), ttl.to_string()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_paths() {
        assert_eq!(absolute_path("/a/b?x=1"), Some("/a/b"));
        assert_eq!(absolute_path("http://169.254.169.254/a"), Some("/a"));
        assert_eq!(absolute_path("HTTP://h/"), Some("/"));
        assert_eq!(absolute_path("http://"), None);
        assert_eq!(absolute_path("http://host"), None);
        assert_eq!(absolute_path("*"), None);
        assert_eq!(absolute_path(""), None);
        assert_eq!(absolute_path("ftp://x/y"), None);
    }

    #[test]
    fn slashes_collapse() {
        assert_eq!(
            collapse_slashes("//latest///api/token"),
            "/latest/api/token"
        );
        assert_eq!(collapse_slashes("/"), "/");
    }

    #[test]
    fn parse_limits_and_errors() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(ParseError::Incomplete)
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            Err(ParseError::Incomplete)
        ));
        let Ok((request, used)) = parse(b"\r\nGET / HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET")
        else {
            panic!("complete request with body");
        };
        assert_eq!(used, 41);
        assert!(request.keep_alive);
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"get / HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET http:// HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\n Folded: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"\x00\x01garbage",
        ] {
            assert!(
                matches!(parse(bad), Err(ParseError::Bad(400, _))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Err(ParseError::Bad(400, _))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n"),
            Err(ParseError::Bad(413, _))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ParseError::Bad(501, _))
        ));
        let mut long = b"GET /".to_vec();
        long.resize(MAX_REQUEST_SIZE, b'a');
        assert!(matches!(parse(&long), Err(ParseError::Bad(413, _))));
    }

    #[test]
    fn keep_alive_rules() {
        let keep = |raw: &[u8]| parse(raw).map(|(r, _)| r.keep_alive).ok();
        assert_eq!(keep(b"GET / HTTP/1.1\r\n\r\n"), Some(true));
        assert_eq!(
            keep(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"),
            Some(false)
        );
        assert_eq!(keep(b"GET / HTTP/1.0\r\n\r\n"), Some(false));
        assert_eq!(
            keep(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            Some(true)
        );
    }
}
