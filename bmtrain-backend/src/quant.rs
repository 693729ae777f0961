//! Weight quantization: int8 with one absmax per output channel (LLM.int8()'s row-wise
//! quantization) and 4-bit NF4 with one absmax per block of 64 (QLoRA, bitsandbytes'
//! `quantize_4bit`), and the CPU products that read them without dequantizing a whole matrix.
//!
//! A [`QuantizedMatrix`] holds a weight as HF's `nn.Linear` does, `[rows = outputs, cols =
//! inputs]`, row-major: a row is one output channel, so int8's scale is per row and NF4's blocks
//! run along the rows of the flattened matrix (as bitsandbytes flattens it).
//!
//! ```text
//!   int8:  q = round(127 · w / absmax_row)            w ≈ q · absmax_row / 127
//!   NF4:   q = nearest code to w / absmax_block        w ≈ NF4[q] · absmax_block
//!          two codes a byte, the first in the high nibble (bitsandbytes' packing)
//! ```
//!
//! The products ([`QuantizedMatrix::mul_transposed`] for forward, [`QuantizedMatrix::mul`] for
//! the input gradient) decode a few rows at a time: for a handful of input rows (decoding) each
//! weight row is decoded into registers and dotted at once, so a step reads one byte (int8) or
//! half a byte (NF4) per weight instead of four; for many input rows (a prompt, a training batch)
//! a strip of 64 rows or columns is decoded into a small buffer and multiplied with `gemm`.

use rayon::prelude::*;
use std::fmt;
use std::sync::{Arc, RwLock, Weak};

use crate::kernels::{SharedMut, gemm, simd};

/// The elements NF4 shares one absmax over (QLoRA's and bitsandbytes' default).
pub const NF4_BLOCK: usize = 64;

/// NormalFloat4's 16 values (Dettmers et al. 2023, appendix E; bitsandbytes'
/// `get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to [−1, 1], with an exact zero. Written
/// with bitsandbytes' digits; each rounds to the f32 bitsandbytes uses (`tests/quantize.rs`).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_5,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Input rows up to which a product dots decoded weight rows directly (decoding); above it, a
/// decoded strip goes through `gemm`.
const DOT_ROWS: usize = 8;

/// Weight rows (or columns) one task decodes at a time.
const STRIP: usize = 64;

/// How a matrix is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 8-bit integers, one absmax per output channel.
    Int8,
    /// 4-bit NormalFloat, one absmax per block of [`NF4_BLOCK`] elements.
    Nf4,
}

impl QuantFormat {
    /// From the bit width `zoo quantize --bits` takes: 8 → int8, 4 → NF4.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            8 => Some(Self::Int8),
            4 => Some(Self::Nf4),
            _ => None,
        }
    }

    /// The bit width.
    pub fn bits(self) -> u32 {
        match self {
            Self::Int8 => 8,
            Self::Nf4 => 4,
        }
    }

    /// The name files and configs use: `"int8"`, `"nf4"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::Nf4 => "nf4",
        }
    }

    /// The format a name (as [`QuantFormat::name`] writes it) stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Int8, Self::Nf4]
            .into_iter()
            .find(|f| f.name() == name)
    }

    /// Bytes of codes a `rows × cols` matrix takes.
    pub fn code_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            Self::Int8 => rows * cols,
            Self::Nf4 => (rows * cols).div_ceil(2),
        }
    }

    /// Absmax values a `rows × cols` matrix takes.
    pub fn scale_count(self, rows: usize, cols: usize) -> usize {
        match self {
            Self::Int8 => rows,
            Self::Nf4 => (rows * cols).div_ceil(NF4_BLOCK),
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A quantized `[rows, cols]` weight (rows are output channels).
#[derive(Clone, PartialEq)]
pub struct QuantizedMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    /// int8: one `i8` a weight (stored as its byte); NF4: two 4-bit codes a byte.
    codes: Vec<u8>,
    /// int8: per row; NF4: per block.
    absmax: Vec<f32>,
}

impl fmt::Debug for QuantizedMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "QuantizedMatrix({} {}x{})",
            self.format, self.rows, self.cols
        )
    }
}

impl QuantizedMatrix {
    /// Quantizes `values`, a row-major `[rows, cols]` matrix.
    ///
    /// # Panics
    /// If `values.len() != rows * cols`.
    pub fn quantize(format: QuantFormat, values: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols, "a {rows}x{cols} matrix");
        let (codes, absmax) = match format {
            QuantFormat::Int8 => quantize_int8(values, cols),
            QuantFormat::Nf4 => quantize_nf4(values),
        };
        Self {
            format,
            rows,
            cols,
            codes,
            absmax,
        }
    }

    /// A matrix from stored codes and scales, checked: the lengths must be those of a
    /// `rows × cols` matrix of `format` and every absmax finite and non-negative.
    pub fn from_parts(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        codes: Vec<u8>,
        absmax: Vec<f32>,
    ) -> Result<Self, String> {
        let (want_codes, want_scales) = (
            format.code_bytes(rows, cols),
            format.scale_count(rows, cols),
        );
        if codes.len() != want_codes {
            return Err(format!(
                "{} bytes of {format} codes, a {rows}x{cols} matrix has {want_codes}",
                codes.len()
            ));
        }
        if absmax.len() != want_scales {
            return Err(format!(
                "{} absmax values, a {rows}x{cols} {format} matrix has {want_scales}",
                absmax.len()
            ));
        }
        if let Some(bad) = absmax.iter().find(|a| !(a.is_finite() && **a >= 0.0)) {
            return Err(format!("absmax {bad} is not a finite non-negative scale"));
        }
        Ok(Self {
            format,
            rows,
            cols,
            codes,
            absmax,
        })
    }

    /// The format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored codes (int8: `i8`s as bytes; NF4: packed pairs).
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The stored absmax values.
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }

    /// Bytes the matrix holds (codes and scales).
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }

    /// The whole matrix in f32, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.decode_rows(0, &mut out);
        out
    }

    /// Decodes rows `first..first + out.len() / cols` into `out`.
    pub fn decode_rows(&self, first: usize, out: &mut [f32]) {
        let start = first * self.cols;
        match self.format {
            QuantFormat::Int8 => {
                for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
                    let codes = &self.codes[start + r * self.cols..][..self.cols];
                    decode_int8(codes, self.absmax[first + r] / 127.0, row);
                }
            }
            QuantFormat::Nf4 => decode_nf4(&self.codes, &self.absmax, start, out),
        }
    }

    /// Decodes columns `first..first + width` of every row into `out` (`[rows, width]`).
    fn decode_columns(&self, first: usize, width: usize, out: &mut [f32]) {
        for (r, row) in out.chunks_exact_mut(width).enumerate() {
            let start = r * self.cols + first;
            match self.format {
                QuantFormat::Int8 => {
                    decode_int8(
                        &self.codes[start..start + width],
                        self.absmax[r] / 127.0,
                        row,
                    );
                }
                QuantFormat::Nf4 => decode_nf4(&self.codes, &self.absmax, start, row),
            }
        }
    }

    /// `x · Wᵀ`: `x` is `[m, cols]` row-major, the result `[m, rows]` (a linear layer's output).
    pub fn mul_transposed(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), m * cols, "an [{m}, {cols}] input");
        let mut out = vec![0.0f32; m * rows];
        if m == 0 || rows == 0 {
            return out;
        }
        if m <= DOT_ROWS {
            // Each task dots its weight rows with every input row: [strip, m], transposed after.
            let parts: Vec<Vec<f32>> = (0..rows.div_ceil(STRIP))
                .into_par_iter()
                .map(|s| {
                    let first = s * STRIP;
                    let count = STRIP.min(rows - first);
                    let mut part = vec![0.0f32; count * m];
                    let mut decoded = Vec::new();
                    for r in 0..count {
                        let row = first + r;
                        for i in 0..m {
                            let xi = &x[i * cols..][..cols];
                            part[r * m + i] = self.dot_row(row, xi, &mut decoded);
                        }
                    }
                    part
                })
                .collect();
            for (s, part) in parts.iter().enumerate() {
                for (r, outputs) in part.chunks_exact(m).enumerate() {
                    for (i, v) in outputs.iter().enumerate() {
                        out[i * rows + s * STRIP + r] = *v;
                    }
                }
            }
            return out;
        }
        let dst = SharedMut(out.as_mut_ptr());
        (0..rows.div_ceil(STRIP)).into_par_iter().for_each(|s| {
            let first = s * STRIP;
            let count = STRIP.min(rows - first);
            let mut strip = vec![0.0f32; count * cols];
            self.decode_rows(first, &mut strip);
            // SAFETY: this task writes columns first..first + count of `out` only; `x` is
            // [m, cols], `strip` [count, cols] read as its transpose [cols, count].
            unsafe {
                gemm(
                    m,
                    count,
                    cols,
                    (dst.get().add(first), rows as isize, 1),
                    (x.as_ptr(), cols as isize, 1),
                    (strip.as_ptr(), 1, cols as isize),
                    1.0,
                    false,
                    false,
                );
            }
        });
        out
    }

    /// `dy · W`: `dy` is `[m, rows]`, the result `[m, cols]` (a linear layer's input gradient).
    pub fn mul(&self, dy: &[f32], m: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(dy.len(), m * rows, "an [{m}, {rows}] gradient");
        let mut out = vec![0.0f32; m * cols];
        if m == 0 || cols == 0 {
            return out;
        }
        let dst = SharedMut(out.as_mut_ptr());
        (0..cols.div_ceil(STRIP)).into_par_iter().for_each(|s| {
            let first = s * STRIP;
            let width = STRIP.min(cols - first);
            let mut strip = vec![0.0f32; rows * width];
            self.decode_columns(first, width, &mut strip);
            // SAFETY: this task writes columns first..first + width of `out` only; `dy` is
            // [m, rows], `strip` [rows, width].
            unsafe {
                gemm(
                    m,
                    width,
                    rows,
                    (dst.get().add(first), cols as isize, 1),
                    (dy.as_ptr(), rows as isize, 1),
                    (strip.as_ptr(), width as isize, 1),
                    1.0,
                    false,
                    false,
                );
            }
        });
        out
    }

    /// Rows `ids` decoded (an embedding lookup), `[ids.len(), cols]`; `None` if an id is out of
    /// range.
    pub fn gather_rows(&self, ids: &[usize]) -> Option<Vec<f32>> {
        if ids.iter().any(|&id| id >= self.rows) {
            return None;
        }
        let mut out = vec![0.0f32; ids.len() * self.cols];
        for (row, id) in out.chunks_exact_mut(self.cols.max(1)).zip(ids) {
            self.decode_rows(*id, row);
        }
        Some(out)
    }

    /// Row `row` of the matrix dotted with `x` (`decoded`: scratch for NF4's decoded row).
    fn dot_row(&self, row: usize, x: &[f32], decoded: &mut Vec<f32>) -> f32 {
        let cols = self.cols;
        match self.format {
            QuantFormat::Int8 => {
                dot_int8(x, &self.codes[row * cols..][..cols]) * (self.absmax[row] / 127.0)
            }
            QuantFormat::Nf4 => {
                decoded.resize(cols, 0.0);
                decode_nf4(&self.codes, &self.absmax, row * cols, decoded);
                dot_f32(x, decoded)
            }
        }
    }
}

/// Row-wise absmax int8 codes of a row-major matrix with `cols` columns.
fn quantize_int8(values: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let rows = values.len().checked_div(cols).unwrap_or(0);
    let mut codes = vec![0u8; values.len()];
    let mut absmax = vec![0.0f32; rows];
    for ((row, out), max) in values
        .chunks_exact(cols.max(1))
        .zip(codes.chunks_exact_mut(cols.max(1)))
        .zip(&mut absmax)
    {
        *max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if *max > 0.0 { 127.0 / *max } else { 0.0 };
        for (q, v) in out.iter_mut().zip(row) {
            *q = (v * scale).round().clamp(-127.0, 127.0) as i8 as u8;
        }
    }
    (codes, absmax)
}

/// NF4 codes of `values` in blocks of [`NF4_BLOCK`], packed two a byte (high nibble first).
fn quantize_nf4(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    // Midpoints between neighbouring code values: a value's code is how many lie below it.
    let mut mid = [0.0f32; 15];
    for (i, m) in mid.iter_mut().enumerate() {
        *m = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
    }
    let mut codes = vec![0u8; values.len().div_ceil(2)];
    let mut absmax = Vec::with_capacity(values.len().div_ceil(NF4_BLOCK));
    for (b, block) in values.chunks(NF4_BLOCK).enumerate() {
        let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(max);
        let inverse = if max > 0.0 { 1.0 / max } else { 0.0 };
        for (j, v) in block.iter().enumerate() {
            let scaled = v * inverse;
            let code = mid.iter().filter(|&&m| m < scaled).count() as u8;
            let index = b * NF4_BLOCK + j;
            codes[index / 2] |= if index.is_multiple_of(2) {
                code << 4
            } else {
                code
            };
        }
    }
    (codes, absmax)
}

simd::avx512_version! {
    /// `out[i] = codes[i] (as i8) · scale`.
    fn decode_int8(codes: &[u8], scale: f32, out: &mut [f32]) {
        for (o, q) in out.iter_mut().zip(codes) {
            *o = (*q as i8) as f32 * scale;
        }
    }
}

simd::avx512_version! {
    /// `Σ x[i] · codes[i] (as i8)`, in 16 lanes.
    fn dot_int8(x: &[f32], codes: &[u8]) -> f32 {
        let mut acc = [0.0f32; 16];
        let (xs, qs) = (x.chunks_exact(16), codes.chunks_exact(16));
        let (x_tail, q_tail) = (xs.remainder(), qs.remainder());
        for (xc, qc) in xs.zip(qs) {
            for l in 0..16 {
                acc[l] += xc[l] * (qc[l] as i8) as f32;
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for (xv, q) in x_tail.iter().zip(q_tail) {
            sum += xv * (*q as i8) as f32;
        }
        sum
    }
}

simd::avx512_version! {
    /// `Σ x[i] · y[i]`, in 16 lanes.
    fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
        let mut acc = [0.0f32; 16];
        let (xs, ys) = (x.chunks_exact(16), y.chunks_exact(16));
        let (x_tail, y_tail) = (xs.remainder(), ys.remainder());
        for (xc, yc) in xs.zip(ys) {
            for l in 0..16 {
                acc[l] += xc[l] * yc[l];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for (a, b) in x_tail.iter().zip(y_tail) {
            sum += a * b;
        }
        sum
    }
}

/// Decodes NF4 elements `start..start + out.len()` of the flattened matrix into `out`.
fn decode_nf4(codes: &[u8], absmax: &[f32], start: usize, out: &mut [f32]) {
    let mut index = start;
    let mut done = 0;
    while done < out.len() {
        // One block's share at a time: its scale is constant.
        let block = index / NF4_BLOCK;
        let run = ((block + 1) * NF4_BLOCK - index).min(out.len() - done);
        let table = NF4_CODE.map(|c| c * absmax[block]);
        let dst = &mut out[done..done + run];
        if index.is_multiple_of(2) && run.is_multiple_of(2) {
            // Whole bytes (every row of a matrix with an even width).
            decode_nf4_bytes(&codes[index / 2..(index + run) / 2], &table, dst);
        } else {
            for (k, o) in dst.iter_mut().enumerate() {
                let i = index + k;
                let byte = codes[i / 2];
                let code = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0f
                };
                *o = table[code as usize];
            }
        }
        index += run;
        done += run;
    }
}

simd::avx512_version! {
    /// Two values a byte from the block's scaled code table (high nibble first).
    fn decode_nf4_bytes(bytes: &[u8], table: &[f32; 16], out: &mut [f32]) {
        for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = table[(byte >> 4) as usize];
            pair[1] = table[(byte & 0x0f) as usize];
        }
    }
}

/// The 32-bit words a matrix packs into to travel with the trainer's f32 collectives (an
/// all-gather moves bits, never arithmetic, so codes survive it exactly): the codes' bytes, zero
/// padded to a whole word, then the absmax values' bits.
pub fn packed_words(format: QuantFormat, rows: usize, cols: usize) -> usize {
    format.code_bytes(rows, cols).div_ceil(4) + format.scale_count(rows, cols)
}

impl QuantizedMatrix {
    /// Appends the matrix's [`packed_words`] to `out` (as f32 bit patterns).
    pub fn pack_into(&self, out: &mut Vec<f32>) {
        for chunk in self.codes.chunks(4) {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            out.push(f32::from_bits(u32::from_le_bytes(word)));
        }
        out.extend_from_slice(&self.absmax);
    }

    /// The matrix [`QuantizedMatrix::pack_into`] wrote into `words` (exactly
    /// [`packed_words`] long), checked as [`QuantizedMatrix::from_parts`] checks.
    pub fn unpack(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        words: &[f32],
    ) -> Result<Self, String> {
        let code_bytes = format.code_bytes(rows, cols);
        let code_words = code_bytes.div_ceil(4);
        if words.len() != packed_words(format, rows, cols) {
            return Err(format!(
                "{} words, a packed {rows}x{cols} {format} matrix has {}",
                words.len(),
                packed_words(format, rows, cols)
            ));
        }
        let mut codes: Vec<u8> = words[..code_words]
            .iter()
            .flat_map(|w| w.to_bits().to_le_bytes())
            .collect();
        codes.truncate(code_bytes);
        Self::from_parts(format, rows, cols, codes, words[code_words..].to_vec())
    }
}

/// Where a quantized layer reads its codes. A quantized directory run by `zoo forward` holds them
/// for good ([`CodesSlot::resident`]). QLoRA's frozen base is the ZeRO trainer's: each rank keeps
/// a slice of the packed codes and gathers a segment's matrices only while the segment runs, so
/// the slot is lent a weak reference ([`CodesSlot::lend`]) that lives as long as the working copy
/// that holds the matrix. Clones share the slot.
#[derive(Debug, Clone)]
pub struct CodesSlot(Arc<RwLock<Held>>);

#[derive(Debug)]
enum Held {
    Resident(Arc<QuantizedMatrix>),
    Lent(Weak<QuantizedMatrix>),
}

impl CodesSlot {
    /// A slot holding `codes` for good.
    pub fn resident(codes: Arc<QuantizedMatrix>) -> Self {
        Self(Arc::new(RwLock::new(Held::Resident(codes))))
    }

    /// An empty slot, to be lent codes by the trainer.
    pub fn lent() -> Self {
        Self(Arc::new(RwLock::new(Held::Lent(Weak::new()))))
    }

    /// The codes, while the slot holds or is lent them.
    pub fn codes(&self) -> Option<Arc<QuantizedMatrix>> {
        match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            Held::Resident(codes) => Some(codes.clone()),
            Held::Lent(weak) => weak.upgrade(),
        }
    }

    /// Lends `codes` to the slot for as long as someone else holds them.
    pub fn lend(&self, codes: &Arc<QuantizedMatrix>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Held::Lent(Arc::downgrade(codes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::random;

    fn reference_product(w: &[f32], x: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * rows];
        for i in 0..m {
            for r in 0..rows {
                out[i * rows + r] = (0..cols).map(|k| x[i * cols + k] * w[r * cols + k]).sum();
            }
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }

    /// int8 rounds to the nearest of 255 levels: every weight within half a step of its row's
    /// scale (`absmax / 254`), and the row's largest magnitude exact.
    #[test]
    fn int8_round_trip_is_within_half_a_step_per_row() {
        let (rows, cols) = (37, 70);
        let w = random(rows * cols, 3, 2.0);
        let q = QuantizedMatrix::quantize(QuantFormat::Int8, &w, rows, cols);
        let back = q.dequantize();
        for r in 0..rows {
            let row = &w[r * cols..][..cols];
            let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.absmax()[r], max);
            let err = max_diff(row, &back[r * cols..][..cols]);
            assert!(
                err <= max / 254.0 * 1.0001,
                "row {r}: {err} vs {}",
                max / 254.0
            );
        }
        assert_eq!(q.bytes(), rows * cols + 4 * rows);
    }

    /// NF4 maps each value to its nearest code: the error is at most half the widest gap between
    /// neighbouring codes (0.1519 of the block's absmax, between −1 and −0.696).
    #[test]
    fn nf4_round_trip_is_within_half_the_widest_code_gap_per_block() {
        let (rows, cols) = (9, 40); // blocks span rows, and the last is partial
        let w = random(rows * cols, 5, 1.0);
        let q = QuantizedMatrix::quantize(QuantFormat::Nf4, &w, rows, cols);
        let back = q.dequantize();
        for (b, (block, restored)) in w.chunks(NF4_BLOCK).zip(back.chunks(NF4_BLOCK)).enumerate() {
            let max = q.absmax()[b];
            assert!(max_diff(block, restored) <= 0.152 * max, "block {b}");
        }
        assert_eq!(q.codes().len(), 180);
        assert_eq!(q.absmax().len(), 6);
        // The block's extreme is exact (a code is ±1).
        let argmax = (0..64)
            .max_by(|&a, &b| w[a].abs().total_cmp(&w[b].abs()))
            .unwrap();
        assert_eq!(back[argmax], w[argmax]);
    }

    /// Both products, on the dot path (few rows) and the strip path (many), equal the dense
    /// product with the dequantized matrix.
    #[test]
    fn products_equal_the_dequantized_matrix_products() {
        let (rows, cols) = (150, 136);
        let w = random(rows * cols, 7, 1.0);
        for format in [QuantFormat::Int8, QuantFormat::Nf4] {
            let q = QuantizedMatrix::quantize(format, &w, rows, cols);
            let dense = q.dequantize();
            for m in [1, 3, DOT_ROWS + 5] {
                let x = random(m * cols, 11, 1.0);
                let want = reference_product(&dense, &x, m, rows, cols);
                let got = q.mul_transposed(&x, m);
                assert!(max_diff(&got, &want) < 1e-4, "{format} m={m}");
                // dy·W against (Wᵀ)ᵀ: the reference with the roles swapped.
                let dy = random(m * rows, 13, 1.0);
                let mut transposed = vec![0.0; rows * cols];
                for r in 0..rows {
                    for c in 0..cols {
                        transposed[c * rows + r] = dense[r * cols + c];
                    }
                }
                let want = reference_product(&transposed, &dy, m, cols, rows);
                assert!(max_diff(&q.mul(&dy, m), &want) < 1e-4, "{format} dW m={m}");
            }
            let rows_back = q.gather_rows(&[3, 0, 149]).unwrap();
            assert_eq!(&rows_back[..cols], &dense[3 * cols..4 * cols]);
            assert_eq!(&rows_back[2 * cols..], &dense[149 * cols..]);
            assert!(q.gather_rows(&[150]).is_none());
        }
    }

    #[test]
    fn stored_parts_are_checked() {
        let q = QuantizedMatrix::quantize(QuantFormat::Nf4, &random(128, 1, 1.0), 2, 64);
        let ok = QuantizedMatrix::from_parts(
            QuantFormat::Nf4,
            2,
            64,
            q.codes().to_vec(),
            q.absmax().to_vec(),
        );
        assert_eq!(ok.unwrap(), q);
        let short = QuantizedMatrix::from_parts(QuantFormat::Nf4, 2, 64, vec![0; 63], vec![1.0; 2]);
        assert!(short.unwrap_err().contains("63 bytes"));
        let nan = QuantizedMatrix::from_parts(QuantFormat::Int8, 1, 2, vec![0; 2], vec![f32::NAN]);
        assert!(nan.unwrap_err().contains("NaN"));
        assert_eq!(QuantFormat::from_bits(3), None);
    }

    /// Packed into words (odd byte counts padded), codes survive a copy of the words and come
    /// back equal; a word count that does not fit is refused. A lent slot sees its codes while
    /// someone holds them and none after.
    #[test]
    fn packed_codes_round_trip_and_lent_slots_follow_their_holders() {
        // 3 x 5 NF4: 8 bytes of codes (two words), one absmax; int8: 15 bytes (4 words), 3 scales.
        for (format, words) in [(QuantFormat::Nf4, 3), (QuantFormat::Int8, 7)] {
            let q = QuantizedMatrix::quantize(format, &random(15, 3, 1.0), 3, 5);
            let mut packed = Vec::new();
            q.pack_into(&mut packed);
            assert_eq!(packed.len(), words);
            assert_eq!(packed_words(format, 3, 5), words);
            let copied: Vec<f32> = packed.iter().map(|w| f32::from_bits(w.to_bits())).collect();
            assert_eq!(QuantizedMatrix::unpack(format, 3, 5, &copied).unwrap(), q);
            let err = QuantizedMatrix::unpack(format, 3, 5, &copied[1..]).unwrap_err();
            assert!(err.contains("words"), "{err}");
        }
        let q = Arc::new(QuantizedMatrix::quantize(
            QuantFormat::Int8,
            &random(8, 4, 1.0),
            2,
            4,
        ));
        let slot = CodesSlot::lent();
        let shared = slot.clone();
        assert!(shared.codes().is_none());
        let held = q.clone();
        slot.lend(&held);
        assert!(shared.codes().is_some_and(|c| *c == *q));
        drop((held, q));
        assert!(shared.codes().is_none());
    }
}
