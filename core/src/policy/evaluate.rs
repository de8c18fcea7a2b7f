//! L4 policy evaluation (reference §6.2 order, §6.3 matching).

use std::fmt;
use std::net::IpAddr;

use super::authorization::{Action, Match, Policy, ServiceAccountMatch, StringMatch};
use crate::identity::SpiffeId;

/// The connection tuple policies are evaluated on, at the destination (reference §6.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Connection {
    /// The client's IP.
    pub src_ip: IpAddr,
    /// The destination pod IP (never a VIP).
    pub dst_ip: IpAddr,
    /// The resolved target port on the pod (not 15008).
    pub dst_port: u16,
    /// The peer's identity from its mTLS certificate; `None` for plaintext (15006).
    pub src_identity: Option<SpiffeId>,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The connection may proceed.
    Allow,
    /// The connection is refused (HBONE: 401; plaintext: closed).
    Deny(DenyReason),
}

/// Why a connection was denied.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// An enforced DENY policy matched.
    Policy {
        /// Its key, `namespace/name`.
        policy: String,
    },
    /// Enforced ALLOW policies apply but none matched.
    NoAllowMatched,
}

impl fmt::Display for DenyReason {
    /// Upstream ztunnel's wording.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::Policy { policy } => write!(f, "explicitly denied by {policy}"),
            DenyReason::NoAllowMatched => f.write_str("allow policies exist, but none allowed"),
        }
    }
}

/// Decides a connection against the applicable `policies` (reference §6.2):
/// dry-run policies are ignored; any matching DENY policy → [`DenyReason::Policy`] (the first
/// one met); no ALLOW policy → [`Verdict::Allow`]; a matching ALLOW policy → allow; else
/// [`DenyReason::NoAllowMatched`].
///
/// One pass, no allocation except the deny reason.
pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a Policy>, conn: &Connection) -> Verdict {
    let mut any_allow = false;
    let mut allowed = false;
    for policy in policies {
        if policy.dry_run {
            continue;
        }
        match policy.action {
            Action::Deny => {
                if policy.matches(conn) {
                    return Verdict::Deny(DenyReason::Policy {
                        policy: policy.key().to_owned(),
                    });
                }
            }
            Action::Allow => {
                any_allow = true;
                allowed = allowed || policy.matches(conn);
            }
        }
    }
    if !any_allow || allowed {
        Verdict::Allow
    } else {
        Verdict::Deny(DenyReason::NoAllowMatched)
    }
}

/// The dry-run policies among `policies` that match `conn`, for logging what they would have
/// done (reference §6.2 step 1).
pub fn dry_run_matches<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    conn: &Connection,
) -> impl Iterator<Item = &'a Policy> {
    policies
        .into_iter()
        .filter(move |p| p.dry_run && p.matches(conn))
}

impl Policy {
    /// Whether this policy matches `conn`, regardless of action and dry-run (reference §6.3):
    /// any rule matches; a rule matches when all its clauses do; a clause when any of its
    /// non-empty matches does (a clause without matches matches).
    pub fn matches(&self, conn: &Connection) -> bool {
        self.rules.iter().any(|rule| {
            rule.clauses.iter().all(|clause| {
                clause.matches.is_empty() || clause.matches.iter().any(|m| m.matches(conn))
            })
        })
    }
}

/// Positives (if any) must have one hit; negatives must have none.
fn kind_holds<T>(positive: &[T], negative: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&hit)) && !negative.iter().any(&hit)
}

impl Match {
    /// Whether every condition kind present holds for `conn`; a match without conditions never
    /// matches. Without a peer identity, positive principal, namespace and service-account
    /// conditions fail and negative ones pass.
    pub fn matches(&self, conn: &Connection) -> bool {
        let id = conn.src_identity.as_ref();
        !self.is_empty()
            && kind_holds(&self.destination_ports, &self.not_destination_ports, |p| {
                *p == conn.dst_port
            })
            && kind_holds(&self.source_ips, &self.not_source_ips, |c| {
                c.contains(conn.src_ip)
            })
            && kind_holds(&self.destination_ips, &self.not_destination_ips, |c| {
                c.contains(conn.dst_ip)
            })
            && kind_holds(&self.namespaces, &self.not_namespaces, |m| {
                id.is_some_and(|id| m.matches(id.namespace()))
            })
            && kind_holds(&self.service_accounts, &self.not_service_accounts, |m| {
                id.is_some_and(|id| m.matches(id))
            })
            && kind_holds(&self.principals, &self.not_principals, |m| {
                id.is_some_and(|id| m.matches_principal(id))
            })
    }
}

impl ServiceAccountMatch {
    /// Namespace and service account equal `id`'s; trust domain ignored.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        self.namespace == id.namespace() && self.service_account == id.service_account()
    }
}

impl StringMatch {
    /// Compares `value`: exact, prefix, suffix, or presence (non-empty).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }

    /// Compares `id`'s principal, `<td>/ns/<ns>/sa/<sa>` (the SPIFFE ID without `spiffe://`),
    /// without building it.
    pub fn matches_principal(&self, id: &SpiffeId) -> bool {
        let parts = [
            id.trust_domain(),
            "/ns/",
            id.namespace(),
            "/sa/",
            id.service_account(),
        ];
        match self {
            StringMatch::Exact(s) => {
                parts.iter().map(|p| p.len()).sum::<usize>() == s.len()
                    && parts_start_with(&parts, s)
            }
            StringMatch::Prefix(s) => parts_start_with(&parts, s),
            StringMatch::Suffix(s) => parts_end_with(&parts, s),
            // An identity's principal is never empty.
            StringMatch::Presence => true,
        }
    }
}

/// Whether the concatenation of `parts` starts with `prefix`.
fn parts_start_with(parts: &[&str], prefix: &str) -> bool {
    let mut rest = prefix.as_bytes();
    for part in parts {
        let part = part.as_bytes();
        if rest.len() <= part.len() {
            return part.starts_with(rest);
        }
        let (head, tail) = rest.split_at(part.len());
        if head != part {
            return false;
        }
        rest = tail;
    }
    rest.is_empty()
}

/// Whether the concatenation of `parts` ends with `suffix`.
fn parts_end_with(parts: &[&str], suffix: &str) -> bool {
    let mut rest = suffix.as_bytes();
    for part in parts.iter().rev() {
        let part = part.as_bytes();
        if rest.len() <= part.len() {
            return part.ends_with(rest);
        }
        let (head, tail) = rest.split_at(rest.len() - part.len());
        if tail != part {
            return false;
        }
        rest = head;
    }
    rest.is_empty()
}
