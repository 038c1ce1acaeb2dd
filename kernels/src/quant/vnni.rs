//! Products on VNNI int8 dot products (`VPDPBUSD`), AVX-512 or AVX-VNNI
//! (256 bits), or their plain-AVX2 form (`VPMADDUBSW` + `VPMADDWD`): the
//! path for prompts, batched decode steps and single tokens on CPUs without
//! AMX (see [`super::Int8::one_token`]).
//!
//! The weights are the AMX tiles' repacking ([`Packed`]): per 16 weight rows
//! and 32-column block, 8 quads of 64 bytes, quad `q` holding each row's
//! columns `4q..4q+4` as signed bytes, with the rows' scales (and Q4_K's
//! mins) beside, and here also each row's sum of the block's integers
//! (`Packed::sums`). A token's block of activations is written as `P`
//! parts of unsigned bytes: `x ≈ scale · Σₚ (partₚ − 128) / 254ᵖ`, each part
//! the rounded remainder of the one before (two parts: about 15 bits, three:
//! about 23, as on the tiles). One `VPDPBUSD` multiplies a quad of 4
//! activation bytes, broadcast, by the quad of 16 rows, adding 4 products
//! into each row's int32 lane; the lanes start at −128 times the row's
//! sum, which takes the bias off exactly (`Σ (a + 128) w − 128 Σ w =
//! Σ a w`), so the int32 sums are those the tiles get. Per block the lanes are scaled into
//! f32 sums (weight scale × token scale; Q4_K's mins times the block's
//! activation sum come off), block after block in a fixed order, so a
//! token's result depends only on its own activations, whatever the batch
//! around it, and equals what it gets alone.
//!
//! The AVX-512 inner tile is `G` row groups × `T` tokens: every weight
//! quad is loaded once per `T` tokens, every broadcast used for `G` groups.
//! AVX-VNNI has 16 vector registers: its tile is one group (two halves of 8
//! rows) × one token, the same arithmetic lane for lane, so its results
//! equal AVX-512's bit for bit where no activation sum enters (all formats
//! but Q4_K, whose mins multiply the block sum).

use std::arch::x86_64::{
    __m512, __m512i, _MM_HINT_T0, _mm_prefetch, _mm512_cvtepi32_ps, _mm512_dpbusd_epi32,
    _mm512_fmadd_ps, _mm512_fnmadd_ps, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_storeu_ps,
    _mm512_mul_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512,
};

use super::tiles::{BLOCK, Packed, ROWS, SharedOut};

/// The finer parts' unit: `x ≈ scale · (high + mid / 254 + low / 254²)`.
const LOW: f32 = 254.0;

/// Up to all the tokens of a product, quantized for [`Packed::vnni_matmul`]:
/// per block, per token, `P` parts of 32 unsigned bytes (the signed part
/// plus 128), the token's scale and its block's sum.
pub(super) struct Acts<const P: usize> {
    bytes: Vec<u8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
    tokens: usize,
}

impl<const P: usize> Acts<P> {
    /// Quantizes `tokens` rows of `cols` activations (`xs`, row-major);
    /// `wide`: with AVX-512 (else plain code with the same arithmetic).
    pub(super) fn new(xs: &[f32], tokens: usize, cols: usize, wide: bool) -> Self {
        let blocks = cols / BLOCK;
        let mut acts = Self {
            bytes: vec![0u8; blocks * tokens * P * BLOCK],
            scales: vec![0f32; blocks * tokens],
            sums: vec![0f32; blocks * tokens],
            tokens,
        };
        for t in 0..tokens {
            for k in 0..blocks {
                let x = &xs[t * cols + k * BLOCK..t * cols + (k + 1) * BLOCK];
                let at = k * tokens + t;
                let (d, sum) = if wide {
                    // SAFETY: `wide` only where AVX-512 runs (the caller's
                    // path is AVX-512 VNNI).
                    unsafe { acts.block(x, at * P * BLOCK) }
                } else {
                    // SAFETY: the other VNNI path, AVX-VNNI, runs only
                    // where AVX2 and FMA do.
                    unsafe { acts.block_plain(x, at * P * BLOCK) }
                };
                acts.scales[at] = d;
                acts.sums[at] = sum;
            }
        }
        acts
    }

    /// [`block`](Self::block) on AVX2: the same arithmetic (multiply by
    /// the inverse scale, round to nearest even, remainder times 254), so
    /// the same parts.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_plain(&mut self, x: &[f32], at: usize) -> (f32, f32) {
        use std::arch::x86_64::{
            __m256, _mm256_add_epi32, _mm256_andnot_ps, _mm256_cvtepi32_ps, _mm256_cvtps_epi32,
            _mm256_loadu_ps, _mm256_max_ps, _mm256_mul_ps, _mm256_packus_epi16,
            _mm256_packus_epi32, _mm256_permutevar8x32_epi32, _mm256_set1_epi32, _mm256_set1_ps,
            _mm256_setr_epi32, _mm256_storeu_ps, _mm256_storeu_si256, _mm256_sub_ps,
        };
        assert!(x.len() == BLOCK && at + P * BLOCK <= self.bytes.len());
        // SAFETY: `x` holds 32 floats and the parts 32·P bytes from `at`
        // (checked); conversions round to nearest even (the default
        // rounding mode), each remainder exact.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|c| _mm256_loadu_ps(x.as_ptr().add(8 * c)));
            let sign = _mm256_set1_ps(-0.0);
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for c in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *c));
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let amax = lanes.iter().fold(0f32, |a, b| a.max(*b));
            let sum = x.iter().sum();
            let d = amax / 127.0;
            let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let unit = _mm256_set1_ps(LOW);
            let bias = _mm256_set1_epi32(128);
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let mut rest: [__m256; 4] = std::array::from_fn(|c| _mm256_mul_ps(v[c], inv));
            for p in 0..P {
                let whole: [_; 4] = std::array::from_fn(|c| _mm256_cvtps_epi32(rest[c]));
                for (r, w) in rest.iter_mut().zip(&whole) {
                    *r = _mm256_mul_ps(_mm256_sub_ps(*r, _mm256_cvtepi32_ps(*w)), unit);
                }
                // whole + 128 is a byte (|whole| ≤ 127): pack the 32 of
                // them in order.
                let b: [_; 4] = std::array::from_fn(|c| _mm256_add_epi32(whole[c], bias));
                let packed = _mm256_packus_epi16(
                    _mm256_packus_epi32(b[0], b[1]),
                    _mm256_packus_epi32(b[2], b[3]),
                );
                _mm256_storeu_si256(
                    self.bytes.as_mut_ptr().add(at + p * BLOCK).cast(),
                    _mm256_permutevar8x32_epi32(packed, order),
                );
            }
            (d, sum)
        }
    }

    /// One block `x` (32 values) into its `P` parts at byte `at`; returns
    /// its scale and its sum.
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW, VL).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn block(&mut self, x: &[f32], at: usize) -> (f32, f32) {
        use std::arch::x86_64::{
            _mm_storeu_si128, _mm512_abs_ps, _mm512_add_epi32, _mm512_add_ps, _mm512_cvtepi32_epi8,
            _mm512_cvtps_epi32, _mm512_max_ps, _mm512_reduce_add_ps, _mm512_reduce_max_ps,
            _mm512_sub_ps,
        };
        assert!(x.len() == BLOCK && at + P * BLOCK <= self.bytes.len());
        // SAFETY: `x` holds 32 floats and the parts 32·P bytes from `at`
        // (checked); conversions round to nearest even (the default
        // rounding mode), each remainder exact.
        unsafe {
            let (a, b) = (
                _mm512_loadu_ps(x.as_ptr()),
                _mm512_loadu_ps(x.as_ptr().add(16)),
            );
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            let sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
            let d = amax / 127.0;
            let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let unit = _mm512_set1_ps(LOW);
            let bias = _mm512_set1_epi32(128);
            for (half, v) in [a, b].into_iter().enumerate() {
                let mut rest = _mm512_mul_ps(v, inv);
                for p in 0..P {
                    let whole = _mm512_cvtps_epi32(rest);
                    // |whole| ≤ 127, so whole + 128 is a byte.
                    _mm_storeu_si128(
                        self.bytes
                            .as_mut_ptr()
                            .add(at + p * BLOCK + 16 * half)
                            .cast(),
                        _mm512_cvtepi32_epi8(_mm512_add_epi32(whole, bias)),
                    );
                    rest = _mm512_mul_ps(_mm512_sub_ps(rest, _mm512_cvtepi32_ps(whole)), unit);
                }
            }
            (d, sum)
        }
    }
}

/// Row groups × tokens per inner tile (with three parts, 2 × 2 keeps every
/// sum, broadcast and weight quad in the 32 vector registers).
const G: usize = 2;
const T: usize = 2;

impl Packed {
    /// `out (n × rows) = xs (n × cols) · Wᵀ` on VNNI, with `P`-part
    /// activations; rows split across the rayon pool.
    ///
    /// # Panics
    /// If the shapes disagree, or the matrix was not packed for VNNI
    /// ([`Packed::new_for`]).
    pub fn vnni_matmul<const P: usize>(&self, xs: &[f32], n: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(
            (xs.len(), out.len()),
            (n * cols, n * rows),
            "vnni matmul shapes"
        );
        let wide = self.path == super::Int8::Avx512Vnni;
        assert!(
            self.sums.len() == self.scales.len()
                && self.path.supported()
                && self.path != super::Int8::Amx,
            "packed for a VNNI path on a CPU that has it"
        );
        let acts = Acts::<P>::new(xs, n, cols, wide);
        let groups = rows.div_ceil(ROWS);
        let shared = SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        };
        if !wide {
            // 256 bits: a task is one group, every token, one at a time.
            let avx2 = self.path == super::Int8::Avx2;
            (0..groups).into_par_iter().for_each(|g| {
                for t in 0..n {
                    // SAFETY: the path runs here (asserted above): AVX-VNNI,
                    // or plain AVX2; this task writes only group g's rows.
                    unsafe {
                        match (avx2, self.halves == 2, self.signed) {
                            (false, true, _) => self.tile256::<P, 2>(&acts, g, t, &shared),
                            (false, false, _) => self.tile256::<P, 1>(&acts, g, t, &shared),
                            (true, true, false) => {
                                self.tile_avx2::<P, 2, false>(&acts, g, t, &shared)
                            }
                            (true, false, false) => {
                                self.tile_avx2::<P, 1, false>(&acts, g, t, &shared)
                            }
                            (true, true, true) => {
                                self.tile_avx2::<P, 2, true>(&acts, g, t, &shared)
                            }
                            (true, false, true) => {
                                self.tile_avx2::<P, 1, true>(&acts, g, t, &shared)
                            }
                        }
                    }
                }
            });
            return;
        }
        // A task: G groups, every token.
        (0..groups.div_ceil(G)).into_par_iter().for_each(|task| {
            let g0 = task * G;
            let live = (groups - g0).min(G);
            let mut t0 = 0;
            while t0 < n {
                let left = n - t0;
                // SAFETY: VNNI runs here (asserted above); this task writes only
                // the rows of groups g0..g0+live, which no other task does.
                unsafe {
                    if self.halves == 2 {
                        self.tiles::<P, 2>(live, left, &acts, g0, t0, &shared);
                    } else {
                        self.tiles::<P, 1>(live, left, &acts, g0, t0, &shared);
                    }
                }
                t0 += left.min(T);
            }
        });
    }

    /// The tile for `live` groups (at most `G`) × `left` tokens (at most
    /// `T` of them taken).
    ///
    /// # Safety
    /// As [`tile`](Self::tile).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn tiles<const P: usize, const H: usize>(
        &self,
        live: usize,
        left: usize,
        acts: &Acts<P>,
        g0: usize,
        t0: usize,
        out: &SharedOut,
    ) {
        // SAFETY: the caller's guarantees, for a tile within them.
        unsafe {
            match (live >= G, left.min(T)) {
                (true, 2) => self.tile::<G, 2, P, H>(acts, g0, t0, out),
                (true, _) => self.tile::<G, 1, P, H>(acts, g0, t0, out),
                (false, 2) => self.tile::<1, 2, P, H>(acts, g0, t0, out),
                (false, _) => self.tile::<1, 1, P, H>(acts, g0, t0, out),
            }
        }
    }

    /// Groups `g0..g0 + GG` × tokens `t0..t0 + TT` into `out`, `H` scales
    /// per block.
    ///
    /// # Safety
    /// The CPU has AVX-512 VNNI; the groups exist and no other thread
    /// writes their rows of these tokens.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn tile<const GG: usize, const TT: usize, const P: usize, const H: usize>(
        &self,
        acts: &Acts<P>,
        g0: usize,
        t0: usize,
        out: &SharedOut,
    ) {
        let blocks = self.cols / BLOCK;
        let halves = H;
        let quads = BLOCK / 4 / H;
        assert_eq!(self.halves, H);
        let tokens = acts.tokens;
        assert!(t0 + TT <= tokens && (g0 + GG) * ROWS * blocks * BLOCK <= self.quants.len());
        // SAFETY: (the whole body) every pointer below stays inside the
        // buffers whose bounds were checked above (the quants of groups
        // g0.., the activations of tokens t0..t0 + TT, their scales and
        // sums); `out` is written only at rows of groups g0.. of tokens
        // t0.., in bounds (checked before each store).
        unsafe {
            let mut facc: [[__m512; TT]; GG] = [[_mm512_setzero_ps(); TT]; GG];
            let unit = _mm512_set1_ps(1.0 / LOW);
            for k in 0..blocks {
                // Each group's next block, for the next pass (a hint: it
                // never faults).
                for g in 0..GG {
                    let next = self
                        .quants
                        .as_ptr()
                        .wrapping_add(((g0 + g) * blocks + k + 1) * ROWS * BLOCK);
                    for line in 0..8 {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * line).cast());
                    }
                }
                for h in 0..halves {
                    // Each row's lanes start at −128 · its sum: the bias off.
                    let mut iacc: [[[__m512i; P]; TT]; GG] =
                        [[[_mm512_setzero_si512(); P]; TT]; GG];
                    for (g, ig) in iacc.iter_mut().enumerate() {
                        let at = (((g0 + g) * blocks + k) * halves + h) * ROWS;
                        let start = _mm512_loadu_si512(self.sums.as_ptr().add(at).cast());
                        for it in ig.iter_mut() {
                            *it = [start; P];
                        }
                    }
                    for q in h * quads..(h + 1) * quads {
                        let mut b: [[__m512i; P]; TT] = [[_mm512_setzero_si512(); P]; TT];
                        for (t, bt) in b.iter_mut().enumerate() {
                            let row = ((k * tokens + t0 + t) * P) * BLOCK + 4 * q;
                            for (p, bp) in bt.iter_mut().enumerate() {
                                let at = acts.bytes.as_ptr().add(row + p * BLOCK);
                                *bp = _mm512_set1_epi32(at.cast::<i32>().read_unaligned());
                            }
                        }
                        for (g, ig) in iacc.iter_mut().enumerate() {
                            let tile = ((g0 + g) * blocks + k) * ROWS * BLOCK + q * 64;
                            let w = _mm512_loadu_si512(self.quants.as_ptr().add(tile).cast());
                            for (it, bt) in ig.iter_mut().zip(&b) {
                                for (acc, bp) in it.iter_mut().zip(bt) {
                                    *acc = _mm512_dpbusd_epi32(*acc, *bp, w);
                                }
                            }
                        }
                    }
                    for (g, (fg, ig)) in facc.iter_mut().zip(&iacc).enumerate() {
                        let at = (((g0 + g) * blocks + k) * halves + h) * ROWS;
                        let ws = _mm512_loadu_ps(self.scales.as_ptr().add(at));
                        for (t, (f, it)) in fg.iter_mut().zip(ig).enumerate() {
                            // The finest part first, as on the tiles.
                            let mut v = _mm512_cvtepi32_ps(it[P - 1]);
                            for p in (0..P - 1).rev() {
                                v = _mm512_fmadd_ps(v, unit, _mm512_cvtepi32_ps(it[p]));
                            }
                            let s = *acts.scales.get_unchecked(k * tokens + t0 + t);
                            *f = _mm512_fmadd_ps(v, _mm512_mul_ps(ws, _mm512_set1_ps(s)), *f);
                        }
                    }
                }
                if !self.mins.is_empty() {
                    for (g, fg) in facc.iter_mut().enumerate() {
                        let at = ((g0 + g) * blocks + k) * ROWS;
                        let ms = _mm512_loadu_ps(self.mins.as_ptr().add(at));
                        for (t, f) in fg.iter_mut().enumerate() {
                            let x = *acts.sums.get_unchecked(k * tokens + t0 + t);
                            *f = _mm512_fnmadd_ps(ms, _mm512_set1_ps(x), *f);
                        }
                    }
                }
            }
            for (g, fg) in facc.iter().enumerate() {
                let first_row = (g0 + g) * ROWS;
                let live = self.rows.saturating_sub(first_row).min(ROWS);
                let mask: u16 = if live == ROWS {
                    u16::MAX
                } else {
                    (1u16 << live) - 1
                };
                for (t, f) in fg.iter().enumerate() {
                    let at = (t0 + t) * self.rows + first_row;
                    assert!(at + live <= out.len, "vnni output rows in bounds");
                    _mm512_mask_storeu_ps(out.ptr.add(at), mask, *f);
                }
            }
        }
    }
}

impl Packed {
    /// Group `g` (16 rows, as two halves of 8) × token `t` on AVX-VNNI
    /// (256 bits), `H` scales per block: the arithmetic of
    /// [`tile`](Self::tile), lane for lane.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and AVX-VNNI; the group and token exist and no
    /// other thread writes the group's rows of this token.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    unsafe fn tile256<const P: usize, const H: usize>(
        &self,
        acts: &Acts<P>,
        g: usize,
        t: usize,
        out: &SharedOut,
    ) {
        use std::arch::x86_64::{
            __m256i, _mm256_cvtepi32_ps, _mm256_dpbusd_avx_epi32, _mm256_fmadd_ps,
            _mm256_fnmadd_ps, _mm256_loadu_ps, _mm256_loadu_si256, _mm256_mul_ps,
            _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps,
        };
        let blocks = self.cols / BLOCK;
        let quads = BLOCK / 4 / H;
        assert_eq!(self.halves, H);
        let tokens = acts.tokens;
        assert!(t < tokens && (g + 1) * ROWS * blocks * BLOCK <= self.quants.len());
        // SAFETY: (the whole body) every pointer stays inside the buffers
        // whose bounds were checked above (group g's quants, scales, sums
        // and mins, token t's activations); `out` is written at group g's
        // rows of token t, in bounds (checked before the copy).
        unsafe {
            let mut facc = [_mm256_setzero_ps(); 2];
            let unit = _mm256_set1_ps(1.0 / LOW);
            for k in 0..blocks {
                let next = self
                    .quants
                    .as_ptr()
                    .wrapping_add((g * blocks + k + 1) * ROWS * BLOCK);
                for line in 0..8 {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * line).cast());
                }
                let s = _mm256_set1_ps(*acts.scales.get_unchecked(k * tokens + t));
                for h in 0..H {
                    let at = ((g * blocks + k) * H + h) * ROWS;
                    let start = |half: usize| {
                        _mm256_loadu_si256(self.sums.as_ptr().add(at + 8 * half).cast())
                    };
                    let mut iacc: [[__m256i; P]; 2] = [[start(0); P], [start(1); P]];
                    for q in h * quads..(h + 1) * quads {
                        let row = ((k * tokens + t) * P) * BLOCK + 4 * q;
                        let b: [__m256i; P] = std::array::from_fn(|p| {
                            let at = acts.bytes.as_ptr().add(row + p * BLOCK);
                            _mm256_set1_epi32(at.cast::<i32>().read_unaligned())
                        });
                        let tile = (g * blocks + k) * ROWS * BLOCK + q * 64;
                        for (half, ih) in iacc.iter_mut().enumerate() {
                            let w = _mm256_loadu_si256(
                                self.quants.as_ptr().add(tile + 32 * half).cast(),
                            );
                            for (acc, bp) in ih.iter_mut().zip(&b) {
                                *acc = _mm256_dpbusd_avx_epi32(*acc, *bp, w);
                            }
                        }
                    }
                    for (half, (f, ih)) in facc.iter_mut().zip(&iacc).enumerate() {
                        let ws = _mm256_loadu_ps(self.scales.as_ptr().add(at + 8 * half));
                        let mut v = _mm256_cvtepi32_ps(ih[P - 1]);
                        for p in (0..P - 1).rev() {
                            v = _mm256_fmadd_ps(v, unit, _mm256_cvtepi32_ps(ih[p]));
                        }
                        *f = _mm256_fmadd_ps(v, _mm256_mul_ps(ws, s), *f);
                    }
                }
                if !self.mins.is_empty() {
                    let x = _mm256_set1_ps(*acts.sums.get_unchecked(k * tokens + t));
                    for (half, f) in facc.iter_mut().enumerate() {
                        let at = (g * blocks + k) * ROWS + 8 * half;
                        let ms = _mm256_loadu_ps(self.mins.as_ptr().add(at));
                        *f = _mm256_fnmadd_ps(ms, x, *f);
                    }
                }
            }
            self.store256(&facc, g, t, out);
        }
    }
}

impl Packed {
    /// [`tile256`](Self::tile256) on plain AVX2: each `VPDPBUSD` is
    /// `VPMADDUBSW` (pairs of unsigned activation bytes times signed
    /// weights, added into 16 bits) then `VPMADDWD` by ones (pairs of those
    /// into the 32-bit lane). The 16-bit pairs cannot saturate: the packed
    /// weights of Q5_0, Q4_K and Q6_K lie in −32..31, so a pair is at most
    /// 2 · 255 · 32 < 2¹⁵. Q8_0's weights reach ±127 (`SIGNED`): there the
    /// activation part goes in as its magnitude (|a| ≤ 127) and its sign
    /// moves onto the weight (`VPSIGNB`), a pair at most 2 · 127 · 127, and
    /// the lanes start at zero (no bias to take off). Either way the int32
    /// sums are those of the VNNI paths, exactly.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the group and token exist and no other
    /// thread writes the group's rows of this token.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const P: usize, const H: usize, const SIGNED: bool>(
        &self,
        acts: &Acts<P>,
        g: usize,
        t: usize,
        out: &SharedOut,
    ) {
        use std::arch::x86_64::{
            __m256i, _mm256_add_epi16, _mm256_add_epi32, _mm256_cvtepi32_ps, _mm256_fmadd_ps,
            _mm256_fnmadd_ps, _mm256_loadu_ps, _mm256_loadu_si256, _mm256_madd_epi16,
            _mm256_maddubs_epi16, _mm256_mul_ps, _mm256_set1_epi8, _mm256_set1_epi16,
            _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps, _mm256_setzero_si256,
            _mm256_sign_epi8, _mm256_xor_si256,
        };
        let blocks = self.cols / BLOCK;
        let quads = BLOCK / 4 / H;
        assert_eq!(self.halves, H);
        assert_eq!(self.signed, SIGNED);
        let tokens = acts.tokens;
        assert!(t < tokens && (g + 1) * ROWS * blocks * BLOCK <= self.quants.len());
        // SAFETY: (the whole body) as in `tile256`: every pointer stays
        // inside the buffers whose bounds were checked above; `out` is
        // written at group g's rows of token t, in bounds (checked).
        unsafe {
            let mut facc = [_mm256_setzero_ps(); 2];
            let unit = _mm256_set1_ps(1.0 / LOW);
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(i8::MIN);
            for k in 0..blocks {
                let next = self
                    .quants
                    .as_ptr()
                    .wrapping_add((g * blocks + k + 1) * ROWS * BLOCK);
                for line in 0..8 {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * line).cast());
                }
                let s = _mm256_set1_ps(*acts.scales.get_unchecked(k * tokens + t));
                for h in 0..H {
                    let at = ((g * blocks + k) * H + h) * ROWS;
                    let start = |half: usize| {
                        if SIGNED {
                            _mm256_setzero_si256()
                        } else {
                            _mm256_loadu_si256(self.sums.as_ptr().add(at + 8 * half).cast())
                        }
                    };
                    let mut iacc: [[__m256i; P]; 2] = [[start(0); P], [start(1); P]];
                    let quad = |q: usize, p: usize| {
                        let row = ((k * tokens + t) * P) * BLOCK + 4 * q;
                        let at = acts.bytes.as_ptr().add(row + p * BLOCK);
                        _mm256_set1_epi32(at.cast::<i32>().read_unaligned())
                    };
                    let weights = |q: usize, half: usize| {
                        let tile = (g * blocks + k) * ROWS * BLOCK + q * 64;
                        _mm256_loadu_si256(self.quants.as_ptr().add(tile + 32 * half).cast())
                    };
                    if SIGNED {
                        for q in h * quads..(h + 1) * quads {
                            // The signed parts (each byte minus 128) and
                            // their magnitudes.
                            let b: [__m256i; P] =
                                std::array::from_fn(|p| _mm256_xor_si256(quad(q, p), flip));
                            let magnitude: [__m256i; P] =
                                std::array::from_fn(|p| _mm256_sign_epi8(b[p], b[p]));
                            for (half, ih) in iacc.iter_mut().enumerate() {
                                let w = weights(q, half);
                                for ((acc, bp), mp) in ih.iter_mut().zip(&b).zip(&magnitude) {
                                    let pairs = _mm256_maddubs_epi16(*mp, _mm256_sign_epi8(w, *bp));
                                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(pairs, ones));
                                }
                            }
                        }
                    } else {
                        // Two quads' 16-bit pairs add before widening: each
                        // is at most 2 · 255 · 32, two of them < 2¹⁵.
                        for q in (h * quads..(h + 1) * quads).step_by(2) {
                            let b0: [__m256i; P] = std::array::from_fn(|p| quad(q, p));
                            let b1: [__m256i; P] = std::array::from_fn(|p| quad(q + 1, p));
                            for (half, ih) in iacc.iter_mut().enumerate() {
                                let (w0, w1) = (weights(q, half), weights(q + 1, half));
                                for (p, acc) in ih.iter_mut().enumerate() {
                                    let pairs = _mm256_add_epi16(
                                        _mm256_maddubs_epi16(b0[p], w0),
                                        _mm256_maddubs_epi16(b1[p], w1),
                                    );
                                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(pairs, ones));
                                }
                            }
                        }
                    }
                    for (half, (f, ih)) in facc.iter_mut().zip(&iacc).enumerate() {
                        let ws = _mm256_loadu_ps(self.scales.as_ptr().add(at + 8 * half));
                        let mut v = _mm256_cvtepi32_ps(ih[P - 1]);
                        for p in (0..P - 1).rev() {
                            v = _mm256_fmadd_ps(v, unit, _mm256_cvtepi32_ps(ih[p]));
                        }
                        *f = _mm256_fmadd_ps(v, _mm256_mul_ps(ws, s), *f);
                    }
                }
                if !self.mins.is_empty() {
                    let x = _mm256_set1_ps(*acts.sums.get_unchecked(k * tokens + t));
                    for (half, f) in facc.iter_mut().enumerate() {
                        let at = (g * blocks + k) * ROWS + 8 * half;
                        let ms = _mm256_loadu_ps(self.mins.as_ptr().add(at));
                        *f = _mm256_fnmadd_ps(ms, x, *f);
                    }
                }
            }
            self.store256(&facc, g, t, out);
        }
    }
}

impl Packed {
    /// Group `g`'s 16 sums of token `t` (two halves of 8 lanes) into `out`,
    /// the rows that exist.
    ///
    /// # Safety
    /// The CPU has AVX; no other thread writes the group's rows of this
    /// token.
    #[target_feature(enable = "avx")]
    unsafe fn store256(
        &self,
        facc: &[std::arch::x86_64::__m256; 2],
        g: usize,
        t: usize,
        out: &SharedOut,
    ) {
        let mut lanes = [0f32; ROWS];
        let first_row = g * ROWS;
        let live = self.rows.saturating_sub(first_row).min(ROWS);
        let at = t * self.rows + first_row;
        assert!(at + live <= out.len, "vnni output rows in bounds");
        // SAFETY: `lanes` holds 16 floats; `out` has `live` rows from `at`
        // (checked), written by this thread only (the caller's promise).
        unsafe {
            std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), facc[0]);
            std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr().add(8), facc[1]);
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.ptr.add(at), live);
        }
    }
}
