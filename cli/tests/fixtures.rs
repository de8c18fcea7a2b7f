//! The hand-testing fixtures stay valid manifests for `weft cluster apply`.

#[test]
fn fixtures_parse_as_the_local_cluster_accepts_them() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let objects = weft::cluster::manifest::read_path(&dir).expect("fixtures are valid");
    let kinds: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
    assert!(kinds.contains(&"Deployment a/echo".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"Service a/echo".to_owned()), "{kinds:?}");
}
