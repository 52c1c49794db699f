//! Greedy generation over the exported graphs, step for step what transformers'
//! `generate(do_sample=False)` does (`export/runtime.py` is the Python twin):
//!
//! 1. left-pad the prompts; `<image>` ids are looked up as 0 and their rows replaced by the image
//!    features, in order;
//! 2. positions are `cumsum(mask) - 1` with pads at 0, plus 1 (PaliGemma counts from 1);
//! 3. one prefill run over all prompt positions (token type 0: the prefix-LM block);
//! 4. then one run per token (type 1) with the KV cache; a row that emitted `<eos>` is fed `<pad>`
//!    with its mask still growing, so every row sees exactly what it would see alone. A row that
//!    reached its own max_new_tokens, or that the caller stops (a client that went away), is fed
//!    `<pad>` the same way: rows never attend to each other, so the others' tokens do not change.

use std::time::{Duration, Instant};

use ndarray::{concatenate, s, Array2, Array3, ArrayView3, Axis};

use crate::session::{ModelError, ModelSessions};

/// One prepared request: pixel values f32[3,S,S] and prompt ids (see `prompt`).
pub struct Prepared {
    pub pixel_values: Array3<f32>,
    pub input_ids: Vec<i64>,
    /// `<eos>` is not chosen before this many tokens (transformers' `min_new_tokens`: its logits
    /// are set to -inf, so the argmax is taken over the other ids).
    pub min_new_tokens: usize,
    /// The row stops after this many tokens and is fed `<pad>` from then on, while longer rows
    /// of the batch go on.
    pub max_new_tokens: usize,
}

/// Generated ids of one request, up to and without `<eos>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub token_ids: Vec<i64>,
    /// `true` when `<eos>` ended the row, `false` when max_new_tokens did.
    pub stopped_by_eos: bool,
    /// `true` when the caller's `on_token` stopped the row.
    pub stopped: bool,
}

impl Generated {
    fn done(&self, max_new_tokens: usize) -> bool {
        self.stopped_by_eos || self.stopped || self.token_ids.len() >= max_new_tokens
    }
}

/// Where the time of one `generate` call went. A batch shares one set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// The vision encoder run.
    pub vision: Duration,
    /// Embedding lookup, image splice and the prefill decoder run, up to the first token.
    pub prefill: Duration,
    /// Each decode step after the first token: embedding, decoder run, argmax.
    pub steps: Vec<Duration>,
}

impl Timings {
    /// Rows x decode steps per second of decode time (None before any decode step).
    pub fn decode_tokens_per_s(&self, rows: usize) -> Option<f64> {
        let seconds: f64 = self.steps.iter().map(Duration::as_secs_f64).sum();
        (seconds > 0.0).then(|| (rows * self.steps.len()) as f64 / seconds)
    }
}

/// The generated rows of a batch, in order, and the batch's timings.
#[derive(Debug, Clone)]
pub struct Generation {
    pub rows: Vec<Generated>,
    pub timings: Timings,
}

/// The padded prompt batch: ids, mask and 1-based positions, i64[B,L] each.
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedBatch {
    pub input_ids: Array2<i64>,
    pub attention_mask: Array2<i64>,
    pub position_ids: Array2<i64>,
}

/// Left-pads `prompts` with `pad_id` and derives positions as transformers does.
pub fn pad_left(prompts: &[&[i64]], pad_id: i64) -> PaddedBatch {
    let len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut input_ids = Array2::from_elem((prompts.len(), len), pad_id);
    let mut attention_mask = Array2::zeros((prompts.len(), len));
    let mut position_ids = Array2::ones((prompts.len(), len));
    for (row, prompt) in prompts.iter().enumerate() {
        let start = len - prompt.len();
        for (i, &id) in prompt.iter().enumerate() {
            input_ids[[row, start + i]] = id;
            attention_mask[[row, start + i]] = 1;
            position_ids[[row, start + i]] = i as i64 + 1;
        }
    }
    PaddedBatch {
        input_ids,
        attention_mask,
        position_ids,
    }
}

/// Replaces the rows of `<image>` positions in `embeds` f32[B,L,H] with `features` f32[B,N,H].
pub fn splice_image_features(
    embeds: &mut Array3<f32>,
    input_ids: &Array2<i64>,
    features: ArrayView3<f32>,
    image_token_id: i64,
) -> Result<(), ModelError> {
    for (row, ids) in input_ids.outer_iter().enumerate() {
        let positions: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == image_token_id)
            .map(|(i, _)| i)
            .collect();
        let available = features.shape()[1];
        if positions.len() != available {
            return Err(ModelError::Run {
                graph: "vision_encoder",
                message: format!(
                    "prompt row {row} holds {} <image> tokens but the vision graph gives {available} features",
                    positions.len()
                ),
            });
        }
        for (k, pos) in positions.into_iter().enumerate() {
            embeds.slice_mut(s![row, pos, ..]).assign(&features.slice(s![row, k, ..]));
        }
    }
    Ok(())
}

/// Index of the first maximum, as torch.argmax and numpy.argmax pick on ties, with the `excluded`
/// ids left out as if their logits were -inf (transformers' min_new_tokens masks `<eos>` so).
fn argmax(row: ndarray::ArrayView1<f32>, excluded: &[i64]) -> i64 {
    let mut best: Option<usize> = None;
    for (i, &v) in row.iter().enumerate() {
        if !excluded.contains(&(i as i64)) && best.is_none_or(|b| v > row[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as i64
}

/// Milliseconds, as timings are reported.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Mean of `steps` in milliseconds (0 for none; not the -0.0 an empty float sum gives).
pub fn mean_ms(steps: &[Duration]) -> f64 {
    if steps.is_empty() {
        return 0.0;
    }
    steps.iter().map(|&d| ms(d)).sum::<f64>() / steps.len() as f64
}

/// Runs `batch` to completion. `on_token(row, id)` sees each new id of an unfinished row as soon
/// as it is chosen (for streaming); `<eos>` is not passed on. It returns whether the row goes on:
/// `false` stops it as `<eos>` would, marked [`Generated::stopped`].
pub fn generate(
    sessions: &mut ModelSessions,
    batch: &[Prepared],
    mut on_token: impl FnMut(usize, i64) -> bool,
) -> Result<Generation, ModelError> {
    let m = sessions.manifest();
    let (pad_id, image_token_id, eos_ids) = (m.pad_token_id, m.image_token_id, m.eos_token_id.clone());
    let mut cache = sessions.new_cache(batch.len())?;
    let rows = batch.len();
    let prompts: Vec<&[i64]> = batch.iter().map(|r| r.input_ids.as_slice()).collect();
    let padded = pad_left(&prompts, pad_id);

    let pixels: Vec<_> = batch.iter().map(|r| r.pixel_values.view().insert_axis(Axis(0))).collect();
    let pixel_values = concatenate(Axis(0), &pixels).map_err(|e| ModelError::Run {
        graph: "vision_encoder",
        message: format!("pixel values of different sizes in one batch: {e}"),
    })?;
    let mut timings = Timings::default();
    let started = Instant::now();
    let features = sessions.encode_image(pixel_values)?;
    timings.vision = started.elapsed();
    let mut step_started = Instant::now();
    let lookup = padded.input_ids.mapv(|t| if t == image_token_id { 0 } else { t });
    let mut embeds = sessions.embed_tokens(lookup.view())?;
    splice_image_features(&mut embeds, &padded.input_ids, features.view(), image_token_id)?;

    let mut mask = padded.attention_mask;
    let mut token_types = Array2::<i64>::zeros(mask.raw_dim());
    let mut positions = padded.position_ids;
    let mut out = vec![
        Generated {
            token_ids: Vec::new(),
            stopped_by_eos: false,
            stopped: false,
        };
        rows
    ];
    let longest = batch.iter().map(|r| r.max_new_tokens).max().unwrap_or(0);
    for step in 0..longest {
        let logits = sessions.decode(embeds.view(), mask.view(), token_types.view(), positions.view(), &mut cache)?;
        let mut next = Array2::<i64>::from_elem((rows, 1), pad_id);
        for (row, generated) in out.iter_mut().enumerate() {
            if generated.done(batch[row].max_new_tokens) {
                continue;
            }
            let excluded: &[i64] = if step < batch[row].min_new_tokens { &eos_ids } else { &[] };
            let token = argmax(logits.row(row), excluded);
            next[[row, 0]] = token;
            if eos_ids.contains(&token) {
                generated.stopped_by_eos = true;
            } else {
                generated.token_ids.push(token);
                generated.stopped = !on_token(row, token);
            }
        }
        let finished = out.iter().zip(batch).all(|(g, r)| g.done(r.max_new_tokens));
        if step == 0 {
            timings.prefill = step_started.elapsed();
        } else {
            timings.steps.push(step_started.elapsed());
        }
        if finished {
            break;
        }
        step_started = Instant::now();
        embeds = sessions.embed_tokens(next.view())?;
        let ones = Array2::<i64>::ones((rows, 1));
        mask = concatenate(Axis(1), &[mask.view(), ones.view()]).map_err(shape_error("attention_mask"))?;
        token_types = concatenate(Axis(1), &[token_types.view(), ones.view()]).map_err(shape_error("token_type_ids"))?;
        positions = positions.slice(s![.., -1..]).mapv(|p| p + 1);
    }
    Ok(Generation { rows: out, timings })
}

fn shape_error(what: &'static str) -> impl Fn(ndarray::ShapeError) -> ModelError {
    move |source| ModelError::Shape { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_gives_one_based_positions_and_pads_at_one() {
        let a = [7, 8, 9];
        let b = [5];
        let p = pad_left(&[&a, &b], 0);
        assert_eq!(p.input_ids.row(1).to_vec(), vec![0, 0, 5]);
        assert_eq!(p.attention_mask.row(1).to_vec(), vec![0, 0, 1]);
        // transformers: cumsum(mask) - 1, pads set to 0, then + 1.
        assert_eq!(p.position_ids.row(0).to_vec(), vec![1, 2, 3]);
        assert_eq!(p.position_ids.row(1).to_vec(), vec![1, 1, 1]);
    }

    #[test]
    fn the_mean_of_no_steps_is_a_plain_zero() {
        assert!(mean_ms(&[]).is_sign_positive() && mean_ms(&[]) == 0.0);
        assert_eq!(mean_ms(&[Duration::from_millis(2), Duration::from_millis(4)]), 3.0);
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        let v = ndarray::arr1(&[0.5f32, 2.0, 2.0, -1.0]);
        assert_eq!(argmax(v.view(), &[]), 1);
    }

    #[test]
    fn excluded_ids_are_never_the_argmax() {
        let v = ndarray::arr1(&[0.5f32, 2.0, 1.0, 2.0]);
        assert_eq!(argmax(v.view(), &[1]), 3);
        assert_eq!(argmax(v.view(), &[1, 3]), 2);
        assert_eq!(argmax(v.view(), &[]), 1);
    }

    #[test]
    fn image_rows_are_spliced_in_order_and_counts_checked() {
        let ids = ndarray::arr2(&[[9, 9, 2, 4]]);
        let mut embeds = Array3::<f32>::zeros((1, 4, 2));
        let features = ndarray::arr3(&[[[1.0f32, 1.0], [2.0, 2.0]]]);
        splice_image_features(&mut embeds, &ids, features.view(), 9).unwrap();
        assert_eq!(embeds.slice(s![0, .., 0]).to_vec(), vec![1.0, 2.0, 0.0, 0.0]);
        let short = ndarray::arr2(&[[9, 2, 4, 4]]);
        assert!(splice_image_features(&mut embeds, &short, features.view(), 9).is_err());
    }
}
