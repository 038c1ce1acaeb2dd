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
}

/// A Kafka sink's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaSinkSpec {
    /// Bootstrap servers.
    pub brokers: String,
    /// The topic.
    pub topic: String,
}

/// Routes librdkafka's own log lines to `tracing`.
#[derive(Debug, Default)]
pub struct TracingContext;

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
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

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", %error, "{reason}");
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

fn client_error(spec: &KafkaSourceSpec, e: KafkaError) -> SourceError {
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
        let consumer: BaseConsumer<TracingContext> = ClientConfig::new()
            .set("bootstrap.servers", &spec.brokers)
            .set("group.id", &spec.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("client.id", format!("dima-{pipeline}-w{worker}"))
            .set("reconnect.backoff.max.ms", "2000")
            .create_with_context(TracingContext)
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
        })
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
        if let State::Connecting { next, backoff } = self.state {
            if Instant::now() < next {
                std::thread::sleep(Duration::from_millis(5));
                return Ok(true);
            }
            if let Err(e) = self.connect() {
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
        let deadline = Instant::now() + Duration::from_millis(20);
        let wanted = out.len() + max;
        while out.len() < wanted {
            let timeout = deadline.saturating_duration_since(Instant::now());
            let Some(result) = self.consumer.poll(timeout) else {
                break;
            };
            match result {
                Ok(message) => {
                    let partition = message.partition();
                    let offset = message.offset();
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
                    });
                }
                Err(KafkaError::PartitionEOF(_)) => {}
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
            if Instant::now() >= deadline {
                break;
            }
        }
        Ok(!self.at_end())
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

/// Counts delivery failures of the producer.
#[derive(Debug, Default)]
pub struct DeliveryContext {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        TracingContext.log(level, fac, log_message);
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
    /// A producer for `spec.topic` (`enable.idempotence`, `acks=all`).
    pub fn new(spec: &KafkaSinkSpec) -> Result<Self, KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &spec.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .create_with_context(DeliveryContext::default())?;
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
        self.producer
            .flush(Duration::from_secs(60))
            .map_err(|e| KafkaOpError::Flush {
                brokers: self.brokers.clone(),
                topic: self.topic.clone(),
                source: Box::new(e),
            })?;
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
        let sink = KafkaSinkSpec {
            brokers: brokers.clone(),
            topic: "ads".into(),
        };
        let producer = KafkaProducer::new(&sink).unwrap();
        for i in 0u64..1000 {
            producer
                .send(&i.to_be_bytes(), format!("event {i}").as_bytes())
                .unwrap();
        }
        producer.flush().unwrap();

        let spec = KafkaSourceSpec {
            brokers,
            topic: "ads".into(),
            group: "g".into(),
            until: Until::End,
            events_per_second: None,
        };
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

    #[test]
    fn an_unreachable_broker_is_retried_not_fatal() {
        let spec = KafkaSourceSpec {
            brokers: "127.0.0.1:1".into(),
            topic: "ads".into(),
            group: "g".into(),
            until: Until::End,
            events_per_second: None,
        };
        let mut source = KafkaSource::new(&spec, "ads", 0, 1).unwrap();
        let mut out = Vec::new();
        // Still connecting: more to come, nothing read, no error.
        assert!(source.fill(10, &mut out).unwrap());
        assert!(out.is_empty());
        assert!(matches!(source.state, State::Connecting { .. }));
    }
}
