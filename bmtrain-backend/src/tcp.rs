//! A communicator over TCP, for ranks that are processes on CPUs (`zoo launch` without GPUs).
//!
//! Star topology through rank 0, which listens on `MASTER_ADDR:MASTER_PORT`: every other rank
//! connects (retrying until the deadline, since rank 0 may start later) and sends its rank. In each
//! collective every rank sends rank 0 its buffer with a header (operation, reduce op, root,
//! length); rank 0 checks that all ranks called the same collective on buffers of the same length,
//! computes each rank's result from the contributions in rank order (the same arithmetic as
//! [`crate::comm::ThreadGroup`], so thread ranks and process ranks give the same bits) and sends it
//! back. Rank 0 moves `world × buffer` bytes per collective: fine for CPU training, where compute
//! dominates; GPUs use NCCL.
//!
//! A peer that exits closes its socket: the others get [`CommError::PeerGone`] at once, not a hang.
//! Every read and write has the communicator's timeout.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::comm::{CommError, Communicator, ReduceOp, reduce, reduce_chunk, scatter_chunk};
use crate::dist::DistEnv;

/// One process-rank of a TCP group.
#[derive(Debug)]
pub struct TcpComm {
    rank: usize,
    world_size: usize,
    /// Rank 0: one stream per peer (index = rank; 0 unused). Others: the stream to rank 0.
    streams: Vec<Option<TcpStream>>,
    timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduce = 0,
    AllGather = 1,
    ReduceScatter = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

fn reduce_code(op: ReduceOp) -> u8 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Avg => 1,
        ReduceOp::Max => 2,
    }
}

/// A collective's header: operation, reduce op, root, element count.
const HEADER: usize = 1 + 1 + 4 + 8;

impl TcpComm {
    /// Joins the group described by `env` (rank 0 listens, the others connect).
    pub fn connect(env: &DistEnv, timeout: Duration) -> Result<Self, CommError> {
        let deadline = Instant::now() + timeout;
        let fail = |message: String| CommError::Transport {
            rank: env.rank,
            message,
        };
        let address = format!("{}:{}", env.master_addr, env.master_port);
        let mut streams: Vec<Option<TcpStream>> = (0..env.world_size).map(|_| None).collect();
        if env.world_size > 1 && env.rank == 0 {
            let listener = TcpListener::bind(&address)
                .map_err(|e| fail(format!("listening on {address}: {e}")))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| fail(format!("{address}: {e}")))?;
            while streams[1..].iter().any(Option::is_none) {
                if Instant::now() >= deadline {
                    let missing = (1..env.world_size)
                        .filter(|&r| streams[r].is_none())
                        .collect();
                    return Err(CommError::Timeout {
                        rank: 0,
                        missing,
                        op: "connect",
                        round: 0,
                        timeout,
                    });
                }
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream
                            .set_nonblocking(false)
                            .map_err(|e| fail(e.to_string()))?;
                        stream
                            .set_read_timeout(Some(timeout))
                            .map_err(|e| fail(e.to_string()))?;
                        let mut rank = [0u8; 4];
                        stream
                            .read_exact(&mut rank)
                            .map_err(|e| fail(format!("a peer's hello: {e}")))?;
                        let rank = u32::from_le_bytes(rank) as usize;
                        if rank == 0 || rank >= env.world_size || streams[rank].is_some() {
                            return Err(fail(format!(
                                "a peer says it is rank {rank} (world {}), twice or out of range",
                                env.world_size
                            )));
                        }
                        streams[rank] = Some(stream);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(fail(format!("accepting on {address}: {e}"))),
                }
            }
        } else if env.world_size > 1 {
            let stream = loop {
                match dial(&address, env.rank, deadline) {
                    Ok(stream) => break stream,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e; // rank 0 may not be listening yet
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        return Err(fail(format!(
                            "no connection to rank 0 at {address} within {timeout:?}: {e}"
                        )));
                    }
                }
            };
            streams[0] = Some(stream);
        }
        for stream in streams.iter().flatten() {
            stream
                .set_read_timeout(Some(timeout))
                .and_then(|()| stream.set_write_timeout(Some(timeout)))
                .and_then(|()| stream.set_nodelay(true))
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(Self {
            rank: env.rank,
            world_size: env.world_size,
            streams,
            timeout,
        })
    }

    fn io_error(&self, peer: usize, op: Op, error: std::io::Error) -> CommError {
        use std::io::ErrorKind::*;
        match error.kind() {
            WouldBlock | TimedOut => CommError::Timeout {
                rank: self.rank,
                missing: vec![peer],
                op: op.name(),
                round: 0,
                timeout: self.timeout,
            },
            _ => CommError::PeerGone {
                rank: self.rank,
                peer,
                reason: error.to_string(),
                op: op.name(),
                round: 0,
            },
        }
    }

    /// Runs one collective: returns this rank's result. `result` computes, on rank 0, rank `r`'s
    /// result from all contributions.
    fn collective(
        &self,
        op: Op,
        reduce_op: ReduceOp,
        root: usize,
        data: &[f32],
        result: impl Fn(&[Vec<f32>], usize) -> Vec<f32>,
    ) -> Result<Vec<f32>, CommError> {
        if self.world_size == 1 {
            return Ok(result(&[data.to_vec()], 0));
        }
        let mut header = [0u8; HEADER];
        header[0] = op as u8;
        header[1] = reduce_code(reduce_op);
        header[2..6].copy_from_slice(&(root as u32).to_le_bytes());
        header[6..14].copy_from_slice(&(data.len() as u64).to_le_bytes());
        if self.rank != 0 {
            let stream = self.streams[0].as_ref().expect("connected to rank 0");
            let mut message = header.to_vec();
            message.extend(data.iter().flat_map(|x| x.to_le_bytes()));
            let mut writer = stream;
            writer
                .write_all(&message)
                .map_err(|e| self.io_error(0, op, e))?;
            return read_floats(stream).map_err(|e| self.io_error(0, op, e));
        }
        let mut all = vec![data.to_vec()];
        for peer in 1..self.world_size {
            let mut stream = self.streams[peer].as_ref().expect("every peer connected");
            let mut theirs = [0u8; HEADER];
            stream
                .read_exact(&mut theirs)
                .map_err(|e| self.io_error(peer, op, e))?;
            if theirs[..6] != header[..6] || theirs[6..] != header[6..] {
                let their_len = u64::from_le_bytes(theirs[6..14].try_into().expect("8 bytes"));
                return Err(CommError::Mismatch {
                    rank: 0,
                    message: format!(
                        "rank {peer} called operation {} on {their_len} elements; rank 0 called \
                         {} on {}",
                        theirs[0],
                        op.name(),
                        data.len()
                    ),
                });
            }
            let mut bytes = vec![0u8; data.len() * 4];
            stream
                .read_exact(&mut bytes)
                .map_err(|e| self.io_error(peer, op, e))?;
            all.push(floats(&bytes));
        }
        for peer in 1..self.world_size {
            let out = result(&all, peer);
            let mut message = (out.len() as u64).to_le_bytes().to_vec();
            message.extend(out.iter().flat_map(|x| x.to_le_bytes()));
            let mut stream = self.streams[peer].as_ref().expect("every peer connected");
            stream
                .write_all(&message)
                .map_err(|e| self.io_error(peer, op, e))?;
        }
        Ok(result(&all, 0))
    }
}

fn dial(address: &str, rank: usize, deadline: Instant) -> std::io::Result<TcpStream> {
    let target = address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let mut stream = TcpStream::connect_timeout(&target, left)?;
    stream.write_all(&(rank as u32).to_le_bytes())?;
    Ok(stream)
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn read_floats(mut stream: &TcpStream) -> std::io::Result<Vec<f32>> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let mut bytes = vec![0u8; u64::from_le_bytes(len) as usize * 4];
    stream.read_exact(&mut bytes)?;
    Ok(floats(&bytes))
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&self, data: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let out = self.collective(Op::AllReduce, op, 0, data, |all, _| reduce(all, op))?;
        data.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        self.collective(Op::AllGather, ReduceOp::Sum, 0, local, |all, _| {
            all.concat()
        })
    }

    fn reduce_scatter(&self, full: &[f32], op: ReduceOp) -> Result<Vec<f32>, CommError> {
        let chunk = scatter_chunk(self.rank, self.world_size, full.len())?;
        self.collective(Op::ReduceScatter, op, 0, full, |all, rank| {
            reduce_chunk(all, rank, chunk, op)
        })
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        let out = self.collective(Op::Broadcast, ReduceOp::Sum, root, data, |all, _| {
            all[root].clone()
        })?;
        data.copy_from_slice(&out);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.collective(Op::Barrier, ReduceOp::Sum, 0, &[], |_, _| Vec::new())
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::ThreadGroup;
    use crate::dist::tests::free_port;

    fn env(rank: usize, world: usize, port: u16) -> DistEnv {
        DistEnv {
            rank,
            world_size: world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    fn values(rank: usize) -> Vec<f32> {
        (0..6).map(|i| (rank * 10 + i) as f32 * 0.3 - 1.7).collect()
    }

    /// Every collective on 3 TCP ranks, against the same collectives on 3 thread ranks.
    fn script(comm: &dyn Communicator) -> Vec<Vec<f32>> {
        let rank = comm.rank();
        let mut out = Vec::new();
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let mut data = values(rank);
            comm.all_reduce(&mut data, op).unwrap();
            out.push(data);
            out.push(comm.reduce_scatter(&values(rank), op).unwrap());
        }
        out.push(comm.all_gather(&values(rank)[..2]).unwrap());
        let mut data = values(rank);
        comm.broadcast(&mut data, 2).unwrap();
        out.push(data);
        comm.barrier().unwrap();
        out
    }

    #[test]
    fn tcp_ranks_compute_the_bits_thread_ranks_compute() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let comm =
                        TcpComm::connect(&env(rank, 3, port), Duration::from_secs(20)).unwrap();
                    script(&comm)
                })
            })
            .collect();
        let tcp: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let threads: Vec<_> = ThreadGroup::run(3, Duration::from_secs(20), |comm| script(&comm))
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(tcp, threads);
    }

    #[test]
    fn a_peer_that_exits_fails_the_others_at_once() {
        let port = free_port();
        let leaver = std::thread::spawn(move || {
            let comm = TcpComm::connect(&env(1, 2, port), Duration::from_secs(20)).unwrap();
            drop(comm);
        });
        let comm = TcpComm::connect(&env(0, 2, port), Duration::from_secs(20)).unwrap();
        leaver.join().unwrap();
        let started = Instant::now();
        let err = comm.barrier().unwrap_err();
        assert!(matches!(err, CommError::PeerGone { peer: 1, .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
