//! The CNI invocation environment (CNI spec §2 "Parameters"): `CNI_COMMAND`, the attachment
//! parameters `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, and `CNI_ARGS`.
//!
//! The binary captures the process environment once ([`Env::from_vars`]); everything else reads
//! this value. Validation follows the spec: the container ID must start with an alphanumeric
//! character followed by alphanumerics, `_`, `.` or `-`; the interface name must be non-empty,
//! not `.`/`..`, shorter than 16 bytes and free of `/`, `:` and whitespace. Every bad variable is
//! reported at once (CNI code 4 names them all).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;

use super::Error;

/// `CNI_COMMAND`.
pub const CNI_COMMAND: &str = "CNI_COMMAND";
/// `CNI_CONTAINERID`.
pub const CNI_CONTAINERID: &str = "CNI_CONTAINERID";
/// `CNI_NETNS`.
pub const CNI_NETNS: &str = "CNI_NETNS";
/// `CNI_IFNAME`.
pub const CNI_IFNAME: &str = "CNI_IFNAME";
/// `CNI_ARGS`.
pub const CNI_ARGS: &str = "CNI_ARGS";

/// The operation requested by `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `ADD`: the pod sandbox is being created; weft-cni is chained after the interface plugin.
    Add,
    /// `DEL`: the sandbox is being torn down (idempotent, always succeeds).
    Del,
    /// `CHECK`: the runtime asks whether the attachment is still as expected.
    Check,
    /// `VERSION`: report supported spec versions.
    Version,
    /// `STATUS` (1.1.0): can the plugin service `ADD` right now?
    Status,
    /// `GC` (1.1.0): clean up stale attachments (a no-op for weft-cni).
    Gc,
}

impl Command {
    /// Every command, in the order error messages list them.
    pub const ALL: [Command; 6] = [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Version,
        Command::Status,
        Command::Gc,
    ];

    /// Parses the exact (upper-case) spelling used by `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The `CNI_COMMAND` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// The attachment variables the spec requires for this command (`CNI_COMMAND` aside).
    fn required(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => &[CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME],
            Command::Del => &[CNI_CONTAINERID, CNI_IFNAME],
            Command::Version | Command::Status | Command::Gc => &[],
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem with the environment; several are reported together in [`Error::Env`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvProblem {
    /// The variable is unset or empty.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// The variable is not valid UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// The variable is set but its value breaks the spec's rules.
    #[error("{var} is invalid: {reason}")]
    Invalid {
        /// The variable's name.
        var: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
}

/// The `CNI_*` variables of one invocation, captured once.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `None` values were not valid UTF-8.
    vars: BTreeMap<String, Option<String>>,
}

impl Env {
    /// Captures the `CNI_*` variables from `vars` (typically `std::env::vars_os()`); other
    /// variables are ignored.
    pub fn from_vars<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let vars = vars
            .into_iter()
            .filter_map(|(k, v)| {
                let key = k.into().into_string().ok()?;
                key.starts_with("CNI_")
                    .then(|| (key, v.into().into_string().ok()))
            })
            .collect();
        Env { vars }
    }

    /// Whether `CNI_COMMAND` is set at all (the binary only reads stdin when it is, so a bare
    /// invocation from a terminal does not block).
    pub fn has_command(&self) -> bool {
        self.vars.contains_key(CNI_COMMAND)
    }

    /// The value of `name`: `Ok(None)` when unset or empty.
    fn get(&self, name: &'static str) -> Result<Option<&str>, EnvProblem> {
        match self.vars.get(name) {
            None => Ok(None),
            Some(None) => Err(EnvProblem::NotUtf8(name)),
            Some(Some(v)) if v.is_empty() => Ok(None),
            Some(Some(v)) => Ok(Some(v)),
        }
    }

    /// Parses `CNI_COMMAND`. Errors: [`Error::Env`] when unset/not UTF-8,
    /// [`Error::UnknownCommand`] for any other spelling (both CNI code 4).
    pub fn command(&self) -> Result<Command, Error> {
        match self.get(CNI_COMMAND) {
            Err(problem) => Err(Error::Env(vec![problem])),
            Ok(None) => Err(Error::Env(vec![EnvProblem::Missing(CNI_COMMAND)])),
            Ok(Some(s)) => Command::parse(s).ok_or_else(|| Error::UnknownCommand(s.to_owned())),
        }
    }

    /// Validates the attachment parameters `command` requires (ADD/CHECK: container ID, netns,
    /// ifname; DEL: container ID, ifname) and parses `CNI_ARGS`. Returns `None` for commands
    /// without an attachment (VERSION, STATUS, GC). Errors: [`Error::Env`] listing every problem.
    pub fn attachment(&self, command: Command) -> Result<Option<Attachment>, Error> {
        let required = command.required();
        if required.is_empty() {
            return Ok(None);
        }
        let mut problems = Vec::new();
        let value = |name: &'static str, problems: &mut Vec<EnvProblem>| match self.get(name) {
            Ok(Some(v)) => Some(v.to_owned()),
            Ok(None) => {
                if required.contains(&name) {
                    problems.push(EnvProblem::Missing(name));
                }
                None
            }
            Err(problem) => {
                problems.push(problem);
                None
            }
        };
        let container_id = value(CNI_CONTAINERID, &mut problems);
        let netns = value(CNI_NETNS, &mut problems);
        let ifname = value(CNI_IFNAME, &mut problems);
        let args = value(CNI_ARGS, &mut problems);

        if let Some(id) = &container_id
            && let Err(reason) = validate_container_id(id)
        {
            problems.push(EnvProblem::Invalid {
                var: CNI_CONTAINERID,
                reason,
            });
        }
        if let Some(name) = &ifname
            && let Err(reason) = validate_ifname(name)
        {
            problems.push(EnvProblem::Invalid {
                var: CNI_IFNAME,
                reason,
            });
        }
        let args = match args.as_deref().map(CniArgs::parse).transpose() {
            Ok(args) => args.unwrap_or_default(),
            Err(reason) => {
                problems.push(EnvProblem::Invalid {
                    var: CNI_ARGS,
                    reason,
                });
                CniArgs::default()
            }
        };
        match (container_id, ifname) {
            (Some(container_id), Some(ifname)) if problems.is_empty() => Ok(Some(Attachment {
                container_id,
                netns,
                ifname,
                pod: args.pod(),
            })),
            _ => Err(Error::Env(problems)),
        }
    }
}

/// The attachment parameters of an `ADD`, `CHECK` or `DEL` (CNI spec §3 "Attachment
/// Parameters"), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// `CNI_CONTAINERID`: the sandbox ID.
    pub container_id: String,
    /// `CNI_NETNS`: the network namespace path; always set on ADD/CHECK, optional on DEL.
    pub netns: Option<String>,
    /// `CNI_IFNAME`: the interface name inside the sandbox.
    pub ifname: String,
    /// The Kubernetes pod, when `CNI_ARGS` names one; `None` for non-Kubernetes containers.
    pub pod: Option<PodRef>,
}

/// The Kubernetes pod an attachment belongs to, from `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passes it.
    pub uid: Option<String>,
}

/// `CNI_ARGS` parsed: `KEY=VALUE` pairs separated by `;` (CNI spec §2; the `K8S_POD_*` keys are
/// the convention kubelet/CRI runtimes use). Unknown keys (`IgnoreUnknown`,
/// `K8S_POD_INFRA_CONTAINER_ID`, …) are kept but unused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pairs: BTreeMap<String, String>,
}

impl CniArgs {
    /// Parses `CNI_ARGS`. Empty segments (e.g. a trailing `;`) are skipped; a segment without
    /// `=` or with an empty key is an error (the returned reason names it).
    pub fn parse(raw: &str) -> Result<CniArgs, String> {
        let mut pairs = BTreeMap::new();
        for segment in raw.split(';').filter(|s| !s.is_empty()) {
            let Some((key, value)) = segment.split_once('=') else {
                return Err(format!("pair {segment:?} has no '='"));
            };
            if key.is_empty() {
                return Err(format!("pair {segment:?} has an empty key"));
            }
            pairs.insert(key.to_owned(), value.to_owned());
        }
        Ok(CniArgs { pairs })
    }

    /// The value of `key`, if set and non-empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The pod named by `K8S_POD_NAMESPACE` + `K8S_POD_NAME`; `None` unless both are set.
    pub fn pod(&self) -> Option<PodRef> {
        Some(PodRef {
            namespace: self.get("K8S_POD_NAMESPACE")?.to_owned(),
            name: self.get("K8S_POD_NAME")?.to_owned(),
            uid: self.get("K8S_POD_UID").map(str::to_owned),
        })
    }
}

/// CNI spec: "Must not be empty. Must start with an alphanumeric character, optionally followed
/// by any combination of one or more alphanumeric characters, underscore, dot or hyphen."
pub fn validate_container_id(id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    match chars.next() {
        None => return Err("must not be empty".into()),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err(format!("{id:?} must start with an alphanumeric character"));
        }
        Some(_) => {}
    }
    match chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        Some(c) => Err(format!(
            "{id:?} contains {c:?} (allowed: alphanumerics, '_', '.', '-')"
        )),
        None => Ok(()),
    }
}

/// CNI spec: the interface name "must not be empty, must not be `.` or `..`, must be less than 16
/// characters and must not contain / or : or any whitespace characters" (Linux `IFNAMSIZ`).
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if name.len() >= 16 {
        return Err(format!(
            "{name:?} is {} bytes long (at most 15)",
            name.len()
        ));
    }
    match name
        .chars()
        .find(|&c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some(c) => Err(format!("{name:?} contains {c:?}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_vars(pairs.iter().map(|(k, v)| (*k, *v)))
    }

    #[test]
    fn command_parsing() {
        assert_eq!(
            env(&[("CNI_COMMAND", "ADD")]).command().ok(),
            Some(Command::Add)
        );
        assert_eq!(
            env(&[("CNI_COMMAND", "GC")]).command().ok(),
            Some(Command::Gc)
        );
        assert!(matches!(
            env(&[]).command(),
            Err(Error::Env(p)) if p == vec![EnvProblem::Missing(CNI_COMMAND)]
        ));
        assert!(matches!(
            env(&[("CNI_COMMAND", "")]).command(),
            Err(Error::Env(p)) if p == vec![EnvProblem::Missing(CNI_COMMAND)]
        ));
        assert!(matches!(
            env(&[("CNI_COMMAND", "add")]).command(),
            Err(Error::UnknownCommand(c)) if c == "add"
        ));
    }

    #[test]
    fn non_cni_variables_are_ignored() {
        let e = env(&[("PATH", "/bin"), ("CNI_COMMAND", "VERSION")]);
        assert!(e.has_command());
        assert_eq!(e.vars.len(), 1);
    }

    #[test]
    fn attachment_reports_every_problem() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_IFNAME", "a-very-long-ifname0"),
        ]);
        let Err(Error::Env(problems)) = e.attachment(Command::Add) else {
            panic!("expected an env error");
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.contains(&EnvProblem::Missing(CNI_CONTAINERID)));
        assert!(problems.contains(&EnvProblem::Missing(CNI_NETNS)));
        assert!(problems.iter().any(|p| matches!(
            p,
            EnvProblem::Invalid {
                var: CNI_IFNAME,
                ..
            }
        )));
    }

    #[test]
    fn del_does_not_need_netns() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        let attachment = e
            .attachment(Command::Del)
            .expect("valid")
            .expect("attachment");
        assert_eq!(attachment.netns, None);
        assert_eq!(attachment.pod, None);
        assert!(e.attachment(Command::Check).is_err());
        assert_eq!(e.attachment(Command::Version).ok(), Some(None));
    }

    #[test]
    fn attachment_with_pod() {
        let e = env(&[
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                 K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1",
            ),
        ]);
        let attachment = e
            .attachment(Command::Add)
            .expect("valid")
            .expect("attachment");
        assert_eq!(
            attachment.pod,
            Some(PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: Some("u-1".into())
            })
        );
        assert_eq!(attachment.netns.as_deref(), Some("/var/run/netns/cni-1"));
    }

    #[test]
    fn cni_args_table() {
        let pod = |ns: &str, name: &str, uid: Option<&str>| PodRef {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.map(Into::into),
        };
        let cases: &[(&str, Result<Option<PodRef>, ()>)] = &[
            ("", Ok(None)),
            ("IgnoreUnknown=1", Ok(None)),
            ("K8S_POD_NAMESPACE=ns", Ok(None)),
            ("K8S_POD_NAME=p", Ok(None)),
            ("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=", Ok(None)),
            (
                "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
                Ok(Some(pod("ns", "p", None))),
            ),
            (
                "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;",
                Ok(Some(pod("ns", "p", None))),
            ),
            (
                "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=",
                Ok(Some(pod("ns", "p", None))),
            ),
            (
                "K8S_POD_NAMESPACE=a=b;K8S_POD_NAME=p",
                Ok(Some(pod("a=b", "p", None))),
            ),
            ("K8S_POD_NAMESPACE", Err(())),
            ("=x", Err(())),
        ];
        for (raw, want) in cases {
            let got = CniArgs::parse(raw).map(|a| a.pod()).map_err(|_| ());
            assert_eq!(&got, want, "CNI_ARGS={raw:?}");
        }
    }

    #[test]
    fn container_id_rules() {
        for ok in ["a", "abc123", "A.b_c-d", "0f3a"] {
            assert_eq!(validate_container_id(ok), Ok(()), "{ok:?}");
        }
        for bad in ["", "-abc", "_x", ".x", "a b", "a/b", "a:b", "é"] {
            assert!(validate_container_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ifname_rules() {
        for ok in ["eth0", "net1", "a", "fifteen-chars15"] {
            assert_eq!(validate_ifname(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen-chars-16",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
