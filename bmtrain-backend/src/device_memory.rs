//! What a GPU backend's allocator holds: cubecl's memory usage (bytes in use by live tensors,
//! bytes reserved from the device), read for the device a trainer computes on.
//!
//! burn 0.21's `Backend` trait does not expose the allocator, so the device is matched against
//! the cubecl devices this build has (`cuda`, `wgpu`) and the runtime's client asked directly;
//! the CPU backend has no such allocator and reports nothing ([`usage`] is `None`), where the
//! host's own heap counters apply instead.
//!
//! cubecl's default pools (sub-sliced pages) never give pages back on their own, so `reserved`
//! only grows between explicit cleanups: a reading after a micro-batch is that micro-batch's
//! peak reservation. `in_use` rises and falls within a micro-batch, which is why the trainer
//! samples it after every block ([`MemoryPeak`]). With burn's fusion a few queued operations may
//! not have allocated yet when a sample is taken; the step's scalar read flushes them.

use std::any::Any;

/// One reading of a device allocator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes held by live tensors (cubecl's `bytes_in_use`).
    pub in_use: u64,
    /// Bytes the allocator has reserved from the device (cubecl's `bytes_reserved`): what the
    /// process takes from the card besides the CUDA context.
    pub reserved: u64,
}

impl DeviceMemory {
    /// The larger of each field.
    pub fn max(self, other: Self) -> Self {
        Self {
            in_use: self.in_use.max(other.in_use),
            reserved: self.reserved.max(other.reserved),
        }
    }
}

/// The allocator's usage on `device` now, when it is a cubecl GPU device of this build (CUDA,
/// wgpu); `None` on the CPU backend or when the allocator cannot be asked.
pub fn usage<D: Any>(device: &D) -> Option<DeviceMemory> {
    let device = device as &dyn Any;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = device.downcast_ref::<burn::backend::cuda::CudaDevice>() {
        return runtime_usage::<burn::cubecl::cuda::CudaRuntime>(gpu);
    }
    #[cfg(feature = "wgpu")]
    if let Some(gpu) = device.downcast_ref::<burn::backend::wgpu::WgpuDevice>() {
        return runtime_usage::<burn::backend::wgpu::WgpuRuntime>(gpu);
    }
    let _ = device;
    None
}

/// The usage cubecl runtime `R`'s client reports for `device`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn runtime_usage<R: burn::cubecl::Runtime>(device: &R::Device) -> Option<DeviceMemory> {
    let usage = R::client(device).memory_usage().ok()?;
    Some(DeviceMemory {
        in_use: usage.bytes_in_use,
        reserved: usage.bytes_reserved,
    })
}

/// The highest readings of a device's allocator since the last [`MemoryPeak::reset`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryPeak {
    peak: Option<DeviceMemory>,
}

impl MemoryPeak {
    /// Reads `device`'s allocator and keeps the maxima; nothing on the CPU backend.
    pub fn sample<D: Any>(&mut self, device: &D) {
        if let Some(now) = usage(device) {
            self.peak = Some(self.peak.map_or(now, |peak| peak.max(now)));
        }
    }

    /// The maxima since the last reset, `None` when the device reports nothing.
    pub fn get(&self) -> Option<DeviceMemory> {
        self.peak
    }

    /// Starts again (at the next sample).
    pub fn reset(&mut self) {
        self.peak = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_backend_reports_no_device_memory() {
        fn default_device<B: burn::tensor::backend::Backend>() -> B::Device {
            Default::default()
        }
        let device = default_device::<crate::Cpu>();
        assert_eq!(usage(&device), None);
        let mut peak = MemoryPeak::default();
        peak.sample(&device);
        assert_eq!(peak.get(), None);
    }

    #[test]
    fn peaks_keep_each_fields_maximum() {
        let a = DeviceMemory {
            in_use: 5,
            reserved: 10,
        };
        let b = DeviceMemory {
            in_use: 7,
            reserved: 9,
        };
        assert_eq!(
            a.max(b),
            DeviceMemory {
                in_use: 7,
                reserved: 10
            }
        );
    }
}
