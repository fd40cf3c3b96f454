//! `MatmulPrecision::Bf16` in inference: a frozen `Linear` multiplies by its weight packed once
//! for bf16 products, a trainable one is untouched, and a frozen model's logits move by bf16
//! rounding only, the same on every call and thread count. Its own test binary, since the
//! setting is process-wide: each test holds `LOCK` while it switches it.

mod common;

use anyhow::Result;
use candle_core::{DType, Tensor};
use common::{expected, fixture, rel_err};
use spt_models::{BertForSequenceClassification, Linear, LoadOptions, Param, WeightLayout};
use spt_ops::packed_linear::packed_linear_reference;
use spt_ops::{set_matmul_precision, MatmulPrecision};
use std::sync::Mutex;

static LOCK: Mutex<()> = Mutex::new(());

fn with_precision<R>(p: MatmulPrecision, f: impl FnOnce() -> R) -> R {
    set_matmul_precision(p);
    let r = f();
    set_matmul_precision(MatmulPrecision::F32);
    r
}

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    Ok(spt_ops::gradcheck::randn_f64(shape, seed)?.to_dtype(DType::F32)?)
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

/// Frozen, in either weight layout and at a few rows or many, the layer's output is the packed
/// reference; a trainable layer gives its f32 bits under bf16 too.
#[test]
fn frozen_linear_takes_bf16_products() -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (out, d_in) = (70, 50);
    let w_out_in = randn(&[out, d_in], 1)?;
    let b = randn(&[out], 2)?;
    for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
        let stored = match layout {
            WeightLayout::OutIn => w_out_in.clone(),
            WeightLayout::InOut => w_out_in.t()?.contiguous()?,
        };
        let frozen = Linear::new(
            Param::frozen("l.weight", &stored),
            Some(Param::frozen("l.bias", &b)),
            layout,
        )?;
        let trainable = Linear::new(
            Param::trainable("l.weight", &stored)?,
            Some(Param::trainable("l.bias", &b)?),
            layout,
        )?;
        for rows in [3, 100] {
            let x = randn(&[2, rows, d_in], 3)?;
            let want = packed_linear_reference(&x, &w_out_in, Some(&b))?;
            let got = with_precision(MatmulPrecision::Bf16, || frozen.forward(&x))?;
            let e = rel_err(&got, &want)?;
            assert!(e < 1e-5, "{layout:?}, {rows} rows: {e}");
            let f32_y = frozen.forward(&x)?;
            assert!(
                rel_err(&got, &f32_y)? > 1e-5,
                "{layout:?}: bf16 products were not taken"
            );
            let t32 = trainable.forward(&x)?;
            let t16 = with_precision(MatmulPrecision::Bf16, || trainable.forward(&x))?;
            assert_eq!(bits(&t16)?, bits(&t32)?, "{layout:?}: a trainable layer changed");
        }
    }
    Ok(())
}

/// The frozen tiny BERT classifier: bf16 logits are within bf16 rounding of f32's, the same bits
/// on a second call and on one thread as on two, and f32 afterwards gives f32's bits again.
#[test]
fn frozen_bert_logits_under_bf16() -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let exp = expected("tiny-bert-cls")?;
    let (model, _) =
        BertForSequenceClassification::from_dir(fixture("tiny-bert-cls"), &LoadOptions::frozen(), None)?;
    let logits = || -> Result<Tensor> {
        Ok(model.forward_t(
            &exp["input_ids"],
            Some(&exp["token_type_ids"]),
            Some(&exp["attention_mask"]),
            false,
        )?)
    };
    let f32_first = logits()?;
    let on = |threads: usize| -> Result<Tensor> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        pool.install(|| with_precision(MatmulPrecision::Bf16, logits))
    };
    let (a, b, one) = (on(2)?, on(2)?, on(1)?);
    assert_eq!(bits(&a)?, bits(&b)?, "a second call differs");
    assert_eq!(bits(&a)?, bits(&one)?, "one thread differs from two");
    let e = rel_err(&a, &f32_first)?;
    assert!(e > 1e-6 && e < 3e-2, "bf16 against f32: {e}");
    assert_eq!(bits(&logits()?)?, bits(&f32_first)?, "f32 changed after bf16");
    Ok(())
}

/// Cached decoding of the frozen tiny GPT-2 under bf16 (its head packed once): each step's
/// logits are within bf16 rounding of f32's, and a second decoding gives the same bits.
#[test]
fn frozen_gpt2_decoding_under_bf16() -> Result<()> {
    use spt_models::{GPT2LMHeadModel, KvCache};
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let exp = expected("tiny-gpt2")?;
    let ids = exp["input_ids"].narrow(0, 0, 1)?;
    let (m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let decode = || -> Result<Vec<Tensor>> {
        let mut cache = KvCache::new();
        let mut out = vec![m.next_token_logits(&ids.narrow(1, 0, 3)?, &mut cache)?];
        for t in 3..ids.dim(1)? {
            out.push(m.next_token_logits(&ids.narrow(1, t, 1)?, &mut cache)?);
        }
        Ok(out)
    };
    let f = decode()?;
    let (a, b) = with_precision(MatmulPrecision::Bf16, || -> Result<_> {
        Ok((decode()?, decode()?))
    })?;
    for ((x, y), z) in a.iter().zip(&b).zip(&f) {
        assert_eq!(bits(x)?, bits(y)?, "a second decoding differs");
        let e = rel_err(x, z)?;
        assert!(e > 1e-6 && e < 3e-2, "bf16 against f32: {e}");
    }
    Ok(())
}

/// A training forward through a frozen layer keeps f32 products (bf16 is for inference and for
/// the ops the switch lists): `forward_t(x, true)` gives the f32 bits under bf16.
#[test]
fn frozen_linear_in_training_keeps_f32() -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let w = randn(&[70, 50], 1)?;
    let l = Linear::new(Param::frozen("l.weight", &w), None, WeightLayout::OutIn)?;
    let x = randn(&[100, 50], 2)?;
    let f32_y = l.forward_t(&x, true)?;
    let bf16_y = with_precision(MatmulPrecision::Bf16, || l.forward_t(&x, true))?;
    assert_eq!(bits(&bf16_y)?, bits(&f32_y)?);
    let eval = with_precision(MatmulPrecision::Bf16, || l.forward_t(&x, false))?;
    assert!(
        rel_err(&eval, &f32_y)? > 1e-5,
        "evaluation did not take bf16 products"
    );
    Ok(())
}
