//! `spt-train generate`: sample text from a GPT-2 model.

use crate::say;
use std::io::Write;

use crate::common::{
    check_model, device, load_trained, model_type, read_json, tokenizer_for, ModelArgs, PrecisionArgs,
};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use spt_models::KvCache;
use spt_train::config::resolve_model;
use spt_train::data::TaskKind;
use spt_train::pipeline::model_max_length;
use spt_train::rng::SplitMix64;
use spt_train::tasks::Net;
use std::path::Path;

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) precision: PrecisionArgs,
    /// Text to continue (empty: start from the end-of-text token).
    #[arg(long, default_value = "")]
    pub(crate) prompt: String,
    /// Tokens to generate at most (capped at the model's context; stops early at end-of-text).
    #[arg(long, default_value_t = 50)]
    pub(crate) max_new_tokens: usize,
    /// Softmax temperature (> 0) [default: the model's generation_config.json when it sets
    /// do_sample: true, else 1].
    #[arg(long)]
    pub(crate) temperature: Option<f64>,
    /// Sample among the k most likely tokens, and any tied with the k-th (0: all) [default: the
    /// model's generation_config.json when it sets do_sample: true, else 50].
    #[arg(long)]
    pub(crate) top_k: Option<usize>,
    /// Then among the most likely tokens whose probabilities sum to at least P (nucleus
    /// sampling; 1: all) [default: the model's generation_config.json when it sets do_sample:
    /// true, else 1].
    #[arg(long)]
    pub(crate) top_p: Option<f64>,
    /// Greedy decoding: the most likely token each time, the lowest id on a tie (transformers'
    /// generate without do_sample). Also what a generation_config.json with do_sample: false
    /// asks for, unless a sampling flag is given.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub(crate) greedy: bool,
    /// Sampling seed: the same seed, prompt and model give the same text.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
}

/// What a model's `generation_config.json` and `config.json` set for generation: the tokens
/// that end the text (the first file's `eos_token_id`, else the second's), and the first's
/// sampling settings.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct GenerationConfig {
    pub(crate) eos_token_ids: Vec<u32>,
    pub(crate) do_sample: Option<bool>,
    pub(crate) temperature: Option<f64>,
    pub(crate) top_k: Option<usize>,
    pub(crate) top_p: Option<f64>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` and `config.json` in `model_dir`. A field of the wrong
    /// type is an error naming the file and the field.
    pub(crate) fn read(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("generation_config.json");
        let mut g = Self::default();
        if let Some(v) = read_json(&path)? {
            let (file, v) = (&path.display().to_string(), &v);
            g.eos_token_ids = eos_token_ids(file, v)?;
            g.do_sample = field(file, v, "do_sample", serde_json::Value::as_bool, "true or false")?;
            g.temperature = field(file, v, "temperature", serde_json::Value::as_f64, "a number")?;
            g.top_k = field(
                file,
                v,
                "top_k",
                |x| x.as_u64().map(|k| k as usize),
                "a whole number",
            )?;
            g.top_p = field(file, v, "top_p", serde_json::Value::as_f64, "a number")?;
        }
        if g.eos_token_ids.is_empty() {
            let path = model_dir.join("config.json");
            if let Some(v) = read_json(&path)? {
                g.eos_token_ids = eos_token_ids(&path.display().to_string(), &v)?;
            }
        }
        Ok(g)
    }
}

/// Field `k` of the JSON `v` read from `file` (absent or null: `None`), or an error naming both.
fn field<T>(
    file: &str,
    v: &serde_json::Value,
    k: &str,
    read: impl Fn(&serde_json::Value) -> Option<T>,
    want: &str,
) -> Result<Option<T>> {
    match v.get(k).filter(|x| !x.is_null()) {
        None => Ok(None),
        Some(x) => read(x)
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("{file}: {k} must be {want}, got {x}")),
    }
}

/// `eos_token_id` of `v`: one token id or a list of them (none when absent).
fn eos_token_ids(file: &str, v: &serde_json::Value) -> Result<Vec<u32>> {
    let id = |x: &serde_json::Value| x.as_u64().and_then(|i| u32::try_from(i).ok());
    let ids = |x: &serde_json::Value| match x.as_array() {
        Some(xs) => xs.iter().map(id).collect(),
        None => id(x).map(|i| vec![i]),
    };
    Ok(field(file, v, "eos_token_id", ids, "a token id or a list of them")?.unwrap_or_default())
}

/// How the next token is chosen.
struct Sampling {
    temperature: f64,
    top_k: usize,
    top_p: f64,
    /// The most likely token, the lowest id on a tie (transformers' greedy search).
    greedy: bool,
    /// The settings taken from generation_config.json, for the note.
    from_file: Vec<String>,
}

/// The sampling settings: each flag, else the model's generation config where it sets
/// `do_sample: true` (transformers applies its temperature, top-k and top-p only then), else
/// ours (top-k 50, temperature 1). `--greedy`, or a generation config with `do_sample: false`
/// and no sampling flag, decodes greedily.
fn sampling_settings(a: &GenerateArgs, g: &GenerationConfig) -> Result<Sampling> {
    let mut from_file = Vec::new();
    let flags_given = a.temperature.is_some() || a.top_k.is_some() || a.top_p.is_some();
    let greedy = a.greedy || (g.do_sample == Some(false) && !flags_given);
    if greedy && !a.greedy {
        from_file.push("do_sample: false (greedy)".to_string());
    }
    let file_samples = g.do_sample == Some(true);
    // The flag, else the file's value where it samples (named in the note), else ours.
    fn pick<T: Copy + std::fmt::Display>(
        flag: Option<T>,
        file: Option<T>,
        file_samples: bool,
        (name, ours): (&str, T),
        from_file: &mut Vec<String>,
    ) -> T {
        match (flag, file) {
            (Some(x), _) => x,
            (None, Some(x)) if file_samples => {
                from_file.push(format!("{name}: {x}"));
                x
            }
            _ => ours,
        }
    }
    let temperature = pick(
        a.temperature,
        g.temperature,
        file_samples,
        ("temperature", 1.0),
        &mut from_file,
    );
    let top_k = pick(a.top_k, g.top_k, file_samples, ("top_k", 50), &mut from_file);
    let top_p = pick(a.top_p, g.top_p, file_samples, ("top_p", 1.0), &mut from_file);
    // The flags were checked before: a value out of range here is the file's.
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("generation_config.json: temperature must be positive, got {temperature}");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("generation_config.json: top_p must be in (0, 1], got {top_p}");
    }
    Ok(Sampling {
        temperature,
        top_k,
        top_p,
        greedy,
        from_file,
    })
}

pub(crate) fn generate(a: &GenerateArgs) -> Result<()> {
    if let Some(t) = a.temperature.filter(|t| !(*t > 0.0 && t.is_finite())) {
        bail!("--temperature must be positive, got {t}");
    }
    if let Some(p) = a.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        bail!("--top-p must be in (0, 1], got {p}");
    }
    a.model.check_checkpoint()?;
    a.precision.apply(&a.model.device)?;
    let dev = device(&a.model.device)?;
    let model_dir = resolve_model(&a.model.model)?;
    let gen_config = GenerationConfig::read(&model_dir)?;
    let sampling = sampling_settings(a, &gen_config)?;
    if !sampling.from_file.is_empty() {
        say!(
            "note: from the model's generation_config.json: {} (flags override it)",
            sampling.from_file.join(", ")
        );
    }
    if let Some(t) = model_type(&model_dir)?.filter(|t| t != "gpt2") {
        bail!(
            "generate needs a GPT-2 model; {} is model_type \"{t}\"",
            model_dir.display()
        );
    }
    check_model(TaskKind::Lm, &model_dir)?;
    let tok = tokenizer_for(&a.model, a.model.run_settings()?.as_ref(), &model_dir, None)?;
    let eos = tok.eos_id();
    // Generation ends at the model's end-of-text ids (transformers' eos_token_id, which may list
    // several), else the tokenizer's.
    let stop: Vec<u32> = if gen_config.eos_token_ids.is_empty() {
        eos.into_iter().collect()
    } else {
        gen_config.eos_token_ids.clone()
    };
    let mut ids = tok.encode_raw(&a.prompt)?;
    // An empty prompt starts from the end-of-text token, which is not part of the text shown.
    let seeded = ids.is_empty();
    if seeded {
        ids.push(eos.or(stop.first().copied()).unwrap_or(0));
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
        let next = if sampling.greedy {
            // Largest first, the lowest id on a tie (NaN was refused above).
            (0..last.len()).fold(0, |best, i| if last[i] > last[best] { i } else { best }) as u32
        } else {
            sample_token(
                &last,
                sampling.temperature,
                sampling.top_k,
                sampling.top_p,
                &mut rng,
            )
        };
        if stop.contains(&next) {
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

/// Samples a token id from `logits` as transformers' warpers do, in their order: temperature,
/// top-k (0: all; ties with the k-th kept), then top-p (the most likely tokens whose
/// probabilities reach `top_p`, the one that crosses it included; at least one).
pub(crate) fn sample_token(
    logits: &[f32],
    temperature: f64,
    top_k: usize,
    top_p: f64,
    rng: &mut SplitMix64,
) -> u32 {
    // Largest first, ties by id: a total order, so partitioning off the top k and sorting them
    // gives what a stable sort of the whole vocabulary gives, in O(V) instead of O(V log V).
    let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if top_k > 0 && top_k < order.len() {
        order.select_nth_unstable_by(top_k - 1, desc);
        let kth = logits[order[top_k - 1]];
        // Those tied with the k-th stay, as in transformers' TopKLogitsWarper (`< kth` removed).
        let (mut head, tail) = (order[..top_k].to_vec(), &order[top_k..]);
        head.extend(tail.iter().filter(|&&i| logits[i] == kth));
        order = head;
    }
    order.sort_unstable_by(desc);
    let max = logits[order[0]] as f64;
    let mut w: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / temperature).exp())
        .collect();
    if top_p < 1.0 {
        // transformers removes, from the least likely up, the tokens whose cumulative
        // probability stays at or below 1 − top_p; the most likely always stays.
        let total: f64 = w.iter().sum();
        let mut below = 0.0;
        let mut keep = w.len();
        while keep > 1 {
            below += w[keep - 1] / total;
            if below > 1.0 - top_p {
                break;
            }
            keep -= 1;
        }
        w.truncate(keep);
    }
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

    /// The sampler by a stable sort of the whole vocabulary: the top k and any tied with the
    /// k-th.
    fn sample_by_full_sort(logits: &[f32], temperature: f64, top_k: usize, rng: &mut SplitMix64) -> u32 {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if top_k > 0 && top_k < order.len() {
            let kth = logits[order[top_k - 1]];
            order.retain(|&i| logits[i] >= kth);
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

    /// Top-p keeps what transformers' TopPLogitsWarper keeps: probabilities 0.5, 0.3, 0.15,
    /// 0.05 at top_p 0.75 keep the first two (the 0.3 that crosses 0.75 included); a small
    /// top_p keeps the most likely alone; top-k keeps ties with the k-th.
    #[test]
    fn top_p_and_top_k_keep_what_transformers_keeps() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let mut rng = SplitMix64::new(3);
        let mut seen = [0usize; 4];
        for _ in 0..4000 {
            seen[sample_token(&logits, 1.0, 0, 0.75, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[2..], [0, 0], "{seen:?}");
        let share = seen[0] as f64 / 4000.0;
        assert!((share - 0.625).abs() < 0.03, "{seen:?}"); // 0.5 / 0.8
        for _ in 0..50 {
            assert_eq!(sample_token(&logits, 1.0, 0, 0.1, &mut rng), 0);
            assert!(sample_token(&[1.0, 1.0, 1.0, 0.0], 1.0, 1, 1.0, &mut rng) < 3);
        }
        let tied: std::collections::BTreeSet<u32> = (0..200)
            .map(|_| sample_token(&[0.0, 1.0, 1.0, 1.0], 1.0, 1, 1.0, &mut rng))
            .collect();
        assert_eq!(tied.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn generation_config_is_read_as_transformers_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        assert_eq!(
            GenerationConfig::read(dir.path()).unwrap(),
            GenerationConfig::default()
        );
        write("config.json", r#"{"eos_token_id": 50256, "top_k": 3}"#);
        let g = GenerationConfig::read(dir.path()).unwrap();
        assert_eq!((g.eos_token_ids, g.top_k), (vec![50256], None)); // sampling only from generation_config.json
        write(
            "generation_config.json",
            r#"{"eos_token_id": [50256, 9359], "do_sample": true, "top_k": 0, "top_p": 0.9, "temperature": null}"#,
        );
        let g = GenerationConfig::read(dir.path()).unwrap();
        assert_eq!(g.eos_token_ids, [50256, 9359]);
        assert_eq!(
            (g.do_sample, g.top_k, g.top_p, g.temperature),
            (Some(true), Some(0), Some(0.9), None)
        );
        // Without an eos_token_id there, config.json's.
        write("generation_config.json", r#"{"do_sample": false}"#);
        assert_eq!(GenerationConfig::read(dir.path()).unwrap().eos_token_ids, [50256]);
        write("generation_config.json", r#"{"eos_token_id": "50256"}"#);
        let e = GenerationConfig::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("generation_config.json: eos_token_id must be"), "{e}");
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
    fn partial_sort_samples_what_the_full_sort_does() {
        let mut g = SplitMix64::new(9);
        for case in 0..200u64 {
            // Few distinct values, so ties straddle the top-k boundary.
            let n = 1 + g.below(300) as usize;
            let logits: Vec<f32> = (0..n).map(|_| g.below(7) as f32 * 0.5).collect();
            for top_k in [0, 1, 2, 5, 40, n, n + 3] {
                let (mut a, mut b) = (SplitMix64::new(case), SplitMix64::new(case));
                for _ in 0..5 {
                    assert_eq!(
                        sample_token(&logits, 0.7, top_k, 1.0, &mut a),
                        sample_by_full_sort(&logits, 0.7, top_k, &mut b),
                        "n {n}, top_k {top_k}"
                    );
                }
            }
        }
    }
}
