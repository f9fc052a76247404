//! Reaching etcd: the client, over TLS with a client certificate when flannel's
//! `--etcd-cafile`, `--etcd-certfile` and `--etcd-keyfile` say so. The files are read and
//! checked before the first connection, so a wrong one is reported by name at start instead of
//! as a failed handshake on every request.

use std::{
    error::Error as _,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rustls::{
    RootCertStore,
    crypto::ring::default_provider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};

/// The TLS files for etcd, as flannel's flags name them.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// `--etcd-cafile`: the CA certificates etcd's server certificate must chain to; without
    /// it, the system's roots.
    pub ca_file: Option<PathBuf>,
    /// `--etcd-certfile` and `--etcd-keyfile`: this node's client certificate and its key, for
    /// an etcd started with `--client-cert-auth`.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    fn given(&self) -> bool {
        self.ca_file.is_some() || self.client.is_some()
    }
}

/// Why the etcd client cannot be set up. Each names the flag or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read {flag} {}: {problem}; check the path and that the agent may read it", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        problem: std::io::Error,
    },
    #[error("{flag} {}: {problem}; {fix}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        problem: String,
        fix: &'static str,
    },
    #[error(
        "--etcd-keyfile {} is not the key of the certificate in --etcd-certfile {} ({problem}); \
         give the key the certificate was issued for",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        problem: String,
    },
    #[error(
        "etcd endpoint {endpoint} is plain http:// while TLS is in use (an https:// endpoint or \
         --etcd-cafile/--etcd-certfile); make every endpoint https://"
    )]
    NotHttps { endpoint: String },
    #[error(
        "cannot set up the etcd client for {endpoints:?}: {}{hint}",
        describe(source)
    )]
    Client {
        endpoints: Vec<String>,
        source: etcd_client::Error,
        hint: &'static str,
    },
}

/// An etcd error with its causes, which etcd-client's own message leaves out ("transport
/// error"), and what to check when it is about TLS.
#[must_use]
pub fn describe(error: &etcd_client::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let message = inner.to_string();
        // tonic repeats a cause's message in its own; say it once.
        if !text.contains(&message) {
            text = format!("{text}: {message}");
        }
        cause = inner.source();
    }
    let lower = text.to_lowercase();
    if ["certificate", "tls", "handshake", "alert"]
        .iter()
        .any(|word| lower.contains(word))
    {
        text.push_str(
            " (TLS with etcd failed: --etcd-cafile must hold the CA of etcd's server \
             certificate, and an etcd with --client-cert-auth needs --etcd-certfile and \
             --etcd-keyfile from a CA in its --trusted-ca-file)",
        );
    }
    text
}

/// How long a connection attempt and a request may take, and how often an idle connection is
/// checked (a partitioned etcd is noticed within 15 s, and the lease watch re-lists).
fn base_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
}

/// The client's options for `endpoints`: TLS when an endpoint is `https://` or TLS files are
/// given, with the files read and checked.
pub fn connect_options(
    endpoints: &[String],
    files: &TlsFiles,
) -> Result<ConnectOptions, ClientError> {
    let options = base_options();
    if !files.given() && !endpoints.iter().any(|e| e.starts_with("https://")) {
        return Ok(options);
    }
    if let Some(plain) = endpoints.iter().find(|e| e.starts_with("http://")) {
        return Err(ClientError::NotHttps {
            endpoint: plain.clone(),
        });
    }
    let tls = match &files.ca_file {
        Some(path) => TlsOptions::new().ca_certificate(ca_certificates(path)?),
        None => TlsOptions::new().with_native_roots(),
    };
    let tls = match &files.client {
        Some((cert, key)) => tls.identity(identity(cert, key)?),
        None => tls,
    };
    Ok(options.with_tls(tls))
}

/// The etcd client. It connects lazily, so this fails only on settings, never on an
/// unreachable etcd (requests report that, and are retried).
pub async fn connect(endpoints: &[String], files: &TlsFiles) -> Result<Client, ClientError> {
    let options = connect_options(endpoints, files)?;
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|source| ClientError::Client {
            endpoints: endpoints.to_vec(),
            source,
            hint: if files.ca_file.is_none() {
                "; without --etcd-cafile the system's CA roots are used: give the CA file of \
                 etcd's server certificate"
            } else {
                ""
            },
        })
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    fs::read(path).map_err(|problem| ClientError::Read {
        flag,
        path: path.to_owned(),
        problem,
    })
}

/// Every PEM certificate in `path`; at least one.
fn certificates(
    flag: &'static str,
    path: &Path,
    fix: &'static str,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), ClientError> {
    let pem = read(flag, path)?;
    let invalid = |problem: String| ClientError::Invalid {
        flag,
        path: path.to_owned(),
        problem,
        fix,
    };
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM ({e})")))?;
    if certificates.is_empty() {
        return Err(invalid("holds no PEM certificate".into()));
    }
    Ok((pem, certificates))
}

fn ca_certificates(path: &Path) -> Result<Certificate, ClientError> {
    const FLAG: &str = "--etcd-cafile";
    const FIX: &str = "give the PEM file of the CA that issued etcd's server certificate";
    let (pem, certificates) = certificates(FLAG, path, FIX)?;
    let mut roots = RootCertStore::empty();
    for certificate in certificates {
        // tonic skips certificates it cannot parse; an unusable CA would only show as every
        // handshake failing.
        roots.add(certificate).map_err(|e| ClientError::Invalid {
            flag: FLAG,
            path: path.to_owned(),
            problem: format!("not a usable CA certificate ({e})"),
            fix: FIX,
        })?;
    }
    Ok(Certificate::from_pem(pem))
}

fn identity(cert: &Path, key: &Path) -> Result<Identity, ClientError> {
    let (cert_pem, chain) = certificates(
        "--etcd-certfile",
        cert,
        "give this node's PEM client certificate",
    )?;
    let key_pem = read("--etcd-keyfile", key)?;
    let invalid_key = |problem: String| ClientError::Invalid {
        flag: "--etcd-keyfile",
        path: key.to_owned(),
        problem,
        fix: "give the PEM private key (PKCS#8, PKCS#1 or SEC1) of --etcd-certfile's certificate",
    };
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid_key(format!("holds no PEM private key ({e})")))?;
    let signing_key = default_provider()
        .key_provider
        .load_private_key(private_key)
        .map_err(|e| invalid_key(format!("not a usable private key ({e})")))?;
    match CertifiedKey::new(chain, signing_key).keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(mismatch)) => {
            return Err(ClientError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
                problem: format!("{mismatch:?}"),
            });
        }
        Err(e) => {
            return Err(ClientError::Invalid {
                flag: "--etcd-certfile",
                path: cert.to_owned(),
                problem: format!("not a usable certificate ({e})"),
                fix: "give this node's PEM client certificate",
            });
        }
    }
    Ok(Identity::from_pem(cert_pem, key_pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("a certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn files(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("a directory");
        for (name, text) in entries {
            fs::write(dir.path().join(name), text).expect("writing");
        }
        dir
    }

    fn https() -> Vec<String> {
        vec!["https://192.0.2.1:2379".to_owned()]
    }

    #[test]
    fn plain_endpoints_without_files_use_no_tls() {
        let endpoints = vec!["http://192.0.2.1:2379".to_owned()];
        assert!(connect_options(&endpoints, &TlsFiles::default()).is_ok());
    }

    #[test]
    fn a_good_ca_and_client_pair_are_accepted() {
        let (ca, _) = pair("ca");
        let (cert, key) = pair("node");
        let dir = files(&[("ca.pem", &ca), ("cert.pem", &cert), ("key.pem", &key)]);
        let tls = TlsFiles {
            ca_file: Some(dir.path().join("ca.pem")),
            client: Some((dir.path().join("cert.pem"), dir.path().join("key.pem"))),
        };
        connect_options(&https(), &tls).expect("accepted");
    }

    #[test]
    fn errors_name_the_file_and_the_flag() {
        let (cert, key) = pair("node");
        let (_, other_key) = pair("other");
        let dir = files(&[
            ("junk.pem", "not a certificate"),
            ("cert.pem", &cert),
            ("key.pem", &key),
            ("other-key.pem", &other_key),
        ]);
        let path = |name: &str| dir.path().join(name);
        let message = |tls: TlsFiles| {
            connect_options(&https(), &tls)
                .expect_err("refused")
                .to_string()
        };
        let missing = message(TlsFiles {
            ca_file: Some(path("absent.pem")),
            client: None,
        });
        assert!(
            missing.starts_with("cannot read --etcd-cafile ") && missing.contains("absent.pem"),
            "{missing}"
        );
        let junk = message(TlsFiles {
            ca_file: Some(path("junk.pem")),
            client: None,
        });
        assert!(
            junk.contains("--etcd-cafile") && junk.contains("junk.pem") && junk.contains("no PEM"),
            "{junk}"
        );
        let no_key = message(TlsFiles {
            ca_file: None,
            client: Some((path("cert.pem"), path("cert.pem"))),
        });
        assert!(
            no_key.starts_with("--etcd-keyfile") && no_key.contains("no PEM private key"),
            "{no_key}"
        );
        let mismatch = message(TlsFiles {
            ca_file: None,
            client: Some((path("cert.pem"), path("other-key.pem"))),
        });
        assert!(
            mismatch.contains("other-key.pem") && mismatch.contains("is not the key"),
            "{mismatch}"
        );
    }

    #[test]
    fn tls_files_with_a_plain_endpoint_are_refused() {
        let (ca, _) = pair("ca");
        let dir = files(&[("ca.pem", &ca)]);
        let tls = TlsFiles {
            ca_file: Some(dir.path().join("ca.pem")),
            client: None,
        };
        let endpoints = vec!["http://192.0.2.1:2379".to_owned()];
        assert!(matches!(
            connect_options(&endpoints, &tls),
            Err(ClientError::NotHttps { .. })
        ));
    }
}
