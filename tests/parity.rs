//! Token parity with transformers: every case of tests/fixtures/expected_tokens.json (written by
//! `python -m export fixtures`, from transformers' own `generate`) through the Rust pipeline, as
//! one padded batch and request by request. The fp16 cases hold what ONNX Runtime's Python API
//! gives on the fp16 graphs (their `reference` field says so): fp16 rounding lets them drift from
//! transformers' fp32 tokens, but never from the same graphs run by another driver.

use paligemma::config::{DecoderFlavour, Manifest};
use paligemma::{transformers_js, IoBindingMode};
use std::collections::{BTreeMap, HashMap};

use paligemma::pipeline::{ImageInput, Pipeline, PipelineOptions, Request};
use paligemma::prompt::{PromptEncoder, PromptError, DEFAULT_MAX_PROMPT_TOKENS};
use serde::Deserialize;

mod common;

use common::{repo, seeded, tiny_model};

#[derive(Deserialize)]
struct Fixtures {
    max_new_tokens: usize,
    cases: Vec<Case>,
    prompt_layouts: Layouts,
}

/// transformers' processor on prompts holding special tokens: ids, or its error.
#[derive(Deserialize)]
struct Layouts {
    config: String,
    prompts: Vec<Layout>,
}

#[derive(Deserialize)]
struct Layout {
    prompt: String,
    input_ids: Option<Vec<i64>>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    model_dir: String,
    dtype: String,
    reference: String,
    requests: Vec<FixtureRequest>,
    expected: Vec<Vec<i64>>,
    /// transformers' `decode(ids, skip_special_tokens=True)`.
    expected_text: Vec<String>,
}

#[derive(Deserialize)]
struct FixtureRequest {
    image: String,
    prompt: String,
}

fn fixtures() -> Fixtures {
    let path = repo().join("tests/fixtures/expected_tokens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A decoder graph and how its KV cache is kept between steps.
type Decoder = (DecoderFlavour, IoBindingMode);

fn load(case: &Case, decoder: Decoder) -> Pipeline {
    let model_dir = tiny_model(&case.model_dir);
    let mut options = PipelineOptions::new(model_dir.display().to_string());
    options.dtype = case.dtype.parse().unwrap();
    (options.decoder, options.io_binding) = decoder;
    let pipeline = Pipeline::load(options).unwrap_or_else(|e| panic!("{} ({decoder:?}): {e}", case.name));
    let bound = decoder.0 == DecoderFlavour::Gqa || decoder.1 == IoBindingMode::On;
    assert_eq!(pipeline.cache_binding().is_some(), bound, "{} ({decoder:?})", case.name);
    pipeline
}

/// The decoder graphs `case`'s conversion has for its dtype: the portable one, its cache returned
/// by every run and bound through an IoBinding (the path that keeps it on a GPU, here in host
/// memory), and the GroupQueryAttention one where it was converted (fp32 and quantized dtypes).
fn decoders(case: &Case) -> Vec<Decoder> {
    let dir = tiny_model(&case.model_dir);
    let manifest = if transformers_js::is_layout(&dir) {
        transformers_js::manifest(&dir).unwrap()
    } else {
        Manifest::load(&dir).unwrap()
    };
    let gqa = manifest.graphs.decoder_gqa.is_some_and(|files| files.contains_key(&case.dtype));
    let mut decoders = vec![
        (DecoderFlavour::Portable, IoBindingMode::Off),
        (DecoderFlavour::Portable, IoBindingMode::On),
    ];
    decoders.extend(gqa.then_some((DecoderFlavour::Gqa, IoBindingMode::Auto)));
    decoders
}

fn requests(case: &Case, max_new_tokens: usize) -> Vec<Request> {
    case.requests
        .iter()
        .map(|r| Request {
            image: ImageInput::Path(repo().join(&r.image)),
            prompt: r.prompt.clone(),
            max_new_tokens,
            min_new_tokens: 0,
        })
        .collect()
}

fn run_ids(pipeline: &mut Pipeline, requests: &[Request]) -> Vec<Vec<i64>> {
    run(pipeline, requests).into_iter().map(|(ids, _)| ids).collect()
}

fn run(pipeline: &mut Pipeline, requests: &[Request]) -> Vec<(Vec<i64>, String)> {
    pipeline
        .run(requests, |_, _| {})
        .into_iter()
        .map(|r| {
            let r = r.unwrap_or_else(|e| panic!("{e}"));
            (r.token_ids, r.text)
        })
        .collect()
}

#[test]
fn batches_give_transformers_tokens_and_text() {
    let fixtures = fixtures();
    assert!(!fixtures.cases.is_empty());
    let mut in_place = 0;
    for case in &fixtures.cases {
        for decoder in decoders(case) {
            in_place += usize::from(decoder.0 == DecoderFlavour::Gqa);
            let mut pipeline = load(case, decoder);
            let got = run(&mut pipeline, &requests(case, fixtures.max_new_tokens));
            let (ids, texts): (Vec<_>, Vec<_>) = got.into_iter().unzip();
            assert_eq!(
                ids, case.expected,
                "{} ({decoder:?}): token ids differ from {}",
                case.name, case.reference
            );
            assert_eq!(
                texts, case.expected_text,
                "{} ({decoder:?}): decoded text differs from {}",
                case.name, case.reference
            );
        }
    }
    let fp16 = fixtures.cases.iter().filter(|c| c.dtype == "fp16").count();
    assert!(fp16 > 0, "no fp16 case: the fp16 runtime path is untested");
    // The transformers.js layout has no GroupQueryAttention decoder; our conversions mostly do.
    let community = fixtures
        .cases
        .iter()
        .filter(|c| transformers_js::is_layout(&tiny_model(&c.model_dir)))
        .count();
    assert!(community > 0, "no community-layout case");
    assert!(
        in_place * 2 > fixtures.cases.len() - community,
        "only {in_place} cases ran the GroupQueryAttention decoder"
    );
    eprintln!(
        "{} cases ({fp16} fp16, {community} transformers.js layout, {in_place} also on the GroupQueryAttention decoder), token ids identical to their reference",
        fixtures.cases.len()
    );
}

#[test]
fn each_request_alone_gives_its_batch_tokens() {
    let fixtures = fixtures();
    for case in fixtures.cases.iter().filter(|c| c.requests.len() > 1) {
        for decoder in decoders(case) {
            let mut pipeline = load(case, decoder);
            for (request, expected) in requests(case, fixtures.max_new_tokens).into_iter().zip(&case.expected) {
                let got = run_ids(&mut pipeline, std::slice::from_ref(&request));
                assert_eq!(
                    &got[0], expected,
                    "{} ({decoder:?}): a request alone differs from its batch row",
                    case.name
                );
            }
        }
    }
}

/// The engine's continuous batching: the requests of every case on one model and dtype join a
/// running batch at seeded random steps (zero to two per step) while others are mid-answer and
/// leave at their own ends; each still gets transformers' tokens, and its deltas add up to its
/// text.
#[test]
fn requests_joining_at_random_steps_give_transformers_tokens() {
    let fixtures = fixtures();
    // (model directory, dtype) -> (case, request, its index in the case)
    type Group<'a> = Vec<(&'a Case, Request, usize)>;
    let mut groups: BTreeMap<(&str, &str), Group> = BTreeMap::new();
    for case in &fixtures.cases {
        for (k, request) in requests(case, fixtures.max_new_tokens).into_iter().enumerate() {
            groups.entry((&case.model_dir, &case.dtype)).or_default().push((case, request, k));
        }
    }
    let mut random = seeded(0x2545_f491_4f6c_dd1d);
    let (mut most_live, mut joined_mid_answer) = (0, 0);
    let runs = groups
        .iter()
        .flat_map(|(key, entries)| decoders(entries[0].0).into_iter().map(move |d| (key, entries, d)));
    for ((model_dir, dtype), entries, decoder) in runs {
        let mut pipeline = load(entries[0].0, decoder);
        let mut pending = entries.iter();
        let mut running: HashMap<_, (&Case, usize, String)> = HashMap::new();
        let mut finished = 0;
        let mut updates = Vec::new();
        loop {
            let fits = |p: &Pipeline| p.capacity().is_none_or(|c| p.live() < c);
            let joins = if pipeline.live() == 0 { 1 } else { random(3) };
            for _ in 0..joins {
                if !fits(&pipeline) {
                    break;
                }
                let Some((case, request, k)) = pending.next() else { break };
                joined_mid_answer += usize::from(pipeline.live() > 0);
                let update = pipeline.join(request).unwrap_or_else(|e| panic!("{}: {e}", case.name));
                running.insert(update.id, (*case, *k, String::new()));
                updates.push(update);
            }
            most_live = most_live.max(pipeline.live());
            updates.extend(pipeline.step());
            for update in updates.drain(..) {
                let (case, k, text) = running.get_mut(&update.id).expect("an update of a request that joined");
                text.push_str(&update.delta);
                if let Some(done) = update.done {
                    let response = done.unwrap_or_else(|e| panic!("{}: {e}", case.name));
                    assert_eq!(
                        response.token_ids, case.expected[*k],
                        "{} request {k} ({model_dir} {dtype} {decoder:?}): joining a running batch changed its tokens from {}",
                        case.name, case.reference
                    );
                    assert_eq!(response.text, case.expected_text[*k], "{}", case.name);
                    assert_eq!(*text, response.text, "{}: the deltas do not add up to the text", case.name);
                    finished += 1;
                }
            }
            if pipeline.live() == 0 && pending.len() == 0 {
                break;
            }
        }
        assert_eq!(finished, entries.len(), "{model_dir} {dtype} {decoder:?}: every request ends");
    }
    assert!(
        most_live >= 3 && joined_mid_answer >= 10,
        "too little overlap to test joining: {most_live} rows at most, {joined_mid_answer} joins mid-answer"
    );
}

#[test]
fn prompts_with_special_tokens_are_laid_out_as_transformers_processor_does() {
    let layouts = fixtures().prompt_layouts;
    let dir = tiny_model(&format!("{}/onnx", layouts.config));
    let encoder = PromptEncoder::load(&dir, &Manifest::load(&dir).unwrap(), DEFAULT_MAX_PROMPT_TOKENS).unwrap();
    assert!(
        layouts.prompts.iter().any(|l| l.error.is_some())
            && layouts
                .prompts
                .iter()
                .any(|l| l.prompt.contains("<image>") && l.input_ids.is_some())
    );
    for layout in &layouts.prompts {
        match (&layout.input_ids, encoder.encode(&layout.prompt, 1)) {
            (Some(expected), Ok(ids)) => assert_eq!(&ids, expected, "{:?}", layout.prompt),
            (None, Err(PromptError::ImagePlaceholders { .. })) => {}
            (expected, got) => panic!(
                "{:?}: transformers gives {expected:?} / {:?}, paligemma {got:?}",
                layout.prompt, layout.error
            ),
        }
    }
}

#[test]
fn an_image_placeholder_in_the_prompt_gives_the_answer_of_the_prompt_without_it() {
    // Both from transformers: `<image>caption en` and `caption en` on the same image.
    let fixtures = fixtures();
    let case = |name: &str| {
        fixtures
            .cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no case {name}"))
    };
    let (placed, plain) = (case("gqa1/prompt_layouts"), case("gqa1/single/chelsea"));
    assert_eq!(
        (placed.requests[0].prompt.as_str(), plain.requests[0].prompt.as_str()),
        ("<image>caption en", "caption en")
    );
    assert_eq!(placed.requests[0].image, plain.requests[0].image);
    assert_eq!(placed.expected[0], plain.expected[0]);
}
