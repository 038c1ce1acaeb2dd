//! Kafka through rdkafka: the source with offsets committed after their
//! epoch completes, the idempotent producer behind the Kafka sink, and topic
//! administration for `dima events generate --to kafka:…`.
//!
//! **Partition ownership.** Worker `w` of `W` owns partitions `p` with
//! `p % W == w` and assigns them to its own consumer (`assign`, not
//! `subscribe`): a timely cluster has a fixed set of workers, so static
//! ownership needs no rebalancing, and a restarted cluster resumes at once.
//! Offsets are stored in the consumer group `group` on the broker, so other
//! tools (`kafka-consumer-groups`, `kcat -G`) see them.
//!
//! **Commit protocol.** The source remembers, for every epoch it closes, the
//! next offset of each of its partitions. When the pipeline's probe says an
//! epoch is complete at every output (sinks flushed), those offsets are
//! committed synchronously. After a crash the cluster restarts from the last
//! committed offsets: every event is processed at least once, and the events
//! of epochs that were in flight at the crash are processed again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::source::{Origin, Record, RecordSource, SourceError};

/// How long one metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a Kafka source stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// At the end of each partition as it was when the source connected.
    End,
    /// Never: it runs until the process is stopped.
    Stopped,
}

mod client;

pub use client::{
    ClientSettings, Compression, Mechanism, Protocol, Role, Secret, Security, check_properties,
    read_token,
};

/// How long a source waits for its topic to exist before the run ends with
/// an error, unless the manifest says otherwise (`missing_topic_timeout_s`).
pub const MISSING_TOPIC_TIMEOUT: Duration = Duration::from_secs(60);

/// A Kafka source's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaSourceSpec {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// The topic.
    pub topic: String,
    /// Consumer group that holds the committed offsets.
    pub group: String,
    /// Where to stop.
    pub until: Until,
    /// Read no faster than this across the cluster; `None` is unthrottled.
    pub events_per_second: Option<f64>,
    /// TLS and SASL.
    pub security: Security,
    /// librdkafka properties passed through ([`check_properties`]).
    pub properties: BTreeMap<String, String>,
    /// How long the topic may be missing before the run ends.
    pub missing_topic_timeout: Duration,
}

impl KafkaSourceSpec {
    /// Plain settings: no security, no properties, the default timeout.
    pub fn new(brokers: &str, topic: &str, group: &str, until: Until) -> Self {
        Self {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            until,
            events_per_second: None,
            security: Security::default(),
            properties: BTreeMap::new(),
            missing_topic_timeout: MISSING_TOPIC_TIMEOUT,
        }
    }

    /// The client settings.
    pub fn client(&self) -> ClientSettings {
        ClientSettings {
            brokers: self.brokers.clone(),
            security: self.security.clone(),
            properties: self.properties.clone(),
        }
    }
}

/// A Kafka sink's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaSinkSpec {
    /// Bootstrap servers.
    pub brokers: String,
    /// The topic.
    pub topic: String,
    /// TLS and SASL.
    pub security: Security,
    /// librdkafka properties passed through ([`check_properties`]).
    pub properties: BTreeMap<String, String>,
    /// The codec of the batches it writes.
    pub compression: Compression,
}

impl KafkaSinkSpec {
    /// Plain settings: no security, no properties, no compression.
    pub fn new(brokers: &str, topic: &str) -> Self {
        Self {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            security: Security::default(),
            properties: BTreeMap::new(),
            compression: Compression::None,
        }
    }

    /// The client settings.
    pub fn client(&self) -> ClientSettings {
        ClientSettings {
            brokers: self.brokers.clone(),
            security: self.security.clone(),
            properties: self.properties.clone(),
        }
    }
}

/// Whether a librdkafka error will not go away by retrying: a codec this
/// build cannot decode, TLS that fails (a certificate that does not
/// verify), authentication or authorization refused. Anything else (a
/// broker down, a leader moving) is retried.
pub fn persistent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::NotImplemented
            | RDKafkaErrorCode::SSL
            | RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::UnsupportedCompressionType
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
    )
}

/// What librdkafka's statistics say of one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionStats {
    /// The high watermark (the offset the next message will get).
    pub high: i64,
    /// Whether its fetcher is active against a leader that is up.
    pub fetching: bool,
}

/// Routes librdkafka's own log lines to `tracing`, keeps the first
/// persistent error ([`persistent`]) it reports and the latest statistics
/// of each partition, and hands out the OAUTHBEARER token when the client
/// uses one.
#[derive(Debug, Default)]
pub struct TracingContext {
    /// The first persistent error librdkafka reported.
    fatal: Mutex<Option<String>>,
    /// OAUTHBEARER's token file.
    token_file: Option<std::path::PathBuf>,
    /// Per partition of the topic, from the last statistics report.
    partitions: Mutex<BTreeMap<i32, PartitionStats>>,
    /// The topic whose partitions are kept.
    topic: String,
}

impl TracingContext {
    /// A context for a client of `topic` with `security`.
    pub fn new(security: &Security, topic: &str) -> Self {
        Self {
            fatal: Mutex::new(None),
            token_file: (security.mechanism == Some(Mechanism::OAuthBearer))
                .then(|| security.token_file.clone())
                .flatten(),
            partitions: Mutex::new(BTreeMap::new()),
            topic: topic.to_owned(),
        }
    }

    /// The partitions' statistics since the last call (taken).
    pub fn take_stats(&self) -> BTreeMap<i32, PartitionStats> {
        self.partitions
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// The first persistent error reported, if any.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().ok().and_then(|f| f.clone())
    }
}

/// librdkafka's log line at the level `tracing` gives it.
fn log_line(level: RDKafkaLogLevel, fac: &str, log_message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
        RDKafkaLogLevel::Warning | RDKafkaLogLevel::Notice => {
            tracing::info!(target: "librdkafka", fac, "{log_message}");
        }
        _ => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
    }
}

impl ClientContext for TracingContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", %error, "{reason}");
        if error.rdkafka_error_code().is_some_and(persistent)
            && let Ok(mut fatal) = self.fatal.lock()
        {
            fatal.get_or_insert_with(|| format!("{error}: {reason}"));
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let up: Vec<i32> = statistics
            .brokers
            .values()
            .filter(|b| b.state == "UP")
            .map(|b| b.nodeid)
            .collect();
        let Ok(mut partitions) = self.partitions.lock() else {
            return;
        };
        for p in topic.partitions.values() {
            // librdkafka also reports the internal partition -1.
            if p.partition < 0 {
                continue;
            }
            partitions.insert(
                p.partition,
                PartitionStats {
                    high: p.hi_offset,
                    fetching: p.fetch_state == "active" && up.contains(&p.leader),
                },
            );
        }
    }

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        let Some(path) = &self.token_file else {
            return Err("sasl_mechanism = \"OAUTHBEARER\" needs token_file".into());
        };
        read_token(path).map_err(Into::into)
    }
}

impl ConsumerContext for TracingContext {}

enum State {
    /// Not yet connected: next attempt at this time, with this backoff.
    Connecting { next: Instant, backoff: Duration },
    /// Partitions assigned.
    Reading,
}

/// One worker's share of a topic.
pub struct KafkaSource {
    spec: KafkaSourceSpec,
    pipeline: String,
    worker: usize,
    workers: usize,
    consumer: BaseConsumer<TracingContext>,
    state: State,
    /// Partitions owned and, with `Until::End`, the offset to stop at.
    partitions: BTreeMap<i32, Option<i64>>,
    /// Next offset to read per partition.
    position: BTreeMap<i32, i64>,
    /// Positions at each closed epoch not yet committed.
    closed: VecDeque<(u64, BTreeMap<i32, i64>)>,
    committed: BTreeMap<i32, i64>,
    /// When the first connection attempt began (for the missing-topic
    /// timeout).
    first_attempt: Instant,
    /// When each partition last fetched successfully (a message, or the
    /// statistics showing its fetcher active against a leader that is up).
    fetched: BTreeMap<i32, Instant>,
    /// Each partition's high watermark, from the statistics.
    high: BTreeMap<i32, i64>,
    /// The lag and fetch-age gauges.
    metrics: Option<crate::metrics::KafkaMetrics>,
    /// When the gauges were last set.
    gauged: Instant,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("spec", &self.spec)
            .field("worker", &self.worker)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

fn client_error(spec: &KafkaSourceSpec, e: impl std::fmt::Display) -> SourceError {
    SourceError::Kafka {
        brokers: spec.brokers.clone(),
        topic: spec.topic.clone(),
        reason: e.to_string(),
    }
}

impl KafkaSource {
    /// A source for worker `worker` of `workers`; connects lazily, so a
    /// broker that is down at start-up is retried with backoff.
    pub fn new(
        spec: &KafkaSourceSpec,
        pipeline: &str,
        worker: usize,
        workers: usize,
    ) -> Result<Self, SourceError> {
        let mut config = ClientConfig::new();
        // Defaults the manifest's `properties` may override.
        config
            .set("client.id", format!("dima-{pipeline}-w{worker}"))
            .set("reconnect.backoff.max.ms", "2000")
            .set("statistics.interval.ms", "1000");
        spec.client()
            .apply(&mut config)
            .map_err(|e| client_error(spec, e))?;
        let consumer: BaseConsumer<TracingContext> = config
            .set("group.id", &spec.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create_with_context(TracingContext::new(&spec.security, &spec.topic))
            .map_err(|e| client_error(spec, e))?;
        Ok(Self {
            spec: spec.clone(),
            pipeline: pipeline.to_owned(),
            worker,
            workers: workers.max(1),
            consumer,
            state: State::Connecting {
                next: Instant::now(),
                backoff: Duration::from_millis(250),
            },
            partitions: BTreeMap::new(),
            position: BTreeMap::new(),
            closed: VecDeque::new(),
            committed: BTreeMap::new(),
            first_attempt: Instant::now(),
            fetched: BTreeMap::new(),
            high: BTreeMap::new(),
            metrics: None,
            gauged: Instant::now(),
        })
    }

    /// Publishes each partition's lag and fetch age on `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::KafkaMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Records per owned partition between its high watermark (as last
    /// reported) and the next offset this source reads.
    pub fn lag(&self) -> BTreeMap<i32, i64> {
        self.position
            .iter()
            .filter_map(|(p, at)| self.high.get(p).map(|h| (*p, (h - at).max(0))))
            .collect()
    }

    /// Takes the statistics librdkafka reported and sets the gauges (at
    /// most once a second).
    fn observe(&mut self) {
        let now = Instant::now();
        for (p, stats) in self.consumer.context().take_stats() {
            if !self.partitions.contains_key(&p) {
                continue;
            }
            if stats.high >= 0 {
                self.high.insert(p, stats.high);
            }
            if stats.fetching {
                self.fetched.insert(p, now);
            }
        }
        if now.duration_since(self.gauged) < Duration::from_secs(1) {
            return;
        }
        self.gauged = now;
        let Some(metrics) = &self.metrics else {
            return;
        };
        for (p, lag) in self.lag() {
            metrics.set_lag(&self.spec.topic, p, lag);
        }
        for p in self.partitions.keys() {
            let since = self.fetched.get(p).copied().unwrap_or(self.first_attempt);
            metrics.set_fetch_age(
                &self.spec.topic,
                *p,
                now.duration_since(since).as_secs_f64(),
            );
        }
    }

    /// The persistent error librdkafka reported, as the source's error.
    fn fatal(&self) -> Option<SourceError> {
        let fatal = self.consumer.context().fatal()?;
        let partitions: Vec<i32> = self.partitions.keys().copied().collect();
        let which = if partitions.is_empty() {
            String::new()
        } else {
            format!("partitions {partitions:?}: ")
        };
        Some(client_error(
            &self.spec,
            format!("{which}{fatal} (not retried: it does not go away by retrying)"),
        ))
    }

    /// Finds this worker's partitions and their start (and end) offsets.
    fn connect(&mut self) -> Result<(), KafkaError> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.spec.topic), REQUEST_TIMEOUT)?;
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.spec.topic)
            .ok_or(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition,
            ))?;
        if let Some(e) = topic.error() {
            return Err(KafkaError::MetadataFetch(e.into()));
        }
        let count = topic.partitions().len();
        if count == 0 {
            return Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition,
            ));
        }
        let mine: Vec<i32> = (0..count as i32)
            .filter(|p| *p as usize % self.workers == self.worker)
            .collect();
        let mut request = TopicPartitionList::new();
        for &p in &mine {
            request.add_partition(&self.spec.topic, p);
        }
        let committed = self.consumer.committed_offsets(request, REQUEST_TIMEOUT)?;
        let mut assignment = TopicPartitionList::new();
        self.partitions.clear();
        self.position.clear();
        for &p in &mine {
            let (low, high) =
                self.consumer
                    .fetch_watermarks(&self.spec.topic, p, REQUEST_TIMEOUT)?;
            let start = committed
                .find_partition(&self.spec.topic, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(low)
                .max(low);
            assignment
                .add_partition_offset(&self.spec.topic, p, Offset::Offset(start))
                .map_err(|e| e.clone())?;
            self.position.insert(p, start);
            self.committed.insert(p, start);
            let stop = (self.spec.until == Until::End).then_some(high);
            self.partitions.insert(p, stop);
        }
        self.consumer.assign(&assignment)?;
        tracing::info!(
            pipeline = %self.pipeline,
            topic = %self.spec.topic,
            group = %self.spec.group,
            partitions = ?self.partitions.keys().collect::<Vec<_>>(),
            start = ?self.position,
            "kafka source connected"
        );
        self.state = State::Reading;
        Ok(())
    }

    fn at_end(&self) -> bool {
        self.partitions
            .iter()
            .all(|(p, stop)| stop.is_some_and(|s| self.position.get(p).is_some_and(|&at| at >= s)))
    }
}

impl RecordSource for KafkaSource {
    fn fill(&mut self, max: usize, out: &mut Vec<Record>) -> Result<bool, SourceError> {
        if let Some(fatal) = self.fatal() {
            return Err(fatal);
        }
        if let State::Connecting { next, backoff } = self.state {
            if Instant::now() < next {
                std::thread::sleep(Duration::from_millis(5));
                return Ok(true);
            }
            if let Err(e) = self.connect() {
                // librdkafka hands a consumer its logs and errors through its
                // poll (the error also reaches the context, `fatal`): serve
                // what is queued, so that a failed authentication or TLS
                // handshake ends the run instead of being retried. Nothing
                // is assigned yet, so no message comes; a poll that served a
                // log line answers `None` too, so this does not stop there.
                for _ in 0..256 {
                    let _ = self.consumer.poll(Duration::ZERO);
                }
                if let Some(fatal) = self.fatal() {
                    return Err(fatal);
                }
                if e.rdkafka_error_code().is_some_and(persistent) {
                    return Err(client_error(
                        &self.spec,
                        format!("{e} (not retried: it does not go away by retrying)"),
                    ));
                }
                let waited = self.first_attempt.elapsed();
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
                    )
                ) && waited >= self.spec.missing_topic_timeout
                {
                    return Err(client_error(
                        &self.spec,
                        format!(
                            "the topic does not exist after {:.0} s (missing_topic_timeout_s)",
                            waited.as_secs_f64()
                        ),
                    ));
                }
                tracing::warn!(
                    pipeline = %self.pipeline,
                    brokers = %self.spec.brokers,
                    topic = %self.spec.topic,
                    error = %e,
                    retry_in_ms = backoff.as_millis() as u64,
                    "kafka source cannot reach the topic; retrying"
                );
                self.state = State::Connecting {
                    next: Instant::now() + backoff,
                    backoff: (backoff * 2).min(Duration::from_secs(10)),
                };
                return Ok(true);
            }
        }
        if self.at_end() {
            return Ok(false);
        }
        // The first poll waits up to 20 ms for a message; the rest take what
        // is queued without waiting, so reading costs no clock read per
        // message (it did: a fifth of a worker's time).
        let started = Instant::now();
        let wanted = out.len() + max;
        let mut wait = Duration::from_millis(20);
        let mut seen: Vec<i32> = Vec::new();
        while out.len() < wanted {
            let Some(result) = self.consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            match result {
                Ok(message) => {
                    let partition = message.partition();
                    let offset = message.offset();
                    if !seen.contains(&partition) {
                        seen.push(partition);
                    }
                    // With `Until::End` a partition stops at its end offset.
                    if let Some(Some(stop)) = self.partitions.get(&partition)
                        && offset >= *stop
                    {
                        continue;
                    }
                    self.position.insert(partition, offset + 1);
                    out.push(Record {
                        payload: message.payload().unwrap_or_default().to_vec(),
                        origin: Origin::Kafka {
                            topic: self.spec.topic.clone(),
                            partition,
                            offset,
                        },
                        offset: offset.max(0) as u64,
                    });
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    if !seen.contains(&p) {
                        seen.push(p);
                    }
                }
                Err(e) if e.rdkafka_error_code().is_some_and(persistent) => {
                    let partitions: Vec<i32> = self.partitions.keys().copied().collect();
                    return Err(client_error(
                        &self.spec,
                        format!(
                            "reading partitions {partitions:?}: {e} (not retried: it does not go away by retrying)"
                        ),
                    ));
                }
                Err(e) => {
                    tracing::warn!(
                        pipeline = %self.pipeline,
                        topic = %self.spec.topic,
                        error = %e,
                        "kafka poll failed; librdkafka retries"
                    );
                    break;
                }
            }
        }
        for p in seen {
            self.fetched.insert(p, started);
        }
        self.observe();
        if let Some(fatal) = self.fatal() {
            return Err(fatal);
        }
        Ok(!self.at_end())
    }

    fn final_lag(&mut self) -> Option<u64> {
        if !matches!(self.state, State::Reading) {
            return None;
        }
        let mut total = 0;
        for (&p, &at) in &self.position {
            match self
                .consumer
                .fetch_watermarks(&self.spec.topic, p, REQUEST_TIMEOUT)
            {
                Ok((_, high)) => {
                    self.high.insert(p, high);
                }
                Err(e) => tracing::warn!(
                    pipeline = %self.pipeline,
                    topic = %self.spec.topic,
                    partition = p,
                    error = %e,
                    "kafka high watermark not available; the last reported one is used"
                ),
            }
            let lag = self.high.get(&p).map_or(0, |h| (h - at).max(0));
            if let Some(metrics) = &self.metrics {
                metrics.set_lag(&self.spec.topic, p, lag);
            }
            total += lag as u64;
        }
        Some(total)
    }

    fn epoch_closed(&mut self, epoch: u64) {
        if self.closed.back().is_some_and(|(_, p)| *p == self.position) {
            return;
        }
        self.closed.push_back((epoch, self.position.clone()));
    }

    fn shares(&self) -> Vec<u32> {
        self.partitions.keys().map(|&p| p as u32).collect()
    }

    fn share_finished(&self, share: u32) -> bool {
        let p = share as i32;
        self.partitions.get(&p).is_some_and(|stop| {
            stop.is_some_and(|s| self.position.get(&p).is_some_and(|&at| at >= s))
        })
    }

    fn unbounded(&self) -> bool {
        self.spec.until != Until::End
    }

    fn complete_below(&mut self, epoch: u64) -> Result<(), SourceError> {
        let mut latest = None;
        while self.closed.front().is_some_and(|(e, _)| *e < epoch) {
            latest = self.closed.pop_front().map(|(_, p)| p);
        }
        let Some(positions) = latest else {
            return Ok(());
        };
        let mut list = TopicPartitionList::new();
        for (&p, &next) in &positions {
            if self.committed.get(&p) != Some(&next) {
                list.add_partition_offset(&self.spec.topic, p, Offset::Offset(next))
                    .map_err(|e| client_error(&self.spec, e))?;
            }
        }
        if list.count() == 0 {
            return Ok(());
        }
        match self.consumer.commit(&list, CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
                tracing::debug!(pipeline = %self.pipeline, below = epoch, offsets = ?positions, "committed");
                self.committed.extend(positions);
                Ok(())
            }
            Err(e) => {
                // Not fatal: the next completed epoch commits a later offset,
                // and a crash before then only replays more.
                tracing::warn!(pipeline = %self.pipeline, error = %e, "kafka commit failed; will retry with the next epoch");
                Ok(())
            }
        }
    }
}

/// Counts delivery failures of the producer (and, as the consumer's
/// context does, keeps persistent errors and hands out OAUTHBEARER tokens).
#[derive(Debug, Default)]
pub struct DeliveryContext {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    client: TracingContext,
}

impl ClientContext for DeliveryContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.client.error(error, reason);
    }

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        self.client.generate_oauth_token(config)
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _opaque: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// An idempotent producer that reports failed deliveries at `flush`.
pub struct KafkaProducer {
    producer: BaseProducer<DeliveryContext>,
    topic: String,
    brokers: String,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaProducer {
    /// A producer for `spec.topic` (`enable.idempotence`, `acks=all`, the
    /// sink's codec); an error names what could not be set up.
    pub fn new(spec: &KafkaSinkSpec) -> Result<Self, KafkaOpError> {
        let mut config = ClientConfig::new();
        // Defaults the manifest's `properties` may override.
        config
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000");
        spec.client()
            .apply(&mut config)
            .map_err(|reason| KafkaOpError::Setup {
                brokers: spec.brokers.clone(),
                reason,
            })?;
        let context = DeliveryContext {
            client: TracingContext::new(&spec.security, &spec.topic),
            ..DeliveryContext::default()
        };
        let producer = config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", spec.compression.name())
            .create_with_context(context)
            .map_err(|e| KafkaOpError::Client {
                brokers: spec.brokers.clone(),
                source: Box::new(e),
            })?;
        Ok(Self {
            producer,
            topic: spec.topic.clone(),
            brokers: spec.brokers.clone(),
        })
    }

    /// Queues one message; waits for room when the local queue is full.
    pub fn send(&self, key: &[u8], payload: &[u8]) -> Result<(), KafkaError> {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Waits until every queued message is delivered or has failed; an
    /// error names how many failed and the first reason.
    pub fn flush(&self) -> Result<(), KafkaOpError> {
        // A second at a time, so that a persistent error (TLS that does
        // not verify, authentication refused) ends the wait at once rather
        // than when the messages time out.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(fatal) = self.producer.context().client.fatal() {
                return Err(KafkaOpError::Fatal {
                    brokers: self.brokers.clone(),
                    topic: self.topic.clone(),
                    reason: fatal,
                });
            }
            match self.producer.flush(Duration::from_secs(1)) {
                Ok(()) => break,
                Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
                    if Instant::now() < deadline => {}
                Err(e) => {
                    return Err(KafkaOpError::Flush {
                        brokers: self.brokers.clone(),
                        topic: self.topic.clone(),
                        source: Box::new(e),
                    });
                }
            }
        }
        let failed = self.producer.context().failed.swap(0, Ordering::Relaxed);
        if failed > 0 {
            let first = self
                .producer
                .context()
                .first_error
                .lock()
                .ok()
                .and_then(|mut f| f.take())
                .unwrap_or_default();
            return Err(KafkaOpError::Undelivered {
                brokers: self.brokers.clone(),
                topic: self.topic.clone(),
                failed,
                first,
            });
        }
        Ok(())
    }
}

/// What went wrong talking to Kafka outside the source and sink (topic
/// administration, the producer's final flush, the bench's plain reader).
#[derive(Debug, thiserror::Error)]
pub enum KafkaOpError {
    /// The client's settings could not be put together (a secret that
    /// cannot be read).
    #[error("kafka {brokers}: {reason}")]
    Setup {
        /// Bootstrap servers.
        brokers: String,
        /// Why.
        reason: String,
    },
    /// librdkafka reported an error that retrying does not cure.
    #[error(
        "kafka {brokers} topic {topic}: {reason} (not retried: it does not go away by retrying)"
    )]
    Fatal {
        /// Bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// librdkafka's error and reason.
        reason: String,
    },
    /// The client could not be created.
    #[error("kafka {brokers}: {source}")]
    Client {
        /// Bootstrap servers.
        brokers: String,
        /// Why.
        source: Box<KafkaError>,
    },
    /// A topic operation failed.
    #[error("kafka {brokers} topic {topic}: {source}")]
    Topic {
        /// Bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// Why.
        source: Box<KafkaError>,
    },
    /// A topic could not be created.
    #[error("kafka {brokers}: creating topic {topic}: {reason}")]
    CreateTopic {
        /// Bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// The broker's answer.
        reason: String,
    },
    /// Waiting for queued messages failed.
    #[error("kafka {brokers} topic {topic}: flush: {source}")]
    Flush {
        /// Bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// Why.
        source: Box<KafkaError>,
    },
    /// Messages were not delivered.
    #[error("kafka {brokers} topic {topic}: {failed} message(s) not delivered: {first}")]
    Undelivered {
        /// Bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// How many failed.
        failed: u64,
        /// The first failure's reason.
        first: String,
    },
    /// Fewer messages than expected arrived in time.
    #[error("kafka {brokers} topic {topic}: only {read} of {expected} messages in 10 minutes")]
    Slow {
        /// Bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// Messages read.
        read: u64,
        /// Messages expected.
        expected: u64,
    },
}

/// Creates `topic` with `partitions` partitions unless it exists.
pub fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), KafkaOpError> {
    let client = |e| KafkaOpError::Client {
        brokers: brokers.to_owned(),
        source: Box::new(e),
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(client)?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let create = |topic: &str, reason: String| KafkaOpError::CreateTopic {
        brokers: brokers.to_owned(),
        topic: topic.to_owned(),
        reason,
    };
    let results = futures_executor::block_on(admin.create_topics([&new], &options))
        .map_err(|e| create(topic, e.to_string()))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(create(&name, code.to_string())),
        }
    }
    Ok(())
}

/// Reads every message of `topic` from the beginning with one plain
/// consumer (no group, no parsing) until `expected` messages have arrived:
/// the ceiling `dima bench events` compares the Kafka source with.
pub fn drain_topic(brokers: &str, topic: &str, expected: u64) -> Result<u64, KafkaOpError> {
    let on_topic = |e| KafkaOpError::Topic {
        brokers: brokers.to_owned(),
        topic: topic.to_owned(),
        source: Box::new(e),
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "dima-bench-ceiling")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| KafkaOpError::Client {
            brokers: brokers.to_owned(),
            source: Box::new(e),
        })?;
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(on_topic)?;
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len()) as i32;
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(on_topic)?;
    }
    consumer.assign(&list).map_err(on_topic)?;
    let mut read = 0u64;
    let started = Instant::now();
    while read < expected {
        if started.elapsed() > Duration::from_secs(600) {
            return Err(KafkaOpError::Slow {
                brokers: brokers.to_owned(),
                topic: topic.to_owned(),
                read,
                expected,
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                read += 1;
                std::hint::black_box(message.payload().map(<[u8]>::len));
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => return Err(on_topic(e)),
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;

    use super::*;

    fn drain(source: &mut KafkaSource) -> Vec<Record> {
        let mut out = Vec::new();
        let started = Instant::now();
        while source.fill(100, &mut out).unwrap() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "stuck at {source:?}"
            );
        }
        out
    }

    /// On librdkafka's mock cluster: two workers split four partitions, read
    /// to the end, commit; a second run with the same group reads only what
    /// was produced after the commit.
    #[test]
    fn partitions_split_offsets_commit_and_resume() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("ads", 4, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let sink = KafkaSinkSpec::new(&brokers, "ads");
        let producer = KafkaProducer::new(&sink).unwrap();
        for i in 0u64..1000 {
            producer
                .send(&i.to_be_bytes(), format!("event {i}").as_bytes())
                .unwrap();
        }
        producer.flush().unwrap();

        let spec = KafkaSourceSpec::new(&brokers, "ads", "g", Until::End);
        let mut seen = Vec::new();
        for worker in 0..2 {
            let mut source = KafkaSource::new(&spec, "ads", worker, 2).unwrap();
            let records = drain(&mut source);
            assert!(records.iter().all(|r| matches!(r.origin, Origin::Kafka { partition, .. } if partition as usize % 2 == worker)));
            seen.extend(
                records
                    .into_iter()
                    .map(|r| String::from_utf8(r.payload).unwrap()),
            );
            source.epoch_closed(0);
            source.complete_below(1).unwrap();
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 1000);

        for i in 1000u64..1100 {
            producer
                .send(&i.to_be_bytes(), format!("event {i}").as_bytes())
                .unwrap();
        }
        producer.flush().unwrap();
        let mut again = Vec::new();
        for worker in 0..2 {
            let mut source = KafkaSource::new(&spec, "ads", worker, 2).unwrap();
            again.extend(
                drain(&mut source)
                    .into_iter()
                    .map(|r| String::from_utf8(r.payload).unwrap()),
            );
        }
        again.sort();
        let expected: Vec<String> = {
            let mut v: Vec<String> = (1000..1100).map(|i| format!("event {i}")).collect();
            v.sort();
            v
        };
        assert_eq!(again, expected);
    }

    /// Every codec through librdkafka's mock cluster: the sink's producer
    /// writes with it, the source reads every message back.
    #[test]
    fn every_codec_round_trips() {
        for codec in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let cluster = MockCluster::new(1).unwrap();
            cluster.create_topic("ads", 2, 1).unwrap();
            let brokers = cluster.bootstrap_servers();
            let mut sink = KafkaSinkSpec::new(&brokers, "ads");
            sink.compression = codec;
            let producer = KafkaProducer::new(&sink).unwrap();
            for i in 0u64..500 {
                let line = format!("event {i} {}", "x".repeat(64));
                producer.send(&i.to_be_bytes(), line.as_bytes()).unwrap();
            }
            producer.flush().unwrap();
            let spec = KafkaSourceSpec::new(&brokers, "ads", "g", Until::End);
            let mut source = KafkaSource::new(&spec, "ads", 0, 1).unwrap();
            let mut read: Vec<String> = drain(&mut source)
                .into_iter()
                .map(|r| String::from_utf8(r.payload).unwrap())
                .collect();
            read.sort();
            read.dedup();
            assert_eq!(read.len(), 500, "{codec:?}");
        }
    }

    #[test]
    fn an_unreachable_broker_is_retried_not_fatal() {
        let spec = KafkaSourceSpec::new("127.0.0.1:1", "ads", "g", Until::End);
        let mut source = KafkaSource::new(&spec, "ads", 0, 1).unwrap();
        let mut out = Vec::new();
        // Still connecting: more to come, nothing read, no error.
        assert!(source.fill(10, &mut out).unwrap());
        assert!(out.is_empty());
        assert!(matches!(source.state, State::Connecting { .. }));
    }
}
