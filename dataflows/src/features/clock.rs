//! The event-time clock of one source share.

/// What a share's clock says of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// On time: it takes part in everything.
    OnTime,
    /// More than the delay behind the greatest event time read before it
    /// from the same share.
    Late {
        /// How far behind that greatest time it is, ms.
        behind_ms: u64,
    },
    /// Behind the worker's input frontier, which moved on while this share
    /// was idle.
    AfterIdle {
        /// How far behind the frontier it is, ms.
        behind_ms: u64,
    },
    /// Too far ahead of the share's greatest event time.
    Future {
        /// How far ahead, ms.
        ahead_ms: u64,
    },
}

impl Admission {
    /// The dead-letter reason of a refused record (`None` when on time).
    pub fn reason(self, delay_ms: u64, max_future_ms: u64) -> Option<String> {
        match self {
            Self::OnTime => None,
            Self::Late { behind_ms } => Some(format!(
                "late: event_time is {behind_ms} ms behind the newest event time its share had read (watermark_delay_s allows {delay_ms} ms)"
            )),
            Self::AfterIdle { behind_ms } => Some(format!(
                "late: event_time is {behind_ms} ms behind the input frontier, which moved on while its share was idle"
            )),
            Self::Future { ahead_ms } => Some(format!(
                "event_time is {ahead_ms} ms ahead of the newest event time its share had read (max_future_s allows {max_future_ms} ms)"
            )),
        }
    }
}

/// The greatest event time one share has read, and its watermark.
///
/// ```
/// use dataflows::features::{Admission, ShareClock};
/// let mut clock = ShareClock::new(20_000, 3_600_000);
/// assert_eq!(clock.admit(100_000), Admission::OnTime);
/// assert_eq!(clock.watermark(), Some(80_000));
/// assert_eq!(clock.admit(80_000), Admission::OnTime); // exactly the delay behind
/// assert_eq!(clock.admit(79_999), Admission::Late { behind_ms: 20_001 });
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareClock {
    greatest: Option<u64>,
    delay_ms: u64,
    max_future_ms: u64,
}

impl ShareClock {
    /// A clock with nothing read yet.
    pub fn new(delay_ms: u64, max_future_ms: u64) -> Self {
        Self {
            greatest: None,
            delay_ms,
            max_future_ms,
        }
    }

    /// A clock that has already read up to `greatest` (a restored share).
    pub fn resumed(delay_ms: u64, max_future_ms: u64, greatest: Option<u64>) -> Self {
        Self {
            greatest,
            delay_ms,
            max_future_ms,
        }
    }

    /// Judges a record at `time` and, when it is on time, moves the
    /// greatest event time.
    pub fn admit(&mut self, time: u64) -> Admission {
        let Some(greatest) = self.greatest else {
            self.greatest = Some(time);
            return Admission::OnTime;
        };
        if time + self.delay_ms < greatest {
            return Admission::Late {
                behind_ms: greatest - time,
            };
        }
        if time > greatest.saturating_add(self.max_future_ms) {
            return Admission::Future {
                ahead_ms: time - greatest,
            };
        }
        self.greatest = Some(greatest.max(time));
        Admission::OnTime
    }

    /// The greatest event time read, if any.
    pub fn greatest(&self) -> Option<u64> {
        self.greatest
    }

    /// Greatest seen − delay: no later on-time record is earlier.
    pub fn watermark(&self) -> Option<u64> {
        self.greatest.map(|g| g.saturating_sub(self.delay_ms))
    }
}

/// `time` rounded down to a multiple of `bucket_ms` (the timely timestamp).
#[inline]
pub fn bucket(time: u64, bucket_ms: u64) -> u64 {
    time - time % bucket_ms.max(1)
}
