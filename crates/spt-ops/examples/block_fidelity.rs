//! Attention mass kept by each key selection at the same number of keys per query (k = L/8):
//! per-query ADC top-k, block mode with the upper-bound and the mean block score, and an oracle
//! that picks blocks by their true softmax mass (the ceiling of any tile-shared choice).
//!
//! Synthetic data only (no assets): "random" is iid Gaussian q and k; "structured" packs
//! segments (like several reviews in one row) whose queries and keys share a topic vector, plus
//! a smooth positional component (locality) and a sink key at position 0; "short" is the same
//! with segments of 8-47 tokens, about a key block long; "peaky" has short segments with strong
//! topics and little noise, so nearly all of a query's mass stays in its segment.
//!
//! Run: `cargo run --release -p spt-ops --example block_fidelity -- [L] [H]` (default 1024 4).

use candle_core::{DType, Device, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_ops::block_sparse_attention::reference::{block_keep_mask, captured_mass, key_keep_mask};
use spt_ops::pq::SENTINEL;
use spt_ops::{
    select_blocks, select_keys, AttentionMask, BlockScore, BlockSelection, BlockTiling, Codebook, KeyTopK,
    PqConfig,
};

fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// `(q, k)` `[1, H, L, d]` for the named data set.
fn data(kind: &str, h: usize, l: usize, d: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut q = vec![0f32; h * l * d];
    let mut k = vec![0f32; h * l * d];
    for hi in 0..h {
        let mut topic = vec![0f32; d];
        let mut left = 0usize;
        // A few random frequencies per head give nearby positions similar vectors.
        let freqs: Vec<(f32, f32)> = (0..d)
            .map(|_| (rng.random_range(0.0..0.2), rng.random_range(0.0..6.3)))
            .collect();
        let sink: Vec<f32> = (0..d).map(|_| normal(&mut rng)).collect();
        for i in 0..l {
            let (qi, ki) = (
                &mut q[(hi * l + i) * d..(hi * l + i + 1) * d],
                &mut k[(hi * l + i) * d..(hi * l + i + 1) * d],
            );
            if kind == "random" {
                for x in qi.iter_mut().chain(ki.iter_mut()) {
                    *x = normal(&mut rng);
                }
                continue;
            }
            if left == 0 {
                // "short" segments are about as long as a key block, so block means mix topics.
                left = if kind != "structured" {
                    rng.random_range(8..48)
                } else {
                    rng.random_range(16..160)
                };
                for t in topic.iter_mut() {
                    *t = normal(&mut rng);
                }
            }
            left -= 1;
            // "peaky": strong topics, little noise, so nearly all mass stays in the segment.
            let (a, noise) = if kind == "peaky" { (1.2, 0.2) } else { (0.6, 0.6) };
            for e in 0..d {
                let pos = (freqs[e].0 * i as f32 + freqs[e].1).sin();
                qi[e] = a * topic[e] + 0.5 * pos + 0.25 * sink[e] + noise * normal(&mut rng);
                ki[e] = a * topic[e] + 0.5 * pos + noise * normal(&mut rng);
                if i == 0 {
                    ki[e] = 1.5 * sink[e];
                }
            }
        }
    }
    let t = |v: Vec<f32>| Tensor::from_vec(v, (1, h, l, d), &Device::Cpu);
    Ok((t(q)?, t(k)?))
}

/// Blocks chosen by their true softmax mass summed over the tile (diagonal blocks forced).
fn oracle(
    q: &Tensor,
    k: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    tiling: BlockTiling,
) -> Result<BlockSelection> {
    let (_, h, l, _) = q.dims4()?;
    let (qt, kb) = (tiling.query_tile, tiling.key_block);
    let (nt, nb) = (l.div_ceil(qt), l.div_ceil(kb));
    let width = tiling.top_blocks.min(nb);
    let scores = (q.to_dtype(DType::F64)?.matmul(&k.to_dtype(DType::F64)?.t()?)? * scale)?;
    let s = scores.flatten_all()?.to_vec1::<f64>()?;
    let mut out = vec![SENTINEL; h * nt * width];
    for hi in 0..h {
        for t in 0..nt {
            let (t0, t1) = (t * qt, ((t + 1) * qt).min(l));
            let mut mass = vec![0f64; nb];
            for i in t0..t1 {
                let row = &s[(hi * l + i) * l..(hi * l + i + 1) * l];
                let end = if mask.causal { i + 1 } else { l };
                let max = row[..end].iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row[..end].iter().map(|x| (x - max).exp()).sum();
                for (j, x) in row[..end].iter().enumerate() {
                    mass[j / kb] += (x - max).exp() / z;
                }
            }
            let diag: Vec<usize> = if mask.causal {
                (t0 / kb..(t1 - 1) / kb + 1).collect()
            } else {
                vec![]
            };
            let mut order: Vec<usize> = (0..nb).filter(|&x| !diag.contains(&x) && mass[x] > 0.0).collect();
            order.sort_by(|&a, &b| mass[b].total_cmp(&mass[a]).then(a.cmp(&b)));
            let mut list: Vec<u32> = diag
                .iter()
                .chain(order.iter())
                .take(width)
                .map(|&x| x as u32)
                .collect();
            list.sort_unstable();
            out[(hi * nt + t) * width..(hi * nt + t) * width + list.len()].copy_from_slice(&list);
        }
    }
    Ok(BlockSelection {
        blocks: Tensor::from_vec(out, (1, h, nt, width), &Device::Cpu)?,
        counts: Tensor::zeros((1, h, nt), DType::U32, &Device::Cpu)?,
        tiling: BlockTiling {
            top_blocks: width,
            ..tiling
        },
        mask: mask.clone(),
    })
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (l, h, d) = (
        args.first().copied().unwrap_or(1024),
        args.get(1).copied().unwrap_or(4),
        64,
    );
    let k_per_query = l / 8;
    let scale = 1.0 / (d as f64).sqrt();
    println!("L = {l}, H = {h}, d = {d}, k = {k_per_query} keys per query; mean softmax mass kept per query");
    println!(
        "{:<11} {:<7} {:>6} {:>9} {:>11} {:>9} {:>8}",
        "data", "mask", "tile", "per-query", "upper-bound", "mean", "oracle"
    );
    for kind in ["random", "structured", "short", "peaky"] {
        let (q, k) = data(kind, h, l, d, 7)?;
        let cb = Codebook::fit(&k, &PqConfig::default())?;
        let codes = cb.encode(&k)?;
        for mask in [AttentionMask::none(), AttentionMask::causal()] {
            let per_query = select_keys(&q, &codes, &cb, KeyTopK::Count(k_per_query), &mask)?;
            let pq_mass = captured_mass(&q, &k, &mask, scale, &key_keep_mask(&per_query, l)?)?;
            for tile in [16usize, 32, 64] {
                let tiling = BlockTiling {
                    query_tile: tile,
                    key_block: tile,
                    top_blocks: k_per_query / tile,
                };
                let mass = |sel: &BlockSelection| {
                    captured_mass(&q, &k, &mask, scale, &block_keep_mask(sel, 1, h, l, l)?)
                };
                let ub = mass(&select_blocks(
                    &q,
                    &codes,
                    &cb,
                    tiling,
                    &mask,
                    BlockScore::UpperBound,
                )?)?;
                let mean = mass(&select_blocks(&q, &codes, &cb, tiling, &mask, BlockScore::Mean)?)?;
                let best = mass(&oracle(&q, &k, &mask, scale, tiling)?)?;
                let mname = if mask.causal { "causal" } else { "none" };
                println!("{kind:<11} {mname:<7} {tile:>6} {pq_mass:>9.3} {ub:>11.3} {mean:>9.3} {best:>8.3}");
            }
        }
    }
    Ok(())
}
