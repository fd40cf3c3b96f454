//! Inputs at the edges that a model meets in practice: no query rows, NaN from a diverged run,
//! nothing to calibrate on, an additive (HF-style) mask where a 0 / 1 mask belongs, and
//! arguments of the wrong rank or dtype. Each gives a result candle would give, or an error that
//! names the op and what it expected; never a panic, never a silently wrong number.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::uniform;
use spt_ops::{
    dense_attention, flash_attention, layer_norm, linear_cross_entropy, merge_heads, pq_attention,
    pq_sparse_attention, softmax_last_dim, split_heads, AttentionMask, BlockTiling, Codebook, KeyTopK,
    PqConfig, Reduction, Refresh, Selection,
};

fn nan_rows(t: &Tensor) -> Result<Vec<bool>> {
    let d = *t.dims().last().unwrap();
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(v.chunks(d).map(|r| r.iter().all(|x| x.is_nan())).collect())
}

fn all_finite(t: &Tensor) -> Result<bool> {
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(v.iter().all(|x| x.is_finite()))
}

/// A 2-subspace, 4-codeword codebook fitted on `k`.
fn small_codebook(k: &Tensor) -> Result<Codebook> {
    Codebook::fit(
        k,
        &PqConfig {
            n_subspaces: 2,
            n_codewords: 4,
            ..Default::default()
        },
    )
}

fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn no_query_rows_give_an_empty_output_and_gradient() -> Result<()> {
    let q = Var::from_tensor(&uniform(&[1, 2, 0, 8], 1.0, 1, DType::F32)?)?;
    let k = Var::from_tensor(&uniform(&[1, 2, 8, 8], 1.0, 2, DType::F32)?)?;
    let v = Var::from_tensor(&uniform(&[1, 2, 8, 8], 1.0, 3, DType::F32)?)?;
    let cb = small_codebook(k.as_tensor())?;
    for mask in [AttentionMask::none(), AttentionMask::causal()] {
        let o = pq_sparse_attention(&q, &k, &v, &cb, KeyTopK::Count(2), &mask, 0.5)?;
        assert_eq!(o.dims(), &[1, 2, 0, 8]);
        let g = o.sum_all()?.backward()?;
        assert_eq!(g.get(&k).map(|t| t.dims().to_vec()), Some(vec![1, 2, 8, 8]));
    }
    // No heads at all: an empty output and gradient, with and without dropout (it divided by
    // the head count).
    let z = Var::from_tensor(&Tensor::zeros((1, 0, 4, 8), DType::F32, &Device::Cpu)?)?;
    for dropout in [None, Some(spt_ops::SeededDropout { p: 0.1, seed: 3 })] {
        let o = flash_attention(&z, &z, &z, &AttentionMask::causal(), 0.5, dropout)?;
        assert_eq!(o.dims(), &[1, 0, 4, 8]);
        let g = o.sum_all()?.backward()?;
        assert_eq!(g.get(&z).map(|t| t.dims().to_vec()), Some(vec![1, 0, 4, 8]));
    }
    // No sequences, or no query rows, beside a key-padding mask: an empty output (candle's min
    // over no rows panicked).
    for (b, lq, lk) in [(0, 4, 4), (1, 0, 4), (1, 0, 0), (0, 0, 0)] {
        let q = Tensor::zeros((b, 2, lq, 8), DType::F32, &Device::Cpu)?;
        let kv = Tensor::zeros((b, 2, lk, 8), DType::F32, &Device::Cpu)?;
        let pad = Tensor::ones((b, lk), DType::U8, &Device::Cpu)?;
        for causal in [false, true] {
            let base = if causal {
                AttentionMask::causal()
            } else {
                AttentionMask::none()
            };
            let mask = base.with_key_padding(pad.clone());
            let o = spt_ops::dense_attention(&q, &kv, &kv, &mask, 0.5)?;
            assert_eq!(o.dims(), &[b, 2, lq, 8]);
            let o = flash_attention(&q, &kv, &kv, &mask, 0.5, None)?;
            assert_eq!(o.dims(), &[b, 2, lq, 8]);
            let o = spt_ops::flash_attention_reference(&q, &kv, &kv, &mask, 0.5, None)?;
            assert_eq!(o.dims(), &[b, 2, lq, 8]);
        }
    }
    // Merging 0 heads is refused by its own name (its backward, a split into 0 heads, failed
    // naming split_heads).
    let e = err(spt_ops::merge_heads(&z));
    assert!(e.contains("merge_heads") && e.contains("0 heads"), "{e}");
    Ok(())
}

#[test]
fn nan_propagates_as_in_candle() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        // Softmax: a row with a NaN is NaN; the others are untouched. 17 columns: the SIMD body
        // and its tail.
        let x = uniform(&[3, 17], 2.0, 4, dtype)?;
        let mut v = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        v[1][16] = f64::NAN;
        v[2] = vec![f64::NAN; 17];
        let x = Tensor::new(v, &Device::Cpu)?.to_dtype(dtype)?;
        assert_eq!(
            nan_rows(&softmax_last_dim(&x)?)?,
            [false, true, true],
            "{dtype:?}"
        );

        // Attention: a NaN in one query row makes that row NaN (before: zeros); in a key, every
        // row that sees it; a NaN scale, everything.
        let (b, h, l, d) = (1, 2, 5, 4);
        let q = uniform(&[b, h, l, d], 1.0, 5, dtype)?;
        let k = uniform(&[b, h, l, d], 1.0, 6, dtype)?;
        let v = uniform(&[b, h, l, d], 1.0, 7, dtype)?;
        let mut qv = q.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        qv[2 * d..3 * d].fill(f64::NAN); // head 0, query 2
        let q_nan = Tensor::from_vec(qv, (b, h, l, d), &Device::Cpu)?.to_dtype(dtype)?;
        let o = flash_attention(&q_nan, &k, &v, &AttentionMask::none(), 0.5, None)?;
        let rows = nan_rows(&o)?;
        assert!(
            rows[2] && rows.iter().filter(|&&r| r).count() == 1,
            "{dtype:?}: {rows:?}"
        );
        let mut kv = k.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        kv[3 * d] = f64::NAN; // head 0, key 3: causal queries 3 and 4 see it
        let k_nan = Tensor::from_vec(kv, (b, h, l, d), &Device::Cpu)?.to_dtype(dtype)?;
        let o = flash_attention(&q, &k_nan, &v, &AttentionMask::causal(), 0.5, None)?;
        let want: Vec<bool> = (0..b * h * l).map(|r| r == 3 || r == 4).collect();
        assert_eq!(nan_rows(&o)?, want, "{dtype:?}");
        let o = flash_attention(&q, &k, &v, &AttentionMask::none(), f64::NAN, None)?;
        assert!(nan_rows(&o)?.iter().all(|&r| r), "{dtype:?}");
        assert!(all_finite(&flash_attention(
            &q,
            &k,
            &v,
            &AttentionMask::causal(),
            0.5,
            None
        )?)?);

        // The sparse paths: per-query top-k and block mode, a NaN query row comes out NaN.
        if dtype == DType::F32 {
            let (l, d) = (16, 8);
            let q = uniform(&[1, 1, l, d], 1.0, 16, dtype)?;
            let k = uniform(&[1, 1, l, d], 1.0, 17, dtype)?;
            let v = uniform(&[1, 1, l, d], 1.0, 18, dtype)?;
            let mut qv = q.flatten_all()?.to_vec1::<f32>()?;
            qv[5 * d..6 * d].fill(f32::NAN);
            let q = Tensor::from_vec(qv, (1, 1, l, d), &Device::Cpu)?;
            let cb = small_codebook(&k)?;
            let tiling = BlockTiling {
                query_tile: 8,
                key_block: 8,
                top_blocks: 1,
            };
            for sel in [
                Selection::PerQuery { k: KeyTopK::Count(4) },
                Selection::Blocks(tiling),
            ] {
                let o = pq_attention(&q, &k, &v, &cb, sel, &AttentionMask::none(), 0.5)?;
                let want: Vec<bool> = (0..l).map(|r| r == 5).collect();
                assert_eq!(nan_rows(&o)?, want, "{sel:?}");
            }
        }

        // The fused LM head: a NaN anywhere in W makes the loss NaN.
        let hdn = uniform(&[6, 4], 1.0, 8, dtype)?;
        let mut wv = uniform(&[9, 4], 1.0, 9, dtype)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        let t = Tensor::new(&[0u32, 1, 2, 3, 4, 5], &Device::Cpu)?;
        let w = Tensor::new(wv.clone(), &Device::Cpu)?.to_dtype(dtype)?;
        let loss = linear_cross_entropy(&hdn, &w, &t, None, Reduction::Mean)?;
        assert!(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite());
        wv[8][1] = f64::NAN; // a class no row targets
        let w = Tensor::new(wv, &Device::Cpu)?.to_dtype(dtype)?;
        let loss = linear_cross_entropy(&hdn, &w, &t, None, Reduction::Mean)?;
        assert!(
            loss.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_nan(),
            "{dtype:?}"
        );
    }
    Ok(())
}

#[test]
fn a_codebook_needs_finite_keys_to_fit() -> Result<()> {
    let cfg = PqConfig {
        n_subspaces: 2,
        n_codewords: 4,
        ..Default::default()
    };
    for shape in [[1, 2, 0, 8], [0, 2, 8, 8]] {
        let e = err(Codebook::fit(
            &Tensor::zeros(&shape, DType::F32, &Device::Cpu)?,
            &cfg,
        ));
        assert!(e.contains("Codebook::fit") && e.contains("no keys"), "{e}");
    }
    let keys = uniform(&[1, 2, 8, 8], 1.0, 10, DType::F32)?;
    let none = PqConfig {
        max_samples: 0,
        ..cfg.clone()
    };
    assert!(err(Codebook::fit(&keys, &none)).contains("max_samples 0"));
    let nan = (keys.clone() * f64::NAN)?;
    let e = err(Codebook::fit(&nan, &cfg));
    assert!(e.contains("non-finite"), "{e}");
    // A head dimension of 0 divides by any subspace count: refused, not a division by zero.
    let e = err(Codebook::fit(
        &Tensor::zeros((1, 2, 8, 0), DType::F32, &Device::Cpu)?,
        &cfg,
    ));
    assert!(
        e.contains("Codebook::fit") && e.contains("head dimension 0"),
        "{e}"
    );
    let mut book = Codebook::fit(&keys, &cfg)?;
    // Neither refreshed from nor built with non-finite values: a NaN centroid would drop out of
    // every nearest-codeword search without a word.
    let e = err(book.refresh(&nan, Refresh::MiniBatch));
    assert!(e.contains("Codebook::refresh") && e.contains("non-finite"), "{e}");
    let e = err(Codebook::from_tensor(
        &(book.to_tensor(&Device::Cpu)? * f64::NAN)?,
    ));
    assert!(e.contains("centroids") && e.contains("non-finite"), "{e}");
    assert!(Codebook::from_tensor(&book.to_tensor(&Device::Cpu)?).is_ok());
    let e = err(book.quantization_loss(&keys.narrow(2, 0, 0)?, false));
    assert!(e.contains("quantization_loss") && e.contains("no key"), "{e}");
    Ok(())
}

#[test]
fn an_additive_mask_is_refused_where_a_0_1_mask_belongs() -> Result<()> {
    let (b, h, l, d) = (1, 2, 4, 8);
    let q = uniform(&[b, h, l, d], 1.0, 11, DType::F32)?;
    let k = uniform(&[b, h, l, d], 1.0, 12, DType::F32)?;
    let v = uniform(&[b, h, l, d], 1.0, 13, DType::F32)?;
    // HF's extended form of "keep the first two": 0 / -10000.
    let additive = Tensor::new(&[[0f32, 0., -10000., -10000.]], &Device::Cpu)?;
    let mask = AttentionMask::none().with_key_padding(additive);
    let cb = small_codebook(&k)?;
    for (op, r) in [
        ("flash_attention", flash_attention(&q, &k, &v, &mask, 0.5, None)),
        ("dense_attention", dense_attention(&q, &k, &v, &mask, 0.5)),
        (
            "pq_sparse_attention",
            pq_sparse_attention(&q, &k, &v, &cb, KeyTopK::Count(2), &mask, 0.5),
        ),
    ] {
        let e = err(r);
        assert!(
            e.contains("key_padding") && e.contains("-10000") && e.contains("[0, 2]") && e.contains("0 / 1"),
            "{op}: {e}"
        );
    }
    // Checked in the mask's own precision: in f32 these read as 0 and 1.
    for bad in [1e-60f64, 1.0 - 1e-12] {
        let m = Tensor::new(&[[1f64, bad, 0., 0.]], &Device::Cpu)?;
        let mask = AttentionMask::none().with_key_padding(m);
        for (op, r) in [
            ("flash_attention", flash_attention(&q, &k, &v, &mask, 0.5, None)),
            ("dense_attention", dense_attention(&q, &k, &v, &mask, 0.5)),
        ] {
            let e = err(r);
            assert!(e.contains("key_padding") && e.contains("[0, 1]"), "{op}: {e}");
        }
    }
    // The same mask as 0 / 1 in any dtype is fine, and read the same (keys 2 and 3 dropped).
    let masked = |dt: DType| -> Result<Tensor> {
        let m = Tensor::new(&[[1f32, 1., 0., 0.]], &Device::Cpu)?.to_dtype(dt)?;
        flash_attention(&q, &k, &v, &AttentionMask::none().with_key_padding(m), 0.5, None)
    };
    let want = masked(DType::U8)?;
    let unmasked = flash_attention(&q, &k, &v, &AttentionMask::none(), 0.5, None)?;
    assert!(
        spt_ops::gradcheck::max_abs_diff(&want, &unmasked)? > 1e-3,
        "the mask drops keys"
    );
    for dt in [DType::U32, DType::I64, DType::F32, DType::F64] {
        let d = spt_ops::gradcheck::max_abs_diff(&masked(dt)?, &want)?;
        assert_eq!(d, 0.0, "a {dt:?} mask is read as the u8 one");
    }
    Ok(())
}

#[test]
fn wrong_ranks_and_dtypes_name_the_op() -> Result<()> {
    let dev = Device::Cpu;
    let q3 = Tensor::zeros((2, 4, 8), DType::F32, &dev)?;
    let k4 = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev)?;
    let e = err(dense_attention(&q3, &k4, &k4, &AttentionMask::none(), 1.0));
    assert!(
        e.contains("dense_attention") && e.contains("q [B, H, L_q, d]"),
        "{e}"
    );
    let qi = Tensor::zeros((1, 2, 4, 8), DType::U32, &dev)?;
    let e = err(dense_attention(&qi, &k4, &k4, &AttentionMask::none(), 1.0));
    assert!(e.contains("dense_attention"), "{e}");
    let e = err(split_heads(&Tensor::zeros((4, 8), DType::F32, &dev)?, 2));
    assert!(e.contains("split_heads") && e.contains("[B, L, H·d]"), "{e}");
    let e = err(merge_heads(&q3));
    assert!(e.contains("merge_heads") && e.contains("[B, H, L, d]"), "{e}");
    let s = Tensor::new(1f32, &dev)?;
    let e = err(layer_norm(&s, &s, &s, 1e-5));
    assert!(e.contains("layer_norm") && e.contains("scalar"), "{e}");

    // The fused LM head: targets are class ids, a mask is 0 / 1, and a mean needs rows.
    let h = uniform(&[3, 4], 1.0, 14, DType::F32)?;
    let w = uniform(&[5, 4], 1.0, 15, DType::F32)?;
    let ft = Tensor::new(&[0f32, 1.7, 2.], &dev)?;
    let e = err(linear_cross_entropy(&h, &w, &ft, None, Reduction::Sum));
    assert!(e.contains("targets") && e.contains("integer"), "{e}");
    let t = Tensor::new(&[0u32, 1, 2], &dev)?;
    let half = Tensor::new(&[1f32, 0.5, 1.], &dev)?;
    let e = err(linear_cross_entropy(&h, &w, &t, Some(&half), Reduction::Sum));
    assert!(e.contains("mask[1] = 0.5"), "{e}");
    let h0 = Tensor::zeros((0, 4), DType::F32, &dev)?;
    let t0 = Tensor::zeros(0, DType::U32, &dev)?;
    let e = err(linear_cross_entropy(&h0, &w, &t0, None, Reduction::Mean));
    assert!(e.contains("no rows"), "{e}");
    Ok(())
}

/// Codes and selections made by hand: a code past the codebook's C codewords, a selection row
/// out of order, and a backward called with tensors that do not belong together. Each is refused
/// by name rather than read out of bounds.
#[test]
fn hand_made_codes_selections_and_backward_inputs_are_checked() -> Result<()> {
    let dev = Device::Cpu;
    let q = uniform(&[1, 2, 4, 8], 1.0, 21, DType::F32)?;
    let k = uniform(&[1, 2, 6, 8], 1.0, 22, DType::F32)?;
    let v = uniform(&[1, 2, 6, 8], 1.0, 23, DType::F32)?;
    let cb = small_codebook(&k)?;
    let codes = cb.encode(&k)?;
    let too_big = (codes.to_dtype(DType::U32)? + 4.0)?.to_dtype(DType::U8)?;
    let e = err(spt_ops::select_keys(
        &q,
        &too_big,
        &cb,
        KeyTopK::Count(2),
        &AttentionMask::none(),
    ));
    assert!(e.contains("select_keys") && e.contains("C = 4 codewords"), "{e}");
    let tiling = BlockTiling {
        query_tile: 2,
        key_block: 2,
        top_blocks: 2,
    };
    for score in [spt_ops::BlockScore::Mean, spt_ops::BlockScore::UpperBound] {
        let e = err(spt_ops::select_blocks(
            &q,
            &too_big,
            &cb,
            tiling,
            &AttentionMask::none(),
            score,
        ));
        assert!(
            e.contains("select_blocks") && e.contains("C = 4 codewords"),
            "{e}"
        );
    }
    // Per-head codebooks (2 groups here) decode codes of exactly as many heads.
    let per_head = Codebook::fit(
        &k,
        &PqConfig {
            n_subspaces: 2,
            n_codewords: 4,
            per_head: true,
            ..Default::default()
        },
    )?;
    let codes2 = per_head.encode(&k)?;
    assert_eq!(per_head.decode(&codes2)?.dims(), &[1, 2, 6, 8]);
    for heads in [1, 4] {
        let other = Tensor::zeros((1, heads, 6, 2), DType::U8, &dev)?;
        let e = err(per_head.decode(&other));
        assert!(
            e.contains("Codebook::decode") && e.contains("2 per-head groups"),
            "{e}"
        );
    }

    let sel = spt_ops::select_keys(&q, &codes, &cb, KeyTopK::Count(3), &AttentionMask::none())?;
    let o = spt_ops::sparse_attention(&q, &k, &v, &sel, 0.5)?;
    let lse = Tensor::zeros((1, 2, 4), DType::F32, &dev)?;
    let back = |k: &Tensor, lse: &Tensor, idx: &Tensor| {
        spt_ops::sparse_attention::sparse_attention_backward(&q, k, &v, &o, lse, &o, idx, 0.5)
    };
    back(&k, &lse, &sel.indices)?;
    let e = err(back(&k.narrow(2, 0, 5)?, &lse, &sel.indices));
    assert!(e.contains("sparse_attention_backward"), "{e}");
    let e = err(back(
        &k,
        &Tensor::zeros((1, 2, 3), DType::F32, &dev)?,
        &sel.indices,
    ));
    assert!(e.contains("lse is [1, 2, 3], expected [1, 2, 4]"), "{e}");
    let s = u32::MAX;
    let mut rows = sel.indices.flatten_all()?.to_vec1::<u32>()?;
    rows[..3].copy_from_slice(&[2, 1, s]);
    let e = err(back(
        &k,
        &lse,
        &Tensor::from_vec(rows.clone(), (1, 2, 4, 3), &dev)?,
    ));
    assert!(e.contains("selection row 0 is [2, 1, 4294967295]"), "{e}");
    rows[..3].copy_from_slice(&[0, 6, s]);
    let e = err(back(&k, &lse, &Tensor::from_vec(rows, (1, 2, 4, 3), &dev)?));
    assert!(e.contains("key index 6") && e.contains("L_k = 6"), "{e}");
    Ok(())
}

/// The layer-norm op applied directly (`apply_op3`, skipping `layer_norm`'s checks) refuses
/// parameters of another length and a non-positive eps instead of normalising the wrong rows.
#[test]
fn the_layer_norm_op_applied_directly_checks_its_inputs() -> Result<()> {
    let x = uniform(&[3, 8], 1.0, 51, DType::F32)?;
    let (g, b) = (
        uniform(&[8], 1.0, 52, DType::F32)?,
        uniform(&[8], 1.0, 53, DType::F32)?,
    );
    let op = |eps| spt_ops::norm::LayerNormOp { eps };
    let direct = x.apply_op3(&g, &b, op(1e-5))?;
    let wrapped = spt_ops::layer_norm(&x, &g, &b, 1e-5)?;
    assert_eq!(direct.to_vec2::<f32>()?, wrapped.to_vec2::<f32>()?);
    let g4 = g.narrow(0, 0, 4)?;
    let e = err(x.apply_op3(&g4, &g4, op(1e-5)));
    assert!(e.contains("layer_norm") && e.contains("[4] and [4]"), "{e}");
    let e = err(x.apply_op3(&g, &g4, op(1e-5)));
    assert!(e.contains("[8] and [4]"), "{e}");
    let e = err(x.apply_op3(&g, &b, op(0.0)));
    assert!(e.contains("eps must be positive"), "{e}");
    Ok(())
}
