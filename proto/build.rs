//! Generates the prost messages and tonic client/server stubs from `proto/`.
//!
//! The `.proto` files are compiled by `protox`, a pure-Rust protobuf compiler: no `protoc` and
//! no system `google/protobuf/*.proto` files are needed (protox bundles the well-known types).
//! The resulting `FileDescriptorSet` feeds tonic/prost code generation. Well-known types
//! (`google.protobuf.*`) map to `::prost_types` (prost's default).

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
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    let descriptors = match protox::compile(PROTOS, [PROTO_ROOT]) {
        Ok(descriptors) => descriptors,
        // protox's error names the file, line and column of the problem.
        Err(err) => panic!("weft-proto: failed to parse the .proto files: {err:?}"),
    };
    if let Err(err) = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)
    {
        panic!("weft-proto: failed to generate code from the .proto files: {err}");
    }
}
