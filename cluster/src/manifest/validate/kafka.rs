//! The Kafka client tables of sources and sinks: `security`, `properties`
//! and (sinks) `compression`.

use std::collections::BTreeMap;
use std::path::Path;

use dataflows::pipelines::kafka::{
    ClientSettings, Compression, Mechanism, Protocol, Role, Secret, Security, check_properties,
};

use crate::manifest::raw::RawSecurity;

use super::{Problems, resolve_path};

/// A secret from `NAME_env` / `NAME_file` (exactly one), refusing an inline
/// `NAME`.
fn secret(
    inline: bool,
    env: Option<String>,
    file: Option<String>,
    name: &str,
    field: &str,
    base: &Path,
    problems: &mut Problems,
) -> Option<Secret> {
    if inline {
        problems.add(
            format!("{field}.{name}"),
            format!(
                "a secret is never written in the manifest: name an environment variable ({name}_env) or a file ({name}_file)"
            ),
        );
    }
    match (env, file) {
        (Some(_), Some(_)) => {
            problems.add(
                format!("{field}.{name}_env"),
                format!("set {name}_env or {name}_file, not both"),
            );
            None
        }
        (Some(var), None) => {
            let secret = Secret::Env(var);
            if let Err(e) = secret.read() {
                problems.add(format!("{field}.{name}_env"), e);
            }
            Some(secret)
        }
        (None, Some(path)) => {
            let secret = Secret::File(resolve_path(base, &path));
            if let Err(e) = secret.read() {
                problems.add(
                    format!("{field}.{name}_file"),
                    format!("cannot be read: {e}"),
                );
            }
            Some(secret)
        }
        (None, None) => None,
    }
}

/// A file the client reads (a certificate, a key, a token): resolved and
/// checked to exist.
fn file(
    value: Option<String>,
    name: &str,
    field: &str,
    base: &Path,
    problems: &mut Problems,
) -> Option<std::path::PathBuf> {
    let path = resolve_path(base, &value?);
    if !path.is_file() {
        problems.add(
            format!("{field}.{name}"),
            format!("{} does not exist or is not a file", path.display()),
        );
    }
    Some(path)
}

/// `[field.security]`.
pub(super) fn security(
    raw: Option<RawSecurity>,
    field: &str,
    base: &Path,
    problems: &mut Problems,
) -> Security {
    let Some(raw) = raw else {
        return Security::default();
    };
    let field = format!("{field}.security");
    let field = field.as_str();
    let protocol = match raw.protocol.as_deref() {
        None => Protocol::Plaintext,
        Some(text) => Protocol::parse(text).unwrap_or_else(|| {
            problems.add(
                format!("{field}.protocol"),
                format!("{text:?} is not one of {}", Protocol::VALUES),
            );
            Protocol::Plaintext
        }),
    };
    let ca_file = file(raw.ca_file, "ca_file", field, base, problems);
    let cert_file = file(raw.cert_file, "cert_file", field, base, problems);
    let key_file = file(raw.key_file, "key_file", field, base, problems);
    let key_password = secret(
        raw.key_password.is_some(),
        raw.key_password_env,
        raw.key_password_file,
        "key_password",
        field,
        base,
        problems,
    );
    let mechanism = raw.sasl_mechanism.as_deref().and_then(|text| {
        let m = Mechanism::parse(text);
        if m.is_none() {
            problems.add(
                format!("{field}.sasl_mechanism"),
                format!("{text:?} is not one of {}", Mechanism::VALUES),
            );
        }
        m
    });
    let password = secret(
        raw.password.is_some(),
        raw.password_env,
        raw.password_file,
        "password",
        field,
        base,
        problems,
    );
    let token_file = file(raw.token_file, "token_file", field, base, problems);
    let security = Security {
        protocol,
        ca_file,
        cert_file,
        key_file,
        key_password,
        mechanism,
        username: raw.username,
        password,
        token_file,
    };
    let p = protocol.librdkafka();
    if !protocol.tls() {
        for (set, name) in [
            (security.ca_file.is_some(), "ca_file"),
            (security.cert_file.is_some(), "cert_file"),
            (security.key_file.is_some(), "key_file"),
            (security.key_password.is_some(), "key_password_env"),
        ] {
            if set {
                problems.add(
                    format!("{field}.{name}"),
                    format!("applies to protocol \"ssl\" or \"sasl_ssl\" (protocol is {p:?})"),
                );
            }
        }
    }
    if security.cert_file.is_some() != security.key_file.is_some() {
        problems.add(
            format!("{field}.key_file"),
            "cert_file and key_file go together (a client certificate and its key)",
        );
    }
    if protocol.sasl() {
        match security.mechanism {
            None if raw.sasl_mechanism.is_none() => problems.add(
                format!("{field}.sasl_mechanism"),
                format!(
                    "is required for protocol {p:?} (one of {})",
                    Mechanism::VALUES
                ),
            ),
            None => {}
            Some(Mechanism::OAuthBearer) if security.token_file.is_none() => problems.add(
                format!("{field}.token_file"),
                "is required for sasl_mechanism \"OAUTHBEARER\" (a file holding the current token)",
            ),
            Some(Mechanism::OAuthBearer) => {}
            Some(m) => {
                if security.username.is_none() {
                    problems.add(
                        format!("{field}.username"),
                        format!("is required for sasl_mechanism {:?}", m.librdkafka()),
                    );
                }
                if security.password.is_none() && raw.password.is_none() {
                    problems.add(
                        format!("{field}.password_env"),
                        format!(
                            "password_env or password_file is required for sasl_mechanism {:?}",
                            m.librdkafka()
                        ),
                    );
                }
            }
        }
    } else {
        for (set, name) in [
            (raw.sasl_mechanism.is_some(), "sasl_mechanism"),
            (security.username.is_some(), "username"),
            (security.password.is_some(), "password_env"),
        ] {
            if set {
                problems.add(
                    format!("{field}.{name}"),
                    format!(
                        "applies to protocol \"sasl_plaintext\" or \"sasl_ssl\" (protocol is {p:?})"
                    ),
                );
            }
        }
    }
    if security.token_file.is_some() && security.mechanism != Some(Mechanism::OAuthBearer) {
        problems.add(
            format!("{field}.token_file"),
            "applies to sasl_mechanism \"OAUTHBEARER\" only",
        );
    }
    security
}

/// `[field.properties]`: text values (numbers and booleans are written as
/// text), none that Dima owns for `role`.
pub(super) fn properties(
    raw: Option<BTreeMap<String, toml::Value>>,
    field: &str,
    role: Role,
    problems: &mut Problems,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, value) in raw.unwrap_or_default() {
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => {
                problems.add(
                    format!("{field}.properties.{name:?}"),
                    format!(
                        "is a {}; librdkafka properties are text, numbers or booleans",
                        other.type_str()
                    ),
                );
                continue;
            }
        };
        out.insert(name, text);
    }
    if let Err((name, why)) = check_properties(&out, role) {
        problems.add(format!("{field}.properties.{name:?}"), why);
    }
    out
}

/// A sink's `compression`.
pub(super) fn compression(raw: Option<&str>, field: &str, problems: &mut Problems) -> Compression {
    match raw {
        None => Compression::None,
        Some(text) => Compression::parse(text).unwrap_or_else(|| {
            problems.add(
                format!("{field}.compression"),
                format!("{text:?} is not one of {}", Compression::VALUES),
            );
            Compression::None
        }),
    }
}

/// librdkafka's own check of the client's settings (property names and
/// values), done by creating the client without connecting anywhere:
/// the problem names librdkafka's reason.
pub(super) fn librdkafka_accepts(settings: &ClientSettings, field: &str, problems: &mut Problems) {
    if let Err(reason) = settings.check() {
        problems.add(format!("{field}.properties"), reason);
    }
}
