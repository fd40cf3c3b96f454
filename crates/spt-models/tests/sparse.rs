//! Sparse layers swapped in by `sparsify`: with every allowed key selected, sparse attention
//! reproduces the dense model's logits, loss and gradients (within 1e-5 relative); with few keys
//! GPT-2 stays causal.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use common::{expected, fixture, max_abs, rel_err};
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_models::pq::{KeyTopK, PqConfig};
use spt_models::{
    sparsify, ActivationAccounting, AttentionCore, BertForSequenceClassification, CalibrationBatch,
    GPT2LMHeadModel, KeyGrouping, LayerSelection, LoadOptions, NamedParams, SparseAttentionConfig, SptConfig,
    SptModel,
};
use std::collections::HashMap;

const TOL: f64 = 1e-5;

fn pq() -> PqConfig {
    PqConfig {
        n_subspaces: 4,
        n_codewords: 8,
        kmeans_iters: 5,
        ..PqConfig::default()
    }
}

fn attention_only(top_k: KeyTopK) -> SptConfig {
    SptConfig {
        layers: LayerSelection::All,
        attention: Some(SparseAttentionConfig {
            pq: pq(),
            top_k,
            grouping: Default::default(),
        }),
        ..SptConfig::default()
    }
}

/// The tiny GPT-2 fixture with PQ attention keeping 5 keys (calibrated on the fixture's batch),
/// and that batch's ids and mask.
fn sparsified_tiny_gpt2() -> Result<(GPT2LMHeadModel, Tensor, Tensor)> {
    let exp = expected("tiny-gpt2")?;
    let (ids, mask) = (exp["input_ids"].clone(), exp["attention_mask"].clone());
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    sparsify(
        &mut m,
        &attention_only(KeyTopK::Count(5)),
        &[CalibrationBatch::new(ids.clone(), Some(mask.clone()))],
    )?;
    Ok((m, ids, mask))
}

/// Compares every gradient of two models with the same parameter names; returns the worst
/// relative error.
fn compare_grads(
    a: &[(String, candle_core::Var)],
    ga: &candle_core::backprop::GradStore,
    b: &[(String, candle_core::Var)],
    gb: &candle_core::backprop::GradStore,
) -> Result<f64> {
    let bm: HashMap<&str, &candle_core::Var> = b.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut worst = 0f64;
    for (name, va) in a {
        let vb = bm
            .get(name.as_str())
            .with_context(|| format!("{name} missing in the sparse model"))?;
        let (x, y) = (
            ga.get(va).context("dense grad")?,
            gb.get(vb).with_context(|| format!("sparse grad {name}"))?,
        );
        // max|Δ| / max(max|ref|, 1e-6): the key biases' gradient is exactly zero in theory
        // (softmax is shift-invariant), so both sides are ~1e-12 rounding noise there.
        let scale = x
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            .max(1e-6);
        let e = max_abs(x, y)? / scale;
        assert!(e < TOL, "grad {name}: rel err {e:e}");
        worst = worst.max(e);
    }
    Ok(worst)
}

#[test]
fn gpt2_sparse_attention_with_all_keys_equals_dense() -> Result<()> {
    let exp = expected("tiny-gpt2")?;
    let (ids, mask) = (&exp["input_ids"], &exp["attention_mask"]);
    let (dense, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::default())?;
    let (mut sparse, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::default())?;
    let calib = [CalibrationBatch::new(ids.clone(), Some(mask.clone()))];
    let report = sparsify(&mut sparse, &attention_only(KeyTopK::Count(1 << 20)), &calib)?;
    assert_eq!(report.layers.len(), 2);
    assert!(report
        .layers
        .iter()
        .all(|l| l.attention == "sparse" && l.calibration_tokens == 24 + 19));
    assert!(matches!(
        sparse.transformer.h[1].attn.core,
        AttentionCore::Sparse(_)
    ));

    let (ld, lossd) = dense.forward_with_loss(ids, Some(mask), false)?;
    let (ls, losss) = sparse.forward_with_loss(ids, Some(mask), false)?;
    let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let e_logits = rel_err(&ls.broadcast_mul(&m)?, &ld.broadcast_mul(&m)?)?;
    assert!(e_logits < TOL, "logits rel err {e_logits:e}");
    let e_loss = rel_err(&losss, &lossd)?;
    assert!(e_loss < TOL, "loss rel err {e_loss:e}");
    let e_grad = compare_grads(
        &dense.named_vars(),
        &lossd.backward()?,
        &sparse.named_vars(),
        &losss.backward()?,
    )?;
    eprintln!("gpt2 sparse(k = all) vs dense: logits {e_logits:.2e}, loss {e_loss:.2e}, grads {e_grad:.2e}");
    Ok(())
}

#[test]
fn bert_sparse_attention_with_all_keys_equals_dense() -> Result<()> {
    let exp = expected("tiny-bert-cls")?;
    let (ids, types, mask) = (&exp["input_ids"], &exp["token_type_ids"], &exp["attention_mask"]);
    let dir = fixture("tiny-bert-cls");
    let (dense, _) = BertForSequenceClassification::from_dir(&dir, &LoadOptions::default(), None)?;
    let (mut sparse, _) = BertForSequenceClassification::from_dir(&dir, &LoadOptions::default(), None)?;
    let calib = [CalibrationBatch {
        input_ids: ids.clone(),
        attention_mask: Some(mask.clone()),
        token_type_ids: Some(types.clone()),
    }];
    sparsify(&mut sparse, &attention_only(KeyTopK::Fraction(1.0)), &calib)?;
    assert!(sparse
        .bert
        .layers
        .iter()
        .all(|l| matches!(l.attention.self_attn.core, AttentionCore::Sparse(_))));
    // The hidden states (not just the 3 logits) agree too.
    let hd = dense.bert.forward_t(ids, Some(types), Some(mask), false)?;
    let hs = sparse.bert.forward_t(ids, Some(types), Some(mask), false)?;
    let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let e_hidden = rel_err(&hs.broadcast_mul(&m)?, &hd.broadcast_mul(&m)?)?;
    assert!(e_hidden < TOL, "hidden rel err {e_hidden:e}");
    // A really sparse BERT (2 keys per query) differs from dense.
    let (mut few, _) = BertForSequenceClassification::from_dir(&dir, &LoadOptions::frozen(), None)?;
    sparsify(&mut few, &attention_only(KeyTopK::Count(2)), &calib)?;
    let hf = few.bert.forward_t(ids, Some(types), Some(mask), false)?;
    assert!(max_abs(&hf, &hd)? > 1e-3);

    let ld = dense.forward_t(ids, Some(types), Some(mask), false)?;
    let ls = sparse.forward_t(ids, Some(types), Some(mask), false)?;
    let e_logits = rel_err(&ls, &ld)?;
    assert!(e_logits < TOL, "logits rel err {e_logits:e}");
    let (lossd, losss) = (
        dense.loss(&ld, &exp["labels"])?,
        sparse.loss(&ls, &exp["labels"])?,
    );
    let e_loss = rel_err(&losss, &lossd)?;
    assert!(e_loss < TOL, "loss rel err {e_loss:e}");
    let e_grad = compare_grads(
        &dense.named_vars(),
        &lossd.backward()?,
        &sparse.named_vars(),
        &losss.backward()?,
    )?;
    eprintln!("bert sparse(k = all) vs dense: hidden {e_hidden:.2e}, logits {e_logits:.2e}, loss {e_loss:.2e}, grads {e_grad:.2e}");
    Ok(())
}

#[test]
fn gpt2_sparse_attention_is_causal_and_sparse() -> Result<()> {
    let (dense, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let mut rng = StdRng::seed_from_u64(5);
    let (b, l) = (2, 40);
    let base: Vec<u32> = (0..b * l).map(|_| rng.random_range(0..1000)).collect();
    let ids = Tensor::from_vec(base.clone(), (b, l), &Device::Cpu)?;
    let report = sparsify(
        &mut m,
        &attention_only(KeyTopK::Count(6)),
        &[CalibrationBatch::new(ids.clone(), None)],
    )?;
    // Memory accounting follows the slots: attention state is k = 6 indices + 1 lse per row.
    let sparse_bytes = m.activation_bytes_per_layer(b, l, false);
    let dense_bytes = dense.activation_bytes_per_layer(b, l, false);
    assert_eq!(sparse_bytes.len(), 2);
    assert_eq!(sparse_bytes[0].attention_scores, b * 4 * l * (6 * 4 + 4));
    assert_eq!(dense_bytes[0].attention_scores, b * 4 * l * l * 4);
    assert!(sparse_bytes[1].total() < dense_bytes[1].total());
    assert!(report
        .layers
        .iter()
        .all(|r| r.quantization_mse.is_some_and(|q| q.is_finite())));

    let logits = m.forward_t(&ids, None, false)?;
    // With 6 of up to 40 keys the model is really sparse: later positions differ from dense.
    let dense_logits = dense.forward_t(&ids, None, false)?;
    assert!(max_abs(&logits.narrow(1, 7, l - 7)?, &dense_logits.narrow(1, 7, l - 7)?)? > 1e-4);
    // The first 6 positions have at most 6 allowed keys: identical to dense.
    assert!(max_abs(&logits.narrow(1, 0, 6)?, &dense_logits.narrow(1, 0, 6)?)? < 1e-5);

    for t in [0, 5, 17, 38] {
        let mut changed = base.clone();
        for row in 0..b {
            for j in t + 1..l {
                changed[row * l + j] = rng.random_range(0..1000);
            }
        }
        let c = m.forward_t(&Tensor::from_vec(changed, (b, l), &Device::Cpu)?, None, false)?;
        let d = max_abs(&logits.narrow(1, 0, t + 1)?, &c.narrow(1, 0, t + 1)?)?;
        assert!(d <= 1e-6, "t = {t}: sparse logits up to t changed by {d:e}");
    }
    Ok(())
}

#[test]
fn pq_codebooks_round_trip_without_calibration() -> Result<()> {
    let (mut a, ids, mask) = sparsified_tiny_gpt2()?;
    let (ids, mask) = (&ids, &mask);
    let books = a.named_buffers()?;
    let names: Vec<&str> = books.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "pq_codebook.layer.0",
            "pq_counts.layer.0",
            "pq_codebook.layer.1",
            "pq_counts.layer.1"
        ]
    );
    assert_eq!(books[0].1.dims(), [1, 4, 8, 4]);
    assert_eq!(books[1].1.dims(), [1, 4, 8]);
    let (mut b, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    // Codebooks need the attention settings to install; without them they are refused by name.
    let err = b.load_buffers(&books, None).unwrap_err().to_string();
    assert!(err.contains("`pq_codebook.layer.0`"), "{err}");
    // Settings a fit would refuse are refused here too, before anything is installed: block
    // tiles of no tokens (a division by zero at the forward) and a k of nothing.
    for (bad, named) in [
        ((KeyTopK::Count(5), KeyGrouping::Blocks { tile: 0 }), "tile"),
        ((KeyTopK::Count(0), KeyGrouping::PerQuery), "top_k"),
    ] {
        let err = b.load_buffers(&books, Some(bad)).unwrap_err().to_string();
        assert!(err.contains(named), "{err}");
    }
    assert_eq!(
        b.load_buffers(&books, Some((KeyTopK::Count(5), Default::default())))?,
        4
    );
    let (la, lb) = (
        a.forward_t(ids, Some(mask), false)?,
        b.forward_t(ids, Some(mask), false)?,
    );
    assert_eq!(max_abs(&la, &lb)?, 0.0);
    // The layer's fields are public: a block tile of 0 set by hand is an error at the forward.
    for layer in 0..b.num_layers() {
        if let AttentionCore::Sparse(s) = b.layer_slots(layer).unwrap().attention {
            s.grouping = KeyGrouping::Blocks { tile: 0 };
        }
    }
    let err = b.forward_t(ids, Some(mask), false).unwrap_err().to_string();
    assert!(err.contains("attention tile"), "{err}");
    Ok(())
}

#[test]
fn codebooks_refresh_on_new_batches() -> Result<()> {
    let (mut m, ids, mask) = sparsified_tiny_gpt2()?;
    let (ids, mask) = (&ids, &mask);
    let before = m.named_buffers()?;
    let mut rng = StdRng::seed_from_u64(3);
    let other: Vec<u32> = (0..2 * 30).map(|_| rng.random_range(0..1000)).collect();
    let batch = CalibrationBatch::new(Tensor::from_vec(other, (2, 30), &Device::Cpu)?, None);
    let refreshed = m.refresh_codebooks(&batch, spt_models::pq::Refresh::Ema { decay: 0.5 })?;
    assert_eq!(refreshed, 2);
    let after = m.named_buffers()?;
    let books = |v: &[(String, Tensor)]| -> Vec<Tensor> {
        v.iter()
            .filter(|(n, _)| n.starts_with("pq_codebook."))
            .map(|(_, t)| t.clone())
            .collect()
    };
    let (before, after) = (books(&before), books(&after));
    assert_eq!(before.len(), 2);
    for (a, b) in before.iter().zip(&after) {
        assert!(max_abs(a, b)? > 1e-6, "codebook did not move");
    }
    let logits = m.forward_t(ids, Some(mask), false)?;
    assert!(spt_ops::gradcheck::max_abs(&logits)?.is_finite());
    Ok(())
}

/// A checkpoint keeps each codebook's mini-batch counts (`pq_counts.layer.N`): a model restored
/// from `named_buffers` refreshes by mini-batch k-means exactly as the original, where the
/// codebooks alone (an older checkpoint, which still loads) would restart the counts at 0 and
/// move each codeword to the batch mean. Counts without their codebook, or of another shape,
/// are refused by name.
#[test]
fn minibatch_refresh_after_restoring_buffers_equals_the_original() -> Result<()> {
    use spt_models::pq::Refresh;
    let settings = Some((KeyTopK::Count(5), KeyGrouping::PerQuery));
    let (mut a, _, _) = sparsified_tiny_gpt2()?;
    let mut rng = StdRng::seed_from_u64(5);
    let mut batch = || -> Result<CalibrationBatch> {
        let v: Vec<u32> = (0..2 * 30).map(|_| rng.random_range(0..1000)).collect();
        Ok(CalibrationBatch::new(
            Tensor::from_vec(v, (2, 30), &Device::Cpu)?,
            None,
        ))
    };
    let (b1, b2) = (batch()?, batch()?);
    a.refresh_codebooks(&b1, Refresh::MiniBatch)?;
    let saved = a.named_buffers()?;
    let fresh = || GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen()).map(|m| m.0);
    let mut restored = fresh()?;
    assert_eq!(restored.load_buffers(&saved, settings)?, 4);
    let old_format: Vec<_> = saved
        .iter()
        .filter(|(n, _)| n.starts_with("pq_codebook."))
        .cloned()
        .collect();
    let mut countless = fresh()?;
    assert_eq!(countless.load_buffers(&old_format, settings)?, 2);
    for m in [&mut a, &mut restored, &mut countless] {
        assert_eq!(m.refresh_codebooks(&b2, Refresh::MiniBatch)?, 2);
    }
    let (wa, wr, wc) = (
        a.named_buffers()?,
        restored.named_buffers()?,
        countless.named_buffers()?,
    );
    assert_eq!(wa.len(), 4);
    for (((name, x), (_, y)), (_, z)) in wa.iter().zip(&wr).zip(&wc) {
        assert_eq!(
            max_abs(x, y)?,
            0.0,
            "{name}: the restored model refreshed differently"
        );
        if name.starts_with("pq_codebook.") {
            assert!(max_abs(x, z)? > 1e-3, "{name}: the counts made no difference");
        }
    }
    // Counts go with their codebook and its shape.
    let counts: Vec<_> = saved
        .iter()
        .filter(|(n, _)| n.starts_with("pq_counts."))
        .cloned()
        .collect();
    let e = fresh()?.load_buffers(&counts, settings).unwrap_err().to_string();
    assert!(
        e.contains("`pq_counts.layer.0`") && e.contains("pq_codebook.layer.0"),
        "{e}"
    );
    let mut wrong = saved.clone();
    wrong[1].1 = Tensor::zeros((1, 4, 7), DType::F32, &Device::Cpu)?;
    let e = fresh()?.load_buffers(&wrong, settings).unwrap_err().to_string();
    assert!(
        e.contains("`pq_counts.layer.0`") && e.contains("expected [G, S, C]"),
        "{e}"
    );
    Ok(())
}

/// Block mode through `sparsify`: with k covering every key it equals the dense model (the layer
/// then runs the fused dense kernel, so this checks the plumbing; the block kernel against dense
/// attention, ragged tiles included, is spt-ops' `block_sparse_attention` tests), and with fewer
/// keys (tiles of 5 tokens, the block kernel) GPT-2 stays causal (a later token cannot change an
/// earlier position's logits).
#[test]
fn gpt2_block_mode_with_all_keys_equals_dense_and_stays_causal() -> Result<()> {
    let exp = expected("tiny-gpt2")?;
    let (ids, mask) = (&exp["input_ids"], &exp["attention_mask"]);
    let (dense, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::default())?;
    let (mut blocks, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::default())?;
    let calib = [CalibrationBatch::new(ids.clone(), Some(mask.clone()))];
    let cfg = |top_k| SptConfig {
        layers: LayerSelection::All,
        attention: Some(SparseAttentionConfig {
            pq: pq(),
            top_k,
            grouping: KeyGrouping::Blocks { tile: 5 },
        }),
        ..SptConfig::default()
    };
    sparsify(&mut blocks, &cfg(KeyTopK::Fraction(1.0)), &calib)?;
    let (ld, lossd) = dense.forward_with_loss(ids, Some(mask), false)?;
    let (lb, lossb) = blocks.forward_with_loss(ids, Some(mask), false)?;
    let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let e_logits = rel_err(&lb.broadcast_mul(&m)?, &ld.broadcast_mul(&m)?)?;
    assert!(e_logits < TOL, "logits rel err {e_logits:e}");
    let e_grad = compare_grads(
        &dense.named_vars(),
        &lossd.backward()?,
        &blocks.named_vars(),
        &lossb.backward()?,
    )?;
    assert!(rel_err(&lossb, &lossd)? < TOL);

    let (mut few, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    sparsify(&mut few, &cfg(KeyTopK::Count(5)), &calib)?;
    let mut rng = StdRng::seed_from_u64(9);
    let base: Vec<u32> = (0..30).map(|_| rng.random_range(0..1000)).collect();
    let mut changed = base.clone();
    changed[29] = (changed[29] + 1) % 1000;
    let run = |v: Vec<u32>| -> Result<Tensor> {
        Ok(few.forward_t(&Tensor::from_vec(v, (1, 30), &Device::Cpu)?, None, false)?)
    };
    let (a, b) = (run(base)?, run(changed)?);
    assert_eq!(max_abs(&a.narrow(1, 0, 29)?, &b.narrow(1, 0, 29)?)?, 0.0);
    let hd = dense.forward_t(
        &Tensor::from_vec((0..30u32).collect::<Vec<_>>(), (1, 30), &Device::Cpu)?,
        None,
        false,
    )?;
    let hf = few.forward_t(
        &Tensor::from_vec((0..30u32).collect::<Vec<_>>(), (1, 30), &Device::Cpu)?,
        None,
        false,
    )?;
    assert!(
        max_abs(&hf, &hd)? > 1e-4,
        "5 keys per query should differ from dense"
    );
    eprintln!("gpt2 blocks(k = all) vs dense: logits {e_logits:.2e}, grads {e_grad:.2e}");
    Ok(())
}

/// With every key kept the layer runs the fused dense kernel (the fast path) and must give what
/// the per-query sparse kernel gives for all keys: values and q/k/v gradients, causal and
/// padded (including a query row with no allowed key: zeros in both).
#[test]
fn all_keys_dispatch_equals_the_sparse_kernel() -> Result<()> {
    use spt_models::SparseAttention;
    use spt_ops::pq::Selection;
    use spt_ops::AttentionMask;
    let (b, h, l, d) = (2, 3, 21, 8);
    let var = |seed| -> Result<candle_core::Var> {
        Ok(candle_core::Var::from_tensor(
            &spt_ops::gradcheck::randn_f64(&[b, h, l, d], seed)?.to_dtype(DType::F32)?,
        )?)
    };
    let (q, k, v) = (var(1)?, var(2)?, var(3)?);
    let attn = SparseAttention::fit(
        k.as_tensor(),
        &pq(),
        KeyTopK::Fraction(1.0),
        KeyGrouping::PerQuery,
    )?;
    let pad: Vec<u32> = (0..b * l)
        .map(|i| u32::from(!(i < l && i % l >= 15 || i == l)))
        .collect();
    let pad = Tensor::from_vec(pad, (b, l), &Device::Cpu)?;
    let up = spt_ops::gradcheck::randn_f64(&[b, h, l, d], 4)?.to_dtype(DType::F32)?;
    for mask in [
        AttentionMask::causal().with_key_padding(pad.clone()),
        AttentionMask::none().with_key_padding(pad.clone()),
    ] {
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fast = attn.forward(qt, kt, vt, &mask, 0.3)?;
        let all = Selection::PerQuery { k: KeyTopK::Count(l) };
        let sparse = spt_ops::pq_attention(qt, kt, vt, &attn.codebook, all, &mask, 0.3)?;
        assert!(max_abs(&fast, &sparse)? < 1e-5);
        let (gf, gs) = (
            (fast * &up)?.sum_all()?.backward()?,
            (sparse * &up)?.sum_all()?.backward()?,
        );
        for t in [qt, kt, vt] {
            assert!(max_abs(gf.get(t).context("fast grad")?, gs.get(t).context("sparse grad")?)? < 1e-4);
        }
    }
    Ok(())
}
