//! Routed FFN: equality with the dense FFN (all blocks, gate ≡ 1) and with a masked dense FFN
//! (top-k), f64 finite-difference gradients, property tests over shapes and routings, the
//! load-balancing loss, frozen weights, and named errors. Calibration: routed_ffn_calibration.rs;
//! the grouped GEMM and row-move ops: routed_ffn_ops.rs.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::routed::{assert_close, random_routing, vars, weights};
use proptest::prelude::*;
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};
use spt_ops::routed_ffn::BlockTopK;
use spt_ops::routed_ffn::{gate_matrix, gather_matmul, reference, routed_ffn, router_gates, scatter_matmul};
use spt_ops::{Activation, GateMode, RoutedFfn, RoutedFfnConfig, Routing};
use std::sync::Arc;

#[test]
fn all_blocks_gate_ones_equals_dense_ffn_f32() -> Result<()> {
    // 600 tokens: two token chunks of the kernels (512 tokens each). Every activation.
    for (act, seed) in [
        (Activation::GeluErf, 1u64),
        (Activation::GeluTanh, 2),
        (Activation::Relu, 3),
    ] {
        let (t, d, d_ff, n) = (600, 24, 64, 4);
        let p = vars(&weights(d, d_ff, seed, DType::F32)?)?;
        let x = Var::from_tensor(&randn_f64(&[t, d], seed + 9)?.to_dtype(DType::F32)?)?;
        let mut cfg = RoutedFfnConfig::new(n, BlockTopK::Count(n));
        cfg.gate = GateMode::Ones;
        let layer = RoutedFfn::new(
            p[0].as_tensor(),
            p[1].as_tensor(),
            p[2].as_tensor(),
            p[3].as_tensor(),
            act,
            cfg,
        )?;
        let ours = layer.forward_t(x.as_tensor(), true)?.y;
        let dense = reference::dense_ffn(
            x.as_tensor(),
            p[0].as_tensor(),
            p[1].as_tensor(),
            p[2].as_tensor(),
            p[3].as_tensor(),
            act,
        )?;
        assert_close("forward", &ours, &dense, 1e-5)?;
        assert_close(
            "forward_dense",
            &layer.forward_dense(x.as_tensor(), false)?,
            &dense,
            1e-5,
        )?;
        let up = randn_f64(&[t, d], seed + 20)?.to_dtype(DType::F32)?;
        let g_ours = ours.mul(&up)?.sum_all()?.backward()?;
        let g_ref = dense.mul(&up)?.sum_all()?.backward()?;
        for (name, v) in ["x", "W1", "b1", "W2", "b2"]
            .iter()
            .zip(std::iter::once(&x).chain(p.iter()))
        {
            let a = g_ours.get(v.as_tensor()).expect("our gradient");
            let b = g_ref.get(v.as_tensor()).expect("reference gradient");
            assert_close(&format!("{act:?} grad {name}"), a, b, 1e-5)?;
        }
        // Gate ≡ 1: the router learns nothing and must get no gradient.
        assert!(g_ours.get(layer.router().0.as_tensor()).is_none());
    }
    Ok(())
}

#[test]
fn top_k_equals_masked_dense_ffn() -> Result<()> {
    for (gate, seed) in [(GateMode::SoftmaxKept, 11u64), (GateMode::Ones, 13)] {
        let (t, d, d_ff, n) = (270, 16, 48, 6);
        let p = vars(&weights(d, d_ff, seed, DType::F32)?)?;
        let x = Var::from_tensor(&randn_f64(&[3, 90, d], seed + 9)?.to_dtype(DType::F32)?)?;
        let mut cfg = RoutedFfnConfig::new(n, BlockTopK::Fraction(0.5));
        let act = Activation::GeluErf;
        cfg.gate = gate;
        let layer = RoutedFfn::new(
            p[0].as_tensor(),
            p[1].as_tensor(),
            p[2].as_tensor(),
            p[3].as_tensor(),
            act,
            cfg,
        )?;
        assert_eq!(layer.k(), 3);
        let out = layer.forward_t(x.as_tensor(), true)?;
        assert_eq!(out.y.dims(), &[3, 90, d]);
        // Every token keeps exactly k distinct blocks; the mask is those blocks' gates.
        let gm = out.gate_matrix()?;
        let nonzero: Vec<f32> = gm.ne(0f32)?.to_dtype(DType::F32)?.sum(1)?.to_vec1()?;
        assert!(
            nonzero.iter().all(|&c| c == 3.0),
            "{gate:?}: kept blocks per token {nonzero:?}"
        );
        let mask = reference::block_mask(&gm, d_ff / n)?;
        let x2 = x.as_tensor().reshape((t, d))?;
        let want = reference::masked_ffn(
            &x2,
            p[0].as_tensor(),
            p[1].as_tensor(),
            p[2].as_tensor(),
            p[3].as_tensor(),
            Activation::GeluErf,
            &mask,
        )?;
        let y = out.y.reshape((t, d))?;
        assert_close(&format!("{gate:?} forward"), &y, &want, 1e-5)?;
        let up = randn_f64(&[t, d], seed + 30)?.to_dtype(DType::F32)?;
        let g_ours = y.mul(&up)?.sum_all()?.backward()?;
        let g_ref = want.mul(&up)?.sum_all()?.backward()?;
        let (rw, rb) = layer.router();
        let named = [
            ("x", &x),
            ("W1", &p[0]),
            ("b1", &p[1]),
            ("W2", &p[2]),
            ("b2", &p[3]),
            ("router.w", rw),
            ("router.b", rb),
        ];
        for (name, v) in named {
            match (g_ours.get(v.as_tensor()), g_ref.get(v.as_tensor())) {
                (Some(a), Some(b)) => assert_close(&format!("{gate:?} grad {name}"), a, b, 1e-5)?,
                (None, None) => assert!(gate == GateMode::Ones && name.starts_with("router")),
                (a, b) => panic!(
                    "{gate:?} grad {name}: ours {:?} vs reference {:?}",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
        if gate != GateMode::Ones {
            let g = g_ours.get(rw.as_tensor()).expect("router gradient");
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                norm.is_finite() && norm > 0.0,
                "{gate:?}: router gradient norm {norm}"
            );
        }
    }
    Ok(())
}

/// Routed FFN composed from the public ops, for gradient checks: inputs
/// `[x, W1, b1, W2, b2, router_w, router_b]`.
fn functional(t: &[Tensor], routing: &Arc<Routing>, gate: GateMode, act: Activation) -> Result<Tensor> {
    let logits = t[0].matmul(&t[5].t()?)?.broadcast_add(&t[6])?;
    let gates = router_gates(&logits, routing, gate)?;
    routed_ffn(&t[0], &t[1], &t[2], &t[3], &t[4], &gates, routing, act)
}

#[test]
fn gradients_f64_finite_differences() -> Result<()> {
    let cases = [
        (
            7usize,
            6usize,
            12usize,
            4usize,
            2usize,
            GateMode::SoftmaxKept,
            Activation::GeluErf,
            1u64,
        ),
        (5, 4, 15, 5, 3, GateMode::SoftmaxKept, Activation::GeluTanh, 2),
        (1, 3, 8, 2, 1, GateMode::SoftmaxKept, Activation::GeluErf, 3),
        (9, 5, 12, 3, 3, GateMode::SoftmaxKept, Activation::GeluTanh, 4),
    ];
    for (t, d, d_ff, n, k, gate, act, seed) in cases {
        let [w1, b1, w2, b2] = weights(d, d_ff, seed, DType::F64)?;
        let x = randn_f64(&[t, d], seed + 7)?;
        let rw = randn_f64(&[n, d], seed + 8)?;
        let rb = randn_f64(&[n], seed + 9)?;
        // The routing is piecewise constant: fix it at the base point.
        let logits: Vec<f64> = x.matmul(&rw.t()?)?.broadcast_add(&rb)?.flatten_all()?.to_vec1()?;
        let routing = Arc::new(Routing::top_k(&logits, t, n, k)?);
        let report = check_gradients(
            |ts| functional(ts, &routing, gate, act),
            &[x, w1, b1, w2, b2, rw, rb],
            &[0, 1, 2, 3, 4, 5, 6],
            GradCheck::default(),
        )?;
        assert_eq!(report.len(), 7);
    }
    Ok(())
}

/// Ours vs the masked dense reference, forward and the gradients of x, W1, b1, W2, b2, gates.
fn check_against_masked(
    t: usize,
    d: usize,
    n: usize,
    b: usize,
    k: usize,
    skip: bool,
    seed: u64,
) -> Result<()> {
    let d_ff = n * b;
    let skip = (skip && k < n).then_some((seed % n as u64) as u32);
    let routing = Arc::new(random_routing(t, n, k, skip, seed)?);
    if let Some(e) = skip {
        assert_eq!(routing.block_counts()[e as usize], 0);
    }
    let p = vars(&weights(d, d_ff, seed, DType::F64)?)?;
    let x = Var::from_tensor(&randn_f64(&[t, d], seed + 5)?)?;
    let gates = Var::from_tensor(&randn_f64(&[t * k], seed + 6)?)?;
    let act = Activation::GeluTanh;
    let pt: Vec<&Tensor> = p.iter().map(|v| v.as_tensor()).collect();
    let ours = routed_ffn(
        x.as_tensor(),
        pt[0],
        pt[1],
        pt[2],
        pt[3],
        gates.as_tensor(),
        &routing,
        act,
    )?;
    let mask = reference::block_mask(&gate_matrix(gates.as_tensor(), &routing)?, b)?;
    let want = reference::masked_ffn(x.as_tensor(), pt[0], pt[1], pt[2], pt[3], act, &mask)?;
    assert_close("forward", &ours, &want, 1e-10)?;
    let up = randn_f64(&[t, d], seed + 7)?;
    let g_ours = ours.mul(&up)?.sum_all()?.backward()?;
    let g_ref = want.mul(&up)?.sum_all()?.backward()?;
    let named = [
        ("x", &x),
        ("W1", &p[0]),
        ("b1", &p[1]),
        ("W2", &p[2]),
        ("b2", &p[3]),
        ("gates", &gates),
    ];
    for (name, v) in named {
        let zeros = v.as_tensor().zeros_like()?;
        let a = g_ours.get(v.as_tensor()).unwrap_or(&zeros);
        let r = g_ref.get(v.as_tensor()).unwrap_or(&zeros);
        assert_close(
            &format!("grad {name} (T={t} d={d} n={n} b={b} k={k})"),
            a,
            r,
            1e-10,
        )?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn routed_matches_masked_dense_on_random_shapes(
        t in prop_oneof![4 => 0usize..=12, 1 => 500usize..=600],
        d in 1usize..=9,
        n in 1usize..=6,
        b in 1usize..=5,
        k_frac in 0.0f64..1.0,
        skip in any::<bool>(),
        seed in 0u64..1_000_000,
    ) {
        let k = 1 + ((n as f64 * k_frac) as usize).min(n - 1);
        check_against_masked(t, d, n, b, k, skip, seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}

#[test]
fn zero_and_one_token() -> Result<()> {
    for t in [0usize, 1] {
        check_against_masked(t, 5, 3, 4, 2, false, 40 + t as u64)?;
        let [w1, b1, w2, b2] = weights(5, 12, 3, DType::F32)?;
        let layer = RoutedFfn::new(
            &w1,
            &b1,
            &w2,
            &b2,
            Activation::Relu,
            RoutedFfnConfig::new(3, BlockTopK::Count(2)),
        )?;
        let x = Tensor::zeros((t, 5), DType::F32, &Device::Cpu)?;
        let out = layer.forward_t(&x, false)?;
        assert_eq!(out.y.dims(), &[t, 5]);
        assert_eq!(out.routing.n_rows(), 2 * t);
    }
    Ok(())
}

#[test]
fn routing_is_a_stable_counting_sort() -> Result<()> {
    // Scores: token 0 prefers blocks 2, 0; token 1: 0, 1 (tie with 2 → lower index); token 2: 2, 1.
    let scores = [0.5, -1.0, 3.0, 2.0, 1.0, 1.0, -5.0, 0.1, 9.0];
    let r = Routing::top_k(&scores, 3, 3, 2)?;
    assert_eq!(r.blocks()?, &[2, 0, 0, 1, 2, 1]);
    // Rows grouped by block, tokens ascending inside a block.
    assert_eq!(r.row_token()?, &[0, 1, 1, 2, 0, 2]);
    assert_eq!(r.row_src()?, &[1, 2, 3, 5, 0, 4]);
    assert_eq!(r.block_counts(), vec![2, 2, 2]);
    assert_eq!(r.block_rows(1), 2..4);
    // From a scores tensor (on the CPU: routed on the host, by the same rules).
    let t = Tensor::from_slice(&scores, (3, 3), &Device::Cpu)?.to_dtype(DType::F32)?;
    let from_tensor = Routing::from_scores(&t, 2)?;
    assert!(from_tensor.device().is_none());
    assert_eq!(from_tensor.row_src()?, r.row_src()?);
    let e = Routing::from_scores(&t.flatten_all()?, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("router scores are [9], expected [T, n_blocks]"), "{e}");
    // A block past n_blocks has no rows; absurd counts are refused before any table is made.
    assert_eq!(r.block_rows(3), 0..0);
    let e = Routing::top_k(&[], 0, usize::MAX, 1).unwrap_err().to_string();
    assert!(e.contains("n_blocks") && e.contains("exceeds"), "{e}");
    let e = Routing::from_blocks(0, usize::MAX, 1, vec![])
        .unwrap_err()
        .to_string();
    assert!(e.contains("n_blocks") && e.contains("exceeds"), "{e}");
    let e = Routing::top_k(&[1.0], usize::MAX, 2, 1).unwrap_err().to_string();
    assert!(e.contains("router scores"), "{e}");
    Ok(())
}

#[test]
fn load_balancing_loss_is_optional_and_trains_the_router() -> Result<()> {
    let [w1, b1, w2, b2] = weights(8, 16, 5, DType::F32)?;
    let x = randn_f64(&[40, 8], 6)?.to_dtype(DType::F32)?;
    let mut cfg = RoutedFfnConfig::new(4, BlockTopK::Count(1));
    let act = Activation::GeluErf;
    assert!(RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg.clone())?
        .forward_t(&x, true)?
        .aux_loss
        .is_none());
    cfg.aux_loss = true;
    cfg.gate = GateMode::Ones;
    let layer = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg)?;
    let out = layer.forward_t(&x, true)?;
    let aux = out.aux_loss.expect("aux loss requested");
    // n · Σ f_e P_e, recomputed by hand.
    let (rw, rb) = layer.router();
    let logits = x.matmul(&rw.as_tensor().t()?)?.broadcast_add(rb.as_tensor())?;
    let p: Vec<f32> = candle_nn::ops::softmax(&logits, 1)?.mean(0)?.to_vec1()?;
    let counts = out.routing.block_counts();
    let want: f32 = 4.0 * (0..4).map(|e| counts[e] as f32 / 40.0 * p[e]).sum::<f32>();
    let got = aux.to_scalar::<f32>()?;
    assert!((got - want).abs() < 1e-5, "aux {got} vs {want}");
    let g = aux.backward()?;
    let gn = g
        .get(rw.as_tensor())
        .expect("router gradient from aux")
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()?;
    assert!(gn.is_finite() && gn > 0.0);
    // No tokens: the loss is still there, and 0.
    let none = layer.forward_t(&x.narrow(0, 0, 0)?, true)?;
    assert_eq!(none.y.dims(), &[0, 8]);
    let aux0 = none.aux_loss.expect("aux loss requested, 0 tokens");
    assert_eq!(aux0.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn frozen_weights_get_no_gradient_work() -> Result<()> {
    let [w1, b1, w2, b2] = weights(8, 16, 7, DType::F32)?;
    let layer = RoutedFfn::new(
        &w1,
        &b1,
        &w2,
        &b2,
        Activation::GeluErf,
        RoutedFfnConfig::new(4, BlockTopK::Count(2)),
    )?;
    let x = Var::from_tensor(&randn_f64(&[30, 8], 8)?.to_dtype(DType::F32)?)?;
    let g = layer
        .forward_t(x.as_tensor(), true)?
        .y
        .sqr()?
        .sum_all()?
        .backward()?;
    for (name, w) in [("W1", &w1), ("b1", &b1), ("W2", &w2), ("b2", &b2)] {
        assert!(g.get(w).is_none(), "frozen {name} got a gradient");
    }
    assert!(g.get(x.as_tensor()).is_some() && g.get(layer.router().0.as_tensor()).is_some());
    Ok(())
}

#[test]
fn a_frozen_layer_gives_the_same_bits_from_its_kept_operands() -> Result<()> {
    let bits = |t: &Tensor| -> Result<Vec<u64>> {
        Ok(t.to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    for dt in [DType::F32, DType::F64] {
        for lora in [false, true] {
            // 40 tokens: one token chunk; 600: two.
            for t in [40usize, 600] {
                let (d, d_ff) = (8, 32);
                let [w1, b1, w2, b2] = weights(d, d_ff, 13, dt)?;
                let cfg = RoutedFfnConfig::new(4, BlockTopK::Count(2));
                let make = || -> Result<RoutedFfn> {
                    let layer = RoutedFfn::new(&w1, &b1, &w2, &b2, Activation::GeluErf, cfg.clone())?;
                    if !lora {
                        return Ok(layer);
                    }
                    let lc = spt_ops::LoraConfig {
                        rank: 3,
                        alpha: 6.0,
                        dropout: 0.0,
                        seed: 5,
                    };
                    let layer = layer.with_lora(lc)?;
                    let (_, bb1, _, bb2) = layer.lora_factors().expect("LoRA");
                    bb1.set(&randn_f64(bb1.dims(), 21)?.to_dtype(dt)?)?;
                    bb2.set(&randn_f64(bb2.dims(), 22)?.to_dtype(dt)?)?;
                    Ok(layer)
                };
                let x = randn_f64(&[t, d], 23)?.to_dtype(dt)?;
                let want = bits(&make()?.forward_t(&x, false)?.y)?;
                let mut frozen = make()?;
                frozen.freeze();
                // The first forward forms the operands per call; the next ones keep them.
                for call in 0..3 {
                    let got = frozen.forward_t(&x, false)?.y;
                    assert_eq!(bits(&got)?, want, "{dt:?} lora {lora} t {t} call {call}");
                }
                if lora {
                    // The kept operands are what runs: a value written into a factor after
                    // freezing is not seen (freeze's documented contract).
                    let (_, bb1, _, _) = frozen.lora_factors().expect("LoRA");
                    bb1.set(&bb1.zeros_like()?)?;
                    assert_eq!(bits(&frozen.forward_t(&x, false)?.y)?, want);
                }
                // Regrouping the units drops them: the output is the regrouped layer's.
                let perm: Vec<u32> = (0..d_ff as u32).rev().collect();
                let mut fresh = make()?;
                fresh.permute_units(&perm)?;
                let mut regrouped = make()?;
                regrouped.freeze();
                regrouped.forward_t(&x, false)?;
                regrouped.forward_t(&x, false)?;
                regrouped.permute_units(&perm)?;
                let want = bits(&fresh.forward_t(&x, false)?.y)?;
                for call in 0..2 {
                    let got = regrouped.forward_t(&x, false)?.y;
                    assert_eq!(
                        bits(&got)?,
                        want,
                        "{dt:?} lora {lora} t {t}: call {call} after permute_units"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn bad_inputs_give_named_errors() -> Result<()> {
    let [w1, b1, w2, b2] = weights(8, 24, 11, DType::F32)?;
    let act = Activation::GeluErf;
    let err = |r: Result<RoutedFfn>| r.map(|_| ()).unwrap_err().to_string();
    let e = err(RoutedFfn::new(
        &w1,
        &b1,
        &w2,
        &b2,
        act,
        RoutedFfnConfig::new(5, BlockTopK::Count(1)),
    ));
    assert!(
        e.contains("routed_ffn") && e.contains("not divisible") && e.contains("24"),
        "{e}"
    );
    let e = err(RoutedFfn::new(
        &w1,
        &b1,
        &w2,
        &b2,
        act,
        RoutedFfnConfig::new(4, BlockTopK::Count(0)),
    ));
    assert!(e.contains("top-k is 0"), "{e}");
    let e = err(RoutedFfn::new(
        &w1,
        &b1,
        &w2,
        &b2,
        act,
        RoutedFfnConfig::new(4, BlockTopK::Count(5)),
    ));
    assert!(e.contains("top-k is 5") && e.contains("n_blocks = 4"), "{e}");
    let e = err(RoutedFfn::new(
        &w1,
        &b1,
        &w2,
        &b2,
        act,
        RoutedFfnConfig::new(4, BlockTopK::Fraction(0.0)),
    ));
    assert!(e.contains("fraction"), "{e}");
    let e = err(RoutedFfn::new(
        &w1,
        &b1,
        &w1,
        &b2,
        act,
        RoutedFfnConfig::new(4, BlockTopK::Count(1)),
    ));
    assert!(e.contains("W2 is [24, 8], expected [d, d_ff] = [8, 24]"), "{e}");
    let e = err(RoutedFfn::new(
        &w1,
        &b2,
        &w2,
        &b2,
        act,
        RoutedFfnConfig::new(4, BlockTopK::Count(1)),
    ));
    assert!(e.contains("b1 is [8]"), "{e}");
    let e = err(RoutedFfn::new(
        &w1,
        &b1,
        &w2.to_dtype(DType::F64)?,
        &b2,
        act,
        RoutedFfnConfig::new(4, BlockTopK::Count(1)),
    ));
    assert!(e.contains("W2") && e.contains("F64"), "{e}");
    let layer = RoutedFfn::new(
        &w1,
        &b1,
        &w2,
        &b2,
        act,
        RoutedFfnConfig::new(4, BlockTopK::Count(2)),
    )?;
    let e = layer
        .forward_t(&Tensor::zeros((3, 7), DType::F32, &Device::Cpu)?, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("x is [3, 7], expected [.., d] = [.., 8]"), "{e}");
    let e = layer
        .forward_t(&Tensor::zeros((3, 8), DType::F64, &Device::Cpu)?, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("x has dtype F64"), "{e}");
    // The ops check their operands too.
    let r = Arc::new(Routing::from_blocks(2, 4, 1, vec![0, 3])?);
    let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu)?;
    let e = gather_matmul(&x, &w2, None, &r).unwrap_err().to_string();
    assert!(e.contains("gather_matmul: w is [8, 24]"), "{e}");
    let h = Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?;
    let g = Tensor::ones(2, DType::F32, &Device::Cpu)?;
    let e = scatter_matmul(&h, &g, &w2, &r).unwrap_err().to_string();
    assert!(
        e.contains("scatter_matmul: h is [2, 5], expected [R, b] = [2, 6]"),
        "{e}"
    );
    let e = Routing::from_blocks(2, 4, 2, vec![1, 1, 0, 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("picks block 1 twice"), "{e}");
    let e = Routing::from_blocks(1, 4, 1, vec![4]).unwrap_err().to_string();
    assert!(e.contains("picks block 4"), "{e}");
    Ok(())
}

/// An evaluation forward of at most 16 tokens (decoding) runs its own path on the CPU: one GEMM
/// per active block with the weights read in place, LoRA unmerged. It must give the fused ops'
/// values, for both weight layouts (HF Linear `[out, in]`, and GPT-2's Conv1D `[in, out]` read
/// as a transposed view), with and without LoRA, and stay differentiable: its gradients equal
/// those of the fused ops (a training forward without dropout computes the same function).
#[test]
fn few_token_evaluation_equals_the_fused_ops() -> Result<()> {
    use spt_ops::lora::LoraConfig;
    let (d, d_ff, n, t) = (24, 64, 8, 40);
    for (transposed, lora, gate) in [
        (false, false, GateMode::SoftmaxKept),
        (true, false, GateMode::Ones),
        (false, true, GateMode::Ones),
        (true, true, GateMode::SoftmaxKept),
    ] {
        let mut w = weights(d, d_ff, 31, DType::F32)?;
        if transposed {
            // Stored [in, out] and viewed [out, in], as spt-models passes GPT-2's weights.
            w[0] = w[0].t()?.contiguous()?.t()?;
            w[2] = w[2].t()?.contiguous()?.t()?;
        }
        let mut cfg = RoutedFfnConfig::new(n, BlockTopK::Count(2));
        cfg.gate = gate;
        let mut layer = RoutedFfn::new(&w[0], &w[1], &w[2], &w[3], Activation::GeluTanh, cfg)?;
        if lora {
            layer = layer.with_lora(LoraConfig {
                rank: 3,
                alpha: 5.0,
                dropout: 0.0,
                seed: 9,
            })?;
            let (_, b1, _, b2) = layer.lora_factors().expect("lora");
            b1.set(&(randn_f64(b1.dims(), 40)? * 0.2)?.to_dtype(DType::F32)?)?;
            b2.set(&(randn_f64(b2.dims(), 41)? * 0.2)?.to_dtype(DType::F32)?)?;
        }
        let x = (randn_f64(&[t, d], 32)?).to_dtype(DType::F32)?;
        // 40 tokens: the fused ops.
        let all = layer.forward_t(&x, false)?.y;
        for (start, len) in [(0, 1), (5, 3), (20, 16)] {
            let what = format!("transposed {transposed}, lora {lora}, tokens {start}..+{len}");
            let xs = Var::from_tensor(&x.narrow(0, start, len)?)?;
            let few = layer.forward_t(xs.as_tensor(), false)?.y;
            assert_close(&what, &few, &all.narrow(0, start, len)?, 1e-5)?;
            // Gradients: the few-token path (evaluation) against the fused ops (training).
            let u = randn_f64(&[len, d], 33)?.to_dtype(DType::F32)?;
            let fused = layer.forward_t(xs.as_tensor(), true)?.y;
            let (gf, gk) = (
                (few * &u)?.sum_all()?.backward()?,
                (fused * &u)?.sum_all()?.backward()?,
            );
            let mut tracked = vec![("x", xs.as_tensor().clone())];
            if let Some((a1, b1, a2, b2)) = layer.lora_factors() {
                for (name, v) in [("A1", a1), ("B1", b1), ("A2", a2), ("B2", b2)] {
                    tracked.push((name, v.as_tensor().clone()));
                }
            }
            for (name, v) in tracked {
                let (p, q) = (
                    gf.get(&v).expect("few-token grad"),
                    gk.get(&v).expect("fused grad"),
                );
                assert_close(&format!("{what}: d{name}"), p, q, 1e-5)?;
            }
        }
    }
    Ok(())
}

/// A layer whose base weights train (no LoRA) reads them detached inside `no_grad`, as it does
/// its router: the output is untracked and equal to the tracked one.
#[test]
fn no_grad_reads_trained_base_weights_detached() -> Result<()> {
    let (d, d_ff, n) = (12, 32, 4);
    let p = vars(&weights(d, d_ff, 71, DType::F32)?)?;
    let x = randn_f64(&[50, d], 72)?.to_dtype(DType::F32)?;
    let layer = RoutedFfn::new(
        p[0].as_tensor(),
        p[1].as_tensor(),
        p[2].as_tensor(),
        p[3].as_tensor(),
        Activation::GeluErf,
        RoutedFfnConfig::new(n, BlockTopK::Count(2)),
    )?;
    let tracked = layer.forward_t(&x, false)?.y;
    assert!(tracked.track_op());
    let quiet = spt_ops::no_grad(|| layer.forward_t(&x, false))?.y;
    assert!(!quiet.track_op(), "a no_grad forward recorded a graph");
    assert_close("no_grad forward", &quiet, &tracked, 1e-6)?;
    Ok(())
}
