//! Routed FFN and LoRA swapped in by `sparsify`: all blocks with gate ≡ 1 reproduce the dense
//! model (logits, loss, gradients within 1e-5); LoRA starts as the identity update, trains only
//! its factors, and merges exactly; the fully sparse GPT-2 (sparse attention + routed FFN + LoRA)
//! stays causal and trains.

mod common;

use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var, D};
use common::{expected, fixture, max_abs, rel_err};
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_models::lora::LoraConfig;
use spt_models::pq::{KeyTopK, PqConfig};
use spt_models::routed_ffn::{BlockTopK, GateMode, RoutedFfnConfig, RouterFitConfig};
use spt_models::{
    sparsify, ActivationAccounting, BertForSequenceClassification, CalibrationBatch, FeedForward,
    FfnCalibration, GPT2LMHeadModel, LayerSelection, LoadOptions, LoraSettings, LoraTarget, ModelError,
    NamedParams, SparseAttentionConfig, SptConfig, SptModel, Trainable,
};
use std::collections::HashMap;

const TOL: f64 = 1e-5;

fn routed(n_blocks: usize, top_k: BlockTopK, gate: GateMode) -> RoutedFfnConfig {
    RoutedFfnConfig {
        gate,
        seed: 3,
        ..RoutedFfnConfig::new(n_blocks, top_k)
    }
}

/// The router fitted on the calibration tokens (contiguous units), or left at its seeded init.
fn calibration(fit: bool) -> FfnCalibration {
    FfnCalibration {
        router_fit: fit.then(RouterFitConfig::default),
        cluster_units: false,
    }
}

/// Every gradient of `a`'s vars that `b` also has (by name) agrees; returns the worst error
/// `max|Δ| / max(max|ref|, 1e-6)` (key biases have an exactly zero gradient).
fn compare_grads(a: &[(String, Var)], ga: &GradStore, b: &[(String, Var)], gb: &GradStore) -> Result<f64> {
    let bm: HashMap<&str, &Var> = b.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut worst = 0f64;
    for (name, va) in a {
        let vb = bm.get(name.as_str()).with_context(|| format!("{name} missing"))?;
        let (x, y) = (
            ga.get(va).context("dense grad")?,
            gb.get(vb).with_context(|| format!("grad {name}"))?,
        );
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
fn gpt2_routed_ffn_all_blocks_gate_one_equals_dense() -> Result<()> {
    let exp = expected("tiny-gpt2")?;
    let (ids, mask) = (&exp["input_ids"], &exp["attention_mask"]);
    let (dense, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::default())?;
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::default())?;
    let cfg = SptConfig {
        ffn: Some(routed(4, BlockTopK::Count(4), GateMode::Ones)),
        ffn_calibration: calibration(false),
        ..SptConfig::default()
    };
    let report = sparsify(&mut m, &cfg, &[])?;
    assert!(report
        .layers
        .iter()
        .all(|l| l.ffn == "routed" && l.attention == "dense"));
    assert!(matches!(m.transformer.h[0].mlp, FeedForward::Routed(_)));

    let (ld, lossd) = dense.forward_with_loss(ids, Some(mask), false)?;
    let (lr, lossr) = m.forward_with_loss(ids, Some(mask), false)?;
    let mk = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let e_logits = rel_err(&lr.broadcast_mul(&mk)?, &ld.broadcast_mul(&mk)?)?;
    assert!(e_logits < TOL, "logits rel err {e_logits:e}");
    let e_loss = rel_err(&lossr, &lossd)?;
    assert!(e_loss < TOL, "loss {e_loss:e}");
    let e_grad = compare_grads(
        &dense.named_vars(),
        &lossd.backward()?,
        &m.named_vars(),
        &lossr.backward()?,
    )?;
    // The router is a new trainable parameter with the HF-style name.
    let names: Vec<String> = m.named_vars().into_iter().map(|(k, _)| k).collect();
    assert!(
        names.contains(&"transformer.h.1.mlp.router.weight".to_string()),
        "{names:?}"
    );
    eprintln!("gpt2 routed(all blocks, gate 1) vs dense: logits {e_logits:.2e}, loss {e_loss:.2e}, grads {e_grad:.2e}");
    Ok(())
}

#[test]
fn bert_routed_ffn_and_sparse_attention_all_equals_dense() -> Result<()> {
    let exp = expected("tiny-bert-cls")?;
    let (ids, types, mask) = (&exp["input_ids"], &exp["token_type_ids"], &exp["attention_mask"]);
    let dir = fixture("tiny-bert-cls");
    let (dense, _) = BertForSequenceClassification::from_dir(&dir, &LoadOptions::default(), None)?;
    let (mut m, _) = BertForSequenceClassification::from_dir(&dir, &LoadOptions::default(), None)?;
    let cfg = SptConfig {
        layers: LayerSelection::All,
        attention: Some(SparseAttentionConfig {
            pq: PqConfig {
                n_subspaces: 4,
                n_codewords: 8,
                ..PqConfig::default()
            },
            top_k: KeyTopK::Fraction(1.0),
            grouping: Default::default(),
        }),
        ffn: Some(routed(8, BlockTopK::Fraction(1.0), GateMode::Ones)),
        ffn_calibration: calibration(true),
        lora: None,
    };
    let calib = [CalibrationBatch {
        input_ids: ids.clone(),
        attention_mask: Some(mask.clone()),
        token_type_ids: Some(types.clone()),
    }];
    let report = sparsify(&mut m, &cfg, &calib)?;
    for l in &report.layers {
        let r = l.routing.context("routing summary")?;
        // All blocks kept: the routed output is the dense one.
        assert!(
            r.rel_error < 1e-5 && (r.cosine - 1.0).abs() < 1e-6 && r.oracle_recall == 1.0,
            "{r:?}"
        );
    }
    let ld = dense.forward_t(ids, Some(types), Some(mask), false)?;
    let lr = m.forward_t(ids, Some(types), Some(mask), false)?;
    let e_logits = rel_err(&lr, &ld)?;
    assert!(e_logits < TOL, "logits {e_logits:e}");
    let (lossd, lossr) = (dense.loss(&ld, &exp["labels"])?, m.loss(&lr, &exp["labels"])?);
    let e_grad = compare_grads(
        &dense.named_vars(),
        &lossd.backward()?,
        &m.named_vars(),
        &lossr.backward()?,
    )?;
    eprintln!("bert sparse attention + routed FFN (all) vs dense: logits {e_logits:.2e}, grads {e_grad:.2e}");
    Ok(())
}

#[test]
fn lora_starts_at_identity_trains_only_factors_and_merges() -> Result<()> {
    let exp = expected("tiny-bert-cls")?;
    let (ids, types, mask) = (&exp["input_ids"], &exp["token_type_ids"], &exp["attention_mask"]);
    let dir = fixture("tiny-bert-cls");
    fn head(n: &str) -> bool {
        n.starts_with("classifier.")
    }
    let opts = LoadOptions {
        trainable: Trainable::only(head),
        ..LoadOptions::default()
    };
    let (dense, _) = BertForSequenceClassification::from_dir(&dir, &LoadOptions::frozen(), None)?;
    let (mut m, _) = BertForSequenceClassification::from_dir(&dir, &opts, None)?;
    let targets = vec![
        LoraTarget::Query,
        LoraTarget::Key,
        LoraTarget::Value,
        LoraTarget::Output,
        LoraTarget::Fc1,
        LoraTarget::Fc2,
    ];
    let cfg = SptConfig {
        lora: Some(LoraSettings {
            targets,
            config: LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.1,
                seed: 1,
            },
        }),
        ..SptConfig::default()
    };
    let report = sparsify(&mut m, &cfg, &[])?;
    assert_eq!(report.layers[0].lora.len(), 6);
    assert!(report.layers[1]
        .lora
        .contains(&"bert.encoder.layer.1.attention.self.query".to_string()));

    // B = 0: the adapted model starts equal to the base model.
    let l0 = m.forward_t(ids, Some(types), Some(mask), false)?;
    let ld = dense.forward_t(ids, Some(types), Some(mask), false)?;
    assert!(max_abs(&l0, &ld)? < 1e-6);

    // Trainable: the head and the LoRA factors (2 layers × 6 targets × 2), nothing else.
    let vars = m.named_vars();
    assert_eq!(vars.len(), 2 + 24);
    assert!(vars
        .iter()
        .any(|(k, _)| k == "bert.encoder.layer.0.output.dense.lora_B.weight"));
    assert!(vars
        .iter()
        .all(|(k, _)| k.starts_with("classifier.") || k.contains(".lora_")));
    let loss = m.loss(&m.forward_t(ids, Some(types), Some(mask), true)?, &exp["labels"])?;
    let grads = loss.backward()?;
    for (k, v) in &vars {
        let g = grads.get(v).with_context(|| format!("no grad for {k}"))?;
        // B gets a gradient at once; A's is zero while B = 0.
        if k.contains("lora_B") || k.starts_with("classifier.") {
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{k}");
        }
    }
    // Give B values, then merged == unmerged (alpha ≠ rank), and merging twice is a named error.
    let mut rng = StdRng::seed_from_u64(9);
    for (k, v) in &vars {
        if k.contains("lora_B") {
            let data: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.random_range(-0.05..0.05))
                .collect();
            v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu)?)?;
        }
    }
    // LoRA dropout (0.1) is drawn from the model's seed source: reseeding repeats it exactly.
    m.seed_dropout(4);
    let t1 = m.forward_t(ids, Some(types), Some(mask), true)?;
    let t2 = m.forward_t(ids, Some(types), Some(mask), true)?;
    m.seed_dropout(4);
    let t3 = m.forward_t(ids, Some(types), Some(mask), true)?;
    assert!(max_abs(&t1, &t2)? > 0.0);
    assert_eq!(max_abs(&t1, &t3)?, 0.0);
    let unmerged = m.forward_t(ids, Some(types), Some(mask), false)?;
    assert!(max_abs(&unmerged, &ld)? > 1e-4, "LoRA update had no effect");
    let layer = &mut m.bert.layers[0].attention.self_attn.query;
    layer.merge_lora()?;
    assert!(matches!(layer.merge_lora(), Err(ModelError::Lora(_))));
    let merged_w = layer.weight.tensor().clone();
    for l in m.bert.layers.iter_mut() {
        let sa = &mut l.attention.self_attn;
        for lin in [&mut sa.key, &mut sa.value, &mut l.attention.output.dense] {
            lin.merge_lora()?;
        }
        if let FeedForward::Dense(f) = &mut l.ffn {
            f.fc1.merge_lora()?;
            f.fc2.merge_lora()?;
        }
    }
    m.bert.layers[1].attention.self_attn.query.merge_lora()?;
    let merged = m.forward_t(ids, Some(types), Some(mask), false)?;
    assert!(
        max_abs(&merged, &unmerged)? < 1e-5,
        "merged {}",
        max_abs(&merged, &unmerged)?
    );
    // The exported weight is the merged one, under its HF name.
    let exported: HashMap<String, Tensor> = m.named_tensors().into_iter().collect();
    let q = &exported["bert.encoder.layer.0.attention.self.query.weight"];
    assert_eq!(max_abs(q, &merged_w)?, 0.0);
    Ok(())
}

#[test]
fn fully_sparse_gpt2_is_causal_and_trains() -> Result<()> {
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let mut rng = StdRng::seed_from_u64(21);
    let (b, l) = (2, 32);
    let base: Vec<u32> = (0..b * l).map(|_| rng.random_range(0..1000)).collect();
    let ids = Tensor::from_vec(base.clone(), (b, l), &Device::Cpu)?;
    let cfg = SptConfig {
        layers: LayerSelection::All,
        attention: Some(SparseAttentionConfig {
            pq: PqConfig {
                n_subspaces: 4,
                n_codewords: 16,
                ..PqConfig::default()
            },
            top_k: KeyTopK::Count(8),
            grouping: Default::default(),
        }),
        ffn: Some(routed(4, BlockTopK::Count(2), GateMode::SoftmaxKept)),
        ffn_calibration: calibration(true),
        lora: Some(LoraSettings {
            targets: vec![LoraTarget::Query, LoraTarget::Output, LoraTarget::Fc1],
            config: LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                seed: 5,
            },
        }),
    };
    let report = sparsify(&mut m, &cfg, &[CalibrationBatch::new(ids.clone(), None)])?;
    for r in &report.layers {
        assert_eq!((r.attention, r.ffn), ("sparse", "routed"));
        let q = r.routing.context("routing")?;
        assert!(q.oracle_recall > 0.3 && q.cosine > 0.5, "{q:?}");
        // c_attn (for q), c_proj, and the routed FFN's fc1+fc2.
        assert_eq!(r.lora.len(), 4, "{:?}", r.lora);
    }
    // Causal in the fully sparse model.
    let logits = m.forward_t(&ids, None, false)?;
    for t in [0, 9, 30] {
        let mut changed = base.clone();
        for row in 0..b {
            for j in t + 1..l {
                changed[row * l + j] = rng.random_range(0..1000);
            }
        }
        let c = m.forward_t(&Tensor::from_vec(changed, (b, l), &Device::Cpu)?, None, false)?;
        let d = max_abs(&logits.narrow(1, 0, t + 1)?, &c.narrow(1, 0, t + 1)?)?;
        assert!(d <= 1e-6, "t = {t}: {d:e}");
    }
    // Export: merging every adapter keeps the outputs (LoRA B is still 0 here, so compare after
    // giving B values) and leaves plain HF weights under their names.
    let mut rng2 = StdRng::seed_from_u64(8);
    for (k, v) in m.named_vars() {
        if k.contains("lora_B") {
            let data: Vec<f32> = (0..v.elem_count())
                .map(|_| rng2.random_range(-0.05..0.05))
                .collect();
            v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu)?)?;
        }
    }
    let (mut merged_model, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    sparsify(
        &mut merged_model,
        &cfg,
        &[CalibrationBatch::new(ids.clone(), None)],
    )?;
    let lora_values: HashMap<String, Tensor> = m
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    for (k, v) in merged_model.named_vars() {
        if let Some(t) = lora_values.get(&k) {
            v.set(t)?;
        }
    }
    let before = merged_model.forward_t(&ids, None, false)?;
    assert_eq!(merged_model.merge_lora()?, 2 * 3);
    assert_eq!(merged_model.merge_lora()?, 0);
    let after = merged_model.forward_t(&ids, None, false)?;
    assert!(
        max_abs(&before, &after)? < 1e-4,
        "merge changed the logits by {}",
        max_abs(&before, &after)?
    );

    // Trains: routers and LoRA factors get gradients; base weights are frozen.
    let vars = m.named_vars();
    assert!(
        vars.iter()
            .all(|(k, _)| k.contains(".router.") || k.contains(".lora_")),
        "{vars:?}"
    );
    let (_, loss) = m.forward_with_loss(&ids, None, true)?;
    assert!(loss.to_scalar::<f32>()?.is_finite());
    let grads = loss.backward()?;
    let with_grad = vars.iter().filter(|(_, v)| grads.get(v).is_some()).count();
    assert_eq!(with_grad, vars.len(), "variables with a gradient");
    let router = vars
        .iter()
        .find(|(k, _)| k == "transformer.h.0.mlp.router.weight")
        .context("router")?;
    assert!(
        grads
            .get(&router.1)
            .context("router grad")?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?
            > 0.0
    );
    // Memory: sparse attention + routed FFN keep less than dense per layer.
    let (dense, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let (sb, db) = (
        m.activation_bytes_per_layer(b, l, false),
        dense.activation_bytes_per_layer(b, l, false),
    );
    assert!(sb
        .iter()
        .zip(&db)
        .all(|(s, d)| s.total() < d.total() && s.ffn * 2 == d.ffn));
    Ok(())
}

#[test]
fn bad_routed_configs_are_named_and_leave_the_model_intact() -> Result<()> {
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let cfg = SptConfig {
        ffn: Some(routed(3, BlockTopK::Count(1), GateMode::Ones)),
        ffn_calibration: calibration(false),
        ..SptConfig::default()
    };
    let err = sparsify(&mut m, &cfg, &[]).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InvalidConfig {
                field: "ffn.n_blocks",
                ..
            }
        ),
        "{err}"
    );
    assert!(m
        .transformer
        .h
        .iter()
        .all(|b| matches!(b.mlp, FeedForward::Dense(_))));
    let cfg = SptConfig {
        layers: LayerSelection::Only(vec![5]),
        ..SptConfig::default()
    };
    assert!(matches!(
        sparsify(&mut m, &cfg, &[]),
        Err(ModelError::InvalidConfig { field: "layers", .. })
    ));
    let cfg = SptConfig {
        attention: Some(SparseAttentionConfig {
            pq: PqConfig::default(),
            top_k: KeyTopK::Count(4),
            grouping: Default::default(),
        }),
        ..SptConfig::default()
    };
    assert!(matches!(
        sparsify(&mut m, &cfg, &[]),
        Err(ModelError::InvalidConfig {
            field: "calibration_batches",
            ..
        })
    ));
    // A k that selects nothing is refused: at the forward it ran every key, dense attention
    // that looked sparse.
    for top_k in [
        KeyTopK::Count(0),
        KeyTopK::Fraction(f64::NAN),
        KeyTopK::Fraction(1.5),
        KeyTopK::Fraction(0.0),
    ] {
        let mut bad = cfg.clone();
        if let Some(a) = bad.attention.as_mut() {
            a.top_k = top_k;
        }
        let err = sparsify(&mut m, &bad, &[]).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::InvalidConfig {
                    field: "attention.top_k",
                    ..
                }
            ),
            "{top_k:?}: {err}"
        );
    }
    Ok(())
}

/// LoRA targets name q, k, v in either attention layout: `QueryKeyValue` on BERT wraps query,
/// key and value (it matched no BERT layer and added nothing, silently), as Query + Key + Value
/// do; Query on GPT-2 wraps its fused c_attn. A target that matches no selected layer is an
/// error naming it, and leaves the model as it was.
#[test]
fn lora_targets_match_q_k_v_in_both_layouts_and_an_unmatched_one_is_refused() -> Result<()> {
    let lora = |targets: Vec<LoraTarget>| {
        Some(LoraSettings {
            targets,
            config: LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                seed: 1,
            },
        })
    };
    let adapters = |m: &dyn NamedParams| -> Vec<String> {
        let mut v: Vec<String> = m
            .named_vars()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.contains("lora_"))
            .collect();
        v.sort();
        v
    };
    let bert =
        || BertForSequenceClassification::from_dir(fixture("tiny-bert-cls"), &LoadOptions::frozen(), None);
    let with = |targets| SptConfig {
        lora: lora(targets),
        ..SptConfig::default()
    };
    let (mut fused, _) = bert()?;
    let report = sparsify(&mut fused, &with(vec![LoraTarget::QueryKeyValue]), &[])?;
    let (mut split, _) = bert()?;
    sparsify(
        &mut split,
        &with(vec![LoraTarget::Query, LoraTarget::Key, LoraTarget::Value]),
        &[],
    )?;
    let names = adapters(&fused);
    assert_eq!(names, adapters(&split));
    // A and B of q, k, v in every layer, and nothing else.
    assert_eq!(names.len(), 2 * 3 * report.layers.len(), "{names:?}");
    for part in [".query.", ".key.", ".value."] {
        assert!(names.iter().any(|n| n.contains(part)), "{part}: {names:?}");
    }
    assert!(report.layers.iter().all(|l| l.lora.len() == 3), "{report:?}");
    // GPT-2: Query names the fused c_attn.
    let (mut g, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    sparsify(&mut g, &with(vec![LoraTarget::Query]), &[])?;
    let names = adapters(&g);
    assert!(
        !names.is_empty() && names.iter().all(|n| n.contains("c_attn")),
        "{names:?}"
    );

    // Unmatched: no layer selected, or fc1 of an FFN that is already routed (this call builds
    // no routed FFN to put it on).
    let (mut g, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let none = SptConfig {
        layers: LayerSelection::LastN(0),
        ..with(vec![LoraTarget::Output])
    };
    let err = sparsify(&mut g, &none, &[]).unwrap_err();
    assert!(
        matches!(&err, ModelError::InvalidConfig { field: "lora.targets", value, .. } if value == "Output"),
        "{err}"
    );
    sparsify(
        &mut g,
        &SptConfig {
            ffn: Some(routed(4, BlockTopK::Count(2), GateMode::Ones)),
            ffn_calibration: calibration(false),
            ..SptConfig::default()
        },
        &[],
    )?;
    let err = sparsify(&mut g, &with(vec![LoraTarget::Output, LoraTarget::Fc1]), &[]).unwrap_err();
    assert!(
        matches!(&err, ModelError::InvalidConfig { field: "lora.targets", value, .. } if value == "Fc1"),
        "{err}"
    );
    assert!(adapters(&g).is_empty(), "a refused sparsify added adapters");
    Ok(())
}

#[test]
fn router_aux_loss_is_collected_from_training_forwards_and_trains_the_router() -> Result<()> {
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let mut rng = StdRng::seed_from_u64(4);
    let ids: Vec<u32> = (0..2 * 16).map(|_| rng.random_range(0..1000)).collect();
    let ids = Tensor::from_vec(ids, (2, 16), &Device::Cpu)?;
    let mut ffn = routed(4, BlockTopK::Count(1), GateMode::SoftmaxKept);
    ffn.aux_loss = true;
    let cfg = SptConfig {
        layers: LayerSelection::All,
        attention: None,
        ffn: Some(ffn),
        ffn_calibration: calibration(false),
        lora: None,
    };
    sparsify(&mut m, &cfg, &[])?;
    // Eval forwards leave nothing to collect.
    m.forward_t(&ids, None, false)?;
    assert!(m.take_router_aux_loss()?.is_none());
    m.forward_t(&ids, None, true)?;
    let aux = m
        .take_router_aux_loss()?
        .context("aux loss after a training forward")?;
    assert!(m.take_router_aux_loss()?.is_none(), "taken twice");
    // n·Σ f_e·P_e with n = 4 blocks: positive, at most n.
    let v = aux.to_scalar::<f32>()?;
    assert!(v > 0.0 && v <= 4.0, "{v}");
    // Alone, it gives every router a gradient.
    let grads = aux.backward()?;
    for (k, var) in m.named_vars() {
        if k.ends_with(".router.weight") {
            let g = grads.get(&var).with_context(|| format!("no gradient for {k}"))?;
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{k}");
        }
    }
    Ok(())
}
