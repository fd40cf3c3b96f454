//! BertForSequenceClassification vs PyTorch + HF transformers (fixture tiny-bert-cls): logits,
//! loss and the listed parameter gradients agree within 1e-4 relative (max|Δ| / max|ref|).

mod common;

use anyhow::{Context, Result};
use common::{expected, fixture, rel_err};
use spt_models::{BertForSequenceClassification, LoadOptions, NamedParams};
use std::collections::HashMap;

const TOL: f64 = 1e-4;

#[test]
fn tiny_bert_cls_matches_pytorch() -> Result<()> {
    let exp = expected("tiny-bert-cls")?;
    let (model, report) =
        BertForSequenceClassification::from_dir(fixture("tiny-bert-cls"), &LoadOptions::default(), None)?;
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    assert!(
        report.initialised.is_empty(),
        "initialised: {:?}",
        report.initialised
    );
    assert_eq!(model.num_labels, 3);

    let logits = model.forward_t(
        &exp["input_ids"],
        Some(&exp["token_type_ids"]),
        Some(&exp["attention_mask"]),
        false,
    )?;
    let e = rel_err(&logits, &exp["logits"])?;
    eprintln!("logits rel err {e:.2e}");
    assert!(e < TOL, "logits rel err {e:e}");

    let loss = model.loss(&logits, &exp["labels"])?;
    let e = rel_err(&loss.reshape(1)?, &exp["loss"])?;
    eprintln!("loss rel err {e:.2e}");
    assert!(e < TOL, "loss rel err {e:e}");

    let grads = loss.backward()?;
    let vars: HashMap<String, _> = model.named_vars().into_iter().collect();
    let mut checked = 0;
    for (k, want) in &exp {
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
        eprintln!("grad {name}: rel err {e:.2e}");
        assert!(e < TOL, "grad {name}: rel err {e:e}");
        checked += 1;
    }
    assert_eq!(checked, 6);
    // Every trainable parameter that the loss depends on gets a finite, non-zero gradient.
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .with_context(|| format!("no gradient for {name}"))?;
        let n = g.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(n.is_finite() && n > 0.0, "{name}: |grad| sum = {n}");
    }
    Ok(())
}
