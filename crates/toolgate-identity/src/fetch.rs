//! Fetching a JWKS over HTTP(S): bounded in time and size.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_BYTES: usize = 1 << 20;

pub struct Fetcher {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl Fetcher {
    pub fn new() -> Self {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Fetcher {
            client: Client::builder(TokioExecutor::new()).build(https),
        }
    }

    pub async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("invalid JWKS URL {url}: {e}"))?;
        let fetch = async {
            let response = self
                .client
                .get(uri)
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("GET {url}: status {}", response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(TIMEOUT, fetch)
            .await
            .map_err(|_| format!("GET {url}: timed out"))?
    }
}
