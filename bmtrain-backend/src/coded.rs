//! QLoRA's frozen base in the ZeRO trainer ([`crate::trainer::ZeroOptions::quantized`]): the
//! weights a [`QuantizedBase`] names are quantized when their segment is sharded, packed into
//! 32-bit words ([`crate::quant::packed_words`]) so that the f32 collectives move them bit for
//! bit, and sharded over the ranks; a working copy of the segment gathers them and lends each
//! matrix to its layer's [`CodesSlot`] for as long as the copy lives.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::comm::{CommError, Communicator};
use crate::quant::{CodesSlot, QuantFormat, QuantizedMatrix, packed_words};
use crate::zero::{FlatEntry, FlatLayout, HeldCodes, ShardedParams};

/// Frozen weights the trainer keeps as codes (QLoRA): each is quantized from its starting
/// values when its segment is sharded, and its layer reads the codes through its slot, lent
/// while a working copy of the segment exists. They have no gradient, no optimizer state, no
/// f32 copy and no place in checkpoints (they are made again, identically, from the base).
#[derive(Debug, Clone)]
pub struct QuantizedBase {
    /// int8 or NF4.
    pub format: QuantFormat,
    /// By checkpoint name (the model's zoo names).
    pub weights: HashMap<String, QuantizedWeight>,
}

/// One weight of a [`QuantizedBase`].
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    /// Where its layer reads the codes.
    pub slot: CodesSlot,
    /// Whether the zoo tensor is the codes' transpose (a linear layer's `[d_input, d_output]`;
    /// the codes are `[d_output, d_input]`, a row per output channel).
    pub transposed: bool,
}

/// One weight of a segment held as codes.
#[derive(Debug, Clone)]
pub(crate) struct CodesEntry {
    /// Its entry in the segment's layout (name within the segment, shape, owner).
    pub(crate) entry: FlatEntry,
    pub(crate) weight: QuantizedWeight,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Its words in the segment's packed buffer.
    words: Range<usize>,
}

/// A segment's frozen weights held as codes: one rank keeps the matrices, more ranks each keep
/// a slice of the packed words (see [`crate::quant::packed_words`]) and gather them whenever
/// a working copy of the segment is made.
#[derive(Debug, Clone)]
pub(crate) struct SegmentCodes {
    format: QuantFormat,
    /// In the order of the combined layout's entries past its values.
    pub(crate) entries: Vec<CodesEntry>,
    /// One rank: the matrices.
    resident: Vec<Arc<QuantizedMatrix>>,
    /// Several ranks: this rank's slice of the packed words.
    shard: ShardedParams,
}

impl SegmentCodes {
    pub(crate) fn none() -> Self {
        Self {
            format: QuantFormat::Int8,
            entries: Vec::new(),
            resident: Vec::new(),
            shard: ShardedParams::from_slice(FlatLayout::default(), Vec::new(), 1),
        }
    }

    /// Quantizes the weights of `layout` that `base` names (`name_of` gives a layout name's
    /// checkpoint name) out of `full`, and returns the layout and values of the rest, the
    /// codes, and where each coded weight stood among `layout`'s entries.
    pub(crate) fn take(
        layout: FlatLayout,
        full: Vec<f32>,
        base: Option<&QuantizedBase>,
        name_of: impl Fn(&str) -> String,
        (rank, world): (usize, usize),
    ) -> (FlatLayout, Vec<f32>, Self, Vec<usize>) {
        let mut codes = Self::none();
        let Some(base) = base else {
            return (layout, full, codes, Vec::new());
        };
        codes.format = base.format;
        let coded = |entry: &FlatEntry| {
            base.weights
                .get(&name_of(&entry.name))
                .filter(|_| entry.shape.len() == 2)
        };
        if !layout.entries.iter().any(|e| coded(e).is_some()) {
            return (layout, full, codes, Vec::new());
        }
        let (mut rest, mut values) = (FlatLayout::default(), Vec::with_capacity(full.len()));
        let (mut positions, mut matrices, mut words) = (Vec::new(), Vec::new(), 0);
        for (position, entry) in layout.entries.iter().enumerate() {
            let slice = &full[entry.offset..entry.offset + entry.len()];
            let Some(weight) = coded(entry) else {
                let mut kept = entry.clone();
                kept.offset = rest.len;
                rest.len += entry.len();
                rest.entries.push(kept);
                values.extend_from_slice(slice);
                continue;
            };
            let [a, b] = [entry.shape[0], entry.shape[1]];
            let ((rows, cols), matrix) = match weight.transposed {
                true => ((b, a), transpose(slice, a, b)),
                false => ((a, b), slice.to_vec()),
            };
            let matrix = QuantizedMatrix::quantize(base.format, &matrix, rows, cols);
            let len = packed_words(base.format, rows, cols);
            codes.entries.push(CodesEntry {
                entry: entry.clone(),
                weight: weight.clone(),
                rows,
                cols,
                words: words..words + len,
            });
            words += len;
            positions.push(position);
            matrices.push(Arc::new(matrix));
        }
        drop(full);
        if world == 1 {
            codes.resident = matrices;
        } else {
            let mut packed = Vec::with_capacity(words);
            for matrix in &matrices {
                matrix.pack_into(&mut packed);
            }
            let words = FlatLayout {
                entries: Vec::new(),
                len: packed.len(),
            };
            codes.shard = ShardedParams::from_full(words, &packed, rank, world);
        }
        (rest, values, codes, positions)
    }

    /// The segment's codes, whole (gathered from every rank's slice when sharded), each lent to
    /// its layer's slot: they stay there while the returned matrices (or a module holding them)
    /// live.
    pub(crate) fn held(&self, comm: &dyn Communicator) -> Result<Vec<HeldCodes>, CommError> {
        if self.entries.is_empty() {
            return Ok(Vec::new());
        }
        let matrices = match self.resident.is_empty() {
            false => self.resident.clone(),
            true => {
                let words = self.shard.gather(comm)?;
                self.entries
                    .iter()
                    .map(|e| {
                        QuantizedMatrix::unpack(
                            self.format,
                            e.rows,
                            e.cols,
                            &words[e.words.clone()],
                        )
                        .map(Arc::new)
                        .expect("the packed words of codes this trainer made")
                    })
                    .collect()
            }
        };
        Ok(self
            .entries
            .iter()
            .zip(matrices)
            .map(|(entry, matrix)| {
                entry.weight.slot.lend(&matrix);
                HeldCodes {
                    matrix,
                    transposed: entry.weight.transposed,
                }
            })
            .collect())
    }

    /// `combined` (a layout of the values alone) with the coded weights put back where they
    /// stood among the segment's `entries` (`coded_at`, from [`SegmentCodes::take`]), in visit
    /// order, their offsets past the values: `combined.len + k` is the k-th coded weight.
    pub(crate) fn place(
        &self,
        mut combined: FlatLayout,
        coded_at: &[usize],
        entries: usize,
    ) -> FlatLayout {
        if coded_at.is_empty() {
            return combined;
        }
        let mut values = std::mem::take(&mut combined.entries).into_iter();
        let mut coded = self.entries.iter().enumerate();
        combined.entries = (0..entries)
            .map(|position| match coded_at.binary_search(&position) {
                Ok(_) => {
                    let (k, entry) = coded.next().expect("one entry per coded weight");
                    FlatEntry {
                        offset: combined.len + k,
                        ..entry.entry.clone()
                    }
                }
                Err(_) => values.next().expect("one entry per value"),
            })
            .collect();
        combined
    }

    /// Parameters held as codes.
    pub(crate) fn count(&self) -> usize {
        self.entries.iter().map(|e| e.rows * e.cols).sum()
    }

    /// Bytes this rank holds of them.
    pub(crate) fn bytes(&self) -> usize {
        match self.resident.is_empty() {
            false => self.resident.iter().map(|m| m.bytes()).sum(),
            true => 4 * self.shard.local.len(),
        }
    }
}

/// The transpose of a row-major `[rows, cols]` matrix.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}
