//! L4 authorization as ztunnel enforces it on the receiving side (istio-ztunnel reference §6).
//!
//! Owns the domain [`Policy`] converted from `istio.security.Authorization` (proto types stop at
//! [`Policy::try_from`]), the policy [`Store`] with the applicability rule (namespace + global +
//! workload-referenced policies, §6.1) and the pure [`evaluate`] function (§6.2 order, §6.3
//! matching) over a [`Connection`].
//!
//! Does not own: where connections come from, closing denied ones, or logging dry-run results
//! (callers use [`dry_run_matches`]).

mod authorization;
mod evaluate;
mod store;

pub use authorization::{Action, Clause, Error, Match, Policy, Reason, Rule, Scope};
pub use authorization::{ServiceAccountMatch, StringMatch};
pub use evaluate::{Connection, DenyReason, Verdict, dry_run_matches, evaluate};
pub use store::Store;

#[cfg(test)]
mod tests;
