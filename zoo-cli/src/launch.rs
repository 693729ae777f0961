//! `zoo launch`: a torchrun-style launcher. It starts `--nproc-per-node` copies of a command with
//! the variables torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`), forwards SIGINT and SIGTERM to them, and when one fails stops the
//! others (SIGTERM, then SIGKILL after a grace period) and exits with its code. On several nodes,
//! run it once per node with `--nnodes`, `--node-rank` and the same `--master-addr`/`--master-port`.
//!
//! It also sets `ZOO_RUN_STAMP`, so that ranks without `--out` agree on one `runs/<job>-<stamp>`.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;

/// How long ranks get to exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(30);

/// `zoo launch` arguments.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Processes on this node (one per GPU).
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Address of node 0 (rank 0's rendezvous).
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Port of the rendezvous (default: 29500, or a free port on a single node).
    #[arg(long)]
    master_port: Option<u16>,
    /// The command each rank runs, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Runs `zoo launch`; returns the exit code of the job.
pub fn run(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    ensure!(
        args.nproc_per_node >= 1,
        "--nproc-per-node must be at least 1"
    );
    ensure!(args.nnodes >= 1, "--nnodes must be at least 1");
    ensure!(
        args.node_rank < args.nnodes,
        "--node-rank {} is not below --nnodes {}",
        args.node_rank,
        args.nnodes
    );
    let port = match args.master_port {
        Some(port) => port,
        None if args.nnodes == 1 => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .context("finding a free port for the rendezvous")?,
        None => 29500,
    };
    let world = args.nproc_per_node * args.nnodes;
    let stamp = std::env::var("ZOO_RUN_STAMP").unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .to_string()
    });
    let interrupted = crate::run::interrupted();
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    // The node's cores shared between its ranks, as thread ranks share them (torchrun sets
    // OMP_NUM_THREADS=1 for the same reason); rayon reads RAYON_NUM_THREADS. A value the user
    // set is kept.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("RAYON_NUM_THREADS")
        .unwrap_or_else(|_| (cores / args.nproc_per_node).max(1).to_string());
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local;
        // Each rank leads its own process group, so a signal reaches what it started too (a
        // shell wrapper's children); the launcher forwards the terminal's Ctrl-C itself.
        let child = Command::new(program)
            .process_group(0)
            .args(rest)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", port.to_string())
            .env("ZOO_RUN_STAMP", &stamp)
            .env("RAYON_NUM_THREADS", &threads)
            .spawn();
        match child {
            Ok(child) => children.push((rank, child)),
            Err(error) => {
                stop(&mut children, libc::SIGTERM);
                return Err(error).with_context(|| format!("starting rank {rank}: {program}"));
            }
        }
    }
    eprintln!(
        "launch: {} rank(s) of {world} on this node, rendezvous {}:{port}",
        children.len(),
        args.master_addr
    );

    let mut forwarded = false;
    let mut codes: Vec<Option<i32>> = vec![None; children.len()];
    loop {
        if interrupted.load(Ordering::Relaxed) && !forwarded {
            // Ctrl-C: the ranks checkpoint and exit; wait for them.
            forwarded = true;
            signal_all(&children, libc::SIGINT);
        }
        let mut failed = None;
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if codes[i].is_some() {
                continue;
            }
            if let Some(status) = child.try_wait().context("waiting for a rank")? {
                let code = exit_code(&status);
                codes[i] = Some(code);
                if code != 0 && failed.is_none() {
                    failed = Some((*rank, status, code));
                }
            }
        }
        if let Some((rank, status, code)) = failed
            && !forwarded
        {
            eprintln!("launch: rank {rank} exited with {status}; stopping the others");
            let mut running: Vec<(usize, Child)> = std::mem::take(&mut children)
                .into_iter()
                .enumerate()
                .filter(|(j, _)| codes[*j].is_none())
                .map(|(_, c)| c)
                .collect();
            stop(&mut running, libc::SIGTERM);
            return Ok(ExitCode::from(code.clamp(1, 255) as u8));
        }
        if codes.iter().all(Option::is_some) {
            let worst = codes
                .iter()
                .flatten()
                .copied()
                .find(|&c| c != 0)
                .unwrap_or(0);
            return Ok(ExitCode::from(worst.clamp(0, 255) as u8));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The exit code, or 128 + the signal that ended the process (as a shell reports it).
fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn signal_all(children: &[(usize, Child)], signal: i32) {
    for (_, child) in children {
        // SAFETY: kill(2) on the process group our child leads.
        unsafe {
            libc::kill(-(child.id() as i32), signal);
        }
    }
}

/// Sends `signal`, waits up to [`GRACE`], then kills what is left. A stopped rank (SIGSTOP, a
/// debugger's) is continued too, so that it gets the signal now rather than after the grace.
fn stop(children: &mut [(usize, Child)], signal: i32) {
    signal_all(children, signal);
    signal_all(children, libc::SIGCONT);
    let deadline = Instant::now() + GRACE;
    for (_, child) in children.iter_mut() {
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !matches!(child.try_wait(), Ok(Some(_))) {
            // SAFETY: as above.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}
