//! The subscribers' TLS (`--transport wss`: WebSocket over TLS, as MQTT.js
//! in a browser on an `https://` page) and the test certificate of the
//! brokers `--compare` starts.
//!
//! rustls (ring provider, as the broker's own) does the TLS; what is here is
//! the glue a worker's non-blocking loop needs: the bytes read from a socket
//! go in ([`TlsConn::receive`]), the plaintext comes out, and what the
//! worker queued goes out encrypted on the next flush ([`TlsConn::flush`]).
//! The WebSocket upgrade may be queued before the handshake is done: rustls
//! holds it until then.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Names the test certificate is valid for: the loopback broker the bench
/// starts, by address and by name.
const TEST_NAMES: [&str; 2] = ["127.0.0.1", "localhost"];

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS socket I/O: {0}")]
    Io(#[from] io::Error),
    #[error("trust anchors: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("trust anchors: no certificate in the PEM")]
    NoAnchor,
    #[error("server name {0:?}: {1}")]
    Name(String, rustls::pki_types::InvalidDnsNameError),
    #[error("test certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {0}: {1}")]
    Write(PathBuf, io::Error),
}

/// The PEM files of a certificate and its private key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM), also the subscribers' trust anchor.
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// Writes a fresh self-signed certificate for 127.0.0.1 and localhost to
/// `dir` (`bench-cert.pem`, `bench-key.pem`), made at run time so that no
/// key is kept in the repository.
///
/// # Errors
/// Generating the key or writing a file failed.
pub fn test_certificate(dir: &Path) -> Result<CertFiles, TlsError> {
    let names: Vec<String> = TEST_NAMES.iter().map(|n| n.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names)?;
    let files = CertFiles {
        cert: dir.join("bench-cert.pem"),
        key: dir.join("bench-key.pem"),
    };
    std::fs::write(&files.cert, certified.cert.pem())
        .map_err(|e| TlsError::Write(files.cert.clone(), e))?;
    std::fs::write(&files.key, certified.signing_key.serialize_pem())
        .map_err(|e| TlsError::Write(files.key.clone(), e))?;
    Ok(files)
}

/// A client configuration (shared by a worker's connections) trusting the
/// certificates in `ca_pem`.
///
/// # Errors
/// `ca_pem` holds no valid certificate.
pub fn client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoAnchor);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One connection's TLS state.
pub struct TlsConn {
    conn: rustls::ClientConnection,
}

impl TlsConn {
    /// A connection to `server_name` (an address or a DNS name the
    /// certificate must be valid for); its ClientHello is ready to flush.
    ///
    /// # Errors
    /// A bad server name, or rustls refused the configuration.
    pub fn start(
        config: &Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<TlsConn, TlsError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| TlsError::Name(server_name.to_owned(), e))?;
        let mut conn = rustls::ClientConnection::new(Arc::clone(config), name)?;
        // The worker writes little (an upgrade, CONNECT, SUBSCRIBE, acks)
        // and only between reads: what it queues before the handshake ends
        // must never be refused.
        conn.set_buffer_limit(None);
        Ok(TlsConn { conn })
    }

    /// Takes `wire`, bytes read from the socket, and appends the plaintext
    /// they complete to `plain`.
    ///
    /// # Errors
    /// A TLS error (bad record, failed certificate check, alert), or the
    /// broker's close_notify.
    pub fn receive(&mut self, mut wire: &[u8], plain: &mut Vec<u8>) -> Result<(), TlsError> {
        while !wire.is_empty() {
            self.conn.read_tls(&mut wire)?;
            let state = self.conn.process_new_packets()?;
            let ready = state.plaintext_bytes_to_read();
            if ready > 0 {
                let at = plain.len();
                plain.resize(at + ready, 0);
                self.conn.reader().read_exact(&mut plain[at..])?;
            }
            if state.peer_has_closed() {
                return Err(TlsError::Io(io::ErrorKind::ConnectionAborted.into()));
            }
        }
        Ok(())
    }

    /// Encrypts `plain` (then empty) and writes what TLS has to send to
    /// `socket` until it would block; true when something was written.
    ///
    /// # Errors
    /// The socket failed.
    pub fn flush(
        &mut self,
        plain: &mut Vec<u8>,
        socket: &mut impl Write,
    ) -> Result<bool, TlsError> {
        if !plain.is_empty() {
            // No buffer limit (see `start`): the whole of it is taken.
            self.conn.writer().write_all(plain)?;
            plain.clear();
        }
        let mut wrote = false;
        while self.conn.wants_write() {
            match self.conn.write_tls(socket) {
                Ok(_) => wrote = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(wrote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server config for the test certificate in `files`.
    fn server_config(files: &CertFiles) -> Arc<rustls::ServerConfig> {
        let certs = CertificateDer::pem_file_iter(&files.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        )
    }

    /// Encrypts `queued` and what else `client` has to send, and hands it
    /// to `server` (rustls's own server side).
    fn to_server(
        client: &mut TlsConn,
        queued: &mut Vec<u8>,
        server: &mut rustls::ServerConnection,
    ) {
        let mut wire = Vec::new();
        client.flush(queued, &mut wire).unwrap();
        let mut at = &wire[..];
        while !at.is_empty() {
            server.read_tls(&mut at).unwrap();
            server.process_new_packets().unwrap();
        }
    }

    #[test]
    fn the_test_certificate_is_trusted_and_plaintext_crosses_both_ways() {
        let dir = std::env::temp_dir().join(format!("fanmq-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = test_certificate(&dir).unwrap();
        let ca = std::fs::read_to_string(&files.cert).unwrap();
        let config = client_config(&ca).unwrap();
        let mut server = rustls::ServerConnection::new(server_config(&files)).unwrap();
        let mut client = TlsConn::start(&config, "127.0.0.1").unwrap();
        // Queued before the handshake: held until it is done.
        let mut queued = b"GET /mqtt HTTP/1.1\r\n\r\n".to_vec();
        let mut plain = Vec::new();
        while server.is_handshaking() || client.conn.is_handshaking() {
            to_server(&mut client, &mut queued, &mut server);
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            // Read by the worker in small pieces, as short reads would.
            for piece in wire.chunks(100) {
                client.receive(piece, &mut plain).unwrap();
            }
        }
        to_server(&mut client, &mut queued, &mut server);
        assert!(queued.is_empty());
        let mut got = Vec::new();
        let _ = server.reader().read_to_end(&mut got);
        assert_eq!(got, b"GET /mqtt HTTP/1.1\r\n\r\n");
        server.writer().write_all(b"HTTP/1.1 101").unwrap();
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        client.receive(&wire, &mut plain).unwrap();
        assert_eq!(plain, b"HTTP/1.1 101");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_certificate_for_another_name_or_no_anchor_is_refused() {
        let dir = std::env::temp_dir().join(format!("fanmq-bench-tls2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = test_certificate(&dir).unwrap();
        let ca = std::fs::read_to_string(&files.cert).unwrap();
        let config = client_config(&ca).unwrap();
        let mut server = rustls::ServerConnection::new(server_config(&files)).unwrap();
        let mut client = TlsConn::start(&config, "broker.example").unwrap();
        to_server(&mut client, &mut Vec::new(), &mut server);
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        assert!(client.receive(&wire, &mut Vec::new()).is_err());
        assert!(matches!(client_config(""), Err(TlsError::NoAnchor)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
