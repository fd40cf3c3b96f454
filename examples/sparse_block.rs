//! SPT's sparse layers in your own candle model.
//!
//! Builds a small pre-LN Transformer block from plain candle tensors (its own seeded weights, no
//! checkpoint), then swaps its attention for [`SparseAttention`] (a PQ codebook fitted on the
//! block's keys + top-k keys per query) and its FFN for spt-ops' `RoutedFfn` (router fitted to
//! the blocks' activation norms). It checks that keeping every key and every block reproduces
//! the dense block, then compares a really sparse block with the dense one: output difference,
//! forward+backward time and the bytes of activations kept for backward.
//!
//!     cargo run --release --example sparse_block -- [--cpu] [--seq 512] [--k 64]
//!
//! It runs on the CPU (`--cpu` is accepted and changes nothing).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use spt::models::pq::{KeyTopK, PqConfig};
use spt::models::routed_ffn::{BlockTopK, GateMode, RoutedFfn, RoutedFfnConfig, RouterFitConfig};
use spt::models::{activation_bytes, AttentionCost, AttentionMask, FfnCost, LayerShape, SparseAttention};
use spt::ops::gradcheck::randn_f64;
use spt::ops::{layer_norm, softmax_last_dim, Activation};
use std::time::Instant;

/// A pre-LN block: `x + attn(ln1(x))`, then `+ ffn(ln2(·))`. Linear weights are `[out, in]`.
struct Block {
    heads: usize,
    ln1: (Tensor, Tensor),
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ln2: (Tensor, Tensor),
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

/// What computes attention and the FFN in [`Block::forward`].
enum Attn {
    Dense,
    Sparse(SparseAttention),
}
enum Ffn {
    Dense,
    Routed(Box<RoutedFfn>),
}

fn randn(shape: &[usize], std: f64, seed: u64) -> Result<Tensor> {
    Ok((randn_f64(shape, seed)? * std)?.to_dtype(DType::F32)?)
}

impl Block {
    fn new(e: usize, heads: usize, f: usize) -> Result<Self> {
        let s = 1.0 / (e as f64).sqrt();
        let ones = Tensor::ones(e, DType::F32, &Device::Cpu)?;
        let zeros = Tensor::zeros(e, DType::F32, &Device::Cpu)?;
        Ok(Self {
            heads,
            ln1: (ones.clone(), zeros.clone()),
            wq: randn(&[e, e], s, 1)?,
            wk: randn(&[e, e], s, 2)?,
            wv: randn(&[e, e], s, 3)?,
            wo: randn(&[e, e], s, 4)?,
            ln2: (ones, zeros),
            w1: randn(&[f, e], s, 5)?,
            b1: randn(&[f], 0.1, 6)?,
            w2: randn(&[e, f], 1.0 / (f as f64).sqrt(), 7)?,
            b2: randn(&[e], 0.1, 8)?,
        })
    }

    fn heads_of(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, e) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, e / self.heads))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// `(q, k, v)` of `ln1(x)`, each `[B, H, L, d]`.
    fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let h = layer_norm(x, &self.ln1.0, &self.ln1.1, 1e-5)?;
        let p = |w: &Tensor| -> Result<Tensor> { self.heads_of(&h.broadcast_matmul(&w.t()?)?) };
        Ok((p(&self.wq)?, p(&self.wk)?, p(&self.wv)?))
    }

    /// `x + attn(ln1(x))`.
    fn attend(&self, x: &Tensor, attn: &Attn) -> Result<Tensor> {
        let (b, l, e) = x.dims3()?;
        let (q, k, v) = self.qkv(x)?;
        let scale = 1.0 / ((e / self.heads) as f64).sqrt();
        let mask = AttentionMask::causal();
        let ctx = match attn {
            Attn::Dense => {
                let scores = (q.matmul(&k.t()?)? * scale)?;
                let causal: Vec<f32> = (0..l)
                    .flat_map(|i| (0..l).map(move |j| if j <= i { 0.0 } else { -1e30 }))
                    .collect();
                let bias = Tensor::from_vec(causal, (1, 1, l, l), x.device())?;
                softmax_last_dim(&scores.broadcast_add(&bias)?)?.matmul(&v)?
            }
            Attn::Sparse(s) => s.forward(&q, &k, &v, &mask, scale)?,
        };
        let ctx = ctx.transpose(1, 2)?.contiguous()?.reshape((b, l, e))?;
        Ok((x + ctx.broadcast_matmul(&self.wo.t()?)?)?)
    }

    fn forward(&self, x: &Tensor, attn: &Attn, ffn: &Ffn) -> Result<Tensor> {
        let x = self.attend(x, attn)?;
        let h = layer_norm(&x, &self.ln2.0, &self.ln2.1, 1e-5)?;
        let f = match ffn {
            Ffn::Dense => {
                let a = Activation::GeluTanh
                    .forward(&h.broadcast_matmul(&self.w1.t()?)?.broadcast_add(&self.b1)?)?;
                a.broadcast_matmul(&self.w2.t()?)?.broadcast_add(&self.b2)?
            }
            Ffn::Routed(r) => r.forward_t(&h, false)?.y,
        };
        Ok((x + f)?)
    }

    fn routed(&self, n_blocks: usize, top_k: BlockTopK, gate: GateMode) -> Result<RoutedFfn> {
        let mut cfg = RoutedFfnConfig::new(n_blocks, top_k);
        let act = Activation::GeluTanh;
        cfg.gate = gate;
        Ok(RoutedFfn::new(&self.w1, &self.b1, &self.w2, &self.b2, act, cfg)?)
    }
}

/// Median seconds of forward + backward (w.r.t. the input) over `runs` runs.
fn time_fwd_bwd(block: &Block, x: &Tensor, attn: &Attn, ffn: &Ffn, runs: usize) -> Result<f64> {
    let mut t = Vec::new();
    for _ in 0..runs {
        let xv = Var::from_tensor(x)?;
        let start = Instant::now();
        // On the CPU, on rayon's pool: each op's threads start without waking.
        spt::ops::on_pool(x.device(), || -> Result<()> {
            let y = block.forward(xv.as_tensor(), attn, ffn)?;
            let g = y.sqr()?.sum_all()?.backward()?;
            g.get(&xv).context("no input gradient")?;
            Ok(())
        })?;
        t.push(start.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let n = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok((d / n) as f64)
}

fn arg(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()?),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (b, l, e, heads, f) = (2, arg(&args, "--seq", 512)?, 256, 4, 1024);
    let k = arg(&args, "--k", 64)?;
    let block = Block::new(e, heads, f)?;
    let x = randn(&[b, l, e], 1.0, 42)?;
    println!("block: B={b} L={l} E={e} H={heads} F={f}, causal; sparse: k={k} keys/query, FFN 2 of 8 blocks");

    // The codebook is fitted on the block's own keys (here: the same batch).
    let (_, keys, _) = block.qkv(&x)?;
    let pq = PqConfig {
        n_subspaces: 8,
        n_codewords: 16,
        ..PqConfig::default()
    };
    let all_keys = SparseAttention::fit(&keys, &pq, KeyTopK::Fraction(1.0), Default::default())?;
    let sparse = SparseAttention {
        top_k: KeyTopK::Count(k),
        ..all_keys.clone()
    };

    // 1. Every key and every block (gate ≡ 1): the dense block, up to rounding.
    let dense = block.forward(&x, &Attn::Dense, &Ffn::Dense)?;
    let full = block.forward(
        &x,
        &Attn::Sparse(all_keys),
        &Ffn::Routed(Box::new(block.routed(8, BlockTopK::Count(8), GateMode::Ones)?)),
    )?;
    let max_abs = (&full - &dense)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    println!("all keys + all blocks vs dense: max |Δ| = {max_abs:.2e}");
    anyhow::ensure!(
        max_abs < 1e-4,
        "every key and every block should reproduce the dense block (f32 rounding only), got max |Δ| = {max_abs:.2e}"
    );

    // 2. Really sparse: top-k keys, 2 of 8 FFN blocks with a router fitted to activation norms.
    let mut routed = block.routed(8, BlockTopK::Count(2), GateMode::SoftmaxKept)?;
    // The router is fitted on the FFN's inputs of the dense block.
    let ffn_in = layer_norm(&block.attend(&x, &Attn::Dense)?, &block.ln2.0, &block.ln2.1, 1e-5)?;
    let q = routed.init_router(&ffn_in.reshape((b * l, e))?, RouterFitConfig::default())?;
    println!(
        "router fit: oracle recall {:.2}, routed-vs-dense FFN cosine {:.3}",
        q.oracle_recall, q.cosine
    );
    let (attn, ffn) = (Attn::Sparse(sparse), Ffn::Routed(Box::new(routed)));
    let out = block.forward(&x, &attn, &ffn)?;
    // Random weights have no structure for the router or the codebook to exploit, so this is a
    // pessimistic figure; trained models concentrate attention and FFN activity.
    println!(
        "sparse block vs dense: relative difference {:.3}",
        rel_diff(&out, &dense)?
    );

    let (td, ts) = (
        time_fwd_bwd(&block, &x, &Attn::Dense, &Ffn::Dense, 5)?,
        time_fwd_bwd(&block, &x, &attn, &ffn, 5)?,
    );
    println!(
        "forward+backward (median of 5): dense {:.1} ms, sparse {:.1} ms",
        td * 1e3,
        ts * 1e3
    );

    let shape = LayerShape {
        batch: b,
        seq_len: l,
        hidden: e,
        heads,
        intermediate: f,
        dtype_bytes: 4,
        dropout: false,
    };
    let bd = activation_bytes(&shape, AttentionCost::Dense, FfnCost::Dense);
    let bs = activation_bytes(
        &shape,
        AttentionCost::Sparse { k },
        FfnCost::Routed {
            n_blocks: 8,
            top_k: 2,
        },
    );
    println!(
        "activations kept for backward: dense {:.1} MiB (attention {:.1}), sparse {:.1} MiB (attention {:.1})",
        bd.total() as f64 / 1048576.0,
        bd.attention_scores as f64 / 1048576.0,
        bs.total() as f64 / 1048576.0,
        bs.attention_scores as f64 / 1048576.0
    );
    Ok(())
}
