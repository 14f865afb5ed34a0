//! Outbound TLS: to upstreams and token endpoints, verified against the public web roots or,
//! where an upstream names one, its own CA bundle only; with a client certificate for mTLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: cannot read")]
    Unreadable(PathBuf, #[source] std::io::Error),
    #[error("{0}: no certificate in it")]
    NoCertificate(PathBuf),
    #[error("{0}: no private key in it")]
    NoKey(PathBuf),
    #[error("{0}")]
    Refused(PathBuf, #[source] rustls::Error),
    #[error("client_cert and client_key go together")]
    HalfClientIdentity,
}

/// Where an upstream's outbound TLS settings point (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Trust only these CAs (PEM); absent: the public web roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) and its key, for upstreams that require mTLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A rustls client config for these settings (read now: on start and on every reload).
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            for cert in certificates(path)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Refused(path.clone(), e))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots);
    match (&files.client_cert, &files.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(|e| TlsError::Refused(key.clone(), e)),
        _ => Err(TlsError::HalfClientIdentity),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Unreadable(path.to_path_buf(), e))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Unreadable(path.to_path_buf(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Unreadable(path.to_path_buf(), e))?
        .ok_or_else(|| TlsError::NoKey(path.to_path_buf()))
}

/// Whether `url` may be used without TLS: only a loopback host (a token endpoint's client
/// secret or an STS's answer must not cross a network in the clear).
pub fn plain_http_allowed(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}
