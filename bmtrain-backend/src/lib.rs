//! zoo's training backend layer.
//!
//! It names the burn backends zoo runs on and turns a `--device` string into this rank's device
//! (for burn and NCCL alike: [`DeviceSpec::for_this_rank`]). The models are generic over
//! `B: Backend`, so the caller picks the backend once, at the top, with [`DeviceSpec::run`]:
//!
//! ```text
//!   "cpu"     ──► Cpu  (burn-flex, pure Rust, SIMD + rayon)      ──► task.run::<Cpu>(FlexDevice)
//!   "cuda:N"  ──► Cuda (burn-cuda, cargo feature `cuda`)          ──► task.run::<Cuda>(CudaDevice N)
//!   "cuda"    ──► this rank's GPU: LOCAL_RANK, or 0 when one is visible, then as "cuda:N"
//! ```
//!
//! Under the models it also holds what training at scale needs, so every family gets it the same
//! way:
//! - [`comm`]: the [`comm::Communicator`] trait (all-reduce, all-gather, reduce-scatter, broadcast,
//!   barrier; every call times out, a dead peer is an error naming it) and thread ranks;
//! - [`dist`]: ranks from torchrun / Slurm variables and the TCP rendezvous that shares NCCL's id;
//! - `nccl` (feature `cuda`): the NCCL communicator, through cudarc with dynamic loading;
//! - [`zero`]: ZeRO-3 sharding of a module's parameters into one flat f32 buffer per segment;
//! - [`coded`]: QLoRA's frozen base held as sharded int8 / NF4 codes;
//! - [`resident`]: the ZeRO state as tensors on the training device (the default on a GPU);
//! - [`optim`]: AdamW over a rank's slice, global-norm clipping, the dynamic loss scaler, LR
//!   schedules;
//! - [`trainer`]: the block-by-block ZeRO-3 step with block checkpointing (how it avoids nested
//!   `.backward()` is written there);
//! - [`checkpoint`]: world-size-independent checkpoints, streamed one segment at a time, with
//!   file digests for verification;
//! - [`inspect`]: per-parameter statistics gathered across shards, like `bmt.inspect`;
//! - [`kernels`]: fused CPU kernels with their own backward (attention, linear, GELU, layer norm,
//!   cross-entropy, dropout) that the models call, falling back to burn's ops elsewhere;
//! - [`quant`]: int8 and NF4 weights and the CPU products that read them in place.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod coded;
pub mod comm;
pub mod device_memory;
pub mod dist;
pub mod inspect;
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(feature = "cuda")]
mod nccl_in_place;
pub mod optim;
pub mod quant;
pub mod resident;
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

/// burn's wgpu backend (feature `wgpu`): a Vulkan device, in tests Mesa's lavapipe, a software
/// GPU on which device code runs away from the host backend.
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;

/// [`Wgpu`] with autodiff, for training.
#[cfg(feature = "wgpu")]
pub type WgpuTrain = burn::backend::Autodiff<Wgpu>;

/// Errors from device selection.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The string is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device '{0}': expected 'cpu', 'cuda' or 'cuda:N' (N a GPU index)")]
    Unknown(String),
    /// A CUDA device was asked for in a build without the `cuda` feature.
    #[error("device '{0}' needs a zoo built with `--features cuda`")]
    CudaNotBuilt(String),
    /// This rank's GPU does not exist among the visible ones.
    #[error(
        "{requested}: this rank's GPU is {index} (LOCAL_RANK={local_rank}), but only {count} \
         GPU(s) are visible (CUDA_VISIBLE_DEVICES={visible})"
    )]
    NoSuchGpu {
        /// The `--device` asked for.
        requested: String,
        /// The GPU index it resolved to.
        index: usize,
        /// `LOCAL_RANK` as read (`unset` when absent).
        local_rank: String,
        /// How many GPUs the process sees.
        count: usize,
        /// `CUDA_VISIBLE_DEVICES` as read (`unset` when absent).
        visible: String,
    },
}

/// Where to run: parsed from `--device cpu|cuda|cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU, through burn-flex.
    #[default]
    Cpu,
    /// A CUDA GPU: the one with this index (`cuda:N`), or, `None` (`cuda`), this rank's: see
    /// [`DeviceSpec::for_this_rank`].
    Cuda(Option<usize>),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = text.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(None)),
            _ => lower
                .strip_prefix("cuda:")
                .and_then(|index| index.parse().ok())
                .map(|index| Self::Cuda(Some(index)))
                .ok_or_else(|| DeviceError::Unknown(text.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(Some(index)) => write!(f, "cuda:{index}"),
            Self::Cuda(None) => write!(f, "cuda"),
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

/// What a rank's environment says about its GPU: `LOCAL_RANK` (or Slurm's `SLURM_LOCALID`),
/// `CUDA_VISIBLE_DEVICES`, and how many GPUs the driver reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuEnv {
    /// The rank within its node, when a launcher set it.
    pub local_rank: Option<usize>,
    /// `CUDA_VISIBLE_DEVICES`, when set.
    pub visible_devices: Option<String>,
    /// GPUs the driver sees (it already applies `CUDA_VISIBLE_DEVICES`), when known.
    pub driver_count: Option<usize>,
}

impl GpuEnv {
    /// Reads this process's environment (and, with the `cuda` feature and a driver, its GPU
    /// count).
    pub fn from_env() -> Self {
        let number = |name: &str| std::env::var(name).ok()?.trim().parse().ok();
        Self {
            local_rank: number("LOCAL_RANK").or_else(|| number("SLURM_LOCALID")),
            visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
            driver_count: cuda_device_count(),
        }
    }

    /// How many GPUs this process can use, when known: `CUDA_VISIBLE_DEVICES`' entries, else the
    /// driver's count.
    pub fn visible_count(&self) -> Option<usize> {
        let listed = self.visible_devices.as_deref().map(|list| {
            list.split(',')
                .map(str::trim)
                .take_while(|entry| !entry.is_empty() && !entry.starts_with('-'))
                .count()
        });
        listed.or(self.driver_count)
    }
}

impl DeviceSpec {
    /// The device this rank runs on, for burn and NCCL alike. `cuda` under a launcher is GPU
    /// `LOCAL_RANK`, or GPU 0 when the process sees a single GPU (a launcher or scheduler that
    /// gives each rank its own `CUDA_VISIBLE_DEVICES`); outside a launcher it is GPU 0. An explicit
    /// `cuda:N` wins. A GPU that does not exist among the visible ones is an error naming both
    /// variables.
    pub fn for_rank(self, env: &GpuEnv) -> Result<DeviceSpec, DeviceError> {
        let count = env.visible_count();
        let index = match self {
            Self::Cpu => return Ok(self),
            Self::Cuda(Some(index)) => index,
            Self::Cuda(None) if count == Some(1) => 0,
            Self::Cuda(None) => env.local_rank.unwrap_or(0),
        };
        if let Some(count) = count
            && index >= count
        {
            return Err(DeviceError::NoSuchGpu {
                requested: self.to_string(),
                index,
                local_rank: env
                    .local_rank
                    .map_or_else(|| "unset".to_string(), |r| r.to_string()),
                count,
                visible: env
                    .visible_devices
                    .clone()
                    .unwrap_or_else(|| "unset".to_string()),
            });
        }
        Ok(Self::Cuda(Some(index)))
    }

    /// [`DeviceSpec::for_rank`] with this process's environment.
    pub fn for_this_rank(self) -> Result<DeviceSpec, DeviceError> {
        self.for_rank(&GpuEnv::from_env())
    }

    /// The GPU index of a resolved CUDA device (see [`DeviceSpec::for_this_rank`]).
    pub fn gpu_index(self) -> Option<usize> {
        match self.for_this_rank() {
            Ok(Self::Cuda(Some(index))) => Some(index),
            _ => None,
        }
    }

    /// Runs `task` on the backend this device belongs to, on this rank's GPU for `cuda`.
    ///
    /// A CUDA device in a build without the `cuda` feature is an error, not a silent fallback to CPU.
    pub fn run<T: BackendTask>(self, task: T) -> Result<T::Output, DeviceError> {
        match self.for_this_rank()? {
            Self::Cpu => Ok(task.run::<Cpu>(Default::default())),
            #[cfg(feature = "cuda")]
            Self::Cuda(index) => {
                Ok(task.run::<Cuda>(burn::backend::cuda::CudaDevice::new(index.unwrap_or(0))))
            }
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => Err(DeviceError::CudaNotBuilt(self.to_string())),
        }
    }
}

/// GPUs the CUDA driver sees, when this build has CUDA and the machine a driver.
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> Option<usize> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    cudarc::driver::result::init().ok()?;
    cudarc::driver::result::device::get_count()
        .ok()
        .map(|n| n as usize)
}

/// GPUs the CUDA driver sees: unknown in a build without CUDA.
#[cfg(not(feature = "cuda"))]
pub fn cuda_device_count() -> Option<usize> {
    None
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
        assert_eq!(
            "CUDA".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Cuda(None)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Cuda(Some(3))
        );
        assert_eq!(DeviceSpec::Cuda(Some(3)).to_string(), "cuda:3");
    }

    #[test]
    fn cuda_means_this_ranks_gpu_and_an_explicit_index_wins() {
        let env = |local_rank, visible: Option<&str>, driver_count| GpuEnv {
            local_rank,
            visible_devices: visible.map(String::from),
            driver_count,
        };
        let cuda = DeviceSpec::Cuda(None);
        let resolved = |spec: DeviceSpec, e: &GpuEnv| spec.for_rank(e).unwrap().to_string();
        // Not launched: GPU 0. Launched: GPU LOCAL_RANK (the driver unknown, or 8 GPUs).
        assert_eq!(resolved(cuda, &env(None, None, None)), "cuda:0");
        assert_eq!(resolved(cuda, &env(Some(3), None, None)), "cuda:3");
        assert_eq!(resolved(cuda, &env(Some(3), None, Some(8))), "cuda:3");
        // One visible GPU per rank (CUDA_VISIBLE_DEVICES=5): it is GPU 0 of the process.
        assert_eq!(resolved(cuda, &env(Some(3), Some("5"), None)), "cuda:0");
        assert_eq!(
            resolved(cuda, &env(Some(2), Some("4,5,6,7"), None)),
            "cuda:2"
        );
        // An explicit index wins over LOCAL_RANK.
        let one = DeviceSpec::Cuda(Some(1));
        assert_eq!(resolved(one, &env(Some(3), None, None)), "cuda:1");
        assert_eq!(resolved(DeviceSpec::Cpu, &env(Some(3), None, None)), "cpu");
        // A rank whose GPU is not there names both variables.
        let err = cuda.for_rank(&env(Some(3), Some("0,1"), None)).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("LOCAL_RANK=3") && message.contains("CUDA_VISIBLE_DEVICES=0,1"),
            "{message}"
        );
        let err = cuda.for_rank(&env(Some(5), None, Some(4))).unwrap_err();
        assert!(
            err.to_string().contains("CUDA_VISIBLE_DEVICES=unset"),
            "{err}"
        );
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
        let err = DeviceSpec::Cuda(Some(0)).run(Nothing).unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }
}
