//! Text generation with GPT-2 small (`bench/configs/gpt2-small`, random weights: no GPT-2
//! checkpoint is reachable here, and the time does not depend on the values), batch 1, f32:
//! a prompt, then new tokens one at a time, as `spt-train generate` runs them, for the model of
//! each mode as `spt-train` builds it (`ModelTask::build_from_source`): dense; LoRA (r 8 on
//! c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, unmerged); SPT (the fast preset: FFN 2 of 8 +
//! linear correction, every attention key, LoRA r 8; routers fitted on random tokens), every
//! parameter frozen as `spt-train generate` freezes them. Dense and SPT also with bf16 products
//! (`--matmul-precision bf16`; records with `matmul_precision`, the 128-token case), against
//! PyTorch under bf16 autocast.
//!
//! - ours: `GPT2LMHeadModel::next_token_logits` with a `KvCache` (the prompt in one call, then
//!   one position per call, the head for the last position only);
//! - baseline (dense only): what `spt-train generate` did before the cache, `forward_t` over the
//!   whole sequence for every new token, taking the last position's logits (quadratic in the
//!   length, so only the shorter case runs it).
//!
//! The tokens are fixed (an LCG, as bench/peer/generate.py draws them), not sampled, so every
//! run does the same work. Times: the whole generation (prompt + new tokens), median of
//! `REPS` runs, and the median time of one new token over those runs. Memory: the peak RSS
//! after the case's cached runs of a process per mode (its cases run shortest first, before the
//! baseline; weights included). Writes
//! bench/results/generate.json; bench/peer/generate.py adds PyTorch + transformers (+ PEFT for
//! the LoRA and SPT records) with its KV cache at the same cases.
//!
//!     cargo bench -p spt-train --bench generate

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use spt_models::{GPT2Config, GPT2LMHeadModel, KvCache};
use spt_ops::{on_pool, MatmulPrecision};
use spt_train::bench::{
    child_records, machine_json, median, peak_rss_bytes, random_gpt2_weights, synthetic_data, write_results,
};
use spt_train::config::{FinetuneConfig, Mode};
use spt_train::data::TaskKind;
use spt_train::presets::{base_config, effective};
use spt_train::tasks::{calibration_batches, ModelTask, Net};
use std::path::Path;
use std::time::Instant;

/// As in the `spt-train` binary: freed buffers are kept for reuse (`spt_train::alloc`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const COMMAND: &str = "cargo bench -p spt-train --bench generate";
const REPS: usize = 3;
/// The environment variable that makes this binary run one mode's cases (see `main`).
const CHILD: &str = "SPT_GENERATE_BENCH_MODE";
/// (mode, prompt tokens, new tokens, run the uncached baseline).
const CASES: [(Mode, usize, usize, bool); 4] = [
    (Mode::Dense, 32, 128, true),
    (Mode::Dense, 32, 480, false),
    (Mode::Lora, 32, 128, false),
    (Mode::Spt, 32, 128, false),
];

/// The token ids: the upper bits of a 64-bit LCG, as bench/peer/generate.py draws them.
fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut s: u64 = 0x2545_F491_4F6C_DD1D;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// One generation with the cache: (total seconds, seconds of each new token).
fn cached(m: &GPT2LMHeadModel, ids: &[u32], prompt: usize) -> Result<(f64, Vec<f64>)> {
    let dev = Device::Cpu;
    let mut cache = KvCache::new();
    let t0 = Instant::now();
    // As spt-train generate runs each call: on the pool.
    let input = Tensor::new(&ids[..prompt], &dev)?.unsqueeze(0)?;
    let logits = on_pool(&dev, || m.next_token_logits(&input, &mut cache))?;
    logits.to_vec2::<f32>()?; // the sampler reads the logits on the host
    let mut per_token = Vec::with_capacity(ids.len() - prompt);
    for &id in &ids[prompt..] {
        let t = Instant::now();
        let input = Tensor::new(&[id], &dev)?.unsqueeze(0)?;
        let logits = on_pool(&dev, || m.next_token_logits(&input, &mut cache))?;
        logits.to_vec2::<f32>()?;
        per_token.push(t.elapsed().as_secs_f64());
    }
    Ok((t0.elapsed().as_secs_f64(), per_token))
}

/// The uncached generation: the whole sequence so far for every token.
fn uncached(m: &GPT2LMHeadModel, ids: &[u32], prompt: usize) -> Result<f64> {
    let dev = Device::Cpu;
    let t0 = Instant::now();
    for end in prompt..=ids.len() {
        let input = Tensor::new(&ids[..end], &dev)?.unsqueeze(0)?;
        let logits = on_pool(&dev, || m.forward_t(&input, None, false))?;
        logits.get(0)?.get(end - 1)?.to_vec1::<f32>()?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// The GPT-2 `spt-train` builds for `mode` (the SPT preset's routers fitted on random tokens).
fn model(mode: Mode, cfg_path: &Path, vocab: usize) -> Result<(GPT2LMHeadModel, f64)> {
    let dev = Device::Cpu;
    let cfg = FinetuneConfig {
        task: TaskKind::Lm,
        modules_to_save: Vec::new(),
        ..base_config(mode, TaskKind::Lm, effective(mode, None))
    };
    let calibration = if mode == Mode::Spt {
        let data = synthetic_data(TaskKind::Lm, vocab, 4, 512, 7);
        calibration_batches(&data, 1, 4, 7, &dev)?
    } else {
        Vec::new()
    };
    let src = random_gpt2_weights(cfg_path, 7, &dev)?;
    let t0 = Instant::now();
    let mut task = ModelTask::build_from_source(&cfg, cfg_path, &src, None, &dev, calibration)?;
    task.net.freeze()?; // as spt-train generate does
    let build_s = t0.elapsed().as_secs_f64();
    match task.net {
        Net::Lm(m) => Ok((*m, build_s)),
        Net::Classifier(_) => bail!("{} is not a GPT-2", cfg_path.display()),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One mode's cases, in this (fresh) process: a JSON record per case on stdout, progress on
/// stderr.
fn child(mode_name: &str, cfg_path: &Path) -> Result<()> {
    let vocab = GPT2Config::from_file(cfg_path)?.vocab_size;
    let mut records: Vec<serde_json::Value> = Vec::new();
    // `dense-bf16`, `spt-bf16`: the mode's 128-token case with bf16 products (the model built in
    // f32, as spt-train builds it, then `--matmul-precision bf16`).
    let (mode_name, bf16) = match mode_name.split_once('-') {
        Some((m, "bf16")) => (m, true),
        _ => (mode_name, false),
    };
    let mode = match mode_name {
        "dense" => Mode::Dense,
        "lora" => Mode::Lora,
        "spt" => Mode::Spt,
        m => bail!("unknown mode {m}"),
    };
    let (m, build_s) = model(mode, cfg_path, vocab)?;
    let precision = if bf16 {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    };
    spt_ops::set_matmul_precision(precision);
    let cases: Vec<_> = CASES
        .iter()
        .filter(|c| c.0 == mode && (!bf16 || c.2 == 128))
        .collect();
    let mut baselines = Vec::new();
    for &&(_, prompt, new, run_baseline) in &cases {
        let ids = tokens(prompt + new, vocab);
        let load_before = loadavg();
        cached(&m, &ids[..prompt + 8], prompt)?; // warm-up
        let (mut totals, mut per_token) = (Vec::new(), Vec::new());
        for _ in 0..REPS {
            let (t, p) = cached(&m, &ids, prompt)?;
            totals.push(t);
            per_token.extend(p);
        }
        let rss = peak_rss_bytes()?;
        let (total, token) = (median(&totals), median(&per_token));
        eprintln!(
            "{mode_name} ({precision}): prompt {prompt} + {new} new tokens: {total:.3} s ({:.2} ms / token), peak RSS {} MiB",
            token * 1e3,
            rss >> 20
        );
        let mut case = serde_json::json!({"model": "gpt2-small", "mode": mode_name, "batch": 1, "prompt": prompt, "new_tokens": new});
        if bf16 {
            case["matmul_precision"] = precision.to_string().into();
        }
        let rec = serde_json::json!({
            "case": case,
            "ours_s": total,
            "ours_token_s": token,
            "ours_runs_s": totals,
            "ours_bytes": rss,
            "bytes_kind": "peak RSS of the mode's process after the case's cached runs (the model's build included: the random weights and the model's copy of them)",
            "build_s": build_s,
            "reps": REPS,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        });
        baselines.push((run_baseline && !bf16, ids));
        records.push(rec);
    }
    // The uncached baseline after every cached run: its graphs would raise the peak RSS.
    for (rec, (run, ids)) in records.iter_mut().zip(&baselines) {
        if !run {
            continue;
        }
        let prompt = rec["case"]["prompt"].as_u64().context("prompt")? as usize;
        let b = uncached(&m, ids, prompt)?;
        let total = rec["ours_s"].as_f64().context("ours_s")?;
        eprintln!(
            "{mode_name}: {} new tokens, uncached: {b:.3} s ({:.2}x)",
            ids.len() - prompt,
            b / total
        );
        rec["baseline_s"] = b.into();
        rec["speedup"] = (b / total).into();
    }
    for r in &records {
        println!("{r}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let root = spt_train::bench::start()?;
    let cfg_path = root.join("bench/configs/gpt2-small/config.json");
    if let Ok(mode) = std::env::var(CHILD) {
        return child(&mode, &cfg_path);
    }
    // One process per mode, so that each peak RSS is its mode's own.
    let records = child_records(CHILD, &["dense", "lora", "spt", "dense-bf16", "spt-bf16"])?;
    let doc = serde_json::json!({
        "command": COMMAND,
        "machine": machine_json(),
        "ours": "GPT2LMHeadModel::next_token_logits with a KvCache: the prompt in one call, then one position per call; the LM head for the last position only; the model of each mode as spt-train builds it",
        "baseline": "dense only: forward_t over the whole sequence for every new token, the last position's logits (spt-train generate before the cache)",
        "records": records,
    });
    let path = root.join("bench/results/generate.json");
    write_results(&path, &doc)?;
    println!("wrote {}", path.display());
    Ok(())
}
