//! `spt-train generate`: sample text from a GPT-2 model.

use crate::say;
use std::io::Write;

use crate::common::{check_model, device, load_trained, model_type, tokenizer_for, ModelArgs};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use spt_models::KvCache;
use spt_train::config::resolve_model;
use spt_train::data::TaskKind;
use spt_train::pipeline::model_max_length;
use spt_train::rng::SplitMix64;
use spt_train::tasks::Net;

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Text to continue (empty: start from the end-of-text token).
    #[arg(long, default_value = "")]
    pub(crate) prompt: String,
    /// Tokens to generate at most (capped at the model's context; stops early at end-of-text).
    #[arg(long, default_value_t = 50)]
    pub(crate) max_new_tokens: usize,
    /// Softmax temperature (> 0).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 50)]
    pub(crate) top_k: usize,
    /// Sampling seed: the same seed, prompt and model give the same text.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
}

pub(crate) fn generate(a: &GenerateArgs) -> Result<()> {
    if !(a.temperature > 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be positive, got {}", a.temperature);
    }
    a.model.check_checkpoint()?;
    let dev = device(&a.model.device)?;
    let model_dir = resolve_model(&a.model.model)?;
    if let Some(t) = model_type(&model_dir)?.filter(|t| t != "gpt2") {
        bail!(
            "generate needs a GPT-2 model; {} is model_type \"{t}\"",
            model_dir.display()
        );
    }
    check_model(TaskKind::Lm, &model_dir)?;
    let tok = tokenizer_for(&a.model, a.model.run_settings()?.as_ref(), &model_dir, None)?;
    let eos = tok.eos_id();
    let mut ids = tok.encode_raw(&a.prompt)?;
    // An empty prompt starts from the end-of-text token, which is not part of the text shown.
    let seeded = ids.is_empty();
    if seeded {
        ids.push(eos.unwrap_or(0));
    }
    let n_prompt = ids.len();
    let ctx_len = model_max_length(&model_dir).unwrap_or(1024);
    if n_prompt > ctx_len {
        bail!("--prompt is {n_prompt} tokens; the model's context is {ctx_len}: shorten the prompt");
    }
    spt_train::pipeline::check_ids_fit_model([&ids[..]], &model_dir)?;
    // No sliding window: past its context a GPT-2 would only see the last tokens, so the length
    // is capped there and said so. The last token sampled is never run through the model, so
    // the prompt and all but that token fill the context: a prompt of the full context still
    // gets one.
    let max_new = a.max_new_tokens.min(ctx_len - n_prompt + 1);
    if max_new < a.max_new_tokens {
        say!(
            "note: --max-new-tokens {} capped at {max_new}: the prompt ({n_prompt} tokens) and the \
             generated tokens but the last (never run) fit the model's context of {ctx_len} tokens",
            a.max_new_tokens
        );
    }
    tracing::info!(prompt_tokens = n_prompt, max_new, "prompt ready");
    let (mut task, _) = load_trained(&a.model, TaskKind::Lm, None, &dev, None, None)?;
    task.net.freeze()?; // inference only: nothing recorded for a backward
    let Net::Lm(model) = &task.net else {
        bail!("generate needs a GPT-2 model (model_type gpt2)")
    };
    // An id the tokenizer lacks (past its vocabulary, or in a gap below an added token)
    // decodes to nothing: it would be generated and silently dropped from the text. Such ids are
    // never sampled. (A model's vocabulary padded past its tokenizer's is the common case.)
    let model_vocab = model.transformer.config.vocab_size;
    let mut known = vec![false; model_vocab];
    for &id in tok.inner().get_vocab(true).values() {
        if let Some(k) = known.get_mut(id as usize) {
            *k = true;
        }
    }
    let n_known = known.iter().filter(|&&k| k).count();
    if n_known < model_vocab {
        say!(
            "note: the tokenizer has {n_known} of the model's {model_vocab} token ids: only those \
             are sampled (a mismatched tokenizer gives nonsense)"
        );
    }
    let mut rng = SplitMix64::new(a.seed);
    // Special tokens are shown (an [UNK] the prompt became is what the model saw); the end of
    // text, the one a byte-level vocabulary has, ends generation before it is decoded, and the
    // one an empty prompt starts from is left out.
    let decode = |ids: &[u32]| {
        tok.inner()
            .decode(&ids[usize::from(seeded)..], false)
            .map_err(|e| anyhow::anyhow!("decoding the generated tokens: {e}"))
    };
    // Stream: print the text as it grows (decoding the whole sequence each time, so multi-byte
    // characters split across tokens come out whole).
    let mut out = std::io::stdout().lock();
    // The prompt is printed as typed, and the continuation after it. What the model saw may
    // differ (words the tokenizer lacks become [UNK] or vanish; a normaliser lowercases): that
    // is said, not shown in place of the user's words.
    let mut shown = decode(&ids)?;
    if !a.prompt.is_empty() && shown != a.prompt {
        say!(
            "note: the tokenizer reads the prompt as {shown:?} (words it lacks, or normalised); \
             the model continues that"
        );
    }
    if !show(&mut out, if a.prompt.is_empty() { &shown } else { &a.prompt })? {
        return Ok(());
    }
    // Keys and values of the positions so far are cached: each step runs one new position.
    let mut cache = KvCache::new();
    let mut input = ids.clone();
    for _ in 0..max_new {
        let input_ids = Tensor::new(input.as_slice(), &dev)?.unsqueeze(0)?;
        // On the pool, where each op's threads start without waking.
        let logits = spt_ops::on_pool(&dev, || model.next_token_logits(&input_ids, &mut cache))?;
        let last: Vec<f32> = logits.get(0)?.to_dtype(DType::F32)?.to_vec1()?;
        if last.iter().any(|v| v.is_nan()) {
            bail!(
                "the model's next-token logits after {} tokens are NaN (diverged weights, or a \
                 setting that overflows such as a huge LoRA alpha)",
                ids.len()
            );
        }
        let last: Vec<f32> = last
            .iter()
            .zip(known.iter().chain(std::iter::repeat(&false)))
            .map(|(&l, &k)| if k { l } else { f32::NEG_INFINITY })
            .collect();
        let next = sample_token(&last, a.temperature, a.top_k, &mut rng);
        if Some(next) == eos {
            break;
        }
        ids.push(next);
        input = vec![next];
        let text = decode(&ids)?;
        if text.ends_with('\u{fffd}') {
            continue; // an incomplete character: its next byte comes with the next token
        }
        if !show(&mut out, new_text(&shown, &text))? {
            return Ok(());
        }
        shown = text;
    }
    // A character still incomplete when generation stopped is printed as decoded (U+FFFD).
    let text = decode(&ids)?;
    if text != shown && !show(&mut out, new_text(&shown, &text))? {
        return Ok(());
    }
    show(&mut out, "\n")?;
    Ok(())
}

/// What `text` adds to `shown`. Decoding is prefix-stable for byte-level BPE; if a tokenizer's
/// is not, it is printed from where the texts part.
fn new_text<'a>(shown: &str, text: &'a str) -> &'a str {
    match text.strip_prefix(shown) {
        Some(rest) => rest,
        None => &text[common_prefix(shown, text)..],
    }
}

/// Writes `text` now; false when the reader went away (`| head`), which ends the generation
/// quietly rather than as an error.
fn show(out: &mut impl Write, text: &str) -> Result<bool> {
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Byte length of the longest common prefix of `a` and `b` on a char boundary.
pub(crate) fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or(a.len().min(b.len()))
}

/// Samples a token id from `logits` with temperature and top-k (0: all).
pub(crate) fn sample_token(logits: &[f32], temperature: f64, top_k: usize, rng: &mut SplitMix64) -> u32 {
    // Largest first, ties by id: a total order, so partitioning off the top k and sorting them
    // gives what a stable sort of the whole vocabulary gives, in O(V) instead of O(V log V).
    let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if top_k > 0 && top_k < order.len() {
        order.select_nth_unstable_by(top_k - 1, desc);
        order.truncate(top_k);
    }
    order.sort_unstable_by(desc);
    let max = logits[order[0]] as f64;
    let w: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (k, &wi) in w.iter().enumerate() {
        if u < wi {
            return order[k] as u32;
        }
        u -= wi;
    }
    // Rounding left u past the last weight: the last id with any weight (never a masked one).
    order[w.iter().rposition(|&x| x > 0.0).unwrap_or(0)] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampler before the partial sort: a stable sort of the whole vocabulary.
    fn sample_by_full_sort(logits: &[f32], temperature: f64, top_k: usize, rng: &mut SplitMix64) -> u32 {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if top_k > 0 {
            order.truncate(top_k);
        }
        let max = logits[order[0]] as f64;
        let w: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / temperature).exp())
            .collect();
        let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * w.iter().sum::<f64>();
        for (k, &wi) in w.iter().enumerate() {
            if u < wi {
                return order[k] as u32;
            }
            u -= wi;
        }
        order[order.len() - 1] as u32
    }

    #[test]
    fn new_text_is_what_the_decoding_adds() {
        assert_eq!(new_text("the good", "the good movie"), " movie");
        assert_eq!(new_text("the good", "the good"), "");
        // A partial character left when generation stops is printed as decoded.
        assert_eq!(new_text("caf", "caf\u{fffd}"), "\u{fffd}");
        // A decoding that is not prefix-stable: printed from where the texts part.
        assert_eq!(new_text("naïve ab", "naïve ac"), "c");
        assert_eq!(new_text("é", "e"), "e");
    }

    #[test]
    fn partial_sort_samples_what_the_full_sort_did() {
        let mut g = SplitMix64::new(9);
        for case in 0..200u64 {
            // Few distinct values, so ties straddle the top-k boundary.
            let n = 1 + g.below(300) as usize;
            let logits: Vec<f32> = (0..n).map(|_| g.below(7) as f32 * 0.5).collect();
            for top_k in [0, 1, 2, 5, 40, n, n + 3] {
                let (mut a, mut b) = (SplitMix64::new(case), SplitMix64::new(case));
                for _ in 0..5 {
                    assert_eq!(
                        sample_token(&logits, 0.7, top_k, &mut a),
                        sample_by_full_sort(&logits, 0.7, top_k, &mut b),
                        "n {n}, top_k {top_k}"
                    );
                }
            }
        }
    }
}
