//! Attention mass captured by each key selection on real activations: all-MiniLM-L6-v2 on Rotten
//! Tomatoes reviews packed into rows of L = 512 tokens (`[CLS] review [SEP] review [SEP] …`),
//! every layer's queries and keys from one forward pass.
//!
//! At the same number of keys per query `k`, per layer and head-averaged:
//! - `exact`: the true top-k keys per query (the ceiling of any per-query choice);
//! - `per_query`: spt's ADC top-k from a PQ codebook fitted on the layer's keys;
//! - `blocks`: block mode, query tiles and key blocks of `tile` tokens, `k / tile` blocks per tile
//!   chosen by the mean block score (spt-ops' default), and by the upper-bound score.
//!
//! Mass captured = Σ over kept keys of the query's dense softmax probability, averaged over
//! queries. Writes `bench/results/attention-fidelity.json`.
//!
//! Run: `cargo run --release -p spt-train --example attention_fidelity` (needs
//! `scripts/fetch-assets.sh minilm rt`).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use spt_models::{BertModel, CalibrationBatch, LoadOptions, SptModel};
use spt_ops::block_sparse_attention::reference::{block_keep_mask, captured_mass, key_keep_mask};
use spt_ops::{
    select_blocks, select_keys, AttentionMask, BlockScore, BlockTiling, Codebook, KeyTopK, PqConfig,
};
use spt_train::data::TextTokenizer as Tokenizer;
use std::path::Path;

const ROWS: usize = 4;
const LEN: usize = 512;

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

/// The true top-k keys per query row (no mask): `[B·H·L·L]` keep flags.
fn exact_keep(q: &Tensor, k: &Tensor, kk: usize) -> Result<Vec<bool>> {
    let lk = k.dim(2)?;
    let s = q.matmul(&k.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let mut keep = vec![false; s.len()];
    let mut idx: Vec<usize> = Vec::with_capacity(lk);
    for (r, row) in s.chunks(lk).enumerate() {
        idx.clear();
        idx.extend(0..lk);
        idx.select_nth_unstable_by(kk - 1, |&a, &b| row[b].total_cmp(&row[a]));
        for &j in &idx[..kk] {
            keep[r * lk + j] = true;
        }
    }
    Ok(keep)
}

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model_dir = root.join("third_party/all-MiniLM-L6-v2");
    let csv_path = root.join("data/rt/rotten_tomatoes_corpus_full.csv");
    if !model_dir.join("model.safetensors").is_file() || !csv_path.is_file() {
        bail!("assets missing: run scripts/fetch-assets.sh minilm rt");
    }
    let dev = Device::Cpu;
    let (model, _) = BertModel::from_dir(&model_dir, &LoadOptions::default())?;
    let tok = Tokenizer::from_model_dir(&model_dir, LEN)?;
    let ids = Tensor::from_vec(packed_rows(&tok, &csv_path)?, (ROWS, LEN), &dev)?;
    let traces = model.trace(&CalibrationBatch::new(ids, None))?;
    let mask = AttentionMask::none();
    let ks = [LEN / 8, LEN / 4, LEN / 2];
    let tiles = [16usize, 32, 64];
    let mut records = Vec::new();
    println!(
        "{:>5} {:>4} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "layer", "k", "exact", "per-query", "blocks16", "blocks32", "blocks64"
    );
    for (layer, t) in traces.iter().enumerate() {
        let (q, k) = (t.queries.contiguous()?, t.keys.contiguous()?);
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        let cb = Codebook::fit(&k, &PqConfig::default())?;
        let codes = cb.encode(&k)?;
        for &kk in &ks {
            let exact = captured_mass(&q, &k, &mask, scale, &exact_keep(&q, &k, kk)?)?;
            let sel = select_keys(&q, &codes, &cb, KeyTopK::Count(kk), &mask)?;
            let per_query = captured_mass(&q, &k, &mask, scale, &key_keep_mask(&sel, LEN)?)?;
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
                        &block_keep_mask(&bsel, b, h, LEN, LEN)?,
                    )?);
                }
            }
            println!(
                "{layer:>5} {kk:>4} {exact:>7.4} {per_query:>9.4} {:>9.4} {:>9.4} {:>9.4}",
                blocks[0], blocks[1], blocks[2]
            );
            records.push(serde_json::json!({
                "model": "all-MiniLM-L6-v2", "data": "rotten_tomatoes, every 7th review, packed",
                "B": ROWS, "L": LEN, "layer": layer, "k": kk,
                "exact_topk": exact, "per_query": per_query,
                "blocks": tiles.iter().zip(&blocks).zip(&upper)
                    .map(|((t, m), u)| serde_json::json!({"tile": t, "mass": m, "mass_upper_bound_score": u}))
                    .collect::<Vec<_>>(),
            }));
        }
    }
    let mean = |kk: usize, f: &dyn Fn(&serde_json::Value) -> f64| {
        let r: Vec<f64> = records.iter().filter(|r| r["k"] == kk).map(f).collect();
        r.iter().sum::<f64>() / r.len() as f64
    };
    let mut summary = Vec::new();
    for &kk in &ks {
        let mut s = serde_json::json!({
            "k": kk,
            "exact_topk": mean(kk, &|r| r["exact_topk"].as_f64().unwrap_or(f64::NAN)),
            "per_query": mean(kk, &|r| r["per_query"].as_f64().unwrap_or(f64::NAN)),
        });
        for (i, &tile) in tiles.iter().enumerate() {
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
    let out = serde_json::json!({
        "command": "cargo run --release -p spt-train --example attention_fidelity",
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
