//! Routed-FFN calibration: the router fit, the routing-quality report, unit regrouping
//! (permutation and clustering), and the linear correction.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::routed::{assert_close, diff, vars, weights};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};
use spt_ops::routed_ffn::BlockTopK;
use spt_ops::routed_ffn::{add_linear_correction, linear_correction_reference};
use spt_ops::routed_ffn::{RouterFitConfig, UnitClusterConfig};
use spt_ops::{Activation, GateMode, LoraConfig, RoutedFfn, RoutedFfnConfig};

/// Tokens in clusters; cluster c strongly drives block c, so a linear router can rank blocks.
fn planted(d: usize, n: usize, b: usize, t: usize, seed: u64) -> Result<([Tensor; 4], Tensor)> {
    let dirs = randn_f64(&[n, d], seed)?; // cluster directions
    let [w1, b1, w2, b2] = weights(d, n * b, seed + 1, DType::F64)?;
    // Block e's rows get a large component along dirs[e].
    let boost = dirs.unsqueeze(1)?.broadcast_as((n, b, d))?.reshape((n * b, d))?;
    let w1 = (w1 + (boost * 0.5)?)?;
    let mut rng = StdRng::seed_from_u64(seed + 2);
    let ids: Vec<u32> = (0..t)
        .map(|_| rand::Rng::random_range(&mut rng, 0..n as u32))
        .collect();
    let ids = Tensor::from_vec(ids, t, &Device::Cpu)?;
    let x = (dirs.index_select(&ids, 0)? + (randn_f64(&[t, d], seed + 3)? * 0.3)?)?;
    let f = |t: Tensor| t.to_dtype(DType::F32);
    Ok(([f(w1)?, f(b1)?, f(w2)?, f(b2)?], f(x)?))
}

#[test]
fn router_init_ranks_blocks_by_activation_norm() -> Result<()> {
    let ([w1, b1, w2, b2], x) = planted(16, 4, 8, 400, 21)?;
    let mut cfg = RoutedFfnConfig::new(4, BlockTopK::Count(1));
    let act = Activation::GeluErf;
    cfg.seed = 3;
    let mut layer = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg)?;
    let before = layer.quality(&x)?;
    let after = layer.init_router(&x, RouterFitConfig::default())?;
    assert!(after.oracle_recall >= 0.9, "recall after fit {after:?}");
    assert!(
        after.oracle_recall > before.oracle_recall + 0.2,
        "before {before:?}, after {after:?}"
    );
    assert!(
        after.rel_error < before.rel_error,
        "before {before:?}, after {after:?}"
    );
    assert!(after.cosine > before.cosine && after.cosine <= 1.0 + 1e-9);
    assert_eq!(after.tokens, 400);
    // A non-finite sample is named as such (it was reported as a singular fit).
    let mut bad = x.flatten_all()?.to_vec1::<f32>()?;
    bad[37] = f32::NAN;
    let bad = Tensor::from_vec(bad, x.dims(), &Device::Cpu)?;
    let e = layer
        .init_router(&bad, RouterFitConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN or infinite") && !e.contains("singular"), "{e}");
    Ok(())
}

#[test]
fn quality_of_the_dense_routing_is_exact() -> Result<()> {
    let [w1, b1, w2, b2] = weights(8, 24, 9, DType::F32)?;
    let mut cfg = RoutedFfnConfig::new(3, BlockTopK::Fraction(1.0));
    let act = Activation::GeluTanh;
    cfg.gate = GateMode::Ones;
    let layer = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg)?;
    let q = layer.quality(&randn_f64(&[2, 20, 8], 10)?.to_dtype(DType::F32)?)?;
    assert!(
        (q.cosine - 1.0).abs() < 1e-6
            && (q.oracle_cosine - 1.0).abs() < 1e-6
            && (q.token_cosine - 1.0).abs() < 1e-6
            && (q.oracle_token_cosine - 1.0).abs() < 1e-6
            && q.rel_error < 1e-6
            && q.oracle_recall == 1.0,
        "{q:?}"
    );
    Ok(())
}

/// A seeded permutation of `0..n`.
fn shuffled(n: usize, seed: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    p.shuffle(&mut StdRng::seed_from_u64(seed));
    p
}

#[test]
fn permuted_units_keep_the_dense_ffn_with_lora() -> Result<()> {
    let [w1, b1, w2, b2] = weights(8, 24, 31, DType::F32)?;
    let cfg = RoutedFfnConfig::new(4, BlockTopK::Count(2));
    let act = Activation::GeluErf;
    let mut layer = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg)?.with_lora(LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        seed: 5,
    })?;
    // Non-zero B factors, so LoRA's per-unit rows and columns matter.
    let (_, lb1, _, lb2) = layer.lora_factors().expect("lora");
    lb1.set(&(randn_f64(&[24, 2], 32)? * 0.2)?.to_dtype(DType::F32)?)?;
    lb2.set(&(randn_f64(&[8, 2], 33)? * 0.2)?.to_dtype(DType::F32)?)?;
    let x = randn_f64(&[30, 8], 34)?.to_dtype(DType::F32)?;
    let dense = layer.forward_dense(&x, false)?;
    let routed = layer.forward_t(&x, false)?.y;
    layer.permute_units(&shuffled(24, 35))?;
    assert_close(
        "dense after permuting",
        &layer.forward_dense(&x, false)?,
        &dense,
        1e-5,
    )?;
    let (d, _) = diff(&layer.forward_t(&x, false)?.y, &routed)?;
    assert!(
        d > 1e-3,
        "the blocks hold other units now: routed output moved by {d}"
    );
    // Merging after a permutation gives the same dense function.
    layer
        .merge()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    assert_close(
        "merged after permuting",
        &layer.forward_dense(&x, false)?,
        &dense,
        1e-5,
    )?;

    // Not a permutation, or trained weights: named errors, nothing changed.
    let e = layer.permute_units(&[0, 1]).unwrap_err().to_string();
    assert!(e.contains("2 entries, expected d_ff = 24"), "{e}");
    let mut dup = shuffled(24, 36);
    dup[3] = dup[7];
    let e = layer.permute_units(&dup).unwrap_err().to_string();
    assert!(e.contains("appears twice"), "{e}");
    assert_close(
        "after refused permutations",
        &layer.forward_dense(&x, false)?,
        &dense,
        1e-5,
    )?;
    let v = vars(&[w1, b1, w2, b2])?;
    let ts: Vec<Tensor> = v.iter().map(|v| v.as_tensor().clone()).collect();
    let mut trained = RoutedFfn::new(
        &ts[0],
        &ts[1],
        &ts[2],
        &ts[3],
        Activation::Relu,
        RoutedFfnConfig::new(4, BlockTopK::Count(2)),
    )?;
    let e = trained.permute_units(&shuffled(24, 37)).unwrap_err().to_string();
    assert!(e.contains("frozen"), "{e}");
    // A trained weight passed as a view of its Var (a Conv1D-style layout) counts as trained,
    // and merging LoRA into trained weights (which would make them constants) is refused.
    let w1_t = Var::from_tensor(&ts[0].t()?.contiguous()?)?;
    let mut viewed = RoutedFfn::new(
        &w1_t.as_tensor().t()?,
        &ts[1].detach(),
        &ts[2].detach(),
        &ts[3].detach(),
        Activation::Relu,
        RoutedFfnConfig::new(4, BlockTopK::Count(2)),
    )?
    .with_lora(LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        seed: 5,
    })?;
    let e = viewed.permute_units(&shuffled(24, 38)).unwrap_err().to_string();
    assert!(e.contains("frozen"), "{e}");
    let e = viewed.merge().unwrap_err().to_string();
    assert!(e.contains("merge needs frozen FFN weights"), "{e}");
    assert!(viewed.weights().0.track_op(), "W1 stays trained");
    Ok(())
}

#[test]
fn clustering_regroups_units_that_fire_together() -> Result<()> {
    // Planted: block e's units respond to token cluster e. Shuffle the units, so that contiguous
    // blocks mix the groups, then regroup them.
    let (n, b) = (4usize, 8usize);
    let ([w1, b1, w2, b2], x) = planted(16, n, b, 600, 41)?;
    let perm = shuffled(n * b, 42);
    let idx = Tensor::new(perm.as_slice(), &Device::Cpu)?;
    let (w1, b1, w2) = (
        w1.index_select(&idx, 0)?,
        b1.index_select(&idx, 0)?,
        w2.index_select(&idx, 1)?,
    );
    let group = |u: u32| perm[u as usize] as usize / b; // planted group of shuffled unit u
    let cfg = RoutedFfnConfig::new(n, BlockTopK::Count(1));
    let act = Activation::Relu;
    let mut layer = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg)?;
    let contiguous = layer.init_router(&x, RouterFitConfig::default())?;
    let order = layer.cluster_units(&x, UnitClusterConfig::default())?;
    assert_eq!(
        order,
        layer.cluster_units(&x, UnitClusterConfig::default())?,
        "deterministic"
    );
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..(n * b) as u32).collect::<Vec<_>>(), "a permutation");
    // Each block is (almost) one planted group.
    let mut pure = 0;
    for blk in order.chunks(b) {
        let mut count = vec![0usize; n];
        blk.iter().for_each(|&u| count[group(u)] += 1);
        pure += count.iter().max().unwrap();
    }
    assert!(
        pure as f64 >= 0.9 * (n * b) as f64,
        "{pure} of {} units in their group's block",
        n * b
    );
    layer.permute_units(&order)?;
    let regrouped = layer.init_router(&x, RouterFitConfig::default())?;
    assert!(
        regrouped.cosine > contiguous.cosine + 0.05 && regrouped.rel_error < contiguous.rel_error,
        "contiguous {contiguous:?}, regrouped {regrouped:?}"
    );
    let e = layer
        .cluster_units(
            &Tensor::zeros((0, 16), DType::F32, &Device::Cpu)?,
            UnitClusterConfig::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least one sample token"), "{e}");
    Ok(())
}

/// With every pre-activation positive, a ReLU FFN is linear, and with the same blocks skipped
/// by every token so is what they add: the fitted correction then restores the dense output.
#[test]
fn linear_correction_restores_skipped_blocks_that_are_linear() -> Result<()> {
    let (d, n, b, t) = (12usize, 4usize, 6usize, 300usize);
    let [w1, b1, w2, b2] = weights(d, n * b, 61, DType::F64)?;
    let b1 = (b1 + 20.0)?; // |x W1ᵀ| stays far below 20: ReLU is the identity here
    let x = randn_f64(&[t, d], 62)?;
    let mut cfg = RoutedFfnConfig::new(n, BlockTopK::Count(2));
    let act = Activation::Relu;
    cfg.gate = GateMode::Ones;
    cfg.correction = true;
    let mut layer = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg)?;
    // Every token keeps blocks 1 and 3.
    layer
        .router()
        .0
        .set(&Tensor::zeros((n, d), DType::F64, &Device::Cpu)?)?;
    layer
        .router()
        .1
        .set(&Tensor::new(&[0.0, 5.0, 0.0, 5.0], &Device::Cpu)?)?;
    let before = layer.quality(&x)?;
    layer.fit_correction(&x, 1e-12)?;
    let after = layer.quality(&x)?;
    assert!(before.rel_error > 0.3, "{before:?}");
    assert_close(
        "corrected",
        &layer.forward_t(&x, false)?.y,
        &layer.forward_dense(&x, false)?,
        1e-6,
    )?;
    assert!(
        after.token_cosine > 1.0 - 1e-9 && after.rel_error < 1e-6,
        "{after:?}"
    );
    let e = layer.fit_correction(&x, 0.0).unwrap_err().to_string();
    assert!(e.contains("ridge > 0"), "{e}");
    Ok(())
}

#[test]
fn linear_correction_adds_a_fitted_linear_term_for_tokens_that_skip_blocks() -> Result<()> {
    let (n, b, k, d) = (4usize, 8usize, 2usize, 16usize);
    let ([w1, b1, w2, b2], x) = planted(d, n, b, 600, 71)?;
    let mut cfg = RoutedFfnConfig::new(n, BlockTopK::Count(k));
    let act = Activation::GeluErf;
    let mut plain = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg.clone())?;
    let without = plain.init_router(&x, RouterFitConfig::default())?;
    cfg.correction = true;
    let mut layer = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg)?;
    assert_eq!(layer.correction().unwrap().dims(), [d + 1, d]);
    assert_eq!(layer.trainable_vars().len(), 2, "the correction is a constant");
    let with = layer.init_router(&x, RouterFitConfig::default())?;
    // The same router either way (the correction is fitted after it); closer to dense per token.
    assert_close(
        "router",
        layer.router().0.as_tensor(),
        plain.router().0.as_tensor(),
        0.0,
    )?;
    assert!(
        with.token_cosine > without.token_cosine + 0.01 && with.rel_error < without.rel_error,
        "with {with:?}, without {without:?}"
    );

    // Forward: the plain routed output plus [x, 1] C, and d(Σy)/dx gains C's row sums.
    let c = layer.correction().unwrap().clone();
    let ones = Tensor::ones((x.dim(0)?, 1), DType::F32, &Device::Cpu)?;
    let term = Tensor::cat(&[&x, &ones], 1)?.matmul(&c)?;
    let y = layer.forward_t(&x, false)?.y;
    assert_close("output", &y, &(plain.forward_t(&x, false)?.y + &term)?, 1e-5)?;
    let xv = Var::from_tensor(&x)?;
    let gx = |l: &RoutedFfn| -> Result<Tensor> {
        let g = l.forward_t(xv.as_tensor(), true)?.y.sum_all()?.backward()?;
        Ok(g.get(xv.as_tensor()).expect("x gradient").clone())
    };
    let row_sums = c.narrow(0, 0, d)?.sum(1)?.unsqueeze(0)?; // [1, d]
    let expect = (gx(&plain)?.broadcast_add(&row_sums))?;
    assert_close("x gradient", &gx(&layer)?, &expect, 1e-4)?;
    // Every block running: nothing is skipped, nothing is corrected.
    assert_close(
        "all blocks",
        &layer.forward_dense(&x, false)?,
        &plain.forward_dense(&x, false)?,
        0.0,
    )?;

    // Restore (as from a checkpoint): the same output; named errors.
    let mut restored = RoutedFfn::new(&w1, &b1, &w2, &b2, act, layer.config().clone())?;
    restored.router().0.set(layer.router().0.as_tensor())?;
    restored.router().1.set(layer.router().1.as_tensor())?;
    restored.set_correction(&c)?;
    assert_close("restored", &restored.forward_t(&x, false)?.y, &y, 0.0)?;
    let e = restored
        .set_correction(&c.narrow(0, 0, d)?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected [d+1, d] = [17, 16]"), "{e}");
    let e = plain.set_correction(&c).unwrap_err().to_string();
    assert!(e.contains("configured without one"), "{e}");

    // Regrouping makes the blocks new: the correction resets until the next fit.
    layer.permute_units(&shuffled(n * b, 73))?;
    assert_eq!(
        layer.correction().unwrap().abs()?.sum_all()?.to_scalar::<f32>()?,
        0.0
    );
    Ok(())
}

/// The correction's values are checked where they come in: a non-finite correction (set by
/// hand or restored) would turn every token that skips a block into NaN, and an infinite ridge
/// fits an all-zero correction (every Cholesky pivot infinite). Both are refused, by name, and
/// leave the fitted correction as it was.
#[test]
fn linear_correction_refuses_non_finite_values_and_an_infinite_ridge() -> Result<()> {
    let (n, b, k, d) = (4usize, 4usize, 1usize, 8usize);
    let ([w1, b1, w2, b2], x) = planted(d, n, b, 64, 91)?;
    let cfg = RoutedFfnConfig {
        correction: true,
        ..RoutedFfnConfig::new(n, BlockTopK::Count(k))
    };
    let mut layer = RoutedFfn::new(&w1, &b1, &w2, &b2, Activation::GeluErf, cfg)?;
    layer.fit_correction(&x, 0.1)?;
    let fitted = layer.correction().unwrap().clone();
    assert!(fitted.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut c = fitted.flatten_all()?.to_vec1::<f32>()?;
        c[5] = bad;
        let c = Tensor::from_vec(c, (d + 1, d), &Device::Cpu)?;
        let e = layer.set_correction(&c).unwrap_err().to_string();
        assert!(
            e.contains("linear correction") && e.contains("non-finite"),
            "{bad}: {e}"
        );
        assert!(layer.check_correction(&c).is_err(), "{bad}");
        assert_close("kept", layer.correction().unwrap(), &fitted, 0.0)?;
    }
    for ridge in [f64::INFINITY, f64::NAN, -1.0] {
        let e = layer.fit_correction(&x, ridge).unwrap_err().to_string();
        assert!(e.contains("finite ridge > 0"), "{ridge}: {e}");
        assert_close("kept", layer.correction().unwrap(), &fitted, 0.0)?;
    }
    assert!(layer
        .forward_t(&x, false)?
        .y
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .is_finite());
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

    /// The correction op equals the composed `y + x C[..d] + C[d]` in values and in the
    /// gradients of y and x (frozen or tracked), over token counts across its row tasks, in f32
    /// and f64.
    #[test]
    fn linear_correction_op_equals_the_composed_form(
        t in 0usize..300, d in 1usize..40, y_tracked in proptest::bool::ANY,
        x_tracked in proptest::bool::ANY, f64_ in proptest::bool::ANY, seed in 0u64..10_000,
    ) {
        let run = || -> Result<()> {
            let dt = if f64_ { DType::F64 } else { DType::F32 };
            let f = |s: &[usize], k: u64| randn_f64(s, seed * 8 + k).and_then(|t| t.to_dtype(dt));
            let var = |t: Tensor, tracked: bool| -> Result<(Var, Tensor)> {
                let v = Var::from_tensor(&t)?;
                let t = if tracked { v.as_tensor().clone() } else { v.as_tensor().detach() };
                Ok((v, t))
            };
            let (yv, y) = var(f(&[t, d], 0)?, y_tracked)?;
            let (xv, x) = var(f(&[t, d], 1)?, x_tracked)?;
            let c = f(&[d + 1, d], 2)?;
            let up = f(&[t, d], 3)?;
            let got = add_linear_correction(&y, &x, &c)?;
            let want = linear_correction_reference(&y, &x, &c)?;
            let tol = if f64_ { 1e-12 } else { 1e-5 };
            assert_close("values", &got, &want, tol)?;
            if !(y_tracked || x_tracked) {
                return Ok(());
            }
            let (gg, gw) = ((got * &up)?.sum_all()?.backward()?, (want * &up)?.sum_all()?.backward()?);
            for (v, tracked, name) in [(&yv, y_tracked, "dy"), (&xv, x_tracked, "dx")] {
                let (a, b) = (gg.get(v.as_tensor()), gw.get(v.as_tensor()));
                assert_eq!(a.is_some(), tracked, "{name}: gradient presence");
                if let (Some(a), Some(b)) = (a, b) {
                    assert_close(name, a, b, tol)?;
                }
            }
            Ok(())
        };
        run().unwrap();
    }
}

/// The correction op's gradients against central differences (f64), over shapes across its row
/// tasks; its errors name what does not fit.
#[test]
fn linear_correction_op_gradients_and_errors() -> Result<()> {
    for (t, d) in [(3usize, 4usize), (70, 5), (130, 2)] {
        check_gradients(
            |v| add_linear_correction(&v[0], &v[1], &v[2]),
            &[
                randn_f64(&[t, d], 1)?,
                randn_f64(&[t, d], 2)?,
                randn_f64(&[d + 1, d], 3)?,
            ],
            &[0, 1],
            GradCheck {
                max_elems: 96,
                ..Default::default()
            },
        )
        .map_err(|e| candle_core::Error::Msg(format!("[{t}, {d}]: {e}")))?;
    }
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu);
    let err = |r: Result<Tensor>| r.unwrap_err().to_string();
    let e = err(add_linear_correction(&z(&[4, 3])?, &z(&[4, 3])?, &z(&[3, 3])?));
    assert!(e.contains("c [3, 3]") && e.contains("d = 3"), "{e}");
    let e = err(add_linear_correction(&z(&[5, 3])?, &z(&[4, 3])?, &z(&[4, 3])?));
    assert!(e.contains("y [5, 3]"), "{e}");
    let e = err(add_linear_correction(
        &z(&[4, 3, 1])?,
        &z(&[4, 3, 1])?,
        &z(&[4, 3])?,
    ));
    assert!(e.contains("expected [T, d]"), "{e}");
    let c = Var::from_tensor(&z(&[4, 3])?)?;
    let e = err(add_linear_correction(&z(&[4, 3])?, &z(&[4, 3])?, c.as_tensor()));
    assert!(e.contains("c must be frozen"), "{e}");
    Ok(())
}
