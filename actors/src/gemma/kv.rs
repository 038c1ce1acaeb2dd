//! The KV cache layout every backend shares: which slot of a layer holds a
//! sequence's key and value at a position.
//!
//! Global layers keep every position. Local (sliding-window) layers keep a
//! ring: a query sees only the last `window` positions, so older ones are
//! overwritten (Gemma 3 report §2.1: this is what makes the 5 local : 1
//! global interleave cheap in memory). A ring holds `window + ahead`
//! slots, where `ahead` is how many new positions of one sequence a pass
//! stores before it attends: the CPU backend reads a pass's own keys from
//! the pass and stores them after attending (`ahead` 0, a ring of exactly
//! `window`); the device backend stores them first (`ahead` = its chunk),
//! so no slot a token still reads is overwritten. The storage is the
//! backend's (growable vectors per sequence on the CPU, one preallocated
//! pool on a device); the slots are the same.

use super::config::{GemmaConfig, LayerKind};

/// How one layer keeps a sequence's keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerSlots {
    /// Every position: the slot is the position.
    All,
    /// A ring of this many slots: the slot is the position modulo it.
    Ring(usize),
}

impl LayerSlots {
    /// The slot of `position`.
    pub fn slot(self, position: usize) -> usize {
        match self {
            Self::All => position,
            Self::Ring(n) => position % n,
        }
    }

    /// Slots a sequence of up to `context` positions needs.
    pub fn per_sequence(self, context: usize) -> usize {
        match self {
            Self::All => context,
            Self::Ring(n) => n.min(context),
        }
    }

    /// Whether the slots are a ring.
    pub fn is_ring(self) -> bool {
        matches!(self, Self::Ring(_))
    }
}

/// Every layer's slots for sequences of up to `context` positions, with
/// `ahead` new positions stored before attending (see the module docs). A
/// ring no smaller than `context` is [`LayerSlots::All`].
pub fn layout(config: &GemmaConfig, ahead: usize, context: usize) -> Vec<LayerSlots> {
    config
        .layer_kinds
        .iter()
        .map(|kind| match kind {
            LayerKind::Local if config.window + ahead < context => {
                LayerSlots::Ring(config.window + ahead)
            }
            _ => LayerSlots::All,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_layers_ring_and_global_layers_keep_everything() {
        let c = GemmaConfig::preset("270m").unwrap();
        let cpu = layout(&c, 0, c.context);
        assert_eq!(cpu.len(), c.layers);
        assert_eq!(cpu[0], LayerSlots::Ring(c.window));
        assert_eq!(cpu[5], LayerSlots::All);
        assert_eq!(cpu[0].slot(c.window + 3), 3);
        assert_eq!(cpu[5].slot(c.window + 3), c.window + 3);
        let device = layout(&c, 512, 4096);
        assert_eq!(device[0], LayerSlots::Ring(c.window + 512));
        assert_eq!(device[0].per_sequence(4096), c.window + 512);
        assert_eq!(device[5].per_sequence(4096), 4096);
        // A ring as long as the context is no ring.
        assert!(layout(&c, 512, c.window + 512).iter().all(|l| !l.is_ring()));
    }
}
