//! The prefix cache's index, kept by the engine: which prompts' keys and
//! values the shards hold (each rank its own slice, under the same entry
//! id), which entry a new prompt reuses, and which entries are evicted
//! (least recently used first) to stay within the budget.
//!
//! Gemma 3's local layers keep only a ring of the last `window` positions,
//! so a running sequence's cache cannot be cut back to a shorter prefix.
//! An entry therefore stores every position of every layer linearly (as
//! llama.cpp's full-size SWA cache does): a prompt sharing `r` tokens with
//! an entry restores the global layers' first `r` positions and the ring
//! of positions `r - window .. r`, and runs the rest. The engine decides;
//! every rank obeys the same schedule, so the ranks' entries agree.

/// An entry of the index.
#[derive(Debug)]
struct Entry {
    id: u64,
    tokens: Vec<u32>,
    last_used: u64,
    /// Saved by a step that finished (usable from the next step on).
    ready: bool,
}

/// What the engine knows of the shards' prefix-cache entries.
#[derive(Debug)]
pub(super) struct PrefixIndex {
    entries: Vec<Entry>,
    /// Most positions all entries hold together.
    capacity: usize,
    used: usize,
    clock: u64,
    next_id: u64,
}

/// A prompt saves an entry only if it adds at least this many positions
/// to what it reused (a near-copy of an entry is not worth its memory).
const MIN_NEW: usize = 32;

impl PrefixIndex {
    /// An index for entries of at most `capacity` positions in all.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity,
            used: 0,
            clock: 0,
            next_id: 1,
        }
    }

    /// Whether `prompt` should wait one step: an entry this step is saving
    /// shares at least [`MIN_NEW`] more of its tokens than any ready one,
    /// so after the step it reuses that much instead of computing it again
    /// alongside.
    pub(super) fn worth_waiting(&self, prompt: &[u32]) -> bool {
        let shared = |ready: bool| {
            self.entries
                .iter()
                .filter(|e| e.ready == ready)
                .map(|e| common(&e.tokens, prompt))
                .max()
                .unwrap_or(0)
                .min(prompt.len().saturating_sub(1))
        };
        shared(false) >= shared(true) + MIN_NEW
    }

    /// The ready entry sharing the longest prefix with `prompt` (at most
    /// all but its last token, which must run for the logits): its id and
    /// the positions to reuse.
    pub(super) fn lookup(&mut self, prompt: &[u32]) -> Option<(u64, usize)> {
        let most = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.ready)
            .map(|e| (common(&e.tokens, prompt).min(most), e))
            .filter(|(shared, _)| *shared > 0)
            .max_by_key(|(shared, e)| (*shared, e.last_used))?;
        self.clock += 1;
        best.1.last_used = self.clock;
        Some((best.1.id, best.0))
    }

    /// Plans to save `prompt` (of which `reused` positions came from an
    /// entry): the new entry's id and the entries evicted to make room,
    /// never one of `keep` (entries this step restores from). `None` when
    /// it is not worth saving or cannot fit.
    pub(super) fn save(
        &mut self,
        prompt: &[u32],
        reused: usize,
        keep: &[u64],
    ) -> Option<(u64, Vec<u64>)> {
        let len = prompt.len();
        if len < reused + MIN_NEW || len > self.capacity {
            return None;
        }
        // Victims first (least recently used), the index changed only if
        // the entry then fits.
        let mut candidates: Vec<(u64, u64, usize)> = self
            .entries
            .iter()
            .filter(|e| e.ready && !keep.contains(&e.id))
            .map(|e| (e.last_used, e.id, e.tokens.len()))
            .collect();
        candidates.sort_unstable();
        let mut freed = 0;
        let mut evicted = Vec::new();
        for (_, id, size) in candidates {
            if self.used - freed + len <= self.capacity {
                break;
            }
            freed += size;
            evicted.push(id);
        }
        if self.used - freed + len > self.capacity {
            return None;
        }
        self.entries.retain(|e| !evicted.contains(&e.id));
        self.used -= freed;
        let id = self.next_id;
        self.next_id += 1;
        self.clock += 1;
        self.used += len;
        self.entries.push(Entry {
            id,
            tokens: prompt.to_vec(),
            last_used: self.clock,
            ready: false,
        });
        Some((id, evicted))
    }

    /// The step that saved the pending entries finished.
    pub(super) fn step_done(&mut self) {
        for e in &mut self.entries {
            e.ready = true;
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Tokens two sequences share from the start.
fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_ready_prefix_is_reused_and_the_least_recent_evicted() {
        let mut index = PrefixIndex::new(200);
        let a: Vec<u32> = (0..100).collect();
        assert_eq!(index.lookup(&a), None);
        let (first, evicted) = index.save(&a, 0, &[]).unwrap();
        assert!(evicted.is_empty());
        // A prompt like it waits for the step that saves it.
        assert!(index.worth_waiting(&a));
        // Not before the step that saves it finished.
        assert_eq!(index.lookup(&a), None);
        index.step_done();
        assert!(!index.worth_waiting(&a));
        // The same prompt: all but its last token.
        assert_eq!(index.lookup(&a), Some((first, 99)));
        // A prompt sharing 60 tokens.
        let mut b: Vec<u32> = (0..60).collect();
        b.extend(1000..1080);
        assert_eq!(index.lookup(&b), Some((first, 60)));
        // Saving it (80 new positions) fits: 100 + 140 > 200, so `a`
        // would go, but `a` is kept for this step.
        assert_eq!(index.save(&b, 60, &[first]), None);
        let (second, evicted) = index.save(&b, 60, &[]).unwrap();
        assert_eq!(evicted, [first]);
        index.step_done();
        assert_eq!(index.lookup(&a), Some((second, 60)));
        // Too few new positions: not saved.
        assert_eq!(index.save(&b, 139, &[]), None);
        // Larger than the whole cache: not saved.
        let huge: Vec<u32> = (0..201).collect();
        assert_eq!(index.save(&huge, 0, &[]), None);
        assert_eq!(index.len(), 1);
    }
}
