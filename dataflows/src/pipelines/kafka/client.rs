//! What every Kafka client of Dima's is told: the brokers, how to reach
//! them securely (TLS, SASL), the operator's own librdkafka properties, and
//! for producers the compression codec.
//!
//! Secrets never come from the manifest itself: a SASL password or a key
//! password is read from an environment variable or a file when the client
//! is created. The properties Dima owns (offsets, the group, partition
//! assignment, idempotence, and what the security table sets) cannot be
//! overridden through `properties`; [`check_properties`] names them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rdkafka::ClientConfig;

/// `security.protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// No TLS, no SASL.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl Protocol {
    /// The manifest's spellings.
    pub const VALUES: &'static str = "\"plaintext\", \"ssl\", \"sasl_plaintext\", \"sasl_ssl\"";

    /// From the manifest's spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "plaintext" => Self::Plaintext,
            "ssl" => Self::Ssl,
            "sasl_plaintext" => Self::SaslPlaintext,
            "sasl_ssl" => Self::SaslSsl,
            _ => return None,
        })
    }

    /// librdkafka's value.
    pub fn librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether the connection is TLS.
    pub fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    /// Whether the client authenticates with SASL.
    pub fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// `sasl.mechanism`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// `PLAIN`: username and password (use it over TLS).
    Plain,
    /// `SCRAM-SHA-256`.
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
    /// `OAUTHBEARER`: a token read from a file (`token_file`), refreshed
    /// from it before it expires.
    OAuthBearer,
}

impl Mechanism {
    /// The manifest's spellings (librdkafka's).
    pub const VALUES: &'static str =
        "\"PLAIN\", \"SCRAM-SHA-256\", \"SCRAM-SHA-512\", \"OAUTHBEARER\"";

    /// From the manifest's spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "PLAIN" => Self::Plain,
            "SCRAM-SHA-256" => Self::ScramSha256,
            "SCRAM-SHA-512" => Self::ScramSha512,
            "OAUTHBEARER" => Self::OAuthBearer,
            _ => return None,
        })
    }

    /// librdkafka's value.
    pub fn librdkafka(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::OAuthBearer => "OAUTHBEARER",
        }
    }
}

/// Where a secret comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Secret {
    /// An environment variable of the `dima` process.
    Env(String),
    /// A file (its contents, one trailing newline removed).
    File(PathBuf),
}

impl Secret {
    /// The secret's text, or why it cannot be read (naming the variable or
    /// file, never the secret).
    pub fn read(&self) -> Result<String, String> {
        match self {
            Self::Env(name) => std::env::var(name).map_err(|_| {
                format!("the environment variable {name} is not set (or is not UTF-8)")
            }),
            Self::File(path) => std::fs::read_to_string(path)
                .map(|text| {
                    text.strip_suffix('\n')
                        .map(|t| t.strip_suffix('\r').unwrap_or(t))
                        .unwrap_or(&text)
                        .to_owned()
                })
                .map_err(|e| format!("{}: {e}", path.display())),
        }
    }
}

/// TLS and SASL settings (`[pipelines.<name>.source.security]`,
/// `.sink.security`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Security {
    /// `protocol`.
    pub protocol: Protocol,
    /// `ca_file`: the CA certificates (PEM) that verify the brokers; the
    /// system's when unset.
    pub ca_file: Option<PathBuf>,
    /// `cert_file`: the client certificate (PEM), for brokers that ask
    /// for one.
    pub cert_file: Option<PathBuf>,
    /// `key_file`: the client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// `key_password_env` / `key_password_file`.
    pub key_password: Option<Secret>,
    /// `sasl_mechanism`.
    pub mechanism: Option<Mechanism>,
    /// `username`.
    pub username: Option<String>,
    /// `password_env` / `password_file`.
    pub password: Option<Secret>,
    /// `token_file` (OAUTHBEARER): a file holding the current token, which
    /// something else (a sidecar, a projected service-account token)
    /// keeps fresh.
    pub token_file: Option<PathBuf>,
}

/// A producer's `compression.type` (`compression` in the manifest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// `none`: librdkafka's default.
    #[default]
    None,
    /// `gzip`.
    Gzip,
    /// `snappy`.
    Snappy,
    /// `lz4`.
    Lz4,
    /// `zstd`.
    Zstd,
}

impl Compression {
    /// The manifest's spellings.
    pub const VALUES: &'static str = "\"none\", \"gzip\", \"snappy\", \"lz4\", \"zstd\"";

    /// From the manifest's spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "none" => Self::None,
            "gzip" => Self::Gzip,
            "snappy" => Self::Snappy,
            "lz4" => Self::Lz4,
            "zstd" => Self::Zstd,
            _ => return None,
        })
    }

    /// librdkafka's value (and the manifest's).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Snappy => "snappy",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

/// The brokers and how a client talks to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientSettings {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// TLS and SASL.
    pub security: Security,
    /// librdkafka properties passed through as they are
    /// (`properties = { "fetch.max.bytes" = "…" }`).
    pub properties: BTreeMap<String, String>,
}

/// Which kind of client a property list is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A source's consumer.
    Consumer,
    /// A sink's producer.
    Producer,
}

/// Properties the security table sets (set them there; secrets never
/// inline).
const SECURITY_OWNED: &[&str] = &[
    "security.protocol",
    "ssl.ca.location",
    "ssl.ca.pem",
    "ssl.certificate.location",
    "ssl.certificate.pem",
    "ssl.key.location",
    "ssl.key.pem",
    "ssl.key.password",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "sasl.oauthbearer.config",
];

/// Properties a source's consumer owns: its offsets, group and partition
/// assignment are Dima's (committed after their epoch completes).
const CONSUMER_OWNED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "partition.assignment.strategy",
    "group.protocol",
    "enable.partition.eof",
];

/// Properties a sink's producer owns: idempotent delivery, and the codec
/// (`compression`).
const PRODUCER_OWNED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "transactional.id",
    "compression.type",
    "compression.codec",
];

/// Refuses the properties Dima owns for `role`: the problem for the first
/// one found, naming it and where to set it instead.
pub fn check_properties(
    properties: &BTreeMap<String, String>,
    role: Role,
) -> Result<(), (String, String)> {
    let owned = match role {
        Role::Consumer => CONSUMER_OWNED,
        Role::Producer => PRODUCER_OWNED,
    };
    for name in properties.keys() {
        if SECURITY_OWNED.contains(&name.as_str()) {
            return Err((
                name.clone(),
                "is set by the security table (protocol, ca_file, cert_file, key_file, sasl_mechanism, username, password_env or password_file), not by properties".into(),
            ));
        }
        if owned.contains(&name.as_str()) {
            let instead = match name.as_str() {
                "bootstrap.servers" | "metadata.broker.list" => "set `brokers`",
                "group.id" => "set `group`",
                "compression.type" | "compression.codec" => "set `compression`",
                _ => match role {
                    Role::Consumer => {
                        "Dima assigns partitions and commits offsets after their epoch completes"
                    }
                    Role::Producer => "Dima's producer is idempotent with acks=all",
                },
            };
            return Err((name.clone(), format!("is owned by Dima: {instead}")));
        }
    }
    Ok(())
}

impl ClientSettings {
    /// Plain brokers, no security, no properties.
    pub fn plain(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// librdkafka's configuration: brokers, security (secrets read now),
    /// then the pass-through properties. An error names what could not be
    /// read.
    pub fn config(&self) -> Result<ClientConfig, String> {
        let mut config = ClientConfig::new();
        self.apply(&mut config)?;
        Ok(config)
    }

    /// Sets [`config`](Self::config)'s settings on `config`, over what it
    /// holds (a client's defaults, which the properties may override).
    pub fn apply(&self, config: &mut ClientConfig) -> Result<(), String> {
        config.set("bootstrap.servers", &self.brokers);
        let s = &self.security;
        config.set("security.protocol", s.protocol.librdkafka());
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        if let Some(ca) = &s.ca_file {
            config.set("ssl.ca.location", path(ca));
        }
        if let Some(cert) = &s.cert_file {
            config.set("ssl.certificate.location", path(cert));
        }
        if let Some(key) = &s.key_file {
            config.set("ssl.key.location", path(key));
        }
        if let Some(secret) = &s.key_password {
            config.set(
                "ssl.key.password",
                secret.read().map_err(|e| format!("key password: {e}"))?,
            );
        }
        if let Some(mechanism) = s.mechanism {
            config.set("sasl.mechanism", mechanism.librdkafka());
        }
        if let Some(user) = &s.username {
            config.set("sasl.username", user);
        }
        if let Some(secret) = &s.password {
            config.set(
                "sasl.password",
                secret.read().map_err(|e| format!("SASL password: {e}"))?,
            );
        }
        for (name, value) in &self.properties {
            config.set(name, value);
        }
        Ok(())
    }
}

impl ClientSettings {
    /// librdkafka's own check of every pass-through property's name and
    /// value (each is set on a native configuration, which connects
    /// nowhere): its reason, naming the property, if one is refused.
    pub fn check(&self) -> Result<(), String> {
        let mut config = ClientConfig::new();
        for (name, value) in &self.properties {
            config.set(name, value);
        }
        config
            .create_native_config()
            .map(|_| ())
            .map_err(|e| match e {
                rdkafka::error::KafkaError::ClientConfig(_, message, name, value) => {
                    if name.contains("password") {
                        format!("librdkafka refuses {name}: {message}")
                    } else {
                        format!("librdkafka refuses {name} = {value:?}: {message}")
                    }
                }
                other => other.to_string(),
            })
    }
}

/// The token of an OAUTHBEARER client: the file's contents (trimmed), its
/// principal the JWT's `sub` claim, its expiry the `exp` claim (or an hour
/// from now when the token is not a JWT with one).
pub fn read_token(path: &std::path::Path) -> Result<rdkafka::client::OAuthToken, String> {
    use base64::Engine;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(format!("{}: the token file is empty", path.display()));
    }
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|part| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part.trim_end_matches('='))
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let lifetime_ms = claims
        .as_ref()
        .and_then(|c| c["exp"].as_i64())
        .map_or(now_ms + 3_600_000, |exp| exp * 1000);
    let principal_name = claims
        .as_ref()
        .and_then(|c| c["sub"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "dima".to_owned());
    Ok(rdkafka::client::OAuthToken {
        token,
        principal_name,
        lifetime_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_properties_are_refused_by_name() {
        let props = |name: &str| BTreeMap::from([(name.to_owned(), "x".to_owned())]);
        let (name, why) = check_properties(&props("group.id"), Role::Consumer).unwrap_err();
        assert_eq!(name, "group.id");
        assert!(why.contains("`group`"), "{why}");
        let (_, why) = check_properties(&props("sasl.password"), Role::Producer).unwrap_err();
        assert!(why.contains("security table"), "{why}");
        let (_, why) = check_properties(&props("compression.type"), Role::Producer).unwrap_err();
        assert!(why.contains("`compression`"), "{why}");
        let (_, why) = check_properties(&props("enable.idempotence"), Role::Producer).unwrap_err();
        assert!(why.contains("idempotent"), "{why}");
        assert!(check_properties(&props("fetch.max.bytes"), Role::Consumer).is_ok());
        assert!(check_properties(&props("client.id"), Role::Producer).is_ok());
    }

    #[test]
    fn secrets_come_from_the_environment_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(Secret::File(file.clone()).read().unwrap(), "s3cret");
        let missing = Secret::Env("DIMA_TEST_SURELY_UNSET_VARIABLE".into())
            .read()
            .unwrap_err();
        assert!(
            missing.contains("DIMA_TEST_SURELY_UNSET_VARIABLE"),
            "{missing}"
        );
        let gone = Secret::File(dir.path().join("nope")).read().unwrap_err();
        assert!(gone.contains("nope"), "{gone}");
    }

    #[test]
    fn a_jwt_token_gives_its_subject_and_expiry() {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"svc-dima","exp":2000000000}"#);
        let file = dir.path().join("token");
        std::fs::write(&file, format!("eyJhbGciOiJub25lIn0.{claims}.\n")).unwrap();
        let Ok(token) = read_token(&file) else {
            panic!("the token reads");
        };
        assert_eq!(token.principal_name, "svc-dima");
        assert_eq!(token.lifetime_ms, 2_000_000_000_000);
        assert!(!token.token.ends_with('\n'));
        std::fs::write(&file, "").unwrap();
        let Err(empty) = read_token(&file) else {
            panic!("an empty token file is an error");
        };
        assert!(empty.contains("empty"), "{empty}");
    }
}
