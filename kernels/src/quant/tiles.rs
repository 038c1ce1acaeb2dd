//! Q8_0, Q5_0 and Q4_K products on Intel AMX tiles: the path for prompts
//! and batched decode steps (two tokens or more; one token stays on the
//! f32 row kernels, which are faster for it) on CPUs that have AMX.
//!
//! At load, such a matrix is repacked ([`Packed::new`]): for every 16 weight
//! rows and every 32-column block, the 16 × 32 small integers of the blocks
//! (Q8_0's bytes, Q5_0's 5-bit values minus 16, Q4_K's 4-bit values) lie
//! together as one 512-byte tile in the order `TDPBSSD` reads, with their
//! 16 scales (and Q4_K's mins) beside. A product writes each token's
//! activations, per block, as three rows of signed bytes (a coarse part and
//! two finer ones, about 23 bits together: see `Activations`); per block
//! three `TDPBSSD` multiply up to 16 tokens by the 16 rows in int32, and the
//! block's sums are scaled (weight scale × activation scale, minus the mins
//! times the block's activation sum) into f32 results, block after block.
//! So results sit within about 1e-6 (relative to the terms) of exact
//! products, and a token's result depends only on its own activations,
//! whatever the batch of two or more around it. A token alone (the f32
//! kernels) and the same token in a batch agree to about 1e-6, not bit for
//! bit.
//!
//! The f32 kernels stay in use where AMX is missing and for the other
//! types (Q6_K here). `DIMA_AMX=0` (or `DIMA_KERNELS=portable`) turns the
//! tiles off.

use std::arch::asm;

use super::{GgmlType, QMatrix};

/// Weight rows per tile (and tokens per tile).
pub(super) const ROWS: usize = 16;
/// Columns per block (one scale each).
pub(super) const BLOCK: usize = 32;

/// Whether the tile kernels run in this process (checked once): AMX-TILE
/// and AMX-INT8 on an AVX-512 CPU, the tile state granted by Linux.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(probe)
}

fn probe() -> bool {
    // The row kernels' choice: AVX-512 present, and `DIMA_KERNELS` unset,
    // `auto` or `amx`.
    use crate::cpu::Choice;
    if std::env::var_os("DIMA_AMX").is_some_and(|v| v == "0")
        || super::Kernel::detect() != super::Kernel::Avx512
        || !matches!(Choice::from_env(), Ok(Choice::Auto | Choice::Amx))
    {
        return false;
    }
    // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (1 << 24) == 0 || leaf.edx & (1 << 25) == 0 {
        return false;
    }
    // Linux hands out the tile data state only on request
    // (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)).
    let ret: i64;
    // SAFETY: the arch_prctl system call with two integer arguments; it
    // touches no memory of ours.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") 158i64 => ret,
            in("rdi") 0x1023i64,
            in("rsi") 18i64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// A Q8_0, Q5_0, Q4_K or Q6_K matrix in tile order (for the AMX tiles, or
/// for the VNNI products of `super::vnni`).
#[derive(Debug)]
pub struct Packed {
    pub(super) rows: usize,
    pub(super) cols: usize,
    /// Per group of 16 rows, per block: 16 rows × 32 signed values.
    pub(super) quants: Vec<i8>,
    /// Per group, per block (per half): the 16 rows' scales.
    pub(super) scales: Vec<f32>,
    /// Per group, per block: the 16 rows' mins (Q4_K: a weight is
    /// `scale · q − min`); empty for the types without.
    pub(super) mins: Vec<f32>,
    /// Per group, per block (per half): −128 times each of the 16 rows'
    /// sums of their integers, laid out as `scales` (where the VNNI
    /// path's int32 sums start, taking off the activations' bias of 128);
    /// empty on the tiles.
    pub(super) sums: Vec<i32>,
    /// Scales per 32-column block: 1, or 2 for Q6_K (one per 16 columns,
    /// each half its own tile product).
    pub(super) halves: usize,
    /// The int8 path it was packed for.
    pub(super) path: super::Int8,
    /// Q8_0 on plain AVX2: `VPMADDUBSW` would saturate on unsigned
    /// activations times full-range weights, so the activations' signs
    /// move onto the weights (`sums` are then zero).
    pub(super) signed: bool,
}

/// Q6_K super-block `b` (256 values): its values minus 32 and its 16
/// scales (one per 16 values). The values come from the f32 decoder run on
/// a copy whose scales and multiplier are 1, so they are exact integers.
fn q6_k_ints(b: &[u8], out: &mut [i8; 256]) -> [f32; 16] {
    let d = f32::from(half::f16::from_le_bytes([b[208], b[209]]));
    let mut unit = [0u8; 210];
    unit.copy_from_slice(&b[..210]);
    unit[192..208].fill(1);
    unit[208..210].copy_from_slice(&half::f16::ONE.to_le_bytes());
    let mut values = [0f32; 256];
    super::block_q6_k(&unit, &mut values);
    for (o, v) in out.iter_mut().zip(&values) {
        *o = *v as i8;
    }
    std::array::from_fn(|i| d * f32::from(b[192 + i] as i8))
}

/// Sub-block `j` (0..8, 32 values) of a Q4_K super-block: its 4-bit values,
/// scale and min.
fn q4_k_ints(b: &[u8], j: usize, out: &mut [i8]) -> (f32, f32) {
    let d = f32::from(half::f16::from_le_bytes([b[0], b[1]]));
    let dmin = f32::from(half::f16::from_le_bytes([b[2], b[3]]));
    let (sc, m) = super::scale_min_k4(j, &b[4..16]);
    let q = &b[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
    for (o, v) in out.iter_mut().zip(q) {
        *o = if j.is_multiple_of(2) {
            v & 0x0f
        } else {
            v >> 4
        } as i8;
    }
    (d * f32::from(sc), dmin * f32::from(m))
}

/// One block's 32 signed values and its scale.
fn block_ints(t: GgmlType, b: &[u8], out: &mut [i8]) -> f32 {
    let d = f32::from(half::f16::from_le_bytes([b[0], b[1]]));
    match t {
        GgmlType::Q8_0 => {
            for (o, q) in out.iter_mut().zip(&b[2..34]) {
                *o = *q as i8;
            }
        }
        _ => {
            // Q5_0: the f32 decoder on a copy whose multiplier is 1 gives
            // the integers exactly.
            let mut unit = [0u8; 22];
            unit.copy_from_slice(&b[..22]);
            unit[..2].copy_from_slice(&half::f16::ONE.to_le_bytes());
            let mut values = [0f32; 32];
            super::block_q5_0(&unit, &mut values);
            for (o, v) in out.iter_mut().zip(&values) {
                *o = *v as i8;
            }
        }
    }
    d
}

impl Packed {
    /// The tile order of `m`, when it is Q8_0, Q5_0, Q4_K or Q6_K and an
    /// int8 path runs here ([`super::Int8::detect`]: the tiles or VNNI).
    pub fn new(m: &QMatrix<'_>) -> Option<Self> {
        Self::new_for(m, super::Int8::detect())
    }

    /// [`new`](Self::new) for the int8 path `path` (which must run here:
    /// [`super::Int8::supported`]).
    pub fn new_for(m: &QMatrix<'_>, path: super::Int8) -> Option<Self> {
        if !path.supported() {
            return None;
        }
        if !matches!(
            m.ggml_type,
            GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4K | GgmlType::Q6K
        ) || !m.cols.is_multiple_of(BLOCK)
            || m.rows == 0
            || path == super::Int8::None
        {
            return None;
        }
        let vnni = matches!(
            path,
            super::Int8::Avx512Vnni | super::Int8::AvxVnni | super::Int8::Avx2
        );
        let signed = path == super::Int8::Avx2 && m.ggml_type == GgmlType::Q8_0;
        let (rows, cols) = (m.rows, m.cols);
        let (groups, blocks) = (rows.div_ceil(ROWS), cols / BLOCK);
        let k4 = m.ggml_type == GgmlType::Q4K;
        let k6 = m.ggml_type == GgmlType::Q6K;
        let halves = if k6 { 2 } else { 1 };
        let block_bytes = match m.ggml_type {
            GgmlType::Q8_0 => 34,
            GgmlType::Q5_0 => 22,
            GgmlType::Q4K => 144,
            _ => 210,
        };
        let mut quants = vec![0i8; groups * blocks * ROWS * BLOCK];
        let mut scales = vec![0f32; groups * blocks * ROWS * halves];
        let mut six = [0i8; 256];
        let mut six_scales = [0f32; 16];
        let mut mins = if k4 {
            vec![0f32; groups * blocks * ROWS]
        } else {
            Vec::new()
        };
        let mut sums = if vnni {
            vec![0i32; groups * blocks * ROWS * halves]
        } else {
            Vec::new()
        };
        let mut ints = [0i8; BLOCK];
        for r in 0..rows {
            let (g, j) = (r / ROWS, r % ROWS);
            let row = m.row(r);
            for k in 0..blocks {
                let tile = (g * blocks + k) * ROWS * BLOCK;
                let at = (g * blocks + k) * ROWS + j;
                if k6 {
                    // Eight 32-column blocks per super-block, two scales each.
                    if k % 8 == 0 {
                        let sb = &row[(k / 8) * block_bytes..(k / 8 + 1) * block_bytes];
                        six_scales = q6_k_ints(sb, &mut six);
                    }
                    let within = k % 8;
                    ints.copy_from_slice(&six[32 * within..32 * within + 32]);
                    for h in 0..2 {
                        scales[((g * blocks + k) * 2 + h) * ROWS + j] = six_scales[2 * within + h];
                    }
                } else if k4 {
                    // Eight 32-column sub-blocks per 256-column super-block.
                    let sb = &row[(k / 8) * block_bytes..(k / 8 + 1) * block_bytes];
                    (scales[at], mins[at]) = q4_k_ints(sb, k % 8, &mut ints);
                } else {
                    scales[at] = block_ints(
                        m.ggml_type,
                        &row[k * block_bytes..(k + 1) * block_bytes],
                        &mut ints,
                    );
                }
                // The signs of the activations move onto Q8_0's weights on
                // plain AVX2, and −128 has no positive twin: such a matrix
                // keeps the f32 rows (llama.cpp writes −127..127).
                if signed && ints.contains(&i8::MIN) {
                    return None;
                }
                // The B tile's quad layout: row q holds, for each of the
                // 16 weight rows, its columns 4q..4q+4.
                for (c, v) in ints.iter().enumerate() {
                    quants[tile + (c / 4) * ROWS * 4 + j * 4 + c % 4] = *v;
                }
                if vnni && !signed {
                    let part = BLOCK / halves;
                    for (h, half) in ints.chunks_exact(part).enumerate() {
                        let sum: i32 = half.iter().map(|&v| i32::from(v)).sum();
                        sums[((g * blocks + k) * halves + h) * ROWS + j] = -128 * sum;
                    }
                }
            }
        }
        Some(Self {
            rows,
            cols,
            quants,
            scales,
            mins,
            sums,
            halves,
            path,
            signed,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.quants.len() + (self.scales.len() + self.mins.len() + self.sums.len()) * 4
    }

    /// `out (n × rows) = xs (n × cols) · Wᵀ` on the int8 path it was
    /// packed for.
    pub fn matmul(&self, xs: &[f32], n: usize, out: &mut [f32]) {
        match self.path {
            super::Int8::Amx => self.tile_matmul(xs, n, out),
            path if path.parts() == super::AVX2_PARTS => {
                self.vnni_matmul::<{ super::AVX2_PARTS }>(xs, n, out)
            }
            _ => self.vnni_matmul::<{ super::VNNI_PARTS }>(xs, n, out),
        }
    }

    /// `out (n × rows) = xs (n × cols) · Wᵀ` on the AMX tiles, rows split
    /// across the rayon pool.
    fn tile_matmul(&self, xs: &[f32], n: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(
            (xs.len(), out.len()),
            (n * cols, n * rows),
            "tile matmul shapes"
        );
        // Tile instructions fault unless Linux granted the tile state.
        assert!(available(), "AMX tiles are not available to this process");
        let groups = rows.div_ceil(ROWS);
        // Every 16 tokens' activations first, so each weight tile is read
        // once and used for all of them.
        let acts: Vec<Activations> = (0..n)
            .step_by(ROWS)
            .map(|start| {
                let m = (n - start).min(ROWS);
                Activations::new(&xs[start * cols..(start + m) * cols], m, cols)
            })
            .collect();
        let per_task = GROUPS_PER_TASK;
        let shared = SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        };
        (0..groups.div_ceil(per_task))
            .into_par_iter()
            .for_each(|task| {
                let (first, last) = (task * per_task, ((task + 1) * per_task).min(groups));
                // SAFETY: `available()` held above; the tiles are
                // configured on this thread for each token count before
                // use and released after. This task writes only rows
                // `16·first .. 16·last` of each token: no other task does.
                unsafe {
                    let mut configured = 0;
                    for (i, a) in acts.iter().enumerate() {
                        if a.tokens != configured {
                            configure(a.tokens, BLOCK / self.halves);
                            configured = a.tokens;
                        }
                        self.groups(first..last, a, &shared, i * ROWS);
                    }
                    asm!("tilerelease", options(nostack, nomem));
                }
            });
    }

    /// Groups `gs` (16 rows each, fewer at the end; at most
    /// [`GROUPS_PER_TASK`]) for every token of `a` (tokens `first_token`..
    /// of the product), into their rows of `out`. Blocks are the outer loop: a
    /// block's three activation tiles are loaded once and stay in their
    /// tile registers while each group's weight tile passes through.
    ///
    /// # Safety
    /// The tiles are configured for `a.tokens` ([`configure`]), and no
    /// other thread writes these groups' rows of these tokens in `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn groups(
        &self,
        gs: std::ops::Range<usize>,
        a: &Activations,
        out: &SharedOut,
        first_token: usize,
    ) {
        use std::arch::x86_64::{
            _MM_HINT_T0, _mm_prefetch, _mm512_cvtepi32_ps, _mm512_fmadd_ps, _mm512_fnmadd_ps,
            _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mul_ps, _mm512_set1_ps, _mm512_storeu_ps,
        };
        assert!(gs.len() <= GROUPS_PER_TASK);
        let blocks = self.cols / BLOCK;
        let tokens = a.tokens;
        let mut accs = [[[0f32; ROWS]; ROWS]; GROUPS_PER_TASK];
        let mut high = [[0i32; ROWS]; ROWS];
        let mut mid = [[0i32; ROWS]; ROWS];
        let mut low = [[0i32; ROWS]; ROWS];
        let part = BLOCK / self.halves;
        for kh in 0..blocks * self.halves {
            let (k, h) = (kh / self.halves, kh % self.halves);
            // Columns `h · part ..` of block k of the activations.
            let cols_at = k * BLOCK * tokens + h * part;
            // SAFETY: block k of the activations' three parts, `tokens`
            // rows of 32 bytes each (`part` bytes used), into the A tiles.
            unsafe {
                asm!(
                    "tileloadd tmm1, [{h} + {s32}*1]",
                    "tileloadd tmm2, [{m} + {s32}*1]",
                    "tileloadd tmm6, [{l} + {s32}*1]",
                    h = in(reg) a.high.as_ptr().add(cols_at),
                    m = in(reg) a.mid.as_ptr().add(cols_at),
                    l = in(reg) a.low.as_ptr().add(cols_at),
                    s32 = in(reg) BLOCK,
                    options(nostack, readonly),
                );
            }
            for (acc, g) in accs.iter_mut().zip(gs.clone()) {
                // This block's (or half block's) weights: `part / 4` rows
                // of the B tile.
                let tile = (g * blocks + k) * ROWS * BLOCK + h * part * ROWS;
                // The same group's next block, for when this pass returns
                // to it (a hint: it never faults).
                let next = self.quants.as_ptr().wrapping_add(tile + ROWS * BLOCK);
                for line in 0..ROWS * BLOCK / self.halves / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * line).cast());
                }
                // SAFETY: B is this group's 512-byte tile of block k (8
                // rows of 64 bytes, or 4 for a half); the sums go to
                // `high`, `mid` and `low`, `tokens` rows of 64 bytes.
                unsafe {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm4",
                        "tilezero tmm5",
                        "tileloadd tmm3, [{b} + {s64}*1]",
                        "tdpbssd tmm0, tmm1, tmm3",
                        "tdpbssd tmm4, tmm2, tmm3",
                        "tdpbssd tmm5, tmm6, tmm3",
                        "tilestored [{ch} + {s64}*1], tmm0",
                        "tilestored [{cm} + {s64}*1], tmm4",
                        "tilestored [{cl} + {s64}*1], tmm5",
                        b = in(reg) self.quants.as_ptr().add(tile),
                        ch = in(reg) high.as_mut_ptr(),
                        cm = in(reg) mid.as_mut_ptr(),
                        cl = in(reg) low.as_mut_ptr(),
                        s64 = in(reg) ROWS * 4,
                        options(nostack),
                    );
                }
                // acc[t] += (high + mid / 254 + low / 254²) · (weight
                // scales · token t's scale), 16 rows at once; then, for
                // Q4_K, − mins · Σ x over the block.
                let at = (g * blocks + k) * ROWS;
                let scale_at = ((g * blocks + k) * self.halves + h) * ROWS;
                // SAFETY: 16 floats from `at` (one group's block scales and
                // mins), 16 values per row of `high`, `low` and `acc`.
                unsafe {
                    let ws = _mm512_loadu_ps(self.scales.as_ptr().add(scale_at));
                    let (unit1, unit2) =
                        (_mm512_set1_ps(1.0 / LOW), _mm512_set1_ps(1.0 / (LOW * LOW)));
                    for t in 0..tokens {
                        let ints = |part: &[[i32; ROWS]; ROWS]| {
                            _mm512_cvtepi32_ps(_mm512_loadu_si512(part[t].as_ptr().cast()))
                        };
                        let v = _mm512_fmadd_ps(
                            ints(&low),
                            unit2,
                            _mm512_fmadd_ps(ints(&mid), unit1, ints(&high)),
                        );
                        let scale = _mm512_mul_ps(ws, _mm512_set1_ps(a.scales[k * ROWS + t]));
                        let sum = _mm512_fmadd_ps(v, scale, _mm512_loadu_ps(acc[t].as_ptr()));
                        _mm512_storeu_ps(acc[t].as_mut_ptr(), sum);
                    }
                    if !self.mins.is_empty() {
                        let ms = _mm512_loadu_ps(self.mins.as_ptr().add(at));
                        for (row, x) in acc.iter_mut().zip(&a.sums[k * ROWS..]).take(tokens) {
                            let sum = _mm512_fnmadd_ps(
                                ms,
                                _mm512_set1_ps(*x),
                                _mm512_loadu_ps(row.as_ptr()),
                            );
                            _mm512_storeu_ps(row.as_mut_ptr(), sum);
                        }
                    }
                }
            }
        }
        for (acc, g) in accs.iter().zip(gs) {
            let live = (self.rows - g * ROWS).min(ROWS);
            for (t, row) in acc.iter().enumerate().take(tokens) {
                let at = (first_token + t) * self.rows + g * ROWS;
                assert!(at + live <= out.len, "tile output rows in bounds");
                // SAFETY: in bounds (checked above); the caller guarantees
                // no other thread writes these elements.
                unsafe {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), out.ptr.add(at), live);
                }
            }
        }
    }
}

/// The product's output, shared by the tasks of [`Packed::matmul`], each
/// writing only its own rows of every token.
pub(super) struct SharedOut {
    pub(super) ptr: *mut f32,
    pub(super) len: usize,
}

// SAFETY: tasks write disjoint elements (see `Packed::groups`), and the
// buffer outlives them (the parallel loop returns before `matmul` does).
unsafe impl Sync for SharedOut {}

/// Row groups (of 16 rows) one task of [`Packed::matmul`] takes: their
/// accumulators stay on the stack while the blocks pass.
const GROUPS_PER_TASK: usize = 4;

/// The finer parts' unit: `x ≈ scale · (high + mid / LOW + low / LOW²)`.
const LOW: f32 = 254.0;

/// Up to 16 tokens' activations in the A tiles' layout, per 32-column
/// block: `x ≈ scale · (high + mid / 254 + low / 254²)` with `scale =
/// max |x| / 127` and each part the rounded remainder of the one before,
/// all signed bytes, one row of 32 per token. The error is at most
/// `max |x| / (127 · 2 · 254²)` (about 6e-8 of the block's largest value,
/// f32's own resolution), so float-order differences upstream
/// (tensor-parallel sums) are not magnified here.
struct Activations {
    high: Vec<i8>,
    mid: Vec<i8>,
    low: Vec<i8>,
    /// Per block, 16 token scales (zero past `tokens`).
    scales: Vec<f32>,
    /// Per block, 16 tokens' sums of their activations (for Q4_K's mins).
    sums: Vec<f32>,
    tokens: usize,
}

impl Activations {
    fn new(xs: &[f32], tokens: usize, cols: usize) -> Self {
        let blocks = cols / BLOCK;
        let mut act = Self {
            high: vec![0i8; blocks * BLOCK * tokens],
            mid: vec![0i8; blocks * BLOCK * tokens],
            low: vec![0i8; blocks * BLOCK * tokens],
            scales: vec![0f32; blocks * ROWS],
            sums: vec![0f32; blocks * ROWS],
            tokens,
        };
        for t in 0..tokens {
            for k in 0..blocks {
                let x = &xs[t * cols + k * BLOCK..t * cols + (k + 1) * BLOCK];
                let at = (k * tokens + t) * BLOCK;
                // SAFETY: the tiles exist here ([`available`], checked by
                // every caller), so AVX-512 does.
                let (d, sum) = unsafe { act.block(x, at) };
                act.scales[k * ROWS + t] = d;
                act.sums[k * ROWS + t] = sum;
            }
        }
        act
    }

    /// One token's block `x` (32 values) into its three parts at `at`;
    /// returns its scale and its sum. Sixteen lanes throughout (fixed-size
    /// arrays), so it compiles to a few AVX-512 instructions.
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW, VL).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn block(&mut self, x: &[f32], at: usize) -> (f32, f32) {
        use std::arch::x86_64::{
            _mm_storeu_si128, _mm512_abs_ps, _mm512_add_ps, _mm512_cvtepi32_epi8,
            _mm512_cvtepi32_ps, _mm512_cvtps_epi32, _mm512_loadu_ps, _mm512_max_ps, _mm512_mul_ps,
            _mm512_reduce_add_ps, _mm512_reduce_max_ps, _mm512_set1_ps, _mm512_sub_ps,
        };
        assert!(x.len() == BLOCK && at + BLOCK <= self.high.len());
        // SAFETY: `x` holds 32 floats (checked), the parts 32 bytes from
        // `at` (checked); conversions round to nearest even (the default
        // rounding mode), each part's remainder exact.
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
            for (half, v) in [a, b].into_iter().enumerate() {
                let scaled = _mm512_mul_ps(v, inv);
                let whole = _mm512_cvtps_epi32(scaled);
                let rest = _mm512_mul_ps(_mm512_sub_ps(scaled, _mm512_cvtepi32_ps(whole)), unit);
                let middle = _mm512_cvtps_epi32(rest);
                let fine = _mm512_mul_ps(_mm512_sub_ps(rest, _mm512_cvtepi32_ps(middle)), unit);
                let at = at + 16 * half;
                _mm_storeu_si128(
                    self.high.as_mut_ptr().add(at).cast(),
                    _mm512_cvtepi32_epi8(whole),
                );
                _mm_storeu_si128(
                    self.mid.as_mut_ptr().add(at).cast(),
                    _mm512_cvtepi32_epi8(middle),
                );
                _mm_storeu_si128(
                    self.low.as_mut_ptr().add(at).cast(),
                    _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(fine)),
                );
            }
            (d, sum)
        }
    }
}

/// The tile configuration (`LDTILECFG`'s 64-byte operand).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Tiles for products of `tokens` tokens: the sums (tmm0 for the high
/// integers, tmm4 for the low) tokens rows × 16 int32; A (tmm1, tmm2)
/// tokens rows × 32 bytes; B (tmm3, weights) 8 rows of 16 groups of 4.
///
/// # Safety
/// The tiles are available ([`available`]).
unsafe fn configure(tokens: usize, k_bytes: usize) {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    let t = tokens as u8;
    (cfg.colsb[0], cfg.rows[0]) = (64, t);
    let kb = k_bytes as u16;
    (cfg.colsb[1], cfg.rows[1]) = (kb, t);
    (cfg.colsb[2], cfg.rows[2]) = (kb, t);
    (cfg.colsb[3], cfg.rows[3]) = (64, (k_bytes / 4) as u8);
    (cfg.colsb[4], cfg.rows[4]) = (64, t);
    (cfg.colsb[5], cfg.rows[5]) = (64, t);
    (cfg.colsb[6], cfg.rows[6]) = (kb, t);
    // SAFETY: a valid palette-1 configuration; the caller saw AMX granted.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &raw const cfg, options(nostack, readonly));
    }
}
