//! The CPU backend of the forward pass ([`crate::gemma::forward`]): matrix
//! products on the quantized rows where they are stored (row kernels, AMX
//! tiles), f32 activations, attention with rayon over the tokens, and one
//! [`KvCache`] per sequence (local layers keep a ring of `window` slots).

use super::*;
use crate::gemma::forward::{Backend, Projection, Residual, Row};

/// What a CPU pass prepares once: its rows, where each sequence's run
/// starts, the query heads that share a KV head, and scratch.
pub struct CpuPass {
    rows: Vec<Row>,
    runs: Vec<usize>,
    /// This rank's query heads in runs that share a KV head, each with
    /// that KV head's offset into a token's K/V row.
    groups: Vec<(std::ops::Range<usize>, usize)>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    up: Vec<f32>,
}

impl std::fmt::Debug for CpuPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPass")
            .field("rows", &self.rows.len())
            .finish()
    }
}

impl Backend for Gemma {
    type Error = CollectiveError;
    type Act = Vec<f32>;
    type Input = Vec<f32>;
    type Kv<'k> = [&'k mut KvCache];
    type Pass = CpuPass;

    fn config(&self) -> &GemmaConfig {
        &self.config
    }

    fn shard(&self) -> &RankShard {
        &self.shard
    }

    fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    fn vocab_per_rank(&self) -> usize {
        self.vocab_per_rank
    }

    fn prepare(&self, rows: &[Row], _kv: &mut [&mut KvCache]) -> Result<CpuPass, CollectiveError> {
        let c = &self.config;
        let me = &self.shard;
        let hd = c.head_dim;
        let n = rows.len();
        let (q_dim, kv_dim) = (me.q_heads.len() * hd, me.kv_heads.len() * hd);
        let group = c.heads / c.kv_heads;
        let mut groups: Vec<(std::ops::Range<usize>, usize)> = Vec::new();
        for head in 0..me.q_heads.len() {
            let off = ((me.q_heads.start + head) / group - me.kv_heads.start) * hd;
            match groups.last_mut() {
                Some((heads, last)) if *last == off => heads.end = head + 1,
                _ => groups.push((head..head + 1, off)),
            }
        }
        Ok(CpuPass {
            rows: rows.to_vec(),
            runs: run_starts(rows),
            groups,
            q: vec![0f32; n * q_dim],
            k: vec![0f32; n * kv_dim],
            v: vec![0f32; n * kv_dim],
            up: vec![0f32; n * me.ffn.len()],
        })
    }

    fn act(&self, len: usize) -> Result<Vec<f32>, CollectiveError> {
        Ok(vec![0f32; len])
    }

    fn input(&self, len: usize) -> Result<Vec<f32>, CollectiveError> {
        Ok(vec![0f32; len])
    }

    fn embed(&self, rows: &[Row], x: &mut Vec<f32>) -> Result<(), CollectiveError> {
        // Vocabulary-parallel lookup: the rank holding a token's row fills
        // it, the others leave zeros, and the sum gives every rank the row.
        let me = &self.shard;
        for (row, r) in x.chunks_exact_mut(self.config.hidden).zip(rows) {
            let token = r.token as usize;
            if me.vocab.contains(&token) {
                self.matrix(&self.token_embd)
                    .dequantize_row(token - me.vocab.start, row);
                row.iter_mut().for_each(|v| *v *= self.embed_scale);
            }
        }
        Ok(())
    }

    fn all_reduce(&self, x: &mut Vec<f32>) -> Result<(), CollectiveError> {
        self.collective.all_reduce_sum(x)
    }

    fn first_norm(&self, x: &Vec<f32>, h: &mut Vec<f32>) -> Result<(), CollectiveError> {
        let c = &self.config;
        if let Some(first) = self.layers.first() {
            for (hr, xr) in h.chunks_exact_mut(c.hidden).zip(x.chunks_exact(c.hidden)) {
                rms_norm(xr, &first.attn_norm, c.rms_eps, hr);
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        li: usize,
        h: &Vec<f32>,
        attn: &mut Vec<f32>,
        pass: &mut CpuPass,
        caches: &mut [&mut KvCache],
    ) -> Result<(), CollectiveError> {
        let c = &self.config;
        let layer = &self.layers[li];
        let me = &self.shard;
        let hd = c.head_dim;
        let (q_dim, kv_dim) = (me.q_heads.len() * hd, me.kv_heads.len() * hd);
        let score_scale = 1.0 / c.query_pre_attn_scalar.sqrt();
        let rows = &pass.rows;
        let n = rows.len();
        let (q, k, v) = (&mut pass.q, &mut pass.k, &mut pass.v);
        self.matrix(&layer.attn_q).matmul(h, n, q);
        self.matrix(&layer.attn_k).matmul(h, n, k);
        self.matrix(&layer.attn_v).matmul(h, n, v);
        let (base, scale) = match layer.kind {
            LayerKind::Local => (c.rope_local_base, 1.0),
            LayerKind::Global => (c.rope_global_base, c.rope_global_scale),
        };
        // QK-norm and RoPE, token by token in parallel.
        q.par_chunks_exact_mut(q_dim)
            .zip(k.par_chunks_exact_mut(kv_dim))
            .zip(rows.par_iter())
            .for_each_init(
                || (vec![0f32; hd / 2], vec![0f32; hd / 2]),
                |(cos, sin), ((qt, kt), r)| {
                    rope_angles(r.position as f32 / scale, base, hd, cos, sin);
                    for head in qt.chunks_exact_mut(hd) {
                        rms_norm_in_place(head, &layer.attn_q_norm, c.rms_eps);
                        rope_neox_with(head, cos, sin);
                        head.iter_mut().for_each(|v| *v *= score_scale);
                    }
                    for head in kt.chunks_exact_mut(hd) {
                        rms_norm_in_place(head, &layer.attn_k_norm, c.rms_eps);
                        rope_neox_with(head, cos, sin);
                    }
                },
            );
        let first_position = |position: usize| match layer.kind {
            LayerKind::Local => (position + 1).saturating_sub(c.window),
            LayerKind::Global => 0,
        };
        // Tokens in parallel. A position inside this batch is read from
        // `k`/`v` (not stored yet: a later token may take an earlier one's
        // ring slot on a local layer); earlier positions from the cache,
        // which still holds them all.
        let cached: Vec<&KvCache> = caches.iter().map(|cache| &**cache).collect();
        let (q, k, v) = (&*q, &*k, &*v);
        let (runs, groups) = (&pass.runs, &pass.groups);
        attn.par_chunks_exact_mut(q_dim).enumerate().for_each_init(
            Vec::new,
            |scores, (t, out_t)| {
                let r = &rows[t];
                let cache = cached[r.seq];
                let (r0, p0) = (runs[t], rows[runs[t]].position);
                for (heads, off) in groups {
                    let off = *off;
                    let kv = |p: usize| {
                        if p >= p0 {
                            let at = (r0 + p - p0) * kv_dim + off;
                            (&k[at..at + hd], &v[at..at + hd])
                        } else {
                            let at = cache.slot(li, p) * kv_dim + off;
                            (&cache.keys[li][at..at + hd], &cache.values[li][at..at + hd])
                        }
                    };
                    let span = heads.start * hd..heads.end * hd;
                    attend_heads(
                        &q[t * q_dim..(t + 1) * q_dim][span.clone()],
                        hd,
                        first_position(r.position)..=r.position,
                        kv,
                        scores,
                        &mut out_t[span],
                    );
                }
            },
        );
        for (t, r) in rows.iter().enumerate() {
            caches[r.seq].store(
                li,
                r.position,
                &k[t * kv_dim..(t + 1) * kv_dim],
                &v[t * kv_dim..(t + 1) * kv_dim],
            );
        }
        Ok(())
    }

    fn project(
        &self,
        li: usize,
        which: Projection,
        input: &Vec<f32>,
        out: &mut Vec<f32>,
    ) -> Result<(), CollectiveError> {
        let layer = &self.layers[li];
        let m = match which {
            Projection::Output => &layer.attn_output,
            Projection::Down => &layer.ffn_down,
        };
        let n = out.len() / self.config.hidden;
        self.matrix(m).matmul(input, n, out);
        Ok(())
    }

    fn residual(
        &self,
        li: usize,
        which: Residual,
        x: &mut Vec<f32>,
        o: &mut Vec<f32>,
        h: &mut Vec<f32>,
    ) -> Result<(), CollectiveError> {
        let c = &self.config;
        let layer = &self.layers[li];
        let (post, next) = match which {
            Residual::Attention => (&layer.post_attention_norm, Some(&layer.ffn_norm)),
            Residual::Mlp => (
                &layer.post_ffw_norm,
                self.layers.get(li + 1).map(|l| &l.attn_norm),
            ),
        };
        add_normed(x, o, post, c.hidden, c.rms_eps);
        match next {
            Some(norm) => {
                for (hr, xr) in h.chunks_exact_mut(c.hidden).zip(x.chunks_exact(c.hidden)) {
                    rms_norm(xr, norm, c.rms_eps, hr);
                }
            }
            // The final norm, as the LM head's input.
            None => {
                h.copy_from_slice(x);
                for row in h.chunks_exact_mut(c.hidden) {
                    rms_norm_in_place(row, &self.output_norm, c.rms_eps);
                }
            }
        }
        Ok(())
    }

    fn gated_mlp(
        &self,
        li: usize,
        h: &Vec<f32>,
        gate: &mut Vec<f32>,
        pass: &mut CpuPass,
    ) -> Result<(), CollectiveError> {
        let layer = &self.layers[li];
        let n = pass.rows.len();
        self.matrix(&layer.ffn_gate).matmul(h, n, gate);
        self.matrix(&layer.ffn_up).matmul(h, n, &mut pass.up);
        gate.iter_mut()
            .zip(&pass.up)
            .for_each(|(g, u)| *g = gelu_tanh(*g) * u);
        Ok(())
    }

    fn finish(&self, _pass: CpuPass, rows: &[Row], caches: &mut [&mut KvCache]) {
        for r in rows {
            let cache = &mut *caches[r.seq];
            cache.len = cache.len.max(r.position + 1);
        }
    }

    fn lm_head(
        &self,
        h: &Vec<f32>,
        want: &[usize],
        out: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let hidden = self.config.hidden;
        let mut last = Vec::with_capacity(want.len() * hidden);
        for &i in want {
            last.extend_from_slice(&h[i * hidden..(i + 1) * hidden]);
        }
        self.matrix(&self.token_embd).matmul(&last, want.len(), out);
        Ok(())
    }
}
