//! Block-sparse PQ attention: block selection invariants and optimality, f64 gradient checks,
//! property tests against the dense block-masked reference (ragged tiles, masks), every block
//! kept = dense attention, determinism across runs and thread counts, and bad input.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::{fwd_bwd, max_diff, padding, uniform};
use proptest::prelude::*;
use spt_ops::block_sparse_attention::reference::block_sparse_attention_reference;
use spt_ops::gradcheck::{check_gradients, GradCheck};
use spt_ops::pq::SENTINEL;
use spt_ops::{
    block_sparse_attention, dense_attention, pq_attention, select_blocks, select_keys, sparse_attention,
    AttentionMask, BlockScore, BlockSelection, BlockTiling, Codebook, KeyTopK, PqConfig, Selection,
};

fn codebook(k: &Tensor, s: usize, c: usize, seed: u64) -> Result<Codebook> {
    Codebook::fit(
        k,
        &PqConfig {
            n_subspaces: s,
            n_codewords: c,
            kmeans_iters: 5,
            seed,
            ..Default::default()
        },
    )
}

fn tiling(query_tile: usize, key_block: usize, top_blocks: usize) -> BlockTiling {
    BlockTiling {
        query_tile,
        key_block,
        top_blocks,
    }
}

/// Tiling with `top` raised to what a causal mask needs.
fn fit_tiling(qt: usize, kb: usize, top: usize, lq: usize, lk: usize, causal: bool) -> BlockTiling {
    let t = tiling(qt, kb, top);
    let need = if causal { t.diagonal_blocks(lq, lk) } else { 0 };
    tiling(qt, kb, top.max(need))
}

fn mask_of(kind: usize, b: usize, l: usize, seed: u64) -> Result<AttentionMask> {
    let mut m = AttentionMask {
        causal: kind & 1 == 1,
        key_padding: None,
    };
    if kind & 2 == 2 {
        m = m.with_key_padding(padding(b, l, seed, true)?);
    }
    Ok(m)
}

fn blocks_of(
    q: &Tensor,
    k: &Tensor,
    t: BlockTiling,
    mask: &AttentionMask,
    score: BlockScore,
    seed: u64,
) -> Result<BlockSelection> {
    let cb = codebook(k, 1, 4, seed)?;
    select_blocks(q, &cb.encode(k)?, &cb, t, mask, score)
}

/// Checks the selection's invariants and that the unforced picks are the best-scoring blocks,
/// with block scores recomputed in f64 from the decoded keys.
fn check_selection(
    q: &Tensor,
    codes: &Tensor,
    cb: &Codebook,
    sel: &BlockSelection,
    mask: &AttentionMask,
    score: BlockScore,
) -> Result<()> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = codes.dim(2)?;
    let BlockTiling {
        query_tile: qt,
        key_block: kb,
        top_blocks: width,
    } = sel.tiling;
    let (nt, nb) = (lq.div_ceil(qt), lk.div_ceil(kb));
    assert_eq!(sel.blocks.dims(), [b, h, nt, width]);
    let blocks = sel.blocks.flatten_all()?.to_vec1::<u32>()?;
    let counts = sel.counts.flatten_all()?.to_vec1::<u32>()?;
    let pad = match &mask.key_padding {
        Some(p) => p.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?,
        None => vec![1; b * lk],
    };
    let qv = q.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let recon = cb
        .decode(codes)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let (s, dc) = (cb.n_subspaces(), cb.d_codeword());
    for bh in 0..b * h {
        let bi = bh / h;
        let ok = |j: usize| pad[bi * lk + j] != 0;
        for t in 0..nt {
            let (t0, t1) = (t * qt, ((t + 1) * qt).min(lq));
            let list = &blocks[(bh * nt + t) * width..(bh * nt + t + 1) * width];
            let n = counts[bh * nt + t] as usize;
            assert!(list[..n].windows(2).all(|w| w[0] < w[1]), "tile {t}: {list:?}");
            assert!(list[n..].iter().all(|&x| x == SENTINEL), "tile {t}: {list:?}");
            let has_keys = |blk: usize| (blk * kb..((blk + 1) * kb).min(lk)).any(ok);
            let in_past = |blk: usize| !mask.causal || blk * kb < t1;
            let diag = |blk: usize| mask.causal && blk * kb < t1.min(lk) && (blk + 1) * kb > t0;
            let cands: Vec<usize> = (0..nb).filter(|&x| has_keys(x) && in_past(x)).collect();
            assert_eq!(
                n,
                cands.len().min(width),
                "tile {t} of (b, h) {bh}: {list:?}, candidates {cands:?}"
            );
            for &blk in &list[..n] {
                assert!(
                    cands.contains(&(blk as usize)),
                    "tile {t} kept block {blk} (no keys or future)"
                );
            }
            for &x in cands.iter().filter(|&&x| diag(x)) {
                assert!(
                    list[..n].contains(&(x as u32)),
                    "tile {t} dropped diagonal block {x}: {list:?}"
                );
            }
            // Scores in f64 against the tile's mean query.
            let mut qbar = vec![0f64; d];
            for i in t0..t1 {
                for (a, x) in qbar.iter_mut().zip(&qv[(bh * lq + i) * d..(bh * lq + i + 1) * d]) {
                    *a += x / (t1 - t0) as f64;
                }
            }
            let sc = |blk: usize| -> f64 {
                let keys: Vec<usize> = (blk * kb..((blk + 1) * kb).min(lk)).filter(|&j| ok(j)).collect();
                let part = |j: usize, si: usize| -> f64 {
                    (0..dc)
                        .map(|e| qbar[si * dc + e] * recon[(bh * lk + j) * d + si * dc + e])
                        .sum()
                };
                match score {
                    BlockScore::UpperBound => (0..s)
                        .map(|si| {
                            keys.iter()
                                .map(|&j| part(j, si))
                                .fold(f64::NEG_INFINITY, f64::max)
                        })
                        .sum(),
                    BlockScore::Mean => {
                        keys.iter()
                            .map(|&j| (0..s).map(|si| part(j, si)).sum::<f64>())
                            .sum::<f64>()
                            / keys.len() as f64
                    }
                }
            };
            let picked: Vec<usize> = list[..n]
                .iter()
                .map(|&x| x as usize)
                .filter(|&x| !diag(x))
                .collect();
            let worst = picked.iter().map(|&x| sc(x)).fold(f64::INFINITY, f64::min);
            for &x in cands.iter().filter(|&&x| !diag(x) && !picked.contains(&x)) {
                let tol = 1e-4 * (1.0 + sc(x).abs());
                assert!(
                    sc(x) <= worst + tol,
                    "tile {t}: left out block {x} ({}) beats a kept one ({worst})",
                    sc(x)
                );
            }
        }
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences_f64() -> Result<()> {
    let (b, h, l, d, dv) = (2, 2, 11, 4, 3);
    for kind in 0..4 {
        for (qt, kb, top) in [(3usize, 2usize, 2usize), (4, 4, 1), (2, 5, 2), (11, 3, 4)] {
            let seed = 100 + 10 * kind as u64 + qt as u64;
            let mask = mask_of(kind, b, l, seed)?;
            let t = fit_tiling(qt, kb, top, l, l, mask.causal);
            let q = uniform(&[b, h, l, d], 1.5, seed, DType::F64)?;
            let k = uniform(&[b, h, l, d], 1.5, seed + 1, DType::F64)?;
            let v = uniform(&[b, h, l, dv], 1.0, seed + 2, DType::F64)?;
            let sel = blocks_of(&q, &k, t, &mask, BlockScore::default(), seed)?;
            let cfg = GradCheck {
                seed,
                ..Default::default()
            };
            check_gradients(
                |x| block_sparse_attention(&x[0], &x[1], &x[2], &sel, 0.5),
                &[q, k, v],
                &[0, 1, 2],
                cfg,
            )
            .map_err(|e| candle_core::Error::Msg(format!("mask #{kind}, tiling {t:?}: {e}")))?;
        }
    }
    Ok(())
}

/// Forward and all three gradients of the op against `want`, in f32.
#[allow(clippy::too_many_arguments)]
fn check_case(
    b: usize,
    h: usize,
    l: usize,
    d: usize,
    qt: usize,
    kb: usize,
    top: Option<usize>,
    kind: usize,
    seed: u64,
) -> Result<()> {
    let dt = DType::F32;
    let q = uniform(&[b, h, l, d], 1.0, seed, dt)?;
    let k = uniform(&[b, h, l, d], 1.0, seed + 1, dt)?;
    let v = uniform(&[b, h, l, d + 1], 1.0, seed + 2, dt)?;
    let w = uniform(&[b, h, l, d + 1], 1.0, seed + 3, dt)?;
    let mask = mask_of(kind, b, l, seed)?;
    let scale = 1.0 / (d as f64).sqrt();
    let score = if seed.is_multiple_of(2) {
        BlockScore::UpperBound
    } else {
        BlockScore::Mean
    };
    // top = None keeps every block: the op must equal dense masked attention.
    let t = fit_tiling(qt, kb, top.unwrap_or(l.div_ceil(kb)), l, l, mask.causal);
    let s = 1 + (seed % 2) as usize;
    let (q, k) = if d.is_multiple_of(s) {
        (q, k)
    } else {
        (q.pad_with_zeros(3, 0, 1)?, k.pad_with_zeros(3, 0, 1)?)
    };
    let cb = codebook(&k, s, 1 + (seed % 8) as usize, seed)?;
    let codes = cb.encode(&k)?;
    let sel = select_blocks(&q, &codes, &cb, t, &mask, score)?;
    check_selection(&q, &codes, &cb, &sel, &mask, score)?;
    let (o, g) = fwd_bwd(
        |q, k, v| block_sparse_attention(q, k, v, &sel, scale),
        &q,
        &k,
        &v,
        &w,
    )?;
    let (ow, gw) = match top {
        None => fwd_bwd(|q, k, v| dense_attention(q, k, v, &mask, scale), &q, &k, &v, &w)?,
        Some(_) => fwd_bwd(
            |q, k, v| block_sparse_attention_reference(q, k, v, &sel, scale),
            &q,
            &k,
            &v,
            &w,
        )?,
    };
    let tol = 1e-5;
    let ctx = format!("B={b} H={h} L={l} d={d} {t:?} mask #{kind} all={}", top.is_none());
    for (name, a, bb) in [
        ("o", &o, &ow),
        ("dq", &g[0], &gw[0]),
        ("dk", &g[1], &gw[1]),
        ("dv", &g[2], &gw[2]),
    ] {
        let e = max_diff(a, bb)?;
        assert!(e < tol, "{name}: max |Δ| = {e} ({ctx})");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_block_selection_equals_masked_reference(
        b in 1usize..3, h in 1usize..3, l in 1usize..40, d in 1usize..9, qt in 1usize..9, kb in 1usize..9,
        top in 1usize..6, mask in 0usize..4, seed in 0u64..1_000_000,
    ) {
        check_case(b, h, l, d, qt, kb, Some(top), mask, seed).unwrap();
    }

    #[test]
    fn every_block_kept_equals_dense_attention(
        b in 1usize..3, h in 1usize..3, l in 1usize..40, d in 1usize..9, qt in 1usize..9, kb in 1usize..9,
        mask in 0usize..4, seed in 0u64..1_000_000,
    ) {
        check_case(b, h, l, d, qt, kb, None, mask, seed).unwrap();
    }
}

#[test]
fn awkward_lengths_match_the_reference() -> Result<()> {
    for (l, qt, kb, top, kind) in [
        (97usize, 16usize, 16usize, 3usize, 1usize),
        (130, 32, 16, 4, 3),
        (33, 8, 32, 1, 2),
        (100, 64, 64, 2, 1),
    ] {
        check_case(1, 2, l, 16, qt, kb, Some(top), kind, l as u64)?;
    }
    Ok(())
}

/// Output bits and gradient bits of one fwd+bwd.
fn bits(q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor, sel: &BlockSelection) -> Result<Vec<Vec<u32>>> {
    let (o, g) = fwd_bwd(|q, k, v| block_sparse_attention(q, k, v, sel, 0.125), q, k, v, w)?;
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
    let mask = AttentionMask::causal().with_key_padding(padding(b, l, 5, false)?);
    let cb = codebook(&k, 8, 16, 3)?;
    let sel = select_blocks(
        &q,
        &cb.encode(&k)?,
        &cb,
        tiling(32, 16, 5),
        &mask,
        BlockScore::default(),
    )?;
    let one = common::pool(1)?.install(|| bits(&q, &k, &v, &w, &sel))?;
    let two = common::pool(2)?.install(|| bits(&q, &k, &v, &w, &sel))?;
    let three = common::pool(3)?.install(|| bits(&q, &k, &v, &w, &sel))?;
    let again = bits(&q, &k, &v, &w, &sel)?;
    for (name, i) in [("o", 0), ("dq", 1), ("dk", 2), ("dv", 3)] {
        assert!(
            one[i] == two[i] && two[i] == three[i] && three[i] == again[i],
            "{name} differs across thread counts"
        );
    }
    // The selection too.
    let sel1 = common::pool(1)?.install(|| {
        select_blocks(
            &q,
            &cb.encode(&k)?,
            &cb,
            tiling(32, 16, 5),
            &mask,
            BlockScore::default(),
        )
    })?;
    assert_eq!(
        sel1.blocks.flatten_all()?.to_vec1::<u32>()?,
        sel.blocks.flatten_all()?.to_vec1::<u32>()?
    );
    Ok(())
}

#[test]
fn ties_go_to_the_lower_block_and_padding_blocks_are_never_kept() -> Result<()> {
    // Identical keys everywhere: every block scores the same, so the lowest indices win.
    let (l, d) = (16, 4);
    let q = uniform(&[1, 1, l, d], 1.0, 1, DType::F32)?;
    let k = uniform(&[1, 1, 1, d], 1.0, 2, DType::F32)?
        .broadcast_as((1, 1, l, d))?
        .contiguous()?;
    let cb = codebook(&k, 2, 2, 1)?;
    let codes = cb.encode(&k)?;
    let sel = select_blocks(
        &q,
        &codes,
        &cb,
        tiling(4, 4, 2),
        &AttentionMask::none(),
        BlockScore::UpperBound,
    )?;
    assert_eq!(
        sel.blocks.flatten_all()?.to_vec1::<u32>()?,
        [0, 1, 0, 1, 0, 1, 0, 1]
    );
    // Block 0 entirely padding: never kept, even where it would win the tie.
    let pad = Tensor::from_vec([vec![0u8; 4], vec![1u8; 12]].concat(), (1, l), &Device::Cpu)?;
    let m = AttentionMask::none().with_key_padding(pad);
    let sel = select_blocks(&q, &codes, &cb, tiling(4, 4, 2), &m, BlockScore::Mean)?;
    assert_eq!(
        sel.blocks.flatten_all()?.to_vec1::<u32>()?,
        [1, 2, 1, 2, 1, 2, 1, 2]
    );
    // Causal: tile t keeps its diagonal block t, never a later one.
    let sel = select_blocks(
        &q,
        &codes,
        &cb,
        tiling(4, 4, 2),
        &AttentionMask::causal(),
        BlockScore::UpperBound,
    )?;
    assert_eq!(
        sel.blocks.flatten_all()?.to_vec1::<u32>()?,
        [0, SENTINEL, 0, 1, 0, 2, 0, 3]
    );
    // No keys at all: one list entry per tile, padding (cuda_parity.rs checks the device's).
    let none = codes.narrow(2, 0, 0)?;
    let sel = select_blocks(
        &q,
        &none,
        &cb,
        tiling(4, 4, 2),
        &AttentionMask::none(),
        BlockScore::Mean,
    )?;
    assert_eq!(sel.blocks.dims(), [1, 1, 4, 1]);
    assert_eq!(sel.blocks.flatten_all()?.to_vec1::<u32>()?, [SENTINEL; 4]);
    assert_eq!(sel.counts.flatten_all()?.to_vec1::<u32>()?, [0; 4]);
    Ok(())
}

/// Scores up to ~±150 (scale 30), where exp overflows f32 unless each row's true maximum is
/// subtracted; 2 of 5 key blocks per tile (ragged last tile and block), against the f64
/// reference.
#[test]
fn peaked_scores_match_f64() -> Result<()> {
    let [q, k, v, w] = common::qkvw([1, 2, 70, 16], 51)?;
    let cb = codebook(&k, 2, 8, 1)?;
    let mask = AttentionMask::none();
    let sel = select_blocks(
        &q,
        &cb.encode(&k)?,
        &cb,
        tiling(16, 16, 2),
        &mask,
        BlockScore::default(),
    )?;
    common::matches_f64(
        "block_sparse_attention, scale 30",
        |q, k, v| block_sparse_attention(q, k, v, &sel, 30.0),
        |q, k, v| block_sparse_attention_reference(q, k, v, &sel, 30.0),
        [&q, &k, &v, &w],
        1e-4,
    )
}

#[test]
fn pq_attention_dispatches_both_modes() -> Result<()> {
    let (b, h, l, d) = (1, 2, 40, 8);
    let q = uniform(&[b, h, l, d], 1.0, 1, DType::F32)?;
    let k = uniform(&[b, h, l, d], 1.0, 2, DType::F32)?;
    let v = uniform(&[b, h, l, d], 1.0, 3, DType::F32)?;
    let cb = codebook(&k, 2, 8, 1)?;
    let mask = AttentionMask::causal();
    let all = Selection::Blocks(tiling(8, 8, 5));
    let dense = dense_attention(&q, &k, &v, &mask, 0.3)?;
    assert!(max_diff(&pq_attention(&q, &k, &v, &cb, all, &mask, 0.3)?, &dense)? < 1e-5);
    let per_query = Selection::PerQuery { k: KeyTopK::Count(l) };
    assert!(max_diff(&pq_attention(&q, &k, &v, &cb, per_query, &mask, 0.3)?, &dense)? < 1e-5);
    // Keeping part of the keys, each mode is its own selection and kernel (the two differ).
    let codes = cb.encode(&k)?;
    let two = tiling(8, 8, 2);
    let sel = select_blocks(&q, &codes, &cb, two, &mask, BlockScore::default())?;
    let blocks = pq_attention(&q, &k, &v, &cb, Selection::Blocks(two), &mask, 0.3)?;
    assert_eq!(
        max_diff(&blocks, &block_sparse_attention(&q, &k, &v, &sel, 0.3)?)?,
        0.0
    );
    let eight = KeyTopK::Count(8);
    let sel = select_keys(&q, &codes, &cb, eight, &mask)?;
    let keys = pq_attention(&q, &k, &v, &cb, Selection::PerQuery { k: eight }, &mask, 0.3)?;
    assert_eq!(max_diff(&keys, &sparse_attention(&q, &k, &v, &sel, 0.3)?)?, 0.0);
    assert!(max_diff(&blocks, &keys)? > 1e-3 && max_diff(&blocks, &dense)? > 1e-3);
    Ok(())
}

#[test]
fn bad_input_gives_named_errors() -> Result<()> {
    let dt = DType::F32;
    let q = uniform(&[1, 2, 8, 4], 1.0, 1, dt)?;
    let k = uniform(&[1, 2, 8, 4], 1.0, 2, dt)?;
    let v = uniform(&[1, 2, 8, 4], 1.0, 3, dt)?;
    let cb = codebook(&k, 1, 4, 1)?;
    let codes = cb.encode(&k)?;
    let none = AttentionMask::none();
    let e = select_blocks(&q, &codes, &cb, tiling(0, 2, 1), &none, BlockScore::Mean)
        .unwrap_err()
        .to_string();
    assert!(e.contains("select_blocks") && e.contains("≥ 1"), "{e}");
    let e = select_blocks(
        &q,
        &codes,
        &cb,
        tiling(4, 2, 1),
        &AttentionMask::causal(),
        BlockScore::Mean,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("diagonal") && e.contains("top_blocks = 1"), "{e}");
    let sel = select_blocks(&q, &codes, &cb, tiling(4, 2, 2), &none, BlockScore::Mean)?;
    let err = |r: Result<Tensor>| r.expect_err("expected an error").to_string();
    let e = err(block_sparse_attention(
        &q,
        &uniform(&[1, 2, 8, 5], 1.0, 2, dt)?,
        &v,
        &sel,
        1.0,
    ));
    assert!(
        e.contains("block_sparse_attention") && e.contains("[1, 2, 8, 5]"),
        "{e}"
    );
    let qt = uniform(&[1, 2, 4, 8], 1.0, 1, dt)?.transpose(2, 3)?;
    let e = err(block_sparse_attention(&qt, &k, &v, &sel, 1.0));
    assert!(e.contains("not contiguous"), "{e}");
    let wrong = BlockSelection {
        blocks: (sel.blocks.clone() + 4.0)?,
        ..sel.clone()
    };
    let e = err(block_sparse_attention(&q, &k, &v, &wrong, 1.0));
    assert!(e.contains("key block") && e.contains("4 blocks"), "{e}");
    let short = BlockSelection {
        blocks: sel.blocks.narrow(2, 0, 1)?,
        ..sel.clone()
    };
    let e = err(block_sparse_attention(&q, &k, &v, &short, 1.0));
    assert!(
        e.contains("selection blocks") && e.contains("[1, 2, 1, 2]"),
        "{e}"
    );
    Ok(())
}

#[test]
fn cross_attention_lengths_match_the_reference() -> Result<()> {
    // L_q ≠ L_k (both ragged against the tiles), with and without causality and padding.
    for (lq, lk) in [(13usize, 29usize), (29, 13)] {
        for kind in 0..4 {
            let seed = (lq * 100 + lk + kind) as u64;
            let q = uniform(&[2, 2, lq, 8], 1.0, seed, DType::F32)?;
            let k = uniform(&[2, 2, lk, 8], 1.0, seed + 1, DType::F32)?;
            let v = uniform(&[2, 2, lk, 5], 1.0, seed + 2, DType::F32)?;
            let w = uniform(&[2, 2, lq, 5], 1.0, seed + 3, DType::F32)?;
            let mask = mask_of(kind, 2, lk, seed)?;
            let t = fit_tiling(4, 3, 3, lq, lk, mask.causal);
            let cb = codebook(&k, 2, 8, seed)?;
            let codes = cb.encode(&k)?;
            let sel = select_blocks(&q, &codes, &cb, t, &mask, BlockScore::default())?;
            check_selection(&q, &codes, &cb, &sel, &mask, BlockScore::default())?;
            let (o, g) = fwd_bwd(
                |q, k, v| block_sparse_attention(q, k, v, &sel, 0.4),
                &q,
                &k,
                &v,
                &w,
            )?;
            let (ow, gw) = fwd_bwd(
                |q, k, v| block_sparse_attention_reference(q, k, v, &sel, 0.4),
                &q,
                &k,
                &v,
                &w,
            )?;
            for (name, a, bb) in [
                ("o", &o, &ow),
                ("dq", &g[0], &gw[0]),
                ("dk", &g[1], &gw[1]),
                ("dv", &g[2], &gw[2]),
            ] {
                let e = max_diff(a, bb)?;
                assert!(
                    e < 1e-5,
                    "{name}: max |Δ| = {e} (L_q {lq}, L_k {lk}, mask #{kind})"
                );
            }
        }
    }
    Ok(())
}

/// Topic segments (like several documents packed into one row): queries and keys of a segment
/// share a random topic vector, plus noise. `[1, H, L, d]` each.
fn segments(h: usize, l: usize, d: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let noise = |s: u64| uniform(&[1, h, l, d], 1.0, s, DType::F32);
    let mut topic = vec![0f32; h * l * d];
    let t = uniform(&[h, l, d], 1.5, seed, DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for hi in 0..h {
        let mut start = 0;
        for i in 0..l {
            // Segment boundaries every 24-40 positions, varying by head.
            if i >= start + 24 + (7 * hi + 13 * (start / 24)) % 17 {
                start = i;
            }
            let src = (hi * l + start) * d;
            topic[(hi * l + i) * d..(hi * l + i + 1) * d].copy_from_slice(&t[src..src + d]);
        }
    }
    let topic = Tensor::from_vec(topic, (1, h, l, d), &Device::Cpu)?;
    Ok(((&topic + noise(seed + 1)?)?, (&topic + noise(seed + 2)?)?))
}

#[test]
fn both_block_scores_find_the_blocks_that_hold_the_attention_mass() -> Result<()> {
    use spt_ops::block_sparse_attention::reference::{block_keep_mask, captured_mass};
    // Strongly segmented data with the default PQ shape (d = 64, S = 8, C = 16), L = 256, 64 keys
    // per query: a quarter of the blocks chosen blindly would keep about 0.25 without a mask.
    // Here the upper bound keeps slightly more than the mean (0.930 vs 0.928, 0.959 vs 0.947 at
    // tiles of 16; 0.882 vs 0.900, 0.945 vs 0.911 at 32), as in the "peaky" rows of
    // examples/block_fidelity.rs; the mean wins the less peaked data there (see pq/blocks.rs).
    let (h, l, d) = (2, 256, 64);
    let (q, k) = segments(h, l, d, 11)?;
    let cb = codebook(&k, 8, 16, 1)?;
    let codes = cb.encode(&k)?;
    let scale = 1.0 / (d as f64).sqrt();
    for tile in [16, 32] {
        for mask in [AttentionMask::none(), AttentionMask::causal()] {
            for score in [BlockScore::Mean, BlockScore::UpperBound] {
                let sel = select_blocks(&q, &codes, &cb, tiling(tile, tile, 64 / tile), &mask, score)?;
                let kept = captured_mass(&q, &k, &mask, scale, &block_keep_mask(&sel, 1, h, l, l)?)?;
                assert!(
                    kept > 0.85,
                    "tile {tile}, causal {}, {score:?}: kept {kept:.3}",
                    mask.causal
                );
            }
        }
    }
    Ok(())
}
