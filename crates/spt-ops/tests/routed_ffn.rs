//! Routed FFN: equality with the dense FFN (all blocks, gate ≡ 1) and with a masked dense FFN
//! (top-k), f64 finite-difference gradients, property tests over shapes and routings, router
//! initialisation, unit regrouping, the linear correction, and named errors.

use candle_core::{DType, Device, Result, Tensor, Var};
use proptest::prelude::*;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};
use spt_ops::routed_ffn::BlockTopK;
use spt_ops::routed_ffn::{
    composed, gate_matrix, gather_matmul, gather_rows, reference, routed_ffn, router_gates, scatter_matmul,
    sum_rows, RouterFitConfig, UnitClusterConfig,
};
use spt_ops::{Activation, GateMode, LoraConfig, RoutedFfn, RoutedFfnConfig, Routing};
use std::sync::Arc;

/// `max |a − b|` and `max |b|`.
fn diff(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    if b.elem_count() == 0 {
        return Ok((0.0, 0.0));
    }
    let d = a.sub(&b)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let m = b.abs()?.max(0)?.to_scalar::<f64>()?;
    Ok((d, m))
}

/// Asserts `max |a − b| ≤ tol · max(1, max |b|)`.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (d, m) = diff(a, b)?;
    assert!(
        d <= tol * m.max(1.0),
        "{what}: max |Δ| = {d:e} (max |ref| = {m:e}, tol {tol:e})"
    );
    Ok(())
}

/// FFN weights with 1/√fan_in scale: `(W1 [d_ff, d], b1, W2 [d, d_ff], b2)`.
fn weights(d: usize, d_ff: usize, seed: u64, dt: DType) -> Result<[Tensor; 4]> {
    let s1 = 1.0 / (d as f64).sqrt();
    let s2 = 1.0 / (d_ff as f64).sqrt();
    Ok([
        (randn_f64(&[d_ff, d], seed)? * s1)?.to_dtype(dt)?,
        (randn_f64(&[d_ff], seed + 1)? * 0.1)?.to_dtype(dt)?,
        (randn_f64(&[d, d_ff], seed + 2)? * s2)?.to_dtype(dt)?,
        (randn_f64(&[d], seed + 3)? * 0.1)?.to_dtype(dt)?,
    ])
}

fn vars(ts: &[Tensor]) -> Result<Vec<Var>> {
    ts.iter().map(Var::from_tensor).collect()
}

#[test]
fn all_blocks_gate_ones_equals_dense_ffn_f32() -> Result<()> {
    // 300 tokens: two token chunks of the kernels. Every activation.
    for (act, seed) in [
        (Activation::GeluErf, 1u64),
        (Activation::GeluTanh, 2),
        (Activation::Relu, 3),
    ] {
        let (t, d, d_ff, n) = (300, 24, 64, 4);
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

/// A random routing: each token picks k distinct blocks, never `skip` (when given).
fn random_routing(t: usize, n: usize, k: usize, skip: Option<u32>, seed: u64) -> Result<Routing> {
    let mut rng = StdRng::seed_from_u64(seed);
    let allowed: Vec<u32> = (0..n as u32).filter(|&e| Some(e) != skip).collect();
    let mut blocks = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut a = allowed.clone();
        a.shuffle(&mut rng);
        blocks.extend_from_slice(&a[..k]);
    }
    Routing::from_blocks(t, n, k, blocks)
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
        t in prop_oneof![4 => 0usize..=12, 1 => 250usize..=300],
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
    assert_eq!(r.blocks(), &[2, 0, 0, 1, 2, 1]);
    // Rows grouped by block, tokens ascending inside a block.
    assert_eq!(r.row_token(), &[0, 1, 1, 2, 0, 2]);
    assert_eq!(r.row_src(), &[1, 2, 3, 5, 0, 4]);
    assert_eq!(r.block_counts(), vec![2, 2, 2]);
    assert_eq!(r.block_rows(1), 2..4);
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

#[test]
fn gather_op_with_routed_base_and_lora_path_gradients_f64() -> Result<()> {
    // The LoRA fc1 path: act(x W_eᵀ + base) with base = (u B_eᵀ + b_e) on the routed rows.
    let (t, d, r, n, b, k) = (6usize, 5usize, 3usize, 4usize, 3usize, 2usize);
    let routing = Arc::new(random_routing(t, n, k, Some(1), 77)?);
    let inputs = [
        randn_f64(&[t, d], 78)?,
        randn_f64(&[n * b, d], 79)?,
        randn_f64(&[t, r], 80)?,
        randn_f64(&[n * b, r], 81)?,
        randn_f64(&[n * b], 82)?,
    ];
    let f = |ts: &[Tensor]| -> Result<Tensor> {
        let base = gather_matmul(&ts[2], &ts[3], Some(&ts[4]), &routing)?;
        spt_ops::routed_ffn::gather_matmul_act(
            &ts[0],
            &ts[1],
            Some(&base),
            Some(Activation::GeluErf),
            &routing,
        )
    };
    // Equals the unfused composition.
    let fused = f(&inputs)?;
    let plain = Activation::GeluErf.forward(
        &(gather_matmul(&inputs[0], &inputs[1], None, &routing)?
            + gather_matmul(&inputs[2], &inputs[3], Some(&inputs[4]), &routing)?)?,
    )?;
    assert_close("fused vs unfused", &fused, &plain, 1e-12)?;
    let report = check_gradients(f, &inputs, &[0, 1, 2, 3, 4], GradCheck::default())?;
    assert_eq!(report.len(), 5);
    Ok(())
}

/// The composed path (what runs off the CPU) equals the fused CPU ops: forward and every
/// gradient, both addend kinds, with and without the activation, with a block no token picks.
#[test]
fn composed_path_equals_fused_ops() -> Result<()> {
    use spt_ops::routed_ffn::{gather_matmul_act, scatter_matmul_bias, AddKind};
    let (t, d, n, b, k, d_out) = (37, 12, 4, 6, 2, 9);
    // Balanced routings run padded (one batched GEMM per projection); the skewed one (k = 1,
    // most tokens on block 0: padding would quadruple the rows) runs one GEMM per block.
    for (seed, act, base, skewed) in [
        (1, Some(Activation::GeluTanh), false, false),
        (2, None, true, false),
        (3, Some(Activation::Relu), true, false),
        (4, Some(Activation::GeluTanh), false, true),
        (5, None, true, true),
    ] {
        let routing = Arc::new(if skewed {
            let blocks = (0..t)
                .map(|i| if i % 6 == 0 { (i % n) as u32 } else { 0 })
                .collect();
            Routing::from_blocks(t, n, 1, blocks)?
        } else {
            random_routing(t, n, k, Some(2), seed)?
        });
        assert_eq!(composed::uses_padding(&routing), !skewed, "seed {seed}");
        let r = routing.n_rows();
        let x = (randn_f64(&[t, d], seed)?).to_dtype(DType::F32)?;
        let w1 = (randn_f64(&[n * b, d], seed + 10)? * 0.3)?.to_dtype(DType::F32)?;
        let add = if base {
            randn_f64(&[r, b], seed + 20)?.to_dtype(DType::F32)?
        } else {
            randn_f64(&[n * b], seed + 20)?.to_dtype(DType::F32)?
        };
        let gates = (randn_f64(&[r], seed + 30)?.abs()? + 0.5)?.to_dtype(DType::F32)?;
        let w2 = (randn_f64(&[d_out, n * b], seed + 40)? * 0.3)?.to_dtype(DType::F32)?;
        let b2 = randn_f64(&[d_out], seed + 50)?.to_dtype(DType::F32)?;
        let up = randn_f64(&[t, d_out], seed + 60)?.to_dtype(DType::F32)?;
        let kind = if base { AddKind::Base } else { AddKind::Bias };
        let run = |fused: bool| -> Result<Vec<Tensor>> {
            let v = vars(&[
                x.clone(),
                w1.clone(),
                add.clone(),
                gates.clone(),
                w2.clone(),
                b2.clone(),
            ])?;
            let t_ = |i: usize| v[i].as_tensor();
            let y = if fused {
                let h = gather_matmul_act(t_(0), t_(1), Some(t_(2)), act, &routing)?;
                scatter_matmul_bias(&h, t_(3), t_(4), Some(t_(5)), &routing)?
            } else {
                let h = composed::gather_matmul_act(t_(0), t_(1), Some((t_(2), kind)), act, &routing, b)?;
                composed::scatter_matmul_bias(&h, t_(3), t_(4), Some(t_(5)), &routing, b, d_out)?
            };
            let g = (&y * &up)?.sum_all()?.backward()?;
            let mut out = vec![y];
            for var in &v {
                out.push(
                    g.get(var.as_tensor())
                        .expect("every input gets a gradient")
                        .clone(),
                );
            }
            Ok(out)
        };
        let (f, c) = (run(true)?, run(false)?);
        for (i, name) in ["y", "dx", "dw1", "dadd", "dgates", "dw2", "db2"]
            .iter()
            .enumerate()
        {
            assert_close(&format!("seed {seed} {name}"), &c[i], &f[i], 1e-5)?;
        }
    }
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

/// The row moves against candle's `index_select` / `index_add`, the adjoint identity
/// ⟨sum_rows(y), z⟩ = ⟨y, gather_rows(z)⟩, and their backward through f64 finite differences.
fn check_row_moves(t: usize, n: usize, k: usize, d: usize, seed: u64) -> Result<()> {
    let routing = Arc::new(random_routing(t, n, k, None, seed)?);
    let r = routing.n_rows();
    let tok = Tensor::from_slice(routing.row_token(), r, &Device::Cpu)?;
    let x = randn_f64(&[t, d], seed + 1)?;
    let y = randn_f64(&[r, d], seed + 2)?;
    let g = gather_rows(&x, &routing)?;
    assert_eq!(g.dims(), &[r, d]);
    // A copy: exact.
    assert_close("gather_rows vs index_select", &g, &x.index_select(&tok, 0)?, 0.0)?;
    let sum = sum_rows(&y, &routing)?;
    let want = Tensor::zeros((t, d), DType::F64, &Device::Cpu)?.index_add(&tok, &y, 0)?;
    assert_close("sum_rows vs index_add", &sum, &want, 1e-12)?;
    let lhs = sum.mul(&x)?.sum_all()?.to_scalar::<f64>()?;
    let rhs = y.mul(&g)?.sum_all()?.to_scalar::<f64>()?;
    assert!(
        (lhs - rhs).abs() <= 1e-10 * (1.0 + lhs.abs()),
        "adjoint: {lhs} vs {rhs}"
    );
    if t * d > 0 {
        // Through a nonlinearity, so the upstream gradient is not constant.
        let w = randn_f64(&[r, d], seed + 3)?;
        check_gradients(
            |ts| sum_rows(&gather_rows(&ts[0], &routing)?.mul(&ts[1])?.tanh()?, &routing),
            &[x, w],
            &[0, 1],
            GradCheck::default(),
        )?;
    }
    Ok(())
}

#[test]
fn row_moves_match_index_ops_and_finite_differences() -> Result<()> {
    for (t, n, k, d, seed) in [
        (0, 3, 2, 4, 1),
        (1, 1, 1, 3, 2),
        (9, 5, 3, 6, 3),
        (300, 8, 4, 5, 4),
    ] {
        check_row_moves(t, n, k, d, seed)?;
    }
    // f32 takes the same path.
    let routing = Arc::new(random_routing(40, 6, 2, None, 9)?);
    let x = randn_f64(&[40, 7], 10)?;
    let a = sum_rows(&gather_rows(&x.to_dtype(DType::F32)?, &routing)?, &routing)?;
    let b = sum_rows(&gather_rows(&x, &routing)?, &routing)?;
    assert_close("f32 row moves", &a, &b, 1e-6)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn row_moves_on_random_routings(
        t in 0usize..=40,
        n in 1usize..=8,
        k_frac in 0.0f64..1.0,
        d in 1usize..=6,
        seed in 0u64..1_000_000,
    ) {
        let k = 1 + ((n as f64 * k_frac) as usize).min(n - 1);
        check_row_moves(t, n, k, d, seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}

#[test]
fn row_moves_name_bad_shapes() -> Result<()> {
    let routing = Arc::new(random_routing(5, 4, 2, None, 1)?);
    let msg = |r: Result<Tensor>| r.expect_err("must fail").to_string();
    let e = msg(gather_rows(
        &Tensor::zeros((6, 3), DType::F32, &Device::Cpu)?,
        &routing,
    ));
    assert!(
        e.contains("gather_rows: x is [6, 3]") && e.contains("T = 5"),
        "{e}"
    );
    let e = msg(sum_rows(
        &Tensor::zeros((5, 3), DType::F32, &Device::Cpu)?,
        &routing,
    ));
    assert!(e.contains("sum_rows: y is [5, 3]") && e.contains("R = 10"), "{e}");
    let e = msg(sum_rows(
        &Tensor::zeros((10, 3), DType::U32, &Device::Cpu)?,
        &routing,
    ));
    assert!(e.contains("sum_rows: y has dtype U32"), "{e}");
    // bf16 is a CUDA-only dtype.
    let e = msg(sum_rows(
        &Tensor::zeros((10, 3), DType::BF16, &Device::Cpu)?,
        &routing,
    ));
    assert!(
        e.contains("y has dtype BF16, expected f32 or f64 (or bf16 on CUDA)"),
        "{e}"
    );
    Ok(())
}
