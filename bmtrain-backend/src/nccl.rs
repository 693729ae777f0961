//! The NCCL communicator (cargo feature `cuda`), through `cudarc`'s NCCL bindings with dynamic
//! loading: nothing links against CUDA or NCCL at build time, and a machine without them gets a
//! clear error instead of a crash.
//!
//! Ranks come from the launcher ([`crate::dist::DistEnv`]); rank 0 creates the NCCL unique id and
//! the TCP rendezvous ([`crate::dist::rendezvous`]) hands it to the others. Each rank drives the GPU
//! its device resolves to ([`crate::DeviceSpec::for_this_rank`]), the one burn computes on.
//!
//! Two kinds of buffers:
//! - device buffers ([`DeviceCollectives`]): what device-resident ZeRO state gathers and
//!   reduce-scatters ([`crate::resident`]), NCCL reading and writing burn's tensors in place, in
//!   their dtype (the compute dtype's halves for gathers), nothing crossing PCIe;
//! - host buffers (the [`Communicator`] trait's f32 slices: loss and norm reductions,
//!   checkpoints, the host placement), staged through device memory.
//!
//! `ZOO_NCCL_THROUGH_HOST=1` turns the first off (every collective staged through the host, as
//! before device buffers), a way around a driver or NCCL problem without rebuilding.
//!
//! Dead and hung peers: the rendezvous has a deadline, and every collective is waited for by
//! polling an event recorded behind it on the stream, for at most the communicator's timeout
//! (`--comm-timeout`, default 600 s). Each poll also asks NCCL for an asynchronous error
//! (`ncclCommGetAsyncError`: a peer whose connection broke, a network or system failure),
//! which ends the wait at once. Either way the communicator is aborted (`ncclCommAbort`), which
//! stops this rank's NCCL kernels spinning on the GPU and frees its resources, and the rank
//! returns [`CommError::Timeout`] or [`CommError::Transport`] instead of waiting forever; every
//! later call fails at once. A peer that died therefore ends every other rank with an error:
//! at once when NCCL notices the broken connection, at the latest after the timeout.
//!
//! The communicator handle is zoo's own (`cudarc::nccl::Comm` keeps its handle private, and the
//! error check and the abort need it); the collectives call cudarc's thin `result` wrappers.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t};

use burn::tensor::DType;

use crate::comm::{CommError, Communicator, DeviceCollectives, PendingCollective, ReduceOp};
use crate::dist::{DistEnv, rendezvous};

/// An NCCL communicator handle, aborted when dropped (never blocks, whatever the peers do).
#[derive(Debug)]
struct Handle(ncclComm_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from ncclCommInitRank and is aborted once, here, unless
        // `NcclComm::abort` already did (then it is null).
        if !self.0.is_null() {
            let _ = unsafe { nccl::comm_abort(self.0) };
        }
    }
}

/// A collective on the stream and the event recorded behind it.
struct Issued {
    event: cudarc::driver::CudaEvent,
    op: &'static str,
    /// Its sequence number, for error messages.
    round: u64,
}

/// One rank of an NCCL job.
#[derive(Debug)]
pub struct NcclComm {
    comm: std::cell::RefCell<Handle>,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// Collectives issued, for error messages.
    round: Cell<u64>,
    /// Why the communicator was aborted, once it was: every later call fails with it.
    aborted: std::cell::RefCell<Option<String>>,
    /// Whether device buffers go to NCCL in place (not `ZOO_NCCL_THROUGH_HOST=1`).
    in_place: bool,
}

// An NCCL communicator may be used from any thread, one call at a time; `NcclComm` is owned by
// one rank's thread and its methods take `&self` sequentially.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the job described by `env` on GPU `gpu` (this rank's, as burn uses it): checks that
    /// libcuda and libnccl load, opens the GPU, and shares rank 0's NCCL id through the rendezvous.
    pub fn init(env: &DistEnv, gpu: usize, timeout: Duration) -> Result<Self, CommError> {
        let fail = |message: String| CommError::Transport {
            rank: env.rank,
            message,
        };
        // SAFETY: these only try to dlopen the libraries.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(fail(
                "the CUDA driver library (libcuda) is not available".into(),
            ));
        }
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(fail("the NCCL library (libnccl) is not available".into()));
        }
        let context =
            CudaContext::new(gpu).map_err(|e| fail(format!("opening GPU {gpu}: {e:?}")))?;
        let stream = context.default_stream();
        let own_id = if env.rank == 0 {
            let id = nccl::get_uniqueid()
                .map_err(|e| fail(format!("ncclGetUniqueId: {}", describe(e.0))))?;
            Some(id.internal.iter().map(|&c| c as u8).collect::<Vec<u8>>())
        } else {
            None
        };
        let blob = rendezvous(env, own_id.as_deref(), timeout)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if blob.len() != internal.len() {
            return Err(fail(format!(
                "the rendezvous gave {} bytes, not an NCCL id",
                blob.len()
            )));
        }
        for (dst, src) in internal.iter_mut().zip(&blob) {
            *dst = *src as std::ffi::c_char;
        }
        let id = cudarc::nccl::sys::ncclUniqueId { internal };
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let (ranks, rank) = (env.world_size as i32, env.rank as i32);
        // NCCL initialises on the GPU whose context is current on this thread.
        context
            .bind_to_thread()
            .map_err(|e| fail(format!("binding GPU {gpu}: {e:?}")))?;
        // SAFETY: `comm` receives the new handle; the id is rank 0's, shared by the rendezvous.
        unsafe { nccl::comm_init_rank(&mut comm, ranks, id, rank) }
            .map_err(|e| fail(format!("ncclCommInitRank: {}", describe(e.0))))?;
        Ok(Self {
            comm: std::cell::RefCell::new(Handle(comm)),
            stream,
            rank: env.rank,
            world_size: env.world_size,
            timeout,
            round: Cell::new(0),
            aborted: std::cell::RefCell::new(None),
            in_place: std::env::var("ZOO_NCCL_THROUGH_HOST").map_or(true, |v| v != "1"),
        })
    }

    /// The live handle, or the error of the abort that ended it.
    fn handle(&self) -> Result<ncclComm_t, CommError> {
        if let Some(reason) = self.aborted.borrow().as_ref() {
            return Err(CommError::Transport {
                rank: self.rank,
                message: format!("the NCCL communicator was aborted earlier: {reason}"),
            });
        }
        Ok(self.comm.borrow().0)
    }

    /// Aborts the communicator (its kernels stop, its resources go) and remembers why.
    fn abort(&self, reason: &str) {
        let mut handle = self.comm.borrow_mut();
        if !handle.0.is_null() {
            // SAFETY: a live handle from ncclCommInitRank, aborted once (then nulled).
            let _ = unsafe { nccl::comm_abort(handle.0) };
            handle.0 = std::ptr::null_mut();
        }
        *self.aborted.borrow_mut() = Some(reason.to_string());
    }

    /// The asynchronous error NCCL reports for the communicator, if any (a broken connection to
    /// a peer, a network or system failure).
    fn async_error(&self) -> Option<String> {
        let handle = self.comm.borrow().0;
        if handle.is_null() {
            return None;
        }
        let mut state = ncclResult_t::ncclSuccess;
        // SAFETY: a live handle; `state` receives the communicator's error state.
        let asked = unsafe { cudarc::nccl::sys::ncclCommGetAsyncError(handle, &mut state) };
        match (asked, state) {
            (
                ncclResult_t::ncclSuccess,
                ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress,
            ) => None,
            (ncclResult_t::ncclSuccess, state) => Some(describe(state)),
            (asked, _) => Some(format!("ncclCommGetAsyncError failed: {}", describe(asked))),
        }
    }

    /// Issues one NCCL call on the stream with the live handle, and an event behind it.
    fn issue(
        &self,
        op: &'static str,
        call: impl FnOnce(
            ncclComm_t,
            cudarc::nccl::sys::cudaStream_t,
        ) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<Issued, CommError> {
        let handle = self.handle()?;
        let round = self.round.get();
        self.round.set(round + 1);
        call(handle, self.stream.cu_stream() as _).map_err(|e| self.error(op, describe(e.0)))?;
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| self.error("recording an event", e))?;
        Ok(Issued { event, op, round })
    }

    /// Waits until an issued collective is done, for at most the timeout; polling an event
    /// never blocks in the driver, so a hung peer cannot hang us. NCCL's asynchronous error
    /// state is checked at every poll. A timeout or an error aborts the communicator.
    fn wait(&self, issued: Issued) -> Result<(), CommError> {
        let Issued { event, op, round } = issued;
        let started = std::time::Instant::now();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let error = self.error(op, e);
                    self.abort(&error.to_string());
                    return Err(error);
                }
            }
            if let Some(reason) = self.async_error() {
                let message = format!(
                    "{op} #{round}: NCCL reports {reason} (a peer died or the network failed)"
                );
                self.abort(&message);
                return Err(CommError::Transport {
                    rank: self.rank,
                    message,
                });
            }
            if started.elapsed() > self.timeout {
                let error = CommError::Timeout {
                    rank: self.rank,
                    missing: (0..self.world_size).filter(|&r| r != self.rank).collect(),
                    op,
                    round,
                    timeout: self.timeout,
                };
                self.abort(&error.to_string());
                return Err(error);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Issues one NCCL call on the stream with the live handle and waits for it.
    fn collective(
        &self,
        op: &'static str,
        call: impl FnOnce(
            ncclComm_t,
            cudarc::nccl::sys::cudaStream_t,
        ) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<(), CommError> {
        let issued = self.issue(op, call)?;
        self.wait(issued)
    }

    fn error(&self, what: &str, detail: impl std::fmt::Debug) -> CommError {
        CommError::Transport {
            rank: self.rank,
            message: format!("{what}: {detail:?}"),
        }
    }

    fn upload(&self, data: &[f32]) -> Result<cudarc::driver::CudaSlice<f32>, CommError> {
        self.stream
            .clone_htod(data)
            .map_err(|e| self.error("host to device", e))
    }

    fn download(
        &self,
        buffer: &cudarc::driver::CudaSlice<f32>,
        out: &mut [f32],
    ) -> Result<(), CommError> {
        self.stream
            .memcpy_dtoh(buffer, out)
            .map_err(|e| self.error("device to host", e))?;
        self.stream
            .synchronize()
            .map_err(|e| self.error("stream synchronize", e))
    }
}

fn nccl_op(op: ReduceOp) -> ncclRedOp_t {
    match op {
        ReduceOp::Sum => ncclRedOp_t::ncclSum,
        ReduceOp::Avg => ncclRedOp_t::ncclAvg,
        ReduceOp::Max => ncclRedOp_t::ncclMax,
    }
}

/// NCCL's name for an error state.
fn describe(state: ncclResult_t) -> String {
    let name = match state {
        ncclResult_t::ncclUnhandledCudaError => "a CUDA error (ncclUnhandledCudaError)",
        ncclResult_t::ncclSystemError => "a system error (ncclSystemError)",
        ncclResult_t::ncclInternalError => "an internal error (ncclInternalError)",
        ncclResult_t::ncclInvalidArgument => "an invalid argument (ncclInvalidArgument)",
        ncclResult_t::ncclInvalidUsage => "an invalid usage (ncclInvalidUsage)",
        ncclResult_t::ncclRemoteError => "a remote error (ncclRemoteError)",
        _ => return format!("{state:?}"),
    };
    name.to_string()
}

/// A device buffer's pointer for a collective on `stream`.
fn ptr(buffer: &CudaSlice<f32>, stream: &CudaStream) -> *const c_void {
    buffer.device_ptr(stream).0 as *const c_void
}

/// A device buffer's pointer for a collective writing it on `stream`.
fn ptr_mut(buffer: &mut CudaSlice<f32>, stream: &CudaStream) -> *mut c_void {
    buffer.device_ptr_mut(stream).0 as *mut c_void
}

const F32: ncclDataType_t = ncclDataType_t::ncclFloat32;

/// NCCL's name for a float dtype.
fn nccl_dtype(dtype: DType, rank: usize) -> Result<ncclDataType_t, CommError> {
    match dtype {
        DType::F32 => Ok(F32),
        DType::F16 => Ok(ncclDataType_t::ncclFloat16),
        DType::BF16 => Ok(ncclDataType_t::ncclBfloat16),
        other => Err(CommError::Mismatch {
            rank,
            message: format!(
                "NCCL collectives on device buffers take f32, f16 or bf16, not {other:?}"
            ),
        }),
    }
}

impl NcclComm {
    /// Issues a collective on device buffers of `dtype` and hands back what `finish` waits for.
    fn start(
        &self,
        op: &'static str,
        dtype: DType,
        call: impl FnOnce(
            ncclDataType_t,
            ncclComm_t,
            cudarc::nccl::sys::cudaStream_t,
        ) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<PendingCollective, CommError> {
        let dtype = nccl_dtype(dtype, self.rank)?;
        let issued = self.issue(op, |comm, s| call(dtype, comm, s))?;
        Ok(PendingCollective(Box::new(issued)))
    }
}

impl DeviceCollectives for NcclComm {
    unsafe fn start_all_gather_device(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
    ) -> Result<PendingCollective, CommError> {
        self.start("all_gather", dtype, |dtype, comm, s| unsafe {
            // SAFETY: the caller's: `send` holds `count` elements, `recv` `world_size` times
            // that, on this GPU, untouched by other work until `finish` returns.
            nccl::all_gather(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype,
                comm,
                s,
            )
        })
    }

    unsafe fn start_reduce_scatter_device(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<PendingCollective, CommError> {
        self.start("reduce_scatter", dtype, |dtype, comm, s| unsafe {
            // SAFETY: the caller's: `send` holds `world_size · count` elements, `recv` `count`,
            // on this GPU, untouched by other work until `finish` returns.
            let (send, recv) = (send as *const c_void, recv as *mut c_void);
            nccl::reduce_scatter(send, recv, count, dtype, nccl_op(op), comm, s)
        })
    }

    fn finish(&self, pending: PendingCollective) -> Result<(), CommError> {
        match pending.0.downcast::<Issued>() {
            Ok(issued) => self.wait(*issued),
            Err(_) => Err(CommError::Mismatch {
                rank: self.rank,
                message: "a pending collective of another communicator".into(),
            }),
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&self, data: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let mut buffer = self.upload(data)?;
        let (len, stream) = (data.len(), &self.stream);
        let target = ptr_mut(&mut buffer, stream);
        self.collective("all_reduce", |comm, s| unsafe {
            // SAFETY: `buffer` holds `len` f32 on this GPU, in place.
            nccl::all_reduce(target, target, len, F32, nccl_op(op), comm, s)
        })?;
        self.download(&buffer, data)
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        let send = self.upload(local)?;
        let mut receive = self
            .stream
            .alloc_zeros::<f32>(local.len() * self.world_size)
            .map_err(|e| self.error("allocating", e))?;
        let (from, to) = (
            ptr(&send, &self.stream),
            ptr_mut(&mut receive, &self.stream),
        );
        self.collective("all_gather", |comm, s| unsafe {
            // SAFETY: `send` holds `local.len()` f32, `receive` `world_size` times that.
            nccl::all_gather(from, to, local.len(), F32, comm, s)
        })?;
        let mut out = vec![0.0; local.len() * self.world_size];
        self.download(&receive, &mut out)?;
        Ok(out)
    }

    fn reduce_scatter(&self, full: &[f32], op: ReduceOp) -> Result<Vec<f32>, CommError> {
        if !full.len().is_multiple_of(self.world_size) {
            return Err(CommError::Mismatch {
                rank: self.rank,
                message: format!(
                    "reduce_scatter of {} elements over {} ranks",
                    full.len(),
                    self.world_size
                ),
            });
        }
        let chunk = full.len() / self.world_size;
        let send = self.upload(full)?;
        let mut receive = self
            .stream
            .alloc_zeros::<f32>(chunk)
            .map_err(|e| self.error("allocating", e))?;
        let (from, to) = (
            ptr(&send, &self.stream),
            ptr_mut(&mut receive, &self.stream),
        );
        self.collective("reduce_scatter", |comm, s| unsafe {
            // SAFETY: `send` holds `world_size · chunk` f32, `receive` `chunk`.
            nccl::reduce_scatter(from, to, chunk, F32, nccl_op(op), comm, s)
        })?;
        let mut out = vec![0.0; chunk];
        self.download(&receive, &mut out)?;
        Ok(out)
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        let mut buffer = self.upload(data)?;
        let (len, stream) = (data.len(), &self.stream);
        let target = ptr_mut(&mut buffer, stream);
        self.collective("broadcast", |comm, s| unsafe {
            // SAFETY: `buffer` holds `len` f32 on this GPU, in place.
            nccl::broadcast(target, target, len, F32, root as i32, comm, s)
        })?;
        self.download(&buffer, data)
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut one = [0.0f32];
        self.all_reduce(&mut one, ReduceOp::Sum)
    }

    fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
        self.in_place.then_some(self as &dyn DeviceCollectives)
    }
}
