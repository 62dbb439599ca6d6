//! Client transports: plain TCP, MQTT over TLS, MQTT over WebSocket, and
//! MQTT over WebSocket over TLS (WSS).
//!
//! Every accepted socket becomes a [`Stream`], which reads and writes MQTT
//! bytes whatever carries them. Plain TCP stays a bare `TcpStream`: the
//! shard writes its clients' queues straight to the socket with one
//! `sendmsg` (`session::outqueue`), and [`Stream::raw_fd`] gives it that
//! socket. The other transports *frame* what is written (TLS records,
//! WebSocket frames), so the shard must not write to their socket: it hands
//! their queues to the connection task, which writes through the stream
//! (see `session::link::framed_fd`).
//!
//! The transport handshake (TLS, the WebSocket upgrade) runs in the
//! connection's own task, bounded by the connect timeout, so a slow or
//! hostile client never holds up the others on its core.
//!
//! TLS uses rustls with the `ring` provider, TLS 1.2 and 1.3. The server
//! configuration lives behind an [`ArcSwap`]: [`TlsCerts::reload`] (on
//! SIGHUP) re-reads the certificate, key and CA files and swaps it in for
//! new connections; connections already up keep theirs. When a client
//! certificate is verified, its subject's Common Name is the connection's
//! identity ([`Stream::tls_identity`]), usable as the MQTT username
//! (`use_identity_as_username`).
//!
//! WebSocket follows MQTT 3.1.1 §6: binary frames only (a text frame closes
//! the connection), subprotocol `mqtt` (or `mqttv3.1`, MQTT 3.1's name),
//! and the byte stream ignores frame boundaries: a packet may span frames
//! and a frame may carry several packets. Frames are bounded by
//! `max_packet_size`. The upgrade request is parsed with httparse and
//! answered with tungstenite's handshake functions.
//!
//! Once its handshake is done, a TLS or WebSocket connection's transport
//! is plain state, [`Framing`] (`crate::net::framing`), beside glommio's
//! `TcpStream` until CONNECT is answered; the connection layer then takes
//! the socket and the state apart ([`Stream::into_framed`]) so that the
//! connection can park like a plain one.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwap;
use async_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request, Response, create_response, write_response,
};
use async_tungstenite::tungstenite::http::{HeaderValue, StatusCode, Version, header};
use bytes::BytesMut;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{UnbufferedServerConnection, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};

use crate::config::Config;
use crate::net::framing::{Framing, FramingError, Received};

/// WebSocket subprotocols accepted, in order of preference: MQTT 3.1.1's
/// `mqtt` (§6.0) and MQTT 3.1's `mqttv3.1`.
pub const WS_SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Largest WebSocket upgrade request accepted (its headers), read in
/// pieces of [`WS_REQUEST_CHUNK`]: browsers send well under 2 KiB.
pub const WS_MAX_REQUEST: usize = 8 * 1024;

/// How much is read at a time while waiting for the whole upgrade request.
const WS_REQUEST_CHUNK: usize = 1024;

/// Headers parsed in an upgrade request (httparse needs a fixed array).
const WS_MAX_HEADERS: usize = 64;

/// Bytes read from the socket at a time while the handshake's CONNECT is
/// read through a [`Stream`] (on the stack).
const FRAMED_READ_CHUNK: usize = 4096;

/// Errors setting up or accepting a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A certificate, key or CA file could not be read or parsed.
    #[error("cannot load {path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("cannot load {path}: no certificate in the file")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificates or settings.
    #[error("invalid TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built (e.g. no CA).
    #[error("invalid client-certificate CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS handshake failed on the socket (closed, reset).
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
    /// The TLS handshake was refused (rustls refused the client's records).
    #[error("TLS handshake refused: {0}")]
    TlsRefused(FramingError),
    /// The WebSocket upgrade failed (not a WebSocket request, no MQTT
    /// subprotocol).
    #[error("WebSocket handshake failed: {0}")]
    WsHandshake(async_tungstenite::tungstenite::Error),
    /// The WebSocket upgrade request is not HTTP, or too large.
    #[error("WebSocket upgrade request: {0}")]
    WsRequest(&'static str),
    /// The WebSocket upgrade request could not be parsed.
    #[error("WebSocket upgrade request: {0}")]
    WsHttp(#[from] httparse::Error),
    /// Reading the upgrade request or writing its answer failed.
    #[error("WebSocket upgrade: {0}")]
    WsIo(io::Error),
    /// The bytes after the upgrade are not WebSocket frames.
    #[error("after the WebSocket upgrade: {0}")]
    Framing(#[from] FramingError),
    /// A TLS listener was started without certificates (a bug: the
    /// configuration check requires them).
    #[error("no TLS certificates configured")]
    NoCertificates,
}

/// What a listener speaks; also the `listener` label of the connection
/// metrics ([`Transport::name`]). Adding a transport is one variant here
/// plus its entry in [`Transport::ALL`] and [`Transport::name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Transport {
    /// MQTT over TCP.
    Mqtt = 0,
    /// MQTT over TLS.
    Tls = 1,
    /// MQTT over WebSocket.
    Ws = 2,
    /// MQTT over WebSocket over TLS.
    Wss = 3,
}

impl Transport {
    /// Every transport, in the order of the per-listener arrays.
    pub const ALL: [Transport; 4] = [
        Transport::Mqtt,
        Transport::Tls,
        Transport::Ws,
        Transport::Wss,
    ];

    /// The name used in the config keys (`tls_listen`, ...), log lines and
    /// the metrics' `listener` label.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    /// Index into per-listener arrays (counters by listener), in the
    /// order of [`Transport::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// True when the transport runs over TLS.
    pub fn uses_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }
}

/// A client connection, whatever carries it. Exactly as large as a
/// `TcpStream` (a unit test checks it): the framed transports are one boxed
/// variant, which fits beside the `TcpStream`'s non-null pointer (its
/// niche), so plain TCP connections pay no memory for them.
pub enum Stream {
    /// Plain TCP: the shard writes to its socket directly.
    Tcp(TcpStream),
    /// TLS or WebSocket, between its handshake and CONNACK.
    Framed(Box<FramedStream>),
}

/// A TLS or WebSocket connection read and written through glommio's
/// stream (the transport's and MQTT's handshakes).
pub struct FramedStream {
    /// The TCP connection.
    tcp: TcpStream,
    /// The TLS / WebSocket state.
    framing: Framing,
    /// MQTT bytes unframed and not read yet.
    decoded: BytesMut,
    /// The peer closed the stream (TLS close_notify, WebSocket close).
    closed: bool,
}

impl Stream {
    /// The TCP socket underneath, whatever the transport (for lookups such
    /// as the peer address; only plain TCP may be written to directly).
    pub fn socket_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(tcp) => tcp.as_raw_fd(),
            Stream::Framed(framed) => framed.tcp.as_raw_fd(),
        }
    }

    /// The Common Name of the client certificate verified during the TLS
    /// handshake (TLS and WSS with a `cafile`), for `use_identity_as_username`.
    pub fn tls_identity(&self) -> Option<&str> {
        match self {
            Stream::Tcp(_) => None,
            Stream::Framed(framed) => framed.framing.identity.as_deref(),
        }
    }

    /// A framed stream taken apart: glommio's TCP stream, the framing state
    /// (with what it has to send) and the MQTT bytes unframed but not read
    /// yet.
    ///
    /// # Errors
    /// The TCP stream when the connection is plain TCP.
    pub fn into_framed(self) -> Result<(TcpStream, Box<Framing>, BytesMut), TcpStream> {
        match self {
            Stream::Tcp(tcp) => Err(tcp),
            Stream::Framed(framed) => {
                let FramedStream {
                    tcp,
                    framing,
                    decoded,
                    ..
                } = *framed;
                Ok((tcp, Box::new(framing), decoded))
            }
        }
    }
}

/// Turns accepted sockets into [`Stream`]s for one listener.
#[derive(Clone)]
pub struct Acceptor {
    /// What the listener speaks.
    pub transport: Transport,
    /// The TLS configuration (TLS and WSS listeners).
    tls: Option<Arc<TlsCerts>>,
    /// Largest WebSocket frame and message accepted: `max_packet_size`.
    max_message_size: usize,
    /// Connections start with a PROXY protocol header, read before the
    /// transport's handshake ([`crate::net::proxy`]).
    pub proxy_protocol: bool,
}

impl Acceptor {
    /// An acceptor for `transport`; `tls` must be given for TLS and WSS.
    pub fn new(transport: Transport, tls: Option<Arc<TlsCerts>>, max_packet_size: usize) -> Self {
        Acceptor {
            transport,
            tls,
            max_message_size: max_packet_size,
            proxy_protocol: false,
        }
    }

    /// The same acceptor for a listener whose connections start with a
    /// PROXY protocol header (`expects`) or not.
    pub fn with_proxy_protocol(mut self, expects: bool) -> Self {
        self.proxy_protocol = expects;
        self
    }

    /// Runs the transport's handshake on an accepted socket. The caller
    /// bounds it with the connect timeout.
    ///
    /// # Errors
    /// A failed TLS handshake or WebSocket upgrade.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Stream, TransportError> {
        let ws = matches!(self.transport, Transport::Ws | Transport::Wss);
        let mut framed = match self.transport {
            Transport::Mqtt => return Ok(Stream::Tcp(tcp)),
            Transport::Ws => {
                let mut tcp = tcp;
                let early = upgrade(&mut tcp).await?;
                let mut framing = Framing::ws(self.max_message_size);
                let mut decoded = BytesMut::new();
                // The client's first frames, sent before it saw the answer.
                let closed = framing.receive_plaintext(&early, &mut decoded)? == Received::Closed;
                return Ok(Stream::Framed(Box::new(FramedStream {
                    tcp,
                    framing,
                    decoded,
                    closed,
                })));
            }
            Transport::Tls | Transport::Wss => self.accept_tls(tcp).await?,
        };
        framed.framing.identity = framed.framing.peer_certificate().and_then(common_name);
        if ws {
            let mut early = upgrade(&mut *framed).await?;
            // What the client sent after its request: the bytes `upgrade`
            // read past it, then those decrypted and not read yet.
            early.extend_from_slice(&std::mem::take(&mut framed.decoded));
            framed.framing.start_ws(self.max_message_size);
            let closed = framed
                .framing
                .receive_plaintext(&early, &mut framed.decoded)?
                == Received::Closed;
            framed.closed |= closed;
        }
        Ok(Stream::Framed(framed))
    }

    /// The TLS handshake, with the configuration current at this moment:
    /// rustls's records are read from and sent to `tcp` until it is done.
    /// The returned stream holds the MQTT bytes (or, for WSS, the upgrade
    /// request) the client sent with its last handshake flight.
    async fn accept_tls(&self, tcp: TcpStream) -> Result<Box<FramedStream>, TransportError> {
        let certs = self.tls.as_ref().ok_or(TransportError::NoCertificates)?;
        let conn = UnbufferedServerConnection::new(certs.current())?;
        let mut framed = Box::new(FramedStream {
            tcp,
            framing: Framing::tls(conn),
            decoded: BytesMut::new(),
            closed: false,
        });
        loop {
            futures_lite::future::poll_fn(|cx| framed.poll_send(cx))
                .await
                .map_err(TransportError::TlsHandshake)?;
            if !framed.framing.is_handshaking() {
                return Ok(framed);
            }
            if framed.closed {
                return Err(TransportError::TlsHandshake(
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            let mut wire = [0u8; FRAMED_READ_CHUNK];
            let n = framed
                .tcp
                .read(&mut wire)
                .await
                .map_err(TransportError::TlsHandshake)?;
            if n == 0 {
                return Err(TransportError::TlsHandshake(
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            match framed.framing.receive(&wire[..n], &mut framed.decoded) {
                Ok(received) => framed.closed = received == Received::Closed,
                Err(e) => {
                    // The alert rustls queued, then the connection closes.
                    let _ = futures_lite::future::poll_fn(|cx| framed.poll_send(cx)).await;
                    return Err(TransportError::TlsRefused(e));
                }
            }
        }
    }
}

/// The WebSocket upgrade (RFC 6455 §4.2) on `stream`: reads the request,
/// checks it (tungstenite's `create_response`) and its MQTT subprotocol,
/// answers 101 or an error. Returns the bytes the client sent after the
/// request (its first frames, if it did not wait for the answer).
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<Vec<u8>, TransportError> {
    let mut request = Vec::new();
    let end = loop {
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if request.len() >= WS_MAX_REQUEST {
            return Err(TransportError::WsRequest("over 8 KiB"));
        }
        let len = request.len();
        request.resize(len + WS_REQUEST_CHUNK, 0);
        let n = stream
            .read(&mut request[len..])
            .await
            .map_err(TransportError::WsIo)?;
        request.truncate(len + n);
        if n == 0 {
            return Err(TransportError::WsRequest("closed before its end"));
        }
    };
    let parsed = parse_request(&request[..end])?;
    let answer = create_response(&parsed)
        .map_err(TransportError::WsHandshake)
        .and_then(|response| {
            choose_subprotocol(&parsed, response)
                .map_err(|_| TransportError::WsRequest("no MQTT subprotocol offered"))
        });
    let mut bytes = Vec::new();
    let result = match answer {
        Ok(response) => write_response(&mut bytes, &response)
            .map_err(TransportError::WsHandshake)
            .map(|()| request.split_off(end)),
        Err(e) => {
            let refusal = Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .header(header::CONNECTION, "close")
                .body(())
                .map_err(|e| TransportError::WsHandshake(e.into()))?;
            write_response(&mut bytes, &refusal).map_err(TransportError::WsHandshake)?;
            Err(e)
        }
    };
    stream
        .write_all(&bytes)
        .await
        .map_err(TransportError::WsIo)?;
    stream.flush().await.map_err(TransportError::WsIo)?;
    result
}

/// An HTTP request head (with its final empty line) as tungstenite's
/// [`Request`].
fn parse_request(head: &[u8]) -> Result<Request, TransportError> {
    let mut headers = [httparse::EMPTY_HEADER; WS_MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    if parsed.parse(head)?.is_partial() {
        return Err(TransportError::WsRequest("incomplete"));
    }
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => return Err(TransportError::WsRequest("not HTTP/1.1")),
    };
    let mut builder = Request::builder()
        .method(parsed.method.unwrap_or_default())
        .uri(parsed.path.unwrap_or_default())
        .version(version);
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    builder
        .body(())
        .map_err(|_| TransportError::WsRequest("invalid method, path or header"))
}

/// The WebSocket upgrade's check: answers with the first MQTT subprotocol
/// the client offers, or refuses the upgrade (400) when it offers none.
#[allow(clippy::result_large_err)] // tungstenite's callback signature
fn choose_subprotocol(
    request: &Request,
    mut response: Response,
) -> Result<Response, ErrorResponse> {
    let offered: Vec<&str> = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    match WS_SUBPROTOCOLS.iter().find(|p| offered.contains(p)) {
        Some(protocol) => {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
            Ok(response)
        }
        None => {
            let mut refusal = ErrorResponse::new(Some(
                "MQTT over WebSocket needs the subprotocol mqtt".to_string(),
            ));
            *refusal.status_mut() = StatusCode::BAD_REQUEST;
            Err(refusal)
        }
    }
}

/// The subject Common Name of a DER certificate.
fn common_name(cert: &CertificateDer<'_>) -> Option<Box<str>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(Box::from)
}

/// The TLS server configuration, swapped whole on reload.
pub struct TlsCerts {
    /// The configuration new connections use.
    current: ArcSwap<ServerConfig>,
    /// The files and settings it is built from.
    settings: TlsSettings,
}

/// What a TLS configuration is built from (see [`Config`]).
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// The certificate chain (PEM).
    pub certfile: PathBuf,
    /// The private key (PEM).
    pub keyfile: PathBuf,
    /// CA certificates (PEM) to verify client certificates against.
    pub cafile: Option<PathBuf>,
    /// Refuse clients without a valid certificate.
    pub require_certificate: bool,
}

impl TlsSettings {
    /// The TLS settings of `config`; `None` when no certificate is set.
    pub fn from_config(config: &Config) -> Option<TlsSettings> {
        Some(TlsSettings {
            certfile: config.certfile.clone()?,
            keyfile: config.keyfile.clone()?,
            cafile: config.cafile.clone(),
            require_certificate: config.require_certificate,
        })
    }
}

impl TlsCerts {
    /// Loads the certificates.
    ///
    /// # Errors
    /// Unreadable or invalid files.
    pub fn load(settings: TlsSettings) -> Result<TlsCerts, TransportError> {
        let config = build_server_config(&settings)?;
        Ok(TlsCerts {
            current: ArcSwap::from_pointee(config),
            settings,
        })
    }

    /// The configuration for a new connection (lock-free).
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the files and swaps the new configuration in for new
    /// connections. On error the old configuration stays.
    ///
    /// # Errors
    /// Unreadable or invalid files.
    pub fn reload(&self) -> Result<(), TransportError> {
        let config = build_server_config(&self.settings)?;
        self.current.store(Arc::new(config));
        Ok(())
    }

    /// The certificate file, for log lines.
    pub fn certfile(&self) -> &Path {
        &self.settings.certfile
    }
}

/// A rustls server configuration (ring provider, TLS 1.2 and 1.3) from the
/// PEM files, with client-certificate verification when a CA is given.
fn build_server_config(settings: &TlsSettings) -> Result<ServerConfig, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certificates(&settings.certfile)?;
    let key = PrivateKeyDer::from_pem_file(&settings.keyfile)
        .map_err(|e| pem_error(&settings.keyfile, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &settings.cafile {
        Some(cafile) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(cafile)? {
                roots.add(cert)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if settings.require_certificate {
                verifier.build()?
            } else {
                verifier.allow_unauthenticated().build()?
            };
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(builder.with_single_cert(certs, key)?)
}

/// Every certificate in a PEM file (at least one).
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TransportError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// A PEM error for `path`.
fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TransportError {
    TransportError::Pem {
        path: path.to_path_buf(),
        source: e,
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Framed(framed) => Pin::new(&mut **framed).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Framed(framed) => Pin::new(&mut **framed).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Framed(framed) => Pin::new(&mut **framed).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_close(cx),
            Stream::Framed(framed) => Pin::new(&mut **framed).poll_close(cx),
        }
    }
}

impl AsyncRead for FramedStream {
    /// Reads MQTT bytes: those already unframed, else the socket's next.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        while this.decoded.is_empty() && !this.closed {
            // Answers (pongs, TLS records) go out before the next read.
            ready!(this.poll_send(cx))?;
            let mut wire = [0u8; FRAMED_READ_CHUNK];
            let n = ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut wire))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            let received = this
                .framing
                .receive(&wire[..n], &mut this.decoded)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            this.closed = received == Received::Closed;
        }
        let n = buf.len().min(this.decoded.len());
        buf[..n].copy_from_slice(&this.decoded.split_to(n));
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for FramedStream {
    /// Frames `buf` into the framing's queue: sent by the flush (or after
    /// CONNACK, by the connection task).
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().framing.send(buf).map_err(io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.framing.close();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_close(cx)
    }
}

impl FramedStream {
    /// Sends what the framing has queued.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.framing.tx.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.framing.tx))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.framing.sent(n);
        }
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_tcp_streams_are_not_larger_than_a_tcp_stream() {
        // Per-connection memory: the enum must not cost plain TCP anything.
        assert_eq!(
            std::mem::size_of::<Stream>(),
            std::mem::size_of::<TcpStream>()
        );
    }

    #[test]
    fn the_mqtt_subprotocol_is_chosen() {
        let request = |protocols: &str| {
            Request::builder()
                .header(header::SEC_WEBSOCKET_PROTOCOL, protocols)
                .body(())
                .unwrap()
        };
        let chosen = |protocols: &str| {
            choose_subprotocol(&request(protocols), Response::default())
                .ok()
                .and_then(|r| r.headers().get(header::SEC_WEBSOCKET_PROTOCOL).cloned())
        };
        assert_eq!(chosen("mqtt").unwrap(), "mqtt");
        assert_eq!(chosen("chat, mqttv3.1").unwrap(), "mqttv3.1");
        assert_eq!(chosen("mqttv3.1, mqtt").unwrap(), "mqtt");
        assert!(chosen("chat").is_none());
        let refused = choose_subprotocol(&Request::default(), Response::default()).unwrap_err();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn missing_certificate_files_are_reported() {
        let settings = TlsSettings {
            certfile: "/nonexistent/cert.pem".into(),
            keyfile: "/nonexistent/key.pem".into(),
            cafile: None,
            require_certificate: false,
        };
        assert!(matches!(
            TlsCerts::load(settings),
            Err(TransportError::Pem { .. })
        ));
    }
}
