//! Checks a PyTorch `.bin` before burn-store's reader sees it.
//!
//! burn-store's reader interprets pickle opcodes without running code (so a malicious file
//! cannot execute anything), but it trusts the lengths a file declares: a string opcode's length,
//! a zip entry's size, a legacy storage's element count become the sizes of its buffers. A damaged
//! or hostile file could then make it allocate terabytes. This module walks the same structure
//! first, with positioned and bounded reads, and refuses any length that points past the end of
//! the file:
//!
//! - zip archives (`torch.save` since 1.6): the end-of-central-directory record (and its zip64
//!   form), every central entry's offset and sizes, and the opcodes of `data.pkl`;
//! - legacy files (0.1.10–1.5) and plain pickles: the opcodes of their pickles from the start,
//!   then each legacy storage's element count against the bytes left.
//!
//! The reader's tensors are checked again before their data is read (shape × dtype against the
//! file's size, in `tensors.rs`).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The longest newline-terminated argument (a global's module or name, a decimal number).
const MAX_LINE: usize = 1 << 16;

/// Checks the file at `path`; the error says what is wrong (the caller names the file).
pub fn check(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut magic = [0u8; 4];
    if size >= 4 {
        file.read_exact_at(&mut magic, 0)
            .map_err(|e| e.to_string())?;
    }
    if &magic == b"PK\x03\x04" {
        return check_zip(&file, size);
    }
    let mut reader = Counted {
        inner: BufReader::new(file),
        position: 0,
        size,
    };
    // A legacy file is five pickles (magic, protocol, system info, the object, the storage keys)
    // then the storages; a plain pickle is one. Walk the first, then as many as there are.
    let mut pickles = 0;
    while reader.position < size && pickles < 5 {
        scan_pickle(&mut reader)?;
        pickles += 1;
        if pickles == 1 && !is_legacy_magic(&reader.inner, size) {
            return Ok(());
        }
    }
    // The first legacy storage: a little-endian u64 element count, then at least that many
    // bytes (element sizes are known only to the object's pickle; one byte each bounds them).
    if reader.position + 8 <= size {
        let count = reader.u64()?;
        let left = size - reader.position;
        if count > left {
            return Err(format!(
                "a storage of {count} elements at byte {} exceeds the {left} bytes left",
                reader.position - 8
            ));
        }
    }
    Ok(())
}

/// Whether the file starts with the legacy format's magic-number pickle.
fn is_legacy_magic(reader: &BufReader<File>, size: u64) -> bool {
    const MAGIC: [u8; 15] = [
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
    ];
    let mut head = [0u8; 15];
    size >= 15 && reader.get_ref().read_exact_at(&mut head, 0).is_ok() && head == MAGIC
}

/// A reader that knows its position and the file's size.
struct Counted<R> {
    inner: R,
    position: u64,
    size: u64,
}

impl<R: BufRead> Counted<R> {
    fn byte(&mut self) -> Result<u8, String> {
        let mut one = [0u8; 1];
        self.inner
            .read_exact(&mut one)
            .map_err(|_| format!("the pickle ends at byte {} without STOP", self.position))?;
        self.position += 1;
        Ok(one[0])
    }

    fn le(&mut self, bytes: usize) -> Result<u64, String> {
        let mut value = 0u64;
        for i in 0..bytes {
            value |= u64::from(self.byte()?) << (8 * i);
        }
        Ok(value)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.le(8)
    }

    /// Skips `len` bytes that an opcode declared, after checking that the file has them.
    fn skip_declared(&mut self, len: u64, opcode: u8) -> Result<(), String> {
        let left = self.size - self.position;
        if len > left {
            return Err(format!(
                "pickle opcode 0x{opcode:02x} at byte {} declares {len} bytes, {left} are left",
                self.position
            ));
        }
        let copied = std::io::copy(&mut (&mut self.inner).take(len), &mut std::io::sink())
            .map_err(|e| e.to_string())?;
        self.position += copied;
        if copied != len {
            return Err("the file ends inside a pickle".into());
        }
        Ok(())
    }

    /// Skips a newline-terminated argument, at most [`MAX_LINE`] bytes.
    fn skip_line(&mut self) -> Result<(), String> {
        for _ in 0..MAX_LINE {
            if self.byte()? == b'\n' {
                return Ok(());
            }
        }
        Err(format!(
            "a pickle line argument longer than {MAX_LINE} bytes at byte {}",
            self.position
        ))
    }
}

/// Walks one pickle's opcodes up to and including STOP, checking every declared length.
fn scan_pickle<R: BufRead>(r: &mut Counted<R>) -> Result<(), String> {
    loop {
        let opcode = r.byte()?;
        let declared = match opcode {
            b'.' => return Ok(()),
            // No argument.
            b'(' | b')' | b'0' | b'1' | b'2' | b'a' | b'b' | b'd' | b'e' | b'l' | b'N' | b'R'
            | b's' | b't' | b'u' | b'}' | b']' | b'Q' | b'o' | b'\x81' | b'\x85' | b'\x86'
            | b'\x87' | b'\x88' | b'\x89' | b'\x8f' | b'\x90' | b'\x91' | b'\x92' | b'\x93'
            | b'\x94' | b'\x97' | b'\x98' => None,
            // Fixed-size arguments.
            b'K' | b'q' | b'h' | b'\x80' | b'\x82' => {
                r.le(1)?;
                None
            }
            b'M' | b'\x83' => {
                r.le(2)?;
                None
            }
            b'J' | b'r' | b'j' | b'\x84' => {
                r.le(4)?;
                None
            }
            b'G' | b'\x95' => {
                r.le(8)?;
                None
            }
            // Length-prefixed data.
            b'U' | b'C' | b'\x8c' | b'\x8a' => Some(r.le(1)?),
            b'T' | b'X' | b'B' | b'\x8b' => Some(r.le(4)?),
            b'\x8d' | b'\x8e' | b'\x96' => Some(r.le(8)?),
            // Newline-terminated arguments (GLOBAL and INST take two).
            b'I' | b'L' | b'F' | b'S' | b'V' | b'g' | b'p' | b'P' => {
                r.skip_line()?;
                None
            }
            b'c' | b'i' => {
                r.skip_line()?;
                r.skip_line()?;
                None
            }
            other => {
                return Err(format!(
                    "unknown pickle opcode 0x{other:02x} at byte {}",
                    r.position - 1
                ));
            }
        };
        if let Some(len) = declared {
            r.skip_declared(len, opcode)?;
        }
    }
}

/// Little-endian integer of `bytes.len()` bytes.
fn le(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0u64, |value, &b| (value << 8) | u64::from(b))
}

/// Checks a zip archive's directory against the file's size, then `data.pkl`'s opcodes.
fn check_zip(file: &File, size: u64) -> Result<(), String> {
    let read = |at: u64, len: u64| -> Result<Vec<u8>, String> {
        if at.checked_add(len).is_none_or(|end| end > size) {
            return Err(format!(
                "{len} bytes at {at} lie past the end of the {size}-byte file"
            ));
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, at)
            .map_err(|e| e.to_string())?;
        Ok(bytes)
    };
    // The end-of-central-directory record is in the last 22 + 65535 bytes.
    let tail_len = size.min(22 + 65535);
    let tail = read(size - tail_len, tail_len)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or("a zip archive without its end-of-central-directory record")?;
    let record = &tail[eocd..];
    let (mut entries, mut directory_size, mut directory_at) = (
        le(&record[10..12]),
        le(&record[12..16]),
        le(&record[16..20]),
    );
    if entries == 0xffff || directory_size == 0xffff_ffff || directory_at == 0xffff_ffff {
        // zip64: the locator just before the record points at the zip64 record.
        let locator_at = (size - tail_len + eocd as u64)
            .checked_sub(20)
            .ok_or("a zip64 archive without its locator")?;
        let locator = read(locator_at, 20)?;
        if locator[..4] != [0x50, 0x4b, 0x06, 0x07] {
            return Err("a zip64 archive without its locator".into());
        }
        let zip64 = read(le(&locator[8..16]), 56)?;
        if zip64[..4] != [0x50, 0x4b, 0x06, 0x06] {
            return Err("a damaged zip64 end-of-central-directory record".into());
        }
        (entries, directory_size, directory_at) =
            (le(&zip64[32..40]), le(&zip64[40..48]), le(&zip64[48..56]));
    }
    let directory = read(directory_at, directory_size)?;
    // Each central entry takes at least 46 bytes.
    if entries > directory_size / 46 + 1 {
        return Err(format!(
            "{entries} zip entries cannot fit a {directory_size}-byte directory"
        ));
    }
    let mut at = 0usize;
    let mut pickle = None;
    for _ in 0..entries {
        let entry = directory
            .get(at..at + 46)
            .filter(|e| e[..4] == [0x50, 0x4b, 0x01, 0x02])
            .ok_or("a damaged zip central directory")?;
        let method = le(&entry[10..12]);
        let (mut compressed, mut uncompressed, mut offset) =
            (le(&entry[20..24]), le(&entry[24..28]), le(&entry[42..46]));
        let (name_len, extra_len, comment_len) = (
            le(&entry[28..30]) as usize,
            le(&entry[30..32]) as usize,
            le(&entry[32..34]) as usize,
        );
        let name = directory
            .get(at + 46..at + 46 + name_len)
            .ok_or("a damaged zip central directory")?;
        let extra = directory
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or("a damaged zip central directory")?;
        // zip64 sizes and offset, in that order, for the fields that say 0xffffffff.
        let mut fields = zip64_fields(extra).into_iter();
        for field in [&mut uncompressed, &mut compressed, &mut offset] {
            if *field == 0xffff_ffff {
                *field = fields.next().ok_or("a zip64 entry without its sizes")?;
            }
        }
        let name = String::from_utf8_lossy(name).into_owned();
        if offset.checked_add(compressed).is_none_or(|end| end > size) {
            return Err(format!(
                "zip entry '{name}' ({compressed} bytes at {offset}) lies past the end of the file"
            ));
        }
        // Stored entries are as large as they are; deflate shrinks at most 1032-fold.
        let limit = if method == 0 {
            compressed
        } else {
            compressed.saturating_mul(1032)
        };
        if uncompressed > limit {
            return Err(format!(
                "zip entry '{name}' claims {uncompressed} bytes from {compressed} stored ones"
            ));
        }
        if name.ends_with("data.pkl") && method == 0 {
            pickle = Some((offset, compressed));
        }
        at += 46 + name_len + extra_len + comment_len;
    }
    if let Some((offset, len)) = pickle {
        let local = read(offset, 30)?;
        let start = offset + 30 + le(&local[26..28]) + le(&local[28..30]);
        let mut reader = Counted {
            inner: std::io::Cursor::new(read(start, len)?),
            position: 0,
            size: len,
        };
        scan_pickle(&mut reader)?;
    }
    Ok(())
}

/// The 8-byte values of an extra field's zip64 record (id 1).
fn zip64_fields(extra: &[u8]) -> Vec<u64> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let (id, len) = (le(&extra[at..at + 2]), le(&extra[at + 2..at + 4]) as usize);
        let body = extra.get(at + 4..at + 4 + len).unwrap_or_default();
        if id == 1 {
            return body.chunks_exact(8).map(le).collect();
        }
        at += 4 + len;
    }
    Vec::new()
}
