//! Wiring: config source → index → debounced translation → xDS cache → delta ADS and CA over
//! TLS, plus the debug endpoint.

use std::future::Future;
use std::sync::Arc;

use prost::Message;
use tokio::net::TcpListener;
use tonic::transport::{Identity, ServerTlsConfig};
use tracing::{Instrument, info, info_span, warn};
use weft_core::ca::Signer;
use weft_k8s::{Index, files};
use weft_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;
use weft_proto::type_url::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_POLICY_TYPE_URL, L7_SERVICE_TYPE_URL,
};

use crate::auth::{Authenticator, BootstrapTokens, LocalTokens, PodTokens, TokenReviewer};
use crate::ca::{self, CaService};
use crate::config::{Config, Source};
use crate::provision;
use crate::translate::l7::RouteStatus;
use crate::translate::{self, Change, Output};
use crate::xds;

/// Errors starting the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CA could not be loaded or created.
    #[error("certificate authority")]
    Ca(#[from] weft_core::ca::Error),
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes client could not be built.
    #[error("kubernetes client")]
    Kube(#[from] kube::Error),
    /// The gRPC server failed.
    #[error("grpc server")]
    Transport(#[from] tonic::transport::Error),
    /// The CA could not be kept in Kubernetes.
    #[error("ca persistence")]
    Persist(#[from] ca::PersistError),
    /// A node account is not `namespace/name`.
    #[error("node account {0:?} is not namespace/service-account")]
    NodeAccount(String),
}

/// `name → message` as cache resources of `type_url`.
fn resources<'a, M: Message + 'a>(
    type_url: &str,
    items: impl Iterator<Item = (&'a String, &'a M)>,
) -> Vec<xds::Resource> {
    items
        .map(|(name, m)| xds::Resource {
            name: name.clone(),
            aliases: Vec::new(),
            body: prost_types::Any {
                type_url: type_url.to_owned(),
                value: m.encode_to_vec(),
            },
        })
        .collect()
}

/// Publishes a translation into the cache (workload addresses and authorizations, waypoint
/// service configs and policies), returning whether anything changed.
pub fn publish(cache: &xds::Cache, out: &Output) -> bool {
    let addresses = out.addresses.values().map(address_resource).collect();
    let outcomes = [
        cache.set(ADDRESS_TYPE_URL, addresses),
        cache.set(
            AUTHORIZATION_TYPE_URL,
            resources(AUTHORIZATION_TYPE_URL, out.authorizations.iter()),
        ),
        cache.set(
            L7_SERVICE_TYPE_URL,
            resources(L7_SERVICE_TYPE_URL, out.l7_services.iter()),
        ),
        cache.set(
            L7_POLICY_TYPE_URL,
            resources(L7_POLICY_TYPE_URL, out.l7_policies.iter()),
        ),
    ];
    outcomes.iter().any(|o| o.changed + o.removed > 0)
}

/// The cache form of one Address resource.
fn address_resource(r: &translate::AddressResource) -> xds::Resource {
    xds::Resource {
        name: r.name.clone(),
        aliases: r.aliases.clone(),
        body: prost_types::Any {
            type_url: ADDRESS_TYPE_URL.to_owned(),
            value: r.address.encode_to_vec(),
        },
    }
}

/// Publishes what one [`translate::Translator::translate`] changed: the whole output for
/// [`Change::Full`], else only the named Address resources (encoding just those). Returns
/// whether anything changed.
pub fn publish_change(cache: &xds::Cache, out: &Output, change: &Change) -> bool {
    match change {
        Change::Full => publish(cache, out),
        Change::Addresses { upserted, removed } => {
            let upserts = upserted
                .iter()
                .filter_map(|name| out.addresses.get(name))
                .map(address_resource)
                .collect();
            let outcome = cache.update(ADDRESS_TYPE_URL, upserts, removed);
            outcome.changed + outcome.removed > 0
        }
    }
}

/// Translates on every index change, at most once per `debounce`, and publishes.
pub async fn translation_loop(
    index: Arc<Index>,
    cache: Arc<xds::Cache>,
    settings: translate::Settings,
    debounce: std::time::Duration,
) {
    translation_loop_with_routes(index, cache, settings, debounce, None, None).await;
}

/// The kinds the controller must have listed before it serves (Kubernetes source): until then
/// its view is partial, and a ztunnel that connected would be told to drop what is missing.
pub const REQUIRED_KINDS: &[weft_k8s::index::Kind] = &weft_k8s::index::Kind::ALL;

/// [`translation_loop`], also handing every translation's route statuses to `routes` (read by
/// [`provision_loop`]).
pub async fn translation_loop_with_routes(
    index: Arc<Index>,
    cache: Arc<xds::Cache>,
    settings: translate::Settings,
    debounce: std::time::Duration,
    routes: Option<tokio::sync::watch::Sender<Vec<RouteStatus>>>,
    ready: Option<(
        tokio::sync::watch::Sender<bool>,
        &'static [weft_k8s::index::Kind],
    )>,
) {
    let mut changes = index.changes();
    let mut reported: Vec<String> = Vec::new();
    let mut translator = translate::Translator::new(settings);
    loop {
        // Checked before the snapshot: every kind listed then is complete in it.
        let listed = ready
            .as_ref()
            .is_some_and(|(_, kinds)| index.unsynced(kinds).is_empty());
        let snapshot = index.snapshot();
        let revision = snapshot.revision;
        let started = std::time::Instant::now();
        let (out, change) = translator.translate(snapshot);
        let changed = publish_change(&cache, out, &change);
        if let Some(routes) = &routes {
            routes.send_if_modified(|current| {
                let modified = *current != out.route_statuses;
                if modified {
                    current.clone_from(&out.route_statuses);
                }
                modified
            });
        }
        if out.problems != reported {
            for problem in out.problems.iter().filter(|p| !reported.contains(p)) {
                warn!(problem = %problem, "object skipped");
            }
            reported = out.problems.clone();
        }
        if let Some((ready, _)) = &ready
            && listed
            && !*ready.borrow()
        {
            // Ready once a translation covered a complete list of every required kind.
            info!(revision, "every watched kind listed: serving");
            let _ = ready.send(true);
        }
        info!(
            revision,
            incremental = change != Change::Full,
            addresses = out.addresses.len(),
            authorizations = out.authorizations.len(),
            l7_services = out.l7_services.len(),
            l7_policies = out.l7_policies.len(),
            changed,
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "translated"
        );
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(debounce).await;
        changes.borrow_and_update();
    }
}

/// An error with its causes, `outer: inner: …`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How often the provisioner applies everything again even without a change (Kubernetes: an
/// owned object deleted by hand comes back within this).
pub const PROVISION_RESYNC: std::time::Duration = std::time::Duration::from_secs(30);

/// Provisions waypoints and writes Gateway, GatewayClass and route status on every index or
/// route-status change, at most once per `debounce`, and every [`PROVISION_RESYNC`] (see
/// [`provision`]).
pub async fn provision_loop(
    index: Arc<Index>,
    writer: provision::Writer,
    settings: provision::Settings,
    mut routes: tokio::sync::watch::Receiver<Vec<RouteStatus>>,
    debounce: std::time::Duration,
) {
    let mut changes = index.changes();
    let mut reported: Vec<String> = Vec::new();
    let mut next_resync = tokio::time::Instant::now() + PROVISION_RESYNC;
    loop {
        let snapshot = index.snapshot();
        let statuses = routes.borrow_and_update().clone();
        let plan = provision::plan(&snapshot, &statuses, &settings, &provision::now());
        let mut problems = plan.problems.clone();
        for error in writer.execute(&plan).await {
            problems.push(error_chain(&error));
        }
        for problem in problems.iter().filter(|p| !reported.contains(p)) {
            warn!(problem = %problem, "provisioning problem");
        }
        reported = problems;
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            changed = routes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(next_resync) => {}
        }
        if tokio::time::Instant::now() >= next_resync {
            writer.forget_applied();
            next_resync = tokio::time::Instant::now() + PROVISION_RESYNC;
        }
        tokio::time::sleep(debounce).await;
        changes.borrow_and_update();
    }
}

/// Keeps ConfigMap `istio-ca-root-cert` in every namespace (Kubernetes source).
async fn publish_root_everywhere(client: kube::Client, index: Arc<Index>, root: String) {
    let mut changes = index.changes();
    let mut done = std::collections::BTreeSet::new();
    loop {
        let namespaces: Vec<String> = index.read(|s| s.namespaces.keys().cloned().collect());
        for ns in namespaces {
            if done.contains(&ns) {
                continue;
            }
            match ca::publish_root(&client, &ns, &root).await {
                Ok(()) => drop(done.insert(ns)),
                Err(err) => warn!(namespace = %ns, error = %err, "publishing root cert failed"),
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the controller until `shutdown` resolves.
///
/// # Errors
/// [`Error`] when a component cannot start.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let io = |what: String| move |source| Error::Io { what, source };
    info!(config = ?config, "starting");
    let kube_client = match config.source() {
        Source::Kubernetes => Some(kube::Client::try_default().await?),
        Source::Files(_) => None,
    };
    if let Some(client) = &kube_client {
        ca::restore_from_secret(client, &config.root_namespace, &config.ca_dir()).await?;
    }
    let signer = Arc::new(Signer::load_or_create(
        &config.ca_dir(),
        &config.trust_domain,
        weft_core::ca::Config {
            max_ttl: config.max_cert_ttl,
            ..weft_core::ca::Config::default()
        },
    )?);
    let index = Index::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let (ns, sa) = config
        .node_accounts
        .first()
        .and_then(|a| a.split_once('/'))
        .ok_or_else(|| Error::NodeAccount(config.node_accounts.join(",")))?;
    let auth: Arc<dyn Authenticator> = match config.source() {
        Source::Files(dir) => {
            let mut watcher = files::Watcher::new(&dir);
            watcher.scan(&index);
            tokio::spawn(
                files::run(watcher, index.clone(), config.files_poll, stopped())
                    .instrument(info_span!("files")),
            );
            let nodes: Vec<String> = index.read(|s| s.nodes.keys().cloned().collect());
            let tokens = BootstrapTokens::load_or_create(&config.token_dir(), &nodes, (ns, sa))
                .map_err(io(format!(
                    "writing bootstrap tokens in {}",
                    config.token_dir().display()
                )))?;
            info!(nodes = ?nodes, dir = %config.token_dir().display(), "bootstrap tokens ready");
            Arc::new(LocalTokens {
                nodes: tokens,
                pods: PodTokens::new(config.pod_token_dir()),
            })
        }
        Source::Kubernetes => {
            let client = match &kube_client {
                Some(client) => client.clone(),
                None => kube::Client::try_default().await?,
            };
            ca::save_to_secret(&client, &config.root_namespace, &config.ca_dir()).await?;
            tokio::spawn(
                publish_root_everywhere(
                    client.clone(),
                    index.clone(),
                    signer.root_bundle_pem().to_owned(),
                )
                .instrument(info_span!("root_cert")),
            );
            weft_k8s::apiserver::spawn_all(client.clone(), index.clone());
            Arc::new(TokenReviewer::new(
                client,
                vec![config.token_audience.clone()],
                index.clone(),
            ))
        }
    };

    let cache = xds::Cache::new();
    let registry = xds::Registry::new();
    let settings = translate::Settings {
        authz: translate::authz::Settings {
            root_namespace: config.root_namespace.clone(),
            trust_domain: config.trust_domain.clone(),
        },
        cluster_id: config.cluster_id.clone(),
        network: config.network.clone(),
        ..translate::Settings::default()
    };
    let (routes_tx, routes_rx) = tokio::sync::watch::channel(Vec::new());
    // On Kubernetes, xDS and the CA are served only once every watched kind has been listed
    // (as istiod waits for its informers): a controller that restarts while the API is away or
    // refuses a list keeps its clients on their last good config instead of emptying it.
    let (ready_tx, mut ready_rx) =
        tokio::sync::watch::channel(config.source() != Source::Kubernetes);
    let gate = (config.source() == Source::Kubernetes).then_some((ready_tx, REQUIRED_KINDS));
    tokio::spawn(
        translation_loop_with_routes(
            index.clone(),
            cache.clone(),
            settings,
            config.debounce,
            Some(routes_tx),
            gate,
        )
        .instrument(info_span!("translate")),
    );
    let writer = match (config.source(), &kube_client) {
        (Source::Files(dir), _) => Some(provision::Writer::Store(weft_k8s::store::Store::new(dir))),
        (Source::Kubernetes, Some(client)) => Some(provision::Writer::kube(client.clone())),
        (Source::Kubernetes, None) => None,
    };
    if let Some(writer) = writer {
        let provision_settings = provision::Settings {
            command: config.waypoint_command.clone(),
            image: config.waypoint_image.clone(),
            env: config.waypoint_env.clone(),
            trust_domain: config.trust_domain.clone(),
            kubernetes: config.source() == Source::Kubernetes,
            ..provision::Settings::default()
        };
        tokio::spawn(
            provision_loop(
                index.clone(),
                writer,
                provision_settings,
                routes_rx,
                config.debounce,
            )
            .instrument(info_span!("provision")),
        );
    }

    let debug = TcpListener::bind(config.debug_listen)
        .await
        .map_err(io(format!(
            "binding debug listener {}",
            config.debug_listen
        )))?;
    tokio::spawn(
        xds::serve_debug(debug, registry.clone(), cache.clone()).instrument(info_span!("debug")),
    );

    let (chain, key) = signer.issue_serving(
        &config.serving_dns,
        &config.serving_ips,
        std::time::Duration::from_secs(365 * 24 * 3600),
    )?;
    let ca_service = CaService::new(
        signer.clone(),
        auth.clone(),
        index.clone(),
        ca::Config {
            trust_domain: config.trust_domain.clone(),
            trusted_node_accounts: config.node_accounts.clone(),
        },
    );
    let ads = xds::Server::new(cache.clone(), registry.clone(), auth.clone());
    let mut waited = std::time::Instant::now();
    while !*ready_rx.borrow_and_update() {
        if tokio::time::timeout(std::time::Duration::from_secs(10), ready_rx.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            break;
        }
        if waited.elapsed() >= std::time::Duration::from_secs(10) {
            let missing: Vec<String> = index
                .unsynced(REQUIRED_KINDS)
                .iter()
                .map(|k| format!("{k:?}"))
                .collect();
            warn!(missing = ?missing, "not serving yet: waiting for the first complete list of these kinds (the watch errors above say why)");
            waited = std::time::Instant::now();
        }
    }
    info!(listen = %config.listen, debug = %config.debug_listen, "controller ready");
    // Graceful first: ADS streams are ended cleanly (clients reconnect at once) and new ones
    // refused; anything still open after the drain deadline is closed.
    let (fired_tx, mut fired_rx) = tokio::sync::watch::channel(false);
    let ads_handle = ads.clone();
    let deadline = config.drain_deadline;
    let server = tonic::transport::Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(chain, key)))?
        .add_service(ads.service())
        .add_service(IstioCertificateServiceServer::new(ca_service))
        .serve_with_shutdown(config.listen, async move {
            shutdown.await;
            let _ = fired_tx.send(true);
            ads_handle.shutdown(deadline).await;
        });
    let result = tokio::select! {
        result = server => result.map_err(Error::from),
        () = async move {
            let _ = fired_rx.wait_for(|f| *f).await;
            tokio::time::sleep(deadline * 2).await;
        } => {
            warn!(deadline_s = deadline.as_secs_f64(), "open streams did not finish; closing them");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    result
}
