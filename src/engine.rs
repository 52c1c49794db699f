//! Greedy generation, step for step what transformers' `generate(do_sample=False)` does
//! (`export/runtime.py` is the Python twin), in an engine that requests join at any step and
//! leave the moment they end.
//!
//! Sessions and model facts live in [`ModelSessions`]; the per-request state lives here, as
//! onnxruntime-genai splits its `Model` from its `State`:
//!
//! - [`Engine::admit`] runs one request's vision encoder and prefill on its own (batch 1, so its
//!   first token is the one it gets alone), then adds its KV cache to the batch's;
//! - [`Engine::step`] decodes one token for every live row in one decoder run;
//! - a row leaves at `<eos>`, at its own max_new_tokens, or when [`Engine::release`] drops it.
//!
//! The batch cache of the portable decoder is `[R,KVH,P,D]` per layer with each row's positions
//! right-aligned: a row shorter than `P` has left pads, hidden by its `attention_mask` (0) as in
//! transformers' left-padded batches, and its position ids are its own (1-based, pads aside), so
//! every row sees exactly what it sees alone. The cache is copied when a row joins or leaves,
//! never because another row is still running: a finished row is removed, not fed `<pad>`, and
//! pad columns no remaining row needs are dropped with it.

use std::time::{Duration, Instant};

use ndarray::{s, Array2, Array3, ArrayView1, ArrayView3, Axis};

use crate::session::{CacheRow, KvCache, ModelError, ModelSessions, SlotCache, SlotSource};

/// One prepared request: pixel values f32[3,S,S] and prompt ids (see `prompt`).
pub struct Prepared {
    pub pixel_values: Array3<f32>,
    pub input_ids: Vec<i64>,
    /// `<eos>` is not chosen before this many tokens (transformers' `min_new_tokens`: its logits
    /// are set to -inf, so the argmax is taken over the other ids).
    pub min_new_tokens: usize,
    /// The row ends after this many tokens (`<eos>` included) and leaves the batch.
    pub max_new_tokens: usize,
}

/// Generated ids of one request, up to and without `<eos>`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generated {
    pub token_ids: Vec<i64>,
    /// `true` when `<eos>` ended the row, `false` when max_new_tokens did.
    pub stopped_by_eos: bool,
    pub timings: Timings,
}

/// Where one request's time went: its own vision and prefill runs, and each decode step it took
/// part in (a step runs every live row of the batch at once).
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

/// A request's row in the engine, from [`Engine::admit`] until it ends or is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(u64);

/// What one row produced in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Emitted {
    pub slot: SlotId,
    /// The chosen id; `None` for `<eos>`, which is not part of the answer.
    pub token: Option<i64>,
    /// The row has ended (`<eos>`, or its max_new_tokens reached) and left the engine.
    pub done: bool,
}

/// A request just admitted: its first token and the time its own runs took.
#[derive(Debug, Clone, Copy)]
pub struct Admitted {
    pub first: Emitted,
    /// The vision encoder run.
    pub vision: Duration,
    /// Embedding, image splice and the prefill decoder run, up to the first token.
    pub prefill: Duration,
}

struct Row {
    slot: SlotId,
    min_new_tokens: usize,
    max_new_tokens: usize,
    /// Cache positions the row can need: its prompt and every token but its last.
    limit: usize,
    /// Tokens chosen so far, `<eos>` excluded.
    generated: usize,
    /// The last chosen id, fed at the next step, and its 1-based position (which is also the
    /// number of positions the row has in the cache).
    next_input: i64,
    position: i64,
    /// Its caller stopped it; it leaves before the next run.
    released: bool,
}

/// The batch's decoder state.
enum Batch {
    /// The portable decoder's: the KV cache `[R,KVH,P,D]` with each row right-aligned, and per row
    /// which positions are real and which are prompt (token type 0) or generated (1), `[R,P]`.
    Padded {
        cache: KvCache,
        attention_mask: Array2<i64>,
        token_type_ids: Array2<i64>,
    },
    /// The GroupQueryAttention decoder's: rows from position 0, each as long as its `position`,
    /// written in place.
    Slots(Box<SlotCache>),
}

/// Live rows and their decoder state; see the module docs.
#[derive(Default)]
pub struct Engine {
    rows: Vec<Row>,
    batch: Option<Batch>,
    next_slot: u64,
}

impl Engine {
    /// Runs `request`'s vision encoder and prefill alone and chooses its first token; unless that
    /// ended it, the row joins the batch for the next [`step`](Self::step).
    pub fn admit(&mut self, sessions: &mut ModelSessions, request: &Prepared) -> Result<Admitted, ModelError> {
        let m = sessions.manifest();
        let (image_token_id, eos) = (m.image_token_id, m.eos_token_id.clone());
        let ids = &request.input_ids;
        let len = ids.len();
        let started = Instant::now();
        let features = sessions.encode_image(request.pixel_values.view().insert_axis(Axis(0)).to_owned())?;
        let vision = started.elapsed();
        let started = Instant::now();
        let input_ids = Array2::from_shape_vec((1, len), ids.clone()).map_err(|source| ModelError::Shape { what: "input_ids", source })?;
        let lookup = input_ids.mapv(|t| if t == image_token_id { 0 } else { t });
        let mut embeds = sessions.embed_tokens(lookup.view())?;
        splice_image_features(&mut embeds, &input_ids, features.view(), image_token_id)?;
        let (logits, cache) = sessions.prefill(embeds.view())?;
        self.next_slot += 1;
        let mut row = Row {
            slot: SlotId(self.next_slot),
            min_new_tokens: request.min_new_tokens,
            max_new_tokens: request.max_new_tokens,
            limit: len + request.max_new_tokens.saturating_sub(1),
            generated: 0,
            next_input: 0,
            position: len as i64,
            released: false,
        };
        let first = row.choose(logits.row(0), &eos);
        if !first.done {
            // The batch is rebuilt from the old one, which stays as it was if that fails.
            self.rows.push(row);
            let joined = match &self.batch {
                _ if sessions.in_place() => {
                    let old = match &self.batch {
                        Some(Batch::Slots(slots)) => Some(slots.as_ref()),
                        _ => None,
                    };
                    self.slots(sessions, old, Some((&cache, len)), 0)
                }
                Some(Batch::Padded {
                    cache: old,
                    attention_mask,
                    token_type_ids,
                }) => join_padded(sessions, old, attention_mask, token_type_ids, &cache, len),
                _ => Ok(Batch::Padded {
                    cache,
                    attention_mask: Array2::ones((1, len)),
                    token_type_ids: Array2::zeros((1, len)),
                }),
            };
            match joined {
                Ok(batch) => self.batch = Some(batch),
                Err(e) => {
                    self.rows.pop();
                    return Err(e);
                }
            }
        }
        Ok(Admitted {
            first,
            vision,
            prefill: started.elapsed(),
        })
    }

    /// One token for every live row, in one decoder run; rows that end leave the batch.
    pub fn step(&mut self, sessions: &mut ModelSessions) -> Result<Vec<Emitted>, ModelError> {
        if self.rows.iter().any(|r| r.released) {
            let kept: Vec<usize> = (0..self.rows.len()).filter(|&r| !self.rows[r].released).collect();
            self.keep(sessions, &kept)?;
        }
        if self.rows.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.rows.len();
        let next = Array2::from_shape_fn((rows, 1), |(r, _)| self.rows[r].next_input);
        let positions = Array2::from_shape_fn((rows, 1), |(r, _)| self.rows[r].position + 1);
        let embeds = sessions.embed_tokens(next.view())?;
        // A slot cache grows (doubling, up to what its rows can need) before a row outgrows it.
        let needed = self.needed();
        if let Some(Batch::Slots(slots)) = &self.batch {
            if slots.capacity() < needed {
                let grown = self.slots(sessions, Some(slots), None, 2 * needed)?;
                self.batch = Some(grown);
            }
        }
        let logits = match self.batch.as_mut() {
            Some(Batch::Padded {
                cache,
                attention_mask,
                token_type_ids,
            }) => {
                *attention_mask = grown(attention_mask, "attention_mask")?;
                *token_type_ids = grown(token_type_ids, "token_type_ids")?;
                sessions.decode(embeds.view(), attention_mask.view(), token_type_ids.view(), positions.view(), cache)?
            }
            Some(Batch::Slots(slots)) => {
                let seqlens: Vec<i32> = self.rows.iter().map(|r| i32::try_from(r.position).unwrap_or(i32::MAX)).collect();
                sessions.step_slots(embeds.view(), positions.view(), &seqlens, slots)?
            }
            None => return Ok(Vec::new()),
        };
        let eos = sessions.manifest().eos_token_id.clone();
        let emitted: Vec<Emitted> = self
            .rows
            .iter_mut()
            .zip(logits.outer_iter())
            .map(|(row, logits)| {
                row.position += 1;
                row.choose(logits, &eos)
            })
            .collect();
        let kept: Vec<usize> = (0..rows).filter(|&r| !emitted[r].done).collect();
        if kept.len() < rows {
            self.keep(sessions, &kept)?;
        }
        Ok(emitted)
    }

    /// Drops `slot`'s row (its caller stopped it) before the next step; the others are
    /// unaffected. Unknown or ended slots are ignored.
    pub fn release(&mut self, slot: SlotId) {
        for row in &mut self.rows {
            row.released |= row.slot == slot;
        }
    }

    /// Drops every row: after a failed run, whose cache may be half-updated.
    pub fn clear(&mut self) {
        self.rows.clear();
        self.batch = None;
    }

    /// Keeps rows `kept` (in order) and drops the others.
    fn keep(&mut self, sessions: &ModelSessions, kept: &[usize]) -> Result<(), ModelError> {
        let mut k = 0;
        let mut rows = std::mem::take(&mut self.rows);
        rows.retain(|_| {
            let keep = kept.contains(&k);
            k += 1;
            keep
        });
        let batch = self.batch.take();
        self.rows = rows;
        self.batch = match batch {
            _ if kept.is_empty() => None,
            Some(Batch::Padded {
                cache,
                attention_mask,
                token_type_ids,
            }) => Some(keep_padded(sessions, &cache, &attention_mask, &token_type_ids, kept)?),
            Some(Batch::Slots(slots)) => {
                // self.rows are the kept rows now; their positions sit at `kept` in `slots`.
                let sources: Vec<(SlotSource<'_>, usize)> = kept
                    .iter()
                    .zip(&self.rows)
                    .map(|(&r, row)| (SlotSource::Slots(&slots, r), row.position as usize))
                    .collect();
                let capacity = self.capacity(slots.capacity());
                Some(Batch::Slots(Box::new(sessions.assemble_slots(&sources, capacity)?)))
            }
            None => None,
        };
        Ok(())
    }

    /// A slot cache of the live rows (the last one `joining`, a prefill's cache and length, if
    /// given; the others' positions from `old`), holding at least `at_least` positions.
    fn slots(
        &self,
        sessions: &ModelSessions,
        old: Option<&SlotCache>,
        joining: Option<(&KvCache, usize)>,
        at_least: usize,
    ) -> Result<Batch, ModelError> {
        let staying = self.rows.len() - usize::from(joining.is_some());
        let mut sources: Vec<(SlotSource<'_>, usize)> = Vec::with_capacity(self.rows.len());
        if let Some(old) = old {
            sources.extend((0..staying).map(|r| (SlotSource::Slots(old, r), self.rows[r].position as usize)));
        }
        if let Some((cache, len)) = joining {
            sources.push((SlotSource::Prefill(cache), len));
        }
        let capacity = self.capacity(at_least.max(2 * self.needed()));
        Ok(Batch::Slots(Box::new(sessions.assemble_slots(&sources, capacity)?)))
    }

    /// `wanted` positions per row, but no more than the longest row can ever need and no fewer
    /// than the next step needs.
    fn capacity(&self, wanted: usize) -> usize {
        let most = self.rows.iter().map(|r| r.limit).max().unwrap_or(0);
        wanted.min(most).max(self.needed())
    }

    /// Cache positions the next step needs: the longest row's, plus the one it adds.
    fn needed(&self) -> usize {
        self.rows.iter().map(|r| r.position as usize + 1).max().unwrap_or(0)
    }
}

impl Row {
    /// Greedy choice, as transformers' `generate(do_sample=False)`: `<eos>` is left out before
    /// min_new_tokens; `<eos>` or max_new_tokens ends the row.
    fn choose(&mut self, logits: ArrayView1<f32>, eos: &[i64]) -> Emitted {
        let excluded: &[i64] = if self.generated < self.min_new_tokens { eos } else { &[] };
        let token = argmax(logits, excluded);
        let (token, done) = if eos.contains(&token) {
            (None, true)
        } else {
            self.generated += 1;
            self.next_input = token;
            (Some(token), self.generated >= self.max_new_tokens)
        };
        Emitted {
            slot: self.slot,
            token,
            done,
        }
    }
}

/// The padded batch `cache`/`mask`/`types`, then a joining prefill's row of `len` positions,
/// over the longer of the two lengths.
fn join_padded(
    sessions: &ModelSessions,
    cache: &KvCache,
    mask: &Array2<i64>,
    types: &Array2<i64>,
    joining: &KvCache,
    len: usize,
) -> Result<Batch, ModelError> {
    let (ones, zeros) = (Array2::<i64>::ones((1, len)), Array2::<i64>::zeros((1, len)));
    let rows: Vec<PaddedRow<'_>> = (0..mask.nrows())
        .map(|r| (cache, mask, types, r))
        .chain(std::iter::once((joining, &ones, &zeros, 0)))
        .collect();
    padded(sessions, &rows, 0, mask.ncols().max(len))
}

/// Rows `kept` of a padded batch only, without the leading positions that are padding in every
/// one of them.
fn keep_padded(
    sessions: &ModelSessions,
    cache: &KvCache,
    mask: &Array2<i64>,
    types: &Array2<i64>,
    kept: &[usize],
) -> Result<Batch, ModelError> {
    let from = kept
        .iter()
        .map(|&r| mask.row(r).iter().position(|&m| m != 0).unwrap_or(mask.ncols()))
        .min()
        .unwrap_or(0);
    let rows: Vec<PaddedRow<'_>> = kept.iter().map(|&r| (cache, mask, types, r)).collect();
    padded(sessions, &rows, from, mask.ncols() - from)
}

/// A row of a padded batch: its cache, attention_mask and token_type_ids, and its index in them.
type PaddedRow<'a> = (&'a KvCache, &'a Array2<i64>, &'a Array2<i64>, usize);

/// The padded batch of `rows`, positions `from..` of each right-aligned in `len` columns.
fn padded(sessions: &ModelSessions, rows: &[PaddedRow<'_>], from: usize, len: usize) -> Result<Batch, ModelError> {
    let cache_rows: Vec<CacheRow<'_>> = rows.iter().map(|&(cache, _, _, row)| CacheRow { cache, row, from }).collect();
    let cache = sessions.assemble_cache(&cache_rows, len)?;
    let masks: Vec<_> = rows.iter().map(|&(_, mask, types, row)| (mask, types, row)).collect();
    let (attention_mask, token_type_ids) = right_aligned(&masks, from, len);
    Ok(Batch::Padded {
        cache,
        attention_mask,
        token_type_ids,
    })
}

/// One more position for every row: real (mask 1) and generated (type 1).
fn grown(a: &Array2<i64>, what: &'static str) -> Result<Array2<i64>, ModelError> {
    let ones = Array2::<i64>::ones((a.nrows(), 1));
    ndarray::concatenate(Axis(1), &[a.view(), ones.view()]).map_err(|source| ModelError::Shape { what, source })
}

/// attention_mask and token_type_ids of the listed rows (source arrays and row), positions `from..`
/// of each right-aligned in `len` columns; the columns before them are pads (mask 0, type 0).
fn right_aligned(rows: &[(&Array2<i64>, &Array2<i64>, usize)], from: usize, len: usize) -> (Array2<i64>, Array2<i64>) {
    let mut mask = Array2::<i64>::zeros((rows.len(), len));
    let mut types = Array2::<i64>::zeros((rows.len(), len));
    for (r, &(m, t, row)) in rows.iter().enumerate() {
        let kept = m.ncols() - from;
        mask.slice_mut(s![r, len - kept..]).assign(&m.slice(s![row, from..]));
        types.slice_mut(s![r, len - kept..]).assign(&t.slice(s![row, from..]));
    }
    (mask, types)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_right_aligned_and_leading_columns_dropped() {
        let a_mask = ndarray::arr2(&[[0, 1, 1, 1], [0, 0, 1, 1]]);
        let a_types = ndarray::arr2(&[[0, 0, 0, 1], [0, 0, 0, 1]]);
        let (mask, types) = right_aligned(&[(&a_mask, &a_types, 1), (&a_mask, &a_types, 0)], 1, 5);
        assert_eq!(mask, ndarray::arr2(&[[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]));
        assert_eq!(types, ndarray::arr2(&[[0, 0, 0, 0, 1], [0, 0, 0, 0, 1]]));
    }

    #[test]
    fn eos_is_held_back_until_min_new_tokens_and_ends_the_row() {
        let mut row = Row {
            slot: SlotId(1),
            min_new_tokens: 1,
            max_new_tokens: 3,
            limit: 6,
            generated: 0,
            next_input: 0,
            position: 4,
            released: false,
        };
        let logits = ndarray::arr1(&[0.0f32, 5.0, 1.0]);
        let first = row.choose(logits.view(), &[1]);
        assert_eq!((first.token, first.done), (Some(2), false));
        let second = row.choose(logits.view(), &[1]);
        assert_eq!((second.token, second.done), (None, true));
        assert_eq!(row.generated, 1);
    }

    #[test]
    fn max_new_tokens_ends_the_row_on_its_last_token() {
        let mut row = Row {
            slot: SlotId(1),
            min_new_tokens: 0,
            max_new_tokens: 1,
            limit: 4,
            generated: 0,
            next_input: 0,
            position: 4,
            released: false,
        };
        let first = row.choose(ndarray::arr1(&[0.0f32, 1.0, 5.0]).view(), &[1]);
        assert_eq!((first.token, first.done), (Some(2), true));
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
