//! Classification inference with all-MiniLM-L6-v2 (`third_party/all-MiniLM-L6-v2`, the real
//! checkpoint with a 2-label head) on real texts: the first `TEXTS` reviews of Rotten Tomatoes
//! (`data/rt`, `plot` rows dropped, file order), tokenised to at most 64 tokens as
//! `scripts/demo.sh` trains on them. The model of each mode as `spt-train predict` loads it:
//! dense (an exported model: every weight as loaded), and SPT (the fast preset's checkpoint:
//! FFN 2 of 8 + linear correction, every attention key, LoRA r 8 unmerged; routers fitted on
//! these texts); every parameter frozen, as `predict` and `eval` freeze them.
//!
//! Cases (the forward, the softmax and the read of the probabilities to the host, as `spt-train
//! predict` runs them; tokenisation excluded on both sides):
//! - batch 1: each of the first `SINGLE` texts alone (a request at a time), unpadded;
//! - batch 32: the `TEXTS` texts in file order, each batch padded to its longest (what a plain
//!   PyTorch loop does; `spt-train predict` sorts by length first, see the `sorted` case);
//! - batch 32 sorted: the same texts batched as `spt-train predict` and `eval` batch them
//!   (sorted by length, so padding is small).
//!
//! Each mode runs in f32 and with bf16 products (`--matmul-precision bf16`: records with
//! `matmul_precision`; PyTorch then runs under bf16 autocast).
//!
//! Times: the whole case, median of `REPS` runs after one warm-up. Memory: the peak RSS of a
//! process per mode after its cases (weights included). Writes bench/results/predict.json;
//! bench/peer/predict.py adds PyTorch + transformers on the same batches.
//!
//!     cargo bench -p spt-train --bench predict [-- CASE]   # CASE: run the cases whose name
//!                                                          # contains it (no file written)

use anyhow::{bail, Result};
use candle_core::Device;
use spt_train::bench::{child_records, machine_json, median, peak_rss_bytes, write_results};
use spt_train::config::{FinetuneConfig, Mode};
use spt_train::data::{epoch_batches, read_classification, BatchOrder, ColumnSpec, EncodedDataset};
use spt_train::data::{EncodedItem, TaskKind, TextTokenizer};
use spt_train::presets::{base_config, effective};
use spt_train::tasks::{calibration_batches, ModelTask};
use std::path::Path;
use std::time::Instant;

/// As in the `spt-train` binary: freed buffers are kept for reuse (`spt_train::alloc`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const COMMAND: &str = "cargo bench -p spt-train --bench predict";
const REPS: usize = 5;
const TEXTS: usize = 1024;
const SINGLE: usize = 64;
const MAX_LENGTH: usize = 64;
const BATCH: usize = 32;
/// The environment variable that makes this binary run one mode's cases (see `main`).
const CHILD: &str = "SPT_PREDICT_BENCH_MODE";

/// The reviews, tokenised, in file order.
fn texts(root: &Path, model_dir: &Path) -> Result<EncodedDataset> {
    let csv = root.join("data/rt/rotten_tomatoes_corpus_full.csv");
    if !csv.is_file() {
        bail!("{} is missing: run scripts/fetch-assets.sh rt", csv.display());
    }
    let cols = ColumnSpec {
        text: "text".into(),
        text_pair: None,
        label: Some("category".into()),
        group: None,
    };
    let data = read_classification(&csv, None, &cols, &["plot".to_string()])?;
    let tok = TextTokenizer::from_model_dir(model_dir, MAX_LENGTH)?;
    let items = data
        .examples
        .iter()
        .take(TEXTS)
        .map(|e| {
            let enc = tok.encode(&e.text, None, &format!("{}:{}", csv.display(), e.line))?;
            Ok(EncodedItem {
                input_ids: enc.ids,
                token_type_ids: enc.type_ids,
                label: Some(0),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if items.len() < TEXTS {
        bail!(
            "{} has {} reviews, the bench reads {TEXTS}",
            csv.display(),
            items.len()
        );
    }
    Ok(EncodedDataset {
        task: TaskKind::Classify,
        items,
        pad_id: tok.pad_id(),
    })
}

/// The classifier `spt-train predict` loads for `mode` (SPT: routers fitted on `data`).
fn model(mode: Mode, model_dir: &Path, data: &EncodedDataset) -> Result<(ModelTask, f64)> {
    let dev = Device::Cpu;
    let cfg = FinetuneConfig {
        task: TaskKind::Classify,
        ..base_config(mode, TaskKind::Classify, effective(mode, None))
    };
    let calibration = match mode {
        Mode::Spt => calibration_batches(data, cfg.calibration_batches, 16, cfg.seed, &dev)?,
        _ => Vec::new(),
    };
    let t0 = Instant::now();
    let task = ModelTask::build(&cfg, model_dir, Some(2), &dev, calibration)?;
    Ok((task, t0.elapsed().as_secs_f64()))
}

/// Runs every batch once: (seconds, padded tokens).
fn run(task: &ModelTask, data: &EncodedDataset, batches: &[Vec<usize>]) -> Result<(f64, usize)> {
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let mut padded = 0;
    for b in batches {
        let batch = data.batch(b, &dev)?;
        padded += batch.input_ids.elem_count();
        task.net.probabilities(&batch)?;
    }
    Ok((t0.elapsed().as_secs_f64(), padded))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A case: its name, batch size, and batches (item indices).
type Case = (&'static str, usize, Vec<Vec<usize>>);

fn cases(data: &EncodedDataset) -> Result<Vec<Case>> {
    let file_order: Vec<usize> = (0..data.len()).collect();
    Ok(vec![
        ("single", 1, (0..SINGLE).map(|i| vec![i]).collect()),
        (
            "file order",
            BATCH,
            file_order.chunks(BATCH).map(<[usize]>::to_vec).collect(),
        ),
        (
            "sorted",
            BATCH,
            epoch_batches(&data.lengths(), BATCH, 0, 0, BatchOrder::EVAL)?,
        ),
    ])
}

/// The case filter: the first argument that is not a flag (cargo passes `--bench`).
fn filter() -> Option<String> {
    std::env::args().skip(1).find(|a| !a.starts_with('-'))
}

/// One mode's cases, in this (fresh) process: a JSON record per case on stdout.
fn child(mode_name: &str, root: &Path) -> Result<()> {
    let model_dir = root.join("third_party/all-MiniLM-L6-v2");
    if !model_dir.join("model.safetensors").is_file() {
        bail!(
            "{} is missing: run scripts/fetch-assets.sh minilm",
            model_dir.display()
        );
    }
    let (mode_name, precision) = match mode_name.split_once('-') {
        Some((m, "bf16")) => (m, spt_ops::MatmulPrecision::Bf16),
        _ => (mode_name, spt_ops::MatmulPrecision::F32),
    };
    let mode = match mode_name {
        "dense" => Mode::Dense,
        "spt" => Mode::Spt,
        m => bail!("unknown mode {m}"),
    };
    // The model is built (and the SPT routers fitted) in f32, as a checkpoint of any run is.
    spt_ops::set_matmul_precision(spt_ops::MatmulPrecision::F32);
    let data = texts(root, &model_dir)?;
    let (mut task, build_s) = model(mode, &model_dir, &data)?;
    task.net.freeze()?; // as predict and eval do
    spt_ops::set_matmul_precision(precision);
    let only = filter();
    for (name, batch, batches) in cases(&data)? {
        if only.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let load_before = loadavg();
        run(&task, &data, &batches)?; // warm-up
        let mut times = Vec::new();
        let mut padded = 0;
        for _ in 0..REPS {
            let (t, p) = run(&task, &data, &batches)?;
            times.push(t);
            padded = p;
        }
        let texts: usize = batches.iter().map(Vec::len).sum();
        let tokens: usize = batches
            .iter()
            .flatten()
            .map(|&i| data.items[i].input_ids.len())
            .sum();
        let total = median(&times);
        let rss = peak_rss_bytes()?;
        eprintln!(
            "{mode_name} ({precision}): {name}: {texts} texts in {} batches: {total:.3} s ({:.2} ms / text), {padded} padded tokens, peak RSS {} MiB",
            batches.len(),
            total / texts as f64 * 1e3,
            rss >> 20
        );
        let mut case = serde_json::json!({"model": "all-MiniLM-L6-v2", "mode": mode_name, "batches": name, "batch_size": batch, "texts": texts});
        if precision != spt_ops::MatmulPrecision::F32 {
            case["matmul_precision"] = precision.to_string().into();
        }
        let rec = serde_json::json!({
            "case": case,
            "tokens": tokens,
            "padded_tokens": padded,
            "batch_texts": batches,
            "ours_s": total,
            "ours_runs_s": times,
            "ours_bytes": rss,
            "bytes_kind": "peak RSS of the mode's process after the case's runs (the model's build and the earlier cases included)",
            "build_s": build_s,
            "reps": REPS,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        });
        println!("{rec}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let root = spt_train::bench::start()?;
    if let Ok(mode) = std::env::var(CHILD) {
        return child(&mode, &root);
    }
    // One process per mode, so that each peak RSS is its mode's own.
    let records = child_records(CHILD, &["dense", "spt", "dense-bf16", "spt-bf16"])?;
    if filter().is_some() {
        return Ok(()); // a subset of the cases is not the record
    }
    let doc = serde_json::json!({
        "command": COMMAND,
        "machine": machine_json(),
        "ours": "BertForSequenceClassification forward (eval), softmax, probabilities read to the host, per batch, as spt-train predict runs it; the model of each mode as spt-train loads it, its parameters frozen as predict freezes them",
        "records": records,
    });
    let path = root.join("bench/results/predict.json");
    write_results(&path, &doc)?;
    println!("wrote {}", path.display());
    Ok(())
}
