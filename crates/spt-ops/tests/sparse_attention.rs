//! Sparse attention: f64 gradient checks, property tests against dense masked attention and the
//! selection-masked reference, determinism, and bad input.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::{fwd_bwd, max_diff, padding, uniform};
use proptest::prelude::*;
use spt_ops::gradcheck::{check_gradients, GradCheck};
use spt_ops::pq::SENTINEL;
use spt_ops::sparse_attention::{sparse_attention_backward, sparse_attention_reference};
use spt_ops::{
    dense_attention, select_keys, sparse_attention, AttentionMask, Codebook, KeySelection, KeyTopK, PqConfig,
};

/// A selection from a small fitted codebook (S = 1 subspace, so any d works).
fn pq_selection(
    q: &Tensor,
    k: &Tensor,
    topk: KeyTopK,
    mask: &AttentionMask,
    seed: u64,
) -> Result<KeySelection> {
    let cfg = PqConfig {
        n_subspaces: 1,
        n_codewords: 4,
        kmeans_iters: 5,
        seed,
        ..Default::default()
    };
    let cb = Codebook::fit(k, &cfg)?;
    select_keys(q, &cb.encode(k)?, &cb, topk, mask)
}

fn masks(b: usize, l: usize, seed: u64, allow_empty: bool) -> Result<Vec<AttentionMask>> {
    Ok(vec![
        AttentionMask::none(),
        AttentionMask::causal(),
        AttentionMask::none().with_key_padding(padding(b, l, seed, allow_empty)?),
        AttentionMask::causal().with_key_padding(padding(b, l, seed + 1, allow_empty)?),
    ])
}

/// Scores up to ~±150 (scale 30), where exp overflows f32 unless each row's true maximum is
/// subtracted; 24 of 70 keys per query, against the f64 reference.
#[test]
fn peaked_scores_match_f64() -> Result<()> {
    let [q, k, v, w] = common::qkvw([1, 2, 70, 16], 51)?;
    let mask = AttentionMask::causal();
    let sel = pq_selection(&q, &k, KeyTopK::Count(24), &mask, 5)?;
    common::matches_f64(
        "sparse_attention, scale 30",
        |q, k, v| sparse_attention(q, k, v, &sel, 30.0),
        |q, k, v| sparse_attention_reference(q, k, v, &sel, 30.0),
        [&q, &k, &v, &w],
        1e-4,
    )
}

#[test]
fn gradients_match_finite_differences_f64() -> Result<()> {
    let (b, h, l, d, dv) = (2, 2, 7, 4, 3);
    for (m, mask) in masks(b, l, 3, true)?.into_iter().enumerate() {
        for k in [1usize, 3, 7] {
            let seed = 100 + 10 * m as u64 + k as u64;
            let q = uniform(&[b, h, l, d], 1.5, seed, DType::F64)?;
            let kk = uniform(&[b, h, l, d], 1.5, seed + 1, DType::F64)?;
            let v = uniform(&[b, h, l, dv], 1.0, seed + 2, DType::F64)?;
            let sel = pq_selection(&q, &kk, KeyTopK::Count(k), &mask, seed)?;
            let cfg = GradCheck {
                seed,
                ..Default::default()
            };
            check_gradients(
                |t| sparse_attention(&t[0], &t[1], &t[2], &sel, 0.5),
                &[q, kk, v],
                &[0, 1, 2],
                cfg,
            )
            .map_err(|e| candle_core::Error::Msg(format!("mask #{m}, k = {k}: {e}")))?;
        }
    }
    Ok(())
}

#[test]
fn backward_is_deterministic_and_matches_its_standalone_function() -> Result<()> {
    let (b, h, l, d) = (1, 3, 97, 16);
    let q = uniform(&[b, h, l, d], 1.0, 1, DType::F32)?;
    let k = uniform(&[b, h, l, d], 1.0, 2, DType::F32)?;
    let v = uniform(&[b, h, l, d], 1.0, 3, DType::F32)?;
    let w = uniform(&[b, h, l, d], 1.0, 4, DType::F32)?;
    let sel = pq_selection(&q, &k, KeyTopK::Fraction(0.25), &AttentionMask::causal(), 7)?;
    let run = || fwd_bwd(|q, k, v| sparse_attention(q, k, v, &sel, 0.25), &q, &k, &v, &w);
    let (o1, g1) = run()?;
    let (o2, g2) = run()?;
    assert_eq!(
        o1.flatten_all()?.to_vec1::<f32>()?,
        o2.flatten_all()?.to_vec1::<f32>()?
    );
    for (a, b) in g1.iter().zip(&g2) {
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
            "gradients must be bit-identical"
        );
    }
    // The standalone backward, fed the forward's lse recomputed densely, gives the same result.
    let scores = (q.matmul(&k.t()?)? * 0.25)?;
    let idx = sel.indices.flatten_all()?.to_vec1::<u32>()?;
    let sc = scores.flatten_all()?.to_vec1::<f32>()?;
    let kk = sel.k();
    let lse: Vec<f32> = (0..b * h * l)
        .map(|r| {
            let s: Vec<f32> = idx[r * kk..(r + 1) * kk]
                .iter()
                .filter(|&&j| j != SENTINEL)
                .map(|&j| sc[r * l + j as usize])
                .collect();
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            m + s.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
        })
        .collect();
    let lse = Tensor::from_vec(lse, (b, h, l), &Device::Cpu)?;
    let (dq, dk, dv) = sparse_attention_backward(&q, &k, &v, &o1, &lse, &w, &sel.indices, 0.25)?;
    for (ours, want) in [(&dq, &g1[0]), (&dk, &g1[1]), (&dv, &g1[2])] {
        assert!(max_diff(ours, want)? < 1e-5);
    }
    Ok(())
}

#[test]
fn empty_rows_output_zero_and_get_zero_gradient() -> Result<()> {
    // Batch 1 has every key padded: its rows select nothing.
    let (b, h, l, d) = (2, 1, 5, 4);
    let pad = Tensor::from_vec(vec![1u8, 1, 0, 1, 1, 0, 0, 0, 0, 0], (b, l), &Device::Cpu)?;
    let mask = AttentionMask::none().with_key_padding(pad);
    let q = uniform(&[b, h, l, d], 1.0, 1, DType::F32)?;
    let k = uniform(&[b, h, l, d], 1.0, 2, DType::F32)?;
    let v = uniform(&[b, h, l, d], 1.0, 3, DType::F32)?;
    let w = uniform(&[b, h, l, d], 1.0, 4, DType::F32)?;
    let sel = pq_selection(&q, &k, KeyTopK::Count(2), &mask, 1)?;
    assert_eq!(sel.counts.flatten_all()?.to_vec1::<u32>()?[5..], [0, 0, 0, 0, 0]);
    let (o, g) = fwd_bwd(|q, k, v| sparse_attention(q, k, v, &sel, 0.5), &q, &k, &v, &w)?;
    assert_eq!(o.get(1)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    assert_eq!(g[0].get(1)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    let (od, gd) = fwd_bwd(
        |q, k, v| sparse_attention_reference(q, k, v, &sel, 0.5),
        &q,
        &k,
        &v,
        &w,
    )?;
    assert!(max_diff(&o, &od)? < 1e-6);
    for (a, b) in g.iter().zip(&gd) {
        assert!(max_diff(a, b)? < 1e-6);
    }
    Ok(())
}

/// An attention function of (q, k, v).
type AttnFn = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

fn check_case(
    b: usize,
    h: usize,
    l: usize,
    d: usize,
    mask_kind: usize,
    k: Option<usize>,
    seed: u64,
) -> Result<()> {
    let dt = DType::F32;
    let q = uniform(&[b, h, l, d], 1.0, seed, dt)?;
    let kk = uniform(&[b, h, l, d], 1.0, seed + 1, dt)?;
    let v = uniform(&[b, h, l, d + 1], 1.0, seed + 2, dt)?;
    let w = uniform(&[b, h, l, d + 1], 1.0, seed + 3, dt)?;
    let mask = masks(b, l, seed, true)?.swap_remove(mask_kind);
    let scale = 1.0 / (d as f64).sqrt();
    let (sel, want): (_, Box<AttnFn>) = match k {
        // k = L keeps every allowed key: the op must equal dense masked attention.
        None => {
            let sel = pq_selection(&q, &kk, KeyTopK::Count(l), &mask, seed)?;
            let m = mask.clone();
            (sel, Box::new(move |q, k, v| dense_attention(q, k, v, &m, scale)))
        }
        Some(k) => {
            let sel = pq_selection(&q, &kk, KeyTopK::Count(k.min(l)), &mask, seed)?;
            let s2 = sel.clone();
            (
                sel,
                Box::new(move |q, k, v| sparse_attention_reference(q, k, v, &s2, scale)),
            )
        }
    };
    let (o, g) = fwd_bwd(|q, k, v| sparse_attention(q, k, v, &sel, scale), &q, &kk, &v, &w)?;
    let (ow, gw) = fwd_bwd(|q, k, v| want(q, k, v), &q, &kk, &v, &w)?;
    let tol = 1e-5;
    let e = max_diff(&o, &ow)?;
    assert!(
        e < tol,
        "forward: max |Δ| = {e} (B={b} H={h} L={l} d={d} mask #{mask_kind} k={k:?})"
    );
    for (name, a, bb) in [
        ("dq", &g[0], &gw[0]),
        ("dk", &g[1], &gw[1]),
        ("dv", &g[2], &gw[2]),
    ] {
        let e = max_diff(a, bb)?;
        assert!(
            e < tol,
            "{name}: max |Δ| = {e} (B={b} H={h} L={l} d={d} mask #{mask_kind} k={k:?})"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn all_allowed_keys_equal_dense_attention(
        b in 1usize..3, h in 1usize..3, l in 1usize..20, d in 1usize..10, mask in 0usize..4, seed in 0u64..1_000_000,
    ) {
        check_case(b, h, l, d, mask, None, seed).unwrap();
    }

    #[test]
    fn any_selection_equals_masked_reference(
        b in 1usize..3, h in 1usize..3, l in 1usize..20, d in 1usize..10, mask in 0usize..4, k in 1usize..20,
        seed in 0u64..1_000_000,
    ) {
        // k below L in all but the L = 1 cases (all_allowed_keys_equal_dense_attention has k ≥ L).
        let k = if l > 1 { 1 + k % (l - 1) } else { 1 };
        check_case(b, h, l, d, mask, Some(k), seed).unwrap();
    }
}

#[test]
fn awkward_lengths_match_dense() -> Result<()> {
    for (l, m) in [(97usize, 1usize), (130, 3), (33, 2)] {
        check_case(1, 2, l, 16, m, None, l as u64)?;
    }
    Ok(())
}

#[test]
fn bad_input_gives_named_errors() -> Result<()> {
    let dt = DType::F32;
    let q = uniform(&[1, 2, 8, 4], 1.0, 1, dt)?;
    let k = uniform(&[1, 2, 8, 4], 1.0, 2, dt)?;
    let v = uniform(&[1, 2, 8, 4], 1.0, 3, dt)?;
    let sel = pq_selection(&q, &k, KeyTopK::Count(3), &AttentionMask::none(), 1)?;
    let err = |r: Result<Tensor>| r.expect_err("expected an error").to_string();

    let e = err(sparse_attention(
        &q,
        &uniform(&[1, 2, 8, 5], 1.0, 2, dt)?,
        &v,
        &sel,
        1.0,
    ));
    assert!(
        e.contains("sparse_attention") && e.contains("[1, 2, 8, 5]"),
        "{e}"
    );
    let e = err(sparse_attention(&q, &k.to_dtype(DType::F64)?, &v, &sel, 1.0));
    assert!(e.contains("sparse_attention") && e.contains("dtype"), "{e}");
    let e = err(sparse_attention(&q.to_dtype(DType::BF16)?, &k, &v, &sel, 1.0));
    assert!(e.contains("sparse_attention"), "{e}");
    let qt = uniform(&[1, 2, 4, 8], 1.0, 1, dt)?.transpose(2, 3)?;
    let e = err(sparse_attention(&qt, &k, &v, &sel, 1.0));
    assert!(e.contains("not contiguous") && e.contains("[1, 2, 8, 4]"), "{e}");
    let empty = KeySelection {
        indices: Tensor::zeros((1, 2, 8, 0), DType::U32, &Device::Cpu)?,
        counts: Tensor::zeros((1, 2, 8), DType::U32, &Device::Cpu)?,
    };
    let e = err(sparse_attention(&q, &k, &v, &empty, 1.0));
    assert!(e.contains("k = 0"), "{e}");
    let wrong = KeySelection {
        indices: (sel.indices.clone() + 5.0)?,
        counts: sel.counts.clone(),
    };
    let e = err(sparse_attention(&q, &k, &v, &wrong, 1.0));
    assert!(e.contains("key index") && e.contains("L_k = 8"), "{e}");
    let short = KeySelection {
        indices: sel.indices.narrow(2, 0, 4)?,
        counts: sel.counts.narrow(2, 0, 4)?,
    };
    let e = err(sparse_attention(&q, &k, &v, &short, 1.0));
    assert!(
        e.contains("selection indices") && e.contains("[1, 2, 4, 3]"),
        "{e}"
    );
    // Hand-built rows: a repeated key, descending keys, a key after the padding.
    let pad = u32::MAX;
    for bad in [[1u32, 1, 2], [2, 1, pad], [1, pad, 3]] {
        let mut rows = [[0u32, 1, 2]; 16];
        rows[5] = bad;
        let sel = KeySelection {
            indices: Tensor::from_vec(rows.concat(), (1, 2, 8, 3), &Device::Cpu)?,
            counts: sel.counts.clone(),
        };
        let e = err(sparse_attention(&q, &k, &v, &sel, 1.0));
        assert!(
            e.contains("selection row 5") && e.contains("ascending"),
            "{bad:?}: {e}"
        );
    }
    Ok(())
}
