//! PQ codebooks and ADC key selection: determinism, encode/decode, refresh, selection against
//! brute force, selection invariants, quality on clustered data, and bad input.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{padding, uniform};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_ops::pq::reference::{adc_scores, select_keys_brute_force};
use spt_ops::pq::SENTINEL;
use spt_ops::{select_keys, AttentionMask, Codebook, KeyTopK, PqConfig, Refresh};

fn cfg(s: usize, c: usize, seed: u64) -> PqConfig {
    PqConfig {
        n_subspaces: s,
        n_codewords: c,
        kmeans_iters: 10,
        seed,
        ..Default::default()
    }
}

#[test]
fn fit_is_deterministic_under_a_seed() -> Result<()> {
    let k = uniform(&[2, 3, 50, 8], 1.0, 1, DType::F32)?;
    let a = Codebook::fit(&k, &cfg(4, 8, 7))?.to_tensor(&Device::Cpu)?;
    let b = Codebook::fit(&k, &cfg(4, 8, 7))?.to_tensor(&Device::Cpu)?;
    let c = Codebook::fit(&k, &cfg(4, 8, 8))?.to_tensor(&Device::Cpu)?;
    assert_eq!(a.dims(), [1, 4, 8, 2]);
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?
    );
    assert_ne!(
        a.flatten_all()?.to_vec1::<f32>()?,
        c.flatten_all()?.to_vec1::<f32>()?
    );
    let per_head = Codebook::fit(
        &k,
        &PqConfig {
            per_head: true,
            ..cfg(4, 8, 7)
        },
    )?;
    assert_eq!(per_head.to_tensor(&Device::Cpu)?.dims(), [3, 4, 8, 2]);
    Ok(())
}

#[test]
fn encode_picks_the_nearest_codeword_and_kmeans_beats_random_codewords() -> Result<()> {
    let k = uniform(&[1, 2, 200, 8], 1.0, 3, DType::F32)?;
    let cb = Codebook::fit(&k, &cfg(2, 16, 1))?;
    let codes = cb.encode(&k)?;
    assert_eq!(
        (codes.dims(), codes.dtype()),
        ([1, 2, 200, 2].as_slice(), DType::U8)
    );
    // Brute force: every code is an argmin of the subspace distance.
    let cen = cb.to_tensor(&Device::Cpu)?.to_vec3::<f32>().ok();
    assert!(cen.is_none(), "rank-4 tensor");
    let cen = cb.to_tensor(&Device::Cpu)?.squeeze(0)?.to_vec3::<f32>()?;
    let kv = k.flatten_all()?.to_vec1::<f32>()?;
    let cv = codes.flatten_all()?.to_vec1::<u8>()?;
    for row in 0..400 {
        for s in 0..2 {
            let x = &kv[row * 8 + s * 4..row * 8 + s * 4 + 4];
            let d = |c: usize| {
                x.iter()
                    .zip(&cen[s][c])
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
            };
            let best = (0..16).map(d).fold(f32::INFINITY, f32::min);
            assert_eq!(d(cv[row * 2 + s] as usize), best);
        }
    }
    // k-means reconstruction error is below that of codewords drawn as random keys.
    let fitted = cb.quantization_loss(&k, false)?.to_scalar::<f32>()?;
    let rand_cb = Codebook::fit(
        &k,
        &PqConfig {
            kmeans_iters: 0,
            ..cfg(2, 16, 1)
        },
    )?;
    let seeded_only = rand_cb.quantization_loss(&k, false)?.to_scalar::<f32>()?;
    assert!(
        fitted < seeded_only,
        "k-means {fitted} vs k-means++ seeds {seeded_only}"
    );
    Ok(())
}

#[test]
fn refresh_moves_codewords_toward_new_keys() -> Result<()> {
    let k = uniform(&[1, 1, 100, 4], 1.0, 1, DType::F32)?;
    let shifted = (&k + 3.0)?;
    for rule in [Refresh::Ema { decay: 0.5 }, Refresh::MiniBatch] {
        let mut cb = Codebook::fit(&k, &cfg(2, 4, 1))?;
        let before = cb.quantization_loss(&shifted, false)?.to_scalar::<f32>()?;
        for _ in 0..5 {
            cb.refresh(&shifted, rule)?;
        }
        let after = cb.quantization_loss(&shifted, false)?.to_scalar::<f32>()?;
        assert!(after < 0.5 * before, "{rule:?}: {before} -> {after}");
    }
    let mut cb = Codebook::fit(&k, &cfg(2, 4, 1))?;
    assert!(cb.refresh(&k, Refresh::Ema { decay: 1.5 }).is_err());
    Ok(())
}

/// Mini-batch k-means continues from the fit: each codeword's count starts at its cluster's
/// size (the keys that encode to it), so the first refresh moves a codeword to the mean of its
/// fitted and new keys, `(n₀·c + Σ new)/(n₀ + n)`, not all the way to the new keys' mean. The
/// counts round-trip (`counts_tensor` / `set_counts`), so a codebook restored with them
/// refreshes exactly as the original; restored without them it does not.
#[test]
fn minibatch_refresh_continues_from_the_fit_and_its_saved_counts() -> Result<()> {
    let (h, l, s, c) = (2, 64, 2, 4);
    let keys = |seed| uniform(&[1, h, l, 8], 1.0, seed, DType::F32);
    let (k0, k1, k2) = (keys(1)?, keys(2)?, (keys(3)? + 0.5)?);
    let config = PqConfig {
        kmeans_iters: 50,
        ..cfg(s, c, 1)
    };
    let mut a = Codebook::fit(&k0, &config)?;
    let dc = a.d_codeword();
    let codes_of =
        |cb: &Codebook, k: &Tensor| -> Result<Vec<u8>> { cb.encode(k)?.flatten_all()?.to_vec1::<u8>() };
    // The counts are the fit's cluster sizes: a histogram of the fitted keys' codes.
    let counts = a.counts_tensor(&Device::Cpu)?;
    assert_eq!(counts.dims(), [1, s, c]);
    let counts = counts.flatten_all()?.to_vec1::<f32>()?;
    let mut hist = vec![0f32; s * c];
    for (i, &code) in codes_of(&a, &k0)?.iter().enumerate() {
        hist[(i % s) * c + code as usize] += 1.0;
    }
    assert_eq!(counts, hist);
    // The first refresh: each codeword at the running mean of its fitted and new keys.
    let before = a.to_tensor(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let (new, codes) = (k1.flatten_all()?.to_vec1::<f32>()?, codes_of(&a, &k1)?);
    let (mut sums, mut n) = (vec![0f64; s * c * dc], vec![0f64; s * c]);
    for (i, &code) in codes.iter().enumerate() {
        let (row, si) = (i / s, i % s);
        let slot = si * c + code as usize;
        n[slot] += 1.0;
        for t in 0..dc {
            sums[slot * dc + t] += new[row * s * dc + si * dc + t] as f64;
        }
    }
    a.refresh(&k1, Refresh::MiniBatch)?;
    let after = a.to_tensor(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let mut moved = 0;
    for slot in 0..s * c {
        let n0 = counts[slot] as f64;
        for t in 0..dc {
            let i = slot * dc + t;
            // A codeword with no fitted and no new keys stays where it is.
            let want = if n0 + n[slot] == 0.0 {
                before[i] as f64
            } else {
                (n0 * before[i] as f64 + sums[i]) / (n0 + n[slot])
            };
            assert!(
                (after[i] as f64 - want).abs() < 1e-5,
                "slot {slot}: {} vs {want}",
                after[i]
            );
            moved += usize::from(n[slot] > 0.0 && n0 > 0.0);
        }
    }
    assert!(moved > 0, "no codeword had both fitted and new keys");
    // Restored with its counts, a codebook refreshes as the original; without, it does not.
    let centroids = a.to_tensor(&Device::Cpu)?;
    let mut restored = Codebook::from_tensor(&centroids)?;
    restored.set_counts(&a.counts_tensor(&Device::Cpu)?)?;
    let mut countless = Codebook::from_tensor(&centroids)?;
    for cb in [&mut a, &mut restored, &mut countless] {
        cb.refresh(&k2, Refresh::MiniBatch)?;
    }
    let t = |cb: &Codebook| cb.to_tensor(&Device::Cpu);
    assert_eq!(spt_ops::gradcheck::max_abs_diff(&t(&a)?, &t(&restored)?)?, 0.0);
    assert!(spt_ops::gradcheck::max_abs_diff(&t(&a)?, &t(&countless)?)? > 1e-3);
    // Counts of another shape, negative or non-finite ones are refused by name.
    let mut cb = Codebook::from_tensor(&centroids)?;
    for (bad, says) in [
        (
            Tensor::zeros((1, s, c + 1), DType::F32, &Device::Cpu)?,
            "expected [G, S, C]",
        ),
        (Tensor::full(-1f32, (1, s, c), &Device::Cpu)?, "≥ 0"),
        (Tensor::full(f32::NAN, (1, s, c), &Device::Cpu)?, "non-finite"),
    ] {
        let e = cb.set_counts(&bad).unwrap_err().to_string();
        assert!(e.contains("counts") && e.contains(says), "{e}");
    }
    Ok(())
}

#[test]
fn no_gradient_reaches_keys_unless_asked() -> Result<()> {
    let k = Var::from_tensor(&uniform(&[1, 1, 20, 4], 1.0, 1, DType::F32)?)?;
    let cb = Codebook::fit(k.as_tensor(), &cfg(2, 4, 1))?;
    let g = cb.quantization_loss(k.as_tensor(), false)?.backward()?;
    assert!(g.get(k.as_tensor()).is_none());
    let g = cb.quantization_loss(k.as_tensor(), true)?.backward()?;
    let gk = g.get(k.as_tensor()).expect("asked-for gradient");
    assert!(gk.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    // Selection itself never records a graph.
    let q = Var::from_tensor(&uniform(&[1, 1, 20, 4], 1.0, 2, DType::F32)?)?;
    let sel = select_keys(
        q.as_tensor(),
        &cb.encode(k.as_tensor())?,
        &cb,
        KeyTopK::Count(3),
        &AttentionMask::none(),
    )?;
    assert!(!sel.indices.track_op());
    Ok(())
}

/// Selection invariants: sorted, unique, allowed, count = min(k, allowed), sentinel padding.
fn check_invariants(
    sel: &spt_ops::KeySelection,
    mask: &AttentionMask,
    b: usize,
    h: usize,
    l: usize,
    k: usize,
) -> Result<()> {
    let idx = sel.indices.flatten_all()?.to_vec1::<u32>()?;
    let cnt = sel.counts.flatten_all()?.to_vec1::<u32>()?;
    let pad = match &mask.key_padding {
        Some(p) => p.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?,
        None => vec![1; b * l],
    };
    for r in 0..b * h * l {
        let (bi, i) = (r / (h * l), r % l);
        let allowed = (0..l)
            .filter(|&j| (!mask.causal || j <= i) && pad[bi * l + j] != 0)
            .count();
        let row = &idx[r * k..(r + 1) * k];
        let n = cnt[r] as usize;
        assert_eq!(n, allowed.min(k), "row {r}");
        assert!(
            row[..n].windows(2).all(|w| w[0] < w[1]),
            "row {r} not sorted/unique: {row:?}"
        );
        assert!(
            row[n..].iter().all(|&j| j == SENTINEL),
            "row {r} padding: {row:?}"
        );
        for &j in &row[..n] {
            let j = j as usize;
            assert!(
                (!mask.causal || j <= i) && pad[bi * l + j] != 0,
                "row {r} selected disallowed key {j}"
            );
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn selection_case(
    b: usize,
    h: usize,
    l: usize,
    s: usize,
    dc: usize,
    k: usize,
    mask_kind: usize,
    seed: u64,
) -> Result<()> {
    let d = s * dc;
    let q = uniform(&[b, h, l, d], 1.0, seed, DType::F32)?;
    let keys = uniform(&[b, h, l, d], 1.0, seed + 1, DType::F32)?;
    let cb = Codebook::fit(
        &keys,
        &PqConfig {
            per_head: seed.is_multiple_of(2),
            ..cfg(s, 1 + (seed % 16) as usize, seed)
        },
    )?;
    let codes = cb.encode(&keys)?;
    let mut mask = AttentionMask {
        causal: mask_kind & 1 == 1,
        key_padding: None,
    };
    if mask_kind & 2 == 2 {
        mask = mask.with_key_padding(padding(b, l, seed, true)?);
    }
    let k = k.min(l);
    let ours = select_keys(&q, &codes, &cb, KeyTopK::Count(k), &mask)?;
    let brute = select_keys_brute_force(&q, &codes, &cb, KeyTopK::Count(k), &mask)?;
    check_invariants(&ours, &mask, b, h, l, k)?;
    assert_eq!(
        ours.counts.flatten_all()?.to_vec1::<u32>()?,
        brute.counts.flatten_all()?.to_vec1::<u32>()?
    );
    // Same sets, except where f32 vs f64 scoring flips a near-tie at the threshold.
    let scores = adc_scores(&q, &codes, &cb)?.flatten_all()?.to_vec1::<f64>()?;
    let (a, bb) = (
        ours.indices.flatten_all()?.to_vec1::<u32>()?,
        brute.indices.flatten_all()?.to_vec1::<u32>()?,
    );
    for r in 0..b * h * l {
        let (ra, rb) = (&a[r * k..(r + 1) * k], &bb[r * k..(r + 1) * k]);
        if ra != rb {
            let sc = |j: u32| scores[r * l + j as usize];
            let only_a: Vec<f64> = ra.iter().filter(|j| !rb.contains(j)).map(|&j| sc(j)).collect();
            let only_b: Vec<f64> = rb.iter().filter(|j| !ra.contains(j)).map(|&j| sc(j)).collect();
            for (x, y) in only_a.iter().zip(&only_b) {
                assert!((x - y).abs() < 1e-5, "row {r}: ours {ra:?} vs brute force {rb:?}");
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn selection_equals_brute_force_adc_top_k(
        b in 1usize..3, h in 1usize..3, l in 1usize..40, s in 1usize..4, dc in 1usize..4, k in 1usize..40,
        mask in 0usize..4, seed in 0u64..1_000_000,
    ) {
        // k below L in all but the L = 1 cases (k ≥ L keeps every allowed key: no choice).
        let k = if l > 1 { 1 + k % (l - 1) } else { 1 };
        selection_case(b, h, l, s, dc, k, mask, seed).unwrap();
    }
}

/// Rows of 128 keys or more take the sampled threshold (`select.rs`' SAMPLE_MIN_ROW), which the
/// property test's shorter rows never reach.
#[test]
fn long_rows_equal_brute_force_adc_top_k() -> Result<()> {
    for (i, k) in [1usize, 10, 50, 199].into_iter().enumerate() {
        for mask in 0..4 {
            selection_case(1, 2, 200, 2, 4, k, mask, 70 + 4 * i as u64 + mask as u64)?;
        }
    }
    Ok(())
}

#[test]
fn ties_break_toward_lower_key_index() -> Result<()> {
    // All keys identical: every score ties, so the first k allowed keys win.
    let keys = Tensor::ones((1, 1, 10, 4), DType::F32, &Device::Cpu)?;
    let q = uniform(&[1, 1, 10, 4], 1.0, 1, DType::F32)?;
    let cb = Codebook::fit(&keys, &cfg(2, 2, 1))?;
    let sel = select_keys(
        &q,
        &cb.encode(&keys)?,
        &cb,
        KeyTopK::Count(3),
        &AttentionMask::none(),
    )?;
    for row in sel.indices.squeeze(0)?.squeeze(0)?.to_vec2::<u32>()? {
        assert_eq!(row, [0, 1, 2]);
    }
    Ok(())
}

#[test]
fn k_as_fraction() -> Result<()> {
    assert_eq!(KeyTopK::Fraction(0.125).resolve(2048)?, 256);
    assert_eq!(KeyTopK::Fraction(0.1).resolve(5)?, 1);
    assert_eq!(KeyTopK::Fraction(1.0).resolve(7)?, 7);
    assert!(KeyTopK::Fraction(0.0).resolve(7).is_err());
    assert!(KeyTopK::Fraction(1.5).resolve(7).is_err());
    Ok(())
}

/// Clustered q and k: 16 cluster centres, points = centre + noise, queries and keys drawn from
/// the same clusters. At k = L/8 the PQ-selected keys must hold ≥ 90% of the softmax mass that
/// the exact top-k keys hold, averaged over rows.
#[test]
fn selection_quality_on_clustered_data() -> Result<()> {
    let (h, l, d, n_clusters) = (4usize, 512usize, 64usize, 16usize);
    let mut rng = StdRng::seed_from_u64(42);
    let mut gauss = || {
        let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random_range(0.0..1.0));
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    };
    let centres: Vec<f32> = (0..h * n_clusters * d).map(|_| gauss()).collect();
    let mut draw = |noise: f32, pick: &mut StdRng| -> Vec<f32> {
        let mut v = Vec::with_capacity(h * l * d);
        for hi in 0..h {
            for _ in 0..l {
                let c = pick.random_range(0..n_clusters);
                for t in 0..d {
                    v.push(centres[(hi * n_clusters + c) * d + t] + noise * gauss());
                }
            }
        }
        v
    };
    let mut pick = StdRng::seed_from_u64(7);
    let q = Tensor::from_vec(draw(0.3, &mut pick), (1, h, l, d), &Device::Cpu)?;
    let k = Tensor::from_vec(draw(0.3, &mut pick), (1, h, l, d), &Device::Cpu)?;
    let scale = 1.0 / (d as f64).sqrt();
    let topk = l / 8;
    let cb = Codebook::fit(
        &k,
        &PqConfig {
            n_subspaces: 8,
            n_codewords: 16,
            ..Default::default()
        },
    )?;
    let sel = select_keys(
        &q,
        &cb.encode(&k)?,
        &cb,
        KeyTopK::Count(topk),
        &AttentionMask::none(),
    )?;
    let p = spt_ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let idx = sel.indices.flatten_all()?.to_vec1::<u32>()?;
    let mut ratio = 0f64;
    for r in 0..h * l {
        let row = &p[r * l..(r + 1) * l];
        let got: f64 = idx[r * topk..(r + 1) * topk]
            .iter()
            .map(|&j| row[j as usize] as f64)
            .sum();
        let mut sorted: Vec<f32> = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let best: f64 = sorted[..topk].iter().map(|&x| x as f64).sum();
        ratio += got / best;
    }
    ratio /= (h * l) as f64;
    assert!(
        ratio >= 0.9,
        "PQ top-k keeps {:.3} of the exact top-k softmax mass",
        ratio
    );
    Ok(())
}

#[test]
fn bad_input_gives_named_errors() -> Result<()> {
    let keys = uniform(&[1, 2, 8, 4], 1.0, 1, DType::F32)?;
    let q = uniform(&[1, 2, 8, 4], 1.0, 2, DType::F32)?;
    let cb = Codebook::fit(&keys, &cfg(2, 4, 1))?;
    let codes = cb.encode(&keys)?;
    let none = AttentionMask::none();
    let msg = |r: Result<spt_ops::KeySelection>| r.expect_err("expected an error").to_string();
    let e = msg(select_keys(&q, &codes, &cb, KeyTopK::Count(0), &none));
    assert!(e.contains("k = 0"), "{e}");
    let e = msg(select_keys(&q, &codes, &cb, KeyTopK::Count(9), &none));
    assert!(e.contains("k = 9") && e.contains("L = 8"), "{e}");
    let e = msg(select_keys(
        &uniform(&[1, 2, 8, 6], 1.0, 2, DType::F32)?,
        &codes,
        &cb,
        KeyTopK::Count(2),
        &none,
    ));
    assert!(
        e.contains("select_keys") && e.contains("[1, 2, 8, 6]") && e.contains("codebook"),
        "{e}"
    );
    let e = msg(select_keys(
        &q,
        &codes.to_dtype(DType::U32)?,
        &cb,
        KeyTopK::Count(2),
        &none,
    ));
    assert!(e.contains("codes") && e.contains("U32"), "{e}");
    let bad_mask = AttentionMask::none().with_key_padding(Tensor::ones((1, 5), DType::U8, &Device::Cpu)?);
    let e = msg(select_keys(&q, &codes, &cb, KeyTopK::Count(2), &bad_mask));
    assert!(e.contains("key_padding") && e.contains("[1, 5]"), "{e}");
    // Wrong codebook shapes.
    let e = Codebook::from_tensor(&Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[2, 4]") && e.contains("[S, C, d_codeword]"), "{e}");
    let e = Codebook::from_tensor(&Tensor::zeros((2, 300, 2), DType::F32, &Device::Cpu)?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("C ≤ 256"), "{e}");
    let per_head3 = Codebook::from_tensor(&Tensor::zeros((3, 2, 4, 2), DType::F32, &Device::Cpu)?)?;
    let e = per_head3.encode(&keys).unwrap_err().to_string();
    assert!(e.contains("H = 2") && e.contains("3 per-head"), "{e}");
    let e = Codebook::fit(&keys, &cfg(3, 4, 1)).unwrap_err().to_string();
    assert!(e.contains("n_subspaces = 3") && e.contains("d = 4"), "{e}");
    Ok(())
}
