//! The admin HTTP listener: Prometheus `/metrics`, the JSON API, `/health`
//! and the embedded live dashboard, off the MQTT data path.
//!
//! It runs on threads of its own, never on a shard: one accept thread, and
//! one short-lived thread per request (at most [`MAX_CONNECTIONS`] at once).
//! Figures come from the shards' atomics ([`crate::observe::metrics`]), summed on
//! read; questions about sessions go to every shard over its request channel
//! ([`crate::shard::query`]) and wait at most [`SHARD_TIMEOUT`].
//!
//! HTTP/1.1 is parsed with `httparse` and kept deliberately small: one request
//! per connection (`Connection: close`), no request bodies, a request head of
//! at most [`MAX_REQUEST_HEAD`] bytes that must arrive within [`READ_TIMEOUT`].
//!
//! Routes (all `GET` unless said):
//! - `/` the dashboard page; `/health` readiness (200 or 503);
//! - `/metrics` Prometheus text; `/api/v1/stats` the same figures as JSON;
//! - `/api/v1/clients?limit=&offset=`, `/api/v1/clients/{id}`,
//!   `DELETE /api/v1/clients/{id}` (disconnect);
//! - `/api/v1/subscriptions?topic=&limit=&offset=`;
//! - `/api/v1/cluster`: the NATS link, the other nodes heard, the subjects.
//! - `/api/v1/shared?limit=&offset=`: shared subscription groups and their
//!   members.
//!
//! When a bearer token or basic-auth credentials are configured, every route
//! but `/health` and `/` (the page holds no data) requires them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use log::{debug, warn};
use serde::Serialize;
use serde_json::json;

use crate::cluster::link::ClusterStatus;
use crate::observe::metrics::{self, BrokerGauges};
use crate::protocol::topic;
use crate::shard::query::{Answer, Query, ShardRequest};

/// Largest request head (request line and headers) accepted; larger ones get
/// 431 and the connection closes. Plenty for any URL this API takes.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Headers parsed per request at most.
const MAX_HEADERS: usize = 32;

/// How long a client has to send its request head, and to take the answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests served at once; further connections get 503 at once, so a flood
/// of admin connections cannot pile up threads.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a request waits for each shard's answer.
pub const SHARD_TIMEOUT: Duration = Duration::from_secs(3);

/// Default page size of the list endpoints.
pub const DEFAULT_LIMIT: usize = 100;

/// Largest page size of the list endpoints (bounds the work per request).
pub const MAX_LIMIT: usize = 1000;

/// Pause after a failed accept (e.g. out of file descriptors), so the
/// accept loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The dashboard page: HTML, CSS and JS in one file, embedded in the binary.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Errors of the admin listener.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The listening socket could not be set up.
    #[error("cannot listen for admin HTTP on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What the admin API requires of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiCredentials {
    /// Bearer token, when configured.
    pub token: Option<String>,
    /// Basic-auth user and password, when configured.
    pub basic: Option<(String, String)>,
}

impl ApiCredentials {
    /// True when nothing is configured (the API is open).
    pub fn is_open(&self) -> bool {
        self.token.is_none() && self.basic.is_none()
    }

    /// True when the `Authorization` header value satisfies a configured
    /// scheme (or nothing is configured).
    pub fn allows(&self, header: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(header) = header.map(str::trim) else {
            return false;
        };
        let Some((scheme, value)) = header.split_once(' ') else {
            return false;
        };
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self
                .token
                .as_deref()
                .is_some_and(|t| same(t.as_bytes(), value.as_bytes()));
        }
        if scheme.eq_ignore_ascii_case("basic")
            && let Some((user, password)) = &self.basic
            && let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(value)
        {
            let expected = format!("{user}:{password}");
            return same(expected.as_bytes(), &decoded);
        }
        false
    }

    /// The `WWW-Authenticate` challenge of a 401.
    fn challenge(&self) -> &'static str {
        if self.basic.is_some() {
            "Basic realm=\"fanmq\", charset=\"UTF-8\""
        } else {
            "Bearer realm=\"fanmq\""
        }
    }
}

/// Compares secrets in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What request handlers share.
#[derive(Debug)]
pub struct AdminState {
    /// Every shard's figures.
    pub gauges: Arc<BrokerGauges>,
    /// Every shard's request channel, by shard index.
    pub shards: Vec<async_channel::Sender<ShardRequest>>,
    /// The API's credentials.
    pub auth: ApiCredentials,
    /// The cluster link's status, when the node is in a cluster.
    pub cluster: Option<Arc<ClusterStatus>>,
}

/// A running admin listener.
pub struct AdminServer {
    /// The address bound (port 0 resolved).
    pub addr: SocketAddr,
    /// The accept thread; ends when the shutdown flag is set.
    pub thread: JoinHandle<()>,
}

/// Binds `addr` and serves the admin HTTP API on threads of its own until
/// `shutdown` is set.
///
/// # Errors
/// The socket cannot be bound.
pub fn start(
    addr: SocketAddr,
    state: AdminState,
    shutdown: Arc<AtomicBool>,
) -> Result<AdminServer, AdminError> {
    let bind_err = |source| AdminError::Bind { addr, source };
    let listener = TcpListener::bind(addr).map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    if !bound.ip().is_loopback() && state.auth.is_open() {
        // Config validation refuses this; say so loudly if it ever happens.
        warn!("admin HTTP on {bound} is reachable from the network WITHOUT authentication");
    }
    let state = Arc::new(state);
    let thread = std::thread::Builder::new()
        .name("fanmq-http".into())
        .spawn(move || accept_loop(listener, state, shutdown))
        .map_err(bind_err)?;
    Ok(AdminServer {
        addr: bound,
        thread,
    })
}

/// Wakes an accept loop blocked in `accept` so that it sees the shutdown
/// flag: one connection to its own address (call after setting the flag).
pub fn wake(addr: SocketAddr) {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let _ = TcpStream::connect_timeout(&target, READ_TIMEOUT);
}

/// Accepts admin connections (blocking) until shutdown, which [`wake`]
/// makes it notice; each request runs on a thread of its own.
fn accept_loop(listener: TcpListener, state: Arc<AdminState>, shutdown: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if shutdown.load(Ordering::SeqCst) {
            break;
        }
        let (mut stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!("admin HTTP accept failed: {e}");
                std::thread::sleep(ACCEPT_ERROR_BACKOFF);
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = write_response(&mut stream, &error(503, "too many admin connections"));
            continue;
        }
        let state = state.clone();
        let guard = ActiveGuard(active.clone());
        let spawned = std::thread::Builder::new()
            .name("fanmq-http-req".into())
            .spawn(move || {
                let _guard = guard;
                serve_connection(stream, &state, peer);
            });
        if let Err(e) = spawned {
            warn!("admin HTTP: cannot start a request thread: {e}");
        }
    }
    debug!("admin HTTP listener stopped");
}

/// Gives a request's place back when its thread ends.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content-Type.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
    /// `WWW-Authenticate` challenge (401 only).
    pub challenge: Option<&'static str>,
}

/// A JSON response.
fn json_response(status: u16, value: &impl Serialize) -> Response {
    Response {
        status,
        content_type: "application/json",
        body: serde_json::to_vec(value).unwrap_or_default(),
        challenge: None,
    }
}

/// A JSON error response: `{"error": why}`.
fn error(status: u16, why: &str) -> Response {
    json_response(status, &json!({ "error": why }))
}

/// Reads one request from `stream`, answers it, closes.
fn serve_connection(mut stream: TcpStream, state: &AdminState, peer: SocketAddr) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let response = match read_head(&mut stream) {
        Ok(head) => {
            let response = handle(state, &head);
            debug!(
                "admin HTTP {peer}: {} {} -> {}",
                head.method, head.target, response.status
            );
            response
        }
        Err(response) => response,
    };
    let _ = write_response(&mut stream, &response);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Let the client read the answer before the socket is dropped (a close
    // with unread request bytes would reset the connection).
    let mut sink = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_millis(200);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    while Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Request target: path and query.
    pub target: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// Reads and parses a request head, or the error response to send.
fn read_head(stream: &mut TcpStream) -> Result<Head, Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(error(400, "connection closed before the request ended")),
            Ok(n) => n,
            Err(_) => return Err(error(408, "request head not received in time")),
        };
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf)? {
            Some(head) => return Ok(head),
            None if buf.len() > MAX_REQUEST_HEAD => {
                return Err(error(431, "request head too large"));
            }
            None => {}
        }
    }
}

/// Parses a request head from `buf`: None while incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, Response> {
    if buf.len() > MAX_REQUEST_HEAD {
        return Err(error(431, "request head too large"));
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(error(431, "too many request headers"));
        }
        Err(e) => return Err(error(400, &format!("bad request: {e}"))),
    }
    let authorization = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("authorization"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::to_string);
    Ok(Some(Head {
        method: request.method.unwrap_or("").to_string(),
        target: request.path.unwrap_or("").to_string(),
        authorization,
    }))
}

/// Writes a response with `Connection: close`.
fn write_response(stream: &mut TcpStream, r: &Response) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    if let Some(challenge) = r.challenge {
        head.push_str(&format!("WWW-Authenticate: {challenge}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(&r.body)?;
    stream.flush()
}

/// Routes one request.
pub fn handle(state: &AdminState, head: &Head) -> Response {
    let (path, query) = head
        .target
        .split_once('?')
        .unwrap_or((head.target.as_str(), ""));
    let method = head.method.as_str();
    let public = matches!(path, "/" | "/index.html" | "/health");
    if !public && !state.auth.allows(head.authorization.as_deref()) {
        let mut r = error(401, "authentication required");
        r.challenge = Some(state.auth.challenge());
        return r;
    }
    let get_only = |r: Response| {
        if method == "GET" {
            r
        } else {
            error(405, "only GET is allowed here")
        }
    };
    match path {
        "/" | "/index.html" => get_only(Response {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: DASHBOARD.as_bytes().to_vec(),
            challenge: None,
        }),
        // A NATS link that is down does not make the node unhealthy: it
        // serves its local clients (an orchestrator must not restart every
        // node when NATS fails); the link's state is shown beside.
        "/health" => get_only(match (state.gauges.healthy(), &state.cluster) {
            (true, None) => json_response(200, &json!({ "status": "ok" })),
            (false, None) => json_response(503, &json!({ "status": "unavailable" })),
            (healthy, Some(cluster)) => json_response(
                if healthy { 200 } else { 503 },
                &json!({
                    "status": if healthy { "ok" } else { "unavailable" },
                    "cluster": if cluster.link_up() { "up" } else { "down" },
                }),
            ),
        }),
        "/api/v1/cluster" => get_only(match &state.cluster {
            Some(cluster) => json_response(200, &cluster.to_json()),
            None => json_response(200, &json!({ "link": "none", "nodes": {} })),
        }),
        "/metrics" => get_only(Response {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: metrics::render_prometheus(&state.gauges.stats()).into_bytes(),
            challenge: None,
        }),
        "/api/v1/stats" => get_only(json_response(200, &state.gauges.stats())),
        "/api/v1/clients" => get_only(match parse_page(query, &[]) {
            Ok((page, _)) => list_clients(state, page),
            Err(why) => error(400, &why),
        }),
        "/api/v1/subscriptions" => get_only(match parse_page(query, &["topic"]) {
            Ok((page, topic)) => list_subscriptions(state, page, topic),
            Err(why) => error(400, &why),
        }),
        "/api/v1/shared" => get_only(match parse_page(query, &[]) {
            Ok((page, _)) => list_shared(state, page),
            Err(why) => error(400, &why),
        }),
        _ => match path.strip_prefix("/api/v1/clients/") {
            Some(id) => match decode_client_id(id) {
                Ok(client_id) => match method {
                    "GET" => one_client(state, client_id),
                    "DELETE" => disconnect(state, client_id),
                    _ => error(405, "only GET and DELETE are allowed here"),
                },
                Err(why) => error(400, &why),
            },
            None => error(404, "no such resource"),
        },
    }
}

/// A page of a list: skip `offset`, return at most `limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    /// Items to return at most, 1..=[`MAX_LIMIT`].
    pub limit: usize,
    /// Items to skip.
    pub offset: usize,
}

/// Parses `limit` and `offset` (and the keys in `extra`, whose value is
/// returned: at most one extra key is supported) from a query string.
///
/// # Errors
/// An unknown key, a repeated key, or a value out of range.
pub fn parse_page(query: &str, extra: &[&str]) -> Result<(Page, Option<String>), String> {
    let mut page = Page {
        limit: DEFAULT_LIMIT,
        offset: 0,
    };
    let mut value = None;
    let mut seen = Vec::new();
    for (key, v) in form_urlencoded::parse(query.as_bytes()) {
        if seen.contains(&key) {
            return Err(format!("parameter {key} given twice"));
        }
        seen.push(key.clone());
        match key.as_ref() {
            "limit" => {
                page.limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| format!("limit must be between 1 and {MAX_LIMIT}"))?;
            }
            "offset" => {
                page.offset = v
                    .parse()
                    .map_err(|_| "offset must be a non-negative integer".to_string())?;
            }
            k if extra.contains(&k) => value = Some(v.into_owned()),
            k => return Err(format!("unknown parameter {k}")),
        }
    }
    Ok((page, value))
}

/// Decodes a percent-encoded client id from a path segment.
fn decode_client_id(segment: &str) -> Result<String, String> {
    if segment.is_empty() || segment.contains('/') {
        return Err("expected /api/v1/clients/{client id}".to_string());
    }
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| "client id is not UTF-8".to_string())
}

/// Sends `query` to one shard and waits for its answer (None: no answer in
/// time, or the shard's request queue is full).
fn ask(shard: &async_channel::Sender<ShardRequest>, query: Query) -> Option<Answer> {
    let (reply, answer): (_, Receiver<Answer>) = sync_channel(1);
    shard.try_send(ShardRequest { query, reply }).ok()?;
    answer.recv_timeout(SHARD_TIMEOUT).ok()
}

/// The 503 for a shard that did not answer.
fn shard_timeout() -> Response {
    error(503, "a shard did not answer in time")
}

/// A page over every shard's items, shard by shard (the offset runs over
/// shard 0's items, then shard 1's, ...): `query` asks one shard for up to
/// `limit` items after skipping `skip`, `part` takes its answer apart into
/// (that shard's total, its items). Errs with the 503 when a shard does not
/// answer.
fn gather_page<T>(
    state: &AdminState,
    page: Page,
    query: impl Fn(usize, usize) -> Query,
    part: impl Fn(Answer) -> Option<(usize, Vec<T>)>,
) -> Result<(usize, Vec<T>), Response> {
    let mut skip = page.offset;
    let mut total = 0;
    let mut items: Vec<T> = Vec::new();
    for shard in &state.shards {
        let Some((t, page_part)) =
            ask(shard, query(skip, page.limit - items.len())).and_then(&part)
        else {
            return Err(shard_timeout());
        };
        total += t;
        skip = skip.saturating_sub(t);
        items.extend(page_part);
    }
    Ok((total, items))
}

/// `GET /api/v1/clients`: sessions of every shard, shard by shard.
fn list_clients(state: &AdminState, page: Page) -> Response {
    let gathered = gather_page(
        state,
        page,
        |skip, limit| Query::Clients { skip, limit },
        |answer| match answer {
            Answer::Clients { total, clients } => Some((total, clients)),
            _ => None,
        },
    );
    match gathered {
        Ok((total, clients)) => json_response(
            200,
            &json!({ "total": total, "offset": page.offset, "limit": page.limit, "clients": clients }),
        ),
        Err(response) => response,
    }
}

/// `GET /api/v1/subscriptions`: every shard's subscriptions, optionally only
/// those whose filter matches a topic name (who would receive a publish).
fn list_subscriptions(state: &AdminState, page: Page, topic: Option<String>) -> Response {
    if let Some(t) = &topic
        && topic::validate_topic_name(t).is_err()
    {
        return error(400, "topic must be a valid topic name (no wildcards)");
    }
    let gathered = gather_page(
        state,
        page,
        |skip, limit| Query::Subscriptions {
            topic: topic.clone(),
            skip,
            limit,
        },
        |answer| match answer {
            Answer::Subscriptions {
                total,
                subscriptions,
            } => Some((total, subscriptions)),
            _ => None,
        },
    );
    match gathered {
        Ok((total, subscriptions)) => json_response(
            200,
            &json!({ "total": total, "offset": page.offset, "limit": page.limit, "topic": topic, "subscriptions": subscriptions }),
        ),
        Err(response) => response,
    }
}

/// `GET /api/v1/shared`: the members of every shared subscription group,
/// shard by shard (paged over members), grouped by group; and, per shard,
/// the size of its replica of the groups (equal on every shard once the
/// mesh has carried every membership change).
fn list_shared(state: &AdminState, page: Page) -> Response {
    let replicas = std::cell::RefCell::new(Vec::new());
    let gathered = gather_page(
        state,
        page,
        |skip, limit| Query::Shared { skip, limit },
        |answer| match answer {
            Answer::Shared {
                total,
                members,
                replica_groups,
                replica_members,
                replica_connected,
            } => {
                let mut replicas = replicas.borrow_mut();
                let shard = replicas.len();
                replicas.push(json!({
                    "shard": shard,
                    "groups": replica_groups,
                    "members": replica_members,
                    "connected": replica_connected,
                }));
                Some((total, members))
            }
            _ => None,
        },
    );
    let (total, members) = match gathered {
        Ok(gathered) => gathered,
        Err(response) => return response,
    };
    let mut groups: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
    for m in members {
        groups.entry(m.group.clone()).or_default().push(json!({
            "client_id": m.client_id,
            "qos": m.qos,
            "shard": m.shard,
            "connected": m.connected,
        }));
    }
    let groups: Vec<serde_json::Value> = groups
        .into_iter()
        .map(|(group, members)| json!({ "group": group, "members": members }))
        .collect();
    json_response(
        200,
        &json!({
            "total": total,
            "offset": page.offset,
            "limit": page.limit,
            "groups": groups,
            "replicas": replicas.into_inner(),
        }),
    )
}

/// `GET /api/v1/clients/{id}`.
fn one_client(state: &AdminState, client_id: String) -> Response {
    for shard in &state.shards {
        let query = Query::Client {
            client_id: client_id.clone(),
        };
        match ask(shard, query) {
            Some(Answer::Client(Some(c))) => return json_response(200, &c),
            Some(_) => {}
            None => return shard_timeout(),
        }
    }
    error(404, "no such client")
}

/// `DELETE /api/v1/clients/{id}`: closes the client's connection (its will,
/// if any, is published: the client did not send DISCONNECT).
fn disconnect(state: &AdminState, client_id: String) -> Response {
    let mut closed = false;
    for shard in &state.shards {
        let query = Query::Disconnect {
            client_id: client_id.clone(),
        };
        match ask(shard, query) {
            Some(answer) => closed |= answer == Answer::Disconnected(true),
            None => return shard_timeout(),
        }
    }
    if closed {
        json_response(200, &json!({ "disconnected": client_id }))
    } else {
        error(404, "no such connected client")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(auth: ApiCredentials) -> AdminState {
        AdminState {
            gauges: Arc::new(BrokerGauges::new(1)),
            shards: Vec::new(),
            auth,
            cluster: None,
        }
    }

    fn get(state: &AdminState, target: &str, authorization: Option<&str>) -> Response {
        handle(
            state,
            &Head {
                method: "GET".into(),
                target: target.into(),
                authorization: authorization.map(str::to_string),
            },
        )
    }

    #[test]
    fn query_strings() {
        assert_eq!(
            parse_page("", &[]).unwrap().0,
            Page {
                limit: DEFAULT_LIMIT,
                offset: 0
            }
        );
        let (page, topic) = parse_page("limit=5&offset=10&topic=a%2Fb", &["topic"]).unwrap();
        assert_eq!((page.limit, page.offset), (5, 10));
        assert_eq!(topic.as_deref(), Some("a/b"));
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "offset=-1",
            "foo=1",
            "limit=1&limit=2",
        ] {
            assert!(parse_page(bad, &[]).is_err(), "{bad} accepted");
        }
        assert_eq!(decode_client_id("a%20b").unwrap(), "a b");
        assert!(decode_client_id("%FF").is_err());
    }

    #[test]
    fn auth_bearer_and_basic() {
        let open = ApiCredentials::default();
        assert!(open.allows(None));
        let auth = ApiCredentials {
            token: Some("t0k".into()),
            basic: Some(("u".into(), "p:w".into())),
        };
        assert!(!auth.allows(None));
        assert!(auth.allows(Some("Bearer t0k")));
        assert!(auth.allows(Some("bearer  t0k ")));
        assert!(!auth.allows(Some("Bearer t0")));
        let basic = base64::engine::general_purpose::STANDARD.encode("u:p:w");
        assert!(auth.allows(Some(&format!("Basic {basic}"))));
        assert!(!auth.allows(Some("Basic !!!")));
        assert!(!auth.allows(Some("t0k")));
    }

    #[test]
    fn routes_and_errors() {
        let s = state(ApiCredentials {
            token: Some("t".into()),
            basic: None,
        });
        assert_eq!(get(&s, "/metrics", None).status, 401);
        assert_eq!(
            get(&s, "/metrics", None).challenge,
            Some("Bearer realm=\"fanmq\"")
        );
        assert_eq!(get(&s, "/metrics", Some("Bearer t")).status, 200);
        assert_eq!(get(&s, "/", None).status, 200);
        assert_eq!(get(&s, "/health", None).status, 503);
        assert_eq!(get(&s, "/nope", Some("Bearer t")).status, 404);
        assert_eq!(
            get(&s, "/api/v1/clients?limit=0", Some("Bearer t")).status,
            400
        );
        assert_eq!(
            get(&s, "/api/v1/subscriptions?topic=a/%23", Some("Bearer t")).status,
            400
        );
        let post = handle(
            &s,
            &Head {
                method: "POST".into(),
                target: "/api/v1/stats".into(),
                authorization: Some("Bearer t".into()),
            },
        );
        assert_eq!(post.status, 405);
    }

    #[test]
    fn request_heads() {
        let head = parse_head(b"GET /x?y=1 HTTP/1.1\r\nAuthorization: Bearer z\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.target, "/x?y=1");
        assert_eq!(head.authorization.as_deref(), Some("Bearer z"));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n").unwrap(), None);
        assert_eq!(
            parse_head(b"\x01\x02 nonsense\r\n\r\n").unwrap_err().status,
            400
        );
        let huge = vec![b'a'; MAX_REQUEST_HEAD + 1];
        assert_eq!(parse_head(&huge).unwrap_err().status, 431);
    }
}
