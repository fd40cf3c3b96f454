//! The routed FFN's building blocks: the grouped gather GEMM with a routed base (the LoRA fc1
//! path), the composed (off-CPU) path against the fused CPU ops, and the row moves.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::routed::{assert_close, random_routing, vars};
use proptest::prelude::*;
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};
use spt_ops::routed_ffn::{composed, gather_matmul, gather_rows, sum_rows};
use spt_ops::{Activation, Routing};
use std::sync::Arc;

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

/// The composed functions are public and slice `w` by the `block` they are given: a block, a
/// `d_out` or an addend kind other than the shapes imply is an error (it read other rows of `w`
/// and returned a result of the wrong width), on both layouts; the right ones still run.
#[test]
fn composed_path_refuses_a_block_its_shapes_do_not_imply() -> Result<()> {
    use spt_ops::routed_ffn::AddKind;
    let (t, d, n, b, d_out) = (2, 3, 4, 2, 5);
    let x = randn_f64(&[t, d], 1)?;
    let w1 = randn_f64(&[n * b, d], 2)?;
    let bias = randn_f64(&[n * b], 3)?;
    let w2 = randn_f64(&[d_out, n * b], 4)?;
    // Both tokens on block 0: one GEMM per block. Two blocks each: padded.
    for (routing, padded) in [
        (Routing::from_blocks(t, n, 1, vec![0, 0])?, false),
        (Routing::from_blocks(t, n, 2, vec![0, 1, 2, 3])?, true),
    ] {
        let routing = Arc::new(routing);
        assert_eq!(composed::uses_padding(&routing), padded);
        let err = |r: Result<Tensor>| r.expect_err("wrong block accepted").to_string();
        let h = composed::gather_matmul_act(&x, &w1, None, None, &routing, b)?;
        assert_eq!(h.dims(), [routing.n_rows(), b]);
        let e = err(composed::gather_matmul_act(&x, &w1, None, None, &routing, 3));
        assert!(e.contains("block = 3") && e.contains("blocks of 2 rows"), "{e}");
        let e = err(composed::gather_matmul_act(
            &x,
            &w1,
            Some((&bias, AddKind::Base)),
            None,
            &routing,
            b,
        ));
        assert!(e.contains("Bias") && e.contains("Base"), "{e}");
        let e = err(composed::gather_matmul_act(
            &x,
            &randn_f64(&[n * b, 4], 5)?,
            None,
            None,
            &routing,
            b,
        ));
        assert!(e.contains("w is [8, 4]"), "{e}");
        let gates = Tensor::ones(routing.n_rows(), DType::F64, &Device::Cpu)?;
        let y = composed::scatter_matmul_bias(&h, &gates, &w2, None, &routing, b, d_out)?;
        assert_eq!(y.dims(), [t, d_out]);
        let e = err(composed::scatter_matmul_bias(
            &h, &gates, &w2, None, &routing, 1, d_out,
        ));
        assert!(e.contains("block = 1"), "{e}");
        let e = err(composed::scatter_matmul_bias(
            &h, &gates, &w2, None, &routing, b, 4,
        ));
        assert!(e.contains("d_out = 4"), "{e}");
        let e = err(composed::scatter_matmul_bias(
            &h.narrow(1, 0, 1)?,
            &gates,
            &w2,
            None,
            &routing,
            b,
            d_out,
        ));
        assert!(e.contains("h is"), "{e}");
    }
    Ok(())
}

/// The row moves against candle's `index_select` / `index_add`, the adjoint identity
/// ⟨sum_rows(y), z⟩ = ⟨y, gather_rows(z)⟩, and their backward through f64 finite differences.
fn check_row_moves(t: usize, n: usize, k: usize, d: usize, seed: u64) -> Result<()> {
    let routing = Arc::new(random_routing(t, n, k, None, seed)?);
    let r = routing.n_rows();
    let tok = Tensor::from_slice(routing.row_token()?, r, &Device::Cpu)?;
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
        (600, 8, 4, 5, 4),
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

/// The whole LoRA FFN as one op (what the layer runs on the CPU without LoRA dropout) equals
/// the routed GEMMs on the merged weights, with d_out ≠ d and a block no token picks, and its
/// gradients (x, the gates, A1, B1, A2, B2) pass the f64 finite-difference check; 1100 tokens,
/// so three token chunks, the last one partial.
#[test]
fn routed_lora_ffn_equals_merged_weights_and_passes_gradcheck_f64() -> Result<()> {
    use spt_ops::routed_ffn::{gather_matmul_act, routed_lora_ffn, scatter_matmul_bias};
    let (t, d, d_out, r, n, b, k, s) = (1100usize, 5usize, 4usize, 3usize, 5usize, 3usize, 2usize, 0.7);
    let act = Activation::GeluErf;
    let routing = Arc::new(random_routing(t, n, k, Some(1), 191)?);
    let (w1, b1) = (randn_f64(&[n * b, d], 192)?, randn_f64(&[n * b], 193)?);
    let (w2, b2) = (randn_f64(&[d_out, n * b], 194)?, randn_f64(&[d_out], 195)?);
    let inputs = [
        randn_f64(&[t, d], 196)?,
        ((randn_f64(&[t * k], 199)? * 0.3)? + 1.0)?,
        randn_f64(&[r, d], 197)?,
        randn_f64(&[n * b, r], 198)?,
        randn_f64(&[r, n * b], 200)?,
        randn_f64(&[d_out, r], 201)?,
    ];
    let f = |ts: &[Tensor]| -> Result<Tensor> {
        routed_lora_ffn(
            &ts[0],
            &ts[1],
            [&w1, &b1, &w2, &b2],
            [&ts[2], &ts[3], &ts[4], &ts[5]],
            s,
            act,
            &routing,
        )
    };
    let merged = |w: &Tensor, a: &Tensor, bb: &Tensor| w + (bb.matmul(a)? * s)?;
    let h = gather_matmul_act(
        &inputs[0],
        &merged(&w1, &inputs[2], &inputs[3])?,
        Some(&b1),
        Some(act),
        &routing,
    )?;
    let want = scatter_matmul_bias(
        &h,
        &inputs[1],
        &merged(&w2, &inputs[4], &inputs[5])?,
        Some(&b2),
        &routing,
    )?;
    assert_close("one-op LoRA FFN vs merged weights", &f(&inputs)?, &want, 1e-12)?;
    // Weights stored [in, out] (GPT-2's Conv1D) arrive as transposed views: same values.
    let (w1t, w2t) = (w1.t()?.contiguous()?.t()?, w2.t()?.contiguous()?.t()?);
    assert!(!w1t.is_contiguous() && !w2t.is_contiguous());
    let adapters = [&inputs[2], &inputs[3], &inputs[4], &inputs[5]];
    let y = routed_lora_ffn(
        &inputs[0],
        &inputs[1],
        [&w1t, &b1, &w2t, &b2],
        adapters,
        s,
        act,
        &routing,
    )?;
    assert_close("one-op LoRA FFN on transposed weight views", &y, &want, 1e-12)?;
    // Shapes are checked by name.
    let swapped = [&inputs[2], &inputs[2], &inputs[4], &inputs[5]];
    let e = routed_lora_ffn(
        &inputs[0],
        &inputs[1],
        [&w1, &b1, &w2, &b2],
        swapped,
        s,
        act,
        &routing,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("B1 is [3, 5], expected [15, 3]"), "{e}");
    // So are trained base weights (the op computes no gradient for them) and empty widths.
    let w1v = candle_core::Var::from_tensor(&w1)?;
    let e = routed_lora_ffn(
        &inputs[0],
        &inputs[1],
        [w1v.as_tensor(), &b1, &w2, &b2],
        adapters,
        s,
        act,
        &routing,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("W1 must be frozen"), "{e}");
    let empty = |rows: usize| Tensor::zeros((rows, 0), DType::F64, &Device::Cpu);
    let (x0, w10, a10) = (empty(t)?, empty(n * b)?, empty(r)?);
    let adapters0 = [&a10, &inputs[3], &inputs[4], &inputs[5]];
    let e = routed_lora_ffn(
        &x0,
        &inputs[1],
        [&w10, &b1, &w2, &b2],
        adapters0,
        s,
        act,
        &routing,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("d (x's width) is 0"), "{e}");
    let report = check_gradients(f, &inputs, &[0, 1, 2, 3, 4, 5], GradCheck::default())?;
    assert_eq!(report.len(), 6);
    Ok(())
}

/// The one-op LoRA FFN in f32 against the same function from the routed GEMMs on the merged
/// weights, forward and every gradient, for random shapes and routings: up to three token chunks,
/// k = n (every token in every block: the kernels' in-place token runs), a skipped block, and
/// x, the gates or the adapters not tracked (`tracked`: which of the three are).
fn check_lora_ffn(
    c: (usize, usize, usize, usize, usize, usize, usize),
    skip: bool,
    tracked: [bool; 3],
    seed: u64,
) -> Result<()> {
    let [x_grad, gates_grad, ad_grad] = tracked;
    use spt_ops::routed_ffn::{gather_matmul_act, routed_lora_ffn, scatter_matmul_bias};
    let (t, d, d_out, r, n, b, k) = c;
    let (s, act) = (0.8, Activation::GeluTanh);
    let skip = (skip && k < n).then_some((seed % n as u64) as u32);
    let routing = Arc::new(random_routing(t, n, k, skip, seed)?);
    let f32t = |dims: &[usize], sd: u64, scale: f64| -> Result<Tensor> {
        (randn_f64(dims, seed + sd)? * scale)?.to_dtype(DType::F32)
    };
    let base = [
        f32t(&[n * b, d], 1, 0.4)?,
        f32t(&[n * b], 2, 0.1)?,
        f32t(&[d_out, n * b], 3, 0.4)?,
        f32t(&[d_out], 4, 0.1)?,
    ];
    let ins = [
        f32t(&[t, d], 5, 1.0)?,
        (f32t(&[t * k], 6, 0.3)? + 1.0)?,
        f32t(&[r, d], 7, 0.3)?,
        f32t(&[n * b, r], 8, 0.3)?,
        f32t(&[r, n * b], 9, 0.3)?,
        f32t(&[d_out, r], 10, 0.3)?,
    ];
    let up = f32t(&[t, d_out], 11, 1.0)?;
    let run = |one_op: bool| -> Result<Vec<Option<Tensor>>> {
        let v = vars(&ins)?;
        let pick = |i: usize, on: bool| if on { v[i].as_tensor() } else { &ins[i] };
        let (x, gates) = (pick(0, x_grad), pick(1, gates_grad));
        let a: Vec<&Tensor> = (2..6).map(|i| pick(i, ad_grad)).collect();
        let y = if one_op {
            let base = [&base[0], &base[1], &base[2], &base[3]];
            routed_lora_ffn(x, gates, base, [a[0], a[1], a[2], a[3]], s, act, &routing)?
        } else {
            let w1 = (&base[0] + (a[1].matmul(a[0])? * s)?)?;
            let w2 = (&base[2] + (a[3].matmul(a[2])? * s)?)?;
            let h = gather_matmul_act(x, &w1, Some(&base[1]), Some(act), &routing)?;
            scatter_matmul_bias(&h, gates, &w2, Some(&base[3]), &routing)?
        };
        let g = (&y * &up)?.sum_all()?.backward()?;
        let mut out = vec![Some(y)];
        out.extend(v.iter().map(|v| g.get(v.as_tensor()).cloned()));
        Ok(out)
    };
    let (got, want) = (run(true)?, run(false)?);
    for (i, name) in ["y", "dx", "dgates", "dA1", "dB1", "dA2", "dB2"]
        .iter()
        .enumerate()
    {
        match (&got[i], &want[i]) {
            (Some(a), Some(b)) => assert_close(&format!("{c:?} seed {seed} {name}"), a, b, 2e-4)?,
            (None, None) => assert!(!tracked[(i - 1).min(2)], "{name}: no gradient"),
            _ => panic!("{c:?} seed {seed} {name}: a gradient on one side only"),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn routed_lora_ffn_on_random_shapes_and_routings(
        t in prop_oneof![1usize..=40, 500usize..=1100],
        d in 1usize..=7,
        d_out in 1usize..=6,
        r in 1usize..=4,
        n in 1usize..=5,
        b in 1usize..=5,
        k_frac in 0.0f64..=1.0,
        skip in any::<bool>(),
        // Which of x, the gates and the adapters are tracked (never none of them).
        tracked in prop_oneof![
            Just([true, true, true]),
            Just([true, false, true]),
            Just([false, true, true]),
            Just([true, true, false]),
            Just([false, false, true]),
            Just([true, false, false]),
            Just([false, true, false]),
        ],
        seed in 0u64..1_000_000,
    ) {
        let k = 1 + ((n as f64 * k_frac) as usize).min(n - 1);
        check_lora_ffn((t, d, d_out, r, n, b, k), skip, tracked, seed)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}

/// Shapes at which the token-row kernel reads every product's B in place (blocks of 64 and 128,
/// widths that are multiples of 64, ≥ 128 rows per group: the random shapes above are too
/// small for the kernel), and rank 0 (the adapters add nothing).
#[test]
fn routed_lora_ffn_at_kernel_shapes_and_rank_zero() -> Result<()> {
    for (c, seed) in [
        ((1100, 64, 128, 4, 3, 64, 2), 1),
        ((1100, 64, 64, 4, 2, 128, 1), 2),
        ((600, 64, 64, 0, 2, 64, 1), 3),
    ] {
        check_lora_ffn(c, false, [true, true, true], seed)?;
    }
    Ok(())
}

/// The one-op LoRA FFN's output and gradients are the same bits on 1 and 3 threads and from run
/// to run (each chunk's partial adapter gradients are summed in chunk order, no atomics).
#[test]
fn routed_lora_ffn_is_bit_identical_across_thread_counts() -> Result<()> {
    use spt_ops::routed_ffn::routed_lora_ffn;
    let (t, d, d_out, r, n, b, k) = (1100usize, 24usize, 20usize, 4usize, 6usize, 8usize, 3usize);
    let routing = Arc::new(random_routing(t, n, k, None, 5)?);
    let f32t = |dims: &[usize], seed: u64| randn_f64(dims, seed)?.to_dtype(DType::F32);
    let base = [
        f32t(&[n * b, d], 1)?,
        f32t(&[n * b], 2)?,
        f32t(&[d_out, n * b], 3)?,
        f32t(&[d_out], 4)?,
    ];
    let ins = [
        f32t(&[t, d], 6)?,
        (f32t(&[t * k], 7)?.abs()? + 0.5)?,
        f32t(&[r, d], 8)?,
        f32t(&[n * b, r], 9)?,
        f32t(&[r, n * b], 10)?,
        f32t(&[d_out, r], 11)?,
    ];
    let up = f32t(&[t, d_out], 12)?;
    let bits = || -> Result<Vec<Vec<u32>>> {
        let v = vars(&ins)?;
        let a: Vec<&Tensor> = v.iter().map(|v| v.as_tensor()).collect();
        let base = [&base[0], &base[1], &base[2], &base[3]];
        let y = routed_lora_ffn(
            a[0],
            a[1],
            base,
            [a[2], a[3], a[4], a[5]],
            0.5,
            Activation::GeluErf,
            &routing,
        )?;
        let g = (&y * &up)?.sum_all()?.backward()?;
        let mut out = vec![y];
        out.extend(a.iter().map(|t| g.get(t).expect("a gradient").clone()));
        out.iter().map(common::f32_bits).collect()
    };
    let one = common::pool(1)?.install(bits)?;
    let three = common::pool(3)?.install(bits)?;
    let again = bits()?;
    for (i, name) in ["y", "dx", "dgates", "dA1", "dB1", "dA2", "dB2"]
        .iter()
        .enumerate()
    {
        assert!(
            one[i] == three[i] && three[i] == again[i],
            "{name} differs across thread counts"
        );
    }
    Ok(())
}
