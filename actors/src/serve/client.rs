//! A small load client for the server's streaming completions: what
//! `dima bench serve` and `[inference.load]` send. HTTP is `ureq`'s (chunked
//! transfer, keep-alive, status handling); the stream is read with a
//! server-sent-events parser that follows the WHATWG event-stream rules
//! ([`SseParser`]), so events split across reads or chunks, `\r\n` line
//! ends, comments and multi-line `data` fields all parse.

use std::io::Read;
use std::time::{Duration, Instant};

/// Why a streamed completion failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request could not be sent or its answer read.
    #[error("{url}: {source}")]
    Http {
        /// The endpoint.
        url: String,
        /// Why.
        source: Box<ureq::Error>,
    },
    /// The server answered with an error status.
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        /// The endpoint.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The error body (truncated).
        body: String,
    },
    /// Reading the stream failed.
    #[error("{url}: reading the event stream: {source}")]
    Read {
        /// The endpoint.
        url: String,
        /// Why.
        source: std::io::Error,
    },
    /// An event's data is not JSON.
    #[error("{url}: an event is not JSON ({source}): {data}")]
    Event {
        /// The endpoint.
        url: String,
        /// The event's data.
        data: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The stream ended without an event.
    #[error("{url}: no events in the stream")]
    Empty {
        /// The endpoint.
        url: String,
    },
}

/// What one streamed completion measured.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamStats {
    /// Seconds from sending the request to its first event.
    pub first_event_s: f64,
    /// Seconds between consecutive later events.
    pub gaps_s: Vec<f64>,
    /// `usage.completion_tokens` of the last event that had it (a server
    /// that sends no usage: the chunks with text, one per token).
    pub completion_tokens: u64,
}

/// One streaming completion against `address` (`host:port`): greedy,
/// `max_tokens` tokens of `prompt`, timing each event as it arrives.
pub fn stream_completion(
    address: &str,
    model: &str,
    prompt: &str,
    max_tokens: usize,
    api_key: Option<&str>,
) -> Result<StreamStats, ClientError> {
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
    });
    stream_body(address, &body, api_key)
}

/// One streaming `/v1/completions` request with `body` as given (it must
/// ask for a stream), timed as [`stream_completion`] times it.
pub fn stream_body(
    address: &str,
    body: &serde_json::Value,
    api_key: Option<&str>,
) -> Result<StreamStats, ClientError> {
    let url = format!("http://{address}/v1/completions");
    let body = body.to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into();
    let mut request = agent.post(&url).header("content-type", "application/json");
    if let Some(key) = api_key {
        request = request.header("authorization", &format!("Bearer {key}"));
    }
    let started = Instant::now();
    let http = |source: ureq::Error| ClientError::Http {
        url: url.clone(),
        source: Box::new(source),
    };
    let mut response = request.send(&body).map_err(http)?;
    let status = response.status().as_u16();
    let mut reader = response.body_mut().as_reader();
    if status != 200 {
        let mut text = String::new();
        let _ = reader.by_ref().take(4096).read_to_string(&mut text);
        return Err(ClientError::Status {
            url,
            status,
            body: text.trim().to_owned(),
        });
    }
    let mut parser = SseParser::default();
    let mut buffer = [0u8; 4096];
    let (mut first, mut last, mut gaps, mut tokens) = (None, None, Vec::new(), None);
    let mut chunks = 0u64;
    'read: loop {
        let n = reader
            .read(&mut buffer)
            .map_err(|source| ClientError::Read {
                url: url.clone(),
                source,
            })?;
        if n == 0 {
            break;
        }
        for event in parser.push(&buffer[..n]) {
            if event.data == "[DONE]" {
                break 'read;
            }
            let now = started.elapsed().as_secs_f64();
            let chunk: serde_json::Value =
                serde_json::from_str(&event.data).map_err(|source| ClientError::Event {
                    url: url.clone(),
                    data: event.data.clone(),
                    source,
                })?;
            // Token chunks are timed; the usage chunk (no choices) is not.
            if chunk["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                let text = &chunk["choices"][0];
                let shown = text["text"]
                    .as_str()
                    .or_else(|| text["delta"]["content"].as_str())
                    .is_some_and(|t| !t.is_empty());
                chunks += u64::from(shown);
                match last {
                    None => first = Some(now),
                    Some(t) => gaps.push(now - t),
                }
                last = Some(now);
            }
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n);
            }
        }
    }
    let first_event_s = first.ok_or(ClientError::Empty { url })?;
    Ok(StreamStats {
        first_event_s,
        gaps_s: gaps,
        completion_tokens: tokens.unwrap_or(chunks),
    })
}

/// The `q` quantile (0..=1) of `values` by nearest rank; NaN when empty.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let at = ((values.len() - 1) as f64 * q).round() as usize;
    values[at]
}

/// One dispatched server-sent event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event` field (empty: the default `message`).
    pub event: String,
    /// The `data` lines, joined with `\n`.
    pub data: String,
}

/// An incremental event-stream parser (WHATWG HTML, "Parsing an event
/// stream"): bytes in, whole events out.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous byte was a `\r` (a following `\n` belongs to it).
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.line_ended(&line) {
                        events.push(event);
                    }
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    fn line_ended(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            // A blank line dispatches the event, if it has data.
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            let had = std::mem::replace(&mut self.has_data, false);
            return had.then_some(SseEvent { event, data });
        }
        if line[0] == b':' {
            return None; // a comment
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = value.to_owned(),
            // `id` and `retry` matter to reconnecting clients only.
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn events_split_anywhere_parse_the_same() {
        let stream = b": keep-alive\r\ndata: {\"a\":1}\r\n\r\nevent: x\ndata:line one\ndata: line two\n\ndata: [DONE]\r\r";
        let whole = SseParser::default().push(stream);
        assert_eq!(data(&whole), ["{\"a\":1}", "line one\nline two", "[DONE]"]);
        assert_eq!(whole[1].event, "x");
        for split in 0..stream.len() {
            let mut parser = SseParser::default();
            let mut events = parser.push(&stream[..split]);
            events.extend(parser.push(&stream[split..]));
            assert_eq!(events, whole, "split at {split}");
        }
    }

    #[test]
    fn an_event_without_data_or_blank_line_is_not_dispatched() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"event: only\n\n").is_empty());
        assert!(parser.push(b"data: unfinished\n").is_empty());
        assert_eq!(data(&parser.push(b"\n")), ["unfinished"]);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v = vec![3.0, 1.0, 2.0, 4.0, 5.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 0.99), 5.0);
        assert!(percentile(&mut [], 0.5).is_nan());
    }
}
