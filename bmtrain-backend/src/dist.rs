//! Process-level distribution: ranks from the launcher's environment, and a small TCP rendezvous
//! store that hands rank 0's NCCL unique id to every rank.
//!
//! Ranks follow torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or,
//! when those are absent, Slurm (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with
//! `MASTER_ADDR`/`MASTER_PORT` still naming the rendezvous host). Multi-node transport is NCCL's job.
//!
//! The rendezvous protocol, on `MASTER_ADDR:MASTER_PORT`: rank 0 listens; every other rank
//! connects (retrying until the deadline, since rank 0 may start later), sends its rank as 4
//! little-endian bytes, and receives the blob as a 4-byte length and the bytes. Rank 0 returns
//! once every rank has been served, so it doubles as a start-up barrier. Every step has a deadline;
//! a rank that never shows up is named in the error.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::comm::CommError;

/// Where this process sits in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank within this node (the GPU to use).
    pub local_rank: usize,
    /// Rendezvous host.
    pub master_addr: String,
    /// Rendezvous port.
    pub master_port: u16,
}

/// A launcher variable that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {name}: {message}")]
pub struct EnvError {
    /// The variable.
    pub name: String,
    /// What is wrong.
    pub message: String,
}

impl DistEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads launcher variables through `get` (tests pass a map). Without any rank variable the
    /// job is one process.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let number = |name: &str| -> Result<Option<usize>, EnvError> {
            match get(name) {
                None => Ok(None),
                Some(value) => value.trim().parse().map(Some).map_err(|_| EnvError {
                    name: name.into(),
                    message: format!("'{value}' is not a non-negative integer"),
                }),
            }
        };
        let (rank, world_size, local_rank) = match (number("RANK")?, number("WORLD_SIZE")?) {
            (Some(rank), Some(world)) => (rank, world, number("LOCAL_RANK")?.unwrap_or(0)),
            (Some(_), None) | (None, Some(_)) => {
                return Err(EnvError {
                    name: if get("RANK").is_some() {
                        "WORLD_SIZE"
                    } else {
                        "RANK"
                    }
                    .into(),
                    message: "torchrun sets RANK and WORLD_SIZE together; one is missing".into(),
                });
            }
            (None, None) => match (number("SLURM_PROCID")?, number("SLURM_NTASKS")?) {
                (Some(rank), Some(world)) => (rank, world, number("SLURM_LOCALID")?.unwrap_or(0)),
                _ => (0, 1, 0),
            },
        };
        if world_size == 0 || rank >= world_size {
            return Err(EnvError {
                name: "RANK".into(),
                message: format!("rank {rank} is not below the world size {world_size}"),
            });
        }
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match get("MASTER_PORT") {
            Some(port) => port.trim().parse().map_err(|_| EnvError {
                name: "MASTER_PORT".into(),
                message: format!("'{port}' is not a port number"),
            })?,
            None if world_size == 1 => 29500,
            None => {
                return Err(EnvError {
                    name: "MASTER_PORT".into(),
                    message: format!("missing, and {world_size} ranks need a rendezvous port"),
                });
            }
        };
        Ok(Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        })
    }
}

/// Shares `blob` (given on rank 0, `None` elsewhere) with every rank over TCP; returns it on every
/// rank. See the module docs for the protocol.
pub fn rendezvous(
    env: &DistEnv,
    blob: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>, CommError> {
    let deadline = Instant::now() + timeout;
    let fail = |message: String| CommError::Transport {
        rank: env.rank,
        message,
    };
    let address = format!("{}:{}", env.master_addr, env.master_port);
    if env.rank == 0 {
        let blob = blob.ok_or_else(|| fail("rank 0 must provide the blob".into()))?;
        if env.world_size == 1 {
            return Ok(blob.to_vec());
        }
        let listener = TcpListener::bind(&address)
            .map_err(|e| fail(format!("listening on {address}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(format!("{address}: {e}")))?;
        let mut served = vec![false; env.world_size];
        served[0] = true;
        while served.iter().any(|s| !s) {
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (0..env.world_size).filter(|&r| !served[r]).collect();
                return Err(CommError::Timeout {
                    rank: 0,
                    missing,
                    op: "rendezvous",
                    round: 0,
                    timeout,
                });
            }
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let rank = serve(&mut stream, blob, deadline)
                        .map_err(|e| fail(format!("serving a rank: {e}")))?;
                    if rank < env.world_size {
                        served[rank] = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(fail(format!("accepting on {address}: {e}"))),
            }
        }
        Ok(blob.to_vec())
    } else {
        loop {
            match connect(&address, env.rank, deadline) {
                Ok(blob) => return Ok(blob),
                Err(e) if Instant::now() < deadline => {
                    // Rank 0 may not be listening yet.
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(fail(format!(
                        "no rendezvous with rank 0 at {address} within {timeout:?}: {e}"
                    )));
                }
            }
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn serve(stream: &mut TcpStream, blob: &[u8], deadline: Instant) -> std::io::Result<usize> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(remaining(deadline)))?;
    stream.set_write_timeout(Some(remaining(deadline)))?;
    let mut rank = [0u8; 4];
    stream.read_exact(&mut rank)?;
    stream.write_all(&(blob.len() as u32).to_le_bytes())?;
    stream.write_all(blob)?;
    Ok(u32::from_le_bytes(rank) as usize)
}

fn connect(address: &str, rank: usize, deadline: Instant) -> std::io::Result<Vec<u8>> {
    let target = address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, remaining(deadline))?;
    stream.set_read_timeout(Some(remaining(deadline)))?;
    stream.set_write_timeout(Some(remaining(deadline)))?;
    stream.write_all(&(rank as u32).to_le_bytes())?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let mut blob = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut blob)?;
    Ok(blob)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<DistEnv, EnvError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn ranks_come_from_torchrun_or_slurm_variables() {
        let torchrun = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!(
            (torchrun.rank, torchrun.world_size, torchrun.local_rank),
            (3, 8, 1)
        );
        assert_eq!(
            (torchrun.master_addr.as_str(), torchrun.master_port),
            ("10.0.0.1", 29400)
        );
        let slurm = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!((slurm.rank, slurm.world_size, slurm.local_rank), (5, 16, 1));
        assert_eq!(env(&[]).unwrap().world_size, 1);
    }

    #[test]
    fn bad_launcher_variables_are_named() {
        let err = env(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert_eq!(err.name, "RANK");
        let err = env(&[("RANK", "0")]).unwrap_err();
        assert_eq!(err.name, "WORLD_SIZE");
        let err = env(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(err.message.contains("below"), "{err}");
        let err = env(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert_eq!(err.name, "MASTER_PORT");
    }

    /// Rank 0 alone in a world of two: the missing rank is named when the deadline passes.
    #[test]
    fn a_missing_rank_times_out_naming_it() {
        let port = free_port();
        let env = DistEnv {
            rank: 0,
            world_size: 2,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let err = rendezvous(&env, Some(b"id"), Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(&err, CommError::Timeout { missing, .. } if missing == &vec![1]),
            "{err}"
        );
    }

    /// A port nothing listens on now (for tests that start a rendezvous).
    pub(crate) fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Three real processes (this test binary, re-run as `rendezvous_child`) meet on a loopback
    /// port, started in reverse order; all get rank 0's blob.
    #[test]
    fn three_processes_share_rank_zeros_blob() {
        let port = free_port().to_string();
        let children: Vec<_> = (0..3)
            .rev()
            .map(|rank| {
                std::process::Command::new(std::env::current_exe().unwrap())
                    .args([
                        "--exact",
                        "dist::tests::rendezvous_child",
                        "--ignored",
                        "--nocapture",
                    ])
                    .env("ZOO_RENDEZVOUS_CHILD", "1")
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", "3")
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", &port)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut blobs = Vec::new();
        for child in children {
            let output = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&output.stdout).to_string();
            assert!(
                output.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let blob = text
                .lines()
                .find_map(|l| l.split_once("BLOB=").map(|(_, b)| b.trim().to_string()))
                .unwrap_or_else(|| panic!("no blob in: {text}"));
            blobs.push(blob);
        }
        assert!(blobs.iter().all(|b| b == &blobs[0]), "{blobs:?}");
        assert!(
            blobs[0].starts_with("7a6f6f"),
            "rank 0's blob starts with b\"zoo\": {blobs:?}"
        );
    }

    #[test]
    #[ignore = "a child process of three_processes_share_rank_zeros_blob"]
    fn rendezvous_child() {
        if std::env::var("ZOO_RENDEZVOUS_CHILD").is_err() {
            return;
        }
        let env = DistEnv::from_env().unwrap();
        let id = format!("zoo-{}", std::process::id()).into_bytes();
        let blob = rendezvous(
            &env,
            (env.rank == 0).then_some(id.as_slice()),
            Duration::from_secs(20),
        )
        .unwrap();
        let hex: String = blob.iter().map(|b| format!("{b:02x}")).collect();
        println!("BLOB={hex}");
    }
}
