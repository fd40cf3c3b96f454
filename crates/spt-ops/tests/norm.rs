//! layer_norm, softmax and activations: forward against candle's own ops, f64 gradient checks.

use candle_core::{DType, Device, Result, Tensor, D};
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};
use spt_ops::{layer_norm, norm::reference, softmax_last_dim, Activation};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    spt_ops::gradcheck::max_abs_diff(a, b)
}

#[test]
fn layer_norm_matches_candle_f32() -> Result<()> {
    for (shape, seed) in [(vec![3, 7, 33], 1u64), (vec![1, 384], 2), (vec![2, 5, 1, 64], 3)] {
        let d = *shape.last().unwrap();
        let x = ((randn_f64(&shape, seed)? * 3.0)? + 0.5)?.to_dtype(DType::F32)?;
        let g = randn_f64(&[d], seed + 10)?.to_dtype(DType::F32)?;
        let b = randn_f64(&[d], seed + 20)?.to_dtype(DType::F32)?;
        let ours = layer_norm(&x, &g, &b, 1e-5)?;
        let candle = candle_nn::ops::layer_norm(&x, &g, &b, 1e-5)?;
        let diff = max_abs_diff(&ours, &candle)?;
        assert!(diff < 1e-5, "layer_norm {shape:?}: max |Δ| = {diff}");
    }
    Ok(())
}

#[test]
fn layer_norm_gradients_f64() -> Result<()> {
    for (shape, seed) in [(vec![4, 9], 5u64), (vec![2, 3, 16], 6), (vec![1, 1, 2], 7)] {
        let d = *shape.last().unwrap();
        let x = randn_f64(&shape, seed)?;
        let g = randn_f64(&[d], seed + 1)?;
        let b = randn_f64(&[d], seed + 2)?;
        check_gradients(
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            &[x, g, b],
            &[0, 1, 2],
            GradCheck::default(),
        )?;
    }
    Ok(())
}

/// Many rows (several rayon tasks of rows) and widths with and without a tail past the kernel's
/// 16 sum lanes: values and every gradient against the composed reference's autograd.
#[test]
fn layer_norm_many_rows_match_reference_gradients() -> Result<()> {
    for (shape, seed) in [(vec![3, 50, 37], 30u64), (vec![130, 768], 31), (vec![65, 16], 32)] {
        let d = *shape.last().unwrap();
        let x = candle_core::Var::from_tensor(&((randn_f64(&shape, seed)? * 2.0)? + 0.3)?)?;
        let g = candle_core::Var::from_tensor(&randn_f64(&[d], seed + 1)?)?;
        let b = candle_core::Var::from_tensor(&randn_f64(&[d], seed + 2)?)?;
        let u = randn_f64(&shape, seed + 3)?;
        let (xt, gt, bt) = (x.as_tensor(), g.as_tensor(), b.as_tensor());
        let ours = layer_norm(xt, gt, bt, 1e-5)?;
        let refr = reference::layer_norm(xt, gt, bt, 1e-5)?;
        assert!(max_abs_diff(&ours, &refr)? < 1e-12, "{shape:?}: values");
        let go = ours.mul(&u)?.sum_all()?.backward()?;
        let gr = refr.mul(&u)?.sum_all()?.backward()?;
        for (name, t) in [("x", xt), ("gamma", gt), ("beta", bt)] {
            let (a, e) = (go.get(t).unwrap(), gr.get(t).unwrap());
            let diff = max_abs_diff(a, e)?;
            assert!(diff < 1e-10, "{shape:?}: d{name} max |Δ| = {diff}");
        }
        // Frozen gamma and beta (LoRA fine-tuning): the kernel skips their gradients; dx holds.
        let (gf, bf) = (gt.detach(), bt.detach());
        let go = layer_norm(xt, &gf, &bf, 1e-5)?.mul(&u)?.sum_all()?.backward()?;
        let diff = max_abs_diff(go.get(xt).unwrap(), gr.get(xt).unwrap())?;
        assert!(
            diff < 1e-10,
            "{shape:?}: dx with frozen gamma, beta: max |Δ| = {diff}"
        );
        assert!(go.get(&gf).is_none() && go.get(&bf).is_none());
    }
    Ok(())
}

#[test]
fn layer_norm_equals_reference_and_skips_frozen_params() -> Result<()> {
    let x = candle_core::Var::from_tensor(&randn_f64(&[5, 12], 9)?)?;
    let g = randn_f64(&[12], 10)?;
    let b = randn_f64(&[12], 11)?;
    let ours = layer_norm(x.as_tensor(), &g, &b, 1e-12)?;
    let refr = reference::layer_norm(x.as_tensor(), &g, &b, 1e-12)?;
    assert!(max_abs_diff(&ours, &refr)? < 1e-12);
    let grads = ours.sqr()?.sum_all()?.backward()?;
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(
        grads.get(&g).is_none() && grads.get(&b).is_none(),
        "frozen gamma/beta must get no gradient"
    );
    Ok(())
}

#[test]
fn layer_norm_rejects_bad_shapes() {
    let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
    let g = Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap();
    let err = layer_norm(&x, &g, &g, 1e-5).unwrap_err().to_string();
    assert!(err.contains("layer_norm") && err.contains("[8]"), "{err}");
    let g64 = Tensor::zeros(8, DType::F64, &Device::Cpu).unwrap();
    let err = layer_norm(&x, &g64, &g64, 1e-5).unwrap_err().to_string();
    assert!(err.contains("gamma") && err.contains("F64"), "{err}");
}

#[test]
fn softmax_matches_candle_f32() -> Result<()> {
    for (shape, seed) in [(vec![3, 7, 33], 1u64), (vec![2, 4, 5, 128], 2)] {
        let x = (randn_f64(&shape, seed)? * 10.0)?.to_dtype(DType::F32)?;
        let ours = softmax_last_dim(&x)?;
        let candle = candle_nn::ops::softmax_last_dim(&x)?;
        let diff = max_abs_diff(&ours, &candle)?;
        assert!(diff < 1e-5, "softmax {shape:?}: max |Δ| = {diff}");
        let sums = ours.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    }
    Ok(())
}

#[test]
fn softmax_gradients_f64() -> Result<()> {
    for (shape, seed) in [(vec![4, 9], 5u64), (vec![2, 3, 16], 6), (vec![3, 1], 7)] {
        let x = (randn_f64(&shape, seed)? * 4.0)?;
        check_gradients(|t| softmax_last_dim(&t[0]), &[x], &[0], GradCheck::default())?;
    }
    Ok(())
}

#[test]
fn softmax_large_logits_stay_finite() -> Result<()> {
    let x = Tensor::new(&[[1000f32, 999.0, -1000.0]], &Device::Cpu)?;
    let y = softmax_last_dim(&x)?.to_vec2::<f32>()?;
    let want = reference::softmax(&x)?.to_vec2::<f32>()?;
    for (a, b) in y[0].iter().zip(&want[0]) {
        assert!(a.is_finite() && (a - b).abs() < 1e-6);
    }
    Ok(())
}

#[test]
fn activations_match_candle_f32() -> Result<()> {
    let x = (randn_f64(&[4, 257], 3)? * 3.0)?.to_dtype(DType::F32)?;
    let cases = [
        (Activation::GeluErf, x.gelu_erf()?),
        (Activation::GeluTanh, x.gelu()?),
        (Activation::Relu, x.relu()?),
    ];
    for (act, want) in cases {
        let diff = max_abs_diff(&act.forward(&x)?, &want)?;
        assert!(diff < 1e-5, "{act:?}: max |Δ| = {diff}");
    }
    Ok(())
}

#[test]
fn activation_gradients_f64() -> Result<()> {
    for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
        for (shape, seed) in [(vec![5, 7], 1u64), (vec![2, 3, 4], 2)] {
            // Keep ReLU inputs off its kink at 0 so central differences are exact.
            let x = randn_f64(&shape, seed)?;
            let x = if act == Activation::Relu {
                (x.sign()? * 0.1)?.add(&x)?
            } else {
                x
            };
            check_gradients(|t| act.forward(&t[0]), &[x], &[0], GradCheck::default())?;
        }
    }
    Ok(())
}

#[test]
fn hf_activation_names() {
    assert_eq!(Activation::from_hf("gelu"), Some(Activation::GeluErf));
    assert_eq!(Activation::from_hf("gelu_new"), Some(Activation::GeluTanh));
    assert_eq!(Activation::from_hf("relu"), Some(Activation::Relu));
    assert_eq!(Activation::from_hf("swish"), None);
}
