//! Installing Weft into the local Kubernetes cluster as on any cluster: `helm install` of the
//! project's charts (`charts/`), in the documented order, into `istio-system`. The mesh then
//! runs as pods on the netns kubelets: the controller as a Deployment, ztunnel and the CNI node
//! agent as DaemonSets. Images map to programs: each chart's container `command` names a
//! binary the kubelet finds next to `weft` (see [`super::kubelet`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::kube::{self, Paths};
use super::layout::Layout;
use super::netns;

/// The namespace Weft installs into (Istio ambient's).
pub const NAMESPACE: &str = "istio-system";

/// The releases `weft cluster up --kubernetes` installs, in order: (release, chart).
pub const RELEASES: [(&str, &str); 4] = [
    ("weft-base", "base"),
    ("weft-controller", "controller"),
    ("weft-cni", "cni"),
    ("weft-ztunnel", "ztunnel"),
];

/// How long `helm install --wait` may take per release.
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors of a Helm step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The charts directory is not there.
    #[error(
        "Weft's charts not found at {0} (set WEFT_CHARTS_DIR to the project's charts/ directory)"
    )]
    NoCharts(PathBuf),
    /// helm or kubectl is not installed.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// A helm command failed.
    #[error("helm {what} failed: {message}")]
    Helm {
        /// What was run (`install weft-cni`).
        what: String,
        /// helm's message.
        message: String,
    },
}

/// The charts directory: `$WEFT_CHARTS_DIR`, else the project's `charts/` this binary was
/// built from.
///
/// # Errors
/// [`Error::NoCharts`] when it has no `base` chart.
pub fn charts_dir() -> Result<PathBuf, Error> {
    let dir = std::env::var_os("WEFT_CHARTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts"));
    if dir.join("base").join("Chart.yaml").is_file() {
        Ok(dir.canonicalize().unwrap_or(dir))
    } else {
        Err(Error::NoCharts(dir))
    }
}

/// `helm` with the cluster's in-cluster admin kubeconfig, run in the control-plane namespace
/// (where the apiserver listens; no forwarder needed).
///
/// # Errors
/// [`kube::Error::Missing`] when helm is not installed.
pub fn helm(layout: &Layout) -> Result<Command, Error> {
    let mut cmd = netns::command_in(&layout.control_plane_netns(), kube::program("helm")?);
    cmd.arg("--kubeconfig")
        .arg(Paths::new(layout).kubeconfig("admin-in-cluster"));
    // helm keeps its caches under $HOME; the cluster's own dir keeps them out of the user's.
    let home = Paths::new(layout).root().join("helm");
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    Ok(cmd)
}

/// Runs `helm <args>`, returning stdout.
///
/// # Errors
/// [`Error::Helm`] with helm's message.
pub fn run(layout: &Layout, args: &[&str]) -> Result<String, Error> {
    let mut cmd = helm(layout)?;
    cmd.args(args);
    let what = args
        .iter()
        .take_while(|a| !a.starts_with('-') && !a.contains('/'))
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    netns::run(&mut cmd, None).map_err(|e| Error::Helm {
        what,
        message: match e {
            netns::Error::Failed { stderr, .. } => stderr,
            other => other.to_string(),
        },
    })
}

/// Installs (or upgrades) every release of [`RELEASES`] from `charts`, waiting for each to be
/// ready (`--wait`): when it returns, the controller serves and every node's ztunnel and CNI
/// agent are Ready, so pods created from then on are enrolled.
///
/// # Errors
/// The first failing release's [`Error::Helm`].
pub fn install_weft(layout: &Layout, charts: &Path) -> Result<(), Error> {
    let timeout = format!("{}s", INSTALL_TIMEOUT.as_secs());
    for (release, chart) in RELEASES {
        let chart = charts.join(chart);
        let chart = chart.to_string_lossy();
        run(
            layout,
            &[
                "upgrade",
                "--install",
                release,
                &chart,
                "--namespace",
                NAMESPACE,
                "--create-namespace",
                "--wait",
                "--timeout",
                &timeout,
            ],
        )?;
    }
    Ok(())
}
