// Dima's CUDA kernels for the Gemma 3 forward pass, compiled at run time
// with NVRTC (kernels/src/cuda.rs). Each kernel mirrors a CPU op in
// kernels/src/ops.rs or the model's attention loop; `dima gpu check`
// compares them on random inputs.
//
// Conventions: activations are f32, row-major; weights for cuBLAS are bf16,
// held as raw 16-bit patterns (no CUDA headers needed, so NVRTC compiles
// this alone); the KV cache is f32, one row of kv_dim values per slot.

#define NEG_INF __int_as_float(0xff800000)

extern "C" {

// bf16 bits of x, rounded to nearest even (NaN stays NaN).
__device__ unsigned short bf16_bits(float x) {
    unsigned int bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (unsigned short)(bits >> 16);
}

__device__ float bf16_value(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }

// The sum of v over the block, returned to every thread. blockDim.x is a
// multiple of 32 (at most 1024); `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // a previous call's readers are done with scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}


// y[i] = bf16(x[i]): activations for the bf16 GEMMs.
__global__ void f32_to_bf16(const float* x, unsigned short* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = bf16_bits(x[i]);
}

// One block per row: y = x / sqrt(mean(x^2) + eps) * w. `w` is the
// multiplier (GGUF's 1 + w, or 1 + w formed at load for checkpoints).
__global__ void rms_norm(const float* x, const float* w, float* y, int dim, float eps) {
    extern __shared__ float partial[];
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* yr = y + (size_t)blockIdx.x * dim;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += xr[i] * xr[i];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    float scale = rsqrtf(partial[0] / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
}

// RoPE, NeoX layout (element i pairs with i + head_dim/2), in place.
// Grid: (heads, tokens); position[t] is already divided by any linear
// scaling; one thread per pair.
__global__ void rope_neox(float* x, const float* position, int heads, int head_dim, float base) {
    int head = blockIdx.x, t = blockIdx.y, half = head_dim / 2;
    float* h = x + ((size_t)t * heads + head) * head_dim;
    float p = position[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float inv_freq = powf(base, -(float)(2 * i) / (float)head_dim);
        float s, c;
        sincosf(p * inv_freq, &s, &c);
        float a = h[i], b = h[i + half];
        h[i] = a * c - b * s;
        h[i + half] = b * c + a * s;
    }
}

// out[i] = gelu_tanh(gate[i]) * up[i] (PyTorch's tanh approximation).
__global__ void geglu(const float* gate, const float* up, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = gate[i];
        float inner = 0.7978846f * (g + 0.044715f * g * g * g);
        out[i] = 0.5f * g * (1.0f + tanhf(inner)) * up[i];
    }
}

// One block per token: out[t] = table[ids[t]] * scale (bf16 table); a
// negative id (a token another rank's vocabulary slice holds) gives zeros.
__global__ void embed_bf16(const unsigned short* table, const int* ids, float* out, int dim, float scale) {
    int id = ids[blockIdx.x];
    float* o = out + (size_t)blockIdx.x * dim;
    if (id < 0) {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = 0.0f;
        return;
    }
    const unsigned short* row = table + (size_t)id * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = bf16_value(row[i]) * scale;
}

// x[i] *= s.
__global__ void scale_in_place(float* x, float s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

// One block per row: copies row r of k_rows and v_rows (kv_dim each) into
// slot dest[r] of the caches.
__global__ void store_kv(const float* k_rows, const float* v_rows, float* k_cache, float* v_cache,
                         const int* dest, int kv_dim) {
    size_t from = (size_t)blockIdx.x * kv_dim, to = (size_t)dest[blockIdx.x] * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_cache[to + i] = k_rows[from + i];
        v_cache[to + i] = v_rows[from + i];
    }
}

// x[i] += y[i].
__global__ void add_in_place(float* x, const float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// Attention of one query per (head, token) over the cached positions
// first..=position[t], flash-style: the keys are visited in tiles of
// blockDim positions with a running max and sum (online softmax), so the
// full score row never exists. `q` is already scaled. Query head `head`
// reads KV head head / group. `window` > 0 limits local layers to the last
// `window` positions; `slots` > 0 makes each sequence's cache a ring of
// that many slots (position p lives in slot p % slots), else slot =
// position; token t's sequence starts at slot base[t] of the cache (many
// sequences share one cache buffer per layer).
//
// Within a tile each warp takes every (blockDim/32)-th position: a dot
// product over head_dim spread across its lanes for the score, then that
// position's value row (again across lanes) into the warp's own partial
// output; the warps' partials are summed at the end. Needs blockDim.x a
// multiple of 32, head_dim <= 256, and shared memory for blockDim.x +
// (blockDim.x / 32) * head_dim floats.
__device__ __forceinline__ void attend(const float* q, const float* k, const float* v, float* out,
                                       unsigned short* out16, const int* position, const int* base,
                                       int heads, int head_dim, int kv_dim, int group, int window,
                                       int slots) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    float* scores = smem;
    float* partial = smem + blockDim.x;
    const int head = blockIdx.x, t = blockIdx.y, tid = threadIdx.x;
    const int warps = blockDim.x >> 5, warp = tid >> 5, lane = tid & 31;
    const int pos = position[t];
    k += (size_t)base[t] * kv_dim;
    v += (size_t)base[t] * kv_dim;
    const int first = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const float* qh = q + ((size_t)t * heads + head) * head_dim;
    const int kv_off = (head / group) * head_dim;
    float qr[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        qr[i] = d < head_dim ? qh[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float running_max = NEG_INF, running_sum = 0.0f;
    for (int start = first; start <= pos; start += blockDim.x) {
        const int count = min((int)blockDim.x, pos - start + 1);
        for (int j = warp; j < count; j += warps) {
            const int p = start + j;
            const float* kp = k + (size_t)(slots > 0 ? p % slots : p) * kv_dim + kv_off;
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int d = lane + 32 * i;
                if (d < head_dim) s += qr[i] * kp[d];
            }
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane == 0) scores[j] = s;
        }
        __syncthreads();
        float m = NEG_INF;
        for (int j = tid; j < count; j += blockDim.x) m = fmaxf(m, scores[j]);
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) scratch[warp] = m;
        __syncthreads();
        m = NEG_INF;
        for (int w = 0; w < warps; ++w) m = fmaxf(m, scratch[w]);
        const float new_max = fmaxf(running_max, m);
        const float rescale = expf(running_max - new_max);
        float sum = 0.0f;
        for (int j = tid; j < count; j += blockDim.x) {
            const float e = expf(scores[j] - new_max);
            scores[j] = e;
            sum += e;
        }
        // block_sum synchronises, so every exponent is in place after it.
        sum = block_sum(sum, scratch);
        running_sum = running_sum * rescale + sum;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] *= rescale;
        for (int j = warp; j < count; j += warps) {
            const int p = start + j;
            const float* vp = v + (size_t)(slots > 0 ? p % slots : p) * kv_dim + kv_off;
            const float w = scores[j];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int d = lane + 32 * i;
                if (d < head_dim) acc[i] += w * vp[d];
            }
        }
        running_max = new_max;
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) partial[warp * head_dim + d] = acc[i];
    }
    __syncthreads();
    for (int d = tid; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < warps; ++w) o += partial[w * head_dim + d];
        const size_t at = ((size_t)t * heads + head) * head_dim + d;
        if (out16) {
            out16[at] = bf16_bits(o / running_sum);
        } else {
            out[at] = o / running_sum;
        }
    }
}

__global__ void attention(const float* q, const float* k, const float* v, float* out,
                          const int* position, const int* base, int heads, int head_dim,
                          int kv_dim, int group, int window, int slots) {
    attend(q, k, v, out, 0, position, base, heads, head_dim, kv_dim, group, window, slots);
}

// attention with its output rounded to bf16 (the output projection's input).
__global__ void attention_bf16(const float* q, const float* k, const float* v, unsigned short* out,
                               const int* position, const int* base, int heads, int head_dim,
                               int kv_dim, int group, int window, int slots) {
    attend(q, k, v, 0, out, position, base, heads, head_dim, kv_dim, group, window, slots);
}

// One block per row: out[r] = the index of the largest of x[r] (the
// lowest index among equals, as the CPU's argmax).
__global__ void argmax_rows(const float* x, int n, int* out) {
    extern __shared__ float shared[];
    float* best = shared;
    int* where = (int*)(shared + blockDim.x);
    const float* row = x + (size_t)blockIdx.x * n;
    float b = NEG_INF;
    int at = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i];
        if (v > b || (v == b && i < at)) { b = v; at = i; }
    }
    best[threadIdx.x] = b;
    where[threadIdx.x] = at;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float o = best[threadIdx.x + s];
            int oa = where[threadIdx.x + s];
            if (o > best[threadIdx.x] || (o == best[threadIdx.x] && oa < where[threadIdx.x])) {
                best[threadIdx.x] = o;
                where[threadIdx.x] = oa;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = where[0];
}

// The fused kernels of a decode step (each equals a composition of the
// kernels above; `dima gpu check` compares them with it).

// One block per row: y = bf16(x / sqrt(mean(x^2) + eps) * w).
__global__ void rms_norm_bf16(const float* x, const float* w, unsigned short* y, int dim, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * dim;
    unsigned short* yr = y + (size_t)blockIdx.x * dim;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += xr[i] * xr[i];
    float scale = rsqrtf(block_sum(sum, scratch) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = bf16_bits(xr[i] * scale * w[i]);
}

// One block per row: x += rms_norm(o) * w_post; next = bf16(rms_norm(x) *
// w_next). Each thread rereads only the x values it wrote.
__global__ void residual_norm(float* x, const float* o, const float* w_post, const float* w_next,
                              unsigned short* next, int dim, float eps) {
    __shared__ float scratch[32];
    const size_t row = (size_t)blockIdx.x * dim;
    float* xr = x + row;
    const float* orow = o + row;
    unsigned short* nr = next + row;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += orow[i] * orow[i];
    const float s1 = rsqrtf(block_sum(sum, scratch) / (float)dim + eps);
    float sum2 = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i] + orow[i] * s1 * w_post[i];
        xr[i] = v;
        sum2 += v * v;
    }
    const float s2 = rsqrtf(block_sum(sum2, scratch) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) nr[i] = bf16_bits(xr[i] * s2 * w_next[i]);
}

// Attention's inputs from the fused projection. Grid (heads + 2 kv_heads,
// tokens), blockDim.x = head_dim rounded up to 32, shared memory for
// head_dim floats. Row t of qkv is [q (heads x hd) | k (kv_heads x hd) |
// v]. A q head: qn = rope(rms_norm(q) * q_norm) * q_scale; a k head:
// rope(rms_norm(k) * k_norm) into slot dest[t] of k_cache; a v head: as it
// is into slot dest[t] of v_cache. RoPE as rope_neox.
__global__ void qkv_prep(const float* qkv, const float* q_norm, const float* k_norm, float* qn,
                         float* k_cache, float* v_cache, const float* rope, const int* dest,
                         int heads, int kv_heads, int hd, float base, float q_scale, float eps) {
    extern __shared__ float vals[];
    __shared__ float scratch[32];
    const int slot = blockIdx.x, t = blockIdx.y, i = threadIdx.x;
    const int q_dim = heads * hd, kv_dim = kv_heads * hd;
    const float* row = qkv + (size_t)t * (q_dim + 2 * kv_dim);
    if (slot >= heads + kv_heads) {
        const int h = slot - heads - kv_heads;
        if (i < hd) v_cache[(size_t)dest[t] * kv_dim + h * hd + i] = row[q_dim + kv_dim + h * hd + i];
        return;
    }
    const bool is_q = slot < heads;
    const int h = is_q ? slot : slot - heads;
    const float* src = row + (is_q ? h * hd : q_dim + h * hd);
    const float* w = is_q ? q_norm : k_norm;
    const float v = i < hd ? src[i] : 0.0f;
    const float scale = rsqrtf(block_sum(v * v, scratch) / (float)hd + eps);
    if (i < hd) vals[i] = v * scale * w[i];
    __syncthreads();
    const int half = hd / 2;
    float* out = is_q ? qn + ((size_t)t * heads + h) * hd : k_cache + (size_t)dest[t] * kv_dim + h * hd;
    const float mul = is_q ? q_scale : 1.0f;
    if (i < half) {
        float inv_freq = powf(base, -(float)(2 * i) / (float)hd);
        float s, c;
        sincosf(rope[t] * inv_freq, &s, &c);
        float a = vals[i], b = vals[i + half];
        out[i] = (a * c - b * s) * mul;
        out[i + half] = (b * c + a * s) * mul;
    }
}

// The MLP's activation from the fused projection: row t of gu is
// [gate (ffn) | up (ffn)]; out = bf16(gelu_tanh(gate) * up), tokens x ffn.
__global__ void geglu_bf16(const float* gu, unsigned short* out, int tokens, int ffn) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)tokens * ffn) return;
    const size_t t = idx / ffn, i = idx % ffn;
    const float g = gu[t * 2 * ffn + i], u = gu[t * 2 * ffn + ffn + i];
    const float inner = 0.7978846f * (g + 0.044715f * g * g * g);
    out[idx] = bf16_bits(0.5f * g * (1.0f + tanhf(inner)) * u);
}

// Eight bf16 values (one 16-byte load) as f32.
__device__ __forceinline__ void bf16x8(uint4 v, float* f) {
    f[0] = __uint_as_float(v.x << 16);
    f[1] = __uint_as_float(v.x & 0xffff0000u);
    f[2] = __uint_as_float(v.y << 16);
    f[3] = __uint_as_float(v.y & 0xffff0000u);
    f[4] = __uint_as_float(v.z << 16);
    f[5] = __uint_as_float(v.z & 0xffff0000u);
    f[6] = __uint_as_float(v.w << 16);
    f[7] = __uint_as_float(v.w & 0xffff0000u);
}

#define GEMV_ROWS 4
#define GEMV_TOKENS 16

// Decode's matrix product, y (tokens x rows, f32) = x (tokens x cols, bf16)
// times W^T (rows x cols, bf16), for at most GEMV_TOKENS tokens: reading
// the weights is all the time it takes, so each warp streams GEMV_ROWS rows
// of W with 16-byte loads (several in flight per lane) and uses each load
// for every token. cols is a multiple of 8 and both buffers 16-byte
// aligned (the caller checks). Products accumulate in f32, per lane and
// then across the warp.
__global__ void gemv_bf16(const unsigned short* w, const unsigned short* x, float* y,
                          int rows, int cols, int tokens) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const int r0 = warp * GEMV_ROWS;
    if (r0 >= rows) return;
    const int per_row = cols >> 3;
    const uint4* wv = (const uint4*)w;
    const uint4* xv = (const uint4*)x;
    float acc[GEMV_ROWS][GEMV_TOKENS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; ++t) acc[r][t] = 0.0f;
    for (int c = lane; c < per_row; c += 32) {
        float wf[GEMV_ROWS][8];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (r0 + r < rows) v = __ldg(wv + (size_t)(r0 + r) * per_row + c);
            bf16x8(v, wf[r]);
        }
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; ++t) {
            if (t < tokens) {
                float xf[8];
                bf16x8(__ldg(xv + (size_t)t * per_row + c), xf);
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[r][t] = fmaf(wf[r][i], xf[i], acc[r][t]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; ++t) {
            if (t < tokens) {
                float v = acc[r][t];
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane == 0 && r0 + r < rows) y[(size_t)t * rows + r0 + r] = v;
            }
        }
    }
}

}  // extern "C"
