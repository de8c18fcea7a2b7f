//! `weft-cni`: the chained CNI plugin binary the container runtime runs for each pod sandbox.
//!
//! Thin shell over [`weft_cni::plugin`]: reads the `CNI_*` environment and the network config on
//! stdin, runs the command against the node agent's unix socket, writes the result (or the CNI
//! Error result) to stdout and exits 0 (or 1). stdout carries only CNI JSON; logs go to stderr, or
//! to the config's `log_file`.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use weft_cni::plugin::{self, Env, Error, Failure, UnixClient};

fn main() -> ExitCode {
    let env = Env::from_vars(std::env::vars_os());
    // Without CNI_COMMAND nothing needs the config; not reading stdin keeps a bare invocation from
    // a terminal from blocking before it reports the missing variable.
    let stdin = if env.has_command() {
        let mut buf = Vec::new();
        if let Err(e) = io::stdin().lock().read_to_end(&mut buf) {
            init_logging(None);
            return fail(&Failure::latest(Error::ReadStdin(e)));
        }
        buf
    } else {
        Vec::new()
    };

    let invocation = match plugin::parse(&env, &stdin) {
        Ok(invocation) => invocation,
        Err(failure) => {
            init_logging(None);
            return fail(&failure);
        }
    };
    init_logging(invocation.config().and_then(|c| c.log_file.as_deref()));
    let attachment = invocation.attachment();
    let pod = attachment.and_then(|a| a.pod.as_ref());
    tracing::info!(
        cni.command = invocation.command().as_str(),
        container.id = attachment.map(|a| a.container_id.as_str()),
        pod.namespace = pod.map(|p| p.namespace.as_str()),
        pod.name = pod.map(|p| p.name.as_str()),
        "invoked"
    );
    tracing::debug!(config = ?invocation.config(), "config");

    match invocation.execute(UnixClient::from_config) {
        Ok(output) => match output.write_to(io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "cannot write the result to stdout");
                ExitCode::FAILURE
            }
        },
        Err(failure) => fail(&failure),
    }
}

/// Logs the failure, prints its CNI Error result on stdout, and returns exit status 1.
fn fail(failure: &Failure) -> ExitCode {
    tracing::error!(cni.code = failure.error.code(), error = %failure.error.chain(), "failed");
    if let Err(e) = failure.write_to(io::stdout().lock()) {
        tracing::error!(error = %e, "cannot write the error result to stdout");
    }
    ExitCode::FAILURE
}

/// Sends logs to `log_file` (appended) when set and openable, else to stderr. Never stdout.
fn init_logging(log_file: Option<&Path>) {
    let mut open_error = None;
    let writer = match log_file.map(|path| OpenOptions::new().create(true).append(true).open(path))
    {
        Some(Ok(file)) => BoxMakeWriter::new(Mutex::new(file)),
        Some(Err(e)) => {
            open_error = Some(e);
            BoxMakeWriter::new(io::stderr)
        }
        None => BoxMakeWriter::new(io::stderr),
    };
    let installed = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .try_init()
        .is_ok();
    if let (true, Some(e), Some(path)) = (installed, open_error, log_file) {
        tracing::warn!(log_file = %path.display(), error = %e, "cannot open log_file; logging to stderr");
    }
}
