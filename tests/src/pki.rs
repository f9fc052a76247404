//! A throwaway PKI for TLS tests (etcd's server and client certificates): a CA and the
//! certificates it issues, made with rcgen, so no tool outside the test is needed.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, as PEM files.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// A self-signed CA called `name`.
    #[must_use]
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("a CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("a CA certificate"),
        }
    }

    /// Writes the CA's certificate to `dir/<file>`.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        write(dir, file, &self.issuer.pem())
    }

    /// Issues a certificate for `name` with `addresses` as IP SANs and `usages` (server, client
    /// or both), and writes it and its key to `dir/<name>.pem` and `dir/<name>-key.pem`.
    pub fn issue(
        &self,
        dir: &Path,
        name: &str,
        addresses: &[IpAddr],
        usages: &[ExtendedKeyUsagePurpose],
    ) -> Pair {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = addresses.iter().map(|a| SanType::IpAddress(*a)).collect();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages.to_vec();
        let key = KeyPair::generate().expect("a key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing a certificate");
        Pair {
            cert: write(dir, &format!("{name}.pem"), &cert.pem()),
            key: write(dir, &format!("{name}-key.pem"), &key.serialize_pem()),
        }
    }
}

fn write(dir: &Path, file: &str, text: &str) -> PathBuf {
    let path = dir.join(file);
    fs::write(&path, text).expect("writing a PEM file");
    path
}
