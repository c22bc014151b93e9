//! The dashboard's HTTP edge: who may ask what. Every request passes the Host allow-list (DNS
//! rebinding), the token or the proxy's user header, and, for a POST, the read-only switch, the
//! same-origin check (CSRF) and a JSON body; every reply carries the security headers (a
//! Content-Security-Policy with no inline script, no framing, no sniffing).

use std::io::Read as _;
use std::net::SocketAddr;

use super::Shared;

/// The largest request body read: an action's list of ids (10,000 of them) fits many times.
const MAX_BODY: u64 = 1 << 20;

/// The cookie a browser keeps the token in, after opening the dashboard once with `?token=`.
const TOKEN_COOKIE: &str = "foreman_ui_token";

/// Headers on every reply. The page's scripts and styles are files of this origin; nothing is
/// inline, so an injected `<script>` would not run even if one got through.
const SECURITY_HEADERS: [(&str, &str); 6] = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
];

/// An answer to send.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    /// Taken over by an event stream: nothing is sent here.
    pub taken: bool,
}

impl Reply {
    pub fn json(status: u16, doc: &serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: doc.to_string().into_bytes(),
            headers: vec![("Cache-Control", "no-store".to_owned())],
            taken: false,
        }
    }

    pub fn ok(doc: &serde_json::Value) -> Reply {
        Reply::json(200, doc)
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply::json(status, &serde_json::json!({ "error": message }))
    }

    pub fn bytes(content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            status: 200,
            content_type,
            body,
            headers: Vec::new(),
            taken: false,
        }
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }

    pub fn taken() -> Reply {
        Reply {
            taken: true,
            ..Reply::bytes("text/plain", Vec::new())
        }
    }
}

/// A request with what the checks learnt: who asks.
pub struct Request<'a> {
    raw: Option<tiny_http::Request>,
    shared: &'a Shared,
    /// The path as it came, still percent-encoded (for a redirect back to it).
    raw_path: String,
    path: String,
    query: String,
    /// Who asked, for logs and origins: the proxy's user, else "ui".
    pub who: String,
}

impl<'a> Request<'a> {
    pub fn new(raw: tiny_http::Request, shared: &'a Shared) -> Request<'a> {
        let url = raw.url().to_owned();
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        Request {
            raw_path: path.to_owned(),
            path: percent_decode(path),
            query: query.to_owned(),
            raw: Some(raw),
            shared,
            who: "ui".to_owned(),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn is_post(&self) -> bool {
        self.raw
            .as_ref()
            .is_some_and(|r| *r.method() == tiny_http::Method::Post)
    }

    /// A header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<String> {
        self.raw.as_ref()?.headers().iter().find_map(|h| {
            h.field
                .as_str()
                .as_str()
                .eq_ignore_ascii_case(name)
                .then(|| h.value.as_str().to_owned())
        })
    }

    /// The query string's value for `key`, decoded; an empty value counts as absent.
    pub fn param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == key)
                .then(|| percent_decode(&v.replace('+', " ")))
                .filter(|v| !v.is_empty())
        })
    }

    /// The checks every request passes before it is routed; `Err` is the refusal to send.
    pub fn check(&mut self) -> Result<(), Reply> {
        let options = &self.shared.options;
        let host = self.header("host").unwrap_or_default();
        if !host_allowed(&host, self.shared.addr, &options.allow_hosts) {
            return Err(Reply::error(
                421,
                &format!(
                    "Host {host:?} is not one this dashboard answers to (DNS rebinding protection); \
                     start it with --allow-host NAME for another name"
                ),
            ));
        }
        if let Some(header) = &options.proxy_user_header {
            match self.header(header).filter(|u| !u.trim().is_empty()) {
                Some(user) => self.who = crate::commands::format::one_line(user.trim(), 100),
                None => {
                    return Err(Reply::error(
                        401,
                        &format!("no {header} header: requests must come through the proxy"),
                    ));
                }
            }
        }
        if let Some(token) = &options.token {
            self.check_token(token)?;
        }
        if self.is_post() {
            self.check_post()?;
        }
        Ok(())
    }

    fn check_token(&self, token: &str) -> Result<(), Reply> {
        let bearer = self
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned));
        let cookie = self.header("cookie").and_then(|cookies| {
            cookies.split(';').find_map(|c| {
                c.trim()
                    .strip_prefix(TOKEN_COOKIE)
                    .and_then(|rest| rest.strip_prefix('='))
                    .map(str::to_owned)
            })
        });
        if [bearer, cookie]
            .iter()
            .flatten()
            .any(|given| same_secret(given, token))
        {
            return Ok(());
        }
        if !self.is_post()
            && let Some(given) = self.param("token")
            && same_secret(&given, token)
        {
            // Once, from a link: the cookie takes over, and the token leaves the address bar.
            let rest: Vec<&str> = self
                .query
                .split('&')
                .filter(|p| !p.starts_with("token=") && !p.is_empty())
                .collect();
            // Built from the request line as it came (percent-encoded), never from decoded text.
            let location = if rest.is_empty() {
                self.raw_path.clone()
            } else {
                format!("{}?{}", self.raw_path, rest.join("&"))
            };
            return Err(Reply::bytes("text/plain", b"signed in\n".to_vec())
                .with_header(
                    "Set-Cookie",
                    format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"),
                )
                .with_header("Location", location)
                .with_status(303));
        }
        Err(Reply::error(
            401,
            "this dashboard needs its token: open it once as /?token=TOKEN, or send Authorization: Bearer TOKEN",
        ))
    }

    /// A POST changes the queue: refused when read-only, and unless it comes from the dashboard's
    /// own page (or from a client that sent the token itself, which a browser never does for
    /// another site).
    fn check_post(&self) -> Result<(), Reply> {
        if self.shared.options.read_only {
            return Err(Reply::error(
                403,
                "read-only: this dashboard was started with --read-only and changes nothing",
            ));
        }
        let host = self.header("host").unwrap_or_default();
        let same_origin = match (self.header("sec-fetch-site"), self.header("origin")) {
            (Some(site), _) => site == "same-origin",
            (None, Some(origin)) => origin
                .split_once("://")
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(&host)),
            (None, None) => self.header("authorization").is_some(),
        };
        if !same_origin {
            return Err(Reply::error(
                403,
                &format!(
                    "cross-origin request refused: a POST must come from this dashboard's page \
                     (Origin: http://{host}, or Sec-Fetch-Site: same-origin)"
                ),
            ));
        }
        let json = self
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json"));
        if !json {
            return Err(Reply::error(415, "a POST's body must be application/json"));
        }
        Ok(())
    }

    /// The request's JSON body.
    pub fn body(&mut self) -> crate::Result<serde_json::Value> {
        let mut text = String::new();
        if let Some(raw) = self.raw.as_mut() {
            raw.as_reader()
                .take(MAX_BODY)
                .read_to_string(&mut text)
                .map_err(|e| crate::Error::io("reading the request", e))?;
        }
        serde_json::from_str(&text)
            .map_err(|e| crate::Error::Config(format!("the request's body is not JSON: {e}")))
    }

    /// Hands the connection over (an event stream); the reply sent later is ignored.
    pub fn take(&mut self) -> Option<tiny_http::Request> {
        self.raw.take()
    }

    /// Sends `reply` with the security headers.
    pub fn send(mut self, reply: Reply) {
        let Some(raw) = self.raw.take() else {
            return;
        };
        if reply.taken {
            return;
        }
        let mut response = tiny_http::Response::from_data(reply.body)
            .with_status_code(reply.status)
            .with_header(header("Content-Type", reply.content_type));
        for (name, value) in SECURITY_HEADERS {
            response.add_header(header(name, value));
        }
        for (name, value) in &reply.headers {
            response.add_header(header(name, value));
        }
        if let Err(e) = raw.respond(response) {
            log::debug!("dashboard: sending a reply: {e}");
        }
    }
}

impl Reply {
    pub fn with_status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }
}

/// The security headers, as raw lines, for a reply written by hand (the event stream).
pub fn security_header_lines() -> String {
    let mut lines = String::new();
    for (name, value) in SECURITY_HEADERS {
        lines.push_str(name);
        lines.push_str(": ");
        lines.push_str(value);
        lines.push_str("\r\n");
    }
    lines
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    // Every value is ours or checked (the token's characters, an encoded path); a control
    // character would still split the reply, so none gets through.
    let value = if value.bytes().any(|b| b.is_ascii_control()) {
        ""
    } else {
        value
    };
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes())
        .or_else(|()| tiny_http::Header::from_bytes(name.as_bytes(), &b""[..]))
        .unwrap_or_else(|()| unreachable!("header names here are constants"))
}

/// `addr` as a URL's host and port (`[::1]:8075`).
pub fn host_of(addr: SocketAddr) -> String {
    addr.to_string()
}

/// Whether a Host header names this server: an IP address or `localhost` with its port (a
/// DNS-rebinding page reaches us under its own domain name, never an address), or a name the
/// operator allowed.
fn host_allowed(host: &str, addr: SocketAddr, allowed: &[String]) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => (name, Some(port)),
        _ => (host, None),
    };
    if allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(name))
    {
        return true;
    }
    let port_ok = port.is_none_or(|p| p == addr.port().to_string());
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    port_ok && (bare.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok())
}

/// Compares secrets in time that does not depend on where they differ.
fn same_secret(given: &str, wanted: &str) -> bool {
    let (a, b) = (given.as_bytes(), wanted.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `%XX` sequences decoded; invalid ones and invalid UTF-8 are kept as they come, lossily.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_localhost_and_allowed_names_pass_the_host_check() {
        let addr: SocketAddr = "127.0.0.1:8075".parse().unwrap();
        let allowed = vec!["queue.example.com".to_owned()];
        for host in [
            "127.0.0.1:8075",
            "localhost:8075",
            "[::1]:8075",
            "10.1.2.3:8075",
            "queue.example.com",
            "queue.example.com:443",
        ] {
            assert!(host_allowed(host, addr, &allowed), "{host}");
        }
        for host in [
            "evil.example:8075",
            "127.0.0.1:9999",
            "",
            "localhost.evil:8075",
        ] {
            assert!(!host_allowed(host, addr, &allowed), "{host}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
    }

    #[test]
    fn percent_escapes_decode() {
        assert_eq!(percent_decode("a%20b%3Cc"), "a b<c");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
