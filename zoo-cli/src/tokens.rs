//! Token files: the memory-mapped corpora `zoo pretrain` samples windows from.
//!
//! What zoo writes (text and JSONL are tokenised once into it) is llm.c's layout, nanoGPT's
//! `.bin` with a header: 256 little-endian `i32` (1024 bytes) — magic `20240520` for `u16` tokens
//! or `20240801` for `u32`, version `1`, the token count — then the tokens, little-endian.
//!
//! What zoo reads:
//! - that layout (the header says the width);
//! - nanoGPT's headerless `.bin`: little-endian tokens, `u16` unless `--token-dtype u32`;
//! - Megatron's indexed dataset (`PREFIX.bin` + `PREFIX.idx`, written by Megatron's
//!   `preprocess_data.py` and read by ModelCenter): the `.idx` header (`MMIDIDX\0\0`, version 1,
//!   dtype code) gives the width and the document lengths; the documents are sampled as one stream,
//!   as Megatron's GPT dataset does.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use memmap2::Mmap;

/// llm.c's magic for `u16` tokens (GPT-2).
const MAGIC_U16: i32 = 20240520;
/// llm.c's magic for `u32` tokens (Llama 3).
const MAGIC_U32: i32 = 20240801;
/// Header bytes of the llm.c layout.
const HEADER_BYTES: usize = 1024;
/// Megatron's `.idx` magic.
const MEGATRON_MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";

/// Width of one token on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenWidth {
    /// 2 bytes (vocabularies up to 65,536).
    U16,
    /// 4 bytes.
    U32,
}

impl TokenWidth {
    fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    /// The narrowest width for ids below `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }
}

/// A memory-mapped token file.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    map: Mmap,
    offset: usize,
    len: usize,
    width: TokenWidth,
}

impl TokenFile {
    /// Opens a token file in any layout zoo reads; `raw_width` is the width of a headerless
    /// nanoGPT file.
    pub fn open(path: &Path, raw_width: TokenWidth) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the map is read-only; a file truncated under a running job is the user's doing
        // (as with numpy's memmap, which nanoGPT and Megatron use).
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        let idx = path.with_extension("idx");
        let (offset, width) = if idx.is_file() {
            (0, megatron_width(&idx, map.len())?)
        } else if let Some(width) = llmc_header(path, &map)? {
            (HEADER_BYTES, width)
        } else {
            (0, raw_width)
        };
        let body = map.len() - offset;
        if body % width.bytes() != 0 {
            bail!(
                "{}: {body} bytes of tokens is not a whole number of {}-byte tokens \
                 (a truncated file, or the wrong --token-dtype)",
                path.display(),
                width.bytes()
            );
        }
        let len = body / width.bytes();
        if len == 0 {
            bail!("{}: the token file holds no tokens", path.display());
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            offset,
            len,
            width,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token `i`.
    pub fn get(&self, i: usize) -> u32 {
        let at = self.offset + i * self.width.bytes();
        let b = &self.map[at..at + self.width.bytes()];
        match self.width {
            TokenWidth::U16 => u32::from(u16::from_le_bytes([b[0], b[1]])),
            TokenWidth::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    /// Tokens `start..start + len`.
    pub fn window(&self, start: usize, len: usize) -> Vec<u32> {
        (start..start + len).map(|i| self.get(i)).collect()
    }

    /// The largest id among tokens `start..end` (`None` when the range is empty).
    pub fn max_id(&self, start: usize, end: usize) -> Option<u32> {
        (start..end.min(self.len)).map(|i| self.get(i)).max()
    }

    /// Checks every id against the vocabulary (one pass over the file), naming the first bad one.
    pub fn check_vocab(&self, vocab_size: usize) -> anyhow::Result<()> {
        if let Some(i) = (0..self.len).find(|&i| self.get(i) as usize >= vocab_size) {
            bail!(
                "{}: token {i} is id {}, outside the model's vocabulary of {vocab_size} \
                 (tokenised with another tokenizer, or the wrong --token-dtype?)",
                self.path.display(),
                self.get(i)
            );
        }
        Ok(())
    }
}

/// The width of an llm.c file, or `None` when the file has no such header.
fn llmc_header(path: &Path, map: &[u8]) -> anyhow::Result<Option<TokenWidth>> {
    if map.len() < HEADER_BYTES {
        return Ok(None);
    }
    let word = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let width = match word(0) {
        MAGIC_U16 => TokenWidth::U16,
        MAGIC_U32 => TokenWidth::U32,
        _ => return Ok(None),
    };
    let count = word(2);
    let body = map.len() - HEADER_BYTES;
    // A negative count cannot be a length; a positive one must describe exactly the body.
    if usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(width.bytes()))
        != Some(body)
    {
        bail!(
            "{}: the header promises {count} tokens of {} bytes but {body} bytes follow it \
             (a truncated or damaged file)",
            path.display(),
            width.bytes()
        );
    }
    Ok(Some(width))
}

/// The token width a Megatron `.idx` declares, after checking its header and that its document
/// lengths add up to the `.bin`'s size.
fn megatron_width(idx: &Path, bin_bytes: usize) -> anyhow::Result<TokenWidth> {
    let bytes = std::fs::read(idx).with_context(|| format!("reading {}", idx.display()))?;
    let bad = |message: String| anyhow::anyhow!("{}: {message}", idx.display());
    if bytes.len() < 34 || &bytes[..9] != MEGATRON_MAGIC {
        return Err(bad("not a Megatron index (no MMIDIDX header)".into()));
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if u64_at(9) != 1 {
        return Err(bad(format!("index version {} (zoo reads 1)", u64_at(9))));
    }
    let (width, size) = match bytes[17] {
        8 => (TokenWidth::U16, 2),
        4 => (TokenWidth::U32, 4),
        code => {
            return Err(bad(format!(
                "token dtype code {code}: zoo reads uint16 (8) and int32 (4)"
            )));
        }
    };
    let sequences = u64_at(18);
    // The lengths must fit the file before any of them is read (the count is outside data).
    let lengths_end = usize::try_from(sequences)
        .ok()
        .and_then(|n| n.checked_mul(4))
        .and_then(|n| n.checked_add(34))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| bad(format!("{sequences} sequence lengths do not fit the file")))?;
    let mut tokens = 0usize;
    for (s, length) in bytes[34..lengths_end].chunks_exact(4).enumerate() {
        let length = i32::from_le_bytes(length.try_into().expect("4 bytes"));
        tokens = usize::try_from(length)
            .ok()
            .and_then(|l| tokens.checked_add(l))
            .ok_or_else(|| bad(format!("sequence {s} has length {length}")))?;
    }
    if tokens.checked_mul(size) != Some(bin_bytes) {
        return Err(bad(format!(
            "its sequences hold {tokens} tokens of {size} bytes but the .bin has {bin_bytes} bytes"
        )));
    }
    Ok(width)
}

/// Writes tokens in zoo's (llm.c's) layout, to a temporary name then renamed into place. The
/// temporary name carries the process id: ranks started by `zoo launch` may tokenise the same
/// corpus at once, and each rename then installs a complete, identical file.
pub fn write_token_file(path: &Path, tokens: &[u32], width: TokenWidth) -> anyhow::Result<()> {
    let count = i32::try_from(tokens.len()).context("more than 2^31 tokens in one file")?;
    let mut header = [0i32; 256];
    header[0] = match width {
        TokenWidth::U16 => MAGIC_U16,
        TokenWidth::U32 => MAGIC_U32,
    };
    header[1] = 1;
    header[2] = count;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * width.bytes());
    for word in header {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    for &t in tokens {
        match width {
            TokenWidth::U16 => {
                let t = u16::try_from(t)
                    .with_context(|| format!("token id {t} does not fit 16 bits"))?;
                bytes.extend_from_slice(&t.to_le_bytes());
            }
            TokenWidth::U32 => bytes.extend_from_slice(&t.to_le_bytes()),
        }
    }
    let temporary = path.with_extension(format!("bin.partial-{}", std::process::id()));
    let mut file =
        File::create(&temporary).with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zoo_files_round_trip_and_nanogpt_files_read_raw() {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<u32> = (0..1000).map(|i| (i * 37) % 50257).collect();
        let path = dir.path().join("t.bin");
        write_token_file(&path, &tokens, TokenWidth::U16).unwrap();
        let file = TokenFile::open(&path, TokenWidth::U32).unwrap();
        assert_eq!(file.window(0, 1000), tokens);

        // nanoGPT: `np.array(ids, dtype=np.uint16).tofile(path)`.
        let raw = dir.path().join("raw.bin");
        let bytes: Vec<u8> = tokens
            .iter()
            .flat_map(|&t| (t as u16).to_le_bytes())
            .collect();
        std::fs::write(&raw, bytes).unwrap();
        let file = TokenFile::open(&raw, TokenWidth::U16).unwrap();
        assert_eq!(file.window(10, 5), tokens[10..15].to_vec());
        let err = file.check_vocab(100).unwrap_err().to_string();
        assert!(err.contains("token 3 is id 111"), "{err}");
    }

    #[test]
    fn megatron_indexed_datasets_read_as_one_stream() {
        // What Megatron's MMapIndexedDatasetBuilder writes for two documents of int32 tokens.
        let dir = tempfile::tempdir().unwrap();
        let docs: [&[u32]; 2] = [&[5, 6, 7], &[8, 9]];
        let bin: Vec<u8> = docs
            .iter()
            .flat_map(|d| d.iter().flat_map(|&t| t.to_le_bytes()))
            .collect();
        std::fs::write(dir.path().join("c_text_document.bin"), bin).unwrap();
        let mut idx = MEGATRON_MAGIC.to_vec();
        idx.extend(1u64.to_le_bytes());
        idx.push(4);
        idx.extend(2u64.to_le_bytes());
        idx.extend(3u64.to_le_bytes());
        idx.extend(3i32.to_le_bytes());
        idx.extend(2i32.to_le_bytes());
        idx.extend(0i64.to_le_bytes());
        idx.extend(12i64.to_le_bytes());
        for d in [0i64, 1, 2] {
            idx.extend(d.to_le_bytes());
        }
        std::fs::write(dir.path().join("c_text_document.idx"), &idx).unwrap();
        let file =
            TokenFile::open(&dir.path().join("c_text_document.bin"), TokenWidth::U16).unwrap();
        assert_eq!(file.window(0, 5), vec![5, 6, 7, 8, 9]);

        // A .bin shorter than its index says is refused.
        std::fs::write(dir.path().join("c_text_document.bin"), [0u8; 8]).unwrap();
        let err = TokenFile::open(&dir.path().join("c_text_document.bin"), TokenWidth::U16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("hold 5 tokens"), "{err}");
    }

    /// A Megatron index for `docs` documents of one token each, as Megatron writes it.
    fn megatron_index(docs: usize) -> Vec<u8> {
        let mut idx = MEGATRON_MAGIC.to_vec();
        idx.extend(1u64.to_le_bytes());
        idx.push(8);
        idx.extend((docs as u64).to_le_bytes());
        idx.extend((docs as u64 + 1).to_le_bytes());
        for _ in 0..docs {
            idx.extend(1i32.to_le_bytes());
        }
        idx
    }

    /// Values that break length fields: any, and above all the edges (0, 1, negative as i32,
    /// powers of two that overflow a product).
    fn length_fields() -> impl proptest::strategy::Strategy<Value = u64> {
        use proptest::prelude::*;
        prop_oneof![
            any::<u64>(),
            (0..64u32).prop_map(|shift| 1u64 << shift),
            (0..64u32).prop_map(|shift| u64::MAX >> shift),
            Just(0u64),
            Just(u32::MAX as u64),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        /// Any bytes, and any damage to a good file of each layout (a byte overwritten anywhere,
        /// above all in the headers and their length fields, or the file cut short), open as
        /// tokens or give an error naming the file: never a panic, never a read past the map.
        #[test]
        fn token_files_of_any_bytes_open_or_name_the_file(
            layout in 0..3usize,
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            at in 0..2048usize,
            value in length_fields(),
            cut in 0..2048usize,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.bin");
            match layout {
                // llm.c: damage the header words (magic, version, count) or beyond.
                0 => {
                    write_token_file(&path, &[1, 2, 3, 4, 5], TokenWidth::U16).unwrap();
                    let mut bytes = std::fs::read(&path).unwrap();
                    // Mostly the header's words (magic, version, count), else anywhere.
                    let at = if at % 2 == 0 { 4 * (at / 2 % 3) } else { at % (bytes.len() - 7) };
                    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
                    if cut % 4 == 0 {
                        bytes.truncate(bytes.len() - cut / 4 % bytes.len());
                    }
                    std::fs::write(&path, bytes).unwrap();
                }
                // Megatron: damage the index (counts, lengths) of a good pair.
                1 => {
                    std::fs::write(&path, [1u8, 0, 2, 0, 3, 0]).unwrap();
                    let mut idx = megatron_index(3);
                    // Mostly the header's fields (version, dtype, counts), else anywhere.
                    let at = if at % 2 == 0 { [9, 17, 18, 26][at / 2 % 4] } else { at % (idx.len() - 7) };
                    idx[at..at + 8].copy_from_slice(&value.to_le_bytes());
                    if cut % 4 == 0 {
                        idx.truncate(idx.len() - cut / 4 % idx.len());
                    }
                    std::fs::write(path.with_extension("idx"), idx).unwrap();
                }
                // Noise, with or without an index beside it.
                _ => {
                    std::fs::write(&path, &noise).unwrap();
                    if cut % 2 == 0 {
                        std::fs::write(path.with_extension("idx"), &noise).unwrap();
                    }
                }
            }
            match TokenFile::open(&path, TokenWidth::U16) {
                Ok(file) => {
                    // Every token it claims can be read.
                    let _ = file.window(0, file.len());
                }
                Err(error) => {
                    let message = format!("{error:#}");
                    proptest::prop_assert!(message.contains("c.bin") || message.contains("c.idx"), "{}", message);
                }
            }
        }
    }

    /// Inputs the property test once found panicking (kept as a corpus): a Megatron index whose
    /// sequence count overflows `34 + 4n`, and an llm.c header with a negative count.
    #[test]
    fn length_fields_that_overflow_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.bin");
        std::fs::write(&path, [1u8, 0, 2, 0]).unwrap();
        let mut idx = megatron_index(2);
        idx[18..26].copy_from_slice(&(1u64 << 62).to_le_bytes());
        std::fs::write(path.with_extension("idx"), idx).unwrap();
        let err = TokenFile::open(&path, TokenWidth::U16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.idx"), "{err}");
        std::fs::remove_file(path.with_extension("idx")).unwrap();
        write_token_file(&path, &[1, 2], TokenWidth::U16).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8..12].copy_from_slice(&(-1i32).to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        let err = TokenFile::open(&path, TokenWidth::U16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.bin"), "{err}");
    }

    #[test]
    fn truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        write_token_file(&path, &[1, 2, 3, 4], TokenWidth::U32).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = TokenFile::open(&path, TokenWidth::U16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("promises 4 tokens"), "{err}");
    }
}
