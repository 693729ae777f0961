//! `zoo env`: what a bug report needs about this machine and this rank, and the first thing the GPU
//! scripts print: zoo's version and compiled backends, the launcher variables it read, the device
//! this rank resolves to (for burn and NCCL alike), and what it found of the CUDA driver, NVRTC,
//! the CUDA headers and NCCL. The libraries are looked for the way the `cuda` build loads them
//! (`dlopen` by name), so this works in any build and on a machine without a GPU.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::PathBuf;

use bmtrain_backend::{DeviceSpec, GpuEnv};
use clap::Args;
use serde_json::{Value, json};

/// `zoo env` arguments.
#[derive(Args, Debug, Clone)]
pub struct EnvArgs {
    /// The device to resolve for this rank: cpu, cuda (this rank's GPU) or cuda:N.
    #[arg(long, default_value = "cuda", value_parser = crate::parse_device)]
    device: DeviceSpec,
    /// Print one JSON object (keys: version, backends, rank, local_rank, world_size, variables,
    /// device, cuda, nccl).
    #[arg(long)]
    json: bool,
}

/// The launcher, GPU and NCCL variables `zoo` reads.
const VARIABLES: [&str; 12] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_PATH",
    // NCCL staged through the host instead of on the GPU's buffers (a workaround switch).
    "ZOO_NCCL_THROUGH_HOST",
];

/// A shared library found by `dlopen`: its path and, through `version`, its version.
struct Library {
    path: String,
    version: Option<String>,
}

/// Opens the first of `names` that loads and reads its version with `version(handle)`.
fn find_library(
    names: &[&str],
    version: impl Fn(*mut c_void) -> Option<String>,
) -> Option<Library> {
    for name in names {
        let cname = CString::new(*name).expect("no NUL in library names");
        // SAFETY: dlopen with a valid C string; the handle is closed below.
        let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            continue;
        }
        let path = library_path(handle).unwrap_or_else(|| name.to_string());
        let version = version(handle);
        // SAFETY: the handle came from dlopen.
        unsafe { libc::dlclose(handle) };
        return Some(Library { path, version });
    }
    None
}

/// The file a `dlopen` handle was loaded from.
fn library_path(handle: *mut c_void) -> Option<String> {
    let mut map: *mut libc::c_void = std::ptr::null_mut();
    // SAFETY: RTLD_DI_LINKMAP writes a `struct link_map *` into `map`.
    if unsafe {
        libc::dlinfo(
            handle,
            libc::RTLD_DI_LINKMAP,
            (&mut map as *mut *mut c_void).cast(),
        )
    } != 0
        || map.is_null()
    {
        return None;
    }
    #[repr(C)]
    struct LinkMap {
        addr: usize,
        name: *const c_char,
    }
    // SAFETY: glibc's link_map starts with l_addr then l_name (a C string).
    let name = unsafe { (*(map as *const LinkMap)).name };
    (!name.is_null()).then(|| {
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    })
}

/// Calls `symbol(int*)` (the CUDA / NCCL version getters) and returns the integer.
fn int_out(handle: *mut c_void, symbol: &str) -> Option<c_int> {
    let name = CString::new(symbol).ok()?;
    // SAFETY: dlsym with a valid handle and name.
    let function = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if function.is_null() {
        return None;
    }
    // SAFETY: these getters take one `int*` and return a status (0 on success).
    let getter: extern "C" fn(*mut c_int) -> c_int = unsafe { std::mem::transmute(function) };
    let mut value = 0;
    (getter(&mut value) == 0).then_some(value)
}

/// `nvrtcVersion(int*, int*)` as "major.minor".
fn nvrtc_version(handle: *mut c_void) -> Option<String> {
    let name = CString::new("nvrtcVersion").ok()?;
    // SAFETY: dlsym with a valid handle and name.
    let function = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if function.is_null() {
        return None;
    }
    // SAFETY: nvrtcVersion takes two `int*` and returns a status.
    let getter: extern "C" fn(*mut c_int, *mut c_int) -> c_int =
        unsafe { std::mem::transmute(function) };
    let (mut major, mut minor) = (0, 0);
    (getter(&mut major, &mut minor) == 0).then(|| format!("{major}.{minor}"))
}

/// A CUDA-style version integer (12040) as "12.4".
fn cuda_version(v: c_int) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// The directories CUDA's headers may be in: `$CUDA_PATH`, `$CUDA_HOME`, `/usr/local/cuda`.
fn cuda_headers() -> Option<PathBuf> {
    ["CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok().map(PathBuf::from))
        .chain([PathBuf::from("/usr/local/cuda")])
        .map(|root| root.join("include"))
        .find(|include| include.join("cuda.h").is_file())
}

fn found(library: &Option<Library>) -> Value {
    match library {
        Some(l) => json!({ "path": l.path, "version": l.version }),
        None => json!("not found"),
    }
}

/// Runs `zoo env`.
pub fn run(args: EnvArgs) -> anyhow::Result<()> {
    let variables: serde_json::Map<String, Value> = VARIABLES
        .iter()
        .filter_map(|name| {
            std::env::var(name)
                .ok()
                .map(|v| (name.to_string(), json!(v)))
        })
        .collect();
    // What the launcher set, read as it is even when it is incomplete (then also reported).
    let dist = bmtrain_backend::dist::DistEnv::from_env();
    let number = |name: &str| -> Option<usize> { std::env::var(name).ok()?.trim().parse().ok() };
    let gpu_env = GpuEnv::from_env();
    let device = match args.device.for_rank(&gpu_env) {
        Ok(device) => json!(device.to_string()),
        Err(error) => json!({ "error": error.to_string() }),
    };
    let driver = find_library(&["libcuda.so.1", "libcuda.so"], |h| {
        int_out(h, "cuDriverGetVersion").map(cuda_version)
    });
    let nvrtc = find_library(
        &[
            "libnvrtc.so",
            "libnvrtc.so.13",
            "libnvrtc.so.12",
            "libnvrtc.so.11.2",
        ],
        nvrtc_version,
    );
    let nccl = find_library(&["libnccl.so.2", "libnccl.so"], |h| {
        int_out(h, "ncclGetVersion").map(|v| {
            // NCCL ≥ 2.9 codes versions as major·10000 + minor·100 + patch.
            format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
        })
    });
    let mut backends = vec!["cpu (burn-flex)"];
    if cfg!(feature = "cuda") {
        backends.push("cuda (burn-cuda, cubecl; NCCL through cudarc)");
    }
    let report = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "backends": backends,
        "rank": dist.as_ref().ok().map(|d| d.rank).or_else(|| number("RANK")),
        "local_rank": gpu_env.local_rank,
        "world_size": dist.as_ref().ok().map(|d| d.world_size).or_else(|| number("WORLD_SIZE")),
        "launcher_error": dist.as_ref().err().map(|e| e.to_string()),
        "variables": variables,
        "device": device,
        "cuda": {
            "driver": found(&driver),
            "devices": gpu_env.driver_count,
            "nvrtc": found(&nvrtc),
            "headers": cuda_headers().map_or(json!("not found"), |p| json!(p.display().to_string())),
        },
        "nccl": found(&nccl),
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "unknown".into(),
        other => other.to_string(),
    };
    let library = |v: &Value| match v {
        Value::Object(o) => format!("{} (version {})", text(&o["path"]), text(&o["version"])),
        other => text(other),
    };
    println!("zoo {}", env!("CARGO_PKG_VERSION"));
    println!("backends:     {}", backends.join(", "));
    println!(
        "rank:         {} of {} (local rank {})",
        text(&report["rank"]),
        text(&report["world_size"]),
        text(&report["local_rank"])
    );
    if let Some(error) = report["launcher_error"].as_str() {
        println!("launcher:     {error}");
    }
    for (name, value) in &report["variables"].as_object().cloned().unwrap_or_default() {
        println!("  {name}={}", text(value));
    }
    println!(
        "device:       --device {} → {}",
        args.device,
        match &report["device"] {
            Value::Object(o) => format!("error: {}", text(&o["error"])),
            other => text(other),
        }
    );
    println!("CUDA driver:  {}", library(&report["cuda"]["driver"]));
    println!("GPUs:         {}", text(&report["cuda"]["devices"]));
    println!("NVRTC:        {}", library(&report["cuda"]["nvrtc"]));
    println!("CUDA headers: {}", text(&report["cuda"]["headers"]));
    println!("NCCL:         {}", library(&report["nccl"]));
    Ok(())
}
