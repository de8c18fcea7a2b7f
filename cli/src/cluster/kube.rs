//! The local cluster's real Kubernetes control plane: etcd, `kube-apiserver`,
//! `kube-controller-manager` and `kube-scheduler`, built from their Go modules by
//! `scripts/build-kube` (pinned in `cli/kube/go.mod`) and run in the control-plane network
//! namespace, with a PKI of their own.
//!
//! What runs (all in the control-plane netns, state under `<state dir>/kube/`):
//!
//! | process | listens on | identity |
//! |---|---|---|
//! | etcd | `127.0.0.1:2379` (client), `127.0.0.1:2380` (peer) | none (loopback only) |
//! | kube-apiserver | `0.0.0.0:6443`, serving cert for `kubernetes.default.svc…`, `10.96.0.1`, the control-plane IP, `127.0.0.1` | authn: client certificates of the cluster CA, ServiceAccount tokens; authz `Node,RBAC` |
//! | kube-controller-manager | `127.0.0.1:10257` | `system:kube-controller-manager`; one ServiceAccount per controller |
//! | kube-scheduler | `127.0.0.1:10259` | `system:kube-scheduler` |
//!
//! From the host, `weft cluster kubeconfig` gives an admin (`system:masters`) kubeconfig whose
//! server is a loopback forwarder (`weft cluster apiserver-proxy`, 127.0.0.1, port chosen at
//! start) into the control-plane netns: no route from the host into the cluster is needed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, string::Ia5String,
};
use serde_json::json;
use time::OffsetDateTime;

use super::layout::{self, Layout};
use super::netns;
use super::network::process_alive;

/// The Kubernetes release `scripts/build-kube` builds (`k8s.io/kubernetes` in `cli/kube/go.mod`;
/// a unit test keeps the two equal).
pub const KUBE_VERSION: &str = "v1.35.4";
/// Where `scripts/build-kube` installs by default: `<root>/<version>/bin`.
pub const DEFAULT_KUBE_ROOT: &str = "/opt/weft/kube";
/// kube-apiserver's secure port.
pub const APISERVER_PORT: u16 = 6443;
/// etcd's client port (loopback of the control-plane netns).
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port (loopback of the control-plane netns).
pub const ETCD_PEER_PORT: u16 = 2380;
/// The cluster IP of the `kubernetes` Service (the first address of the service range).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The ServiceAccount token issuer (and default audience).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// How long the control plane's certificates live.
const CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the apiserver may take to answer `/readyz` with `ok`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The control-plane programs, in start order.
pub const PROGRAMS: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// The programs each node runs besides its kubelet.
pub const NODE_PROGRAMS: [&str; 1] = ["kube-proxy"];

/// The pod network of the whole cluster (each node has a /24 of it).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program is not installed.
    #[error(
        "{program} not found in {dir} (run scripts/install-deps, which builds Kubernetes {KUBE_VERSION} with scripts/build-kube)"
    )]
    Missing {
        /// The program.
        program: String,
        /// Where it was looked for.
        dir: String,
    },
    /// Making a key or certificate failed.
    #[error("creating {what}")]
    Pki {
        /// The certificate or key.
        what: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// A file could not be written or read.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A process did not start or did not become ready.
    #[error("{program} did not become ready: {detail}")]
    NotReady {
        /// The program.
        program: String,
        /// Why (the last lines of its log).
        detail: String,
    },
    /// A command in a namespace failed.
    #[error(transparent)]
    Command(#[from] netns::Error),
    /// The cluster add-ons could not be applied.
    #[error("applying the cluster add-ons (CoreDNS): {0}")]
    Addons(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn pki_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |source| Error::Pki {
        what: what.to_owned(),
        source,
    }
}

/// Where the Kubernetes programs are: `$WEFT_KUBE_BIN_DIR`, else
/// `/opt/weft/kube/<KUBE_VERSION>/bin`.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("WEFT_KUBE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(DEFAULT_KUBE_ROOT).join(KUBE_VERSION).join("bin"))
}

/// The path of Kubernetes program `name` (`kube-apiserver`, `kubectl`, `helm`, …).
///
/// # Errors
/// [`Error::Missing`] naming the program, the directory and how to install it.
pub fn program(name: &str) -> Result<PathBuf, Error> {
    let dir = bin_dir();
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Missing {
            program: name.to_owned(),
            dir: dir.display().to_string(),
        })
    }
}

/// Files of the control plane, under `<state dir>/kube`.
#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    /// The control plane's files of cluster `layout`.
    pub fn new(layout: &Layout) -> Self {
        Paths {
            root: layout.state_dir().join("kube"),
        }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Keys and certificates.
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_cert(&self) -> PathBuf {
        self.pki().join("ca.crt")
    }

    /// A component's log.
    pub fn log(&self, program: &str) -> PathBuf {
        self.root.join(format!("{program}.log"))
    }

    /// A kubeconfig by name (`admin`, `admin-in-cluster`, `controller-manager`, `scheduler`).
    pub fn kubeconfig(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.kubeconfig"))
    }

    /// Node `node`'s kubelet API serving certificate and key.
    pub fn kubelet_serving(&self, node: u8) -> (PathBuf, PathBuf) {
        let base = format!("kubelet-{}-serving", layout::node_name(node));
        (
            self.pki().join(format!("{base}.crt")),
            self.pki().join(format!("{base}.key")),
        )
    }

    /// The loopback port of the host-side apiserver forwarder, once it listens.
    pub fn proxy_port_file(&self) -> PathBuf {
        self.root.join("apiserver-proxy.port")
    }
}

/// The cluster CA: signs the apiserver's serving certificate and every client certificate.
struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn base_params(common_name: &str, organizations: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for org in organizations {
        dn.push(DnType::OrganizationName, *org);
    }
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + CERT_TTL;
    params
}

impl Ca {
    fn generate() -> Result<Ca, Error> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(pki_err("CA key"))?;
        let mut params = base_params("weft-kubernetes-ca", &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(pki_err("CA certificate"))?;
        let cert_pem = cert.pem();
        let issuer = Issuer::new(params, key);
        Ok(Ca { cert_pem, issuer })
    }

    /// A certificate for `common_name` in `organizations` (Kubernetes reads them as user and
    /// groups), for client or server use; returns (certificate PEM, key PEM).
    fn issue(
        &self,
        common_name: &str,
        organizations: &[&str],
        server_names: Option<(&[&str], &[IpAddr])>,
    ) -> Result<(String, String), Error> {
        let what = format!("certificate of {common_name}");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(pki_err(&what))?;
        let mut params = base_params(common_name, organizations);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        match server_names {
            Some((dns, ips)) => {
                for name in dns {
                    let name = Ia5String::try_from(*name).map_err(pki_err(&what))?;
                    params.subject_alt_names.push(SanType::DnsName(name));
                }
                for ip in ips {
                    params.subject_alt_names.push(SanType::IpAddress(*ip));
                }
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
            None => params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(pki_err(&what))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("writing {}", path.display())))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(io(format!("writing {}", path.display())))
}

/// A kubeconfig with everything inline (CA, client certificate and key).
pub fn kubeconfig_text(
    server: &str,
    ca_pem: &str,
    user: &str,
    cert_pem: &str,
    key_pem: &str,
) -> String {
    use std::fmt::Write;
    let b64 = |s: &str| base64_encode(s.as_bytes());
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "weft", "cluster": {
            "server": server,
            "certificate-authority-data": b64(ca_pem),
        }}],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(cert_pem),
            "client-key-data": b64(key_pem),
        }}],
        "contexts": [{"name": "weft", "context": {"cluster": "weft", "user": user}}],
        "current-context": "weft",
    });
    let mut text = String::new();
    let _ = write!(text, "{}", serde_yaml::to_string(&doc).unwrap_or_default());
    text
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The identities of the control plane's own clients: (kubeconfig name, user, groups).
const CLIENTS: [(&str, &str, &[&str]); 4] = [
    ("admin-in-cluster", "weft-admin", &["system:masters"]),
    ("controller-manager", "system:kube-controller-manager", &[]),
    ("scheduler", "system:kube-scheduler", &[]),
    // Bound to ClusterRole system:node-proxier by the apiserver's bootstrap policy.
    ("kube-proxy", "system:kube-proxy", &[]),
];

/// kube-proxy's command line on node `node`: iptables mode in the node's namespace, named as
/// its Node; conntrack limits left as the kernel has them (a network namespace cannot set
/// them); metrics and health on the node's loopback.
pub fn kube_proxy_args(paths: &Paths, node: u8) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", paths.kubeconfig("kube-proxy").display()),
        format!("--hostname-override={}", layout::node_name(node)),
        "--proxy-mode=iptables".into(),
        format!("--cluster-cidr={CLUSTER_CIDR}"),
        "--conntrack-max-per-core=0".into(),
        "--conntrack-tcp-timeout-established=0".into(),
        "--conntrack-tcp-timeout-close-wait=0".into(),
        "--metrics-bind-address=127.0.0.1:10249".into(),
        "--healthz-bind-address=127.0.0.1:10256".into(),
        "--v=1".into(),
    ]
}

/// The kubeconfig name of node `node`'s kubelet (user `system:node:<node>`, group
/// `system:nodes`, as the Node authorizer expects).
pub fn kubelet_kubeconfig_name(node: u8) -> String {
    format!("kubelet-{}", layout::node_name(node))
}

/// Creates the control plane's keys, certificates and kubeconfigs (in-cluster server
/// `https://<control-plane IP>:6443`), one for each of `nodes` kubelets among them.
///
/// # Errors
/// [`Error::Pki`] or [`Error::Io`].
pub fn create_pki(paths: &Paths, nodes: u8) -> Result<(), Error> {
    let pki = paths.pki();
    std::fs::create_dir_all(&pki).map_err(io(format!("creating {}", pki.display())))?;
    let ca = Ca::generate()?;
    std::fs::write(paths.ca_cert(), &ca.cert_pem)
        .map_err(io(format!("writing {}", paths.ca_cert().display())))?;
    let cp_ip = IpAddr::V4(layout::control_plane_ip());
    let dns = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
    ];
    let ips = [
        cp_ip,
        IpAddr::V4(KUBERNETES_SERVICE_IP),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    ];
    let (cert, key) = ca.issue("kube-apiserver", &[], Some((&dns, &ips)))?;
    std::fs::write(pki.join("apiserver.crt"), cert).map_err(io("writing apiserver.crt"))?;
    write_private(&pki.join("apiserver.key"), &key)?;
    // The apiserver's client identity towards kubelets (exec, logs).
    let (cert, key) = ca.issue("kube-apiserver-kubelet-client", &["system:masters"], None)?;
    std::fs::write(pki.join("apiserver-kubelet-client.crt"), cert)
        .map_err(io("writing apiserver-kubelet-client.crt"))?;
    write_private(&pki.join("apiserver-kubelet-client.key"), &key)?;
    // ServiceAccount tokens are signed with this key (ES256) and checked with it.
    let sa = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(pki_err("service-account signing key"))?;
    write_private(&pki.join("sa.key"), &sa.serialize_pem())?;
    // The apiserver verifies tokens with the public half (it reads no PKCS#8 private key there).
    let sa_pub = pki.join("sa.pub");
    std::fs::write(&sa_pub, sa.public_key_pem())
        .map_err(io(format!("writing {}", sa_pub.display())))?;
    let server = format!("https://{cp_ip}:{APISERVER_PORT}");
    for (name, user, groups) in CLIENTS {
        let (cert, key) = ca.issue(user, groups, None)?;
        write_private(
            &paths.kubeconfig(name),
            &kubeconfig_text(&server, &ca.cert_pem, user, &cert, &key),
        )?;
    }
    for node in 1..=nodes {
        let user = format!("system:node:{}", layout::node_name(node));
        // The kubelet API's serving certificate (the apiserver checks the node's IP in it).
        let name = layout::node_name(node);
        let ip = IpAddr::V4(layout::node_ip(node));
        let (cert, key) = ca.issue(&user, &["system:nodes"], Some((&[name.as_str()], &[ip])))?;
        let (cert_path, key_path) = paths.kubelet_serving(node);
        std::fs::write(&cert_path, cert).map_err(io(format!("writing {}", cert_path.display())))?;
        write_private(&key_path, &key)?;
        let (cert, key) = ca.issue(&user, &["system:nodes"], None)?;
        write_private(
            &paths.kubeconfig(&kubelet_kubeconfig_name(node)),
            &kubeconfig_text(&server, &ca.cert_pem, &user, &cert, &key),
        )?;
    }
    // The host-side admin kubeconfig is written once the forwarder listens (its port).
    let (cert, key) = ca.issue("weft-admin", &["system:masters"], None)?;
    write_private(&pki.join("admin.crt"), &cert)?;
    write_private(&pki.join("admin.key"), &key)?;
    Ok(())
}

/// Writes `admin.kubeconfig` for the host: server `https://127.0.0.1:<port>` (the forwarder).
///
/// # Errors
/// [`Error::Io`].
pub fn write_admin_kubeconfig(paths: &Paths, port: u16) -> Result<PathBuf, Error> {
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).map_err(io(format!("reading {}", p.display())));
    let ca = read(paths.ca_cert())?;
    let cert = read(paths.pki().join("admin.crt"))?;
    let key = read(paths.pki().join("admin.key"))?;
    let path = paths.kubeconfig("admin");
    write_private(
        &path,
        &kubeconfig_text(
            &format!("https://127.0.0.1:{port}"),
            &ca,
            "weft-admin",
            &cert,
            &key,
        ),
    )?;
    Ok(path)
}

/// The command line of each control-plane program.
pub fn args(program: &str, paths: &Paths) -> Vec<String> {
    let pki = paths.pki();
    let p = |name: &str| pki.join(name).display().to_string();
    let kc = |name: &str| paths.kubeconfig(name).display().to_string();
    let cp_ip = layout::control_plane_ip();
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    match program {
        "etcd" => vec![
            "--name".into(),
            "weft".into(),
            "--data-dir".into(),
            paths.root().join("etcd").display().to_string(),
            "--listen-client-urls".into(),
            format!("http://127.0.0.1:{ETCD_CLIENT_PORT}"),
            "--advertise-client-urls".into(),
            format!("http://127.0.0.1:{ETCD_CLIENT_PORT}"),
            "--listen-peer-urls".into(),
            format!("http://127.0.0.1:{ETCD_PEER_PORT}"),
            "--log-level".into(),
            "warn".into(),
        ],
        "kube-apiserver" => {
            let mut a = vec![
                format!("--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}"),
                "--bind-address=0.0.0.0".into(),
                format!("--secure-port={APISERVER_PORT}"),
                format!("--advertise-address={cp_ip}"),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!(
                    "--kubelet-client-certificate={}",
                    p("apiserver-kubelet-client.crt")
                ),
                format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
                format!("--kubelet-certificate-authority={}", p("ca.crt")),
                // Node names do not resolve in the sealed cluster: dial kubelets by IP.
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                format!(
                    "--service-cluster-ip-range={}/{}",
                    layout::SERVICE_NETWORK.0,
                    layout::SERVICE_NETWORK.1
                ),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                "--v=0".into(),
            ];
            a.extend(strings(&["--endpoint-reconciler-type=lease"]));
            a
        }
        "kube-controller-manager" => vec![
            format!("--kubeconfig={}", kc("controller-manager")),
            format!("--authentication-kubeconfig={}", kc("controller-manager")),
            format!("--authorization-kubeconfig={}", kc("controller-manager")),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!(
                "--service-cluster-ip-range={}/{}",
                layout::SERVICE_NETWORK.0,
                layout::SERVICE_NETWORK.1
            ),
            // Pod CIDRs are fixed per node (10.244.<n>.0/24), set by the kubelet when it
            // registers its Node: no node IPAM here, and no cloud.
            "--allocate-node-cidrs=false".into(),
            "--controllers=*,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller"
                .into(),
            "--profiling=false".into(),
        ],
        "kube-scheduler" => vec![
            format!("--kubeconfig={}", kc("scheduler")),
            format!("--authentication-kubeconfig={}", kc("scheduler")),
            format!("--authorization-kubeconfig={}", kc("scheduler")),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--profiling=false".into(),
        ],
        _ => Vec::new(),
    }
}

/// Starts the control plane in `layout`'s control-plane netns (after [`create_pki`]) and waits
/// until the apiserver answers `/readyz` with `ok`; returns how long that took.
///
/// # Errors
/// [`Error::Missing`] before anything starts if a program is not installed; [`Error::NotReady`]
/// with the end of its log if one exits or the apiserver is not ready in time.
pub fn start(layout: &Layout) -> Result<Duration, Error> {
    let programs = PROGRAMS
        .iter()
        .map(|name| program(name).map(|path| (*name, path)))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    for (name, path) in programs {
        start_one(layout, name, &path)?;
    }
    Ok(started.elapsed())
}

/// Stops control-plane program `name` (SIGTERM; SIGKILL after 15 s) and starts it again with
/// the same arguments, waiting until it is ready as [`start`] does — what an upgrade or a crash
/// of, e.g., the apiserver looks like to the cluster. Returns how long it was away.
///
/// # Errors
/// [`Error::NotReady`] when it does not come back; [`Error::Missing`] for an unknown program.
pub fn restart(layout: &Layout, name: &str) -> Result<Duration, Error> {
    let path = program(name)?;
    let stopped = Instant::now();
    // By the program's name in argv[0] (the exe link may read differently inside a chroot).
    let is_it = |pid: i32| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        Path::new(std::str::from_utf8(argv0).unwrap_or_default())
            .file_name()
            .is_some_and(|f| f == name)
    };
    let pids: Vec<i32> = netns::pids(&layout.control_plane_netns())
        .into_iter()
        .filter(|pid| is_it(*pid))
        .collect();
    if pids.is_empty() {
        return Err(Error::NotReady {
            program: name.to_owned(),
            detail: "no running process of it in the control-plane namespace to restart".into(),
        });
    }
    for pid in pids {
        {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while process_alive(pid.as_raw()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    start_one(layout, name, &path)?;
    Ok(stopped.elapsed())
}

/// Starts one control-plane program in the control-plane netns and waits until it is ready.
fn start_one(layout: &Layout, name: &str, path: &Path) -> Result<(), Error> {
    let paths = Paths::new(layout);
    let kubectl = program("kubectl")?;
    let netns_name = layout.control_plane_netns();
    {
        let log_path = paths.log(name);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("creating {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io(format!("creating {}", log_path.display())))?;
        let mut cmd = netns::command_in(&netns_name, path);
        cmd.args(args(name, &paths))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", path.display())))?;
        let pid = child.id() as i32;
        let not_ready = |detail: String| Error::NotReady {
            program: name.to_owned(),
            detail,
        };
        let tail = || {
            let text = std::fs::read_to_string(paths.log(name)).unwrap_or_default();
            text.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        };
        match name {
            "etcd" => wait_listening(&netns_name, (Ipv4Addr::LOCALHOST, ETCD_CLIENT_PORT), pid)
                .map_err(|()| not_ready(tail()))?,
            "kube-apiserver" => {
                let deadline = Instant::now() + READY_TIMEOUT;
                loop {
                    let out = netns::command_in(&netns_name, &kubectl)
                        .arg("--kubeconfig")
                        .arg(paths.kubeconfig("admin-in-cluster"))
                        .args(["get", "--raw", "/readyz"])
                        .stderr(Stdio::null())
                        .output()
                        .map_err(io("running kubectl get --raw /readyz"))?;
                    if out.status.success() && out.stdout.trim_ascii() == b"ok" {
                        break;
                    }
                    if !process_alive(pid) {
                        return Err(not_ready(format!("exited: {}", tail())));
                    }
                    if Instant::now() > deadline {
                        return Err(not_ready(format!(
                            "no /readyz ok in {READY_TIMEOUT:?}: {}",
                            tail()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            _ => {
                std::thread::sleep(Duration::from_millis(100));
                if !process_alive(pid) {
                    return Err(not_ready(format!("exited: {}", tail())));
                }
            }
        }
    }
    Ok(())
}

fn wait_listening(netns_name: &str, addr: (Ipv4Addr, u16), pid: i32) -> Result<(), ()> {
    let addr = SocketAddr::from(addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && process_alive(pid) {
        let up = netns::within(netns_name, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
        .unwrap_or(false);
        if up {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(())
}

/// The cluster add-ons `weft cluster up --kubernetes` installs, as kubeadm does: CoreDNS behind
/// the `kube-dns` Service.
pub const ADDONS: &str = include_str!("addons/coredns.yaml");

/// Applies [`ADDONS`] (server-side, so a second `up` of the same API changes nothing).
///
/// # Errors
/// [`Error::Addons`] with kubectl's message.
pub fn apply_addons(layout: &Layout) -> Result<(), Error> {
    let mut cmd = kubectl_in(layout)?;
    cmd.args([
        "apply",
        "--server-side",
        "--field-manager=weft-cluster",
        "-f",
        "-",
    ]);
    netns::run(&mut cmd, Some(ADDONS.as_bytes()))
        .map(drop)
        .map_err(|e| Error::Addons(e.to_string()))
}

/// Runs `kubectl` with the admin kubeconfig inside the control-plane netns (no forwarder
/// needed): the tests' and `weft cluster` verbs' way to the API.
pub fn kubectl_in(layout: &Layout) -> Result<Command, Error> {
    let mut cmd = netns::command_in(&layout.control_plane_netns(), program("kubectl")?);
    cmd.arg("--kubeconfig")
        .arg(Paths::new(layout).kubeconfig("admin-in-cluster"));
    Ok(cmd)
}

/// The host-side forwarder behind `admin.kubeconfig`: accepts on `127.0.0.1:<any port>` in the
/// host netns, writes the port to [`Paths::proxy_port_file`], and splices each connection to
/// the apiserver in the control-plane netns. Runs until the process is killed.
///
/// # Errors
/// [`Error::Io`] if it cannot listen or write the port file.
pub async fn run_apiserver_proxy(layout: &Layout) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(io("listening on 127.0.0.1"))?;
    let port = listener
        .local_addr()
        .map_err(io("reading the local port"))?
        .port();
    let paths = Paths::new(layout);
    write_admin_kubeconfig(&paths, port)?;
    let tmp = paths.proxy_port_file().with_extension("tmp");
    std::fs::write(&tmp, port.to_string()).map_err(io("writing the proxy port"))?;
    std::fs::rename(&tmp, paths.proxy_port_file()).map_err(io("writing the proxy port"))?;
    let netns_name = layout.control_plane_netns();
    let upstream = SocketAddr::from((layout::control_plane_ip(), APISERVER_PORT));
    loop {
        let (mut client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let netns_name = netns_name.clone();
        tokio::spawn(async move {
            // The socket is made in the control-plane netns (by a thread that entered it).
            let connected = tokio::task::spawn_blocking(move || {
                netns::within(&netns_name, move || {
                    std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
                })
            })
            .await;
            let server = match connected {
                Ok(Ok(Ok(stream))) => stream,
                other => {
                    tracing::warn!(%peer, result = ?other.map(|r| r.map(|r| r.map(|_| ()))), "connecting to the apiserver failed");
                    return;
                }
            };
            if server.set_nonblocking(true).is_err() {
                return;
            }
            let Ok(mut server) = tokio::net::TcpStream::from_std(server) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_one_build_kube_builds() {
        let go_mod = include_str!("../../kube/go.mod");
        let pinned = go_mod
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some("k8s.io/kubernetes"))
                    .then(|| words.next())
                    .flatten()
            })
            .find(|v| v.starts_with("v1."));
        assert_eq!(pinned, Some(KUBE_VERSION));
    }

    #[test]
    fn client_certificates_carry_user_and_groups_and_serving_names() {
        let ca = Ca::generate().expect("ca");
        let (cert, _key) = ca
            .issue("weft-admin", &["system:masters"], None)
            .expect("client");
        let der = pem::parse(&cert).expect("pem");
        let (_, parsed) = x509_parser::parse_x509_certificate(der.contents()).expect("x509");
        let subject = parsed.subject().to_string();
        assert!(subject.contains("CN=weft-admin"), "{subject}");
        assert!(subject.contains("O=system:masters"), "{subject}");
        let (cert, _key) = ca
            .issue(
                "kube-apiserver",
                &[],
                Some((
                    &["kubernetes.default.svc"],
                    &[IpAddr::V4(KUBERNETES_SERVICE_IP)],
                )),
            )
            .expect("server");
        let der = pem::parse(&cert).expect("pem");
        let (_, parsed) = x509_parser::parse_x509_certificate(der.contents()).expect("x509");
        let sans = parsed
            .subject_alternative_name()
            .expect("ext")
            .expect("san")
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>();
        assert!(
            sans.iter().any(|s| s.contains("kubernetes.default.svc")),
            "{sans:?}"
        );
        let ip_sans = parsed
            .subject_alternative_name()
            .expect("ext")
            .expect("san")
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::IPAddress(b) => Some(b.to_vec()),
                _ => None,
            })
            .collect::<Vec<_>>();
        assert_eq!(
            ip_sans,
            [KUBERNETES_SERVICE_IP.octets().to_vec()],
            "{sans:?}"
        );
    }

    #[test]
    fn a_missing_program_names_the_directory_and_the_fix() {
        let err = Error::Missing {
            program: "kube-apiserver".into(),
            dir: "/nowhere".into(),
        };
        let text = err.to_string();
        assert!(
            text.contains("kube-apiserver not found in /nowhere"),
            "{text}"
        );
        assert!(text.contains("scripts/install-deps"), "{text}");
    }

    #[test]
    fn the_apiserver_authorizes_with_node_and_rbac_on_the_service_range() {
        let layout = Layout::new("t", Some(Path::new("/tmp/weft-kube-args"))).expect("layout");
        let a = args("kube-apiserver", &Paths::new(&layout));
        assert!(
            a.contains(&"--authorization-mode=Node,RBAC".to_owned()),
            "{a:?}"
        );
        assert!(
            a.contains(&"--service-cluster-ip-range=10.96.0.0/16".to_owned()),
            "{a:?}"
        );
        assert!(
            a.iter()
                .any(|x| x.starts_with("--service-account-signing-key-file="))
        );
    }
}
