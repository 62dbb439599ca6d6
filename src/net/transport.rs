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
//! and a frame may carry several packets. Frames and messages are bounded
//! by `max_packet_size`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwap;
use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{Bytes, Message};
use futures_lite::{AsyncRead, AsyncWrite};
use futures_sink::Sink;
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::Config;

/// WebSocket subprotocols accepted, in order of preference: MQTT 3.1.1's
/// `mqtt` (§6.0) and MQTT 3.1's `mqttv3.1`.
pub const WS_SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Read buffer of each WebSocket connection. tungstenite's default (128 KiB,
/// allocated per connection) made an idle WebSocket client cost 134 kB;
/// 4 KiB (tungstenite's own advice for many connections) brings it near a
/// TLS client's. Larger messages still arrive, in several reads.
pub const WS_READ_BUFFER_SIZE: usize = 4 * 1024;

/// Bytes tungstenite gathers before writing to the socket: none, since
/// the connection task already hands it the queue in pieces of up to 64 KiB
/// (one message each).
pub const WS_WRITE_BUFFER_SIZE: usize = 0;

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
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
    /// The WebSocket upgrade failed (not a WebSocket request, no MQTT
    /// subprotocol, I/O error).
    #[error("WebSocket handshake failed: {0}")]
    WsHandshake(async_tungstenite::tungstenite::Error),
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
/// `TcpStream` (a unit test checks it): the framed transports are one
/// variant of two boxes, which fits beside the `TcpStream`'s non-null
/// pointer (its niche), so plain TCP connections pay no memory for them.
pub enum Stream {
    /// Plain TCP: the shard writes to its socket directly.
    Tcp(TcpStream),
    /// TLS or WebSocket.
    Framed(Framed),
}

/// A connection whose transport frames the MQTT bytes (boxed: most
/// connections are plain, and this state is large: about 1.3 kB for TLS,
/// 0.4 kB more for WebSocket).
pub enum Framed {
    /// TLS over TCP.
    Tls(Box<TlsConn>),
    /// WebSocket over TCP or TLS.
    Ws(Box<WsConn>),
}

/// A TLS connection and the identity its client certificate proved.
pub struct TlsConn {
    /// The TLS stream.
    stream: futures_rustls::server::TlsStream<TcpStream>,
    /// The verified client certificate's subject Common Name, if any.
    identity: Option<Box<str>>,
}

/// A WebSocket connection read and written as a byte stream.
pub struct WsConn {
    /// The WebSocket over TCP or TLS.
    ws: WebSocketStream<Stream>,
    /// The unread rest of the last binary message received.
    pending: Bytes,
}

impl Stream {
    /// The TCP socket underneath, whatever the transport (for lookups such
    /// as the peer address; only plain TCP may be written to directly).
    pub fn socket_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }

    /// The Common Name of the client certificate verified during the TLS
    /// handshake (TLS and WSS with a `cafile`), for `use_identity_as_username`.
    pub fn tls_identity(&self) -> Option<&str> {
        match self {
            Stream::Tcp(_) => None,
            Stream::Framed(framed) => match framed {
                Framed::Tls(tls) => tls.identity.as_deref(),
                Framed::Ws(ws) => ws.ws.get_ref().tls_identity(),
            },
        }
    }

    /// The TCP connection underneath.
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(tcp) => tcp,
            Stream::Framed(framed) => match framed {
                Framed::Tls(tls) => tls.stream.get_ref().0,
                Framed::Ws(ws) => ws.ws.get_ref().tcp(),
            },
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
        match self.transport {
            Transport::Mqtt => Ok(Stream::Tcp(tcp)),
            Transport::Tls => self.accept_tls(tcp).await,
            Transport::Ws => self.accept_ws(Stream::Tcp(tcp)).await,
            Transport::Wss => {
                let tls = self.accept_tls(tcp).await?;
                self.accept_ws(tls).await
            }
        }
    }

    /// The TLS handshake, with the configuration current at this moment.
    async fn accept_tls(&self, tcp: TcpStream) -> Result<Stream, TransportError> {
        let certs = self.tls.as_ref().ok_or(TransportError::NoCertificates)?;
        let acceptor = futures_rustls::TlsAcceptor::from(certs.current());
        let stream = acceptor
            .accept(tcp)
            .await
            .map_err(TransportError::TlsHandshake)?;
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| common_name(cert));
        Ok(Stream::Framed(Framed::Tls(Box::new(TlsConn {
            stream,
            identity,
        }))))
    }

    /// The WebSocket upgrade: requires an MQTT subprotocol.
    async fn accept_ws(&self, stream: Stream) -> Result<Stream, TransportError> {
        let config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER_SIZE)
            .write_buffer_size(WS_WRITE_BUFFER_SIZE)
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_message_size));
        let ws = async_tungstenite::accept_hdr_async_with_config(
            stream,
            choose_subprotocol,
            Some(config),
        )
        .await
        .map_err(TransportError::WsHandshake)?;
        Ok(Stream::Framed(Framed::Ws(Box::new(WsConn {
            ws,
            pending: Bytes::new(),
        }))))
    }
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
            Stream::Framed(framed) => match framed {
                Framed::Tls(tls) => Pin::new(&mut tls.stream).poll_read(cx, buf),
                Framed::Ws(ws) => ws.poll_read(cx, buf),
            },
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
            Stream::Framed(framed) => match framed {
                Framed::Tls(tls) => Pin::new(&mut tls.stream).poll_write(cx, buf),
                Framed::Ws(ws) => ws.poll_write(cx, buf),
            },
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Framed(framed) => match framed {
                Framed::Tls(tls) => Pin::new(&mut tls.stream).poll_flush(cx),
                Framed::Ws(ws) => Pin::new(&mut ws.ws).poll_flush(cx).map_err(ws_error),
            },
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_close(cx),
            Stream::Framed(framed) => match framed {
                Framed::Tls(tls) => Pin::new(&mut tls.stream).poll_close(cx),
                Framed::Ws(ws) => Pin::new(&mut ws.ws).poll_close(cx).map_err(ws_error),
            },
        }
    }
}

impl WsConn {
    /// Reads MQTT bytes: the rest of the last binary message, else the
    /// next one. Pings are answered by tungstenite; a close ends the stream;
    /// a text message is an error (§6.0: binary frames only).
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        while self.pending.is_empty() {
            match ready!(futures_lite::Stream::poll_next(Pin::new(&mut self.ws), cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(0)),
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame: MQTT over WebSocket is binary only",
                    )));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        Poll::Ready(Ok(n))
    }

    /// Sends `buf` as one binary message.
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_error)?;
        Pin::new(&mut self.ws)
            .start_send(Message::binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_error)?;
        Poll::Ready(Ok(buf.len()))
    }
}

/// A WebSocket error as an I/O error.
fn ws_error(e: async_tungstenite::tungstenite::Error) -> io::Error {
    match e {
        async_tungstenite::tungstenite::Error::Io(e) => e,
        e => io::Error::other(e),
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
