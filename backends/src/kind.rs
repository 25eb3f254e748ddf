//! Run-time backend selection (`--backend`, `--dtype`): which backends this build holds, and a
//! probe that turns "no GPU here" into one error line before any driver call can panic.

use std::fmt;

use crate::DsBackend;

/// Backends selectable at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Burn's Flex CPU backend (always compiled in).
    Flex,
    /// CubeCL on wgpu (Vulkan/Metal/DX12; lavapipe runs it on the CPU). Feature `wgpu`.
    Wgpu,
    /// CubeCL on CUDA (needs libcuda and a GPU at run time). Feature `cuda`.
    Cuda,
}

/// Float precision of the run (weights and activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FloatDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Why a backend cannot run here. Each prints as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error(
        "backend {name:?} is not available: unknown backend (known: flex (alias cpu), wgpu, cuda)"
    )]
    Unknown { name: String },
    #[error("unknown dtype {name:?} (known: f32, bf16, f16)")]
    UnknownDtype { name: String },
    #[error("backend {name} is not available in this build (rebuild with `--features {name}`)")]
    NotCompiled { name: &'static str },
    #[error("backend cuda is not available: no CUDA driver (libcuda) on this machine")]
    NoCudaDriver,
    #[error("backend cuda is not available: {0}")]
    CudaDevice(String),
    #[error("backend wgpu is not available: no usable adapter ({0}); without a GPU install mesa-vulkan-drivers")]
    NoWgpuAdapter(String),
    #[error("backend {backend} does not support dtype {dtype}: {reason}")]
    Dtype {
        backend: &'static str,
        dtype: &'static str,
        reason: &'static str,
    },
}

/// The old name of [`BackendError`].
pub type UnknownBackend = BackendError;

impl BackendKind {
    /// Accepted names (`--backend`, case-insensitive) and the backend each selects.
    pub const ALL: &'static [(&'static str, BackendKind)] = &[
        ("flex", BackendKind::Flex),
        ("cpu", BackendKind::Flex),
        ("wgpu", BackendKind::Wgpu),
        ("cuda", BackendKind::Cuda),
    ];

    /// Parses a backend name (case-insensitive); does not check that it is compiled in.
    ///
    /// # Errors
    /// [`BackendError::Unknown`] when `name` is none of [`BackendKind::ALL`].
    pub fn parse(name: &str) -> Result<Self, BackendError> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
            .map(|(_, k)| *k)
            .ok_or_else(|| BackendError::Unknown {
                name: name.to_string(),
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }

    /// Whether this build holds the backend.
    pub fn compiled(self) -> bool {
        match self {
            BackendKind::Flex => true,
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// Checks that the backend is compiled in, that its device exists (CUDA: libcuda is loaded
    /// and reports a device, probed without any call that can panic), and that it supports
    /// `dtype`.
    ///
    /// # Errors
    /// - [`BackendError::NotCompiled`]: this build lacks the backend's feature.
    /// - [`BackendError::Dtype`]: a half dtype on Flex or wgpu (they run f32 only).
    /// - [`BackendError::NoCudaDriver`] / [`BackendError::CudaDevice`]: libcuda is missing, or
    ///   reports no device or an error.
    /// - [`BackendError::NoWgpuAdapter`]: wgpu finds no usable adapter (its panic is caught).
    pub fn check(self, dtype: FloatDtype) -> Result<(), BackendError> {
        if !self.compiled() {
            return Err(BackendError::NotCompiled { name: self.name() });
        }
        let refuse = |reason| {
            Err(BackendError::Dtype {
                backend: self.name(),
                dtype: dtype.name(),
                reason,
            })
        };
        match (self, dtype) {
            (_, FloatDtype::F32) => {}
            (BackendKind::Flex, _) => return refuse("the model runs in f32 on the CPU"),
            // lavapipe has no bf16 and panics instead of failing: refuse it here.
            (BackendKind::Wgpu, _) => return refuse("wgpu runs the model in f32 only"),
            (BackendKind::Cuda, _) => {}
        }
        match self {
            BackendKind::Cuda => cuda_probe(),
            BackendKind::Wgpu => wgpu_probe(),
            BackendKind::Flex => Ok(()),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FloatDtype {
    /// Parses a dtype name (case-insensitive): `f32`/`float32`, `bf16`/`bfloat16`,
    /// `f16`/`float16`/`half`.
    ///
    /// # Errors
    /// [`BackendError::UnknownDtype`] for any other name.
    pub fn parse(name: &str) -> Result<Self, BackendError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(FloatDtype::F32),
            "bf16" | "bfloat16" => Ok(FloatDtype::Bf16),
            "f16" | "float16" | "half" => Ok(FloatDtype::F16),
            _ => Err(BackendError::UnknownDtype {
                name: name.to_string(),
            }),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "f32",
            FloatDtype::Bf16 => "bf16",
            FloatDtype::F16 => "f16",
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_probe() -> Result<(), BackendError> {
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made when it is absent.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(BackendError::NoCudaDriver);
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(BackendError::CudaDevice(
            "the driver reports no device".into(),
        )),
        Err(e) => Err(BackendError::CudaDevice(format!("{e:?}"))),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_probe() -> Result<(), BackendError> {
    Err(BackendError::NotCompiled { name: "cuda" })
}

#[cfg(feature = "wgpu")]
fn wgpu_probe() -> Result<(), BackendError> {
    use std::sync::OnceLock;
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // wgpu panics when no adapter exists; run one tiny op with the panic contained and
            // its message kept out of stderr.
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let r = std::panic::catch_unwind(|| {
                let device = Default::default();
                burn::tensor::Tensor::<crate::Wgpu, 1>::zeros([1], &device)
                    .into_data()
                    .to_vec::<f32>()
                    .map(|_| ())
                    .map_err(|e| format!("{e:?}"))
            });
            std::panic::set_hook(hook);
            match r {
                Ok(r) => r,
                Err(p) => Err(p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "initialisation panicked".into())
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()),
            }
        })
        .clone()
        .map_err(BackendError::NoWgpuAdapter)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_probe() -> Result<(), BackendError> {
    Err(BackendError::NotCompiled { name: "wgpu" })
}

/// Generic code to run on whichever backend is selected at run time.
pub trait OnBackend {
    type Output;
    /// Runs on backend `B` with its default device; `kind` and `dtype` say which it is.
    fn run<B: DsBackend>(self, kind: BackendKind, dtype: FloatDtype) -> Self::Output;
}

/// Checks `kind`/`dtype` ([`BackendKind::check`]) and runs `f` on that backend.
///
/// # Errors
/// Whatever [`BackendKind::check`] returns; `f` does not run then. Panics inside `f` are not
/// caught.
pub fn on_backend<F: OnBackend>(
    kind: BackendKind,
    dtype: FloatDtype,
    f: F,
) -> Result<F::Output, BackendError> {
    kind.check(dtype)?;
    match (kind, dtype) {
        (BackendKind::Flex, _) => Ok(f.run::<crate::Cpu>(kind, dtype)),
        #[cfg(feature = "wgpu")]
        (BackendKind::Wgpu, _) => Ok(f.run::<crate::Wgpu>(kind, dtype)),
        #[cfg(feature = "cuda")]
        (BackendKind::Cuda, FloatDtype::F32) => Ok(f.run::<crate::Cuda<f32>>(kind, dtype)),
        #[cfg(feature = "cuda")]
        (BackendKind::Cuda, FloatDtype::Bf16) => {
            Ok(f.run::<crate::Cuda<burn::tensor::bf16>>(kind, dtype))
        }
        #[cfg(feature = "cuda")]
        (BackendKind::Cuda, FloatDtype::F16) => {
            Ok(f.run::<crate::Cuda<burn::tensor::f16>>(kind, dtype))
        }
        #[allow(unreachable_patterns)]
        _ => Err(BackendError::NotCompiled { name: kind.name() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_backends_and_dtypes() {
        assert_eq!(BackendKind::parse("flex").unwrap(), BackendKind::Flex);
        assert_eq!(BackendKind::parse("CPU").unwrap(), BackendKind::Flex);
        assert_eq!(BackendKind::parse("cuda").unwrap(), BackendKind::Cuda);
        let e = BackendKind::parse("tpu").unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("not available"), "{e}");
        assert_eq!(FloatDtype::parse("BF16").unwrap(), FloatDtype::Bf16);
        assert!(FloatDtype::parse("f8").is_err());
    }

    #[test]
    fn flex_refuses_half_precision() {
        assert!(BackendKind::Flex.check(FloatDtype::F32).is_ok());
        let e = BackendKind::Flex.check(FloatDtype::Bf16).unwrap_err();
        assert!(matches!(e, BackendError::Dtype { .. }), "{e}");
    }

    #[test]
    fn errors_are_one_line() {
        for e in [
            BackendError::NotCompiled { name: "cuda" },
            BackendError::NoCudaDriver,
            BackendError::NoWgpuAdapter("x".into()),
        ] {
            assert!(!e.to_string().contains('\n'));
        }
    }
}
