//! CUDA vs CPU parity for every spt op, forward and backward (f32).
//!
//! These tests need a GPU, so they are `#[ignore]`d: a plain `cargo test` lists them as ignored
//! (never a silent pass). `scripts/gpu-check.sh` runs them on the GPU machine with
//! `--include-ignored`; there a missing GPU is a failure, not a skip.
//!
//! Tolerances (f32 on both sides; the CUDA kernels reduce in a different order than the CPU's
//! SIMD/rayon code, so results differ by rounding only):
//! - values of order 1 (outputs, dx, dq): |cuda − cpu| ≤ 1e-4 · (1 + |cpu|);
//! - sums over many rows (dgamma, dbeta, dk, dv): the same 1e-4 relative bound.
//! - bf16 kernels: the inputs are rounded to bf16 first, the CPU op runs in f32 on those values,
//!   and |cuda − cpu| ≤ 3e-2 · (1 + |cpu|) and ≤ 2e-2 · max |cpu| over the tensor. bf16 keeps 8
//!   significant bits, so every stored bf16 value is off by up to 2⁻⁹ ≈ 2e-3 relative; a kernel
//!   rounds once per output, and a composed op (the routed FFN: GEMM, bias, activation, gate,
//!   GEMM, sum) rounds at each of its steps. The first bound alone is absolute for small values:
//!   attention's dq and dk are ~1e-2 here, so it passed dq scaled by 0.6. The second is the
//!   tensor's scale: the tensor-core attention kernels, run under emulation
//!   (`kernels/emu/flash_emu_test.cpp`), come within 0.58 % of max |ref| on its normal inputs
//!   and 0.42 % with them drawn uniform in [−1, 1] as here (a one-off variant), while the same
//!   kernels without the backward's `delta = rowsum(dO ∘ O)` term miss by 6.3 % or more in
//!   every dq and dk (by 3e-3 or less in some: inside the first bound).
//!   PQ codes and selections on bf16-exact data must still match exactly.
//! - Integer outputs (PQ codes, selected indices, counts) must match exactly. ADC selection is
//!   compared on integer-valued queries and codewords, where every summation order is exact, so
//!   ties (and their break to the lower index) are exercised; on random float data the scores can
//!   differ in the last bit, so there the test only requires ≥ 99% identical rows.

#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{padding, uniform};
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_ops::gradcheck::max_abs_diff;
use spt_ops::pq::SENTINEL;
use spt_ops::{
    block_sparse_attention, flash_attention, layer_norm, select_blocks, select_keys, softmax_last_dim,
    sparse_attention, Activation, AttentionMask, BlockScore, BlockSelection, BlockTiling, Codebook,
    KeySelection, KeyTopK, PqConfig,
};
use std::sync::OnceLock;

/// How far a CUDA result may be from the CPU's: |cuda − cpu| ≤ `elem`·(1 + |cpu|) and
/// ≤ `of_max`·max |cpu| over the tensor (see the module doc).
#[derive(Clone, Copy)]
struct Tol {
    elem: f64,
    of_max: f64,
}

const TOL: Tol = Tol {
    elem: 1e-4,
    of_max: f64::INFINITY,
};
const BF16_TOL: Tol = Tol {
    elem: 3e-2,
    of_max: 2e-2,
};
/// The scale `of_max` is taken of is at least this: a tensor that is all zeros up to rounding
/// (layer norm's dx at d = 1) is not held to exact zeros.
const SCALE_FLOOR: f64 = 1e-3;

/// One device for the whole process: each `Device::new_cuda` is a device of its own to candle
/// (its own id, cuBLAS handle and loaded kernels), so a routing built on one call's device
/// would be refused on another's, and every call would load the kernels again.
fn gpu() -> Result<Device> {
    static GPU: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    GPU.get_or_init(|| Device::new_cuda(0).map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| {
            candle_core::Error::Msg(format!(
                "no CUDA device 0 ({e}); these tests need a GPU: run scripts/gpu-check.sh"
            ))
        })
}

/// `t` rounded to bf16, back in f32 (exactly representable in both).
fn bf16_exact(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
}

/// Asserts `tol` elementwise (NaN on either side fails); reports the worst index and values.
fn close_tol(what: &str, got: &Tensor, want: &Tensor, tol: Tol) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()
    };
    let (g, w) = (host(got)?, host(want)?);
    let scale = w
        .iter()
        .filter(|b| b.is_finite())
        .fold(SCALE_FLOOR, |m, b| m.max(b.abs()));
    // Each element's error over its allowance: above 1 fails.
    let mut worst = (0.0f64, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let allowed = (tol.elem * (1.0 + b.abs())).min(tol.of_max * scale);
        let excess = (a - b).abs() / allowed;
        if excess.is_nan() || excess > worst.0 {
            worst = (if excess.is_nan() { f64::INFINITY } else { excess }, i);
        }
    }
    let i = worst.1;
    let (a, b) = (
        g.get(i).copied().unwrap_or(f64::NAN),
        w.get(i).copied().unwrap_or(f64::NAN),
    );
    assert!(
        worst.0 <= 1.0,
        "{what} {:?}: |cuda − cpu| = {:.3e} at flat index {i} (cuda {a}, cpu {b}) is {:.2}× its \
         allowance (≤ {:.0e}·(1 + |cpu|) and ≤ {:.0e}·max |cpu|, max |cpu| {scale:.3e})",
        want.dims(),
        (a - b).abs(),
        worst.0,
        tol.elem,
        tol.of_max,
    );
    eprintln!(
        "{what} {:?}: worst error {:.2} of its allowance, {:.2e} of max |cpu|",
        want.dims(),
        worst.0,
        (a - b).abs() / scale
    );
    Ok(())
}

fn same_u32(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    let g = got.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u32>()?;
    let w = want.flatten_all()?.to_vec1::<u32>()?;
    let bad = g.iter().zip(&w).position(|(a, b)| a != b);
    assert!(
        bad.is_none(),
        "{what}: first mismatch at flat index {bad:?}: cuda {:?} cpu {:?}",
        bad.map(|i| g[i]),
        bad.map(|i| w[i])
    );
    Ok(())
}

/// Forward on `dev` of `f(inputs…)`, then gradients of Σ f ⊙ w for every input.
fn run(
    dev: &Device,
    inputs: &[&Tensor],
    w: &Tensor,
    f: &dyn Fn(&[&Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev)?))
        .collect::<Result<Vec<_>>>()?;
    let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let out = f(&ts)?;
    let grads = out.mul(&w.to_device(dev)?)?.sum_all()?.backward()?;
    let g = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .cloned()
                .expect("every input gets a gradient")
        })
        .collect();
    Ok((out, g))
}

fn parity(
    name: &str,
    inputs: &[&Tensor],
    out_shape: &[usize],
    f: &dyn Fn(&[&Tensor]) -> Result<Tensor>,
) -> Result<()> {
    parity_as(DType::F32, name, inputs, out_shape, f)
}

/// CUDA in `dtype` (f32 or bf16) against the CPU in f32, forward and every input's gradient;
/// for bf16 the inputs and the upstream gradient are bf16-exact on both sides.
fn parity_as(
    dtype: DType,
    name: &str,
    inputs: &[&Tensor],
    out_shape: &[usize],
    f: &dyn Fn(&[&Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let bf16 = dtype == DType::BF16;
    let prep = |t: &Tensor| if bf16 { bf16_exact(t) } else { Ok(t.clone()) };
    let xs = inputs.iter().map(|t| prep(t)).collect::<Result<Vec<_>>>()?;
    let w = prep(&uniform(out_shape, 1.0, 99, DType::F32)?)?;
    let refs: Vec<&Tensor> = xs.iter().collect();
    let (o_cpu, g_cpu) = run(&Device::Cpu, &refs, &w, f)?;
    let xg = xs.iter().map(|t| t.to_dtype(dtype)).collect::<Result<Vec<_>>>()?;
    let refs: Vec<&Tensor> = xg.iter().collect();
    let (o_gpu, g_gpu) = run(&gpu()?, &refs, &w.to_dtype(dtype)?, f)?;
    assert_eq!(
        o_gpu.dtype(),
        dtype,
        "{name}: the CUDA output has the wrong dtype"
    );
    let tol = if bf16 { BF16_TOL } else { TOL };
    let name = format!("{name} ({dtype:?})");
    close_tol(&format!("{name} forward"), &o_gpu, &o_cpu, tol)?;
    for (i, (a, b)) in g_gpu.iter().zip(&g_cpu).enumerate() {
        assert_eq!(a.dtype(), dtype, "{name}: grad of input {i} has the wrong dtype");
        close_tol(&format!("{name} grad of input {i}"), a, b, tol)?;
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn layer_norm_matches_cpu() -> Result<()> {
    for &(rows, d) in &[(7usize, 97usize), (300, 1024), (33, 1)] {
        let x = uniform(&[rows, d], 2.0, 1, DType::F32)?;
        let g = uniform(&[d], 1.0, 2, DType::F32)?.affine(1.0, 1.0)?;
        let b = uniform(&[d], 1.0, 3, DType::F32)?;
        for dt in [DType::F32, DType::BF16] {
            parity_as(
                dt,
                &format!("layer_norm [{rows}, {d}]"),
                &[&x, &g, &b],
                &[rows, d],
                &|t| layer_norm(t[0], t[1], t[2], 1e-5),
            )?;
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn softmax_matches_cpu() -> Result<()> {
    for &(rows, d) in &[(5usize, 97usize), (64, 4096), (3, 1)] {
        let x = uniform(&[rows, d], 8.0, 4, DType::F32)?;
        for dt in [DType::F32, DType::BF16] {
            parity_as(dt, &format!("softmax [{rows}, {d}]"), &[&x], &[rows, d], &|t| {
                softmax_last_dim(t[0])
            })?;
        }
    }
    Ok(())
}

/// `flash_attention` in f32 on CUDA runs its composed form (the tensor-core kernel is bf16): it
/// must match the CPU's fused kernel, masks and dropout included (the mask comes from the seed).
#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn flash_attention_matches_cpu() -> Result<()> {
    let (b, h, l, d) = (2, 3, 77, 16);
    let q = uniform(&[b, h, l, d], 1.0, 11, DType::F32)?;
    let k = uniform(&[b, h, l, d], 1.0, 12, DType::F32)?;
    let v = uniform(&[b, h, l, d], 1.0, 13, DType::F32)?;
    for (mi, m) in masks(b, l, 14)?.into_iter().enumerate() {
        for p in [0.0, 0.2] {
            let drop = Some(spt_ops::SeededDropout { p, seed: 5 });
            let name = format!("flash_attention mask #{mi} p {p}");
            parity(&name, &[&q, &k, &v], &[b, h, l, d], &|t| {
                let m = on(&m, t[0].device())?;
                flash_attention(t[0], t[1], t[2], &m, 0.25, drop)
            })?;
        }
    }
    Ok(())
}

/// The tensor-core kernel (bf16, d ∈ {64, 128}): forward and all three gradients against the
/// CPU's fused f32 kernel on bf16-exact inputs, every mask, ragged lengths (not multiples of the
/// 64-row tile) and L_q ≠ L_k.
#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn flash_attention_kernel_matches_cpu() -> Result<()> {
    for &(b, h, lq, lk, d) in &[
        (2usize, 2usize, 200usize, 200usize, 64usize),
        (1, 3, 130, 190, 64),
        (2, 1, 150, 150, 128),
    ] {
        let q = uniform(&[b, h, lq, d], 1.0, 21, DType::F32)?;
        let k = uniform(&[b, h, lk, d], 1.0, 22, DType::F32)?;
        let v = uniform(&[b, h, lk, d], 1.0, 23, DType::F32)?;
        let scale = 1.0 / (d as f64).sqrt();
        for (mi, m) in masks(b, lk, 24)?.into_iter().enumerate() {
            if m.causal && lq != lk {
                continue;
            }
            let name = format!("flash_attention kernel [{b}, {h}, {lq}, {lk}, {d}] mask #{mi}");
            parity_as(DType::BF16, &name, &[&q, &k, &v], &[b, h, lq, d], &|t| {
                let m = on(&m, t[0].device())?;
                flash_attention(t[0], t[1], t[2], &m, scale, None)
            })?;
        }
    }
    Ok(())
}

/// A random block selection over 64 × 64 tiles: per tile up to `width` distinct blocks,
/// ascending, then SENTINEL (some tiles get none).
fn random_selection(
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    width: usize,
    mask: AttentionMask,
    seed: u64,
) -> Result<BlockSelection> {
    let (nt, nb) = (lq.div_ceil(64), lk.div_ceil(64));
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut blocks, mut counts) = (Vec::new(), Vec::new());
    for _ in 0..b * h * nt {
        let mut pick: Vec<u32> = (0..nb as u32)
            .filter(|_| rng.random_bool(0.5))
            .take(width)
            .collect();
        pick.sort_unstable();
        counts.push(pick.len() as u32);
        pick.resize(width, SENTINEL);
        blocks.extend(pick);
    }
    Ok(BlockSelection {
        blocks: Tensor::from_vec(blocks, (b, h, nt, width), &Device::Cpu)?,
        counts: Tensor::from_vec(counts, (b, h, nt), &Device::Cpu)?,
        tiling: BlockTiling {
            query_tile: 64,
            key_block: 64,
            top_blocks: width,
        },
        mask,
    })
}

/// Block-sparse attention on the tensor-core kernel (bf16) against the CPU op (f32): forward and
/// gradients, random block lists (the dk/dv pass uses their device-built transpose), every mask.
#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn block_sparse_attention_kernel_matches_cpu() -> Result<()> {
    for &(b, h, l, d, width) in &[(2usize, 2usize, 320usize, 64usize, 3usize), (1, 2, 200, 128, 2)] {
        let q = uniform(&[b, h, l, d], 1.0, 31, DType::F32)?;
        let k = uniform(&[b, h, l, d], 1.0, 32, DType::F32)?;
        let v = uniform(&[b, h, l, d], 1.0, 33, DType::F32)?;
        let scale = 1.0 / (d as f64).sqrt();
        for (mi, m) in masks(b, l, 34)?.into_iter().enumerate() {
            let sel = random_selection(b, h, l, l, width, m, 35 + mi as u64)?;
            let name = format!("block_sparse_attention kernel [{b}, {h}, {l}, {d}] width {width} mask #{mi}");
            parity_as(DType::BF16, &name, &[&q, &k, &v], &[b, h, l, d], &|t| {
                let sel = BlockSelection {
                    mask: on(&sel.mask, t[0].device())?,
                    ..sel.clone()
                };
                block_sparse_attention(t[0], t[1], t[2], &sel, scale)
            })?;
        }
    }
    Ok(())
}

/// Block lists made by hand are checked on the device as on the CPU: a repeated block would be
/// summed twice by the kernel, a descending list breaks its dk/dv pass, and a block past the
/// keys would read another head's.
#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn block_sparse_attention_refuses_bad_lists_on_the_gpu() -> Result<()> {
    let dev = gpu()?;
    let (b, h, l, d) = (1, 1, 192, 64);
    let q = uniform(&[b, h, l, d], 1.0, 41, DType::F32)?
        .to_dtype(DType::BF16)?
        .to_device(&dev)?;
    let good = [0u32, 1, 2, 0, 1, SENTINEL, 2, SENTINEL, SENTINEL];
    for (lists, what) in [
        (
            [0u32, 0, 2, 0, 1, SENTINEL, 2, SENTINEL, SENTINEL],
            "not ascending, unique",
        ),
        (
            [0, 2, 1, 0, 1, SENTINEL, 2, SENTINEL, SENTINEL],
            "not ascending, unique",
        ),
        (
            [0, 1, 2, 0, SENTINEL, 1, 2, SENTINEL, SENTINEL],
            "SENTINEL-padded",
        ),
        (
            [0, 1, 3, 0, 1, SENTINEL, 2, SENTINEL, SENTINEL],
            "selects key block 3",
        ),
        (good, ""),
    ] {
        let sel = BlockSelection {
            blocks: Tensor::from_vec(lists.to_vec(), (b, h, 3, 3), &dev)?,
            counts: Tensor::zeros((b, h, 3), DType::U32, &dev)?,
            tiling: BlockTiling {
                query_tile: 64,
                key_block: 64,
                top_blocks: 3,
            },
            mask: AttentionMask::none(),
        };
        let r = block_sparse_attention(&q, &q, &q, &sel, 0.125);
        if what.is_empty() {
            r?;
        } else {
            let e = r.expect_err(what).to_string();
            assert!(e.contains(what), "{lists:?}: {e}");
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn residual_layer_norm_matches_cpu() -> Result<()> {
    let (n, d) = (130, 48);
    let x = uniform(&[n, d], 2.0, 21, DType::F32)?;
    let r = uniform(&[n, d], 2.0, 22, DType::F32)?;
    let g = uniform(&[d], 1.0, 23, DType::F32)?;
    let b = uniform(&[d], 1.0, 24, DType::F32)?;
    for p in [0.0, 0.1] {
        let drop = Some(spt_ops::SeededDropout { p, seed: 9 });
        parity(
            &format!("residual_layer_norm p {p}"),
            &[&x, &r, &g, &b],
            &[n, d],
            &|t| spt_ops::residual_layer_norm(t[0], t[1], t[2], t[3], 1e-5, drop),
        )?;
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn residual_dropout_matches_cpu() -> Result<()> {
    let (n, d) = (130, 48);
    let x = uniform(&[n, d], 2.0, 25, DType::F32)?;
    let r = uniform(&[n, d], 2.0, 26, DType::F32)?;
    for p in [0.0, 0.1] {
        let drop = Some(spt_ops::SeededDropout { p, seed: 9 });
        parity(&format!("residual_dropout p {p}"), &[&x, &r], &[n, d], &|t| {
            spt_ops::residual_dropout(t[0], t[1], drop)
        })?;
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn lora_linear_heads_matches_cpu() -> Result<()> {
    // On CUDA the composed form (merge_heads, matmuls, split_heads) against the CPU's fused op
    // that gathers and scatters head rows per task. B 2 × L 150 = 300 rows: two row tasks.
    let (b, h, l, d, out) = (2, 3, 150, 4, 8);
    let w = uniform(&[out, h * d], 1.0, 30, DType::F32)?;
    let bias = uniform(&[out], 1.0, 31, DType::F32)?;
    for (input_heads, output_heads) in [(true, None), (false, Some(2)), (true, Some(4))] {
        let x_shape = if input_heads {
            vec![b, h, l, d]
        } else {
            vec![b, l, h * d]
        };
        let y_shape = match output_heads {
            Some(ho) => vec![b, ho, l, out / ho],
            None => vec![b, l, out],
        };
        let x = uniform(&x_shape, 2.0, 32, DType::F32)?;
        let a = uniform(&[2, h * d], 1.0, 33, DType::F32)?;
        let bm = uniform(&[out, 2], 1.0, 34, DType::F32)?;
        let layout = spt_ops::HeadsLayout {
            input_heads,
            output_heads,
        };
        parity(
            &format!("lora_linear_heads {layout:?}"),
            &[&x, &a, &bm],
            &y_shape,
            &|t| {
                let (w, bias) = (w.to_device(t[0].device())?, bias.to_device(t[0].device())?);
                spt_ops::lora::lora_linear_heads(t[0], &w, Some(&bias), t[1], t[2], 0.5, layout)
            },
        )?;
    }
    // A tracked W or bias is refused on the GPU as on the CPU (the op gives them no gradient;
    // only the CPU path was run when the check was added).
    let dev = gpu()?;
    let x = uniform(&[b, l, h * d], 2.0, 35, DType::F32)?.to_device(&dev)?;
    let a = uniform(&[2, h * d], 1.0, 33, DType::F32)?.to_device(&dev)?;
    let bm = uniform(&[out, 2], 1.0, 34, DType::F32)?.to_device(&dev)?;
    let (wd, bd) = (w.to_device(&dev)?, bias.to_device(&dev)?);
    let tracked_w = Var::from_tensor(&wd)?;
    let tracked_b = Var::from_tensor(&bd)?;
    let layout = spt_ops::HeadsLayout {
        input_heads: false,
        output_heads: None,
    };
    for (w, bias, name) in [
        (tracked_w.as_tensor(), &bd, "w"),
        (&wd, tracked_b.as_tensor(), "bias"),
    ] {
        let e = spt_ops::lora::lora_linear_heads(&x, w, Some(bias), &a, &bm, 0.5, layout)
            .unwrap_err()
            .to_string();
        assert!(e.contains(name) && e.contains("frozen"), "{name}: {e}");
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn activations_match_cpu() -> Result<()> {
    let x = uniform(&[3, 1001], 5.0, 5, DType::F32)?;
    for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
        for dt in [DType::F32, DType::BF16] {
            parity_as(dt, &format!("{act:?}"), &[&x], &[3, 1001], &|t| act.forward(t[0]))?;
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn pq_encode_matches_cpu() -> Result<()> {
    let dev = gpu()?;
    for per_head in [false, true] {
        let keys = uniform(&[2, 3, 77, 64], 1.0, 6, DType::F32)?;
        let cfg = PqConfig {
            per_head,
            kmeans_iters: 3,
            ..PqConfig::default()
        };
        let cb = Codebook::fit(&keys, &cfg)?;
        for dt in [DType::F32, DType::BF16] {
            // bf16 keys: the CPU encodes the same (bf16-exact) values in f32.
            let keys = if dt == DType::BF16 {
                bf16_exact(&keys)?
            } else {
                keys.clone()
            };
            let want = cb.encode(&keys)?;
            let got = cb.encode(&keys.to_dtype(dt)?.to_device(&dev)?)?;
            assert!(got.device().is_cuda());
            let (g, w) = (
                got.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u8>()?,
                want.flatten_all()?.to_vec1::<u8>()?,
            );
            assert_eq!(
                g, w,
                "pq encode ({dt:?}, per_head = {per_head}) differs from the CPU"
            );
        }
    }
    Ok(())
}

/// Integer-valued tensor in [-a, a] (exact in any summation order).
fn ints(shape: &[usize], a: i32, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-a..=a) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn codes(shape: &[usize], c: usize, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<u8> = (0..n).map(|_| rng.random_range(0..c) as u8).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn masks(b: usize, l: usize, seed: u64) -> Result<Vec<AttentionMask>> {
    Ok(vec![
        AttentionMask::none(),
        AttentionMask::causal(),
        AttentionMask::none().with_key_padding(padding(b, l, seed, true)?),
        AttentionMask::causal().with_key_padding(padding(b, l, seed + 1, false)?),
    ])
}

fn on(m: &AttentionMask, dev: &Device) -> Result<AttentionMask> {
    Ok(AttentionMask {
        causal: m.causal,
        key_padding: m.key_padding.as_ref().map(|t| t.to_device(dev)).transpose()?,
    })
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn adc_selection_matches_cpu_exactly_on_integer_data() -> Result<()> {
    let dev = gpu()?;
    // (S, C, groups): paired 4-bit tables (C ≤ 16), an odd S, unpaired C = 32, per-head books.
    for &(s, c, groups) in &[
        (8usize, 16usize, 1usize),
        (3, 16, 1),
        (4, 32, 1),
        (8, 16, 3),
        (1, 7, 1),
    ] {
        let (b, h, l, dc) = (2usize, 3usize, 133usize, 2usize);
        let d = s * dc;
        let cen = if groups == 1 {
            ints(&[s, c, dc], 2, 7)?
        } else {
            ints(&[groups, s, c, dc], 2, 7)?
        };
        let cb = Codebook::from_tensor(&cen)?;
        let q = ints(&[b, h, l, d], 3, 8)?;
        let kc = codes(&[b, h, l, s], c, 9)?;
        for m in masks(b, l, 10)? {
            for topk in [
                KeyTopK::Count(1),
                KeyTopK::Count(13),
                KeyTopK::Count(40),
                KeyTopK::Count(l),
            ] {
                let want = select_keys(&q, &kc, &cb, topk, &m)?;
                // Small integers are exact in bf16 too.
                for dt in [DType::F32, DType::BF16] {
                    let got: KeySelection = select_keys(
                        &q.to_dtype(dt)?.to_device(&dev)?,
                        &kc.to_device(&dev)?,
                        &cb,
                        topk,
                        &on(&m, &dev)?,
                    )?;
                    assert!(got.indices.device().is_cuda());
                    let what = format!(
                        "select {dt:?} S={s} C={c} G={groups} causal={} pad={} {topk:?}",
                        m.causal,
                        m.key_padding.is_some()
                    );
                    same_u32(&format!("{what} indices"), &got.indices, &want.indices)?;
                    same_u32(&format!("{what} counts"), &got.counts, &want.counts)?;
                }
            }
        }
    }
    Ok(())
}

/// Block selection on the device picks the CPU's blocks exactly on integer data (every sum exact,
/// so ties and their break to the lower block are exercised): both scores, tile and block sizes
/// that do not divide L, per-head codebooks, every mask, f32 and bf16 queries.
#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn block_selection_matches_cpu_exactly_on_integer_data() -> Result<()> {
    let dev = gpu()?;
    let (b, h, l, s, c, dc) = (2usize, 3usize, 333usize, 4usize, 16usize, 2usize);
    for groups in [1usize, 3] {
        let cen = if groups == 1 {
            ints(&[s, c, dc], 2, 17)?
        } else {
            ints(&[groups, s, c, dc], 2, 17)?
        };
        let cb = Codebook::from_tensor(&cen)?;
        let q = ints(&[b, h, l, s * dc], 3, 18)?;
        let kc = codes(&[b, h, l, s], c, 19)?;
        for m in masks(b, l, 20)? {
            for (qt, kb, top) in [(64usize, 64usize, 3usize), (32, 16, 6), (50, 40, 20)] {
                let tiling = BlockTiling {
                    query_tile: qt,
                    key_block: kb,
                    top_blocks: top,
                };
                for score in [BlockScore::Mean, BlockScore::UpperBound] {
                    let want = select_blocks(&q, &kc, &cb, tiling, &m, score)?;
                    for dt in [DType::F32, DType::BF16] {
                        let got = select_blocks(
                            &q.to_dtype(dt)?.to_device(&dev)?,
                            &kc.to_device(&dev)?,
                            &cb,
                            tiling,
                            &on(&m, &dev)?,
                            score,
                        )?;
                        assert!(got.blocks.device().is_cuda());
                        let what = format!(
                            "select_blocks {dt:?} G={groups} {tiling:?} {score:?} causal={} pad={}",
                            m.causal,
                            m.key_padding.is_some()
                        );
                        same_u32(&format!("{what} blocks"), &got.blocks, &want.blocks)?;
                        same_u32(&format!("{what} counts"), &got.counts, &want.counts)?;
                    }
                }
            }
        }
    }
    // No keys: every tile's list is padding (the kernels do not run).
    let cb = Codebook::from_tensor(&ints(&[s, c, dc], 2, 17)?)?;
    let q = ints(&[b, h, 70, s * dc], 3, 18)?;
    let kc = codes(&[b, h, 0, s], c, 19)?;
    let tiling = BlockTiling {
        query_tile: 32,
        key_block: 16,
        top_blocks: 2,
    };
    let m = AttentionMask::none();
    let want = select_blocks(&q, &kc, &cb, tiling, &m, BlockScore::Mean)?;
    let got = select_blocks(
        &q.to_device(&dev)?,
        &kc.to_device(&dev)?,
        &cb,
        tiling,
        &m,
        BlockScore::Mean,
    )?;
    same_u32("select_blocks with L_k = 0: blocks", &got.blocks, &want.blocks)?;
    same_u32("select_blocks with L_k = 0: counts", &got.counts, &want.counts)?;
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn adc_selection_on_random_data_agrees_with_cpu() -> Result<()> {
    let dev = gpu()?;
    let (b, h, l, d) = (1usize, 4usize, 257usize, 64usize);
    let keys = uniform(&[b, h, l, d], 1.0, 11, DType::F32)?;
    let q = uniform(&[b, h, l, d], 1.0, 12, DType::F32)?;
    let cb = Codebook::fit(
        &keys,
        &PqConfig {
            kmeans_iters: 3,
            ..PqConfig::default()
        },
    )?;
    let kc = cb.encode(&keys)?;
    let m = AttentionMask::causal();
    let want = select_keys(&q, &kc, &cb, KeyTopK::Count(32), &m)?;
    let got = select_keys(
        &q.to_device(&dev)?,
        &kc.to_device(&dev)?,
        &cb,
        KeyTopK::Count(32),
        &on(&m, &dev)?,
    )?;
    let (g, w) = (
        got.indices
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<u32>()?,
        want.indices.flatten_all()?.to_vec1::<u32>()?,
    );
    let rows = b * h * l;
    let same = g.chunks(32).zip(w.chunks(32)).filter(|(a, b)| a == b).count();
    eprintln!("random-data selection: {same}/{rows} rows identical");
    assert!(
        same * 100 >= rows * 99,
        "only {same}/{rows} rows match the CPU selection"
    );
    same_u32("random-data counts", &got.counts, &want.counts)
}

/// Sparse attention, forward and backward, CUDA vs CPU, on a PQ selection made on the CPU.
fn sparse_case(b: usize, h: usize, l: usize, d: usize, k: usize, m: &AttentionMask, seed: u64) -> Result<()> {
    sparse_case_pq(b, h, l, d, k, m, seed, 8)
}

#[allow(clippy::too_many_arguments)]
fn sparse_case_pq(
    b: usize,
    h: usize,
    l: usize,
    d: usize,
    k: usize,
    m: &AttentionMask,
    seed: u64,
    n_subspaces: usize,
) -> Result<()> {
    let dev = gpu()?;
    let q = uniform(&[b, h, l, d], 1.0, seed, DType::F32)?;
    let kt = uniform(&[b, h, l, d], 1.0, seed + 1, DType::F32)?;
    let v = uniform(&[b, h, l, d], 1.0, seed + 2, DType::F32)?;
    let cfg = PqConfig {
        kmeans_iters: 2,
        n_subspaces,
        ..PqConfig::default()
    };
    let cb = Codebook::fit(&kt, &cfg)?;
    let sel = select_keys(&q, &cb.encode(&kt)?, &cb, KeyTopK::Count(k), m)?;
    let sel_gpu = KeySelection {
        indices: sel.indices.to_device(&dev)?,
        counts: sel.counts.to_device(&dev)?,
    };
    let scale = 1.0 / (d as f64).sqrt();
    let w = uniform(&[b, h, l, d], 1.0, seed + 3, DType::F32)?;
    for dt in [DType::F32, DType::BF16] {
        // bf16: the CPU runs in f32 on the same bf16-exact values.
        let prep = |t: &Tensor| {
            if dt == DType::BF16 {
                bf16_exact(t)
            } else {
                Ok(t.clone())
            }
        };
        let (q, kt, v, w) = (prep(&q)?, prep(&kt)?, prep(&v)?, prep(&w)?);
        let (o_cpu, g_cpu) = run(&Device::Cpu, &[&q, &kt, &v], &w, &|t| {
            sparse_attention(t[0], t[1], t[2], &sel, scale)
        })?;
        let f_gpu = |t: &[&Tensor]| sparse_attention(t[0], t[1], t[2], &sel_gpu, scale);
        let (qg, kg, vg, wg) = (
            q.to_dtype(dt)?,
            kt.to_dtype(dt)?,
            v.to_dtype(dt)?,
            w.to_dtype(dt)?,
        );
        let (o_gpu, g_gpu) = run(&dev, &[&qg, &kg, &vg], &wg, &f_gpu)?;
        assert_eq!(o_gpu.dtype(), dt);
        let tol = if dt == DType::BF16 { BF16_TOL } else { TOL };
        let what = format!(
            "sparse_attention {dt:?} [{b},{h},{l},{d}] k={k} causal={} pad={}",
            m.causal,
            m.key_padding.is_some()
        );
        close_tol(&format!("{what} o"), &o_gpu, &o_cpu, tol)?;
        for (name, a, c) in [
            ("dq", &g_gpu[0], &g_cpu[0]),
            ("dk", &g_gpu[1], &g_cpu[1]),
            ("dv", &g_gpu[2], &g_cpu[2]),
        ] {
            assert_eq!(a.dtype(), dt, "{what} {name} dtype");
            close_tol(&format!("{what} {name}"), a, c, tol)?;
        }
        // Deterministic: a second backward gives the same bits.
        let (_, again) = run(&dev, &[&qg, &kg, &vg], &wg, &f_gpu)?;
        for (a, c) in again.iter().zip(&g_gpu) {
            let diff = max_abs_diff(&a.to_device(&Device::Cpu)?, &c.to_device(&Device::Cpu)?)?;
            assert_eq!(diff, 0.0, "{what}: backward is not deterministic");
        }
    }
    Ok(())
}

/// A NaN in a query row makes that row's output and gradients NaN on the GPU as on the CPU (a
/// diverged run must not read as a masked row), a row with no selected key gives 0, and the
/// other rows still agree.
#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn sparse_attention_propagates_nan_as_the_cpu() -> Result<()> {
    let dev = gpu()?;
    let (b, h, l, d, kk) = (1, 2, 40, 64, 8);
    let mut qv = uniform(&[b, h, l, d], 1.0, 70, DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    qv[3 * d + 5] = f32::NAN; // one entry of head 0's query row 3
    let q = Tensor::from_vec(qv, (b, h, l, d), &Device::Cpu)?;
    let kt = uniform(&[b, h, l, d], 1.0, 71, DType::F32)?;
    let v = uniform(&[b, h, l, d], 1.0, 72, DType::F32)?;
    let w = uniform(&[b, h, l, d], 1.0, 73, DType::F32)?;
    // Row i selects keys i .. i + kk (clamped to the end); row 5 of each head selects none.
    let (mut idx, mut counts) = (Vec::new(), Vec::new());
    for r in 0..b * h * l {
        let i = r % l;
        if i == 5 {
            idx.extend([SENTINEL; 8]);
            counts.push(0u32);
        } else {
            let start = i.min(l - kk) as u32;
            idx.extend(start..start + kk as u32);
            counts.push(kk as u32);
        }
    }
    let sel = KeySelection {
        indices: Tensor::from_vec(idx, (b, h, l, kk), &Device::Cpu)?,
        counts: Tensor::from_vec(counts, (b, h, l), &Device::Cpu)?,
    };
    let sel_gpu = KeySelection {
        indices: sel.indices.to_device(&dev)?,
        counts: sel.counts.to_device(&dev)?,
    };
    let (o_cpu, g_cpu) = run(&Device::Cpu, &[&q, &kt, &v], &w, &|t| {
        sparse_attention(t[0], t[1], t[2], &sel, 0.125)
    })?;
    let (o_gpu, g_gpu) = run(&dev, &[&q, &kt, &v], &w, &|t| {
        sparse_attention(t[0], t[1], t[2], &sel_gpu, 0.125)
    })?;
    let nan_mask = |t: &Tensor| -> Result<Vec<bool>> {
        let v = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(v.iter().map(|x| x.is_nan()).collect())
    };
    let zeroed = |t: &Tensor| t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>();
    assert!(
        nan_mask(&o_cpu)?[3 * d..4 * d].iter().all(|&n| n),
        "the CPU reference lost its NaN row"
    );
    assert!(
        zeroed(&o_cpu)?[5 * d..6 * d].iter().all(|&x| x == 0.0),
        "the CPU reference's empty row"
    );
    for (name, got, want) in [
        ("o", &o_gpu, &o_cpu),
        ("dq", &g_gpu[0], &g_cpu[0]),
        ("dk", &g_gpu[1], &g_cpu[1]),
        ("dv", &g_gpu[2], &g_cpu[2]),
    ] {
        let (gn, wn) = (nan_mask(got)?, nan_mask(want)?);
        assert_eq!(
            gn, wn,
            "sparse_attention with a NaN row: {name}'s NaN entries differ from the CPU's"
        );
        let keep = |t: &Tensor, n: &[bool]| -> Result<Tensor> {
            let v: Vec<f32> = zeroed(t)?
                .iter()
                .zip(n)
                .map(|(&x, &n)| if n { 0.0 } else { x })
                .collect();
            Tensor::from_vec(v, t.dims(), &Device::Cpu)
        };
        close_tol(
            &format!("sparse_attention with a NaN row: {name}"),
            &keep(got, &gn)?,
            &keep(want, &wn)?,
            TOL,
        )?;
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn sparse_attention_matches_cpu() -> Result<()> {
    for (i, m) in masks(2, 97, 20)?.into_iter().enumerate() {
        sparse_case(2, 3, 97, 64, 16, &m, 30 + i as u64)?;
    }
    // More than one 32-key chunk per row, several CSC row blocks, d = 128, d = 24.
    sparse_case(1, 2, 600, 128, 70, &AttentionMask::causal(), 40)?;
    sparse_case(1, 2, 300, 24, 300, &AttentionMask::none(), 41)?;
    // d = 6: not a multiple of 4, so the kernels' scalar (non-float4) row reads.
    sparse_case_pq(2, 2, 131, 6, 20, &AttentionMask::causal(), 42, 2)?;
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn routed_row_moves_match_cpu() -> Result<()> {
    use spt_ops::routed_ffn::{gather_rows, sum_rows};
    use std::sync::Arc;
    // 600 tokens, k = 3 of 8; d = 200 and 1 (more and fewer columns than threads per block).
    for &(t, n, k, d) in &[(600usize, 8usize, 3usize, 200usize), (7, 4, 4, 1)] {
        let mut rng = StdRng::seed_from_u64(t as u64);
        let mut blocks = Vec::with_capacity(t * k);
        for _ in 0..t {
            let mut all: Vec<u32> = (0..n as u32).collect();
            for j in 0..k {
                let i = rng.random_range(j..n);
                all.swap(j, i);
            }
            blocks.extend_from_slice(&all[..k]);
        }
        let routing = Arc::new(spt_ops::Routing::from_blocks(t, n, k, blocks)?);
        let x = uniform(&[t, d], 1.0, 7, DType::F32)?;
        let w = uniform(&[routing.n_rows(), d], 1.0, 8, DType::F32)?;
        for dt in [DType::F32, DType::BF16] {
            parity_as(dt, "gather_rows · w → sum_rows", &[&x, &w], &[t, d], &|v| {
                sum_rows(&gather_rows(v[0], &routing)?.mul(v[1])?, &routing)
            })?;
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn routed_ffn_matches_cpu() -> Result<()> {
    use spt_ops::routed_ffn::{gather_matmul_act, scatter_matmul_bias};
    use std::sync::Arc;
    let (t, d, n, b, k) = (300, 64, 8, 32, 2);
    let mut rng = StdRng::seed_from_u64(5);
    let mut blocks = Vec::with_capacity(t * k);
    for _ in 0..t {
        let a = rng.random_range(0..n as u32);
        let c = (a + 1 + rng.random_range(0..n as u32 - 1)) % n as u32;
        blocks.extend_from_slice(&[a, c]);
    }
    let routing = Arc::new(spt_ops::Routing::from_blocks(t, n, k, blocks)?);
    let r = routing.n_rows();
    let x = uniform(&[t, d], 1.0, 1, DType::F32)?;
    let w1 = uniform(&[n * b, d], 0.2, 2, DType::F32)?;
    let b1 = uniform(&[n * b], 0.1, 3, DType::F32)?;
    let gates = (uniform(&[r], 0.5, 4, DType::F32)? + 1.0)?;
    let w2 = uniform(&[d, n * b], 0.2, 5, DType::F32)?;
    let b2 = uniform(&[d], 0.1, 6, DType::F32)?;
    for dt in [DType::F32, DType::BF16] {
        parity_as(
            dt,
            "routed_ffn",
            &[&x, &w1, &b1, &gates, &w2, &b2],
            &[t, d],
            &|v| {
                let h = gather_matmul_act(v[0], v[1], Some(v[2]), Some(Activation::GeluTanh), &routing)?;
                scatter_matmul_bias(&h, v[3], v[4], Some(v[5]), &routing)
            },
        )?;
    }
    Ok(())
}

/// `[t, n]` integer-valued router scores in -3..=3 (many ties), or, `skewed`, with block 0 above
/// every other block (a routing that is not balanced).
fn router_scores(t: usize, n: usize, skewed: bool, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..t * n)
        .map(|i| {
            let v = rng.random_range(-3i32..=3) as f32;
            if skewed && i % n == 0 {
                10.0
            } else {
                v
            }
        })
        .collect()
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn device_routing_matches_host_routing() -> Result<()> {
    use spt_ops::Routing;
    // More than one token chunk (512), every k up to n, n up to the device limit (64) and one
    // past it (routed on the host).
    for &(t, n, k) in &[
        (1usize, 1usize, 1usize),
        (700, 8, 2),
        (1300, 24, 12),
        (600, 64, 5),
        (520, 64, 64),
        (300, 65, 3),
    ] {
        let scores = router_scores(t, n, false, (t * n + k) as u64);
        let host: Vec<f64> = scores.iter().map(|&v| v as f64).collect();
        let want = Routing::top_k(&host, t, n, k)?;
        for dt in [DType::F32, DType::BF16] {
            let s = Tensor::from_vec(scores.clone(), (t, n), &gpu()?)?.to_dtype(dt)?;
            let got = Routing::from_scores(&s, k)?;
            let what = format!("T {t} n {n} k {k} {dt:?}");
            assert_eq!(
                got.device().is_some(),
                n <= 64,
                "{what}: routed on the wrong side"
            );
            assert_eq!(got.block_counts(), want.block_counts(), "{what}: block counts");
            assert_eq!(got.blocks()?, want.blocks()?, "{what}: blocks");
            assert_eq!(got.row_token()?, want.row_token()?, "{what}: row_token");
            assert_eq!(got.row_src()?, want.row_src()?, "{what}: row_src");
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn routed_ffn_on_device_routing_matches_cpu() -> Result<()> {
    use spt_ops::routed_ffn::composed::uses_padding;
    use spt_ops::routed_ffn::{gather_matmul_act, router_gates, scatter_matmul_bias, GateMode};
    use spt_ops::Routing;
    use std::sync::Arc;
    // Balanced (the padded layout, one batched GEMM) and skewed (one GEMM per block) routings,
    // each built on the device from scores there and on the host from the same scores; the gates
    // come from the scores through the (token, slot) → row map.
    let (t, d, n, b, k) = (700, 64, 8, 32, 3);
    for skewed in [false, true] {
        let scores = router_scores(t, n, skewed, 11 + skewed as u64);
        let logits = Tensor::from_vec(scores, (t, n), &Device::Cpu)?;
        let host = Arc::new(Routing::from_scores(&logits, k)?);
        let device = Arc::new(Routing::from_scores(&logits.to_device(&gpu()?)?, k)?);
        assert!(device.device().is_some(), "the GPU routing was built on the host");
        assert_eq!(
            uses_padding(&host),
            !skewed,
            "the case does not take the layout it tests"
        );
        let x = uniform(&[t, d], 1.0, 1, DType::F32)?;
        let w1 = uniform(&[n * b, d], 0.2, 2, DType::F32)?;
        let b1 = uniform(&[n * b], 0.1, 3, DType::F32)?;
        let w2 = uniform(&[d, n * b], 0.2, 5, DType::F32)?;
        let b2 = uniform(&[d], 0.1, 6, DType::F32)?;
        let logits = (&logits * 0.25)?; // distinct gates
        for dt in [DType::F32, DType::BF16] {
            parity_as(
                dt,
                &format!("routed_ffn on a device routing (skewed: {skewed})"),
                &[&x, &w1, &b1, &logits, &w2, &b2],
                &[t, d],
                &|v| {
                    let r = if v[0].device().is_cuda() { &device } else { &host };
                    let gates = router_gates(v[3], r, GateMode::SoftmaxKept)?;
                    let h = gather_matmul_act(v[0], v[1], Some(v[2]), Some(Activation::GeluTanh), r)?;
                    scatter_matmul_bias(&h, &gates, v[4], Some(v[5]), r)
                },
            )?;
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-check.sh"]
fn linear_cross_entropy_matches_cpu() -> Result<()> {
    use spt_ops::{linear_cross_entropy, Reduction};
    let (n, d, v) = (300, 32, 1000);
    let h = uniform(&[n, d], 1.0, 7, DType::F32)?;
    let w = uniform(&[v, d], 0.3, 8, DType::F32)?;
    let mut rng = StdRng::seed_from_u64(9);
    let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    let targets = Tensor::from_vec(targets, n, &Device::Cpu)?;
    let mask = padding(1, n, 10, false)?.reshape(n)?.to_dtype(DType::F32)?;
    parity("linear_cross_entropy", &[&h, &w], &[], &|x| {
        let dev = x[0].device();
        linear_cross_entropy(
            x[0],
            x[1],
            &targets.to_device(dev)?,
            Some(&mask.to_device(dev)?),
            Reduction::Mean,
        )
    })
}
