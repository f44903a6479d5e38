//! Certificates made at test time: a CA, a server certificate for `localhost` only, a
//! client certificate, and a second CA that signed neither.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

use crate::servers::temp_dir;

type Res<T> = Result<T, String>;

/// A certificate (PEM) with its private key (PEM) and their files.
#[derive(Debug)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The certificate's file.
    pub cert_file: PathBuf,
    /// The key's file (mode 0600: PostgreSQL refuses a key others can read).
    pub key_file: PathBuf,
}

/// The certificates of one test, written under one temporary directory.
#[derive(Debug)]
pub struct Pki {
    /// The CA that signed the server's and the client's certificates.
    pub ca: Issued,
    /// The server's certificate: valid for the name `localhost` only (not for 127.0.0.1).
    pub server: Issued,
    /// A client certificate (common name `app`).
    pub client: Issued,
    /// A CA that signed nothing here.
    pub other_ca: Issued,
}

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn ca_params(name: &str) -> Res<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e2s)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_owned());
    Ok(p)
}

impl Pki {
    /// Makes and writes the certificates.
    pub fn new() -> Res<Self> {
        let dir = temp_dir("pki")?;
        let write = |name: &str, cert_pem: String, key_pem: String| -> Res<Issued> {
            let cert_file = dir.join(format!("{name}.crt"));
            let key_file = dir.join(format!("{name}.key"));
            std::fs::write(&cert_file, &cert_pem).map_err(e2s)?;
            std::fs::write(&key_file, &key_pem).map_err(e2s)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
                .map_err(e2s)?;
            Ok(Issued {
                cert_pem,
                key_pem,
                cert_file,
                key_file,
            })
        };
        let ca_key = KeyPair::generate().map_err(e2s)?;
        let ca_cert = ca_params("lock test CA")?
            .self_signed(&ca_key)
            .map_err(e2s)?;
        let server_key = KeyPair::generate().map_err(e2s)?;
        let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
            .map_err(e2s)?
            .signed_by(&server_key, &ca_cert, &ca_key)
            .map_err(e2s)?;
        let client_key = KeyPair::generate().map_err(e2s)?;
        let mut client_params = CertificateParams::new(Vec::<String>::new()).map_err(e2s)?;
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "app");
        let client_cert = client_params
            .signed_by(&client_key, &ca_cert, &ca_key)
            .map_err(e2s)?;
        let other_key = KeyPair::generate().map_err(e2s)?;
        let other_cert = ca_params("another CA")?
            .self_signed(&other_key)
            .map_err(e2s)?;
        Ok(Self {
            ca: write("ca", ca_cert.pem(), ca_key.serialize_pem())?,
            server: write("server", server_cert.pem(), server_key.serialize_pem())?,
            client: write("client", client_cert.pem(), client_key.serialize_pem())?,
            other_ca: write("other-ca", other_cert.pem(), other_key.serialize_pem())?,
        })
    }
}
