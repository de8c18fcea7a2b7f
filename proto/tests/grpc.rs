//! The generated tonic stubs use the right gRPC service names and method paths.
//!
//! Besides the `NamedService` constants, each RPC is driven end to end in-process:
//! generated client -> a recorder that captures the HTTP/2 `:path` -> generated server ->
//! a test implementation. The recorded paths are compared with the literal paths from the
//! reference (shared/reference/istio-ztunnel.md §2.2, §3).

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::stream::{self, BoxStream};
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use weft_proto::ADDRESS_TYPE_URL;
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    self as ads_server, AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use weft_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use weft_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use weft_proto::istio::v1::auth::istio_certificate_service_server::{
    self as ca_server, IstioCertificateService, IstioCertificateServiceServer,
};
use weft_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

/// A tower service that records each request's URI path, then forwards it.
#[derive(Clone)]
struct PathRecorder<S> {
    inner: S,
    paths: Arc<Mutex<Vec<String>>>,
}

impl<S> PathRecorder<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            paths: Arc::default(),
        }
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().expect("lock").clone()
    }
}

impl<S, B> Service<http::Request<B>> for PathRecorder<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.paths
            .lock()
            .expect("lock")
            .push(req.uri().path().to_owned());
        self.inner.call(req)
    }
}

struct TestCa;

#[tonic::async_trait]
impl IstioCertificateService for TestCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![format!("leaf for {}", req.csr), "root".to_owned()],
        }))
    }
}

struct TestAds;

#[tonic::async_trait]
impl AggregatedDiscoveryService for TestAds {
    type StreamAggregatedResourcesStream = BoxStream<'static, Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream =
        BoxStream<'static, Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.unwrap_or_default();
        let reply = DiscoveryResponse {
            type_url: first.type_url,
            nonce: "sotw-nonce".to_owned(),
            ..Default::default()
        };
        Ok(Response::new(Box::pin(stream::iter([Ok(reply)]))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.unwrap_or_default();
        let reply = DeltaDiscoveryResponse {
            type_url: first.type_url,
            nonce: "delta-nonce".to_owned(),
            removed_resources: first.resource_names_subscribe,
            ..Default::default()
        };
        Ok(Response::new(Box::pin(stream::iter([Ok(reply)]))))
    }
}

#[test]
fn service_names() {
    assert_eq!(
        ca_server::SERVICE_NAME,
        "istio.v1.auth.IstioCertificateService"
    );
    assert_eq!(
        <IstioCertificateServiceServer<TestCa> as NamedService>::NAME,
        "istio.v1.auth.IstioCertificateService"
    );
    assert_eq!(
        ads_server::SERVICE_NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
    assert_eq!(
        <AggregatedDiscoveryServiceServer<TestAds> as NamedService>::NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
}

#[tokio::test]
async fn create_certificate_path_and_round_trip() {
    let recorder = PathRecorder::new(IstioCertificateServiceServer::new(TestCa));
    let mut client = IstioCertificateServiceClient::new(recorder.clone());
    let response = client
        .create_certificate(IstioCertificateRequest {
            csr: "CSR".to_owned(),
            validity_duration: 3600,
            metadata: None,
        })
        .await
        .expect("CreateCertificate succeeds");
    assert_eq!(response.into_inner().cert_chain, ["leaf for CSR", "root"]);
    assert_eq!(
        recorder.paths(),
        ["/istio.v1.auth.IstioCertificateService/CreateCertificate"]
    );
}

#[tokio::test]
async fn delta_aggregated_resources_path_and_round_trip() {
    let recorder = PathRecorder::new(AggregatedDiscoveryServiceServer::new(TestAds));
    let mut client = AggregatedDiscoveryServiceClient::new(recorder.clone());
    let outbound = stream::iter([DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.to_owned(),
        resource_names_subscribe: vec!["/10.0.0.5".to_owned()],
        ..Default::default()
    }]);
    let mut inbound = client
        .delta_aggregated_resources(outbound)
        .await
        .expect("DeltaAggregatedResources starts")
        .into_inner();
    let reply = inbound
        .message()
        .await
        .expect("stream ok")
        .expect("one response");
    assert_eq!(reply.type_url, ADDRESS_TYPE_URL);
    assert_eq!(reply.nonce, "delta-nonce");
    assert_eq!(reply.removed_resources, ["/10.0.0.5"]);
    assert!(inbound.message().await.expect("clean end").is_none());
    assert_eq!(
        recorder.paths(),
        ["/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"]
    );
}

#[tokio::test]
async fn stream_aggregated_resources_path() {
    let recorder = PathRecorder::new(AggregatedDiscoveryServiceServer::new(TestAds));
    let mut client = AggregatedDiscoveryServiceClient::new(recorder.clone());
    let outbound = stream::iter([DiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.to_owned(),
        ..Default::default()
    }]);
    let mut inbound = client
        .stream_aggregated_resources(outbound)
        .await
        .expect("StreamAggregatedResources starts")
        .into_inner();
    let reply = inbound
        .message()
        .await
        .expect("stream ok")
        .expect("one response");
    assert_eq!(reply.nonce, "sotw-nonce");
    assert_eq!(
        recorder.paths(),
        ["/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"]
    );
}

#[tokio::test]
async fn unknown_method_is_unimplemented() {
    // The server routes on the exact path: a misspelt method must not reach the handler.
    let mut server = IstioCertificateServiceServer::new(TestCa);
    let request = http::Request::builder()
        .method("POST")
        .uri("/istio.v1.auth.IstioCertificateService/CreateCertificates")
        .header("content-type", "application/grpc")
        .body(tonic::body::Body::empty())
        .expect("request");
    let response = server.call(request).await.expect("infallible");
    let status = response
        .headers()
        .get("grpc-status")
        .expect("grpc-status header");
    assert_eq!(status, "12"); // UNIMPLEMENTED
}
