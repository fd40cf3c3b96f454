//! Model-agnostic losses and evaluation outputs over a [`Batch`], for [`crate::trainer::TrainTask`]
//! implementations.
//!
//! candle's `cross_entropy` has no `ignore_index`, so the causal-LM loss gathers per-token
//! negative log-likelihoods and masks padding with the batch's `attention_mask` itself.

use candle_core::{DType, Result, Tensor, D};

use crate::data::{Batch, TaskKind};
use crate::trainer::EvalOutput;

/// Per-token NLL of next-token prediction and the mask of tokens that count: `logits` `[B, L, V]`
/// predict `input_ids[:, 1:]` from positions `0..L-1`; a target counts when its
/// `attention_mask` is 1. Returns `(nll [B, L-1] f32, mask [B, L-1] f32)`.
fn causal_nll(logits: &Tensor, batch: &Batch) -> Result<(Tensor, Tensor)> {
    let (b, l, v) = logits.dims3()?;
    let (bi, li) = batch.input_ids.dims2()?;
    if (b, l) != (bi, li) {
        candle_core::bail!(
            "causal_lm_loss: logits are {:?}, input_ids {:?}",
            logits.dims(),
            batch.input_ids.dims()
        );
    }
    if l < 2 {
        candle_core::bail!("causal_lm_loss: need at least 2 positions, got {l}");
    }
    let logits = logits.narrow(1, 0, l - 1)?.to_dtype(DType::F32)?; // [B, L-1, V]
    let targets = batch.input_ids.narrow(1, 1, l - 1)?.contiguous()?; // [B, L-1]
    check_ids("causal_lm_loss", "target token", &targets, v)?;
    let mask = batch.attention_mask.narrow(1, 1, l - 1)?.to_dtype(DType::F32)?; // [B, L-1]
    let logp = candle_nn::ops::log_softmax(&logits.reshape((b * (l - 1), v))?, D::Minus1)?;
    let nll = logp
        .gather(&targets.reshape((b * (l - 1), 1))?, 1)?
        .neg()?
        .reshape((b, l - 1))?;
    Ok((nll, mask))
}

/// Refuses an id of `n` or more: candle's gather reads `u32::MAX` as "no index" and adds a
/// loss of 0 for it, silently.
fn check_ids(op: &str, what: &str, ids: &Tensor, n: usize) -> Result<()> {
    if ids.elem_count() == 0 {
        return Ok(());
    }
    let max = ids
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::U32)?
        .to_scalar::<u32>()?;
    if max as usize >= n {
        candle_core::bail!("{op}: a {what} is {max}, but the logits have {n} classes (ids 0..{n})");
    }
    Ok(())
}

/// How many items the loss of `batch` averages over: its examples for a classifier, its
/// non-padding targets for a causal LM (the tokens after each row's first, by the mask).
pub fn loss_count(batch: &Batch) -> f64 {
    match batch.task {
        TaskKind::Classify => batch.size as f64,
        TaskKind::Lm => {
            let targets = || -> Result<f64> {
                let l = batch.attention_mask.dim(1)?;
                batch
                    .attention_mask
                    .narrow(1, 1, l.saturating_sub(1))?
                    .to_dtype(DType::F64)?
                    .sum_all()?
                    .to_scalar::<f64>()
            };
            // A mask that cannot be read fails in the loss itself, with its message.
            targets().unwrap_or(batch.n_tokens.saturating_sub(batch.size) as f64)
        }
    }
}

/// Mean next-token cross-entropy over the non-padding targets of `batch` (differentiable).
pub fn causal_lm_loss(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let (nll, mask) = causal_nll(logits, batch)?;
    let count = mask.sum_all()?.to_scalar::<f32>()?;
    if count == 0.0 {
        candle_core::bail!("causal_lm_loss: the batch has no target tokens");
    }
    (nll * mask)?.sum_all()? / count as f64
}

/// Mean cross-entropy of `logits` `[B, C]` against the batch's class labels (differentiable).
pub fn classification_loss(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    check_ids(
        "classification_loss",
        "label",
        &batch.labels,
        logits.dim(D::Minus1)?,
    )?;
    candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &batch.labels)
}

/// Evaluation output of a causal LM: summed token NLL and the token count (no graph kept).
pub fn causal_lm_eval(logits: &Tensor, batch: &Batch) -> Result<EvalOutput> {
    let (nll, mask) = causal_nll(&logits.detach(), batch)?;
    let loss_sum = (nll * &mask)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let count = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(EvalOutput {
        loss_sum,
        count,
        predictions: None,
    })
}

/// Evaluation output of a classifier: summed loss, example count, argmax predictions.
pub fn classification_eval(logits: &Tensor, batch: &Batch) -> Result<EvalOutput> {
    let logits = logits.detach();
    let loss = classification_loss(&logits, batch)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let predictions = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(EvalOutput {
        loss_sum: loss * batch.size as f64,
        count: batch.size as f64,
        predictions: Some(predictions),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{make_batch, EncodedItem, TaskKind};
    use candle_core::{Device, Var};

    fn lm_batch() -> Batch {
        let a = EncodedItem {
            input_ids: vec![1, 2, 0],
            token_type_ids: vec![0; 3],
            label: None,
        };
        let b = EncodedItem {
            input_ids: vec![2, 1],
            token_type_ids: vec![0; 2],
            label: None,
        };
        make_batch(&[&a, &b], 0, TaskKind::Lm, &Device::Cpu).unwrap()
    }

    #[test]
    fn causal_lm_loss_masks_padding_by_hand() -> Result<()> {
        let batch = lm_batch(); // row 1 is padded at position 2
                                // logits [2, 3, 3]
        let vals: Vec<f32> = vec![
            1.0, 2.0, 0.5, /**/ 0.0, 0.0, 3.0, /**/ 9.0, 9.0, 9.0, //
            0.5, 1.5, -1.0, /**/ 7.0, -7.0, 7.0, /**/ 2.0, 2.0, 2.0,
        ];
        let logits = Var::from_vec(vals.clone(), (2, 3, 3), &Device::Cpu)?;
        let loss = causal_lm_loss(logits.as_tensor(), &batch)?;
        let nll = |row: &[f32], t: usize| -> f64 {
            let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
            lse - row[t] as f64
        };
        // Targets: row 0 → [2, 0] both real; row 1 → [1, pad]: only the first counts.
        let want = (nll(&vals[0..3], 2) + nll(&vals[3..6], 0) + nll(&vals[9..12], 1)) / 3.0;
        let got = loss.to_scalar::<f32>()? as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // No gradient reaches the padded target's logits, nor the last position.
        let g = loss
            .backward()?
            .get(logits.as_tensor())
            .unwrap()
            .to_vec3::<f32>()?;
        assert!(g[1][1].iter().all(|x| *x == 0.0) && g[0][2].iter().all(|x| *x == 0.0));
        assert!(g[0][0].iter().any(|x| *x != 0.0));
        let ev = causal_lm_eval(logits.as_tensor(), &batch)?;
        assert_eq!(ev.count, 3.0);
        // What gradient accumulation weighs this batch by: the 3 targets the mean is over.
        assert_eq!(loss_count(&batch), 3.0);
        assert!((ev.loss_sum / 3.0 - want).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn classification_eval_predicts_argmax() -> Result<()> {
        let a = EncodedItem {
            input_ids: vec![1],
            token_type_ids: vec![0],
            label: Some(1),
        };
        let b = EncodedItem {
            input_ids: vec![2],
            token_type_ids: vec![0],
            label: Some(0),
        };
        let batch = make_batch(&[&a, &b], 0, TaskKind::Classify, &Device::Cpu).unwrap();
        let logits = Tensor::new(&[[0.0f32, 2.0], [1.0, 3.0]], &Device::Cpu)?;
        let ev = classification_eval(&logits, &batch)?;
        assert_eq!(ev.predictions, Some(vec![1, 1]));
        let l = |z: [f64; 2], t: usize| (z[0].exp() + z[1].exp()).ln() - z[t];
        let want = l([0.0, 2.0], 1) + l([1.0, 3.0], 0);
        assert!((ev.loss_sum - want).abs() < 1e-5, "{} vs {want}", ev.loss_sum);
        Ok(())
    }

    /// candle's gather reads a u32::MAX index as "no index" and gives 0: a label or target of
    /// u32::MAX (an ignore-index habit) added a loss of 0, silently. Refused, as other ids past
    /// the logits are.
    #[test]
    fn an_id_past_the_logits_is_refused_u32_max_included() -> Result<()> {
        let item = |ids: Vec<u32>, label| EncodedItem {
            input_ids: ids,
            token_type_ids: vec![],
            label,
        };
        let (a, b) = (item(vec![1, 2], Some(0)), item(vec![3], Some(u32::MAX)));
        let batch = make_batch(&[&a, &b], 0, TaskKind::Classify, &Device::Cpu).unwrap();
        let logits = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
        let e = classification_loss(&logits, &batch).unwrap_err().to_string();
        assert!(
            e.contains("label is 4294967295") && e.contains("2 classes"),
            "{e}"
        );
        let c = item(vec![1, u32::MAX, 2], None);
        let batch = make_batch(&[&c], 0, TaskKind::Lm, &Device::Cpu).unwrap();
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu)?;
        let e = causal_lm_loss(&logits, &batch).unwrap_err().to_string();
        assert!(e.contains("target token is 4294967295"), "{e}");
        Ok(())
    }
}
