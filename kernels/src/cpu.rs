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
        if std::env::var_os("DIMA_KERNELS").is_some_and(|v| v == "portable") {
            return Self::Portable;
        }
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

    /// Every variant this CPU can run (for tests).
    pub fn available() -> Vec<Self> {
        let best = Self::detect();
        [Self::Portable, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|k| *k <= best)
            .collect()
    }
}
