//! Certificates made at run time for the TLS tests: a CA, and certificates it issues.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A test CA, and the certificates it issues as PEM files in a directory.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Ca {
    /// A new CA, its certificate written to `dir/ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Ca { issuer: Issuer::new(params, key), dir: dir.to_owned() }
    }

    /// A certificate for 127.0.0.1 and localhost, good for serving and as a client, written to
    /// `dir/{name}.pem` and `dir/{name}.key`; answers the certificate's DER.
    pub fn issue(&self, name: &str) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // the key first, then the certificate, each replaced whole: a reader sees either pair
        replace(&self.dir.join(format!("{name}.key")), key.serialize_pem().as_bytes());
        replace(&self.dir.join(format!("{name}.pem")), cert.pem().as_bytes());
        cert.der().to_vec()
    }

    /// The path of `file` in the CA's directory, as a flag takes it.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

/// Writes `path` whole, by renaming a new file over it.
pub fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A channel to `https://{addr}` trusting `ca`, presenting `client` (certificate and key files)
/// if given; the connection's error if it fails.
pub async fn channel(addr: SocketAddr, ca: &str, client: Option<(&str, &str)>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}
