//! Fused dense attention: f64 gradient checks (with and without dropout), property tests against
//! the composed reference over random shapes, masks and ragged tiles, determinism across runs
//! and thread counts, the dropout mask's statistics, and bad input.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::{fwd_bwd, max_diff, padding, uniform};
use proptest::prelude::*;
use spt_ops::flash_attention::{attention_dropout_mask, flash_attention_reference};
use spt_ops::gradcheck::{check_gradients, GradCheck};
use spt_ops::{dense_attention, flash_attention, AttentionMask, SeededDropout};

fn mask_of(kind: usize, b: usize, l: usize, seed: u64, allow_empty: bool) -> Result<AttentionMask> {
    let mut m = AttentionMask {
        causal: kind & 1 == 1,
        key_padding: None,
    };
    if kind & 2 == 2 {
        m = m.with_key_padding(padding(b, l, seed, allow_empty)?);
    }
    Ok(m)
}

#[test]
fn gradients_match_finite_differences_f64() -> Result<()> {
    // L = 70 spans two query tiles under a causal mask (64 + 6), L = 130 two without one
    // (128 + 2), so the tile seams are checked too.
    for (l, d, dv) in [(11usize, 4usize, 3usize), (70, 3, 2), (130, 2, 2)] {
        for kind in 0..4 {
            for p in [0.0, 0.3] {
                let (b, h) = (2, 2);
                let seed = 300 + 10 * kind as u64 + l as u64 + (p * 10.0) as u64;
                let mask = mask_of(kind, b, l, seed, true)?;
                let q = uniform(&[b, h, l, d], 1.5, seed, DType::F64)?;
                let k = uniform(&[b, h, l, d], 1.5, seed + 1, DType::F64)?;
                let v = uniform(&[b, h, l, dv], 1.0, seed + 2, DType::F64)?;
                let drop = Some(SeededDropout { p, seed });
                check_gradients(
                    |x| flash_attention(&x[0], &x[1], &x[2], &mask, 0.5, drop),
                    &[q, k, v],
                    &[0, 1, 2],
                    GradCheck {
                        seed,
                        ..Default::default()
                    },
                )
                .map_err(|e| candle_core::Error::Msg(format!("L {l}, mask #{kind}, p {p}: {e}")))?;
            }
        }
    }
    Ok(())
}

/// Forward and all three gradients of the fused op against the composed reference, in f32.
#[allow(clippy::too_many_arguments)]
fn check_case(
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    kind: usize,
    p: f64,
    seed: u64,
) -> Result<()> {
    let dt = DType::F32;
    let q = uniform(&[b, h, lq, d], 1.0, seed, dt)?;
    let k = uniform(&[b, h, lk, d], 1.0, seed + 1, dt)?;
    let v = uniform(&[b, h, lk, d + 1], 1.0, seed + 2, dt)?;
    let w = uniform(&[b, h, lq, d + 1], 1.0, seed + 3, dt)?;
    let mask = mask_of(kind, b, lk, seed, true)?;
    let scale = 1.0 / (d as f64).sqrt();
    let drop = Some(SeededDropout {
        p,
        seed: seed ^ 0xABCD,
    });
    let (o, g) = fwd_bwd(
        |q, k, v| flash_attention(q, k, v, &mask, scale, drop),
        &q,
        &k,
        &v,
        &w,
    )?;
    let (ow, gw) = if p == 0.0 {
        fwd_bwd(|q, k, v| dense_attention(q, k, v, &mask, scale), &q, &k, &v, &w)?
    } else {
        fwd_bwd(
            |q, k, v| flash_attention_reference(q, k, v, &mask, scale, drop),
            &q,
            &k,
            &v,
            &w,
        )?
    };
    let tol = 2e-5 * (lk as f64).sqrt().max(1.0) / (1.0 - p);
    for (name, a, e) in [
        ("o", &o, &ow),
        ("dq", &g[0], &gw[0]),
        ("dk", &g[1], &gw[1]),
        ("dv", &g[2], &gw[2]),
    ] {
        let diff = max_diff(a, e)?;
        assert!(
            diff < tol,
            "{name}: max |diff| {diff:e} ≥ {tol:e} (B {b} H {h} Lq {lq} Lk {lk} d {d} mask #{kind} p {p} seed {seed})"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn matches_reference(
        b in 1usize..3, h in 1usize..3, l in 1usize..300, d in 1usize..20, kind in 0usize..4,
        drop in 0usize..3, seed in 0u64..1000,
    ) {
        let p = [0.0, 0.1, 0.5][drop];
        check_case(b, h, l, l, d, kind, p, seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }

    #[test]
    fn matches_reference_cross_attention(
        lq in 1usize..300, lk in 1usize..300, kind in 0usize..4, seed in 0u64..1000,
    ) {
        // Causal with L_q ≠ L_k: query i sees keys 0..=i, as the composed form does.
        check_case(1, 2, lq, lk, 8, kind, 0.0, seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}

/// Scores up to ~±150 (scale 30): exp overflows f32 past 88, so only a kernel that subtracts
/// each row's true maximum stays finite and matches the f64 composition. The other tests keep
/// scores within a few units, where a wrong maximum cancels out.
#[test]
fn peaked_scores_match_f64() -> Result<()> {
    let [q, k, v, w] = common::qkvw([1, 2, 70, 16], 51)?;
    let mask = AttentionMask::causal();
    common::matches_f64(
        "flash_attention, scale 30",
        |q, k, v| flash_attention(q, k, v, &mask, 30.0, None),
        |q, k, v| dense_attention(q, k, v, &mask, 30.0),
        [&q, &k, &v, &w],
        1e-4,
    )
}

#[test]
fn empty_rows_output_zero_and_get_zero_gradient() -> Result<()> {
    let (b, h, l, d) = (2, 2, 9, 4);
    let q = uniform(&[b, h, l, d], 1.0, 1, DType::F32)?;
    let k = uniform(&[b, h, l, d], 1.0, 2, DType::F32)?;
    let v = uniform(&[b, h, l, d], 1.0, 3, DType::F32)?;
    let w = uniform(&[b, h, l, d], 1.0, 4, DType::F32)?;
    // Batch 1 has no keys at all.
    let mut pad = vec![1u8; b * l];
    pad[l..].fill(0);
    let mask = AttentionMask::none().with_key_padding(Tensor::from_vec(pad, (b, l), &Device::Cpu)?);
    let (o, g) = fwd_bwd(
        |q, k, v| flash_attention(q, k, v, &mask, 0.5, None),
        &q,
        &k,
        &v,
        &w,
    )?;
    assert_eq!(o.get(1)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    // Batch 0's rows see keys: their outputs and gradients are not zero (an op that returned
    // no gradient at all would pass the check above).
    for gi in &g {
        assert_eq!(gi.get(1)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        assert!(gi.get(0)?.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    }
    assert!(o.get(0)?.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

#[test]
fn dropout_mask_is_the_one_applied_and_has_rate_p() -> Result<()> {
    // With V = identity columns, the output row is exactly the dropped probabilities.
    let (b, h, l) = (1, 3, 96);
    let q = uniform(&[b, h, l, 8], 1.0, 11, DType::F32)?;
    let k = uniform(&[b, h, l, 8], 1.0, 12, DType::F32)?;
    let eye = Tensor::eye(l, DType::F32, &Device::Cpu)?
        .broadcast_as((b, h, l, l))?
        .contiguous()?;
    let drop = SeededDropout { p: 0.25, seed: 99 };
    let mask = AttentionMask::causal();
    let o = flash_attention(&q, &k, &eye, &mask, 0.3, Some(drop))?;
    let dmask = attention_dropout_mask(drop, (b, h, l, l), &Device::Cpu)?;
    let probs = flash_attention(&q, &k, &eye, &mask, 0.3, None)?;
    let diff = max_diff(&o, &probs.mul(&dmask)?)?;
    assert!(diff < 1e-6, "fused dropout differs from the mask: {diff:e}");
    let allowed = (l * (l + 1) / 2 * h) as f64;
    let zeros = dmask
        .eq(0f32)?
        .to_dtype(DType::F32)?
        .mul(&Tensor::tril2(l, DType::F32, &Device::Cpu)?.broadcast_as((b, h, l, l))?)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let rate = zeros / allowed;
    assert!(
        (rate - 0.25).abs() < 0.02,
        "drop rate {rate} over {allowed} entries"
    );
    Ok(())
}

fn bits(q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor, mask: &AttentionMask) -> Result<Vec<Vec<u32>>> {
    let drop = Some(SeededDropout { p: 0.1, seed: 5 });
    let (o, g) = fwd_bwd(|q, k, v| flash_attention(q, k, v, mask, 0.125, drop), q, k, v, w)?;
    [&o, &g[0], &g[1], &g[2]]
        .into_iter()
        .map(common::f32_bits)
        .collect()
}

#[test]
fn results_are_bit_identical_across_runs_and_thread_counts() -> Result<()> {
    let (b, h, l, d) = (2, 3, 203, 64);
    let q = uniform(&[b, h, l, d], 1.0, 1, DType::F32)?;
    let k = uniform(&[b, h, l, d], 1.0, 2, DType::F32)?;
    let v = uniform(&[b, h, l, d], 1.0, 3, DType::F32)?;
    let w = uniform(&[b, h, l, d], 1.0, 4, DType::F32)?;
    let pad = padding(b, l, 5, false)?;
    // Causal and not: the two use different query tiles (64 and 128 rows).
    for mask in [
        AttentionMask::causal().with_key_padding(pad.clone()),
        AttentionMask::none().with_key_padding(pad.clone()),
    ] {
        let one = common::pool(1)?.install(|| bits(&q, &k, &v, &w, &mask))?;
        let three = common::pool(3)?.install(|| bits(&q, &k, &v, &w, &mask))?;
        let again = bits(&q, &k, &v, &w, &mask)?;
        for (name, i) in [("o", 0), ("dq", 1), ("dk", 2), ("dv", 3)] {
            assert!(
                one[i] == three[i] && three[i] == again[i],
                "{name} differs across thread counts (causal: {})",
                mask.causal
            );
        }
    }
    Ok(())
}

#[test]
fn bad_input_is_an_error_naming_what_is_wrong() -> Result<()> {
    let q = uniform(&[1, 2, 5, 4], 1.0, 1, DType::F32)?;
    let k = uniform(&[1, 2, 5, 3], 1.0, 2, DType::F32)?;
    let err = flash_attention(&q, &k, &k, &AttentionMask::none(), 1.0, None).unwrap_err();
    assert!(err.to_string().contains("expected q [B, H, L_q, d]"), "{err}");
    let err = flash_attention(
        &q,
        &q,
        &q,
        &AttentionMask::none(),
        1.0,
        Some(SeededDropout { p: 1.0, seed: 0 }),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("dropout p must be in [0, 1), got 1"),
        "{err}"
    );
    let pad = Tensor::ones((1, 4), DType::U8, &Device::Cpu)?;
    let err = flash_attention(
        &q,
        &q,
        &q,
        &AttentionMask::none().with_key_padding(pad),
        1.0,
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("key_padding mask is [1, 4]"), "{err}");
    Ok(())
}
