//! Text generation with a KV cache: greedy, sampling (temperature, top-k, top-p), repetition
//! penalty and beam search, with the semantics of transformers' `generate` (5.x) so that greedy
//! and beam ids are identical to it.
//!
//! The model side is the [`Decoder`] trait: one step takes the new tokens (the whole left-padded
//! prompt first, then one token per row) and the state of the steps before (the KV cache), and
//! returns the next-token logits. Token choice runs on the host over `[rows, vocab]` logits,
//! which is cheap next to the model step and keeps every rule readable.
//!
//! Batches are left-padded: row `r` of a prompt batch is `pad … pad p₀ … pₙ`, the attention mask
//! hides the padding, and position ids count real tokens only (as transformers derives them from
//! the mask), so a padded row generates exactly what it generates alone.

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use rand::{RngExt, SeedableRng, rngs::StdRng};

use crate::io::DecoderInput;
pub use crate::io::TokenIds;

/// A model that generates: one step from new tokens and the previous state to next-token logits.
pub trait Decoder<B: Backend> {
    /// What the model keeps between steps (the KV cache).
    type State;

    /// Number of token ids.
    fn vocab_size(&self) -> usize;

    /// The longest sequence (prompt + generated) the model can position.
    fn max_positions(&self) -> usize;

    /// Runs the new tokens and returns `[rows, vocab]` logits of each row's last position.
    fn step(
        &self,
        input: &DecoderInput<B>,
        state: Option<Self::State>,
    ) -> (Tensor<B, 2>, Self::State);

    /// Keeps the rows `indices` of the state, in that order (beam search).
    fn reorder(&self, state: &Self::State, indices: Tensor<B, 1, Int>) -> Self::State;
}

/// When beam search stops, as transformers' `early_stopping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `False`: stop when the best running beam, scored at the current length, cannot beat the
    /// worst finished one (transformers' default heuristic).
    #[default]
    Heuristic,
    /// `True`: stop as soon as `num_beams` hypotheses are finished.
    Eager,
    /// `"never"`: the canonical search; with a positive length penalty the best running beam is
    /// scored at the maximum length.
    Never,
}

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoding {
    /// The most likely token (ties: the lowest id).
    Greedy,
    /// Sampling from the softmax after temperature, top-k and top-p, in that order.
    Sample {
        /// Logits are divided by it; must be positive.
        temperature: f32,
        /// Keep only the `k` most likely tokens (ties at the k-th score are kept).
        top_k: Option<usize>,
        /// Keep the smallest set of most likely tokens whose probability reaches `p`.
        top_p: Option<f32>,
        /// Seed of the sampler.
        seed: u64,
    },
    /// Beam search.
    Beam {
        /// Number of beams (≥ 2).
        num_beams: usize,
        /// Finished hypotheses are scored `sum log p / generated_len^length_penalty`.
        length_penalty: f32,
        /// Stopping rule.
        early_stopping: EarlyStopping,
    },
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Tokens to add after the prompt at most.
    pub max_new_tokens: usize,
    /// Token choice.
    pub decoding: Decoding,
    /// CTRL's penalty (1 = none): a seen token's logit is divided by it when positive and
    /// multiplied when negative.
    pub repetition_penalty: f32,
    /// Ids that end a row.
    pub eos_token_ids: Vec<u32>,
    /// Id written after a row has ended, and in the left padding.
    pub pad_token_id: u32,
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize, eos_token_ids: Vec<u32>, pad_token_id: u32) -> Self {
        Self {
            max_new_tokens,
            decoding: Decoding::Greedy,
            repetition_penalty: 1.0,
            eos_token_ids,
            pad_token_id,
        }
    }
}

/// Errors of [`generate`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GenerationError {
    /// Nothing to start from.
    #[error("prompt {} is empty: generation needs at least one token to start from", .row + 1)]
    EmptyPrompt {
        /// Row of the batch, from 0.
        row: usize,
    },
    /// A prompt id the model has no embedding for.
    #[error(
        "prompt {} has token id {id}, but the model's vocabulary has {vocab} ids (0..{vocab})",
        .row + 1
    )]
    UnknownToken {
        /// Row of the batch.
        row: usize,
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// Prompt longer than the context.
    #[error("prompt of {len} tokens does not fit the model's context of {max} positions")]
    PromptTooLong {
        /// Longest prompt, in tokens.
        len: usize,
        /// Context size.
        max: usize,
    },
    /// A setting out of its range.
    #[error("generation setting {name}: {message}")]
    Setting {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The result of [`generate`], laid out as transformers returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// `[rows][prompt_width + generated]`: the left-padded prompts, then the new tokens; rows that
    /// ended early are filled with the pad id.
    pub sequences: Vec<Vec<u32>>,
    /// Width of the padded prompt block at the start of every row.
    pub prompt_width: usize,
}

impl Generated {
    /// The new tokens of `row`, without padding and without anything after its end-of-text.
    pub fn new_tokens(&self, row: usize, eos_token_ids: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        for &id in &self.sequences[row][self.prompt_width..] {
            out.push(id);
            if eos_token_ids.contains(&id) {
                break;
            }
        }
        out
    }
}

/// Generates continuations of `prompts` (one row each, unpadded). `on_tokens` is called after
/// every greedy or sampling step with each row's new token (`None` once the row has ended), so a
/// caller can stream; beam search calls it once per token of the best hypothesis at the end.
pub fn generate<B: Backend, M: Decoder<B>>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    device: &B::Device,
    mut on_tokens: impl FnMut(&[Option<u32>]),
) -> Result<Generated, GenerationError> {
    validate(model, prompts, config)?;
    let batch = LeftPadded::new(prompts, config.pad_token_id);
    let generated = match &config.decoding {
        Decoding::Beam {
            num_beams,
            length_penalty,
            early_stopping,
        } => {
            let generated = beam_search(
                model,
                &batch,
                config,
                BeamSettings {
                    num_beams: *num_beams,
                    length_penalty: *length_penalty,
                    early_stopping: *early_stopping,
                },
                device,
            );
            for column in batch.width..generated.sequences[0].len() {
                let tokens: Vec<Option<u32>> = generated
                    .sequences
                    .iter()
                    .enumerate()
                    .map(|(row, s)| {
                        let ended = s[batch.width..column]
                            .iter()
                            .any(|t| config.eos_token_ids.contains(t));
                        (!ended && row < prompts.len()).then_some(s[column])
                    })
                    .collect();
                on_tokens(&tokens);
            }
            generated
        }
        _ => sample(model, &batch, config, device, &mut on_tokens),
    };
    Ok(generated)
}

/// Checks that every prompt has a token and only ids below `vocab`.
pub fn check_prompt_ids(prompts: &[Vec<u32>], vocab: usize) -> Result<(), GenerationError> {
    for (row, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return Err(GenerationError::EmptyPrompt { row });
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerationError::UnknownToken { row, id, vocab });
        }
    }
    Ok(())
}

/// Checks prompts and settings before anything runs: what [`generate`] refuses, with the reason.
pub fn validate<B: Backend, M: Decoder<B>>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<(), GenerationError> {
    check_prompt_ids(prompts, model.vocab_size())?;
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max = model.max_positions();
    if len > max {
        return Err(GenerationError::PromptTooLong { len, max });
    }
    let setting = |name, message: String| Err(GenerationError::Setting { name, message });
    if config.repetition_penalty.is_nan() || config.repetition_penalty <= 0.0 {
        return setting(
            "repetition_penalty",
            format!("{} must be positive", config.repetition_penalty),
        );
    }
    match &config.decoding {
        Decoding::Greedy => {}
        Decoding::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } => {
            if temperature.is_nan() || *temperature <= 0.0 {
                return setting(
                    "temperature",
                    format!("{temperature} must be positive (use greedy decoding for 0)"),
                );
            }
            if *top_k == Some(0) {
                return setting("top_k", "must be at least 1".into());
            }
            if let Some(p) = top_p
                && !(*p > 0.0 && *p <= 1.0)
            {
                return setting("top_p", format!("{p} is not in (0, 1]"));
            }
        }
        Decoding::Beam {
            num_beams,
            length_penalty,
            ..
        } => {
            if *num_beams < 2 {
                return setting(
                    "num_beams",
                    format!("{num_beams}: beam search needs at least 2 beams"),
                );
            }
            if !length_penalty.is_finite() {
                return setting("length_penalty", "must be finite".into());
            }
        }
    }
    Ok(())
}

/// The prompt batch, left-padded to one width.
struct LeftPadded {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
    width: usize,
}

impl LeftPadded {
    fn new(prompts: &[Vec<u32>], pad: u32) -> Self {
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let ids = prompts
            .iter()
            .map(|p| {
                let mut row = vec![pad; width - p.len()];
                row.extend(p);
                row
            })
            .collect();
        let mask = prompts
            .iter()
            .map(|p| {
                let mut row = vec![0; width - p.len()];
                row.extend(std::iter::repeat_n(1, p.len()));
                row
            })
            .collect();
        Self { ids, mask, width }
    }

    /// Each row `times` times in a row (beam search's `repeat_interleave`).
    fn repeated(&self, times: usize) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        let repeat = |rows: &Vec<Vec<u32>>| {
            rows.iter()
                .flat_map(|r| std::iter::repeat_n(r.clone(), times))
                .collect()
        };
        (repeat(&self.ids), repeat(&self.mask))
    }
}

/// Builds model inputs step by step: the whole prompt first, then one token per row, with the
/// attention mask growing and position ids counting real tokens only.
struct StepInputs {
    mask: Vec<Vec<u32>>,
    next_position: Vec<i64>,
}

impl StepInputs {
    fn prompt<B: Backend>(
        ids: &[Vec<u32>],
        mask: Vec<Vec<u32>>,
        device: &B::Device,
    ) -> (Self, DecoderInput<B>) {
        // transformers: position_ids = cumsum(mask) - 1, with padding at 0.
        let positions: Vec<Vec<i64>> = mask
            .iter()
            .map(|row| {
                let mut seen = 0i64;
                row.iter()
                    .map(|&m| {
                        seen += m as i64;
                        if m == 0 { 0 } else { seen - 1 }
                    })
                    .collect()
            })
            .collect();
        let next_position = positions
            .iter()
            .map(|p| p.last().copied().unwrap_or(-1) + 1)
            .collect();
        let input = DecoderInput {
            input_ids: int_tensor(ids, device),
            attention_mask: Some(int_tensor(&mask, device)),
            position_ids: Some(int_tensor_i64(&positions, device)),
        };
        (
            Self {
                mask,
                next_position,
            },
            input,
        )
    }

    /// The inputs for one new token per row.
    fn next<B: Backend>(&mut self, tokens: &[u32], device: &B::Device) -> DecoderInput<B> {
        for row in &mut self.mask {
            row.push(1);
        }
        let positions: Vec<Vec<i64>> = self.next_position.iter().map(|&p| vec![p]).collect();
        for p in &mut self.next_position {
            *p += 1;
        }
        let ids: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
        DecoderInput {
            input_ids: int_tensor(&ids, device),
            attention_mask: Some(int_tensor(&self.mask, device)),
            position_ids: Some(int_tensor_i64(&positions, device)),
        }
    }

    /// Keeps rows `indices` (beam search).
    fn reorder(&mut self, indices: &[usize]) {
        self.mask = indices.iter().map(|&i| self.mask[i].clone()).collect();
        self.next_position = indices.iter().map(|&i| self.next_position[i]).collect();
    }
}

fn int_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let wide: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| r.iter().map(|&x| x as i64).collect())
        .collect();
    int_tensor_i64(&wide, device)
}

fn int_tensor_i64<B: Backend>(rows: &[Vec<i64>], device: &B::Device) -> Tensor<B, 2, Int> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}

fn host_rows<B: Backend>(logits: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [rows, vocab] = logits.dims();
    let flat: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("logits are floats");
    debug_assert_eq!(flat.len(), rows * vocab);
    flat.chunks(vocab).map(<[f32]>::to_vec).collect()
}

// ---------------------------------------------------------------------------------------------
// Logit processing (transformers' LogitsProcessor / LogitsWarper, one row at a time)

/// Penalises every id that occurs in `sequence` (prompt, padding and generated tokens alike, as
/// transformers' `RepetitionPenaltyLogitsProcessor`).
fn apply_repetition_penalty(scores: &mut [f32], sequence: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &id in sequence {
        seen[id as usize] = true;
    }
    for (score, _) in scores.iter_mut().zip(&seen).filter(|(_, s)| **s) {
        *score = if *score < 0.0 {
            *score * penalty
        } else {
            *score / penalty
        };
    }
}

/// Keeps the `k` highest scores (and any tied with the k-th); the rest become −∞.
fn apply_top_k(scores: &mut [f32], k: usize) {
    if k >= scores.len() {
        return;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let threshold = sorted[k - 1];
    for s in scores.iter_mut().filter(|s| **s < threshold) {
        *s = f32::NEG_INFINITY;
    }
}

/// Nucleus filtering: keeps the most likely tokens whose cumulative probability reaches `p`
/// (at least one), as transformers' `TopPLogitsWarper`.
fn apply_top_p(scores: &mut [f32], p: f32) {
    if p >= 1.0 {
        return;
    }
    let probs = softmax(scores);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Ascending, as transformers sorts; the tokens whose cumulative mass stays ≤ 1 − p go.
    order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
    let mut cumulative = 0.0f32;
    for (rank, &index) in order.iter().enumerate() {
        cumulative += probs[index];
        if cumulative > 1.0 - p || rank == order.len() - 1 {
            break;
        }
        scores[index] = f32::NEG_INFINITY;
    }
}

fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / total).collect()
}

fn log_softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = scores.iter().map(|s| (s - max).exp()).sum();
    let log_total = total.ln();
    scores.iter().map(|s| s - max - log_total).collect()
}

/// The first index of the highest score (`torch.argmax`).
fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best as u32
}

fn draw(probs: &[f32], rng: &mut StdRng) -> u32 {
    let target = rng.random::<f32>() * probs.iter().sum::<f32>();
    let mut cumulative = 0.0;
    let mut last_possible = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last_possible = i;
            cumulative += p;
            if target < cumulative {
                return i as u32;
            }
        }
    }
    last_possible as u32
}

// ---------------------------------------------------------------------------------------------
// Greedy and sampling (transformers' `_sample`)

fn sample<B: Backend, M: Decoder<B>>(
    model: &M,
    batch: &LeftPadded,
    config: &GenerationConfig,
    device: &B::Device,
    on_tokens: &mut impl FnMut(&[Option<u32>]),
) -> Generated {
    let rows = batch.ids.len();
    let max_len = (batch.width + config.max_new_tokens).min(model.max_positions().max(batch.width));
    let mut sequences = batch.ids.clone();
    let mut unfinished = vec![true; rows];
    let mut rng = match &config.decoding {
        Decoding::Sample { seed, .. } => StdRng::seed_from_u64(*seed),
        _ => StdRng::seed_from_u64(0),
    };
    let (mut steps, input) = StepInputs::prompt::<B>(&batch.ids, batch.mask.clone(), device);
    let (mut logits, mut state) = model.step(&input, None);
    while sequences[0].len() < max_len {
        let mut next = Vec::with_capacity(rows);
        for (row, mut scores) in host_rows(logits).into_iter().enumerate() {
            apply_repetition_penalty(&mut scores, &sequences[row], config.repetition_penalty);
            let token = match &config.decoding {
                Decoding::Sample {
                    temperature,
                    top_k,
                    top_p,
                    ..
                } => {
                    for s in scores.iter_mut() {
                        *s /= temperature;
                    }
                    if let Some(k) = top_k {
                        apply_top_k(&mut scores, *k);
                    }
                    if let Some(p) = top_p {
                        apply_top_p(&mut scores, *p);
                    }
                    draw(&softmax(&scores), &mut rng)
                }
                _ => argmax(&scores),
            };
            next.push(if unfinished[row] {
                token
            } else {
                config.pad_token_id
            });
        }
        let streamed: Vec<Option<u32>> = next
            .iter()
            .zip(&unfinished)
            .map(|(&t, &u)| u.then_some(t))
            .collect();
        on_tokens(&streamed);
        for (row, &token) in next.iter().enumerate() {
            sequences[row].push(token);
            if config.eos_token_ids.contains(&token) {
                unfinished[row] = false;
            }
        }
        if unfinished.iter().all(|u| !u) || sequences[0].len() >= max_len {
            break;
        }
        let input = steps.next::<B>(&next, device);
        (logits, state) = model.step(&input, Some(state));
    }
    Generated {
        sequences,
        prompt_width: batch.width,
    }
}

// ---------------------------------------------------------------------------------------------
// Beam search (transformers' vectorised `_beam_search`, one batch item at a time)

struct BeamSettings {
    num_beams: usize,
    length_penalty: f32,
    early_stopping: EarlyStopping,
}

/// A finished or running hypothesis.
#[derive(Debug, Clone)]
struct Hypothesis {
    tokens: Vec<u32>,
    score: f32,
    finished: bool,
}

/// transformers marks "no hypothesis" and "must not be picked" with this score.
const NEG: f32 = -1.0e9;

fn beam_search<B: Backend, M: Decoder<B>>(
    model: &M,
    batch: &LeftPadded,
    config: &GenerationConfig,
    settings: BeamSettings,
    device: &B::Device,
) -> Generated {
    let BeamSettings {
        num_beams,
        length_penalty,
        early_stopping,
    } = settings;
    let items = batch.ids.len();
    let prompt_len = batch.width;
    let max_len = (prompt_len + config.max_new_tokens).min(model.max_positions().max(prompt_len));
    let n_eos = config.eos_token_ids.len();
    let keep = 2.max(1 + n_eos) * num_beams;
    let fill = if config.pad_token_id != 0 {
        config.pad_token_id
    } else {
        config.eos_token_ids.first().copied().unwrap_or(0)
    };

    // running[item][beam]: beam 0 starts at score 0, the copies at NEG so step one expands one beam.
    let mut running: Vec<Vec<Hypothesis>> = batch
        .ids
        .iter()
        .map(|prompt| {
            (0..num_beams)
                .map(|b| Hypothesis {
                    tokens: prompt.clone(),
                    score: if b == 0 { 0.0 } else { NEG },
                    finished: false,
                })
                .collect()
        })
        .collect();
    let mut finished: Vec<Vec<Hypothesis>> = batch
        .ids
        .iter()
        .map(|prompt| {
            vec![
                Hypothesis {
                    tokens: prompt.clone(),
                    score: NEG,
                    finished: false,
                };
                num_beams
            ]
        })
        .collect();
    let mut improvable = vec![true; items];

    let (ids, mask) = batch.repeated(num_beams);
    let (mut steps, input) = StepInputs::prompt::<B>(&ids, mask, device);
    let (mut logits, mut state) = model.step(&input, None);
    let mut cur_len = prompt_len;
    loop {
        let rows = host_rows(logits);
        let mut all_hit = true;
        let mut sources = Vec::with_capacity(items * num_beams);
        let mut next_tokens = Vec::with_capacity(items * num_beams);
        for item in 0..items {
            // Accumulated log-probabilities of every (beam, token) continuation.
            let mut candidates: Vec<(f32, usize, u32)> = Vec::new();
            for beam in 0..num_beams {
                let row = &rows[item * num_beams + beam];
                let mut log_probs = log_softmax(row);
                apply_repetition_penalty(
                    &mut log_probs,
                    &running[item][beam].tokens,
                    config.repetition_penalty,
                );
                let base = running[item][beam].score;
                candidates.extend(
                    log_probs
                        .iter()
                        .enumerate()
                        .map(|(token, lp)| (lp + base, beam, token as u32)),
                );
            }
            let top = top_by_score(candidates, keep, |c| c.0);
            let hits: Vec<bool> = top
                .iter()
                .map(|(_, _, token)| config.eos_token_ids.contains(token) || cur_len + 1 >= max_len)
                .collect();
            all_hit &= hits.iter().all(|h| *h);

            // Next running beams: the best continuations that did not just finish.
            let next_running = top_by_score(
                top.iter()
                    .zip(&hits)
                    .map(|(c, &hit)| (c.0 + if hit { NEG } else { 0.0 }, c.1, c.2))
                    .collect(),
                num_beams,
                |c| c.0,
            );

            // Finished hypotheses: the top `num_beams` candidates that just finished, when they can
            // still improve the set.
            let generated = (cur_len + 1 - prompt_len) as f32;
            let full =
                finished[item].iter().all(|h| h.finished) && early_stopping == EarlyStopping::Eager;
            let mut merged = finished[item].clone();
            for (rank, ((score, beam, token), &hit)) in top.iter().zip(&hits).enumerate() {
                let just_finished = hit && rank < num_beams;
                let mut score = score / generated.powf(length_penalty);
                if full {
                    score += NEG;
                }
                if !improvable[item] {
                    score += NEG;
                }
                if !just_finished {
                    score += NEG;
                }
                let mut tokens = running[item][*beam].tokens.clone();
                tokens.push(*token);
                merged.push(Hypothesis {
                    tokens,
                    score,
                    finished: just_finished,
                });
            }
            finished[item] = top_by_score(merged, num_beams, |h| h.score);

            let mut new_running = Vec::with_capacity(num_beams);
            for (score, beam, token) in next_running {
                let mut tokens = running[item][beam].tokens.clone();
                tokens.push(token);
                new_running.push(Hypothesis {
                    tokens,
                    score,
                    finished: false,
                });
                sources.push(item * num_beams + beam);
                next_tokens.push(token);
            }
            running[item] = new_running;
        }
        cur_len += 1;

        // transformers' `_check_early_stop_heuristic`, per item.
        for item in 0..items {
            let best_len = if early_stopping == EarlyStopping::Never && length_penalty > 0.0 {
                max_len - prompt_len
            } else {
                cur_len - prompt_len
            };
            let best_possible = running[item][0].score / (best_len as f32).powf(length_penalty);
            let all_finished = finished[item].iter().all(|h| h.finished);
            let worst = if all_finished {
                finished[item]
                    .iter()
                    .map(|h| h.score)
                    .fold(f32::INFINITY, f32::min)
            } else {
                NEG
            };
            improvable[item] &= best_possible > worst;
        }
        let improvement_possible = improvable.iter().any(|i| *i);
        let everything_finished = finished.iter().flatten().all(|h| h.finished);
        let open = !(everything_finished && early_stopping == EarlyStopping::Eager);
        if !(improvement_possible && open && !all_hit) {
            break;
        }
        state = model.reorder(&state, int_tensor_1d::<B>(&sources, device));
        steps.reorder(&sources);
        let input = steps.next::<B>(&next_tokens, device);
        (logits, state) = model.step(&input, Some(state));
    }

    let best: Vec<Vec<u32>> = finished.into_iter().map(|f| f[0].tokens.clone()).collect();
    let width = best.iter().map(Vec::len).max().unwrap_or(prompt_len);
    let sequences = best
        .into_iter()
        .map(|mut tokens| {
            tokens.resize(width, fill);
            tokens
        })
        .collect();
    Generated {
        sequences,
        prompt_width: prompt_len,
    }
}

fn int_tensor_1d<B: Backend>(values: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let values: Vec<i64> = values.iter().map(|&v| v as i64).collect();
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
}

/// The `k` items with the highest score, best first; equal scores keep their input order.
fn top_by_score<T>(mut items: Vec<T>, k: usize, score: impl Fn(&T) -> f32) -> Vec<T> {
    items.sort_by(|a, b| score(b).total_cmp(&score(a)));
    items.truncate(k);
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores() {
        let mut scores = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut scores, &[0, 1, 1], 2.0);
        assert_eq!(scores, [1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties_at_the_threshold() {
        let mut scores = vec![1.0, 3.0, 2.0, 2.0, 0.0];
        apply_top_k(&mut scores, 2);
        let kept: Vec<bool> = scores.iter().map(|s| s.is_finite()).collect();
        assert_eq!(kept, [false, true, true, true, false]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.3, 0.2 (as logs): p = 0.7 keeps 0.5 and 0.3; p = 0.5 keeps 0.5 only.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let mut scores = logits.clone();
        apply_top_p(&mut scores, 0.7);
        assert_eq!(scores.iter().filter(|s| s.is_finite()).count(), 2);
        assert!(scores[2].is_infinite());
        let mut scores = logits.clone();
        apply_top_p(&mut scores, 0.45);
        assert_eq!(scores.iter().filter(|s| s.is_finite()).count(), 1);
        assert!(scores[0].is_finite());
    }

    #[test]
    fn draws_follow_the_distribution() {
        let mut rng = StdRng::seed_from_u64(7);
        let probs = [0.1f32, 0.0, 0.6, 0.3];
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[draw(&probs, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[1], 0);
        for (count, p) in counts.iter().zip(probs) {
            let freq = *count as f32 / 20_000.0;
            assert!((freq - p).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn left_padding_and_positions_count_real_tokens() {
        let batch = LeftPadded::new(&[vec![5, 6, 7], vec![8]], 0);
        assert_eq!(batch.ids, [vec![5, 6, 7], vec![0, 0, 8]]);
        assert_eq!(batch.mask, [vec![1, 1, 1], vec![0, 0, 1]]);
        let device = Default::default();
        let (steps, input) =
            StepInputs::prompt::<bmtrain_backend::Cpu>(&batch.ids, batch.mask.clone(), &device);
        let positions: Vec<i64> = input
            .position_ids
            .unwrap()
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        assert_eq!(positions, [0, 1, 2, 0, 0, 0]);
        assert_eq!(steps.next_position, [3, 1]);
    }
}
