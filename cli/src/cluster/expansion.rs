//! Kubernetes `$(VAR)` expansion in container `env[].value`, `command` and `args`.
//!
//! Follows the kubelet (`third_party/forked/golang/expansion`): `$(NAME)` is replaced by the
//! value of `NAME` when it is defined, and left as written otherwise; `$$` is an escaped `$`
//! (so `$$(NAME)` yields the literal `$(NAME)`); any other `$` is kept. An env value may
//! reference variables defined earlier in the container's `env` list or in the runner's base
//! environment; `command` and `args` may reference every variable of the final environment.

/// Expands `$(NAME)` references in `input`, looking names up with `lookup`.
pub fn expand<'a>(input: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if after.is_empty() {
            // A trailing `$` is kept.
            out.push('$');
            rest = after;
        } else if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(') {
            match reference.find(')') {
                Some(end) => {
                    let name = &reference[..end];
                    match lookup(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &reference[end + 1..];
                }
                None => {
                    // An unterminated reference is kept as written.
                    out.push_str("$(");
                    rest = reference;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The value of `name` in `env` (the last definition wins, as in a process environment).
pub fn lookup<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![
            ("A".into(), "alpha".into()),
            ("TOKEN".into(), "/pods/u/token".into()),
            ("EMPTY".into(), String::new()),
            ("A".into(), "again".into()),
        ]
    }

    #[test]
    fn expands_like_the_kubelet() {
        let env = env();
        let x = |s: &str| expand(s, |n| lookup(&env, n));
        for (input, want) in [
            ("$(TOKEN)", "/pods/u/token"),
            ("file=$(TOKEN);", "file=/pods/u/token;"),
            ("$(A)-$(A)", "again-again"),
            ("$(EMPTY)x", "x"),
            ("$(MISSING)", "$(MISSING)"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$again"),
            ("$$", "$"),
            ("$", "$"),
            ("a$", "a$"),
            ("$A", "$A"),
            ("$(A", "$(A"),
            ("$()", "$()"),
            ("price: 5$ (é)", "price: 5$ (é)"),
            ("$é$(A)", "$éagain"),
            ("no refs", "no refs"),
            ("", ""),
        ] {
            assert_eq!(x(input), want, "{input:?}");
        }
    }

    #[test]
    fn the_last_definition_wins() {
        assert_eq!(lookup(&env(), "A"), Some("again"));
        assert_eq!(lookup(&env(), "B"), None);
    }
}
