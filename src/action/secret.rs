//! Secret references in action definitions: `${env:NAME}` and `${file:PATH}`.
//!
//! They are resolved once, at load. Resolved values live in `SecretString`
//! (which never prints) and are collected per definition so every text that
//! leaves the process (`render` output, logs, results, DLQ reasons) can be
//! masked with [`mask`].

use std::path::Path;

use secrecy::{ExposeSecret, SecretString};

/// One piece of a configured string: literal text or a resolved secret.
#[derive(Debug)]
pub enum Part {
    Text(String),
    Secret(SecretString),
}

/// Splits `text` into literal parts and resolved secrets.
/// `base` resolves relative `${file:…}` paths.
pub fn split(text: &str, base: &Path) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = find_reference(rest) {
        let Some(len) = rest[start..].find('}') else {
            return Err(format!("unclosed secret reference in `{}`", truncate(text)));
        };
        let reference = &rest[start + 2..start + len];
        let (kind, name) = reference.split_once(':').unwrap_or((reference, ""));
        if name.is_empty() {
            return Err(format!(
                "`${{{reference}}}` names no {kind} (use ${{env:NAME}} or ${{file:PATH}})"
            ));
        }
        let value = match kind {
            "env" => std::env::var(name).map_err(|_| {
                format!("environment variable `{name}` is not set (referenced as ${{env:{name}}})")
            })?,
            _ => {
                let path = base.join(name);
                let content = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read secret file `{}`: {e}", path.display()))?;
                content.trim_end_matches(['\r', '\n']).to_string()
            }
        };
        if start > 0 {
            parts.push(Part::Text(rest[..start].to_string()));
        }
        parts.push(Part::Secret(SecretString::from(value)));
        rest = &rest[start + len + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    Ok(parts)
}

/// Resolves every reference in `text`, returning the full value as a secret
/// when it contained at least one reference. `found` collects the values.
pub fn resolve(
    text: &str,
    base: &Path,
    found: &mut Vec<SecretString>,
) -> Result<SecretString, String> {
    let mut out = String::new();
    for part in split(text, base)? {
        match part {
            Part::Text(t) => out.push_str(&t),
            Part::Secret(s) => {
                out.push_str(s.expose_secret());
                found.push(s);
            }
        }
    }
    Ok(SecretString::from(out))
}

/// Replaces every occurrence of a secret value in `text` with `***`.
/// Values shorter than 4 characters are left alone: masking them would
/// shred ordinary text without protecting anything.
pub fn mask(text: &str, secrets: &[SecretString]) -> String {
    let mut out = text.to_string();
    for secret in secrets {
        let value = secret.expose_secret();
        if value.len() >= 4 && out.contains(value) {
            out = out.replace(value, "***");
        }
    }
    out
}

/// Where the next `${env:` or `${file:` starts; any other `${` is plain text.
fn find_reference(text: &str) -> Option<usize> {
    match (text.find("${env:"), text.find("${file:")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_file_references_resolve() {
        std::env::set_var("JA_TEST_SECRET_A", "s3cr3t-a");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key.txt"), "from-file\n").unwrap();
        let mut found = Vec::new();
        let v = resolve(
            "Token ${env:JA_TEST_SECRET_A}/${file:key.txt}!",
            dir.path(),
            &mut found,
        )
        .unwrap();
        assert_eq!(v.expose_secret(), "Token s3cr3t-a/from-file!");
        assert_eq!(found.len(), 2);
        assert_eq!(mask("x s3cr3t-a y from-file", &found), "x *** y ***");
    }

    #[test]
    fn unresolvable_references_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "${env:JA_TEST_NOT_SET_EVER}",
            "${file:missing.pem}",
            "${env:X",
            "${env:}",
        ] {
            assert!(split(text, dir.path()).is_err(), "{text}");
        }
    }

    #[test]
    fn plain_text_is_one_part() {
        let parts = split("no secrets here, ${not:one} either", Path::new(".")).unwrap();
        assert!(matches!(&parts[..], [Part::Text(t)] if t == "no secrets here, ${not:one} either"));
    }
}
