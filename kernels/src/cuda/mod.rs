//! The CUDA backend's device side (feature `cuda`): a context and stream on
//! one GPU, cuBLAS for the bf16 matrix products (f32 accumulation), and our
//! own kernels (`kernels/cuda/gemma3.cu`) compiled at run time with NVRTC.
//!
//! Everything is loaded dynamically (cudarc's `dynamic-loading`), so the
//! crate builds and links on machines without CUDA; [`Gpu::new`] then
//! fails with [`GpuError::NoDriver`] instead of panicking. Each kernel
//! mirrors a CPU op (`crate::ops`) or the model's attention loop; `dima gpu
//! check` compares them on random inputs.

mod check;

use std::sync::Arc;

use cudarc::cublas::CudaBlas;

use crate::device::{AttentionShape, Device, DeviceError, Elem};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

pub use check::{check_kernels, info};
pub use cudarc::driver::CudaSlice;

/// The kernels' CUDA source.
pub const SOURCE: &str = include_str!("../../cuda/gemma3.cu");

/// The kernels [`SOURCE`] defines, by name.
pub const KERNELS: [&str; 16] = [
    "f32_to_bf16",
    "scale_in_place",
    "store_kv",
    "rms_norm",
    "rope_neox",
    "geglu",
    "embed_bf16",
    "add_in_place",
    "attention",
    "argmax_rows",
    "gemv_bf16",
    "rms_norm_bf16",
    "residual_norm",
    "qkv_prep",
    "geglu_bf16",
    "attention_bf16",
];

/// The most tokens `gemv_bf16` takes (`GEMV_TOKENS` in the source), and
/// the rows each warp streams (`GEMV_ROWS`).
const GEMV_TOKENS: usize = 16;
const GEMV_ROWS: usize = 4;

/// Which kernel computes [`Gpu::gemm_bf16`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPath {
    /// cuBLAS GEMM-ex (the default: on an H100 it reads the weights at 87
    /// to 95% of the copy bandwidth for every token count up to 16, and
    /// beats `gemv_bf16` everywhere but within 1% on the LM head).
    Blas,
    /// Our `gemv_bf16`, where the shapes allow it (at most 16 tokens,
    /// columns a multiple of 8), cuBLAS elsewhere: kept for `dima gpu gemm`
    /// to compare.
    Gemv,
}

impl GemmPath {
    /// `cublas` or `gemv`.
    pub fn parse(name: &str) -> Result<Self, GpuError> {
        match name {
            "cublas" => Ok(Self::Blas),
            "gemv" => Ok(Self::Gemv),
            other => Err(GpuError::Shape(format!(
                "unknown matrix-product path {other:?}: cublas or gemv"
            ))),
        }
    }

    /// The name [`GemmPath::parse`] takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Blas => "cublas",
            Self::Gemv => "gemv",
        }
    }
}

/// Why a GPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The CUDA driver or NVRTC library is not installed.
    #[error("no CUDA here: {0}")]
    NoDriver(String),
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// NVRTC could not compile the kernels.
    #[error("compiling kernels/cuda/gemma3.cu with NVRTC: {0}")]
    Compile(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(String),
    /// Buffers that do not fit the operation.
    #[error("{0}")]
    Shape(String),
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Driver(e.to_string())
    }
}

/// One GPU: its context, a stream, cuBLAS and the compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: Vec<CudaFunction>,
    /// The [`GemmPath`] as a number (`Gpu::set_gemm_path`).
    gemm: std::sync::atomic::AtomicU8,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .finish()
    }
}

/// What [`Gpu::describe`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's name.
    pub name: String,
    /// Its ordinal.
    pub ordinal: usize,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Memory (free, total) in bytes.
    pub memory: (usize, usize),
}

/// Threads per block for element-wise kernels.
const THREADS: u32 = 256;

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(THREADS).max(1), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Where [`Gpu::attention`] writes.
enum AttentionOut<'a> {
    F32(&'a mut CudaSlice<f32>),
    Bf16(&'a mut CudaSlice<u16>),
}

/// One block of 512 threads per row (the row kernels' block reductions).
fn row_blocks(rows: usize) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (int(rows, "rows")? as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn int(v: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(v).map_err(|_| GpuError::Shape(format!("{what} = {v} does not fit an i32")))
}

fn check(what: &str, len: usize, need: usize) -> Result<(), GpuError> {
    if len < need {
        return Err(GpuError::Shape(format!(
            "{what}: {len} values, the operation needs {need}"
        )));
    }
    Ok(())
}

/// Host f32 values as bf16 bit patterns (round to nearest even), for
/// uploads.
pub fn bf16_bits(values: &[f32]) -> Vec<u16> {
    values
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_bits())
        .collect()
}

impl Gpu {
    /// Opens GPU `ordinal`: loads the driver, NVRTC and cuBLAS, compiles the
    /// kernels. Without CUDA this is [`GpuError::NoDriver`], not a panic.
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        // SAFETY: only tries to open the shared libraries.
        let (driver, nvrtc) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
            )
        };
        if !driver {
            return Err(GpuError::NoDriver(
                "the CUDA driver library (libcuda.so) is not installed or not on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        if !nvrtc {
            return Err(GpuError::NoDriver(
                "the NVRTC library (libnvrtc.so) is not installed or not on LD_LIBRARY_PATH".into(),
            ));
        }
        // SAFETY: only tries to open the shared library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(GpuError::NoDriver(
                "the cuBLAS library (libcublas.so) is not installed or not on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let count = CudaContext::device_count()?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(GpuError::NoDriver(format!(
                "GPU {ordinal} does not exist ({count} visible)"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(|e| GpuError::Blas(e.to_string()))?;
        let ptx =
            cudarc::nvrtc::compile_ptx(SOURCE).map_err(|e| GpuError::Compile(e.to_string()))?;
        let module = ctx.load_module(ptx)?;
        let functions = KERNELS
            .iter()
            .map(|name| module.load_function(name))
            .collect::<Result<Vec<_>, _>>()?;
        let path = match std::env::var("DIMA_GEMM") {
            Ok(name) => {
                GemmPath::parse(&name).map_err(|e| GpuError::Shape(format!("DIMA_GEMM: {e}")))?
            }
            Err(_) => GemmPath::Blas,
        };
        let gpu = Self {
            ctx,
            stream,
            blas,
            functions,
            gemm: std::sync::atomic::AtomicU8::new(0),
        };
        gpu.set_gemm_path(path);
        Ok(gpu)
    }

    /// Chooses the kernel of [`Gpu::gemm_bf16`] (the `DIMA_GEMM`
    /// environment variable sets it at start: `cublas` or `gemv`).
    pub fn set_gemm_path(&self, path: GemmPath) {
        let n = match path {
            GemmPath::Blas => 0,
            GemmPath::Gemv => 1,
        };
        self.gemm.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The kernel [`Gpu::gemm_bf16`] uses.
    pub fn gemm_path(&self) -> GemmPath {
        match self.gemm.load(std::sync::atomic::Ordering::Relaxed) {
            1 => GemmPath::Gemv,
            _ => GemmPath::Blas,
        }
    }

    /// The device's name, compute capability and memory.
    pub fn describe(&self) -> Result<DeviceInfo, GpuError> {
        Ok(DeviceInfo {
            name: self.ctx.name()?,
            ordinal: self.ctx.ordinal(),
            compute_capability: self.ctx.compute_capability()?,
            memory: self.ctx.mem_get_info()?,
        })
    }

    fn function(&self, name: &str) -> Result<&CudaFunction, GpuError> {
        KERNELS
            .iter()
            .position(|k| *k == name)
            .and_then(|i| self.functions.get(i))
            .ok_or_else(|| GpuError::Compile(format!("kernel {name} is missing")))
    }

    /// Copies `values` to the device.
    pub fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        values: &[T],
    ) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.clone_htod(values)?)
    }

    /// A zeroed device buffer.
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.alloc_zeros::<T>(n)?)
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        buffer: &CudaSlice<T>,
    ) -> Result<Vec<T>, GpuError> {
        Ok(self.stream.clone_dtoh(buffer)?)
    }

    /// Waits for every queued operation.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// Device memory bandwidth, bytes per second (read plus write), from
    /// `reps` device-to-device copies of `bytes`: the roofline decode is
    /// measured against.
    pub fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64, GpuError> {
        let n = bytes / 4;
        let src = self.zeros::<f32>(n)?;
        let mut dst = self.zeros::<f32>(n)?;
        self.stream.memcpy_dtod(&src, &mut dst)?;
        self.synchronize()?;
        let started = std::time::Instant::now();
        for _ in 0..reps {
            self.stream.memcpy_dtod(&src, &mut dst)?;
        }
        self.synchronize()?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(2.0 * (n * 4) as f64 * reps as f64 / seconds)
    }

    /// `y = bf16(x)` for `n` values.
    pub fn to_bf16(
        &self,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<u16>,
        n: usize,
    ) -> Result<(), GpuError> {
        check("to_bf16 x", x.len(), n)?;
        check("to_bf16 y", y.len(), n)?;
        let n32 = int(n, "n")?;
        let mut b = self.stream.launch_builder(self.function("f32_to_bf16")?);
        b.arg(x).arg(y).arg(&n32);
        // SAFETY: the kernel reads n values of x and writes n of y (checked).
        unsafe { b.launch(grid(n)) }?;
        Ok(())
    }

    /// `rows` rows of `dim`: `y = x / sqrt(mean(x²) + eps) · w`
    /// ([`crate::ops::rms_norm`]).
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<(), GpuError> {
        check("rms_norm x", x.len(), rows * dim)?;
        check("rms_norm w", w.len(), dim)?;
        check("rms_norm y", y.len(), rows * dim)?;
        let dim32 = int(dim, "dim")?;
        let mut b = self.stream.launch_builder(self.function("rms_norm")?);
        b.arg(x).arg(w).arg(y).arg(&dim32).arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "rows")? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: THREADS * 4,
        };
        // SAFETY: one block per row of `dim` (checked sizes); shared memory
        // holds one float per thread.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `rows` × `dim`: `y = bf16(rms_norm(x) · w)` (one block per row).
    pub fn rms_norm_bf16(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<u16>,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<(), GpuError> {
        check("rms_norm_bf16 x", x.len(), rows * dim)?;
        check("rms_norm_bf16 w", w.len(), dim)?;
        check("rms_norm_bf16 y", y.len(), rows * dim)?;
        let dim32 = int(dim, "dim")?;
        let mut b = self.stream.launch_builder(self.function("rms_norm_bf16")?);
        b.arg(x).arg(w).arg(y).arg(&dim32).arg(&eps);
        // SAFETY: one block per row of `dim` (checked sizes); static shared
        // memory only.
        unsafe { b.launch(row_blocks(rows)?) }?;
        Ok(())
    }

    /// `rows` × `dim`: `x += rms_norm(o) · w_post`, then `next =
    /// bf16(rms_norm(x) · w_next)`.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_norm(
        &self,
        x: &mut CudaSlice<f32>,
        o: &CudaSlice<f32>,
        (w_post, w_next): (&CudaSlice<f32>, &CudaSlice<f32>),
        next: &mut CudaSlice<u16>,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<(), GpuError> {
        check("residual_norm x", x.len(), rows * dim)?;
        check("residual_norm o", o.len(), rows * dim)?;
        check("residual_norm w_post", w_post.len(), dim)?;
        check("residual_norm w_next", w_next.len(), dim)?;
        check("residual_norm next", next.len(), rows * dim)?;
        let dim32 = int(dim, "dim")?;
        let mut b = self.stream.launch_builder(self.function("residual_norm")?);
        b.arg(x)
            .arg(o)
            .arg(w_post)
            .arg(w_next)
            .arg(next)
            .arg(&dim32)
            .arg(&eps);
        // SAFETY: one block per row of `dim` (checked sizes); static shared
        // memory only.
        unsafe { b.launch(row_blocks(rows)?) }?;
        Ok(())
    }

    /// Attention's inputs from the fused q|k|v projection (see
    /// [`crate::device::Device::qkv_prep`]).
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_prep(
        &self,
        qkv: &CudaSlice<f32>,
        (q_norm, k_norm): (&CudaSlice<f32>, &CudaSlice<f32>),
        qn: &mut CudaSlice<f32>,
        (k_cache, v_cache): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        (rope, dest): (&CudaSlice<f32>, &CudaSlice<i32>),
        (tokens, heads, kv_heads, hd): (usize, usize, usize, usize),
        (base, q_scale, eps): (f32, f32, f32),
        cache_slots: usize,
    ) -> Result<(), GpuError> {
        let (q_dim, kv_dim) = (heads * hd, kv_heads * hd);
        if hd == 0 || hd % 2 != 0 || hd > 1024 {
            return Err(GpuError::Shape(format!(
                "qkv_prep: head_dim {hd} (even, at most 1024)"
            )));
        }
        check("qkv_prep qkv", qkv.len(), tokens * (q_dim + 2 * kv_dim))?;
        check("qkv_prep q_norm", q_norm.len(), hd)?;
        check("qkv_prep k_norm", k_norm.len(), hd)?;
        check("qkv_prep qn", qn.len(), tokens * q_dim)?;
        check("qkv_prep k_cache", k_cache.len(), cache_slots * kv_dim)?;
        check("qkv_prep v_cache", v_cache.len(), cache_slots * kv_dim)?;
        check("qkv_prep rope", rope.len(), tokens)?;
        check("qkv_prep dest", dest.len(), tokens)?;
        let args = [
            int(heads, "heads")?,
            int(kv_heads, "kv_heads")?,
            int(hd, "head_dim")?,
        ];
        let mut b = self.stream.launch_builder(self.function("qkv_prep")?);
        b.arg(qkv)
            .arg(q_norm)
            .arg(k_norm)
            .arg(qn)
            .arg(k_cache)
            .arg(v_cache)
            .arg(rope)
            .arg(dest);
        for a in &args {
            b.arg(a);
        }
        b.arg(&base).arg(&q_scale).arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (
                int(heads + 2 * kv_heads, "heads")? as u32,
                int(tokens, "tokens")? as u32,
                1,
            ),
            block_dim: (hd.div_ceil(32) as u32 * 32, 1, 1),
            shared_mem_bytes: hd as u32 * 4,
        };
        // SAFETY: sizes checked above; `dest` names slots below
        // `cache_slots` (the caller's invariant, as for store_kv).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `out = bf16(gelu_tanh(gate) · up)` from the fused gate|up
    /// projection (tokens × 2·ffn).
    pub fn geglu_bf16(
        &self,
        gu: &CudaSlice<f32>,
        out: &mut CudaSlice<u16>,
        (tokens, ffn): (usize, usize),
    ) -> Result<(), GpuError> {
        check("geglu_bf16 gu", gu.len(), tokens * 2 * ffn)?;
        check("geglu_bf16 out", out.len(), tokens * ffn)?;
        let (t32, f32_) = (int(tokens, "tokens")?, int(ffn, "ffn")?);
        int(tokens * ffn, "tokens × ffn")?;
        let mut b = self.stream.launch_builder(self.function("geglu_bf16")?);
        b.arg(gu).arg(out).arg(&t32).arg(&f32_);
        // SAFETY: tokens × ffn outputs from tokens × 2·ffn inputs (checked).
        unsafe { b.launch(grid(tokens * ffn)) }?;
        Ok(())
    }

    /// RoPE (NeoX layout) in place on `tokens` × `heads` heads of
    /// `head_dim`; `positions[t]` already divided by any linear scaling
    /// ([`crate::ops::rope_neox`]).
    pub fn rope_neox(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<f32>,
        (tokens, heads, head_dim): (usize, usize, usize),
        base: f32,
    ) -> Result<(), GpuError> {
        check("rope x", x.len(), tokens * heads * head_dim)?;
        check("rope positions", positions.len(), tokens)?;
        let (h32, d32) = (int(heads, "heads")?, int(head_dim, "head_dim")?);
        let mut b = self.stream.launch_builder(self.function("rope_neox")?);
        b.arg(x).arg(positions).arg(&h32).arg(&d32).arg(&base);
        let cfg = LaunchConfig {
            grid_dim: (h32 as u32, int(tokens, "tokens")? as u32, 1),
            block_dim: (((head_dim / 2) as u32).clamp(1, 1024), 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: grid (heads, tokens) over checked sizes.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `out = gelu_tanh(gate) · up` for `n` values.
    pub fn geglu(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<(), GpuError> {
        check("geglu gate", gate.len(), n)?;
        check("geglu up", up.len(), n)?;
        check("geglu out", out.len(), n)?;
        let n32 = int(n, "n")?;
        let mut b = self.stream.launch_builder(self.function("geglu")?);
        b.arg(gate).arg(up).arg(out).arg(&n32);
        // SAFETY: n values each (checked).
        unsafe { b.launch(grid(n)) }?;
        Ok(())
    }

    /// `out[t] = table[ids[t]] · scale` (a bf16 table of `dim` columns); a
    /// negative id gives a row of zeros.
    pub fn embed_bf16(
        &self,
        table: &CudaSlice<u16>,
        ids: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        (tokens, dim): (usize, usize),
        scale: f32,
    ) -> Result<(), GpuError> {
        check("embed ids", ids.len(), tokens)?;
        check("embed out", out.len(), tokens * dim)?;
        let d32 = int(dim, "dim")?;
        let mut b = self.stream.launch_builder(self.function("embed_bf16")?);
        b.arg(table).arg(ids).arg(out).arg(&d32).arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (int(tokens, "tokens")? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: ids index rows of `table`; the caller's ids are below its
        // rows (the model checks token ids against the vocabulary).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `x += y` for `n` values.
    pub fn add_in_place(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), GpuError> {
        check("add x", x.len(), n)?;
        check("add y", y.len(), n)?;
        let n32 = int(n, "n")?;
        let mut b = self.stream.launch_builder(self.function("add_in_place")?);
        b.arg(x).arg(y).arg(&n32);
        // SAFETY: n values each (checked).
        unsafe { b.launch(grid(n)) }?;
        Ok(())
    }

    /// `x *= s` for `n` values.
    pub fn scale_in_place(&self, x: &mut CudaSlice<f32>, s: f32, n: usize) -> Result<(), GpuError> {
        check("scale x", x.len(), n)?;
        let n32 = int(n, "n")?;
        let mut b = self.stream.launch_builder(self.function("scale_in_place")?);
        b.arg(x).arg(&s).arg(&n32);
        // SAFETY: n values (checked).
        unsafe { b.launch(grid(n)) }?;
        Ok(())
    }

    /// Copies row `r` of `k_rows`/`v_rows` (`kv_dim` each) into slot
    /// `dest[r]` of the caches, for `rows` rows.
    pub fn store_kv(
        &self,
        (k_rows, v_rows): (&CudaSlice<f32>, &CudaSlice<f32>),
        (k_cache, v_cache): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        dest: &CudaSlice<i32>,
        (rows, kv_dim): (usize, usize),
        cache_slots: usize,
    ) -> Result<(), GpuError> {
        check("store_kv k", k_rows.len(), rows * kv_dim)?;
        check("store_kv v", v_rows.len(), rows * kv_dim)?;
        check("store_kv dest", dest.len(), rows)?;
        check("store_kv k cache", k_cache.len(), cache_slots * kv_dim)?;
        check("store_kv v cache", v_cache.len(), cache_slots * kv_dim)?;
        let d32 = int(kv_dim, "kv_dim")?;
        let mut b = self.stream.launch_builder(self.function("store_kv")?);
        b.arg(k_rows)
            .arg(v_rows)
            .arg(k_cache)
            .arg(v_cache)
            .arg(dest)
            .arg(&d32);
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "rows")? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: sizes checked; the caller's destinations are below
        // `cache_slots` (the model computes them from its own layout).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Attention for `tokens` queries of `heads` heads (already scaled) over
    /// the cached keys and values (`kv_dim` per slot): token `t` sees
    /// positions up to `positions[t]` of the sequence starting at slot
    /// `bases[t]`, the last `window` only when `window > 0`; slot = base +
    /// position % `slots` when `slots > 0`, else base + position. Query
    /// head h reads KV head h / `group`. Online softmax over tiles of
    /// positions.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &CudaSlice<f32>,
        kv: (&CudaSlice<f32>, &CudaSlice<f32>),
        out: &mut CudaSlice<f32>,
        positions_and_bases: (&CudaSlice<i32>, &CudaSlice<i32>),
        shape: (usize, usize, usize, usize),
        group: usize,
        window_and_slots: (usize, usize),
    ) -> Result<(), GpuError> {
        self.attention_into(
            q,
            kv,
            AttentionOut::F32(out),
            positions_and_bases,
            shape,
            group,
            window_and_slots,
        )
    }

    /// [`Gpu::attention`] with its output rounded to bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bf16(
        &self,
        q: &CudaSlice<f32>,
        kv: (&CudaSlice<f32>, &CudaSlice<f32>),
        out: &mut CudaSlice<u16>,
        positions_and_bases: (&CudaSlice<i32>, &CudaSlice<i32>),
        shape: (usize, usize, usize, usize),
        group: usize,
        window_and_slots: (usize, usize),
    ) -> Result<(), GpuError> {
        self.attention_into(
            q,
            kv,
            AttentionOut::Bf16(out),
            positions_and_bases,
            shape,
            group,
            window_and_slots,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_into(
        &self,
        q: &CudaSlice<f32>,
        (k, v): (&CudaSlice<f32>, &CudaSlice<f32>),
        out: AttentionOut<'_>,
        (positions, bases): (&CudaSlice<i32>, &CudaSlice<i32>),
        (tokens, heads, head_dim, kv_dim): (usize, usize, usize, usize),
        group: usize,
        (window, slots): (usize, usize),
    ) -> Result<(), GpuError> {
        check("attention bases", bases.len(), tokens)?;
        if head_dim as u32 > THREADS || group == 0 || (heads / group) * head_dim > kv_dim {
            return Err(GpuError::Shape(format!(
                "attention: head_dim {head_dim} (at most {THREADS}), group {group}, \
                 {heads} heads and kv_dim {kv_dim} do not fit"
            )));
        }
        check("attention q", q.len(), tokens * heads * head_dim)?;
        let out_len = match &out {
            AttentionOut::F32(o) => o.len(),
            AttentionOut::Bf16(o) => o.len(),
        };
        check("attention out", out_len, tokens * heads * head_dim)?;
        check("attention positions", positions.len(), tokens)?;
        let args = [
            int(heads, "heads")?,
            int(head_dim, "head_dim")?,
            int(kv_dim, "kv_dim")?,
            int(group, "group")?,
            int(window, "window")?,
            int(slots, "slots")?,
        ];
        let name = match &out {
            AttentionOut::F32(_) => "attention",
            AttentionOut::Bf16(_) => "attention_bf16",
        };
        let mut b = self.stream.launch_builder(self.function(name)?);
        b.arg(q).arg(k).arg(v);
        match out {
            AttentionOut::F32(o) => b.arg(o),
            AttentionOut::Bf16(o) => b.arg(o),
        };
        b.arg(positions).arg(bases);
        for a in &args {
            b.arg(a);
        }
        let cfg = LaunchConfig {
            grid_dim: (args[0] as u32, int(tokens, "tokens")? as u32, 1),
            block_dim: (THREADS, 1, 1),
            // The tile's scores, and each warp's partial output.
            shared_mem_bytes: (THREADS + THREADS / 32 * head_dim as u32) * 4,
        };
        // SAFETY: sizes checked above; the cache holds every slot the
        // positions name (the caller's invariant, as on the CPU).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `out[r]` = the index of the largest value of row `r` (`n` each).
    pub fn argmax_rows(
        &self,
        x: &CudaSlice<f32>,
        (rows, n): (usize, usize),
        out: &mut CudaSlice<i32>,
    ) -> Result<(), GpuError> {
        check("argmax x", x.len(), rows * n)?;
        check("argmax out", out.len(), rows)?;
        let n32 = int(n, "n")?;
        let mut b = self.stream.launch_builder(self.function("argmax_rows")?);
        b.arg(x).arg(&n32).arg(out);
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "rows")? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: THREADS * 8,
        };
        // SAFETY: one block per row (checked); shared memory holds a float
        // and an int per thread.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `out (tokens × rows, f32) = xs (tokens × cols, bf16) · Wᵀ` for a bf16
    /// weight `w` of `rows` × `cols` (row-major, as in the files), with f32
    /// accumulation: cuBLAS GEMM-ex (compute type 32F), or our `gemv_bf16`
    /// where [`Gpu::set_gemm_path`] asks for it and the shapes allow.
    pub fn gemm_bf16(
        &self,
        w: &CudaSlice<u16>,
        (rows, cols): (usize, usize),
        xs: &CudaSlice<u16>,
        tokens: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
        };
        check("gemm w", w.len(), rows * cols)?;
        check("gemm xs", xs.len(), tokens * cols)?;
        check("gemm out", out.len(), tokens * rows)?;
        let gemv_fits = tokens > 0 && tokens <= GEMV_TOKENS && cols % 8 == 0;
        if gemv_fits && self.gemm_path() == GemmPath::Gemv {
            let (r32, c32, t32) = (
                int(rows, "rows")?,
                int(cols, "cols")?,
                int(tokens, "tokens")?,
            );
            let warps = rows.div_ceil(GEMV_ROWS);
            let warps_per_block = (THREADS / 32) as usize;
            let cfg = LaunchConfig {
                grid_dim: (
                    int(warps.div_ceil(warps_per_block), "gemv blocks")? as u32,
                    1,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(self.function("gemv_bf16")?);
            b.arg(w).arg(xs).arg(out).arg(&r32).arg(&c32).arg(&t32);
            // SAFETY: sizes checked above; whole allocations (256-byte
            // aligned) and cols a multiple of 8 make every 16-byte load
            // aligned and in bounds; tokens is within the kernel's limit.
            unsafe { b.launch(cfg) }?;
            return Ok(());
        }
        let (m, n, k) = (
            int(rows, "rows")?,
            int(tokens, "tokens")?,
            int(cols, "cols")?,
        );
        let (alpha, beta) = (1f32, 0f32);
        let (wp, _w_sync) = w.device_ptr(&self.stream);
        let (xp, _x_sync) = xs.device_ptr(&self.stream);
        let (op, _o_sync) = out.device_ptr_mut(&self.stream);
        // Column-major view: out is (rows × tokens) with ldc = rows; W is
        // (cols × rows) with lda = cols, transposed; xs is (cols × tokens).
        // SAFETY: the pointers are live device buffers of the checked sizes
        // on this handle's stream; alpha and beta outlive the call.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&raw const alpha).cast(),
                wp as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k,
                xp as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k,
                (&raw const beta).cast(),
                op as *mut _,
                cudaDataType_t::CUDA_R_32F,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| GpuError::Blas(e.to_string()))
    }
}

fn dev(e: GpuError) -> DeviceError {
    DeviceError::Gpu(e)
}

impl Device for Gpu {
    type Buf<T: Elem> = CudaSlice<T>;

    fn upload<T: Elem>(&self, values: &[T]) -> Result<CudaSlice<T>, DeviceError> {
        Gpu::upload(self, values).map_err(dev)
    }

    fn zeros<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>, DeviceError> {
        Gpu::zeros(self, n).map_err(dev)
    }

    fn upload_parts<T: Elem>(&self, parts: &[&[T]]) -> Result<CudaSlice<T>, DeviceError> {
        let total = parts.iter().map(|p| p.len()).sum();
        let mut all = Gpu::zeros::<T>(self, total).map_err(dev)?;
        let mut at = 0;
        for part in parts {
            let mut view = all.slice_mut(at..at + part.len());
            self.stream
                .memcpy_htod(*part, &mut view)
                .map_err(|e| dev(e.into()))?;
            at += part.len();
        }
        Ok(all)
    }

    fn download<T: Elem>(&self, buffer: &CudaSlice<T>) -> Result<Vec<T>, DeviceError> {
        Gpu::download(self, buffer).map_err(dev)
    }

    fn len<T: Elem>(buffer: &CudaSlice<T>) -> usize {
        buffer.len()
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        Gpu::synchronize(self).map_err(dev)
    }

    fn to_bf16(
        &self,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<u16>,
        n: usize,
    ) -> Result<(), DeviceError> {
        Gpu::to_bf16(self, x, y, n).map_err(dev)
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        shape: (usize, usize),
        eps: f32,
    ) -> Result<(), DeviceError> {
        Gpu::rms_norm(self, x, w, y, shape, eps).map_err(dev)
    }

    fn rope_neox(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<f32>,
        shape: (usize, usize, usize),
        base: f32,
    ) -> Result<(), DeviceError> {
        Gpu::rope_neox(self, x, positions, shape, base).map_err(dev)
    }

    fn geglu(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<(), DeviceError> {
        Gpu::geglu(self, gate, up, out, n).map_err(dev)
    }

    fn embed_bf16(
        &self,
        table: &CudaSlice<u16>,
        ids: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        shape: (usize, usize),
        scale: f32,
    ) -> Result<(), DeviceError> {
        Gpu::embed_bf16(self, table, ids, out, shape, scale).map_err(dev)
    }

    fn add_in_place(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), DeviceError> {
        Gpu::add_in_place(self, x, y, n).map_err(dev)
    }

    fn scale_in_place(&self, x: &mut CudaSlice<f32>, s: f32, n: usize) -> Result<(), DeviceError> {
        Gpu::scale_in_place(self, x, s, n).map_err(dev)
    }

    fn store_kv(
        &self,
        rows: (&CudaSlice<f32>, &CudaSlice<f32>),
        caches: (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        dest: &CudaSlice<i32>,
        shape: (usize, usize),
        cache_slots: usize,
    ) -> Result<(), DeviceError> {
        Gpu::store_kv(self, rows, caches, dest, shape, cache_slots).map_err(dev)
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        kv: (&CudaSlice<f32>, &CudaSlice<f32>),
        out: &mut CudaSlice<f32>,
        positions_and_bases: (&CudaSlice<i32>, &CudaSlice<i32>),
        shape: AttentionShape,
        group: usize,
        window_and_slots: (usize, usize),
    ) -> Result<(), DeviceError> {
        Gpu::attention(
            self,
            q,
            kv,
            out,
            positions_and_bases,
            shape,
            group,
            window_and_slots,
        )
        .map_err(dev)
    }

    fn gemm_bf16(
        &self,
        w: &CudaSlice<u16>,
        shape: (usize, usize),
        xs: &CudaSlice<u16>,
        tokens: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), DeviceError> {
        Gpu::gemm_bf16(self, w, shape, xs, tokens, out).map_err(dev)
    }

    fn argmax_rows(
        &self,
        x: &CudaSlice<f32>,
        shape: (usize, usize),
        out: &mut CudaSlice<i32>,
    ) -> Result<(), DeviceError> {
        Gpu::argmax_rows(self, x, shape, out).map_err(dev)
    }

    fn rms_norm_bf16(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<u16>,
        shape: (usize, usize),
        eps: f32,
    ) -> Result<(), DeviceError> {
        Gpu::rms_norm_bf16(self, x, w, y, shape, eps).map_err(dev)
    }

    fn residual_norm(
        &self,
        x: &mut CudaSlice<f32>,
        o: &CudaSlice<f32>,
        norms: (&CudaSlice<f32>, &CudaSlice<f32>),
        next: &mut CudaSlice<u16>,
        shape: (usize, usize),
        eps: f32,
    ) -> Result<(), DeviceError> {
        Gpu::residual_norm(self, x, o, norms, next, shape, eps).map_err(dev)
    }

    fn qkv_prep(
        &self,
        qkv: &CudaSlice<f32>,
        norms: (&CudaSlice<f32>, &CudaSlice<f32>),
        qn: &mut CudaSlice<f32>,
        caches: (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        rope_dest: (&CudaSlice<f32>, &CudaSlice<i32>),
        shape: (usize, usize, usize, usize),
        scalars: (f32, f32, f32),
        cache_slots: usize,
    ) -> Result<(), DeviceError> {
        Gpu::qkv_prep(
            self,
            qkv,
            norms,
            qn,
            caches,
            rope_dest,
            shape,
            scalars,
            cache_slots,
        )
        .map_err(dev)
    }

    fn geglu_bf16(
        &self,
        gu: &CudaSlice<f32>,
        out: &mut CudaSlice<u16>,
        shape: (usize, usize),
    ) -> Result<(), DeviceError> {
        Gpu::geglu_bf16(self, gu, out, shape).map_err(dev)
    }

    fn attention_bf16(
        &self,
        q: &CudaSlice<f32>,
        kv: (&CudaSlice<f32>, &CudaSlice<f32>),
        out: &mut CudaSlice<u16>,
        positions_and_bases: (&CudaSlice<i32>, &CudaSlice<i32>),
        shape: AttentionShape,
        group: usize,
        window_and_slots: (usize, usize),
    ) -> Result<(), DeviceError> {
        Gpu::attention_bf16(
            self,
            q,
            kv,
            out,
            positions_and_bases,
            shape,
            group,
            window_and_slots,
        )
        .map_err(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the Rust side launches is defined in the source, as
    /// `extern "C"` (so NVRTC keeps its name).
    #[test]
    fn every_kernel_is_defined_in_the_source() {
        let body = SOURCE
            .split_once("extern \"C\" {")
            .map(|(_, b)| b)
            .unwrap_or_default();
        for k in KERNELS {
            assert!(
                body.contains(&format!("__global__ void {k}(")),
                "{k} is not a kernel of gemma3.cu"
            );
        }
        assert!(!SOURCE.contains("#include"), "NVRTC compiles it alone");
    }

    /// NVRTC (no GPU needed) compiles the kernels, and the PTX has an
    /// entry for each. CI puts NVRTC from PyPI (`nvidia-cuda-nvrtc-cu12`)
    /// on `LD_LIBRARY_PATH` for this test; elsewhere it is skipped when the
    /// library is absent.
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        // SAFETY: only tries to open the shared library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(
                std::env::var_os("DIMA_REQUIRE_NVRTC").is_none(),
                "DIMA_REQUIRE_NVRTC is set but libnvrtc is not on LD_LIBRARY_PATH"
            );
            eprintln!("skipped: libnvrtc is not installed");
            return;
        }
        let ptx = cudarc::nvrtc::compile_ptx(SOURCE)
            .unwrap_or_else(|e| panic!("gemma3.cu does not compile: {e}"))
            .to_src();
        for k in KERNELS {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "no PTX entry for {k}"
            );
        }
    }

    /// Without CUDA, opening a GPU is an error that says so, not a panic.
    #[test]
    fn no_gpu_is_an_error_not_a_panic() {
        // SAFETY: only tries to open the shared library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return;
        }
        let e = Gpu::new(0).unwrap_err().to_string();
        assert!(e.contains("no CUDA here") && e.contains("libcuda"), "{e}");
    }

    #[test]
    fn bf16_bits_round_to_nearest_even() {
        assert_eq!(bf16_bits(&[1.0, -2.0, 0.0]), vec![0x3f80, 0xc000, 0]);
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0).
        assert_eq!(bf16_bits(&[1.0 + 1.0 / 256.0]), vec![0x3f80]);
    }
}
