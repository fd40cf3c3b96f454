//! Bad input to the models' public API found by a read-only audit: each once panicked, left a
//! model broken or returned a silently wrong value; each is now an error that leaves the model as
//! it was.

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixture;

type Result<T> = anyhow::Result<T>;

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    Ok(spt_ops::gradcheck::randn_f64(shape, seed)?.to_dtype(DType::F32)?)
}

/// Sizes near 2^63 overflowed the parameter count before the size check (a panic where overflow
/// checks are on).
#[test]
fn gpt2_config_with_huge_n_embd_is_an_error() {
    // (n_head 1: the head-size check, which these sizes fail too, cannot stand in for it.)
    for json in [
        r#"{"n_embd": 9223372036854775808, "n_head": 1}"#,
        r#"{"n_embd": 9223372036854775808, "n_inner": 8, "n_head": 1}"#,
    ] {
        let e = spt_models::GPT2Config::from_json_str(json)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_embd = 9223372036854775808: must be in 1..="), "{e}");
    }
}

/// As for GPT-2: the size check names the field instead of overflowing.
#[test]
fn bert_config_with_huge_hidden_size_is_an_error() {
    let json = r#"{"hidden_size": 9223372036854775808, "num_attention_heads": 1}"#;
    let e = spt_models::BertConfig::from_json_str(json)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hidden_size = 9223372036854775808: must be in 1..="),
        "{e}"
    );
}

/// A codebook of another head width is refused before any buffer is applied (it was installed,
/// and every later forward of the layer failed).
#[test]
fn load_buffers_refuses_codebook_of_wrong_head_dim() -> Result<()> {
    use spt_models::pq::KeyTopK;
    use spt_models::{GPT2LMHeadModel, KeyGrouping, LoadOptions, SptModel};
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8]], &Device::Cpu)?;
    let before = m.forward_t(&ids, None, false)?;
    // head_dim is 64 / 4 = 16: layer 0's codebook fits (2 subspaces of 8), layer 1's quantises
    // d = 2·3 = 6.
    let good = Tensor::randn(0f32, 1.0, (2, 4, 8), &Device::Cpu)?;
    let bad = Tensor::zeros((2, 4, 3), DType::F32, &Device::Cpu)?;
    let e = m
        .load_buffers(
            &[
                ("pq_codebook.layer.0".to_string(), good),
                ("pq_codebook.layer.1".to_string(), bad),
            ],
            Some((KeyTopK::Count(4), KeyGrouping::PerQuery)),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pq_codebook.layer.1") && e.contains("width 6") && e.contains("width 16"),
        "{e}"
    );
    // Neither was installed: layer 0 would keep 4 of up to 8 keys.
    let after = m.forward_t(&ids, None, false)?;
    assert_eq!(spt_ops::gradcheck::max_abs_diff(&before, &after)?, 0.0);
    Ok(())
}

/// A failed sparsify leaves the model as it was: it left the failing layer's FFN a 0x0
/// placeholder (every later forward failed), and layers converted before it stayed converted.
/// Refused here: a LoRA config that is invalid (rank 0), and one valid in itself whose rank
/// exceeds the layers' (found while building, after layer 0's attention and FFN were fitted).
#[test]
fn sparsify_failure_leaves_the_model_usable() -> Result<()> {
    use spt_models::lora::LoraConfig;
    use spt_models::pq::{KeyTopK, PqConfig};
    use spt_models::routed_ffn::{BlockTopK, RoutedFfnConfig};
    use spt_models::{
        sparsify, CalibrationBatch, FfnCalibration, GPT2LMHeadModel, LoadOptions, LoraSettings, LoraTarget,
        SparseAttentionConfig, SptConfig,
    };
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::default())?;
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8]], &Device::Cpu)?;
    let before = m.forward_t(&ids, None, false)?;
    let calibration = [CalibrationBatch {
        input_ids: ids.clone(),
        attention_mask: None,
        token_type_ids: None,
    }];
    let attention = Some(SparseAttentionConfig {
        pq: PqConfig {
            n_subspaces: 2,
            n_codewords: 4,
            ..Default::default()
        },
        top_k: KeyTopK::Count(4),
        grouping: Default::default(),
    });
    for rank in [0, 1000] {
        let cfg = SptConfig {
            attention: attention.clone(),
            ffn: Some(RoutedFfnConfig::new(4, BlockTopK::Count(2))),
            ffn_calibration: FfnCalibration::default(),
            lora: Some(LoraSettings {
                targets: vec![LoraTarget::Output, LoraTarget::Fc1],
                config: LoraConfig {
                    rank,
                    ..Default::default()
                },
            }),
            ..Default::default()
        };
        let e = sparsify(&mut m, &cfg, &calibration).unwrap_err().to_string();
        assert!(e.contains("rank"), "{e}");
        let after = m.forward_t(&ids, None, false)?;
        let d = spt_ops::gradcheck::max_abs_diff(&before, &after)?;
        assert!(d == 0.0, "rank {rank}: the model changed by {d}");
        assert!(m
            .transformer
            .h
            .iter()
            .all(|b| b.attn.core.kind() == "dense" && b.mlp.kind() == "dense"));
    }
    // A refusal at layer 1 leaves layer 0 as it was too (each layer was swapped in when built).
    m.transformer.h[1].attn.c_proj.add_lora(LoraConfig {
        rank: 2,
        ..Default::default()
    })?;
    let cfg = SptConfig {
        attention: attention.clone(),
        lora: Some(LoraSettings {
            targets: vec![LoraTarget::Output],
            config: LoraConfig {
                rank: 2,
                ..Default::default()
            },
        }),
        ..Default::default()
    };
    let e = sparsify(&mut m, &cfg, &calibration).unwrap_err().to_string();
    assert!(e.contains("already has a LoRA adapter"), "{e}");
    let h0 = &m.transformer.h[0];
    assert!(h0.attn.core.kind() == "dense" && h0.attn.c_proj.lora().is_none());
    Ok(())
}

/// An HF additive key mask (0 / -10000) is refused: read as 0/1 it was inverted, silently, when a
/// sequence had no key to attend.
#[test]
fn prepared_mask_refuses_non_binary_key_padding() -> Result<()> {
    use spt_models::{AttentionMask, DenseAttention, Dropout, PreparedMask};
    let dev = Device::Cpu;
    let additive = Tensor::new(&[[0f32, 0., 0., 0.], [0., 0., -10000., -10000.]], &dev)?;
    let (q, k, v) = (
        randn(&[2, 1, 4, 4], 1)?,
        randn(&[2, 1, 4, 4], 2)?,
        randn(&[2, 1, 4, 4], 3)?,
    );
    let refused = match PreparedMask::new(
        AttentionMask::none().with_key_padding(additive),
        4,
        DType::F32,
        &dev,
    ) {
        Err(_) => true,
        Ok(pm) => {
            let att = DenseAttention {
                dropout: Dropout::new(0.0)?,
            };
            att.forward_t(&q, &k, &v, &pm, 0.5, false).is_err()
        }
    };
    assert!(
        refused,
        "an additive 0/-10000 key-padding mask was accepted (and read inverted)"
    );
    Ok(())
}

/// A refused LoRA leaves the layer as it was (the weight was frozen before the check).
#[test]
fn add_lora_failure_keeps_weight_trainable() -> Result<()> {
    use spt_models::lora::LoraConfig;
    use spt_models::{Linear, Param, WeightLayout};
    let w = Param::trainable("l.weight", &randn(&[4, 4], 31)?)?;
    let b = Param::trainable("l.bias", &Tensor::zeros(4, DType::F32, &Device::Cpu)?)?;
    let mut lin = Linear::new(w, Some(b), WeightLayout::OutIn)?;
    let r = lin.add_lora(LoraConfig {
        rank: 0,
        ..Default::default()
    });
    assert!(r.is_err());
    assert!(lin.weight.is_trainable(), "a refused add_lora froze the weight");
    assert!(
        lin.bias.as_ref().is_some_and(|b| b.is_trainable()),
        "a refused add_lora froze the bias"
    );
    Ok(())
}

/// The head counts are public fields: a config edited (or deserialised) to 0 heads gave a
/// division-by-zero panic in `head_dim`; it is 0 now, and `validate` names the field.
#[test]
fn head_dim_of_a_config_without_heads_does_not_panic() -> Result<()> {
    let mut bert = spt_models::BertConfig::from_file(fixture("tiny-bert-cls").join("config.json"))?;
    bert.num_attention_heads = 0;
    assert_eq!(bert.head_dim(), 0);
    let e = bert.validate().unwrap_err().to_string();
    assert!(e.contains("num_attention_heads"), "{e}");
    let mut gpt2 = spt_models::GPT2Config::from_file(fixture("tiny-gpt2").join("config.json"))?;
    assert_eq!(gpt2.head_dim(), gpt2.n_embd / gpt2.n_head);
    gpt2.n_head = 0;
    assert_eq!(gpt2.head_dim(), 0);
    let e = gpt2.validate().unwrap_err().to_string();
    assert!(e.contains("n_head"), "{e}");
    Ok(())
}

/// `Dropout::p` is public: set outside [0, 1) (or NaN) it scaled without dropping (p < 0),
/// zeroed the output (p = 1) or gave NaN in training. Every training use (the mask, the fused
/// residual add, a model's forward) now refuses it by name; evaluation does not read it.
#[test]
fn dropout_refuses_a_probability_set_outside_its_range() -> Result<()> {
    use spt_models::{Dropout, GPT2LMHeadModel, LoadOptions};
    let x = Tensor::ones((4, 8), DType::F32, &Device::Cpu)?;
    let mut d = Dropout::new(0.1)?;
    for p in [-0.5, 1.0, 1.5, f32::NAN] {
        d.p = p;
        for r in [d.forward_t(&x, true), d.residual_add(&x, &x, true)] {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("Dropout.p") && e.contains("[0, 1)"), "p = {p}: {e}");
        }
        assert!(d.seeded(true).is_err(), "p = {p}");
        assert_eq!(
            spt_ops::gradcheck::max_abs_diff(&d.forward_t(&x, false)?, &x)?,
            0.0
        );
    }
    // A p whose f32 is 1 is refused where it is made, not at the first training step.
    let e = Dropout::new(0.999_999_99).unwrap_err().to_string();
    assert!(e.contains("[0, 1)"), "{e}");
    d.p = 0.0;
    assert_eq!(
        spt_ops::gradcheck::max_abs_diff(&d.forward_t(&x, true)?, &x)?,
        0.0
    );
    // Where a user would set it: a model's residual dropout.
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu)?;
    m.transformer.h[0].attn.resid_dropout.p = 1.0;
    let e = m.forward_t(&ids, None, true).unwrap_err().to_string();
    assert!(e.contains("Dropout.p"), "{e}");
    m.forward_t(&ids, None, false)?;
    Ok(())
}

/// Token ids of every integer dtype candle has are read: i16 and i32 ids were refused as
/// "expected an integer dtype, got I32". They give the logits of the same u32 ids; a float
/// dtype is refused with the list of accepted ones.
#[test]
fn token_ids_of_every_integer_dtype_are_accepted() -> Result<()> {
    use spt_models::{BertForSequenceClassification, LoadOptions};
    let (model, _) =
        BertForSequenceClassification::from_dir(fixture("tiny-bert-cls"), &LoadOptions::frozen(), None)?;
    let ids = Tensor::new(&[[1u32, 5, 7, 2]], &Device::Cpu)?;
    let want = model.forward_t(&ids, None, None, false)?;
    for dt in [DType::U8, DType::I16, DType::I32, DType::I64] {
        let got = model.forward_t(&ids.to_dtype(dt)?, None, None, false)?;
        assert_eq!(spt_ops::gradcheck::max_abs_diff(&got, &want)?, 0.0, "{dt:?}");
    }
    // A negative id is still out of range in a signed dtype.
    let neg = Tensor::new(&[[1i64, -3, 7, 2]], &Device::Cpu)?.to_dtype(DType::I32)?;
    let e = model.forward_t(&neg, None, None, false).unwrap_err().to_string();
    assert!(e.contains("-3"), "{e}");
    let e = model
        .forward_t(&ids.to_dtype(DType::F32)?, None, None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("u8, u32, i16, i32 or i64") && e.contains("F32"), "{e}");
    Ok(())
}

/// The tiny GPT-2 loaded with `opts`, its FFNs routed (4 blocks, 2 per token; a linear
/// correction when `correction`), without a router fit.
fn routed_tiny_gpt2(opts: &spt_models::LoadOptions, correction: bool) -> Result<spt_models::GPT2LMHeadModel> {
    use spt_models::routed_ffn::{BlockTopK, RoutedFfnConfig};
    use spt_models::{sparsify, FfnCalibration, GPT2LMHeadModel, SptConfig};
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), opts)?;
    let cfg = SptConfig {
        ffn: Some(RoutedFfnConfig {
            correction,
            ..RoutedFfnConfig::new(4, BlockTopK::Count(2))
        }),
        ffn_calibration: FfnCalibration {
            router_fit: None,
            cluster_units: false,
        },
        ..Default::default()
    };
    sparsify(&mut m, &cfg, &[])?;
    Ok(m)
}

/// Unit orders reorder frozen FFN weights only: with layer 1's trained, the buffers are
/// refused before layer 0 is reordered (it was reordered, then layer 1 failed: a model half
/// converted).
#[test]
fn load_buffers_refuses_a_unit_order_for_trained_weights_before_reordering_any() -> Result<()> {
    use spt_models::{LoadOptions, SptModel, Trainable};
    let opts = LoadOptions {
        trainable: Trainable::only(|n| n.contains("h.1.mlp.")),
        ..LoadOptions::default()
    };
    let mut m = routed_tiny_gpt2(&opts, false)?;
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8]], &Device::Cpu)?;
    let before = m.forward_t(&ids, None, false)?;
    let d_ff = 4 * m.transformer.config.n_embd;
    let reversed = Tensor::new((0..d_ff as u32).rev().collect::<Vec<_>>(), &Device::Cpu)?;
    let buffers = [
        ("ffn_unit_order.layer.0".to_string(), reversed.clone()),
        ("ffn_unit_order.layer.1".to_string(), reversed),
    ];
    let e = m.load_buffers(&buffers, None).unwrap_err().to_string();
    assert!(
        e.contains("`ffn_unit_order.layer.1`") && e.contains("trained"),
        "{e}"
    );
    let after = m.forward_t(&ids, None, false)?;
    assert_eq!(spt_ops::gradcheck::max_abs_diff(&before, &after)?, 0.0);
    // Layer 0's alone (frozen) loads.
    assert_eq!(m.load_buffers(&buffers[..1], None)?, 1);
    Ok(())
}

/// A restored linear correction with a NaN or infinity made every token that skips a block NaN.
/// `load_buffers` refuses it, naming the buffer, before anything is installed (a unit order in
/// the same call is not applied either).
#[test]
fn load_buffers_refuses_a_non_finite_correction() -> Result<()> {
    use spt_models::{LoadOptions, SptModel};
    let mut m = routed_tiny_gpt2(&LoadOptions::frozen(), true)?;
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8]], &Device::Cpu)?;
    let before = m.forward_t(&ids, None, false)?;
    let buffers = m.named_buffers()?;
    let (name, c) = buffers
        .iter()
        .find(|(n, _)| n == "ffn_correction.layer.1")
        .expect("a correction buffer");
    let d = c.dim(1)?;
    let d_ff = 4 * d;
    let reversed: Vec<u32> = (0..d_ff as u32).rev().collect();
    let order = (
        "ffn_unit_order.layer.0".to_string(),
        Tensor::new(reversed, &Device::Cpu)?,
    );
    for bad in [f32::NAN, f32::INFINITY] {
        let mut v = c.flatten_all()?.to_vec1::<f32>()?;
        v[3] = bad;
        let bad_c = Tensor::from_vec(v, c.dims(), &Device::Cpu)?;
        let e = m
            .load_buffers(&[order.clone(), (name.clone(), bad_c)], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`ffn_correction.layer.1`") && e.contains("non-finite"),
            "{bad}: {e}"
        );
        let after = m.forward_t(&ids, None, false)?;
        assert_eq!(spt_ops::gradcheck::max_abs_diff(&before, &after)?, 0.0, "{bad}");
    }
    // The same buffers with a finite correction load.
    assert_eq!(m.load_buffers(&[order, (name.clone(), c.clone())], None)?, 2);
    Ok(())
}
