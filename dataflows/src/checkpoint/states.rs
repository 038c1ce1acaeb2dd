//! The registry of a worker's stateful operators in one pipeline.
//!
//! An operator that keeps state across timestamps registers a saver under a
//! name unique in its pipeline, and asks for its restored state by that
//! name when it is built. Anything stateful plugs in here: the checkpoint
//! code knows no operator by name.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Saves an operator's state as of a checkpoint time `h`: everything its
/// inputs before `h` did, nothing of what it holds of later times.
type Saver = Box<dyn FnMut(u64) -> Result<Vec<u8>, String>>;

#[derive(Default)]
struct Inner {
    /// Whether checkpoints are on (savers are kept only then).
    enabled: bool,
    restored: BTreeMap<String, Vec<u8>>,
    savers: Vec<(String, Saver)>,
    /// The first restored state that could not be decoded.
    error: Option<String>,
}

/// A worker's stateful operators of one pipeline (cheap to clone: shared).
#[derive(Clone, Default)]
pub struct States {
    inner: Rc<RefCell<Inner>>,
}

impl std::fmt::Debug for States {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.borrow();
        f.debug_struct("States")
            .field("enabled", &inner.enabled)
            .field("restored", &inner.restored.keys().collect::<Vec<_>>())
            .field(
                "registered",
                &inner.savers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl States {
    /// Checkpoints off: nothing is registered or restored.
    pub fn off() -> Self {
        Self::default()
    }

    /// Checkpoints on, restoring `restored` (empty on a fresh start).
    pub fn on(restored: BTreeMap<String, Vec<u8>>) -> Self {
        Self {
            inner: Rc::new(RefCell::new(Inner {
                enabled: true,
                restored,
                ..Inner::default()
            })),
        }
    }

    /// Whether checkpoints are on.
    pub fn enabled(&self) -> bool {
        self.inner.borrow().enabled
    }

    /// The restored state of `name`, if the checkpoint has one. One that
    /// does not decode is recorded ([`States::error`]) and `None` returned.
    pub fn take<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
        let mut inner = self.inner.borrow_mut();
        let bytes = inner.restored.remove(name)?;
        match decode(&bytes) {
            Ok(value) => Some(value),
            Err(e) => {
                inner
                    .error
                    .get_or_insert(format!("the state of operator {name}: {e}"));
                None
            }
        }
    }

    /// Registers `name`'s saver (ignored while checkpoints are off).
    pub fn register(
        &self,
        name: &str,
        saver: impl FnMut(u64) -> Result<Vec<u8>, String> + 'static,
    ) {
        let mut inner = self.inner.borrow_mut();
        if inner.enabled {
            inner.savers.push((name.to_owned(), Box::new(saver)));
        }
    }

    /// Every registered operator's state as of `time`.
    pub fn save(&self, time: u64) -> Result<BTreeMap<String, Vec<u8>>, String> {
        let mut inner = self.inner.borrow_mut();
        let mut out = BTreeMap::new();
        for (name, saver) in &mut inner.savers {
            let bytes = saver(time).map_err(|e| format!("saving operator {name}: {e}"))?;
            out.insert(name.clone(), bytes);
        }
        Ok(out)
    }

    /// A restored state that did not decode, or one that no operator took
    /// (the checkpoint does not fit this pipeline).
    pub fn error(&self) -> Option<String> {
        let inner = self.inner.borrow();
        if let Some(e) = &inner.error {
            return Some(e.clone());
        }
        inner.restored.keys().next().map(|name| {
            format!(
                "the checkpoint holds state for operator {name}, which this pipeline does not have"
            )
        })
    }
}

/// Encodes a state with the checkpoint codec.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serialize(value).map_err(|e| e.to_string())
}

/// Decodes a state encoded by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    bincode::deserialize(bytes).map_err(|e| e.to_string())
}
