//! LoRA: zero-B equals the base layer, merge equals unmerged (α ≠ r), gradients reach only A and B,
//! dropout, the frozen-aware linear, and LoRA on the routed FFN.

use candle_core::{DType, Device, Result, Tensor, Var};
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};
use spt_ops::lora::{dropout, linear, lora_linear, lora_linear_heads};
use spt_ops::routed_ffn::reference;
use spt_ops::routed_ffn::BlockTopK;
use spt_ops::{
    merge_heads, split_heads, Activation, GateMode, HeadsLayout, LoraConfig, LoraError, LoraLinear,
    RoutedFfn, RoutedFfnConfig,
};

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    spt_ops::gradcheck::max_abs_diff(a, b)
}

fn f32(t: Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}

fn norm(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()
        .map(f64::sqrt)
}

#[test]
fn zero_b_equals_base_layer() -> Result<()> {
    let w = f32(randn_f64(&[12, 10], 1)?)?;
    let b = f32(randn_f64(&[12], 2)?)?;
    let x = f32(randn_f64(&[2, 7, 10], 3)?)?;
    let layer = LoraLinear::new(
        &w,
        Some(&b),
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            seed: 1,
        },
    )?;
    let base = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
    let y = layer.forward_t(&x, true)?;
    assert_eq!(y.dims(), &[2, 7, 12]);
    assert!(max_diff(&y, &base)? < 1e-5);
    // A is Kaiming-uniform U(−1/√in, 1/√in) and not degenerate; B starts at zero.
    let a: Vec<f32> = layer.lora_a().as_tensor().flatten_all()?.to_vec1()?;
    let bound = 1.0 / (10f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound) && norm(layer.lora_a().as_tensor())? > 0.1);
    assert_eq!(norm(layer.lora_b().as_tensor())?, 0.0);
    Ok(())
}

#[test]
fn merge_equals_unmerged_with_alpha_not_rank() -> Result<()> {
    let w = f32(randn_f64(&[9, 6], 4)?)?;
    let b = f32(randn_f64(&[9], 5)?)?;
    let x = f32(randn_f64(&[11, 6], 6)?)?;
    let mut layer = LoraLinear::new(
        &w,
        Some(&b),
        LoraConfig {
            rank: 3,
            alpha: 7.0,
            dropout: 0.0,
            seed: 2,
        },
    )?;
    layer.lora_b().set(&f32(randn_f64(&[9, 3], 7)?)?)?;
    let unmerged = layer.forward_t(&x, false)?;
    // Inside no_grad the trainable factors are read detached: the same values, nothing recorded.
    assert!(unmerged.track_op());
    let quiet = spt_ops::no_grad(|| layer.forward_t(&x, false))?;
    assert!(!quiet.track_op());
    assert_eq!(max_diff(&quiet, &unmerged)?, 0.0);
    // By hand: x Wᵀ + b + (α/r)·(x Aᵀ) Bᵀ.
    let a = layer.lora_a().as_tensor();
    let bm = layer.lora_b().as_tensor();
    let want =
        (x.matmul(&w.t()?)?.broadcast_add(&b)? + (x.matmul(&a.t()?)?.matmul(&bm.t()?)? * (7.0 / 3.0))?)?;
    assert!(max_diff(&unmerged, &want)? < 1e-5);
    assert!(
        max_diff(&unmerged, &x.matmul(&w.t()?)?.broadcast_add(&b)?)? > 1e-2,
        "update must matter"
    );
    layer.merge().map_err(candle_core::Error::wrap)?;
    assert!(layer.is_merged());
    assert!(max_diff(&layer.forward_t(&x, false)?, &unmerged)? < 1e-5);
    assert!(matches!(layer.merge(), Err(LoraError::AlreadyMerged)));
    layer.unmerge().map_err(candle_core::Error::wrap)?;
    assert!(max_diff(layer.weight(), &w)? < 1e-6);
    assert!(max_diff(&layer.forward_t(&x, false)?, &unmerged)? < 1e-5);
    assert!(matches!(layer.unmerge(), Err(LoraError::NotMerged)));
    Ok(())
}

#[test]
fn gradients_reach_only_a_and_b() -> Result<()> {
    // W and b are passed as Vars: LoraLinear must still freeze them.
    let w = Var::from_tensor(&f32(randn_f64(&[8, 5], 8)?)?)?;
    let b = Var::from_tensor(&f32(randn_f64(&[8], 9)?)?)?;
    let x = Var::from_tensor(&f32(randn_f64(&[6, 5], 10)?)?)?;
    let layer = LoraLinear::new(
        w.as_tensor(),
        Some(b.as_tensor()),
        LoraConfig {
            rank: 2,
            alpha: 4.0,
            ..Default::default()
        },
    )?;
    let names: Vec<String> = layer.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["lora_a", "lora_b"]);
    let up = f32(randn_f64(&[6, 8], 11)?)?;
    let g = layer
        .forward_t(x.as_tensor(), true)?
        .mul(&up)?
        .sum_all()?
        .backward()?;
    assert!(
        g.get(w.as_tensor()).is_none() && g.get(b.as_tensor()).is_none(),
        "W and b are frozen"
    );
    assert!(g.get(x.as_tensor()).is_some());
    // With B = 0, A's gradient is exactly zero and B's is not.
    let ga = g.get(layer.lora_a().as_tensor()).expect("grad A");
    let gb = g.get(layer.lora_b().as_tensor()).expect("grad B");
    assert_eq!(norm(ga)?, 0.0);
    assert!(norm(gb)?.is_finite() && norm(gb)? > 0.0);
    // One SGD step makes B non-zero; then both gradients are finite and non-zero.
    layer.lora_b().set(&(layer.lora_b().as_tensor() - (gb * 0.1)?)?)?;
    let g = layer
        .forward_t(x.as_tensor(), true)?
        .mul(&up)?
        .sum_all()?
        .backward()?;
    for (name, v) in layer.trainable_vars() {
        let n = norm(g.get(v.as_tensor()).expect("grad"))?;
        assert!(n.is_finite() && n > 0.0, "{name}: |grad| = {n}");
    }
    Ok(())
}

/// `forward_parts` (one op per part, A shared) against narrowing `forward_t`: values, and the
/// gradients of x, A and B under a random upstream gradient per part, in f64.
#[test]
fn forward_parts_equal_narrowed_forward_with_gradients() -> Result<()> {
    // 1200 rows: five 256-row tasks per part; out 12 = 3 parts of 4.
    let x = Var::from_tensor(&randn_f64(&[3, 400, 5], 30)?)?;
    let w = randn_f64(&[12, 5], 31)?;
    let b = randn_f64(&[12], 32)?;
    let mut layer = LoraLinear::new(
        &w,
        Some(&b),
        LoraConfig {
            rank: 2,
            alpha: 3.0,
            dropout: 0.0,
            seed: 3,
        },
    )?;
    layer.lora_b().set(&randn_f64(&[12, 2], 33)?)?;
    let ups: Vec<Tensor> = (0..3)
        .map(|i| randn_f64(&[3, 400, 4], 34 + i))
        .collect::<Result<_>>()?;
    let loss = |parts: &[Tensor]| -> Result<Tensor> {
        let mut sum = parts[0].mul(&ups[0])?.sum_all()?;
        for (p, u) in parts.iter().zip(&ups).skip(1) {
            sum = (sum + p.mul(u)?.sum_all()?)?;
        }
        Ok(sum)
    };
    for train in [false, true] {
        let parts = layer.forward_parts(x.as_tensor(), 3, HeadsLayout::default(), train)?;
        let y = layer.forward_t(x.as_tensor(), train)?;
        let narrowed: Vec<Tensor> = (0..3).map(|i| y.narrow(2, 4 * i, 4)).collect::<Result<_>>()?;
        assert_eq!(parts.len(), 3);
        for (p, n) in parts.iter().zip(&narrowed) {
            assert_eq!(p.dims(), &[3, 400, 4]);
            assert!(max_diff(p, n)? < 1e-12);
        }
        let (gp, gn) = (loss(&parts)?.backward()?, loss(&narrowed)?.backward()?);
        for v in [
            x.as_tensor(),
            layer.lora_a().as_tensor(),
            layer.lora_b().as_tensor(),
        ] {
            let (a, b) = (gp.get(v).expect("parts grad"), gn.get(v).expect("narrow grad"));
            assert!(norm(b)? > 1e-3, "a gradient that cannot tell the paths apart");
            assert!(max_diff(a, b)? < 1e-10, "train = {train}");
        }
    }
    // Merged: the narrowed fallback, same values.
    let before = layer.forward_parts(x.as_tensor(), 3, HeadsLayout::default(), false)?;
    layer.merge().map_err(candle_core::Error::wrap)?;
    let after = layer.forward_parts(x.as_tensor(), 3, HeadsLayout::default(), false)?;
    assert_eq!((before.len(), after.len()), (3, 3));
    for (p, q) in before.iter().zip(&after) {
        assert!(max_diff(p, q)? < 1e-12);
    }
    let err = layer
        .forward_parts(x.as_tensor(), 5, HeadsLayout::default(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("12 outputs into 5"), "{err}");
    Ok(())
}

#[test]
fn dropout_is_train_only_seeded_and_scaled() -> Result<()> {
    let x = Tensor::ones((200, 50), DType::F32, &Device::Cpu)?;
    let y = dropout(&x, 0.25, 3)?;
    let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
    let zeros = v.iter().filter(|&&e| e == 0.0).count() as f64 / v.len() as f64;
    assert!((zeros - 0.25).abs() < 0.02, "dropped fraction {zeros}");
    assert!(v.iter().all(|&e| e == 0.0 || (e - 1.0 / 0.75).abs() < 1e-6));
    assert!(
        max_diff(&y, &dropout(&x, 0.25, 3)?)? == 0.0,
        "same seed, same mask"
    );
    assert!(dropout(&x, 1.0, 0).is_err());
    // In the layer: train mode drops (outputs differ from eval), eval mode is deterministic.
    let w = f32(randn_f64(&[4, 50], 12)?)?;
    let layer = LoraLinear::new(
        &w,
        None,
        LoraConfig {
            rank: 2,
            alpha: 2.0,
            dropout: 0.5,
            seed: 4,
        },
    )?;
    layer.lora_b().set(&f32(randn_f64(&[4, 2], 13)?)?)?;
    let xs = f32(randn_f64(&[3, 50], 14)?)?;
    let eval = layer.forward_t(&xs, false)?;
    assert_eq!(max_diff(&eval, &layer.forward_t(&xs, false)?)?, 0.0);
    assert!(max_diff(&eval, &xs.apply_t(&layer, true)?)? > 1e-4);
    Ok(())
}

#[test]
fn frozen_aware_linear_matches_matmul_and_gradients_f64() -> Result<()> {
    let x = randn_f64(&[2, 5, 7], 15)?;
    let w = randn_f64(&[4, 7], 16)?;
    let b = randn_f64(&[4], 17)?;
    let y = linear(&x, &w, Some(&b))?;
    assert!(max_diff(&y, &x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?)? < 1e-12);
    check_gradients(
        |t| linear(&t[0], &t[1], Some(&t[2])),
        &[x, w, b],
        &[0, 1, 2],
        GradCheck::default(),
    )?;
    // 1200 tokens: several token chunks, each a run of consecutive tokens that the kernels read
    // and write in place.
    let x = Var::from_tensor(&randn_f64(&[3, 400, 7], 18)?)?;
    let (w, b) = (
        Var::from_tensor(&randn_f64(&[4, 7], 19)?)?,
        Var::from_tensor(&randn_f64(&[4], 20)?)?,
    );
    let u = randn_f64(&[3, 400, 4], 21)?;
    let got = linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()))?;
    let want = x
        .as_tensor()
        .broadcast_matmul(&w.as_tensor().t()?)?
        .broadcast_add(b.as_tensor())?;
    assert!(max_diff(&got, &want)? < 1e-12);
    let (gg, gw) = (
        got.mul(&u)?.sum_all()?.backward()?,
        want.mul(&u)?.sum_all()?.backward()?,
    );
    for v in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
        assert!(max_diff(gg.get(v).unwrap(), gw.get(v).unwrap())? < 1e-10);
    }
    Ok(())
}

/// The composed reference of the fused op: candle matmuls, autograd backward.
fn lora_reference(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    a: &Tensor,
    bm: &Tensor,
    s: f64,
) -> Result<Tensor> {
    let base = x.broadcast_matmul(&w.t()?)?;
    let base = match b {
        Some(b) => base.broadcast_add(b)?,
        None => base,
    };
    base.add(&(x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&bm.t()?)? * s)?)
}

#[test]
fn fused_lora_linear_gradients_f64() -> Result<()> {
    // 1200 rows: five 256-row tasks, so the dA / dB partial sums are exercised; in the heads
    // layouts (B 3 × L 400) some tasks cross a batch boundary.
    let heads = HeadsLayout {
        input_heads: true,
        output_heads: Some(4),
    };
    // 5 rows: the few-rows forward (the update left unmerged), checked by the same differences.
    for (x_shape, layout) in [
        (vec![3, 400, 6], HeadsLayout::default()),
        (vec![3, 2, 400, 3], heads),
        (vec![1, 5, 6], HeadsLayout::default()),
        (vec![1, 2, 5, 3], heads),
    ] {
        let x = randn_f64(&x_shape, 20)?;
        let w = randn_f64(&[8, 6], 21)?;
        let b = randn_f64(&[8], 22)?;
        let a = randn_f64(&[2, 6], 23)?;
        let bm = randn_f64(&[8, 2], 24)?;
        check_gradients(
            |t| lora_linear_heads(&t[0], &t[1], Some(&t[2]), &t[3], &t[4], 1.5, layout),
            &[x, w, b, a, bm],
            &[0, 3, 4],
            GradCheck::default(),
        )?;
    }
    Ok(())
}

#[test]
fn fused_lora_linear_bad_shapes_are_named_errors() -> Result<()> {
    let t = |s: &[usize]| randn_f64(s, 1);
    let (x, w, a, bm) = (t(&[4, 6])?, t(&[5, 6])?, t(&[2, 6])?, t(&[5, 2])?);
    let err = |r: Result<Tensor>| r.expect_err("bad input accepted").to_string();
    assert!(err(lora_linear(&t(&[4, 7])?, &w, None, &a, &bm, 1.0)).contains("x is [4, 7]"));
    assert!(err(lora_linear(&x, &w, None, &t(&[2, 5])?, &bm, 1.0)).contains("a is [2, 5]"));
    assert!(err(lora_linear(&x, &w, None, &a, &t(&[5, 3])?, 1.0)).contains("b is [5, 3]"));
    assert!(err(lora_linear(&x, &w, Some(&t(&[4])?), &a, &bm, 1.0)).contains("bias is [4]"));
    assert!(err(lora_linear(&x, &w, None, &a.to_dtype(DType::F32)?, &bm, 1.0)).contains("dtype"));
    Ok(())
}

/// The op computes gradients for x, A and B only: a tracked W or bias (a `Var`, or a tensor an
/// op recorded) is refused by name rather than left without its gradient (the check precedes
/// the device dispatch, so the composed path off the CPU refuses the same).
#[test]
fn lora_linear_refuses_a_tracked_weight_or_bias() -> Result<()> {
    for dt in [DType::F64, DType::F32] {
        let t = |s: &[usize], seed| randn_f64(s, seed)?.to_dtype(dt);
        let (x, w, bias) = (t(&[5, 4], 1)?, t(&[3, 4], 2)?, t(&[3], 3)?);
        let a = Var::from_tensor(&t(&[2, 4], 4)?)?;
        let bm = Var::from_tensor(&t(&[3, 2], 5)?)?;
        let run =
            |w: &Tensor, bias: &Tensor| lora_linear(&x, w, Some(bias), a.as_tensor(), bm.as_tensor(), 1.0);
        // Frozen W and bias: fine, and A gets its gradient.
        let g = run(&w, &bias)?.sum_all()?.backward()?;
        assert!(g.get(a.as_tensor()).is_some(), "{dt:?}");
        let w_var = Var::from_tensor(&w)?;
        let e = run(w_var.as_tensor(), &bias)
            .expect_err("tracked W accepted")
            .to_string();
        assert!(e.contains("w must be frozen"), "{dt:?}: {e}");
        let bias_var = Var::from_tensor(&bias)?;
        let e = run(&w, bias_var.as_tensor())
            .expect_err("tracked bias accepted")
            .to_string();
        assert!(e.contains("bias must be frozen"), "{dt:?}: {e}");
        // A view of a Var carries an op: tracked too.
        let e = run(&w, &(bias_var.as_tensor() * 2.0)?)
            .expect_err("recorded bias accepted")
            .to_string();
        assert!(e.contains("bias must be frozen"), "{dt:?}: {e}");
        let heads = HeadsLayout {
            input_heads: false,
            output_heads: Some(1),
        };
        let e = lora_linear_heads(
            &x.unsqueeze(0)?,
            w_var.as_tensor(),
            None,
            a.as_tensor(),
            bm.as_tensor(),
            1.0,
            heads,
        )
        .expect_err("tracked W accepted (heads)")
        .to_string();
        assert!(e.contains("w must be frozen"), "{dt:?}: {e}");
    }
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

    /// The fused op equals the composed form in values and in the gradients of x, A and B,
    /// over shapes, ranks, row counts across task seams, with and without a bias, and with x
    /// frozen (no dx formed) or tracked; half the cases have at most 64 rows (the forward
    /// then leaves the update unmerged).
    #[test]
    fn fused_lora_linear_equals_composed(
        rows in proptest::prop_oneof![1usize..=64, 65usize..2400], d_in in 1usize..40, out in 1usize..40, r in 1usize..9,
        with_bias in proptest::bool::ANY, x_tracked in proptest::bool::ANY, seed in 0u64..10_000,
    ) {
        let run = || -> Result<()> {
            let f = |s: &[usize], k: u64| randn_f64(s, seed * 8 + k).and_then(f32);
            let x = Var::from_tensor(&f(&[rows, d_in], 0)?)?;
            let (w, b) = (f(&[out, d_in], 1)?, f(&[out], 2)?);
            let a = Var::from_tensor(&f(&[r, d_in], 3)?)?;
            let bm = Var::from_tensor(&f(&[out, r], 4)?)?;
            let xt = if x_tracked { x.as_tensor().clone() } else { x.as_tensor().detach() };
            let bias = with_bias.then_some(&b);
            let up = f(&[rows, out], 5)?;
            let got = lora_linear(&xt, &w, bias, a.as_tensor(), bm.as_tensor(), 0.7)?;
            let want = lora_reference(&xt, &w, bias, a.as_tensor(), bm.as_tensor(), 0.7)?;
            let tol = 1e-4 * (d_in as f64).sqrt();
            assert!(max_diff(&got, &want)? < tol);
            let (gg, gw) = ((got * &up)?.sum_all()?.backward()?, (want * &up)?.sum_all()?.backward()?);
            for v in [&a, &bm] {
                let (p, q) = (gg.get(v.as_tensor()).unwrap(), gw.get(v.as_tensor()).unwrap());
                assert!(max_diff(p, q)? < tol * (rows as f64).sqrt(), "dA/dB");
            }
            assert_eq!(gg.get(x.as_tensor()).is_some(), x_tracked);
            if x_tracked {
                assert!(max_diff(gg.get(x.as_tensor()).unwrap(), gw.get(x.as_tensor()).unwrap())? < tol);
            }
            Ok(())
        };
        run().unwrap();
    }

    /// Reading x as heads and writing y as heads equals `merge_heads` → fused op →
    /// `split_heads`, in values and in the gradients of x, A and B, over batch and sequence
    /// sizes whose rows cross both the 256-row task seam and the batch boundary inside a task.
    #[test]
    fn lora_linear_heads_equals_composed(
        batch in 1usize..4, seq in proptest::prop_oneof![1usize..=16, 17usize..800], heads_in in 1usize..4, d in 1usize..9,
        heads_out in 1usize..4, d_out in 1usize..9, input_heads in proptest::bool::ANY,
        output_heads in proptest::bool::ANY, seed in 0u64..10_000,
    ) {
        let run = || -> Result<()> {
            let f = |s: &[usize], k: u64| randn_f64(s, seed * 8 + k);
            let (d_in, out) = (heads_in * d, heads_out * d_out);
            let x_shape: Vec<usize> = if input_heads {
                vec![batch, heads_in, seq, d]
            } else {
                vec![batch, seq, d_in]
            };
            let x = Var::from_tensor(&f(&x_shape, 0)?)?;
            let (w, b) = (f(&[out, d_in], 1)?, f(&[out], 2)?);
            let a = Var::from_tensor(&f(&[2, d_in], 3)?)?;
            let bm = Var::from_tensor(&f(&[out, 2], 4)?)?;
            let layout = HeadsLayout { input_heads, output_heads: output_heads.then_some(heads_out) };
            let got = lora_linear_heads(x.as_tensor(), &w, Some(&b), a.as_tensor(), bm.as_tensor(), 0.7, layout)?;
            let xm = if input_heads { merge_heads(x.as_tensor())? } else { x.as_tensor().clone() };
            let y = lora_linear(&xm, &w, Some(&b), a.as_tensor(), bm.as_tensor(), 0.7)?;
            let want = if output_heads { split_heads(&y, heads_out)? } else { y };
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want)? < 1e-12);
            let up = f(got.dims(), 5)?;
            let (gg, gw) = ((got * &up)?.sum_all()?.backward()?, (want * &up)?.sum_all()?.backward()?);
            for v in [&x, &a, &bm] {
                let (p, q) = (gg.get(v.as_tensor()).unwrap(), gw.get(v.as_tensor()).unwrap());
                assert_eq!(p.dims(), v.as_tensor().dims());
                assert!(max_diff(p, q)? < 1e-10);
            }
            Ok(())
        };
        run().unwrap();
    }
}

#[test]
fn lora_linear_heads_bad_shapes_are_named_errors() -> Result<()> {
    let (w, a, bm) = (
        randn_f64(&[8, 6], 1)?,
        randn_f64(&[2, 6], 2)?,
        randn_f64(&[8, 2], 3)?,
    );
    let call = |x: &Tensor, layout| {
        lora_linear_heads(x, &w, None, &a, &bm, 1.0, layout)
            .unwrap_err()
            .to_string()
    };
    let heads_in = HeadsLayout {
        input_heads: true,
        output_heads: None,
    };
    let e = call(&randn_f64(&[2, 5, 6], 4)?, heads_in);
    assert!(e.contains("expected heads [B, H, L, d] with H·d = 6"), "{e}");
    let e = call(&randn_f64(&[2, 4, 5, 2], 4)?, heads_in);
    assert!(e.contains("H·d = 6"), "{e}");
    let out3 = HeadsLayout {
        input_heads: false,
        output_heads: Some(3),
    };
    let e = call(&randn_f64(&[2, 5, 6], 5)?, out3);
    assert!(e.contains("cannot write 8 outputs as 3 heads"), "{e}");
    let out2 = HeadsLayout {
        output_heads: Some(2),
        ..out3
    };
    let e = call(&randn_f64(&[10, 6], 6)?, out2);
    assert!(e.contains("needs [B, L, in]"), "{e}");
    Ok(())
}

#[test]
fn bad_lora_configs_are_named_errors() -> Result<()> {
    let w = Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?;
    let e = LoraLinear::new(
        &w,
        None,
        LoraConfig {
            rank: 0,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lora_linear") && e.contains("rank"), "{e}");
    // A rank past min(out, in): refused by name (usize::MAX panicked on capacity, 2^40 aborted).
    for rank in [4, 1 << 40, usize::MAX] {
        let e = LoraLinear::new(
            &w,
            None,
            LoraConfig {
                rank,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("above min(out, in) = 3"), "{e}");
    }
    let e = LoraLinear::new(
        &w,
        None,
        LoraConfig {
            dropout: 1.0,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dropout"), "{e}");
    let bias = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
    let e = LoraLinear::new(&w, Some(&bias), LoraConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias is [3], expected [4]"), "{e}");
    let e = linear(&Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?, &w, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("linear: x is [2, 5]"), "{e}");
    Ok(())
}

/// Routed FFN weights and a LoRA config with α ≠ r.
fn routed_lora(gate: GateMode, k: usize) -> Result<(RoutedFfn, [Tensor; 4])> {
    let (d, d_ff) = (10, 24);
    let w = [
        f32((randn_f64(&[d_ff, d], 20)? * 0.3)?)?,
        f32((randn_f64(&[d_ff], 21)? * 0.1)?)?,
        f32((randn_f64(&[d, d_ff], 22)? * 0.2)?)?,
        f32((randn_f64(&[d], 23)? * 0.1)?)?,
    ];
    let mut cfg = RoutedFfnConfig::new(4, BlockTopK::Count(k));
    let act = Activation::GeluErf;
    cfg.gate = gate;
    let layer = RoutedFfn::new(&w[0], &w[1], &w[2], &w[3], act, cfg)?.with_lora(LoraConfig {
        rank: 3,
        alpha: 5.0,
        dropout: 0.0,
        seed: 9,
    })?;
    Ok((layer, w))
}

#[test]
fn routed_lora_zero_b_equals_base_and_dense_lora_when_all_blocks() -> Result<()> {
    let (layer, w) = routed_lora(GateMode::Ones, 4)?;
    let x = f32(randn_f64(&[13, 10], 24)?)?;
    // B1 = B2 = 0: the plain FFN.
    let dense = reference::dense_ffn(&x, &w[0], &w[1], &w[2], &w[3], Activation::GeluErf)?;
    assert!(max_diff(&layer.forward_t(&x, true)?.y, &dense)? < 1e-5);
    // Non-zero B: all blocks + gate ≡ 1 equals a dense FFN of two LoraLinear layers.
    let (a1, b1, a2, b2) = layer.lora_factors().expect("lora");
    b1.set(&f32(randn_f64(&[24, 3], 25)?)?)?;
    b2.set(&f32(randn_f64(&[10, 3], 26)?)?)?;
    let cfg = LoraConfig {
        rank: 3,
        alpha: 5.0,
        dropout: 0.0,
        seed: 0,
    };
    let fc1 = LoraLinear::new(&w[0], Some(&w[1]), cfg)?;
    let fc2 = LoraLinear::new(&w[2], Some(&w[3]), cfg)?;
    for (dst, src) in [
        (fc1.lora_a(), a1),
        (fc1.lora_b(), b1),
        (fc2.lora_a(), a2),
        (fc2.lora_b(), b2),
    ] {
        dst.set(src.as_tensor())?;
    }
    let xv = Var::from_tensor(&x)?;
    let want = fc2.forward_t(
        &Activation::GeluErf.forward(&fc1.forward_t(xv.as_tensor(), false)?)?,
        false,
    )?;
    let got = layer.forward_t(xv.as_tensor(), false)?.y;
    assert!(max_diff(&got, &want)? < 1e-5);
    assert!(max_diff(&got, &dense)? > 1e-2, "the update must matter");
    // Same gradients for x and for each LoRA factor.
    let up = f32(randn_f64(&[13, 10], 31)?)?;
    let g_got = got.mul(&up)?.sum_all()?.backward()?;
    let g_want = want.mul(&up)?.sum_all()?.backward()?;
    let pairs = [
        (xv.clone(), xv.clone()),
        (a1.clone(), fc1.lora_a().clone()),
        (b1.clone(), fc1.lora_b().clone()),
    ];
    let pairs = pairs.into_iter().chain([
        (a2.clone(), fc2.lora_a().clone()),
        (b2.clone(), fc2.lora_b().clone()),
    ]);
    for (i, (ours, theirs)) in pairs.enumerate() {
        let a = g_got.get(ours.as_tensor()).expect("routed grad");
        let b = g_want.get(theirs.as_tensor()).expect("dense grad");
        let scale = norm(b)?.max(1.0);
        assert!(
            max_diff(a, b)? < 1e-5 * scale,
            "gradient {i} differs: {}",
            max_diff(a, b)?
        );
    }
    Ok(())
}

#[test]
fn routed_lora_merge_equals_unmerged_and_grads_reach_only_trainables() -> Result<()> {
    let (mut layer, w) = routed_lora(GateMode::SoftmaxKept, 2)?;
    let x = f32(randn_f64(&[3, 9, 10], 27)?)?;
    let (_, b1, _, b2) = layer.lora_factors().expect("lora");
    b1.set(&f32(randn_f64(&[24, 3], 28)?)?)?;
    b2.set(&f32(randn_f64(&[10, 3], 29)?)?)?;
    let out = layer.forward_t(&x, true)?;
    let up = f32(randn_f64(&[3, 9, 10], 30)?)?;
    let g = out.y.mul(&up)?.sum_all()?.backward()?;
    for t in &w {
        assert!(g.get(t).is_none(), "frozen FFN weight got a gradient");
    }
    let names: Vec<String> = layer.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "router.weight",
            "router.bias",
            "fc1.lora_a",
            "fc1.lora_b",
            "fc2.lora_a",
            "fc2.lora_b"
        ]
    );
    for (name, v) in layer.trainable_vars() {
        let n = norm(g.get(v.as_tensor()).expect("grad"))?;
        assert!(n.is_finite() && n > 0.0, "{name}: |grad| = {n}");
    }
    let unmerged = layer.forward_t(&x, false)?.y;
    layer.merge().map_err(candle_core::Error::wrap)?;
    assert!(matches!(layer.merge(), Err(LoraError::AlreadyMerged)));
    assert!(max_diff(&layer.forward_t(&x, false)?.y, &unmerged)? < 1e-5);
    layer.unmerge().map_err(candle_core::Error::wrap)?;
    assert!(matches!(layer.unmerge(), Err(LoraError::NotMerged)));
    assert!(max_diff(layer.weights().0, &w[0])? < 1e-5);
    assert!(max_diff(&layer.forward_t(&x, false)?.y, &unmerged)? < 1e-5);
    Ok(())
}

/// With k < n_blocks the routed layer with LoRA is the masked dense FFN of the merged weights
/// `W1 + s·B1 A1`, `W2 + s·B2 A2` (s = α/r), and every LoRA factor's gradient matches autograd
/// through that reference (for the gated and the ungated layer).
#[test]
fn routed_lora_top_k_equals_masked_merged_ffn_and_its_gradients() -> Result<()> {
    for gate in [GateMode::Ones, GateMode::SoftmaxKept] {
        let (layer, w) = routed_lora(gate, 2)?;
        let (a1, b1, a2, b2) = layer.lora_factors().expect("lora");
        b1.set(&f32(randn_f64(&[24, 3], 41)?)?)?;
        b2.set(&f32(randn_f64(&[10, 3], 42)?)?)?;
        let x = Var::from_tensor(&f32(randn_f64(&[17, 10], 43)?)?)?;
        let out = layer.forward_t(x.as_tensor(), true)?;
        assert!(out.routing.k() < out.routing.n_blocks());
        // The reference: the same LoRA factors (fresh vars), the gates as a constant mask.
        let refs: Vec<Var> = [a1, b1, a2, b2]
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
            .collect::<Result<_>>()?;
        let s = 5.0 / 3.0;
        let w1 = (&w[0] + (refs[1].as_tensor().matmul(refs[0].as_tensor())? * s)?)?;
        let w2 = (&w[2] + (refs[3].as_tensor().matmul(refs[2].as_tensor())? * s)?)?;
        let mask = reference::block_mask(&out.gate_matrix()?.detach(), 6)?;
        let want = reference::masked_ffn(x.as_tensor(), &w1, &w[1], &w2, &w[3], Activation::GeluErf, &mask)?;
        assert!(max_diff(&out.y, &want)? < 1e-5, "{gate:?}: forward differs");
        let up = f32(randn_f64(&[17, 10], 44)?)?;
        let g_got = out.y.mul(&up)?.sum_all()?.backward()?;
        let g_want = want.mul(&up)?.sum_all()?.backward()?;
        for (i, (ours, theirs)) in [a1, b1, a2, b2].iter().zip(&refs).enumerate() {
            let a = g_got.get(ours.as_tensor()).expect("routed grad");
            let b = g_want.get(theirs.as_tensor()).expect("reference grad");
            let d = max_diff(a, b)?;
            assert!(
                d < 1e-5 * norm(b)?.max(1.0),
                "{gate:?}: LoRA factor {i} gradient differs by {d}"
            );
        }
        if gate == GateMode::Ones {
            // Constant gates: the input gradient matches too.
            let (a, b) = (
                g_got.get(x.as_tensor()).expect("x"),
                g_want.get(x.as_tensor()).expect("x"),
            );
            assert!(
                max_diff(a, b)? < 1e-5 * norm(b)?.max(1.0),
                "input gradient differs"
            );
        }
    }
    Ok(())
}

/// `few_rows_matmul` with a few untracked rows returns the product already contiguous (a
/// tiled transpose of `w xᵀ`, not a view for candle's strided copy), equal to candle's matmul
/// in f32 and f64, for row counts on and off the transpose's 32-element tiles and a weight at
/// an offset; tracked rows keep the differentiable view and their gradient.
#[test]
fn few_rows_matmul_several_rows_is_contiguous_and_exact() -> Result<()> {
    use spt_ops::lora::few_rows_matmul;
    for (n, out, d_in) in [
        (2usize, 7usize, 5usize),
        (27, 1536, 384),
        (33, 70, 64),
        (64, 384, 1536),
    ] {
        let tall = randn_f64(&[out + 3, d_in], 31)?;
        let w = tall.narrow(0, 3, out)?;
        let x = randn_f64(&[n, d_in], 32)?;
        let want = x.matmul(&w.t()?)?;
        let got = few_rows_matmul(&x, &w)?;
        assert!(got.is_contiguous(), "{n}x{out}x{d_in}");
        assert!(max_diff(&got, &want)? < 1e-12, "f64 {n}x{out}x{d_in}");
        let got = few_rows_matmul(&f32(x.clone())?, &f32(w.clone())?)?;
        assert!(got.is_contiguous());
        assert_eq!(got.dims(), [n, out]);
        assert!(max_diff(&got, &f32(want)?)? < 1e-3, "f32 {n}x{out}x{d_in}");
    }
    let w = randn_f64(&[40, 16], 33)?;
    let x = Var::from_tensor(&randn_f64(&[5, 16], 34)?)?;
    let grads = few_rows_matmul(x.as_tensor(), &w)?.sum_all()?.backward()?;
    let gx = grads.get(x.as_tensor()).expect("x's gradient");
    assert!(max_diff(gx, &w.sum_keepdim(0)?.broadcast_as((5, 16))?)? < 1e-10);
    Ok(())
}

/// `few_rows_matmul` with one untracked row (decoding) takes the threaded matrix-vector path:
/// it equals candle's matmul in f32 and f64, in the weight's own layout and a narrowed one, and
/// a tracked row or weight still gets its gradient (those take candle's differentiable path).
/// The LoRA op's one-row forward takes the same path and equals its reference.
#[test]
fn few_rows_matmul_one_row_matches_matmul_and_keeps_gradients() -> Result<()> {
    use spt_ops::lora::few_rows_matmul;
    for (out, d_in) in [(50_000usize, 64usize), (2304, 768), (3, 5)] {
        let w = randn_f64(&[out, d_in], 11)?;
        let x = randn_f64(&[1, d_in], 12)?;
        let want = x.matmul(&w.t()?)?;
        assert!(
            max_diff(&few_rows_matmul(&x, &w)?, &want)? < 1e-12,
            "f64 {out}x{d_in}"
        );
        let (x32, w32) = (f32(x.clone())?, f32(w.clone())?);
        let got = few_rows_matmul(&x32, &w32)?;
        assert_eq!(got.dims(), [1, out]);
        assert!(
            max_diff(&got, &x32.matmul(&w32.t()?)?)? < 1e-4,
            "f32 {out}x{d_in}"
        );
        // Rows 1.. of a taller weight: contiguous, at an offset.
        let tall = randn_f64(&[out + 2, d_in], 13)?;
        let part = tall.narrow(0, 2, out)?;
        assert!(max_diff(&few_rows_matmul(&x, &part)?, &x.matmul(&part.t()?)?)? < 1e-12);
        // GPT-2's layout: w the transposed view of a contiguous [in, out].
        let io = randn_f64(&[d_in, out], 16)?;
        let got = few_rows_matmul(&x32, &f32(io.clone())?.t()?)?;
        assert!(
            max_diff(&got, &x32.matmul(&f32(io.clone())?)?)? < 1e-4,
            "in-out {out}x{d_in}"
        );
        assert!(max_diff(&few_rows_matmul(&x, &io.t()?)?, &x.matmul(&io)?)? < 1e-12);
    }
    // The LoRA op's one-row forward (decoding) takes the same matrix-vector path for W x.
    for (out, d_in) in [(2304usize, 768usize), (3, 5)] {
        let (x, w, b) = (
            randn_f64(&[1, 1, d_in], 17)?,
            randn_f64(&[out, d_in], 18)?,
            randn_f64(&[out], 19)?,
        );
        let (a, bm) = (randn_f64(&[8, d_in], 20)?, randn_f64(&[out, 8], 21)?);
        let want = lora_reference(&x, &w, Some(&b), &a, &bm, 2.0)?;
        assert!(
            max_diff(&lora_linear(&x, &w, Some(&b), &a, &bm, 2.0)?, &want)? < 1e-11,
            "f64 {out}x{d_in}"
        );
        let got = lora_linear(&f32(x)?, &f32(w)?, Some(&f32(b)?), &f32(a)?, &f32(bm)?, 2.0)?;
        // Relative to the largest output (~160 at 2304 × 768), not the norm of all of them.
        let scale = spt_ops::gradcheck::max_abs(&want)?;
        assert!(max_diff(&got, &want)? < 1e-5 * scale, "f32 {out}x{d_in}");
    }
    let w = Var::from_tensor(&randn_f64(&[300, 256], 14)?)?;
    let x = Var::from_tensor(&randn_f64(&[1, 256], 15)?)?;
    let grads = few_rows_matmul(x.as_tensor(), w.as_tensor())?
        .sum_all()?
        .backward()?;
    let gx = grads.get(x.as_tensor()).expect("x's gradient");
    assert!(max_diff(gx, &w.as_tensor().sum_keepdim(0)?)? < 1e-10);
    assert!(grads.get(w.as_tensor()).is_some(), "w's gradient");
    Ok(())
}
