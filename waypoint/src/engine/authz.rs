//! L7 authorization with Istio AuthorizationPolicy semantics (DENY, then ALLOW).

use std::net::IpAddr;

use http::HeaderName;

use super::cidr::Cidr;
use super::{ConfigError, Denied, RequestFacts, pb};

/// One compiled policy.
#[derive(Debug)]
pub(super) struct Policy {
    /// `<ns>/<name>` of the AuthorizationPolicy.
    id: String,
    deny: bool,
    /// Lowercase service hostnames; empty = every request.
    services: Vec<String>,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

#[derive(Debug, Default)]
struct Source {
    principals: Vec<Pattern>,
    not_principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    not_namespaces: Vec<Pattern>,
    ip_blocks: Vec<Cidr>,
    not_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Default)]
struct Operation {
    /// Lowercase.
    hosts: Vec<Pattern>,
    not_hosts: Vec<Pattern>,
    methods: Vec<Pattern>,
    not_methods: Vec<Pattern>,
    paths: Vec<Pattern>,
    not_paths: Vec<Pattern>,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

#[derive(Debug)]
enum Condition {
    Header {
        name: HeaderName,
        values: Vec<Pattern>,
        not_values: Vec<Pattern>,
    },
    SourceIp {
        values: Vec<Cidr>,
        not_values: Vec<Cidr>,
    },
    SourceNamespace {
        values: Vec<Pattern>,
        not_values: Vec<Pattern>,
    },
    SourcePrincipal {
        values: Vec<Pattern>,
        not_values: Vec<Pattern>,
    },
    DestinationPort {
        values: Vec<u16>,
        not_values: Vec<u16>,
    },
    Method {
        values: Vec<Pattern>,
        not_values: Vec<Pattern>,
    },
    Host {
        values: Vec<Pattern>,
        not_values: Vec<Pattern>,
    },
}

/// Istio string matching: exact, `prefix*`, `*suffix` or `*` (any present value).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn parse(s: &str) -> Pattern {
        if s == "*" {
            Pattern::Any
        } else if let Some(suffix) = s.strip_prefix('*') {
            Pattern::Suffix(suffix.to_owned())
        } else if let Some(prefix) = s.strip_suffix('*') {
            Pattern::Prefix(prefix.to_owned())
        } else {
            Pattern::Exact(s.to_owned())
        }
    }

    /// A principal pattern: `spiffe://` is dropped from the configured value.
    fn principal(s: &str) -> Pattern {
        Pattern::parse(s.strip_prefix("spiffe://").unwrap_or(s))
    }

    /// A host pattern: compared case-insensitively.
    fn host(s: &str) -> Pattern {
        Pattern::parse(&s.to_ascii_lowercase())
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(v) => value == v,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

/// Positive list: empty, or some pattern matches a present value (absent never matches).
fn any_of(patterns: &[Pattern], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
}

/// Negative list: no pattern matches (an absent value satisfies it).
fn none_of(patterns: &[Pattern], value: Option<&str>) -> bool {
    value.is_none_or(|v| !patterns.iter().any(|p| p.matches(v)))
}

/// Hosts: the `Host` as sent (lowercased) and without its port; any candidate may match.
fn host_any(patterns: &[Pattern], host: &str) -> bool {
    patterns.is_empty() || host_hit(patterns, host)
}

fn host_none(patterns: &[Pattern], host: &str) -> bool {
    !host_hit(patterns, host)
}

fn host_hit(patterns: &[Pattern], host: &str) -> bool {
    let full = host.to_ascii_lowercase();
    let (bare, _) = super::split_host_port(&full);
    patterns.iter().any(|p| p.matches(&full) || p.matches(bare))
}

/// The peer's SPIFFE ID without `spiffe://` (tolerating a caller that left it on).
fn principal<'a>(f: &RequestFacts<'a>) -> Option<&'a str> {
    f.source_principal
        .map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
}

fn cidr_any(blocks: &[Cidr], ip: IpAddr) -> bool {
    blocks.is_empty() || blocks.iter().any(|b| b.contains(ip))
}

fn cidr_none(blocks: &[Cidr], ip: IpAddr) -> bool {
    !blocks.iter().any(|b| b.contains(ip))
}

fn port_any(ports: &[u16], port: u16) -> bool {
    ports.is_empty() || ports.contains(&port)
}

impl Policy {
    /// Compiles policy resource `name`.
    pub(super) fn compile(name: &str, p: &pb::Policy) -> Result<Policy, ConfigError> {
        let err =
            |field: String, msg: String| ConfigError(format!("Policy {name}: {field}: {msg}"));
        let deny = match pb::Action::try_from(p.action) {
            Ok(pb::Action::Allow) => false,
            Ok(pb::Action::Deny) => true,
            Err(_) => {
                return Err(err("action".into(), format!("{}: unknown value", p.action)));
            }
        };
        let cidrs = |list: &[String], field: String| {
            list.iter()
                .map(|s| {
                    Cidr::parse(s).ok_or_else(|| {
                        err(field.clone(), format!("{s:?}: invalid CIDR or address"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let ports = |list: &[u32], field: String| {
            list.iter()
                .map(|&p| {
                    u16::try_from(p).map_err(|_| err(field.clone(), format!("{p}: above 65535")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let patterns =
            |list: &[String], f: fn(&str) -> Pattern| list.iter().map(|s| f(s)).collect();
        let mut rules = Vec::with_capacity(p.rules.len());
        for (i, r) in p.rules.iter().enumerate() {
            let mut from = Vec::with_capacity(r.from.len());
            for (j, s) in r.from.iter().enumerate() {
                let at = |f: &str| format!("rules/{i}/from/{j}/{f}");
                from.push(Source {
                    principals: patterns(&s.principals, Pattern::principal),
                    not_principals: patterns(&s.not_principals, Pattern::principal),
                    namespaces: patterns(&s.namespaces, Pattern::parse),
                    not_namespaces: patterns(&s.not_namespaces, Pattern::parse),
                    ip_blocks: cidrs(&s.ip_blocks, at("ip_blocks"))?,
                    not_ip_blocks: cidrs(&s.not_ip_blocks, at("not_ip_blocks"))?,
                });
            }
            let mut to = Vec::with_capacity(r.to.len());
            for (j, o) in r.to.iter().enumerate() {
                let at = |f: &str| format!("rules/{i}/to/{j}/{f}");
                to.push(Operation {
                    hosts: patterns(&o.hosts, Pattern::host),
                    not_hosts: patterns(&o.not_hosts, Pattern::host),
                    methods: patterns(&o.methods, Pattern::parse),
                    not_methods: patterns(&o.not_methods, Pattern::parse),
                    paths: patterns(&o.paths, Pattern::parse),
                    not_paths: patterns(&o.not_paths, Pattern::parse),
                    ports: ports(&o.ports, at("ports"))?,
                    not_ports: ports(&o.not_ports, at("not_ports"))?,
                });
            }
            let mut when = Vec::with_capacity(r.when.len());
            for (j, c) in r.when.iter().enumerate() {
                let field = format!("rules/{i}/when/{j}");
                if c.values.is_empty() && c.not_values.is_empty() {
                    return Err(err(
                        field,
                        format!("key {:?}: neither values nor not_values", c.key),
                    ));
                }
                let dest_ports = |list: &[String], what: &str| {
                    list.iter()
                        .map(|v| {
                            v.parse::<u16>().map_err(|_| {
                                err(field.clone(), format!("{what} {v:?}: not a port"))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
                let key = c.key.as_str();
                let pats = |f: fn(&str) -> Pattern| -> (Vec<Pattern>, Vec<Pattern>) {
                    (patterns(&c.values, f), patterns(&c.not_values, f))
                };
                when.push(match key {
                    "source.ip" => Condition::SourceIp {
                        values: cidrs(&c.values, format!("{field}/values"))?,
                        not_values: cidrs(&c.not_values, format!("{field}/not_values"))?,
                    },
                    "source.namespace" => {
                        let (values, not_values) = pats(Pattern::parse);
                        Condition::SourceNamespace { values, not_values }
                    }
                    "source.principal" => {
                        let (values, not_values) = pats(Pattern::principal);
                        Condition::SourcePrincipal { values, not_values }
                    }
                    "destination.port" => Condition::DestinationPort {
                        values: dest_ports(&c.values, "values")?,
                        not_values: dest_ports(&c.not_values, "not_values")?,
                    },
                    "request.method" => {
                        let (values, not_values) = pats(Pattern::parse);
                        Condition::Method { values, not_values }
                    }
                    "request.host" => {
                        let (values, not_values) = pats(Pattern::host);
                        Condition::Host { values, not_values }
                    }
                    _ => {
                        let header = key
                            .strip_prefix("request.headers[")
                            .and_then(|k| k.strip_suffix(']'))
                            .ok_or_else(|| {
                                err(field.clone(), format!("key {key:?}: unsupported"))
                            })?;
                        let name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                            err(field.clone(), format!("key {key:?}: invalid header name"))
                        })?;
                        let (values, not_values) = pats(Pattern::parse);
                        Condition::Header {
                            name,
                            values,
                            not_values,
                        }
                    }
                });
            }
            rules.push(Rule { from, to, when });
        }
        Ok(Policy {
            id: format!("{}/{}", p.namespace, p.name),
            deny,
            services: p.services.iter().map(|s| s.to_ascii_lowercase()).collect(),
            rules,
        })
    }

    fn applies(&self, service: Option<&str>) -> bool {
        self.services.is_empty()
            || service.is_some_and(|s| self.services.iter().any(|x| x.eq_ignore_ascii_case(s)))
    }

    fn matches(&self, facts: &RequestFacts<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(facts))
    }
}

impl Rule {
    fn matches(&self, facts: &RequestFacts<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(facts)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(facts)))
            && self.when.iter().all(|c| c.holds(facts))
    }
}

impl Source {
    fn matches(&self, f: &RequestFacts<'_>) -> bool {
        let principal = principal(f);
        any_of(&self.principals, principal)
            && none_of(&self.not_principals, principal)
            && any_of(&self.namespaces, f.source_namespace)
            && none_of(&self.not_namespaces, f.source_namespace)
            && cidr_any(&self.ip_blocks, f.source_ip)
            && cidr_none(&self.not_ip_blocks, f.source_ip)
    }
}

impl Operation {
    fn matches(&self, f: &RequestFacts<'_>) -> bool {
        // The path is documented without query; drop one anyway so `?` never defeats a
        // `not_paths`.
        let path = f.path.split_once('?').map_or(f.path, |(p, _)| p);
        host_any(&self.hosts, f.host)
            && host_none(&self.not_hosts, f.host)
            && any_of(&self.methods, Some(f.method))
            && none_of(&self.not_methods, Some(f.method))
            && any_of(&self.paths, Some(path))
            && none_of(&self.not_paths, Some(path))
            && port_any(&self.ports, f.port)
            && !self.not_ports.contains(&f.port)
    }
}

impl Condition {
    fn holds(&self, f: &RequestFacts<'_>) -> bool {
        match self {
            Condition::Header {
                name,
                values,
                not_values,
            } => {
                let mut all = f.headers.get_all(name).iter().peekable();
                let joined = if all.peek().is_none() {
                    None
                } else {
                    let parts: Vec<_> =
                        all.map(|v| String::from_utf8_lossy(v.as_bytes())).collect();
                    Some(parts.join(","))
                };
                any_of(values, joined.as_deref()) && none_of(not_values, joined.as_deref())
            }
            Condition::SourceIp { values, not_values } => {
                cidr_any(values, f.source_ip) && cidr_none(not_values, f.source_ip)
            }
            Condition::SourceNamespace { values, not_values } => {
                any_of(values, f.source_namespace) && none_of(not_values, f.source_namespace)
            }
            Condition::SourcePrincipal { values, not_values } => {
                any_of(values, principal(f)) && none_of(not_values, principal(f))
            }
            Condition::DestinationPort { values, not_values } => {
                port_any(values, f.port) && !not_values.contains(&f.port)
            }
            Condition::Method { values, not_values } => {
                any_of(values, Some(f.method)) && none_of(not_values, Some(f.method))
            }
            Condition::Host { values, not_values } => {
                host_any(values, f.host) && host_none(not_values, f.host)
            }
        }
    }
}

/// DENY policies first, then ALLOW (Istio's order).
pub(super) fn check<'p>(
    policies: impl Iterator<Item = &'p Policy> + Clone,
    facts: &RequestFacts<'_>,
) -> Result<(), Denied> {
    let applicable = policies.filter(|p| p.applies(facts.service));
    if let Some(p) = applicable
        .clone()
        .filter(|p| p.deny)
        .find(|p| p.matches(facts))
    {
        return Err(Denied::Policy(p.id.clone()));
    }
    let mut allow = applicable.filter(|p| !p.deny).peekable();
    if allow.peek().is_none() {
        return Ok(());
    }
    if allow.clone().any(|p| p.matches(facts)) {
        Ok(())
    } else {
        Err(Denied::NotAllowed {
            policies: allow.map(|p| p.id.clone()).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Pattern;

    #[test]
    fn patterns_follow_istio() {
        assert_eq!(Pattern::parse("*"), Pattern::Any);
        assert_eq!(
            Pattern::parse("*.example"),
            Pattern::Suffix(".example".into())
        );
        assert_eq!(Pattern::parse("/api/*"), Pattern::Prefix("/api/".into()));
        assert_eq!(Pattern::parse("GET"), Pattern::Exact("GET".into()));
        assert!(Pattern::parse("/api/*").matches("/api/v1"));
        assert!(!Pattern::parse("/api/*").matches("/apx"));
        assert!(Pattern::parse("*/sa/a").matches("td/ns/x/sa/a"));
        assert!(!Pattern::parse("GET").matches("get"));
        assert_eq!(
            Pattern::principal("spiffe://td/ns/a/sa/b"),
            Pattern::Exact("td/ns/a/sa/b".into())
        );
        assert_eq!(
            Pattern::host("Foo.Example"),
            Pattern::Exact("foo.example".into())
        );
    }
}
