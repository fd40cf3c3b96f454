//! Attention mass captured by each key selection on real activations, every layer's queries and
//! keys from one forward pass:
//! - all-MiniLM-L6-v2 on Rotten Tomatoes reviews packed into rows of L = 512 tokens
//!   (`[CLS] review [SEP] review [SEP] …`), no mask;
//! - with `--gpt2 DIR`, also a GPT-2 (a 4-layer, 256-wide GPT-2 with 1024 positions, trained on
//!   SOTU 1790-1949 by `scripts/attention-fidelity.sh`) on SOTU addresses from 2000 on, the first
//!   L = 1024 tokens of every fifth address per row, causal mask.
//!
//! At the same number of keys per query `k`, per layer and head-averaged:
//! - `exact`: the true top-k allowed keys per query (the ceiling of any per-query choice);
//! - `per_query`: spt's ADC top-k from a PQ codebook fitted on the layer's keys;
//! - `blocks`: block mode, query tiles and key blocks of `tile` tokens, `k / tile` blocks per tile
//!   chosen by the mean block score (spt-ops' default), and by the upper-bound score.
//!
//! Mass captured = Σ over kept keys of the query's dense softmax probability, averaged over
//! queries (under the causal mask, queries with at most k allowed keys keep all of them, mass 1,
//! in every method). Writes `bench/results/attention-fidelity.json`.
//!
//! Run: `scripts/attention-fidelity.sh` (both models; needs `scripts/fetch-assets.sh minilm rt
//! gpt2-tokenizer sotu`), or `cargo run --release -p spt-train --example attention_fidelity` for
//! MiniLM alone.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use spt_models::{BertModel, CalibrationBatch, GPT2LMHeadModel, LayerTrace, LoadOptions, SptModel};
use spt_ops::block_sparse_attention::reference::{block_keep_mask, captured_mass, key_keep_mask};
use spt_ops::{
    select_blocks, select_keys, AttentionMask, BlockScore, BlockTiling, Codebook, KeyTopK, PqConfig,
};
use spt_train::data::TextTokenizer as Tokenizer;
use std::path::Path;

const ROWS: usize = 4;
const LEN: usize = 512;
const GPT2_LEN: usize = 1024;

/// Reviews packed into `ROWS` rows of exactly `LEN` ids, the last review of a row cut to fit.
fn packed_rows(tok: &Tokenizer, csv_path: &Path) -> Result<Vec<u32>> {
    let mut rd =
        csv::Reader::from_path(csv_path).with_context(|| format!("reading {}", csv_path.display()))?;
    let col = rd
        .headers()?
        .iter()
        .position(|h| h == "text")
        .with_context(|| format!("{}: no `text` column", csv_path.display()))?;
    let vocab = tok.inner().get_vocab(true);
    let (cls, sep) = (vocab.get("[CLS]").copied(), vocab.get("[SEP]").copied());
    let (Some(cls), Some(sep)) = (cls, sep) else {
        bail!("the tokenizer has no [CLS] / [SEP] tokens")
    };
    let mut ids = Vec::with_capacity(ROWS * LEN);
    let mut row = vec![cls];
    // Every 7th review: a spread of movies rather than consecutive reviews of one film.
    for rec in rd.records().step_by(7) {
        let text = rec?.get(col).unwrap_or_default().to_string();
        let mut t = tok.encode_raw(&text)?;
        t.push(sep);
        let room = LEN - row.len();
        row.extend_from_slice(&t[..t.len().min(room)]);
        if row.len() == LEN {
            ids.append(&mut row);
            if ids.len() == ROWS * LEN {
                return Ok(ids);
            }
            row.push(cls);
        }
    }
    bail!(
        "{}: not enough text for {ROWS} rows of {LEN} tokens",
        csv_path.display()
    )
}

/// The true top-k allowed keys per query row (no mask, or causal): `[B·H·L·L]` keep flags.
fn exact_keep(q: &Tensor, k: &Tensor, kk: usize, causal: bool) -> Result<Vec<bool>> {
    let (lq, lk) = (q.dim(2)?, k.dim(2)?);
    let s = q.matmul(&k.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let mut keep = vec![false; s.len()];
    let mut idx: Vec<usize> = Vec::with_capacity(lk);
    for (r, row) in s.chunks(lk).enumerate() {
        let allowed = if causal { (r % lq + 1).min(lk) } else { lk };
        idx.clear();
        idx.extend(0..allowed);
        if allowed > kk {
            idx.select_nth_unstable_by(kk - 1, |&a, &b| row[b].total_cmp(&row[a]));
            idx.truncate(kk);
        }
        for &j in &idx {
            keep[r * lk + j] = true;
        }
    }
    Ok(keep)
}

/// One model's traced activations and how they were made.
struct Source {
    model: &'static str,
    data: &'static str,
    rows: usize,
    len: usize,
    causal: bool,
    traces: Vec<LayerTrace>,
}

/// Per layer and k: the mass of each selection; appends one record each.
fn measure(src: &Source, records: &mut Vec<serde_json::Value>) -> Result<()> {
    let mask = if src.causal {
        AttentionMask::causal()
    } else {
        AttentionMask::none()
    };
    let len = src.len;
    let tiles = [16usize, 32, 64];
    println!("{} ({}, B = {}, L = {len})", src.model, src.data, src.rows);
    println!(
        "{:>5} {:>4} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "layer", "k", "exact", "per-query", "blocks16", "blocks32", "blocks64"
    );
    for (layer, t) in src.traces.iter().enumerate() {
        let (q, k) = (t.queries.contiguous()?, t.keys.contiguous()?);
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        let cb = Codebook::fit(&k, &PqConfig::default())?;
        let codes = cb.encode(&k)?;
        for kk in [len / 8, len / 4, len / 2] {
            let exact_mask = exact_keep(&q, &k, kk, src.causal)?;
            let exact = captured_mass(&q, &k, &mask, scale, &exact_mask)?;
            let sel = select_keys(&q, &codes, &cb, KeyTopK::Count(kk), &mask)?;
            let per_query = captured_mass(&q, &k, &mask, scale, &key_keep_mask(&sel, len)?)?;
            let (mut blocks, mut upper) = (Vec::new(), Vec::new());
            for &tile in &tiles {
                let tiling = BlockTiling {
                    query_tile: tile,
                    key_block: tile,
                    top_blocks: kk / tile,
                };
                let (b, h) = (q.dim(0)?, q.dim(1)?);
                for (score, out) in [
                    (BlockScore::Mean, &mut blocks),
                    (BlockScore::UpperBound, &mut upper),
                ] {
                    let bsel = select_blocks(&q, &codes, &cb, tiling, &mask, score)?;
                    out.push(captured_mass(
                        &q,
                        &k,
                        &mask,
                        scale,
                        &block_keep_mask(&bsel, b, h, len, len)?,
                    )?);
                }
            }
            println!(
                "{layer:>5} {kk:>4} {exact:>7.4} {per_query:>9.4} {:>9.4} {:>9.4} {:>9.4}",
                blocks[0], blocks[1], blocks[2]
            );
            records.push(serde_json::json!({
                "model": src.model, "data": src.data, "mask": if src.causal { "causal" } else { "none" },
                "B": src.rows, "L": len, "layer": layer, "k": kk,
                "exact_topk": exact, "per_query": per_query,
                "blocks": tiles.iter().zip(&blocks).zip(&upper)
                    .map(|((t, m), u)| serde_json::json!({"tile": t, "mass": m, "mass_upper_bound_score": u}))
                    .collect::<Vec<_>>(),
            }));
        }
    }
    Ok(())
}

/// GPT-2 rows: the first `GPT2_LEN` tokens of every fifth SOTU address from 2000 on.
fn sotu_rows(tok: &Tokenizer, sotu_dir: &Path) -> Result<Vec<u32>> {
    let mut files: Vec<_> = std::fs::read_dir(sotu_dir)
        .with_context(|| format!("reading {}", sotu_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.get(..4))
                .and_then(|y| y.parse::<u32>().ok())
                .is_some_and(|y| y >= 2000)
        })
        .collect();
    files.sort();
    let mut ids = Vec::with_capacity(ROWS * GPT2_LEN);
    for f in files.iter().step_by(5) {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let t = tok.encode_raw(&text)?;
        if t.len() < GPT2_LEN {
            bail!("{}: {} tokens, fewer than {GPT2_LEN}", f.display(), t.len());
        }
        ids.extend_from_slice(&t[..GPT2_LEN]);
        if ids.len() == ROWS * GPT2_LEN {
            return Ok(ids);
        }
    }
    bail!(
        "{}: fewer than {ROWS} addresses from 2000 on (every fifth)",
        sotu_dir.display()
    )
}

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let gpt2_dir = match args.as_slice() {
        [] => None,
        [flag, dir] if flag == "--gpt2" => Some(Path::new(dir).to_path_buf()),
        _ => bail!("usage: attention_fidelity [--gpt2 DIR] (a GPT-2 checkpoint with >= 1024 positions)"),
    };
    let model_dir = root.join("third_party/all-MiniLM-L6-v2");
    let csv_path = root.join("data/rt/rotten_tomatoes_corpus_full.csv");
    if !model_dir.join("model.safetensors").is_file() || !csv_path.is_file() {
        bail!("assets missing: run scripts/fetch-assets.sh minilm rt");
    }
    let dev = Device::Cpu;
    let mut records = Vec::new();
    {
        let (model, _) = BertModel::from_dir(&model_dir, &LoadOptions::default())?;
        let tok = Tokenizer::from_model_dir(&model_dir, LEN)?;
        let ids = Tensor::from_vec(packed_rows(&tok, &csv_path)?, (ROWS, LEN), &dev)?;
        let src = Source {
            model: "all-MiniLM-L6-v2",
            data: "rotten_tomatoes, every 7th review, packed",
            rows: ROWS,
            len: LEN,
            causal: false,
            traces: model.trace(&CalibrationBatch::new(ids, None))?,
        };
        measure(&src, &mut records)?;
    }
    if let Some(dir) = &gpt2_dir {
        let tok_dir = root.join("third_party/gpt2-tokenizer");
        let sotu_dir = root.join("data/sotu");
        if !sotu_dir.is_dir() || !tok_dir.is_dir() {
            bail!("assets missing: run scripts/fetch-assets.sh gpt2-tokenizer sotu");
        }
        let (model, _) = GPT2LMHeadModel::from_dir(dir, &LoadOptions::default())
            .with_context(|| format!("loading GPT-2 from {}", dir.display()))?;
        let tok = Tokenizer::from_model_dir(&tok_dir, GPT2_LEN)?;
        let ids = Tensor::from_vec(sotu_rows(&tok, &sotu_dir)?, (ROWS, GPT2_LEN), &dev)?;
        let src = Source {
            model:
                "gpt2-mini-1024 (4 layers, 256 wide, 4 heads, 1024 positions; trained here on SOTU 1790-1949)",
            data: "SOTU addresses from 2000 on, every fifth, first 1024 tokens each",
            rows: ROWS,
            len: GPT2_LEN,
            causal: true,
            traces: model.trace(&CalibrationBatch::new(ids, None))?,
        };
        measure(&src, &mut records)?;
    }
    let models: Vec<String> = records.iter().fold(Vec::new(), |mut v, r| {
        let m = r["model"].as_str().unwrap_or_default().to_string();
        if !v.contains(&m) {
            v.push(m);
        }
        v
    });
    let mut summary = Vec::new();
    for model in &models {
        let of_model: Vec<&serde_json::Value> =
            records.iter().filter(|r| r["model"] == model.as_str()).collect();
        let len = of_model[0]["L"].as_u64().unwrap_or(0) as usize;
        let mean = |kk: usize, f: &dyn Fn(&serde_json::Value) -> f64| {
            let r: Vec<f64> = of_model.iter().filter(|r| r["k"] == kk).map(|r| f(r)).collect();
            r.iter().sum::<f64>() / r.len() as f64
        };
        for kk in [len / 8, len / 4, len / 2] {
            let mut s = serde_json::json!({
                "model": model,
                "L": len,
                "k": kk,
                "exact_topk": mean(kk, &|r| r["exact_topk"].as_f64().unwrap_or(f64::NAN)),
                "per_query": mean(kk, &|r| r["per_query"].as_f64().unwrap_or(f64::NAN)),
            });
            for (i, tile) in [16, 32, 64].into_iter().enumerate() {
                s[format!("blocks_{tile}")] =
                    mean(kk, &|r| r["blocks"][i]["mass"].as_f64().unwrap_or(f64::NAN)).into();
                s[format!("blocks_{tile}_upper_bound_score")] = mean(kk, &|r| {
                    r["blocks"][i]["mass_upper_bound_score"]
                        .as_f64()
                        .unwrap_or(f64::NAN)
                })
                .into();
            }
            println!("mean over layers: {s}");
            summary.push(s);
        }
    }
    let out = serde_json::json!({
        "command": if gpt2_dir.is_some() { "scripts/attention-fidelity.sh" } else { "cargo run --release -p spt-train --example attention_fidelity" },
        "what": "mean attention probability mass of the kept keys, per query, dense softmax as truth; PQ: spt-ops PqConfig::default() fitted per layer on the same keys; block scores: mean (`mass`) and upper bound (`mass_upper_bound_score`)",
        "summary": summary,
        "records": records,
    });
    let dir = root.join("bench/results");
    let tmp = dir.join("attention-fidelity.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&out)?)?;
    std::fs::rename(&tmp, dir.join("attention-fidelity.json"))?;
    println!("wrote bench/results/attention-fidelity.json");
    Ok(())
}
