//! The CA signer, CSR generation and chain parsing, with real certificates.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

mod support;

use std::time::{Duration, SystemTime};

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use support::{id, signer};
use weft_core::WorkloadCertificate;
use weft_core::ca::{self, Signer};
use weft_core::certs::{self, LeafInfo};
use weft_core::csr;
use weft_core::tls::{IdentityVerifier, provider};
use x509_parser::prelude::{FromDer, X509Certificate};

#[test]
fn signed_leaf_has_exactly_the_requested_san_both_ekus_and_capped_validity() {
    let config = ca::Config {
        max_ttl: Duration::from_secs(3600),
        ..ca::Config::default()
    };
    let signer = Signer::generate_root("cluster.local", config).unwrap();
    let identity = id("spiffe://cluster.local/ns/a/sa/client");
    let request = csr::generate(&identity).unwrap();
    let before = SystemTime::now();
    // Ask for 10 days; the signer caps at 1 hour.
    let chain = signer
        .sign(&request.csr_pem, &identity, Duration::from_secs(10 * 86400))
        .unwrap();
    assert_eq!(chain.len(), 2, "leaf + root bundle for a root signer");
    assert_eq!(chain[1], signer.root_bundle_pem());

    let leaf_der = certs::parse_pem_certificates(&chain[0], "leaf")
        .unwrap()
        .remove(0);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = sans
        .value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::prelude::GeneralName::URI(uri) => format!("URI:{uri}"),
            other => format!("other:{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        vec!["URI:spiffe://cluster.local/ns/a/sa/client".to_string()]
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth, "both EKUs: {eku:?}");
    assert!(!leaf.is_ca());
    assert_eq!(leaf.subject().iter_attributes().count(), 0, "empty subject");

    let info = LeafInfo::parse(&leaf_der).unwrap();
    let lifetime = info.not_after.duration_since(info.not_before).unwrap();
    assert!(
        lifetime <= Duration::from_secs(3600),
        "capped: {lifetime:?}"
    );
    assert!(
        lifetime >= Duration::from_secs(3590),
        "not shorter than asked: {lifetime:?}"
    );
    assert!(info.not_after <= before + Duration::from_secs(3602));

    // The chain verifies against the bundle with the serverAuth usage (webpki).
    let cert =
        WorkloadCertificate::from_pem_chain(&chain, &request.key_pem, Some(&identity)).unwrap();
    let verifier = IdentityVerifier::new(cert.roots().clone(), vec![identity.clone()], provider());
    verifier
        .verify_server_cert(
            &cert.chain()[0],
            &cert.chain()[1..],
            &ServerName::try_from("0.0.0.0").unwrap(),
            &[],
            UnixTime::now(),
        )
        .expect("leaf chains to the root bundle");
    // …and not against an unrelated root.
    let other = Signer::generate_root("cluster.local", ca::Config::default()).unwrap();
    let other_roots = certs::parse_pem_certificates(other.root_bundle_pem(), "root").unwrap();
    let mut store = rustls::RootCertStore::empty();
    store.add(other_roots[0].clone()).unwrap();
    let wrong = IdentityVerifier::new(std::sync::Arc::new(store), vec![identity], provider());
    assert!(
        wrong
            .verify_server_cert(
                &cert.chain()[0],
                &[],
                &ServerName::try_from("0.0.0.0").unwrap(),
                &[],
                UnixTime::now()
            )
            .is_err()
    );
}

#[test]
fn zero_ttl_gets_the_default_and_csr_has_no_subject() {
    let signer = signer();
    let identity = id("spiffe://cluster.local/ns/a/sa/b");
    let request = csr::generate(&identity).unwrap();
    assert!(
        request
            .csr_pem
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
    );
    let chain = signer
        .sign(&request.csr_pem, &identity, Duration::ZERO)
        .unwrap();
    let cert = WorkloadCertificate::from_pem_chain(&chain, &request.key_pem, None).unwrap();
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    assert!(
        lifetime > Duration::from_secs(23 * 3600) && lifetime <= Duration::from_secs(24 * 3600)
    );
    assert_eq!(cert.identity(), &identity);
}

#[test]
fn csr_for_a_different_san_is_refused() {
    let signer = signer();
    let asked = id("spiffe://cluster.local/ns/a/sa/admin");
    let entitled = id("spiffe://cluster.local/ns/a/sa/client");
    let request = csr::generate(&asked).unwrap();
    let err = signer
        .sign(&request.csr_pem, &entitled, Duration::from_secs(60))
        .unwrap_err();
    assert!(matches!(err, ca::Error::SanMismatch { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("spiffe://cluster.local/ns/a/sa/admin"),
        "{err}"
    );
}

#[test]
fn csr_with_extra_dns_san_or_no_san_is_refused() {
    use rcgen::{CertificateParams, KeyPair, SanType};
    let signer = signer();
    let identity = id("spiffe://cluster.local/ns/a/sa/client");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();

    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI(identity.to_string().try_into().unwrap()),
        SanType::DnsName("evil.example".try_into().unwrap()),
    ];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let err = signer
        .sign(&csr, &identity, Duration::from_secs(60))
        .unwrap_err();
    assert!(
        matches!(err, ca::Error::SanMismatch { ref found, .. } if found.len() == 2),
        "{err:?}"
    );

    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let err = signer
        .sign(&csr, &identity, Duration::from_secs(60))
        .unwrap_err();
    assert!(matches!(err, ca::Error::NoSan { .. }), "{err:?}");
}

#[test]
fn malformed_pem_and_csr_inputs_are_errors_not_panics() {
    let signer = signer();
    let identity = id("spiffe://cluster.local/ns/a/sa/client");
    let good = csr::generate(&identity).unwrap();
    let truncated = &good.csr_pem[..good.csr_pem.len() / 2];
    let tampered = good.csr_pem.replacen('A', "B", 3);
    for bad in [
        "",
        "not pem at all",
        "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
        truncated,
        tampered.as_str(),
        signer.root_bundle_pem(), // a certificate, not a CSR
    ] {
        let err = signer
            .sign(bad, &identity, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, ca::Error::Csr(_)), "{bad:?} gave {err:?}");
    }

    // Chains and keys.
    let chain = signer
        .sign(&good.csr_pem, &identity, Duration::from_secs(60))
        .unwrap();
    let parse = |chain: &[String], key: &str| WorkloadCertificate::from_pem_chain(chain, key, None);
    assert!(matches!(
        parse(&[], &good.key_pem),
        Err(certs::Error::EmptyChain)
    ));
    assert!(matches!(
        parse(&chain[..1], &good.key_pem),
        Err(certs::Error::MissingRoots)
    ));
    assert!(matches!(
        parse(&["garbage".into(), chain[1].clone()], &good.key_pem),
        Err(certs::Error::NoCertificate { .. })
    ));
    let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_string();
    let err = parse(&[broken, chain[1].clone()], &good.key_pem).unwrap_err();
    assert!(matches!(err, certs::Error::X509 { .. }), "{err:?}");
    assert!(err.to_string().contains("leaf certificate"), "{err}");
    assert!(matches!(
        parse(&chain, "no key here"),
        Err(certs::Error::Key(_))
    ));
    let other = id("spiffe://cluster.local/ns/a/sa/other");
    assert!(matches!(
        WorkloadCertificate::from_pem_chain(&chain, &good.key_pem, Some(&other)),
        Err(certs::Error::IdentityMismatch { .. })
    ));
    // A root has no SPIFFE SAN.
    assert!(matches!(
        parse(&[chain[1].clone(), chain[1].clone()], &good.key_pem),
        Err(certs::Error::NoSpiffeSan)
    ));
}

#[test]
fn intermediate_signer_returns_leaf_intermediate_root_bundle() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    // Root and intermediate, made here so the test controls the hierarchy.
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = CertificateParams::default();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut int_params = CertificateParams::default();
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let intermediate = int_params.signed_by(&int_key, &root_issuer).unwrap();

    let signer = Signer::from_pem(
        &intermediate.pem(),
        &int_key.serialize_pem(),
        None,
        &root.pem(),
        ca::Config::default(),
    )
    .unwrap();
    let identity = id("spiffe://cluster.local/ns/a/sa/client");
    let request = csr::generate(&identity).unwrap();
    let chain = signer
        .sign(&request.csr_pem, &identity, Duration::from_secs(600))
        .unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root bundle");
    assert_eq!(chain[2].trim(), root.pem().trim());
    let cert =
        WorkloadCertificate::from_pem_chain(&chain, &request.key_pem, Some(&identity)).unwrap();
    assert_eq!(cert.chain().len(), 2);
    let verifier = IdentityVerifier::new(cert.roots().clone(), vec![identity], provider());
    verifier
        .verify_server_cert(
            &cert.chain()[0],
            &cert.chain()[1..],
            &ServerName::try_from("0.0.0.0").unwrap(),
            &[],
            UnixTime::now(),
        )
        .expect("leaf → intermediate → root");
}

#[test]
fn load_or_create_persists_the_root() {
    let dir = std::env::temp_dir().join(format!("weft-ca-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = Signer::load_or_create(&dir, "cluster.local", ca::Config::default()).unwrap();
    let second = Signer::load_or_create(&dir, "cluster.local", ca::Config::default()).unwrap();
    assert_eq!(
        first.root_bundle_pem(),
        second.root_bundle_pem(),
        "reloaded, not regenerated"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join(ca::CA_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::write(dir.join(ca::CA_KEY_FILE), "garbage").unwrap();
    let err = Signer::load_or_create(&dir, "cluster.local", ca::Config::default()).unwrap_err();
    assert!(err.to_string().contains(ca::CA_KEY_FILE), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
