//! Which compiled variant of the CPU kernels runs on this machine: the
//! instruction sets are probed once at run time, and every kernel that has
//! variants (the row kernels of [`crate::quant`], attention in
//! [`crate::ops`]) dispatches on [`Kernel::detect`].

/// Which compiled variant of the row kernels runs on this CPU (ordered from
/// the narrowest instruction set to the widest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// Baseline x86-64 / any architecture.
    Portable,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 (F, BW, VL) + FMA + F16C; one token runs the hand-written
    /// kernels of `rows512`.
    Avx512,
}

impl Kernel {
    /// The best variant this CPU supports (detected at run time), unless
    /// `DIMA_KERNELS=portable` asks for the baseline.
    pub fn detect() -> Self {
        // Decided once per process: matvec asks for every projection.
        static DETECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(Self::probe)
    }

    fn probe() -> Self {
        let best = Self::best();
        match Choice::from_env() {
            Ok(Choice::Portable) => Self::Portable,
            Ok(Choice::Avx2 | Choice::AvxVnni | Choice::Avx2F32) => best.min(Self::Avx2),
            _ => best,
        }
    }

    /// The widest variant this CPU runs.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Self::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Its name, as `DIMA_KERNELS` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2f32",
            Self::Avx512 => "avx512",
        }
    }

    /// Checks `DIMA_KERNELS`: an error names a value it does not know.
    pub fn check_env() -> Result<(), String> {
        Choice::from_env().map(|_| ())
    }

    /// Every variant this CPU can run (for tests).
    pub fn available() -> Vec<Self> {
        let best = Self::detect();
        [Self::Portable, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|k| *k <= best)
            .collect()
    }
}

/// What `DIMA_KERNELS` asks for: one kernel path, forced (for tests and
/// benchmarks), or the best this CPU has (unset or `auto`). A path the CPU
/// lacks falls back to the next narrower one it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The best this CPU has: AMX, then AVX-512 VNNI, AVX-VNNI, plain
    /// AVX2 int8, then the f32 rows.
    Auto,
    /// The baseline f32 kernels, no int8 products.
    Portable,
    /// Plain AVX2: int8 products (`VPMADDUBSW` + `VPMADDWD`) for prompts,
    /// batches and one token, as a CPU with AVX2 and no VNNI runs them.
    Avx2,
    /// The AVX2 f32 kernels, no int8 products.
    Avx2F32,
    /// The AVX-512 f32 kernels, no int8 products.
    Avx512,
    /// AVX-512 VNNI int8 products (no AMX).
    Avx512Vnni,
    /// AVX-VNNI (256-bit) int8 products, with the AVX2 f32 rows: what a CPU
    /// with AVX-VNNI and no AVX-512 runs.
    AvxVnni,
    /// The AMX tiles (where the CPU has them).
    Amx,
}

impl Choice {
    /// The values `DIMA_KERNELS` takes.
    pub const VALUES: &'static str =
        "auto, amx, avx512vnni, avxvnni, avx2, avx512, avx2f32, portable";

    /// `DIMA_KERNELS`, read.
    pub fn from_env() -> Result<Self, String> {
        let Some(value) = std::env::var_os("DIMA_KERNELS") else {
            return Ok(Self::Auto);
        };
        match value.to_str().unwrap_or("") {
            "" | "auto" => Ok(Self::Auto),
            "portable" => Ok(Self::Portable),
            "avx2" => Ok(Self::Avx2),
            "avx512" => Ok(Self::Avx512),
            "avx512vnni" => Ok(Self::Avx512Vnni),
            "avxvnni" => Ok(Self::AvxVnni),
            "amx" => Ok(Self::Amx),
            "avx2f32" => Ok(Self::Avx2F32),
            other => Err(format!(
                "DIMA_KERNELS={other:?} is not a kernel path (one of: {})",
                Self::VALUES
            )),
        }
    }
}
