//! The tensor-parallel sharding plan: which slice of every Gemma 3 weight
//! each rank owns, as pure functions of the configuration and the number of
//! ranks (`tp`).
//!
//! The recipe (Megatron-style, as vLLM, TGI and mistral.rs shard):
//! - q, k and v are **column-parallel by whole heads**: rank r owns query
//!   heads `[r·H/tp, (r+1)·H/tp)`. With fewer KV heads than ranks, each KV
//!   head is **replicated** on `tp / kv` consecutive ranks (rank r uses KV
//!   head `r / (tp / kv)`); otherwise KV heads are split like the query heads.
//! - The attention output projection is **row-parallel** (its input columns
//!   are the rank's heads), followed by an all-reduce.
//! - gate and up are column-parallel over the intermediate size, down is
//!   row-parallel over it, followed by an all-reduce.
//! - The tied embedding and LM head are **vocabulary-parallel**: contiguous
//!   slices of ⌈vocab / tp⌉ rows rounded up to a multiple of 64 (the last
//!   rank's slice is shorter); the lookup is all-reduced, the logits
//!   all-gathered.
//! - Norms are replicated; attention, RoPE and the KV cache are rank-local.

use std::ops::Range;

use super::GemmaConfig;

/// Why a tensor-parallel layout is not possible. The messages name the
/// numbers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// tp is 0.
    #[error("tp must be at least 1")]
    Zero,
    /// Query heads do not split evenly.
    #[error("tp={tp} does not divide {heads} query heads")]
    QueryHeads {
        /// Ranks.
        tp: usize,
        /// Query heads.
        heads: usize,
    },
    /// KV heads can be neither split nor replicated evenly.
    #[error(
        "tp={tp} can neither split nor evenly replicate {kv_heads} kv heads (needs kv_heads % tp == 0 or tp % kv_heads == 0)"
    )]
    KvHeads {
        /// Ranks.
        tp: usize,
        /// KV heads.
        kv_heads: usize,
    },
    /// The intermediate size does not split evenly.
    #[error("tp={tp} does not divide the intermediate size {ffn}")]
    Intermediate {
        /// Ranks.
        tp: usize,
        /// Intermediate size.
        ffn: usize,
    },
    /// A row-parallel weight's input slice does not hold whole blocks of
    /// its quantized format, so a rank cannot read its columns.
    #[error(
        "tp={tp}: {what} has {columns} input columns per rank, not a multiple of the {block}-element quantization block"
    )]
    Blocks {
        /// Ranks.
        tp: usize,
        /// Which weight.
        what: &'static str,
        /// Its input columns per rank.
        columns: usize,
        /// The block size.
        block: usize,
    },
}

/// What one rank owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankShard {
    /// The rank.
    pub rank: usize,
    /// Query heads (whole heads).
    pub q_heads: Range<usize>,
    /// KV heads held by this rank (one replicated head when there are fewer
    /// KV heads than ranks).
    pub kv_heads: Range<usize>,
    /// Intermediate features: rows of gate and up, columns of down.
    pub ffn: Range<usize>,
    /// Vocabulary rows of the tied embedding and LM head.
    pub vocab: Range<usize>,
}

/// The layout of every rank.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardPlan {
    /// Ranks.
    pub tp: usize,
    /// Ranks sharing each KV head (1: KV heads are partitioned).
    pub kv_replicas: usize,
    /// Vocabulary rows per rank before the last rank's slice is trimmed:
    /// rank r's slice starts at r · `vocab_chunk`.
    pub vocab_chunk: usize,
    /// Each rank's slices, by rank.
    pub ranks: Vec<RankShard>,
    config: GemmaConfig,
}

/// Makes the plan for `tp` ranks, or says why it is impossible.
pub fn plan(config: &GemmaConfig, tp: usize) -> Result<ShardPlan, ShardError> {
    if tp == 0 {
        return Err(ShardError::Zero);
    }
    let (heads, kv) = (config.heads, config.kv_heads);
    if !heads.is_multiple_of(tp) {
        return Err(ShardError::QueryHeads { tp, heads });
    }
    let kv_replicas = if kv.is_multiple_of(tp) {
        1
    } else if kv > 0 && tp.is_multiple_of(kv) {
        tp / kv
    } else {
        return Err(ShardError::KvHeads { tp, kv_heads: kv });
    };
    if !config.ffn.is_multiple_of(tp) {
        return Err(ShardError::Intermediate {
            tp,
            ffn: config.ffn,
        });
    }
    let per_vocab = config.vocab.div_ceil(tp).next_multiple_of(64);
    let ranks = (0..tp)
        .map(|r| {
            let kv_heads = if kv_replicas == 1 {
                let per = kv / tp;
                r * per..(r + 1) * per
            } else {
                let head = r / kv_replicas;
                head..head + 1
            };
            let q = heads / tp;
            let f = config.ffn / tp;
            RankShard {
                rank: r,
                q_heads: r * q..(r + 1) * q,
                kv_heads,
                ffn: r * f..(r + 1) * f,
                vocab: (r * per_vocab).min(config.vocab)..((r + 1) * per_vocab).min(config.vocab),
            }
        })
        .collect();
    Ok(ShardPlan {
        tp,
        kv_replicas,
        vocab_chunk: per_vocab,
        ranks,
        config: config.clone(),
    })
}

impl ShardPlan {
    /// Checks that the row-parallel weights (attention output, MLP down)
    /// split into whole quantization blocks of `block` elements per rank.
    pub fn check_blocks(&self, block: usize) -> Result<(), ShardError> {
        let block = block.max(1);
        let q_columns = self.config.heads / self.tp * self.config.head_dim;
        let ffn_columns = self.config.ffn / self.tp;
        for (what, columns) in [
            ("the attention output projection", q_columns),
            ("the MLP down projection", ffn_columns),
        ] {
            if !columns.is_multiple_of(block) {
                return Err(ShardError::Blocks {
                    tp: self.tp,
                    what,
                    columns,
                    block,
                });
            }
        }
        Ok(())
    }

    /// Parameters rank `rank` holds: its slices of every weight, plus the
    /// replicated norms.
    pub fn parameters(&self, rank: usize) -> usize {
        let c = &self.config;
        let Some(r) = self.ranks.get(rank) else {
            return 0;
        };
        let q = r.q_heads.len() * c.head_dim;
        let kv = r.kv_heads.len() * c.head_dim;
        let ffn = r.ffn.len();
        let per_layer = c.hidden * q // q
            + 2 * c.hidden * kv // k, v
            + q * c.hidden // o
            + 3 * c.hidden * ffn // gate, up, down
            + 4 * c.hidden // input, post-attention, pre- and post-MLP norms
            + 2 * c.head_dim; // q and k norms
        c.layers * per_layer + r.vocab.len() * c.hidden + c.hidden
    }

    /// KV-cache bytes rank `rank` needs per token (every layer keeping the
    /// token) at `bytes_per_value`.
    pub fn kv_bytes_per_token(&self, rank: usize, bytes_per_value: usize) -> usize {
        self.ranks.get(rank).map_or(0, |r| {
            self.config.layers * 2 * r.kv_heads.len() * self.config.head_dim * bytes_per_value
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str) -> GemmaConfig {
        GemmaConfig::preset(name).unwrap()
    }

    #[test]
    fn feasible_degrees_for_every_size() {
        let ok = |name: &str, tp: usize| plan(&preset(name), tp).is_ok();
        for tp in [1, 2, 4] {
            assert!(ok("270m", tp) && ok("1b", tp), "tp={tp}");
        }
        for tp in [1, 2, 4, 8, 16] {
            assert!(ok("27b", tp), "27b tp={tp}");
        }
        assert!(ok("12b", 16) && ok("4b", 8));
        assert!(!ok("270m", 8) && !ok("4b", 16));
    }

    #[test]
    fn impossible_layouts_say_which_numbers_clash() {
        let err = |name: &str, tp: usize| plan(&preset(name), tp).unwrap_err().to_string();
        assert_eq!(err("270m", 3), "tp=3 does not divide 4 query heads");
        assert_eq!(err("270m", 8), "tp=8 does not divide 4 query heads");
        assert_eq!(err("1b", 0), "tp must be at least 1");
        let mut odd = preset("4b");
        odd.kv_heads = 3;
        odd.heads = 6;
        assert_eq!(
            plan(&odd, 2).unwrap_err().to_string(),
            "tp=2 can neither split nor evenly replicate 3 kv heads (needs kv_heads % tp == 0 or tp % kv_heads == 0)"
        );
        let mut narrow = preset("270m");
        narrow.ffn = 2046;
        assert_eq!(
            plan(&narrow, 4).unwrap_err().to_string(),
            "tp=4 does not divide the intermediate size 2046"
        );
        // 27B at tp=8: 21,504 / 8 = 2,688 down-projection columns per rank,
        // fine for 32-element blocks but not for 256-element K-quant blocks.
        let p = plan(&preset("27b"), 8).unwrap();
        assert!(p.check_blocks(32).is_ok());
        assert_eq!(
            p.check_blocks(256).unwrap_err().to_string(),
            "tp=8: the MLP down projection has 2688 input columns per rank, not a multiple of the 256-element quantization block"
        );
        assert!(plan(&preset("27b"), 4).unwrap().check_blocks(256).is_ok());
    }

    #[test]
    fn slices_cover_every_head_feature_and_token_once() {
        for (name, tp) in [("270m", 2), ("270m", 4), ("12b", 16), ("27b", 8), ("4b", 4)] {
            let c = preset(name);
            let p = plan(&c, tp).unwrap();
            let covered = |pick: &dyn Fn(&RankShard) -> Range<usize>, total: usize| {
                let mut next = 0;
                for r in &p.ranks {
                    let range = pick(r);
                    assert_eq!(range.start, next, "{name} tp={tp}: {range:?}");
                    next = range.end;
                }
                assert_eq!(next, total, "{name} tp={tp}");
            };
            covered(&|r| r.q_heads.clone(), c.heads);
            covered(&|r| r.ffn.clone(), c.ffn);
            covered(&|r| r.vocab.clone(), c.vocab);
            for r in &p.ranks {
                assert_eq!(r.vocab.start % 64, 0);
                // A rank's query heads use its KV heads (grouped-query attention).
                let group = c.heads / c.kv_heads;
                for q in r.q_heads.clone() {
                    assert!(
                        r.kv_heads.contains(&(q / group)),
                        "{name} tp={tp} rank {}",
                        r.rank
                    );
                }
            }
            if c.kv_heads >= tp {
                assert_eq!(p.kv_replicas, 1);
                covered(&|r| r.kv_heads.clone(), c.kv_heads);
            } else {
                assert_eq!(p.kv_replicas, tp / c.kv_heads);
                assert!(p.ranks.iter().all(|r| r.kv_heads.len() == 1));
            }
        }
    }

    #[test]
    fn memory_per_rank_shrinks_with_tp() {
        let c = preset("27b");
        let one = plan(&c, 1).unwrap();
        let total = one.parameters(0);
        // 27B: about 27 billion parameters with the tied embedding.
        assert!((26_000_000_000..29_000_000_000).contains(&total), "{total}");
        for tp in [2, 4, 8] {
            let p = plan(&c, tp).unwrap();
            let sum: usize = (0..tp).map(|r| p.parameters(r)).sum();
            // Only the norms are replicated.
            let replicated = (tp - 1) * (c.layers * (4 * c.hidden + 2 * c.head_dim) + c.hidden);
            assert_eq!(sum, total + replicated, "tp={tp}");
            assert_eq!(
                p.kv_bytes_per_token(0, 2) * tp,
                one.kv_bytes_per_token(0, 2),
                "tp={tp}: KV heads partitioned"
            );
        }
        // 270M at tp=4: the single KV head is replicated on every rank.
        let small = plan(&preset("270m"), 4).unwrap();
        assert_eq!(
            small.kv_bytes_per_token(3, 2),
            plan(&preset("270m"), 1).unwrap().kv_bytes_per_token(0, 2)
        );
    }
}
