//! `zoo download`: a model repository from the HuggingFace hub (or a mirror) into a directory that
//! every zoo command loads, through the `hf-hub` crate.
//!
//! - the endpoint is `HF_ENDPOINT` (mirrors) or huggingface.co, the token `HF_TOKEN`;
//! - the repository's file list picks the config, the weights (safetensors, single or sharded;
//!   `pytorch_model.bin` only when there are no safetensors), the tokenizer files and
//!   `generation_config.json`;
//! - files go through hf-hub's cache (`HF_HOME`), which resumes a broken download from the bytes it
//!   already has, then are copied into a staging directory renamed to `--out` once complete;
//! - every file is checked against the size the hub announced, so a truncated transfer is an error
//!   naming the file, never a silently short checkpoint.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Repo, RepoType};

use crate::error::{ConvertError, Result};

/// Where and how to download.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// `org/name`.
    pub repo_id: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Hub endpoint; `HF_ENDPOINT` or `https://huggingface.co` when `None`.
    pub endpoint: Option<String>,
    /// Access token; `HF_TOKEN` when `None`.
    pub token: Option<String>,
    /// hf-hub's cache; `HF_HOME`'s (or `~/.cache/huggingface/hub`) when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Show progress bars.
    pub progress: bool,
}

/// What a download fetched.
#[derive(Debug, Clone)]
pub struct DownloadReport {
    /// Files written into the output directory.
    pub files: Vec<String>,
    /// Their total size.
    pub bytes: u64,
}

/// Files of a model repository zoo needs, from its file list.
pub fn files_to_fetch(all: &[String]) -> Vec<String> {
    let has = |name: &str| all.iter().any(|f| f == name);
    let safetensors: Vec<&String> = all.iter().filter(|f| f.ends_with(".safetensors")).collect();
    let mut wanted: Vec<String> = Vec::new();
    if has("config.json") {
        wanted.push("config.json".into());
    }
    if !safetensors.is_empty() {
        if has("model.safetensors.index.json") {
            wanted.push("model.safetensors.index.json".into());
        }
        wanted.extend(
            safetensors
                .into_iter()
                .filter(|f| !f.contains('/'))
                .cloned(),
        );
    } else {
        for name in ["pytorch_model.bin.index.json"] {
            if has(name) {
                wanted.push(name.into());
            }
        }
        wanted.extend(
            all.iter()
                .filter(|f| f.starts_with("pytorch_model") && f.ends_with(".bin"))
                .cloned(),
        );
    }
    for name in crate::model_dir::TOKENIZER_FILES {
        if has(name) && !wanted.iter().any(|w| w == name) {
            wanted.push(name.to_string());
        }
    }
    wanted
}

fn hub_error(repo: &str, what: &str, error: impl std::fmt::Display) -> ConvertError {
    ConvertError::Hub {
        repo: repo.to_string(),
        message: format!("{what}: {error}"),
    }
}

fn api(options: &DownloadOptions) -> Result<Api> {
    let mut builder = ApiBuilder::from_env().with_progress(options.progress);
    if let Some(endpoint) = options
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
    {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if let Some(token) = options
        .token
        .clone()
        .or_else(|| std::env::var("HF_TOKEN").ok())
    {
        builder = builder.with_token(Some(token));
    }
    if let Some(cache) = &options.cache_dir {
        builder = builder.with_cache_dir(cache.clone());
    }
    builder
        .build()
        .map_err(|e| hub_error(&options.repo_id, "setting up the hub client", e))
}

/// Downloads the files zoo needs from `options.repo_id` into `out` (which must not exist unless
/// `overwrite`).
pub fn download(options: &DownloadOptions, out: &Path, overwrite: bool) -> Result<DownloadReport> {
    if out.exists() && !overwrite {
        return Err(ConvertError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    let api = api(options)?;
    let repo = api.repo(Repo::with_revision(
        options.repo_id.clone(),
        RepoType::Model,
        options.revision.clone(),
    ));
    let info = repo
        .info()
        .map_err(|e| hub_error(&options.repo_id, "listing the repository", e))?;
    let all: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let wanted = files_to_fetch(&all);
    if !wanted.iter().any(|f| f == "config.json") {
        return Err(hub_error(
            &options.repo_id,
            "the repository",
            format!("has no config.json (files: {})", all.join(", ")),
        ));
    }
    let mut fetched = Vec::with_capacity(wanted.len());
    for name in &wanted {
        let path = repo
            .download(name)
            .map_err(|e| hub_error(&options.repo_id, &format!("downloading {name}"), e))?;
        let size = std::fs::metadata(&path)
            .map_err(|e| ConvertError::io(&path, e))?
            .len();
        if let Err(problem) = check_complete(name, &path, size) {
            // A short blob in the cache would be served again next time: drop it.
            let _ = std::fs::remove_file(std::fs::canonicalize(&path).unwrap_or(path.clone()));
            let _ = std::fs::remove_file(&path);
            return Err(hub_error(
                &options.repo_id,
                &format!("downloading {name}"),
                problem,
            ));
        }
        fetched.push((name.clone(), path, size));
    }
    let files = crate::model_dir::publish_files(out, overwrite, &fetched)?;
    Ok(DownloadReport {
        files,
        bytes: fetched.iter().map(|f| f.2).sum(),
    })
}

/// Checks that a fetched file is whole: a safetensors file's header must account for exactly
/// its length, a JSON file must parse. (hf-hub already refuses a body shorter than its
/// Content-Length; this also catches a server that sent no length.)
fn check_complete(name: &str, path: &Path, size: u64) -> std::result::Result<(), String> {
    if name.ends_with(".json") {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| format!("not complete JSON ({e}); truncated transfer?"))?;
    } else if name.ends_with(".safetensors") {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| format!("{size} bytes: shorter than a safetensors header"))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > size.saturating_sub(8) {
            return Err(format!(
                "{size} bytes, but the header alone needs {header_len}"
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|e| e.to_string())?;
        let header: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| format!("header is not JSON: {e}"))?;
        let data_end = header
            .as_object()
            .into_iter()
            .flat_map(|o| o.values())
            .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
            .max()
            .unwrap_or(0);
        let want = 8 + header_len + data_end;
        if want != size {
            return Err(format!(
                "{size} bytes, but its header describes {want}; truncated transfer"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_safetensors_over_bin_and_keeps_tokenizer_files() {
        let all: Vec<String> = [
            "config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "tokenizer.json",
            "vocab.txt",
            "README.md",
            "onnx/model.onnx",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            files_to_fetch(&all),
            [
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "vocab.txt"
            ]
        );
        let bins: Vec<String> = [
            "config.json",
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(files_to_fetch(&bins).len(), 4);
    }

    /// meta-llama/Llama-3.1-8B's file list (as the hub API gives it): the four shards, their
    /// index, the config, generation config and tokenizer files; not Meta's `original/`
    /// consolidated checkpoint.
    #[test]
    fn a_llama_repository_gives_its_shards_not_the_original_checkpoint() {
        let all: Vec<String> = [
            ".gitattributes",
            "LICENSE",
            "README.md",
            "USE_POLICY.md",
            "config.json",
            "generation_config.json",
            "model-00001-of-00004.safetensors",
            "model-00002-of-00004.safetensors",
            "model-00003-of-00004.safetensors",
            "model-00004-of-00004.safetensors",
            "model.safetensors.index.json",
            "original/consolidated.00.pth",
            "original/params.json",
            "original/tokenizer.model",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .map(String::from)
        .to_vec();
        let mut got = files_to_fetch(&all);
        got.sort();
        let mut want = [
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00004.safetensors",
            "model-00002-of-00004.safetensors",
            "model-00003-of-00004.safetensors",
            "model-00004-of-00004.safetensors",
            "generation_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .map(String::from)
        .to_vec();
        want.sort();
        assert_eq!(got, want);
    }
}
