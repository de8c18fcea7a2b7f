//! Installer mode (istio-ambient reference §4.1): the node agent puts the `weft-cni` plugin on
//! the node and chains it into the primary CNI's configuration, then keeps it there.
//!
//! * The binary is copied into the CNI bin dir atomically (temp file in the same directory,
//!   mode 0755, rename), so the runtime never executes a half-written plugin.
//! * The primary config is the first file, in lexical order, of the conf dir whose name ends
//!   `.conflist` or `.conf` (the file the runtime itself picks). Our entry
//!   `{"type": "weft-cni", …}` is appended to its `plugins` once; every other key and the
//!   order of the other plugins are kept (JSON key order inside objects is not: serde_json
//!   writes keys sorted, which carries no meaning). A single-plugin `.conf` is turned into a
//!   `.conflist` of the same stem holding that plugin then ours, and the `.conf` is removed, as
//!   chained installers do. Files are written atomically (temp file, rename).
//! * A file that is not a valid CNI config is never written; the error names the file and what
//!   is wrong. No config file yet (the primary CNI has not started) is a wait, not an error.
//! * [`run`] polls (2 s by default) and repairs a removed binary, a removed entry, or a file
//!   the primary CNI rewrote; on exit it can take our entry out again ([`uninstall`]). The
//!   binary is left in place on uninstall: a runtime tearing down a pod set up with the old
//!   config may still call it.
//!
//! Decisions are pure ([`with_entry`], [`without_entry`], [`primary_config`] over names);
//! [`install_once`] and [`run`] are the I/O around them.

use std::fs::OpenOptions;
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};
use tracing::{info, warn};

/// The plugin's `type` (and binary name).
pub const PLUGIN_TYPE: &str = "weft-cni";

/// Default poll interval of [`run`]: 2 s.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// Installer settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The CNI bin dir the runtime executes plugins from (e.g. `/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The CNI conf dir the runtime reads (e.g. `/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The plugin binary to install (by default `weft-cni` beside the agent's executable).
    pub plugin_binary: PathBuf,
    /// Our plugin entry's keys besides `type` (e.g. `agent_socket`, `log_file`).
    pub entry: Map<String, Value>,
    /// How often [`run`] checks the files, default [`DEFAULT_POLL`].
    pub poll: Duration,
    /// Remove our entry when [`run`] ends.
    pub uninstall_on_exit: bool,
}

/// Installer errors; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CNI config file is not a valid config; it is left untouched.
    #[error("CNI config {path} is malformed (left untouched): {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the JSON location when there is one.
        reason: String,
    },
    /// A file or directory could not be read, written or renamed.
    #[error("{action} {path}")]
    Io {
        /// What was being done (`reading`, `writing`, `listing`, …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What [`install_config`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The conf dir has no `.conflist`/`.conf` yet (or does not exist).
    Waiting,
    /// The primary config already chains our entry.
    Unchanged(PathBuf),
    /// Our entry was added or updated in this file (a `.conf` source was converted and removed).
    Written(PathBuf),
}

/// The primary config among `names` (file names): the first, lexically, ending `.conflist` or
/// `.conf`; hidden files (our temp files) are ignored.
pub fn primary_config<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names
        .into_iter()
        .filter(|n| !n.starts_with('.') && (n.ends_with(".conflist") || n.ends_with(".conf")))
        .min()
}

fn malformed(path: &Path, reason: impl Into<String>) -> Error {
    Error::Malformed {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Parses a config file's text as a conflist: a `.conflist`, a `.conf` that already holds a
/// `plugins` list, or a single-plugin `.conf` wrapped as `{cniVersion, name, plugins: [it]}`.
fn as_conflist(path: &Path, text: &str) -> Result<Map<String, Value>, Error> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| malformed(path, format!("not JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(malformed(path, "the top level is not a JSON object"));
    };
    let is_list =
        path.extension().is_some_and(|e| e == "conflist") || object.contains_key("plugins");
    if !is_list {
        if !object.get("type").is_some_and(Value::is_string) {
            return Err(malformed(
                path,
                "a single-plugin .conf needs a string \"type\"",
            ));
        }
        let mut list = Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(value) = object.get(key) {
                list.insert(key.to_owned(), value.clone());
            }
        }
        list.insert("plugins".into(), Value::Array(vec![Value::Object(object)]));
        return Ok(list);
    }
    let Some(plugins) = object.get("plugins") else {
        return Err(malformed(path, "no \"plugins\" list"));
    };
    let Value::Array(plugins) = plugins else {
        return Err(malformed(path, "\"plugins\" is not a list"));
    };
    for (i, plugin) in plugins.iter().enumerate() {
        let Value::Object(plugin) = plugin else {
            return Err(malformed(path, format!("plugins[{i}] is not an object")));
        };
        if !plugin.get("type").is_some_and(Value::is_string) {
            return Err(malformed(
                path,
                format!("plugins[{i}] has no string \"type\""),
            ));
        }
    }
    Ok(object)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// The conflist `text` (from `path`) with our `entry` chained: `Ok(None)` when it already holds
/// exactly that entry (nothing to write). An entry of ours with other values is replaced in
/// place; extra copies are dropped; otherwise the entry is appended after the other plugins.
///
/// # Errors
/// [`Error::Malformed`] naming `path` and the problem.
pub fn with_entry(
    path: &Path,
    text: &str,
    entry: &Map<String, Value>,
) -> Result<Option<Value>, Error> {
    let converted = path.extension().is_some_and(|e| e == "conf");
    let mut list = as_conflist(path, text)?;
    let mut ours = entry.clone();
    ours.insert("type".into(), Value::String(PLUGIN_TYPE.into()));
    let ours = Value::Object(ours);
    let Some(Value::Array(plugins)) = list.get_mut("plugins") else {
        return Err(malformed(path, "no \"plugins\" list"));
    };
    let mut found = false;
    let before = plugins.clone();
    let mut kept = Vec::with_capacity(plugins.len() + 1);
    for plugin in plugins.drain(..) {
        if is_ours(&plugin) {
            if !found {
                kept.push(ours.clone());
                found = true;
            }
        } else {
            kept.push(plugin);
        }
    }
    if !found {
        kept.push(ours);
    }
    if kept == before && !converted {
        return Ok(None);
    }
    *plugins = kept;
    Ok(Some(Value::Object(list)))
}

/// The conflist `text` (from `path`) without our entry: `Ok(None)` when it has none.
///
/// # Errors
/// [`Error::Malformed`] naming `path` and the problem.
pub fn without_entry(path: &Path, text: &str) -> Result<Option<Value>, Error> {
    let mut list = as_conflist(path, text)?;
    let Some(Value::Array(plugins)) = list.get_mut("plugins") else {
        return Err(malformed(path, "no \"plugins\" list"));
    };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(None);
    }
    Ok(Some(Value::Object(list)))
}

/// Writes `bytes` to `path` through a hidden temp file in the same directory (mode `mode`,
/// fsynced) and a rename.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.weft-tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_error("creating", &tmp))?;
        file.write_all(bytes).map_err(io_error("writing", &tmp))?;
        // The umask may have narrowed the mode given at creation.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_error("setting the mode of", &tmp))?;
        file.sync_all().map_err(io_error("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_error("renaming a temp file to", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn render(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

fn primary_in(conf_dir: &Path) -> Result<Option<PathBuf>, Error> {
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("listing", conf_dir)(e)),
    };
    let names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    Ok(primary_config(names.iter().map(String::as_str)).map(|n| conf_dir.join(n)))
}

/// Chains our entry into the primary config of `conf_dir` (see the module docs).
///
/// # Errors
/// [`Error::Malformed`] for an invalid primary config (not written), [`Error::Io`] when the
/// directory cannot be listed or the file read or written.
pub fn install_config(conf_dir: &Path, entry: &Map<String, Value>) -> Result<Outcome, Error> {
    let Some(path) = primary_in(conf_dir)? else {
        return Ok(Outcome::Waiting);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        // Replaced between listing and reading: look again next time.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Waiting),
        Err(e) => return Err(io_error("reading", &path)(e)),
    };
    let Some(list) = with_entry(&path, &text, entry)? else {
        return Ok(Outcome::Unchanged(path));
    };
    if path.extension().is_some_and(|e| e == "conf") {
        let target = path.with_extension("conflist");
        write_atomic(&target, &render(&list), 0o644)?;
        std::fs::remove_file(&path).map_err(io_error("removing the converted", &path))?;
        return Ok(Outcome::Written(target));
    }
    write_atomic(&path, &render(&list), 0o644)?;
    Ok(Outcome::Written(path))
}

/// Removes our entry from the primary config of `conf_dir`; returns the file changed, if any.
///
/// # Errors
/// As [`install_config`].
pub fn uninstall(conf_dir: &Path) -> Result<Option<PathBuf>, Error> {
    let Some(path) = primary_in(conf_dir)? else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(io_error("reading", &path))?;
    let Some(list) = without_entry(&path, &text)? else {
        return Ok(None);
    };
    write_atomic(&path, &render(&list), 0o644)?;
    Ok(Some(path))
}

/// The installed binary, as last written or verified: (device, inode, length).
pub type Installed = Option<(u64, u64, u64)>;

/// Makes `<bin_dir>/weft-cni` a copy of `from` (mode 0755), unless `installed` says it already
/// is (same file as last time) or its bytes already match; returns the new [`Installed`] and
/// whether a copy was made.
///
/// # Errors
/// [`Error::Io`] naming the source or target.
pub fn install_binary(
    from: &Path,
    bin_dir: &Path,
    installed: Installed,
) -> Result<(Installed, bool), Error> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let stamp = |m: &std::fs::Metadata| Some((m.dev(), m.ino(), m.len()));
    if let Ok(meta) = std::fs::metadata(&target) {
        if installed.is_some() && stamp(&meta) == installed {
            return Ok((installed, false));
        }
        let source = std::fs::read(from).map_err(io_error("reading the plugin binary", from))?;
        if meta.len() == source.len() as u64
            && std::fs::read(&target).is_ok_and(|b| b == source)
            && meta.permissions().mode() & 0o777 == 0o755
        {
            return Ok((stamp(&meta), false));
        }
    }
    std::fs::create_dir_all(bin_dir).map_err(io_error("creating", bin_dir))?;
    let source = std::fs::read(from).map_err(io_error("reading the plugin binary", from))?;
    write_atomic(&target, &source, 0o755)?;
    let meta = std::fs::metadata(&target).map_err(io_error("checking", &target))?;
    Ok((stamp(&meta), true))
}

/// One pass: the binary, then the config.
///
/// # Errors
/// The first [`Error`] met.
pub fn install_once(config: &Config, installed: &mut Installed) -> Result<Outcome, Error> {
    let (now, copied) = install_binary(&config.plugin_binary, &config.bin_dir, *installed)?;
    *installed = now;
    if copied {
        info!(path = %config.bin_dir.join(PLUGIN_TYPE).display(), "plugin binary installed");
    }
    install_config(&config.conf_dir, &config.entry)
}

/// Installs, then checks every `config.poll` and repairs, until `shutdown` completes; then
/// removes our entry when `config.uninstall_on_exit`. Each distinct problem (malformed file,
/// unwritable dir, still waiting for the primary config) is logged once, not every poll.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut installed: Installed = None;
    let mut last = String::new();
    loop {
        let state = match install_once(&config, &mut installed) {
            Ok(Outcome::Written(path)) => {
                info!(path = %path.display(), "plugin chained into the CNI config");
                format!("written {}", path.display())
            }
            Ok(Outcome::Unchanged(path)) => format!("in place {}", path.display()),
            Ok(Outcome::Waiting) => {
                let state = "waiting".to_owned();
                if state != last {
                    info!(dir = %config.conf_dir.display(), "no CNI config yet; waiting for the primary CNI");
                }
                state
            }
            Err(err) => {
                let state = err.to_string();
                if state != last {
                    warn!(error = %err, "CNI install failed; retrying");
                }
                state
            }
        };
        last = state;
        tokio::select! {
            () = tokio::time::sleep(config.poll) => {}
            () = &mut shutdown => break,
        }
    }
    if config.uninstall_on_exit {
        match uninstall(&config.conf_dir) {
            Ok(Some(path)) => info!(path = %path.display(), "plugin removed from the CNI config"),
            Ok(None) => {}
            Err(err) => warn!(error = %err, "removing the plugin from the CNI config failed"),
        }
    }
}

#[cfg(test)]
mod tests;
