//! zoo's training backend layer.
//!
//! Today this crate is thin: it names the burn backends zoo runs on and turns a `--device` string
//! into a device. The models are generic over `B: Backend`, so the caller picks the backend once,
//! at the top, with [`DeviceSpec::run`]:
//!
//! ```text
//!   "cpu"     ──► Cpu  (burn-flex, pure Rust, SIMD + rayon)      ──► task.run::<Cpu>(FlexDevice)
//!   "cuda:N"  ──► Cuda (burn-cuda, cargo feature `cuda`)          ──► task.run::<Cuda>(CudaDevice N)
//! ```
//!
//! Under the models it also holds what training at scale needs, so every family gets it the same
//! way:
//! - [`comm`]: the [`comm::Communicator`] trait (all-reduce, all-gather, reduce-scatter, broadcast,
//!   barrier; every call times out, a dead peer is an error naming it) and thread ranks;
//! - [`dist`]: ranks from torchrun / Slurm variables and the TCP rendezvous that shares NCCL's id;
//! - `nccl` (feature `cuda`): the NCCL communicator, through cudarc with dynamic loading;
//! - [`zero`]: ZeRO-3 sharding of a module's parameters into one flat f32 buffer per segment;
//! - [`optim`]: AdamW over a rank's slice, global-norm clipping, the dynamic loss scaler, LR
//!   schedules;
//! - [`trainer`]: the block-by-block ZeRO-3 step with block checkpointing (how it avoids nested
//!   `.backward()` is written there);
//! - [`checkpoint`]: world-size-independent checkpoints (gathered weights and optimizer state);
//! - [`inspect`]: per-parameter statistics gathered across shards, like `bmt.inspect`;
//! - [`kernels`]: fused CPU kernels with their own backward (attention, linear, GELU, layer norm,
//!   cross-entropy, dropout) that the models call, falling back to burn's ops elsewhere.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod comm;
pub mod dist;
pub mod inspect;
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod optim;
pub mod tcp;
pub mod trainer;
pub mod zero;

use std::fmt;
use std::str::FromStr;

pub use burn;
use burn::tensor::backend::Backend;

/// The CPU backend: burn-flex (eager pure-Rust kernels, `gemm` for matmul, rayon threads).
pub type Cpu = burn::backend::Flex;

/// The CPU backend with autodiff, for training.
pub type CpuTrain = burn::backend::Autodiff<Cpu>;

/// The CUDA backend (burn-cuda through CubeCL; kernels compiled with NVRTC at run time).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// The CUDA backend with autodiff, for training.
#[cfg(feature = "cuda")]
pub type CudaTrain = burn::backend::Autodiff<Cuda>;

/// Errors from device selection.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The string is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device '{0}': expected 'cpu', 'cuda' or 'cuda:N' (N a GPU index)")]
    Unknown(String),
    /// A CUDA device was asked for in a build without the `cuda` feature.
    #[error("device '{0}' needs a zoo built with `--features cuda`")]
    CudaNotBuilt(String),
}

/// Where to run: parsed from `--device cpu|cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU, through burn-flex.
    #[default]
    Cpu,
    /// The CUDA GPU with this index.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = text.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => lower
                .strip_prefix("cuda:")
                .and_then(|index| index.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Unknown(text.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

/// Work that is generic over the backend. [`DeviceSpec::run`] picks the backend and calls it.
pub trait BackendTask {
    /// What the task returns.
    type Output;

    /// Runs the task on backend `B` and `device`.
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

impl DeviceSpec {
    /// Runs `task` on the backend this device belongs to.
    ///
    /// A CUDA device in a build without the `cuda` feature is an error, not a silent fallback to CPU.
    pub fn run<T: BackendTask>(self, task: T) -> Result<T::Output, DeviceError> {
        match self {
            Self::Cpu => Ok(task.run::<Cpu>(Default::default())),
            #[cfg(feature = "cuda")]
            Self::Cuda(index) => Ok(task.run::<Cuda>(burn::backend::cuda::CudaDevice::new(index))),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => Err(DeviceError::CudaNotBuilt(self.to_string())),
        }
    }
}

/// Free and total bytes of CUDA GPU `index` (through the driver, loaded at run time); an error
/// when there is no driver or no such GPU.
#[cfg(feature = "cuda")]
pub fn cuda_memory(index: usize) -> Result<(usize, usize), String> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda) is not available".into());
    }
    let context = cudarc::driver::CudaContext::new(index)
        .map_err(|e| format!("opening GPU {index}: {e:?}"))?;
    context
        .mem_get_info()
        .map_err(|e| format!("GPU {index}: cuMemGetInfo: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse_like_torch() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
    }

    #[test]
    fn bad_device_strings_are_named_in_the_error() {
        let err = "tpu:0".parse::<DeviceSpec>().unwrap_err();
        assert!(err.to_string().contains("'tpu:0'"), "{err}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_an_error() {
        struct Nothing;
        impl BackendTask for Nothing {
            type Output = ();
            fn run<B: Backend>(self, _device: B::Device) {}
        }
        let err = DeviceSpec::Cuda(0).run(Nothing).unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }
}
