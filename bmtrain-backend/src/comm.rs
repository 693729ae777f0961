//! Communicators: the collectives ZeRO needs (all-reduce, all-gather, reduce-scatter, broadcast,
//! barrier), behind one trait, with a timeout on every call.
//!
//! [`ThreadGroup`] runs N ranks as N threads of one process (tests and CPU training). Each
//! collective is a numbered round: every rank deposits its buffer, waits until all have, and
//! computes the result from all contributions, in rank order, so every rank gets bit-identical
//! results whatever the thread timing. A rank that panics or stops drops its communicator, which
//! marks it gone; a peer waiting on it gets [`CommError::PeerGone`] at once, and a peer that never
//! arrives gives [`CommError::Timeout`] naming the missing ranks. No call hangs.
//!
//! Buffers are host `f32` slices (the NCCL communicator, feature `cuda`, stages them through the
//! GPU). A communicator whose transport works on GPU memory also offers
//! [`DeviceCollectives`]: device-resident ZeRO state then gathers and reduce-scatters in place.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How contributions combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean over ranks.
    Avg,
    /// Element-wise maximum (inf/NaN checks, the max norm).
    Max,
}

/// Why a collective failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// A peer panicked or stopped before contributing.
    #[error("rank {rank}: peer rank {peer} is gone ({reason}) during {op} #{round}")]
    PeerGone {
        /// The rank reporting.
        rank: usize,
        /// The rank that is gone.
        peer: usize,
        /// Why it is gone.
        reason: String,
        /// The collective.
        op: &'static str,
        /// Its sequence number.
        round: u64,
    },
    /// Peers did not arrive in time.
    #[error("rank {rank}: {op} #{round} timed out after {timeout:?} waiting for ranks {missing:?}")]
    Timeout {
        /// The rank reporting.
        rank: usize,
        /// Ranks that had not contributed.
        missing: Vec<usize>,
        /// The collective.
        op: &'static str,
        /// Its sequence number.
        round: u64,
        /// The timeout.
        timeout: Duration,
    },
    /// Ranks called different collectives, or buffers of different sizes, at the same step.
    #[error("rank {rank}: {message}")]
    Mismatch {
        /// The rank reporting.
        rank: usize,
        /// What differs.
        message: String,
    },
    /// The transport failed (NCCL, sockets).
    #[error("rank {rank}: {message}")]
    Transport {
        /// The rank reporting.
        rank: usize,
        /// What failed.
        message: String,
    },
}

/// The collectives of data-parallel and ZeRO training, on host `f32` buffers.
pub trait Communicator: Send {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Combines `data` across ranks, in place, on every rank.
    fn all_reduce(&self, data: &mut [f32], op: ReduceOp) -> Result<(), CommError>;

    /// Concatenates every rank's `local` (equal lengths), in rank order.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError>;

    /// Concatenates every rank's `local` bytes (equal lengths), in rank order: an all-gather of
    /// any dtype's values, such as the compute dtype's halves, unconverted.
    ///
    /// An all-gather only copies, so the bytes travel as the bit patterns of f32 words through
    /// [`Communicator::all_gather`] (each rank's bytes padded to a whole word), whatever the
    /// communicator.
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<u8>, CommError> {
        let words: Vec<f32> = local
            .chunks(4)
            .map(|chunk| {
                let mut word = [0u8; 4];
                word[..chunk.len()].copy_from_slice(chunk);
                f32::from_bits(u32::from_le_bytes(word))
            })
            .collect();
        let gathered = self.all_gather(&words)?;
        let mut out = Vec::with_capacity(local.len() * self.world_size());
        for rank_words in gathered.chunks(words.len().max(1)) {
            let bytes = rank_words.iter().flat_map(|w| w.to_bits().to_le_bytes());
            out.extend(bytes.take(local.len()));
        }
        Ok(out)
    }

    /// Combines `full` (length `world_size · n`) across ranks and returns this rank's `n`-long
    /// chunk of the result.
    fn reduce_scatter(&self, full: &[f32], op: ReduceOp) -> Result<Vec<f32>, CommError>;

    /// [`Communicator::reduce_scatter`] of a buffer the caller gives away, which a communicator
    /// may then share with its peers instead of copying (thread ranks do: a ZeRO step
    /// reduce-scatters every segment's full gradient, the model's size each step).
    fn reduce_scatter_owned(&self, full: Vec<f32>, op: ReduceOp) -> Result<Vec<f32>, CommError> {
        self.reduce_scatter(&full, op)
    }

    /// Copies `root`'s `data` into every rank's `data` (equal lengths).
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError>;

    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<(), CommError>;

    /// The same collectives on GPU memory, when this communicator's transport reads and writes
    /// device buffers itself (NCCL): device-resident state then gathers and reduce-scatters
    /// without crossing PCIe. `None` (the default) for host transports.
    fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
        None
    }
}

/// Collectives on buffers in GPU memory, addressed by device pointer. The caller orders them
/// after the kernels that wrote `send` (by waiting for its compute stream) and gives `recv` to no
/// kernel before they have finished.
///
/// Each collective is queued and left running while the caller queues other work, and waited
/// for later ([`DeviceCollectives::finish`]): how the trainer gathers segment i+1 while segment
/// i computes, and reduce-scatters block i+1's gradient while block i runs backward.
/// Collectives run one after another in the order they were issued.
pub trait DeviceCollectives {
    /// Queues the concatenation of every rank's `count` elements of `dtype` at `send` into
    /// `recv` (`world_size · count` elements, in rank order) and returns without waiting for it.
    ///
    /// # Safety
    /// `send` and `recv` point to that many elements on this communicator's GPU, and nothing
    /// else touches them until [`DeviceCollectives::finish`] has returned for this collective.
    unsafe fn start_all_gather_device(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: burn::tensor::DType,
    ) -> Result<PendingCollective, CommError>;

    /// Returns once `pending` has finished: an error when it failed or timed out (the
    /// communicator is then aborted, and every later call fails).
    fn finish(&self, pending: PendingCollective) -> Result<(), CommError>;

    /// Queues the combination of every rank's `world_size · count` elements of `dtype` at
    /// `send`, this rank's `count`-long chunk of the result written to `recv`, and returns
    /// without waiting for it.
    ///
    /// # Safety
    /// As [`DeviceCollectives::start_all_gather_device`].
    unsafe fn start_reduce_scatter_device(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: burn::tensor::DType,
        op: ReduceOp,
    ) -> Result<PendingCollective, CommError>;
}

/// A collective queued on a GPU by [`DeviceCollectives`]: what its communicator needs to wait
/// for it (its own type, opaque to the caller).
pub struct PendingCollective(pub Box<dyn std::any::Any>);

impl std::fmt::Debug for PendingCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingCollective")
    }
}

impl Communicator for Box<dyn Communicator> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce(&self, data: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        (**self).all_reduce(data, op)
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        (**self).all_gather(local)
    }
    fn reduce_scatter(&self, full: &[f32], op: ReduceOp) -> Result<Vec<f32>, CommError> {
        (**self).reduce_scatter(full, op)
    }
    fn reduce_scatter_owned(&self, full: Vec<f32>, op: ReduceOp) -> Result<Vec<f32>, CommError> {
        (**self).reduce_scatter_owned(full, op)
    }
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        (**self).broadcast(data, root)
    }
    fn barrier(&self) -> Result<(), CommError> {
        (**self).barrier()
    }
    fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
        (**self).device_collectives()
    }
}

/// One process, one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&self, _data: &mut [f32], _op: ReduceOp) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        Ok(local.to_vec())
    }
    fn reduce_scatter(&self, full: &[f32], _op: ReduceOp) -> Result<Vec<f32>, CommError> {
        Ok(full.to_vec())
    }
    fn reduce_scatter_owned(&self, full: Vec<f32>, _op: ReduceOp) -> Result<Vec<f32>, CommError> {
        Ok(full)
    }
    fn broadcast(&self, _data: &mut [f32], _root: usize) -> Result<(), CommError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}

/// N ranks in one process: [`ThreadGroup::communicators`] returns one [`ThreadComm`] per rank, to move into
/// that rank's thread.
#[derive(Debug)]
pub struct ThreadGroup;

impl ThreadGroup {
    /// Communicators for `world_size` ranks whose calls give up after `timeout`.
    pub fn communicators(world_size: usize, timeout: Duration) -> Vec<ThreadComm> {
        assert!(world_size > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rounds: HashMap::new(),
                gone: vec![None; world_size],
            }),
            changed: Condvar::new(),
            world_size,
            timeout,
        });
        (0..world_size)
            .map(|rank| ThreadComm {
                shared: shared.clone(),
                rank,
                next_round: std::cell::Cell::new(0),
            })
            .collect()
    }

    /// Runs `body(comm)` on `world_size` threads and returns their results in rank order. A rank
    /// that panics returns `Err` with the panic message; its peers see it gone.
    ///
    /// Each rank runs inside its own rayon pool with an equal share of the cores (at least one
    /// thread), so that the tensor ops of the ranks (burn-flex and gemm parallelise through
    /// rayon's *current* pool) run side by side instead of queueing on one global pool. On a CPU
    /// this is what makes thread ranks worth having: element-wise ops that a backend runs on one
    /// thread now keep every core busy, one rank per core.
    pub fn run<T: Send + 'static>(
        world_size: usize,
        timeout: Duration,
        body: impl Fn(ThreadComm) -> T + Send + Sync + 'static,
    ) -> Vec<Result<T, String>> {
        let body = Arc::new(body);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads_per_rank = (cores / world_size).max(1);
        let handles: Vec<_> = ThreadGroup::communicators(world_size, timeout)
            .into_iter()
            .map(|comm| {
                let body = body.clone();
                let rank = comm.rank;
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn(move || {
                        match rayon::ThreadPoolBuilder::new()
                            .num_threads(threads_per_rank)
                            .thread_name(move |i| format!("rank-{rank}-worker-{i}"))
                            .build()
                        {
                            Ok(pool) => pool.install(|| body(comm)),
                            // Without a pool of its own the rank still runs, on the global one.
                            Err(_) => body(comm),
                        }
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().map_err(|panic| {
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into())
                })
            })
            .collect()
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    world_size: usize,
    timeout: Duration,
}

#[derive(Debug)]
struct State {
    rounds: HashMap<u64, Round>,
    /// Why a rank is gone, once it is.
    gone: Vec<Option<String>>,
}

#[derive(Debug)]
struct Round {
    op: &'static str,
    contributions: Vec<Option<Arc<Vec<f32>>>>,
    /// Ranks that still have to read the result before the round is freed.
    readers_left: usize,
}

/// One rank of a [`ThreadGroup`]. Dropping it (the thread returned or panicked) marks the rank
/// gone for its peers.
#[derive(Debug)]
pub struct ThreadComm {
    shared: Arc<Shared>,
    rank: usize,
    next_round: std::cell::Cell<u64>,
}

// The Cell is only touched by the owning thread; the shared state is behind a Mutex.
unsafe impl Send for ThreadComm {}

impl ThreadComm {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock poisons it; the state stays consistent
        // (every update is a single assignment), so peers keep going and report it gone.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Deposits `data` for the next round of `op` and returns every rank's contribution.
    ///
    /// Contributions are shared, not copied per reader: each rank deposits its buffer (moved in,
    /// so a caller that gives one away pays no copy) and every rank reads all of them through
    /// `Arc`s, outside the lock.
    fn exchange(&self, op: &'static str, data: Vec<f32>) -> Result<Vec<Arc<Vec<f32>>>, CommError> {
        let len = data.len();
        let round = self.next_round.get();
        self.next_round.set(round + 1);
        let world = self.shared.world_size;
        let deadline = Instant::now() + self.shared.timeout;
        let mut state = self.lock();
        let entry = state.rounds.entry(round).or_insert_with(|| Round {
            op,
            contributions: vec![None; world],
            readers_left: world,
        });
        if entry.op != op {
            return Err(CommError::Mismatch {
                rank: self.rank,
                message: format!(
                    "collective #{round}: this rank called {op}, another called {}",
                    entry.op
                ),
            });
        }
        entry.contributions[self.rank] = Some(Arc::new(data));
        self.shared.changed.notify_all();
        loop {
            let round_state = &state.rounds[&round];
            let missing: Vec<usize> = (0..world)
                .filter(|&r| round_state.contributions[r].is_none())
                .collect();
            if missing.is_empty() {
                break;
            }
            if let Some(&peer) = missing.iter().find(|&&r| state.gone[r].is_some()) {
                return Err(CommError::PeerGone {
                    rank: self.rank,
                    peer,
                    reason: state.gone[peer].clone().unwrap_or_default(),
                    op,
                    round,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    missing,
                    op,
                    round,
                    timeout: self.shared.timeout,
                });
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        let round_state = state.rounds.get_mut(&round).expect("present until read");
        let all: Vec<Arc<Vec<f32>>> = round_state
            .contributions
            .iter()
            .map(|c| c.clone().expect("every rank contributed"))
            .collect();
        round_state.readers_left -= 1;
        if round_state.readers_left == 0 {
            state.rounds.remove(&round);
        }
        drop(state);
        if let Some(other) = all.iter().map(|c| c.len()).find(|&l| l != len) {
            return Err(CommError::Mismatch {
                rank: self.rank,
                message: format!("{op} #{round}: buffers of {len} and {other} elements"),
            });
        }
        Ok(all)
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            "panicked"
        } else {
            "stopped"
        };
        let mut state = self.lock();
        state.gone[self.rank] = Some(reason.into());
        self.shared.changed.notify_all();
    }
}

/// Combines contributions element-wise, in rank order (so every rank computes the same bits).
/// The chunk length of a reduce-scatter of `len` elements over `world` ranks, which must divide.
pub(crate) fn scatter_chunk(rank: usize, world: usize, len: usize) -> Result<usize, CommError> {
    if !len.is_multiple_of(world) {
        return Err(CommError::Mismatch {
            rank,
            message: format!("reduce_scatter of {len} elements over {world} ranks"),
        });
    }
    Ok(len / world)
}

/// Rank `rank`'s chunk of the reduction of every contribution.
pub(crate) fn reduce_chunk<T: AsRef<[f32]>>(
    all: &[T],
    rank: usize,
    chunk: usize,
    op: ReduceOp,
) -> Vec<f32> {
    let mine: Vec<&[f32]> = all
        .iter()
        .map(|c| &c.as_ref()[rank * chunk..(rank + 1) * chunk])
        .collect();
    reduce(&mine, op)
}

pub(crate) fn reduce<T: AsRef<[f32]>>(all: &[T], op: ReduceOp) -> Vec<f32> {
    let combine = |a: f32, b: f32| match op {
        ReduceOp::Sum | ReduceOp::Avg => a + b,
        ReduceOp::Max => a.max(b),
    };
    // The first two contributions combine in one pass (no copy of the first to start from).
    let first = all[0].as_ref();
    let mut out: Vec<f32> = match all.get(1) {
        Some(second) => first
            .iter()
            .zip(second.as_ref())
            .map(|(&a, &b)| combine(a, b))
            .collect(),
        None => first.to_vec(),
    };
    for other in all.iter().skip(2) {
        for (o, &x) in out.iter_mut().zip(other.as_ref()) {
            *o = combine(*o, x);
        }
    }
    if op == ReduceOp::Avg {
        let n = all.len() as f32;
        for o in &mut out {
            *o /= n;
        }
    }
    out
}

/// The contributions of an exchange as slices.
fn slices(all: &[Arc<Vec<f32>>]) -> Vec<&[f32]> {
    all.iter().map(|c| c.as_slice()).collect()
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn all_reduce(&self, data: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let all = self.exchange("all_reduce", data.to_vec())?;
        data.copy_from_slice(&reduce(&slices(&all), op));
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        let all = self.exchange("all_gather", local.to_vec())?;
        let mut gathered = Vec::with_capacity(local.len() * all.len());
        for part in &all {
            gathered.extend_from_slice(part);
        }
        Ok(gathered)
    }

    fn reduce_scatter(&self, full: &[f32], op: ReduceOp) -> Result<Vec<f32>, CommError> {
        self.reduce_scatter_owned(full.to_vec(), op)
    }

    fn reduce_scatter_owned(&self, full: Vec<f32>, op: ReduceOp) -> Result<Vec<f32>, CommError> {
        let chunk = scatter_chunk(self.rank, self.world_size(), full.len())?;
        let all = self.exchange("reduce_scatter", full)?;
        Ok(reduce_chunk(&slices(&all), self.rank, chunk, op))
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        let all = self.exchange("broadcast", data.to_vec())?;
        data.copy_from_slice(&all[root]);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn values(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (rank * 100 + i) as f32 * 0.5 - 3.0)
            .collect()
    }

    #[test]
    fn collectives_match_their_definitions() {
        for world in [1, 2, 3, 4] {
            let results = ThreadGroup::run(world, TIMEOUT, move |comm| {
                let rank = comm.rank();
                let mut summed = values(rank, 6);
                comm.all_reduce(&mut summed, ReduceOp::Sum).unwrap();
                let mut averaged = values(rank, 6);
                comm.all_reduce(&mut averaged, ReduceOp::Avg).unwrap();
                let mut maxed = values(rank, 6);
                comm.all_reduce(&mut maxed, ReduceOp::Max).unwrap();
                let gathered = comm.all_gather(&values(rank, 2)).unwrap();
                let scattered = comm
                    .reduce_scatter(&values(rank, 2 * world), ReduceOp::Sum)
                    .unwrap();
                let mut broadcast = values(rank, 3);
                comm.broadcast(&mut broadcast, world - 1).unwrap();
                comm.barrier().unwrap();
                (summed, averaged, maxed, gathered, scattered, broadcast)
            });
            for (rank, result) in results.into_iter().enumerate() {
                let (summed, averaged, maxed, gathered, scattered, broadcast) = result.unwrap();
                let sum = |len: usize, i: usize| (0..world).map(|r| values(r, len)[i]).sum::<f32>();
                assert_eq!(summed, (0..6).map(|i| sum(6, i)).collect::<Vec<_>>());
                for (i, avg) in averaged.iter().enumerate() {
                    assert!((avg - sum(6, i) / world as f32).abs() < 1e-5);
                }
                assert_eq!(maxed, values(world - 1, 6));
                assert_eq!(
                    gathered,
                    (0..world).flat_map(|r| values(r, 2)).collect::<Vec<_>>()
                );
                let chunk: Vec<f32> = (rank * 2..rank * 2 + 2)
                    .map(|i| sum(2 * world, i))
                    .collect();
                assert_eq!(scattered, chunk);
                assert_eq!(broadcast, values(world - 1, 3));
            }
        }
    }

    /// Bytes of any length, NaN bit patterns included (an f16 NaN pair read as an f32 is a
    /// signalling NaN), come out of the word-packed all-gather as they went in.
    #[test]
    fn an_all_gather_of_bytes_keeps_every_bit() {
        let bytes = |rank: usize| -> Vec<u8> {
            let mut b: Vec<u8> = (0..7).map(|i| (rank * 31 + i * 7) as u8).collect();
            b.extend([0x01, 0x7c, 0x01, 0x7c]); // two f16 sNaNs: f32 bits 0x7c017c01
            b
        };
        for world in [1, 2, 3] {
            let results = ThreadGroup::run(world, TIMEOUT, move |comm| {
                comm.all_gather_bytes(&bytes(comm.rank()))
            });
            let want: Vec<u8> = (0..world).flat_map(bytes).collect();
            for result in results {
                assert_eq!(result.unwrap().unwrap(), want);
            }
        }
    }

    #[test]
    fn a_rank_that_panics_makes_its_peers_fail_not_hang() {
        let started = Instant::now();
        let results = ThreadGroup::run(4, Duration::from_secs(30), |comm| {
            if comm.rank() == 2 {
                panic!("rank 2 fails on purpose");
            }
            let mut data = vec![1.0; 4];
            comm.all_reduce(&mut data, ReduceOp::Sum)
        });
        // The peers learn at once (the dropped communicator wakes them), long before the timeout.
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(results[2].as_ref().unwrap_err().contains("on purpose"));
        for rank in [0, 1, 3] {
            let err = results[rank].as_ref().unwrap().as_ref().unwrap_err();
            assert!(
                matches!(err, CommError::PeerGone { peer: 2, .. }),
                "rank {rank}: {err}"
            );
        }
    }

    #[test]
    fn a_rank_that_never_arrives_times_out_naming_it() {
        let results = ThreadGroup::run(3, Duration::from_millis(200), |comm| {
            if comm.rank() == 1 {
                // Alive but busy: never reaches the collective within the timeout.
                std::thread::sleep(Duration::from_millis(1500));
                return Ok(());
            }
            comm.barrier()
        });
        for rank in [0, 2] {
            let err = results[rank].as_ref().unwrap().as_ref().unwrap_err();
            assert!(
                matches!(err, CommError::Timeout { missing, .. } if missing == &vec![1]),
                "rank {rank}: {err}"
            );
            assert!(err.to_string().contains("[1]"), "{err}");
        }
    }

    #[test]
    fn mismatched_collectives_are_reported() {
        let results = ThreadGroup::run(2, TIMEOUT, |comm| {
            if comm.rank() == 0 {
                comm.barrier()
            } else {
                std::thread::sleep(Duration::from_millis(50));
                comm.all_gather(&[1.0]).map(|_| ())
            }
        });
        let err = results[1].as_ref().unwrap().as_ref().unwrap_err();
        assert!(matches!(err, CommError::Mismatch { .. }), "{err}");
    }
}
