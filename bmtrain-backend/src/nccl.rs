//! The NCCL communicator (cargo feature `cuda`), through `cudarc`'s NCCL bindings with dynamic
//! loading: nothing links against CUDA or NCCL at build time, and a machine without them gets a
//! clear error instead of a crash.
//!
//! Ranks come from the launcher ([`crate::dist::DistEnv`]); rank 0 creates the NCCL unique id and
//! the TCP rendezvous ([`crate::dist::rendezvous`]) hands it to the others. Each rank drives the GPU
//! its device resolves to ([`crate::DeviceSpec::for_this_rank`]), the one burn computes on. The collectives take host buffers (the [`Communicator`] trait's), stage them
//! through device memory and wait for the stream.
//!
//! Timeouts: the rendezvous has a deadline, and every collective is waited for by polling an
//! event recorded behind it on the stream, for at most the communicator's timeout: a peer that
//! hangs or died ends this rank with [`CommError::Timeout`] instead of a wait forever (NCCL's
//! kernels still spin on the GPU; they are torn down with the process, which then exits).

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp as NcclOp};

use crate::comm::{CommError, Communicator, ReduceOp};
use crate::dist::{DistEnv, rendezvous};

/// One rank of an NCCL job.
#[derive(Debug)]
pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// Collectives issued, for error messages.
    round: std::cell::Cell<u64>,
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
            let id = Id::new().map_err(|e| fail(format!("ncclGetUniqueId: {e:?}")))?;
            Some(id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>())
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
        let comm = Comm::from_rank(
            stream.clone(),
            env.rank,
            env.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| fail(format!("ncclCommInitRank: {e:?}")))?;
        Ok(Self {
            comm,
            stream,
            rank: env.rank,
            world_size: env.world_size,
            timeout,
            round: std::cell::Cell::new(0),
        })
    }

    /// Waits until the work queued on the stream (the collective just issued) is done, for at most
    /// the timeout; polling an event never blocks in the driver, so a hung peer cannot hang us.
    fn wait(&self, op: &'static str) -> Result<(), CommError> {
        let round = self.round.get();
        self.round.set(round + 1);
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| self.error("recording an event", e))?;
        let started = std::time::Instant::now();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) if started.elapsed() > self.timeout => {
                    return Err(CommError::Timeout {
                        rank: self.rank,
                        missing: (0..self.world_size).filter(|&r| r != self.rank).collect(),
                        op,
                        round,
                        timeout: self.timeout,
                    });
                }
                Ok(false) => std::thread::sleep(Duration::from_micros(200)),
                Err(e) => return Err(self.error(op, e)),
            }
        }
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

fn nccl_op(op: ReduceOp) -> NcclOp {
    match op {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
        ReduceOp::Max => NcclOp::Max,
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
        self.comm
            .all_reduce_in_place(&mut buffer, &nccl_op(op))
            .map_err(|e| self.error("ncclAllReduce", e))?;
        self.wait("all_reduce")?;
        self.download(&buffer, data)
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        let send = self.upload(local)?;
        let mut receive = self
            .stream
            .alloc_zeros::<f32>(local.len() * self.world_size)
            .map_err(|e| self.error("allocating", e))?;
        self.comm
            .all_gather(&send, &mut receive)
            .map_err(|e| self.error("ncclAllGather", e))?;
        self.wait("all_gather")?;
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
        self.comm
            .reduce_scatter(&send, &mut receive, &nccl_op(op))
            .map_err(|e| self.error("ncclReduceScatter", e))?;
        self.wait("reduce_scatter")?;
        let mut out = vec![0.0; chunk];
        self.download(&receive, &mut out)?;
        Ok(out)
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        let mut buffer = self.upload(data)?;
        self.comm
            .broadcast_in_place(&mut buffer, root as i32)
            .map_err(|e| self.error("ncclBroadcast", e))?;
        self.wait("broadcast")?;
        self.download(&buffer, data)
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut one = [0.0f32];
        self.all_reduce(&mut one, ReduceOp::Sum)
    }
}
