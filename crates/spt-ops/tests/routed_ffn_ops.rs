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

/// The fused LoRA projections (what the layer runs on the CPU without LoRA dropout) equal the
/// routed GEMMs on the merged weights `W + s·B A`, and their gradients (x, A1, B1, the gates, A2,
/// B2) pass the f64 finite-difference check; 600 tokens, so more than one token chunk.
#[test]
fn fused_lora_projections_equal_merged_weights_and_pass_gradcheck_f64() -> Result<()> {
    use spt_ops::routed_ffn::{gather_lora_act, gather_matmul_act, scatter_lora, scatter_matmul_bias};
    let (t, d, r, n, b, k, s) = (600usize, 5usize, 3usize, 4usize, 3usize, 2usize, 0.7);
    let act = Activation::GeluErf;
    let routing = Arc::new(random_routing(t, n, k, Some(1), 91)?);
    let (w1, b1) = (randn_f64(&[n * b, d], 92)?, randn_f64(&[n * b], 93)?);
    let (w2, b2) = (randn_f64(&[d, n * b], 94)?, randn_f64(&[d], 95)?);
    let inputs = [
        randn_f64(&[t, d], 96)?,
        randn_f64(&[r, d], 97)?,
        randn_f64(&[n * b, r], 98)?,
        ((randn_f64(&[t * k], 99)? * 0.3)? + 1.0)?,
        randn_f64(&[r, n * b], 100)?,
        randn_f64(&[d, r], 101)?,
    ];
    let f = |ts: &[Tensor]| -> Result<Tensor> {
        let h = gather_lora_act(&ts[0], &w1, &b1, &ts[1], &ts[2], s, act, &routing)?;
        scatter_lora(&h, &ts[3], &w2, &b2, &ts[4], &ts[5], s, &routing)
    };
    let merged = |w: &Tensor, a: &Tensor, bb: &Tensor| w + (bb.matmul(a)? * s)?;
    let h = gather_matmul_act(
        &inputs[0],
        &merged(&w1, &inputs[1], &inputs[2])?,
        Some(&b1),
        Some(act),
        &routing,
    )?;
    let want = scatter_matmul_bias(
        &h,
        &inputs[3],
        &merged(&w2, &inputs[4], &inputs[5])?,
        Some(&b2),
        &routing,
    )?;
    assert_close("fused LoRA vs merged weights", &f(&inputs)?, &want, 1e-12)?;
    // Weights stored [in, out] (GPT-2's Conv1D) arrive as transposed views: same values.
    let (w1t, w2t) = (w1.t()?.contiguous()?.t()?, w2.t()?.contiguous()?.t()?);
    assert!(!w1t.is_contiguous() && !w2t.is_contiguous());
    let h = gather_lora_act(&inputs[0], &w1t, &b1, &inputs[1], &inputs[2], s, act, &routing)?;
    let y = scatter_lora(&h, &inputs[3], &w2t, &b2, &inputs[4], &inputs[5], s, &routing)?;
    assert_close("fused LoRA on transposed weight views", &y, &want, 1e-12)?;
    let report = check_gradients(f, &inputs, &[0, 1, 2, 3, 4, 5], GradCheck::default())?;
    assert_eq!(report.len(), 6);
    // Shapes are checked by name.
    let e = gather_lora_act(&inputs[0], &w1, &b1, &inputs[2], &inputs[2], s, act, &routing)
        .unwrap_err()
        .to_string();
    assert!(e.contains("A1 is [12, 3], expected [3, 5]"), "{e}");
    Ok(())
}
