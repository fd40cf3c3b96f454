//! Edge inputs to the public API found by a read-only audit: each once panicked, corrupted
//! state or returned a silently wrong value; each now gives a result or an error naming what was
//! expected. (Model-level ones: spt-models' tests/bad_input.rs.)

use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;

type Result<T> = anyhow::Result<T>;

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    Ok(spt_ops::gradcheck::randn_f64(shape, seed)?.to_dtype(DType::F32)?)
}

/// Keys near 1e20 are finite, but their squared distances overflow f32: k-means++ drew from an
/// infinite total and panicked.
#[test]
fn pq_fit_with_huge_finite_keys_does_not_panic() -> Result<()> {
    let mut v = vec![0f32; 2 * 4];
    v[4..].fill(1e20);
    let keys = Tensor::from_vec(v, (1, 1, 2, 4), &Device::Cpu)?;
    let cfg = spt_ops::PqConfig {
        n_subspaces: 1,
        n_codewords: 2,
        ..Default::default()
    };
    match spt_ops::Codebook::fit(&keys, &cfg) {
        Ok(cb) => {
            let c = cb.to_tensor(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(c.iter().all(|x| x.is_finite()), "{c:?}");
        }
        Err(e) => assert!(e.to_string().contains("Codebook::fit"), "{e}"),
    }
    Ok(())
}

/// A query tile far past the sequence is one tile of the whole sequence (its size overflowed the
/// kernel's buffer arithmetic: a panic).
#[test]
fn block_sparse_attention_with_one_huge_query_tile_does_not_panic() -> Result<()> {
    use spt_ops::{AttentionMask, BlockSelection, BlockTiling};
    let dev = Device::Cpu;
    let sel = |qt: usize| -> Result<BlockSelection> {
        Ok(BlockSelection {
            blocks: Tensor::from_vec(vec![0u32], (1, 1, 1, 1), &dev)?,
            counts: Tensor::from_vec(vec![1u32], (1, 1, 1), &dev)?,
            tiling: BlockTiling {
                query_tile: qt,
                key_block: 4,
                top_blocks: 1,
            },
            mask: AttentionMask::none(),
        })
    };
    let (q, k, v) = (
        randn(&[1, 1, 4, 4], 1)?,
        randn(&[1, 1, 4, 4], 2)?,
        randn(&[1, 1, 4, 4], 3)?,
    );
    // One tile covering all 4 queries either way: the two must agree.
    let want = spt_ops::block_sparse_attention(&q, &k, &v, &sel(4)?, 0.5)?;
    let got = spt_ops::block_sparse_attention(&q, &k, &v, &sel(1 << 62)?, 0.5)?;
    let d = spt_ops::gradcheck::max_abs_diff(&want, &got)?;
    assert!(d < 1e-6, "{d}");
    Ok(())
}

/// The reference checks each key index against L_k (one past the end panicked, or unmasked a key
/// of the next row), and with no keys at all gives zeros.
#[test]
fn sparse_attention_reference_refuses_out_of_range_index() -> Result<()> {
    let dev = Device::Cpu;
    let (q, k, v) = (
        randn(&[1, 1, 2, 4], 4)?,
        randn(&[1, 1, 2, 4], 5)?,
        randn(&[1, 1, 2, 4], 6)?,
    );
    let sel = spt_ops::KeySelection {
        indices: Tensor::from_vec(vec![0u32, 1, 0, 2], (1, 1, 2, 2), &dev)?,
        counts: Tensor::from_vec(vec![2u32, 2], (1, 1, 2), &dev)?,
    };
    let r = spt_ops::sparse_attention::sparse_attention_reference(&q, &k, &v, &sel, 0.5);
    assert!(r.is_err(), "key index 2 with L_k = 2 was accepted");
    let none = Tensor::zeros((1, 1, 0, 4), DType::F32, &dev)?;
    let padded = spt_ops::KeySelection {
        indices: Tensor::from_vec(vec![u32::MAX; 2], (1, 1, 2, 1), &dev)?,
        counts: Tensor::from_vec(vec![0u32, 0], (1, 1, 2), &dev)?,
    };
    let o = spt_ops::sparse_attention::sparse_attention_reference(&q, &none, &none, &padded, 0.5)?;
    assert_eq!(o.dims(), &[1, 1, 2, 4]);
    assert_eq!(o.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

/// The reference refuses a query tile of 0 (a division by zero) and lists that do not fit q (read
/// out of bounds).
#[test]
fn block_sparse_attention_reference_refuses_zero_query_tile() -> Result<()> {
    use spt_ops::{AttentionMask, BlockSelection, BlockTiling};
    let dev = Device::Cpu;
    let (q, k, v) = (
        randn(&[1, 1, 2, 4], 7)?,
        randn(&[1, 1, 2, 4], 8)?,
        randn(&[1, 1, 2, 4], 9)?,
    );
    // Lists shaped for tiles of one query, so that only the tile size is wrong.
    let sel = BlockSelection {
        blocks: Tensor::from_vec(vec![0u32, 0], (1, 1, 2, 1), &dev)?,
        counts: Tensor::from_vec(vec![1u32, 1], (1, 1, 2), &dev)?,
        tiling: BlockTiling {
            query_tile: 0,
            key_block: 2,
            top_blocks: 1,
        },
        mask: AttentionMask::none(),
    };
    let e = spt_ops::block_sparse_attention::block_sparse_attention_reference(&q, &k, &v, &sel, 0.5)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("query_tile: 0") && e.contains("tiles of at least 1"),
        "{e}"
    );
    Ok(())
}

/// A `wrt` index past the inputs is an error, not an index panic.
#[test]
fn gradcheck_wrt_out_of_range_is_an_error() -> Result<()> {
    use spt_ops::gradcheck::{check_gradients, GradCheck};
    let x = spt_ops::gradcheck::randn_f64(&[3], 1)?;
    // Input 0 is checked (so the graph is tracked); input 1 does not exist.
    let r = check_gradients(
        |xs: &[Tensor]| Ok(xs[0].clone()),
        &[x],
        &[0, 1],
        GradCheck::default(),
    );
    assert!(r.is_err());
    Ok(())
}

/// The routed-LoRA FFN op's backward with no tokens gives zero adapter gradients of the right
/// shapes (an earlier fused backward sized them from the empty input and failed).
#[test]
fn lora_fused_op_backward_with_zero_tokens() -> Result<()> {
    use spt_ops::routed_ffn::{routed_lora_ffn, Routing};
    let dev = Device::Cpu;
    let routing = Arc::new(Routing::from_blocks(0, 2, 1, vec![])?);
    let x = Var::from_tensor(&Tensor::zeros((0, 4), DType::F32, &dev)?)?;
    let gates = Var::from_tensor(&Tensor::zeros(0, DType::F32, &dev)?)?;
    let (w1, b1) = (randn(&[8, 4], 1)?, Tensor::zeros(8, DType::F32, &dev)?);
    let (w2, b2) = (randn(&[4, 8], 4)?, Tensor::zeros(4, DType::F32, &dev)?);
    let a1 = Var::from_tensor(&randn(&[2, 4], 2)?)?;
    let bb1 = Var::from_tensor(&randn(&[8, 2], 3)?)?;
    let a2 = Var::from_tensor(&randn(&[2, 8], 5)?)?;
    let bb2 = Var::from_tensor(&randn(&[4, 2], 6)?)?;
    let y = routed_lora_ffn(
        x.as_tensor(),
        gates.as_tensor(),
        [&w1, &b1, &w2, &b2],
        [a1.as_tensor(), bb1.as_tensor(), a2.as_tensor(), bb2.as_tensor()],
        1.0,
        spt_ops::Activation::GeluErf,
        &routing,
    )?;
    assert_eq!(y.dims(), &[0, 4]);
    let g = y.sum_all()?.backward()?;
    // No tokens: every adapter's gradient is zero, with its shape.
    for (v, dims) in [(&a1, [2, 4]), (&bb1, [8, 2]), (&a2, [2, 8]), (&bb2, [4, 2])] {
        let d = g.get(v.as_tensor()).expect("every adapter gets a gradient");
        assert_eq!(d.dims(), &dims);
        assert_eq!(d.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    }
    Ok(())
}

fn small_ffn(seed: u64) -> Result<spt_ops::RoutedFfn> {
    use spt_ops::routed_ffn::{BlockTopK, RoutedFfnConfig};
    let dev = Device::Cpu;
    Ok(spt_ops::RoutedFfn::new(
        &randn(&[16, 8], seed)?,
        &Tensor::zeros(16, DType::F32, &dev)?,
        &randn(&[8, 16], seed + 1)?,
        &Tensor::zeros(8, DType::F32, &dev)?,
        spt_ops::Activation::GeluErf,
        RoutedFfnConfig::new(4, BlockTopK::Count(2)),
    )?)
}

/// An infinite score scale gave a NaN router and an infinite ridge an all-zero one; both
/// returned Ok.
#[test]
fn init_router_refuses_infinite_score_scale() -> Result<()> {
    use spt_ops::routed_ffn::RouterFitConfig;
    let x = randn(&[32, 8], 21)?;
    for fit in [
        RouterFitConfig {
            score_scale: f64::INFINITY,
            ..Default::default()
        },
        RouterFitConfig {
            ridge: f64::INFINITY,
            ..Default::default()
        },
    ] {
        let mut ffn = small_ffn(5)?;
        let r = ffn.init_router(&x, fit);
        assert!(r.is_err(), "{fit:?} accepted: {r:?}");
    }
    Ok(())
}

/// One NaN token made every unit's profile NaN and the unit order arbitrary.
#[test]
fn cluster_units_refuses_non_finite_sample() -> Result<()> {
    let ffn = small_ffn(7)?;
    let mut v = randn(&[32, 8], 22)?.flatten_all()?.to_vec1::<f32>()?;
    v[3] = f32::NAN;
    let x = Tensor::from_vec(v, (32, 8), &Device::Cpu)?;
    let r = ffn.cluster_units(&x, spt_ops::routed_ffn::UnitClusterConfig::default());
    assert!(r.is_err(), "{r:?}");
    Ok(())
}

/// A dropout p outside [0, 1) is refused: -0.5 gave a mask of 0.667 everywhere, p ≥ 1 an
/// infinite scale.
#[test]
fn attention_dropout_mask_refuses_p_outside_unit_interval() -> Result<()> {
    use spt_ops::flash_attention::attention_dropout_mask;
    for p in [-0.5, 1.5, f64::NAN] {
        let r = attention_dropout_mask(spt_ops::SeededDropout { p, seed: 0 }, (1, 1, 2, 2), &Device::Cpu);
        assert!(r.is_err(), "p = {p} accepted");
    }
    Ok(())
}
