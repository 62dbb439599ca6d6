//! Reads how many subscriptions the broker holds from fanmq's admin API
//! (`GET /api/v1/stats`, field `total.subscriptions`: the router's count,
//! refreshed by every shard each `refresh_ms`), for `--wait-subscribers`.
//!
//! A plain HTTP/1.1 GET over one short-lived TCP connection: the bench has no
//! HTTP client dependency, and the API answers small JSON with a
//! `Content-Length` and `Connection: close`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long one request may take (connect, send, read): a broker busy
/// accepting a million connections still answers its admin port in this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest answer read: `/api/v1/stats` is a few KiB per shard.
const MAX_RESPONSE: u64 = 4 << 20;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum StatsApiError {
    #[error("stats URL {0:?}: expected http://HOST:PORT/PATH")]
    Url(String),
    #[error("stats {url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("stats {url}: HTTP status line {status:?}")]
    Status { url: String, status: String },
    #[error("stats {url}: {source}")]
    Json {
        url: String,
        source: serde_json::Error,
    },
    #[error("stats {0}: no total.subscriptions in the answer (not fanmq?)")]
    Field(String),
    #[error("the broker held {held} of {wanted} subscriptions after {seconds} s")]
    Short {
        held: u64,
        wanted: u64,
        seconds: f64,
    },
}

/// The default stats URL for a broker at `host`: the admin listener's
/// default port.
pub fn default_url(host: &str) -> String {
    format!("http://{host}:18083/api/v1/stats")
}

/// `GET url` (with a bearer token if given); returns `total.subscriptions`.
///
/// # Errors
/// A bad URL, a failed request, a status other than 200, or an answer
/// without the field.
pub fn subscriptions(url: &str, token: Option<&str>) -> Result<u64, StatsApiError> {
    let (authority, path) = url
        .strip_prefix("http://")
        .map(|rest| {
            rest.split_once('/')
                .map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")))
        })
        .ok_or_else(|| StatsApiError::Url(url.to_owned()))?;
    let io = |source| StatsApiError::Io {
        url: url.to_owned(),
        source,
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|_| StatsApiError::Url(url.to_owned()))?
        .next()
        .ok_or_else(|| StatsApiError::Url(url.to_owned()))?;
    let mut s = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(io)?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(io)?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}Accept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).map_err(io)?;
    let mut response = Vec::new();
    s.take(MAX_RESPONSE)
        .read_to_end(&mut response)
        .map_err(io)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(StatsApiError::Status {
            url: url.to_owned(),
            status: status.to_owned(),
        });
    }
    parse_subscriptions(body).map_err(|e| match e {
        ParseError::Json(source) => StatsApiError::Json {
            url: url.to_owned(),
            source,
        },
        ParseError::Field => StatsApiError::Field(url.to_owned()),
    })
}

/// Why an answer's body did not give the count.
enum ParseError {
    Json(serde_json::Error),
    Field,
}

/// `total.subscriptions` of a stats body.
fn parse_subscriptions(body: &str) -> Result<u64, ParseError> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(ParseError::Json)?;
    v.pointer("/total/subscriptions")
        .and_then(serde_json::Value::as_u64)
        .ok_or(ParseError::Field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn reads_the_count_from_a_stats_answer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/api/v1/stats", l.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = [0u8; 1024];
            let n = c.read(&mut req).unwrap();
            let body = r#"{"total":{"subscriptions":18000,"sessions":18001}}"#;
            write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            String::from_utf8_lossy(&req[..n]).to_string()
        });
        assert_eq!(subscriptions(&url, Some("t0k")).unwrap(), 18_000);
        let req = server.join().unwrap();
        assert!(req.starts_with("GET /api/v1/stats HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Authorization: Bearer t0k\r\n"), "{req}");
    }

    #[test]
    fn refuses_what_is_not_a_stats_answer() {
        assert!(matches!(
            parse_subscriptions(r#"{"total":{}}"#),
            Err(ParseError::Field)
        ));
        assert!(matches!(
            parse_subscriptions("<html>"),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            subscriptions("https://x/", None),
            Err(StatsApiError::Url(_))
        ));
    }
}
