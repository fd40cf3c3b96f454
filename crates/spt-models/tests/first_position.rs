//! Sequence classification reads the last layer at the first position only, so that layer runs
//! its queries, attention and FFN for that position (or, in block mode, its query tile). The
//! logits and every gradient must equal those of the full forward, pooled afterwards.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs, rel_err};
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_models::lora::LoraConfig;
use spt_models::pq::{KeyTopK, PqConfig};
use spt_models::routed_ffn::{BlockTopK, RoutedFfnConfig};
use spt_models::{
    sparsify, BertForSequenceClassification, CalibrationBatch, KeyGrouping, LayerSelection, LoadOptions,
    LoraSettings, LoraTarget, NamedParams, SparseAttentionConfig, SptConfig,
};

const TOL: f64 = 1e-5;

/// Three sequences of 21 tokens, two of them padded (to 14 and 3 tokens).
fn batch() -> Result<(Tensor, Tensor)> {
    let (b, l) = (3, 21);
    let mut rng = StdRng::seed_from_u64(5);
    let ids: Vec<u32> = (0..b * l).map(|_| rng.random_range(1..1000)).collect();
    let lens = [21, 14, 3];
    let mask: Vec<u32> = (0..b * l).map(|i| u32::from(i % l < lens[i / l])).collect();
    Ok((
        Tensor::from_vec(ids, (b, l), &Device::Cpu)?,
        Tensor::from_vec(mask, (b, l), &Device::Cpu)?,
    ))
}

/// The classifier on the full forward's first position (HF's order of operations).
fn logits_from_full_forward(
    m: &BertForSequenceClassification,
    ids: &Tensor,
    mask: &Tensor,
    train: bool,
) -> Result<Tensor> {
    let h = m.bert.forward_t(ids, None, Some(mask), train)?;
    let pooled = m.dropout.forward_t(&m.bert.pool(&h)?, train)?;
    Ok(m.classifier.forward_t(&pooled, train)?)
}

/// Logits, loss and every trainable gradient of `m.forward_t` against the full forward's, in
/// evaluation and training mode (the fixture's dropouts are 0).
fn check(m: &BertForSequenceClassification, what: &str) -> Result<()> {
    let (ids, mask) = batch()?;
    let labels = Tensor::new(&[2u32, 0, 1], &Device::Cpu)?;
    for train in [false, true] {
        let first = m.forward_t(&ids, None, Some(&mask), train)?;
        let full = logits_from_full_forward(m, &ids, &mask, train)?;
        let e = rel_err(&first, &full)?;
        assert!(e < TOL, "{what} (train {train}): logits rel err {e:e}");
        let (ga, gb) = (
            m.loss(&first, &labels)?.backward()?,
            m.loss(&full, &labels)?.backward()?,
        );
        let vars = m.named_vars();
        assert!(!vars.is_empty());
        for (name, v) in &vars {
            let (a, b) = (
                ga.get(v)
                    .with_context(|| format!("{what}: no gradient for {name}"))?,
                gb.get(v)
                    .with_context(|| format!("{what}: no full-forward gradient for {name}"))?,
            );
            // Relative to the tensor's scale, floored for gradients that are ~0 in theory (a
            // value bias's is ~1e-5 here: rounding noise, not signal).
            let scale = b
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                .max(1e-4);
            let e = max_abs(a, b)? / scale;
            assert!(
                e < TOL,
                "{what} (train {train}): grad {name}: rel err {e:e} of {scale:e}"
            );
        }
    }
    Ok(())
}

fn load() -> Result<BertForSequenceClassification> {
    Ok(BertForSequenceClassification::from_dir(fixture("tiny-bert-cls"), &LoadOptions::default(), None)?.0)
}

#[test]
fn dense_model_first_position_equals_the_full_forward() -> Result<()> {
    check(&load()?, "dense")
}

/// Sparse attention (per query and in block mode, fewer keys than the sequence), a routed FFN
/// keeping 2 of 4 blocks, and LoRA with non-zero B factors on every projection.
#[test]
fn sparse_model_first_position_equals_the_full_forward() -> Result<()> {
    let (ids, mask) = batch()?;
    let calib = [CalibrationBatch::new(ids, Some(mask))];
    for grouping in [KeyGrouping::PerQuery, KeyGrouping::Blocks { tile: 4 }] {
        let mut m = load()?;
        let cfg = SptConfig {
            layers: LayerSelection::All,
            attention: Some(SparseAttentionConfig {
                pq: PqConfig {
                    n_subspaces: 4,
                    n_codewords: 8,
                    kmeans_iters: 5,
                    ..PqConfig::default()
                },
                top_k: KeyTopK::Count(6),
                grouping,
            }),
            ffn: Some(RoutedFfnConfig {
                seed: 3,
                ..RoutedFfnConfig::new(4, BlockTopK::Count(2))
            }),
            lora: Some(LoraSettings {
                targets: vec![
                    LoraTarget::Query,
                    LoraTarget::Key,
                    LoraTarget::Value,
                    LoraTarget::Output,
                    LoraTarget::Fc1,
                    LoraTarget::Fc2,
                ],
                config: LoraConfig {
                    rank: 4,
                    alpha: 8.0,
                    dropout: 0.0,
                    seed: 1,
                },
            }),
            ..SptConfig::default()
        };
        sparsify(&mut m, &cfg, &calib)?;
        let mut rng = StdRng::seed_from_u64(11);
        for (name, v) in m.named_vars() {
            if name.contains("lora_B") {
                let data: Vec<f32> = (0..v.elem_count())
                    .map(|_| rng.random_range(-0.05..0.05))
                    .collect();
                v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu)?)?;
            }
        }
        check(&m, &format!("{grouping:?}"))?;
    }
    Ok(())
}

/// A routed FFN trained with a load-balancing loss averages it over every token of the batch,
/// so in training the last layer then runs every position: the loss equals the full forward's.
#[test]
fn balancing_loss_still_sees_every_token() -> Result<()> {
    let (ids, mask) = batch()?;
    let calib = [CalibrationBatch::new(ids.clone(), Some(mask.clone()))];
    let mut m = load()?;
    let cfg = SptConfig {
        layers: LayerSelection::All,
        ffn: Some(RoutedFfnConfig {
            seed: 3,
            aux_loss: true,
            ..RoutedFfnConfig::new(4, BlockTopK::Count(2))
        }),
        ..SptConfig::default()
    };
    sparsify(&mut m, &cfg, &calib)?;
    let last = &m.bert.layers.last().context("layers")?.ffn;
    assert!(last.has_aux_loss());
    m.forward_t(&ids, None, Some(&mask), true)?;
    let first = last.take_aux_loss().context("aux loss")?;
    logits_from_full_forward(&m, &ids, &mask, true)?;
    let full = last.take_aux_loss().context("aux loss")?;
    assert_eq!(max_abs(&first, &full)?, 0.0);
    check(&m, "balancing loss")
}
