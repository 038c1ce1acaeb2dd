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
// sequences share one cache buffer per layer). Needs blockDim.x >=
// head_dim and shared memory for blockDim.x floats.
__global__ void attention(const float* q, const float* k, const float* v, float* out,
                          const int* position, const int* base, int heads, int head_dim,
                          int kv_dim, int group, int window, int slots) {
    extern __shared__ float tile[];
    int head = blockIdx.x, t = blockIdx.y, tid = threadIdx.x;
    int pos = position[t];
    k += (size_t)base[t] * kv_dim;
    v += (size_t)base[t] * kv_dim;
    int first = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const float* qh = q + ((size_t)t * heads + head) * head_dim;
    int kv_off = (head / group) * head_dim;
    float running_max = NEG_INF, running_sum = 0.0f, acc = 0.0f;
    for (int start = first; start <= pos; start += blockDim.x) {
        int p = start + tid;
        float score = NEG_INF;
        if (p <= pos) {
            int slot = slots > 0 ? p % slots : p;
            const float* kp = k + (size_t)slot * kv_dim + kv_off;
            score = 0.0f;
            for (int d = 0; d < head_dim; ++d) score += qh[d] * kp[d];
        }
        tile[tid] = score;
        __syncthreads();
        // Tile max (every thread reads the tile; tiles are small).
        int count = min((int)blockDim.x, pos - start + 1);
        float tile_max = NEG_INF;
        for (int j = 0; j < count; ++j) tile_max = fmaxf(tile_max, tile[j]);
        float new_max = fmaxf(running_max, tile_max);
        float rescale = expf(running_max - new_max);
        __syncthreads();
        if (tid < count) tile[tid] = expf(tile[tid] - new_max);
        __syncthreads();
        float tile_sum = 0.0f;
        for (int j = 0; j < count; ++j) tile_sum += tile[j];
        running_sum = running_sum * rescale + tile_sum;
        if (tid < head_dim) {
            float a = acc * rescale;
            for (int j = 0; j < count; ++j) {
                int pj = start + j;
                int slot = slots > 0 ? pj % slots : pj;
                a += tile[j] * v[(size_t)slot * kv_dim + kv_off + tid];
            }
            acc = a;
        }
        running_max = new_max;
        __syncthreads();
    }
    if (tid < head_dim) out[((size_t)t * heads + head) * head_dim + tid] = acc / running_sum;
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

}  // extern "C"
