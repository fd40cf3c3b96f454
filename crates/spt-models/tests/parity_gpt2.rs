//! GPT2LMHeadModel vs PyTorch + HF transformers (fixture tiny-gpt2): logits at unpadded positions,
//! the shifted next-token loss ignoring padding, and the listed gradients (including the tied
//! `transformer.wte.weight`) agree within 1e-4 relative (max|Δ| / max|ref|).

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, D};
use common::{expected, fixture, rel_err};
use spt_models::{GPT2LMHeadModel, LoadOptions, NamedParams};
use std::collections::HashMap;

const TOL: f64 = 1e-4;

#[test]
fn tiny_gpt2_matches_pytorch() -> Result<()> {
    let exp = expected("tiny-gpt2")?;
    let (model, report) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::default())?;
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    assert!(report.initialised.is_empty());
    let mask = &exp["attention_mask"];

    let (logits, loss) = model.forward_with_loss(&exp["input_ids"], Some(mask), false)?;
    // Compare logits only where attention_mask = 1.
    let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let got = logits.broadcast_mul(&m)?;
    let want = exp["logits"].broadcast_mul(&m)?;
    let e = rel_err(&got, &want)?;
    eprintln!("logits rel err {e:.2e}");
    assert!(e < TOL, "logits rel err {e:e}");

    let e = rel_err(&loss.reshape(1)?, &exp["loss"])?;
    eprintln!("loss rel err {e:.2e}");
    assert!(e < TOL, "loss rel err {e:e}");

    // The fused loss (no logits kept) against the same PyTorch loss and gradients.
    let fused = model.forward_loss(&exp["input_ids"], Some(mask), false)?;
    let e = rel_err(&fused.reshape(1)?, &exp["loss"])?;
    eprintln!("fused loss rel err {e:.2e}");
    assert!(e < TOL, "fused loss rel err {e:e}");
    let (sum, count) = model.nll_sum(&exp["input_ids"], Some(mask))?;
    let want = exp["loss"]
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?[0];
    assert!(
        (sum / count as f64 - want).abs() < TOL * want.abs(),
        "nll_sum {sum}/{count} vs {want}"
    );
    check_grads(&model, &loss.backward()?, &exp, "")?;
    check_grads(&model, &fused.backward()?, &exp, "fused ")?;
    Ok(())
}

fn check_grads(
    model: &GPT2LMHeadModel,
    grads: &candle_core::backprop::GradStore,
    exp: &HashMap<String, candle_core::Tensor>,
    what: &str,
) -> Result<()> {
    let vars: HashMap<String, _> = model.named_vars().into_iter().collect();
    let mut checked = 0;
    for (k, want) in exp {
        let Some(name) = k.strip_prefix("grad.") else {
            continue;
        };
        let var = vars
            .get(name)
            .with_context(|| format!("no trainable parameter {name}"))?;
        let got = grads
            .get(var)
            .with_context(|| format!("no gradient for {name}"))?;
        let e = rel_err(got, want)?;
        eprintln!("{what}grad {name}: rel err {e:.2e}");
        assert!(e < TOL, "{what}grad {name}: rel err {e:e}");
        checked += 1;
    }
    assert_eq!(checked, 5);
    Ok(())
}
