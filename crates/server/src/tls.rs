//! HTTPS out of the box: a local CA (kept in `{data_dir}/tls/`, key 0600) signs a fresh server
//! certificate for `localhost`, the loopback addresses and the configured host at every start.
//! Clients trust the CA through `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE` or `NODE_EXTRA_CA_CERTS`.
//! Operators may supply their own certificate and key instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// What TLS set-up produced.
pub struct TlsSetup {
    pub server_config: Arc<rustls::ServerConfig>,
    /// The generated CA certificate, when Latchkey generated it.
    pub ca_path: Option<PathBuf>,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Latchkey local CA");
    dn.push(DnType::OrganizationName, "Latchkey");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}

/// Load or create the local CA, then issue a server certificate for `hosts`.
pub fn local_ca(data_dir: &Path, hosts: &[String]) -> Result<TlsSetup> {
    let dir = data_dir.join("tls");
    std::fs::create_dir_all(&dir)?;
    let (ca_cert_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let ca_key = if ca_key_path.exists() && ca_cert_path.exists() {
        let pem = std::fs::read_to_string(&ca_key_path)?;
        KeyPair::from_pem(&pem).context("the local CA key is unreadable")?
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&ca_cert_path, cert.pem())?;
        key
    };
    let ca_pem = std::fs::read_to_string(&ca_cert_path)?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Latchkey");
    let now = time::OffsetDateTime::from_unix_timestamp(latchkey_core::clock::Clock::now(
        &latchkey_core::clock::SystemClock,
    ))?;
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    let server_key = KeyPair::generate()?;
    let cert = params.signed_by(&server_key, &issuer)?;
    // Keep the issued pair on disk too, for operators who want to inspect it.
    std::fs::write(dir.join("server.pem"), format!("{}{}", cert.pem(), ca_pem))?;
    write_private(
        &dir.join("server-key.pem"),
        server_key.serialize_pem().as_bytes(),
    )?;

    let chain = vec![cert.der().clone(), pem_certs(ca_pem.as_bytes())?.remove(0)];
    let key = rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("server key: {e}"))?;
    Ok(TlsSetup {
        server_config: server_config(chain, key)?,
        ca_path: Some(ca_cert_path),
    })
}

/// Use the operator's certificate chain and key.
pub fn operator_supplied(cert: &Path, key: &Path) -> Result<TlsSetup> {
    let chain =
        pem_certs(&std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?)?;
    let key_pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())?
        .with_context(|| format!("no private key in {}", key.display()))?;
    Ok(TlsSetup {
        server_config: server_config(chain, key)?,
        ca_path: None,
    })
}

fn pem_certs(pem: &[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..]).collect::<Result<_, _>>()?;
    if certs.is_empty() {
        bail!("no certificate found");
    }
    Ok(certs)
}

fn server_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
