//! The domain form of `istio.security.Authorization` (reference §2.7, §6).

use weft_proto::istio::security as proto;

use crate::state::{Cidr, CidrError};

/// Where a policy applies (`Authorization.scope`, reference §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every workload in the mesh (policies in the root namespace without selector).
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Only workloads listing the policy in `Workload.authorization_policies`.
    WorkloadSelector,
}

/// What a matching policy does (`Authorization.action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Allows the connection; once any enforced ALLOW policy applies, one must match.
    Allow,
    /// Denies the connection.
    Deny,
}

/// A string comparison (`StringMatch`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    /// Equal to the value.
    Exact(String),
    /// Starts with the value.
    Prefix(String),
    /// Ends with the value.
    Suffix(String),
    /// Non-empty.
    Presence,
}

/// A (namespace, service account) pair compared with the peer identity; the trust domain is
/// ignored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccountMatch {
    /// The identity's namespace.
    pub namespace: String,
    /// The identity's service account.
    pub service_account: String,
}

/// Conditions on one connection; every kind present must hold (reference §6.3). A `Match` with
/// no condition never matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Match {
    /// Any of these must match the peer identity's namespace.
    pub namespaces: Vec<StringMatch>,
    /// None of these may match the peer identity's namespace.
    pub not_namespaces: Vec<StringMatch>,
    /// Any of these must match the peer identity without `spiffe://`.
    pub principals: Vec<StringMatch>,
    /// None of these may match the peer identity without `spiffe://`.
    pub not_principals: Vec<StringMatch>,
    /// The source IP must lie in one of these.
    pub source_ips: Vec<Cidr>,
    /// The source IP must lie in none of these.
    pub not_source_ips: Vec<Cidr>,
    /// The destination IP must lie in one of these.
    pub destination_ips: Vec<Cidr>,
    /// The destination IP must lie in none of these.
    pub not_destination_ips: Vec<Cidr>,
    /// The (resolved target) destination port must be one of these.
    pub destination_ports: Vec<u16>,
    /// The destination port must be none of these.
    pub not_destination_ports: Vec<u16>,
    /// The peer identity's (namespace, service account) must be one of these.
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// The peer identity's (namespace, service account) must be none of these.
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

impl Match {
    /// Whether no condition is set (such a match is skipped: it cannot match).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
    }
}

/// Alternatives: matches if any of its [`Match`]es does (istiod's `Rules`). A clause with no
/// matches at all matches (as upstream ztunnel does).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Clause {
    /// The alternatives.
    pub matches: Vec<Match>,
}

/// Conjunction: matches if all its [`Clause`]s do; no clauses matches (istiod's `Group`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The clauses.
    pub clauses: Vec<Clause>,
}

/// An L4 authorization policy, keyed `namespace/name` (reference §2.6, §6).
///
/// Built only by converting the wire form ([`TryFrom<proto::Authorization>`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    /// The policy name.
    pub name: String,
    /// The policy namespace.
    pub namespace: String,
    /// Where it applies.
    pub scope: Scope,
    /// Allow or deny.
    pub action: Action,
    /// Matches if any rule does; no rules never matches.
    pub rules: Vec<Rule>,
    /// Evaluated for logging only, never enforced.
    pub dry_run: bool,
    key: String,
}

impl Policy {
    /// The resource name and key: `namespace/name`, fixed at conversion.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// A rejected `istio.security.Authorization`: which policy, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authorization {policy:?}: field {field}: {reason}")]
pub struct Error {
    /// The policy key, `namespace/name`.
    pub policy: String,
    /// The offending field with indices, e.g. `rules[0].clauses[1].matches[0].source_ips[2]`.
    pub field: String,
    /// What is wrong with it.
    #[source]
    pub reason: Reason,
}

/// What is wrong with a field of an `Authorization`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// A CIDR address is not 4 or 16 bytes, or its prefix is too long.
    #[error(transparent)]
    Cidr(#[from] CidrError),
    /// A port does not fit in 16 bits.
    #[error("{value} is not a port number (0-65535)")]
    Port {
        /// The value received.
        value: u32,
    },
    /// `scope` or `action` holds a value this version does not know.
    #[error("unknown enum value {value}")]
    UnknownEnum {
        /// The value received.
        value: i32,
    },
}

/// Converts string matches; entries without a match type are dropped (as upstream ztunnel does).
fn strings(list: &[proto::StringMatch]) -> Vec<StringMatch> {
    use proto::string_match::MatchType;
    list.iter()
        .filter_map(|m| {
            Some(match m.match_type.as_ref()? {
                MatchType::Exact(s) => StringMatch::Exact(s.clone()),
                MatchType::Prefix(s) => StringMatch::Prefix(s.clone()),
                MatchType::Suffix(s) => StringMatch::Suffix(s.clone()),
                MatchType::Presence(()) => StringMatch::Presence,
            })
        })
        .collect()
}

fn service_accounts(list: &[proto::ServiceAccountMatch]) -> Vec<ServiceAccountMatch> {
    list.iter()
        .map(|m| ServiceAccountMatch {
            namespace: m.namespace.clone(),
            service_account: m.service_account.clone(),
        })
        .collect()
}

fn cidrs(list: &[proto::Address], field: &str) -> Result<Vec<Cidr>, (String, Reason)> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            Cidr::from_bytes(&a.address, a.length).map_err(|e| (format!("{field}[{i}]"), e.into()))
        })
        .collect()
}

fn ports(list: &[u32], field: &str) -> Result<Vec<u16>, (String, Reason)> {
    list.iter()
        .enumerate()
        .map(|(i, &value)| {
            u16::try_from(value).map_err(|_| (format!("{field}[{i}]"), Reason::Port { value }))
        })
        .collect()
}

fn convert_match(m: &proto::Match, at: &str) -> Result<Match, (String, Reason)> {
    let f = |name: &str| format!("{at}.{name}");
    Ok(Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: cidrs(&m.source_ips, &f("source_ips"))?,
        not_source_ips: cidrs(&m.not_source_ips, &f("not_source_ips"))?,
        destination_ips: cidrs(&m.destination_ips, &f("destination_ips"))?,
        not_destination_ips: cidrs(&m.not_destination_ips, &f("not_destination_ips"))?,
        destination_ports: ports(&m.destination_ports, &f("destination_ports"))?,
        not_destination_ports: ports(&m.not_destination_ports, &f("not_destination_ports"))?,
        service_accounts: service_accounts(&m.service_accounts),
        not_service_accounts: service_accounts(&m.not_service_accounts),
    })
}

fn convert_rules(rules: &[proto::Rule]) -> Result<Vec<Rule>, (String, Reason)> {
    rules
        .iter()
        .enumerate()
        .map(|(r, rule)| {
            let clauses = rule
                .clauses
                .iter()
                .enumerate()
                .map(|(c, clause)| {
                    let matches = clause
                        .matches
                        .iter()
                        .enumerate()
                        .map(|(m, mtch)| {
                            convert_match(mtch, &format!("rules[{r}].clauses[{c}].matches[{m}]"))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Clause { matches })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Rule { clauses })
        })
        .collect()
}

impl TryFrom<proto::Authorization> for Policy {
    type Error = Error;

    /// Validates and converts an authorization resource (reference §2.7). String matches without
    /// a match type are dropped; `extensions` are ignored.
    ///
    /// # Errors
    /// [`Error`] naming the field: unknown `scope` or `action`; a CIDR address not 4 or 16 bytes
    /// or with a prefix over 32/128; a port over 65535.
    fn try_from(a: proto::Authorization) -> Result<Self, Error> {
        let key = format!("{}/{}", a.namespace, a.name);
        let err = |field: String, reason: Reason| Error {
            policy: key.clone(),
            field,
            reason,
        };
        let scope = match proto::Scope::try_from(a.scope) {
            Ok(proto::Scope::Global) => Scope::Global,
            Ok(proto::Scope::Namespace) => Scope::Namespace,
            Ok(proto::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => return Err(err("scope".into(), Reason::UnknownEnum { value: a.scope })),
        };
        let action = match proto::Action::try_from(a.action) {
            Ok(proto::Action::Allow) => Action::Allow,
            Ok(proto::Action::Deny) => Action::Deny,
            Err(_) => {
                return Err(err(
                    "action".into(),
                    Reason::UnknownEnum { value: a.action },
                ));
            }
        };
        let rules = convert_rules(&a.rules).map_err(|(f, r)| err(f, r))?;
        Ok(Policy {
            name: a.name,
            namespace: a.namespace,
            scope,
            action,
            rules,
            dry_run: a.dry_run,
            key,
        })
    }
}
