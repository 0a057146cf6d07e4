//! The checks every request passes before a handler sees it: the `Host`
//! header on a loopback listener (DNS rebinding), the bearer token, the
//! body's declared size and its content type.
//!
//! A browser on the same machine can be made to send requests to a
//! loopback port by any web page: a rebound DNS name reaches it with that
//! name in `Host`, and a cross-site "simple" POST can only carry
//! `text/plain` or form bodies. So a loopback server answers only requests
//! addressed to the loopback by name, and takes JSON only when labelled as
//! JSON (which a cross-site page cannot send without a CORS preflight this
//! server never grants).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

/// The path that answers without a token (for load balancers' probes).
pub const HEALTH_PATH: &str = "/v1/health";
/// The readiness route, also open to probes without a token.
pub const READY_PATH: &str = "/v1/ready";

/// The shared secret clients present as `Authorization: Bearer <token>`.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(Arc<str>);

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

impl AuthToken {
    /// The token in `path`: its content, trimmed. Refused when empty, or
    /// when the file is readable by every user (it is a secret).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let what = || format!("auth token file {}", path.display());
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", what()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a regular file", what()));
        }
        if meta.permissions().mode() & 0o004 != 0 {
            return Err(format!(
                "{} is readable by every user: make it private (chmod 600)",
                what()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", what()))?;
        Self::new(text.trim())
    }

    /// A token from its text. Refused when empty or when it holds
    /// characters an HTTP header cannot carry.
    pub fn new(token: &str) -> Result<Self, String> {
        if token.is_empty() {
            return Err("the auth token is empty".into());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the auth token must be printable ASCII without spaces".into());
        }
        Ok(AuthToken(token.into()))
    }

    /// The token's text (for a client to send).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that does not depend on
    /// where they differ.
    fn matches(&self, presented: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        // The length is not secret; the content is.
        if ours.len() != presented.len() {
            return false;
        }
        let diff = ours
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

/// What the guard enforces.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Required on every route but [`HEALTH_PATH`] and [`READY_PATH`].
    pub token: Option<AuthToken>,
    /// Only `localhost`, `127.0.0.1` and `[::1]` (with any port) are
    /// accepted in `Host` (set on a loopback TCP listener).
    pub loopback_host: bool,
    /// Bodies declared larger get 413 before a byte of them is read.
    pub max_body_bytes: usize,
}

/// Runs the checks, then the handler.
pub async fn check(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    match guard.refusal(request.method(), request.uri().path(), request.headers()) {
        Some(refusal) => refusal,
        None => next.run(request).await,
    }
}

impl Guard {
    /// The answer to a request that must not reach its handler.
    fn refusal(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<Response> {
        if self.loopback_host
            && !headers
                .get(header::HOST)
                .is_some_and(|h| is_loopback_host(h.as_bytes()))
        {
            return Some(super::error(
                StatusCode::MISDIRECTED_REQUEST,
                "this server answers only requests addressed to localhost, 127.0.0.1 or [::1]"
                    .into(),
            ));
        }
        if let Some(token) = &self.token {
            if path != HEALTH_PATH
                && path != READY_PATH
                && !bearer(headers).is_some_and(|t| token.matches(t))
            {
                let mut response = super::error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (Authorization: Bearer <token>)".into(),
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return Some(response);
            }
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body_bytes as u64) {
            return Some(super::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is {} bytes, over the limit of {}",
                    declared.unwrap_or_default(),
                    self.max_body_bytes
                ),
            ));
        }
        let has_body =
            declared.is_some_and(|len| len > 0) || headers.contains_key(header::TRANSFER_ENCODING);
        if (*method == Method::POST || *method == Method::PUT) && has_body {
            let accepted: &[&str] = if *method == Method::PUT {
                // A function's bundle.
                &["application/zip"]
            } else if path.starts_with("/v1/functions/") {
                // An event is any bytes, normally JSON.
                &["application/json", "application/octet-stream"]
            } else {
                &["application/json"]
            };
            let given = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or_default().trim());
            if !given.is_some_and(|g| accepted.iter().any(|a| g.eq_ignore_ascii_case(a))) {
                return Some(super::error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "Content-Type {} is not accepted here; send {}",
                        given.map_or("(none)".into(), |g| format!("{g:?}")),
                        accepted.join(" or ")
                    ),
                ));
            }
        }
        None
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// `localhost`, `127.0.0.1` or `[::1]`, each with an optional port.
fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        // `[::1]` alone has colons inside its brackets.
        Some((name, port)) if !host.ends_with(']') => {
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return false;
            }
            name
        }
        _ => host,
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "[::1]"
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn guard() -> Guard {
        Guard {
            token: Some(AuthToken::new("s3cret").unwrap()),
            loopback_host: true,
            max_body_bytes: 100,
        }
    }

    fn status(g: &Guard, method: Method, path: &str, h: &[(&'static str, &str)]) -> u16 {
        g.refusal(&method, path, &headers(h))
            .map_or(200, |r| r.status().as_u16())
    }

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.2",
            "127.0.0.1:",
            "127.0.0.1:x",
            "[::2]:80",
            "",
            "ember",
        ] {
            assert!(!is_loopback_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn checks_in_order() {
        let g = guard();
        let auth = ("authorization", "Bearer s3cret");
        let host = ("host", "127.0.0.1:8080");
        let json = ("content-type", "application/json; charset=utf-8");
        let body = ("content-length", "10");
        assert_eq!(status(&g, Method::GET, "/v1/health", &[host]), 200);
        assert_eq!(
            status(&g, Method::GET, "/v1/health", &[("host", "evil:80")]),
            421
        );
        assert_eq!(status(&g, Method::GET, "/metrics", &[host]), 401);
        assert_eq!(
            status(
                &g,
                Method::GET,
                "/metrics",
                &[host, ("authorization", "Bearer s3cres")]
            ),
            401
        );
        assert_eq!(
            status(
                &g,
                Method::GET,
                "/metrics",
                &[host, ("authorization", "Basic s3cret")]
            ),
            401
        );
        assert_eq!(status(&g, Method::GET, "/metrics", &[host, auth]), 200);
        assert_eq!(
            status(
                &g,
                Method::GET,
                "/metrics",
                &[host, ("authorization", "bearer  s3cret ")]
            ),
            200
        );
        let post = |h: &[(&'static str, &str)]| status(&g, Method::POST, "/v1/invocations", h);
        assert_eq!(post(&[host, auth, json, body]), 200);
        assert_eq!(post(&[host, auth, body]), 415);
        assert_eq!(
            post(&[host, auth, body, ("content-type", "text/plain")]),
            415
        );
        assert_eq!(post(&[host, auth, json, ("content-length", "101")]), 413);
        let event =
            |h: &[(&'static str, &str)]| status(&g, Method::POST, "/v1/functions/f/invocations", h);
        assert_eq!(
            event(&[
                host,
                auth,
                body,
                ("content-type", "application/octet-stream")
            ]),
            200
        );
        assert_eq!(event(&[host, auth, ("content-length", "0")]), 200);
        assert_eq!(
            event(&[host, auth, body, ("content-type", "text/plain")]),
            415
        );
        // A bundle is a zip, labelled as one.
        let deploy = |h: &[(&'static str, &str)]| status(&g, Method::PUT, "/v1/functions/f", h);
        assert_eq!(
            deploy(&[host, auth, body, ("content-type", "application/zip")]),
            200
        );
        for wrong in ["application/json", "text/plain", "application/octet-stream"] {
            assert_eq!(deploy(&[host, auth, body, ("content-type", wrong)]), 415);
        }
        assert_eq!(
            deploy(&[host, body, ("content-type", "application/zip")]),
            401
        );
        let open = Guard {
            token: None,
            loopback_host: false,
            max_body_bytes: 100,
        };
        assert_eq!(
            status(&open, Method::GET, "/metrics", &[("host", "ember")]),
            200
        );
    }

    #[test]
    fn tokens() {
        assert!(AuthToken::new("").is_err());
        assert!(AuthToken::new("a b").is_err());
        let t = AuthToken::new("abc").unwrap();
        assert!(t.matches(b"abc"));
        assert!(!t.matches(b"abd"));
        assert!(!t.matches(b"ab"));
        assert_eq!(format!("{t:?}"), "AuthToken(<redacted>)");
    }

    #[test]
    fn token_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ember-guard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  tok\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(AuthToken::from_file(&file).unwrap().as_str(), "tok");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(AuthToken::from_file(&file)
            .unwrap_err()
            .contains("readable by every user"));
        std::fs::write(&file, " \n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(AuthToken::from_file(&file).unwrap_err().contains("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
