//! Generates the prost messages and tonic client/server stubs from `proto/`.
//!
//! Needs `protoc`: either on `PATH` or named by the `PROTOC` environment
//! variable. Well-known types (`google.protobuf.*`) map to `::prost_types`
//! (prost's default; `compile_well_known_types` is deliberately not set).

use std::path::Path;
use std::process::Command;

const PROTO_ROOT: &str = "proto";

const PROTOS: &[&str] = &[
    "proto/istio/workload/workload.proto",
    "proto/istio/security/authorization.proto",
    "proto/istio/workload/zds/zds.proto",
    "proto/istio/v1/auth/ca.proto",
    "proto/google/rpc/status.proto",
    "proto/envoy/config/core/v3/base.proto",
    "proto/envoy/service/discovery/v3/discovery.proto",
    "proto/weft/l7/v1/l7.proto",
    "proto/weft/echo/v1/echo.proto",
];

fn main() {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PROTOC");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    check_protoc();

    if let Err(err) = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(PROTOS, &[PROTO_ROOT])
    {
        panic!("weft-proto: failed to compile the .proto files: {err}");
    }
}

/// Fails the build early, with an actionable message, when no protoc is available.
fn check_protoc() {
    let (protoc, from_env) = match std::env::var_os("PROTOC") {
        Some(path) => (path, true),
        None => ("protoc".into(), false),
    };
    if from_env && !Path::new(&protoc).exists() {
        panic!(
            "weft-proto: PROTOC is set to {} but that file does not exist. \
             Point PROTOC at a protoc binary, or unset it and install protoc \
             (Debian/Ubuntu: `apt-get install protobuf-compiler`).",
            Path::new(&protoc).display()
        );
    }
    match Command::new(&protoc).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "weft-proto: `{} --version` failed ({}): {}. Install protobuf-compiler \
             (`apt-get install protobuf-compiler`) or set PROTOC to a working protoc.",
            Path::new(&protoc).display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => panic!(
            "weft-proto: the protobuf compiler `protoc` was not found ({err}). \
             Install it (Debian/Ubuntu: `apt-get install protobuf-compiler`) or set \
             the PROTOC environment variable to the path of a protoc binary."
        ),
    }
}
