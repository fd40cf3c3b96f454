//! The layer ops against their composed forms, forward + backward, in one process and
//! interleaved rep by rep (benches/common/compare.rs), f32 on the CPU:
//!
//! - `linear_cross_entropy` (output layer + cross-entropy, no `[N, V]` logits kept) against
//!   `linear_cross_entropy_reference` (candle matmul, log-softmax from candle ops, gather: what a
//!   candle model writes), at GPT-2 small's LM head (B 4 × L 512 tokens, d 768, V 50257), with
//!   the head frozen (LoRA / SPT fine-tuning: it is the tied token embedding) and trainable (full
//!   fine-tuning). h is a `Var`; the loss is the mean over rows. Writes
//!   `bench/results/linear-cross-entropy.json`.
//! - `lora_linear` (frozen W and b, trainable rank-8 A and B, one op) against the same layer from
//!   candle matmuls (`x Wᵀ + b + s·(x Aᵀ) Bᵀ`, W and b plain tensors), at MiniLM's (B 8 × L 512,
//!   d 384) and GPT-2 small's (B 4 × L 512, d 768) projections. x is a `Var` (a layer inside a
//!   model needs its input's gradient); the loss is `Σ y ⊙ u`. Writes
//!   `bench/results/lora-linear.json`.
//! - `layer_norm`, `softmax_last_dim` and `gelu_erf` / `gelu_tanh` against the composed forms
//!   (`spt_ops::norm::reference`'s layer norm and softmax from candle ops; candle's own GELU ops,
//!   which have a backward), at MiniLM's and GPT-2's sublayer, score and FFN-hidden shapes. x is
//!   a `Var`, gamma and beta frozen. The backward starts from `dy = 1` (candle's `backward` on a
//!   non-scalar): a loss such as `Σ y ⊙ u` costs candle more than these ops themselves (its
//!   backward multiplies through a broadcast gradient), which would hide the op. Writes
//!   `bench/results/norm-activation.json`.
//!
//! `scripts/peer-bench.sh --only layers` adds PyTorch's figures (bench/peer/layers.py) to all three.
//! Run: `cargo bench -p spt-ops --bench layers`.

use candle_core::{DType, Result, Tensor, Var};
use spt_ops::cross_entropy::linear_cross_entropy_reference;
use spt_ops::gradcheck::randn_f64;
use spt_ops::lora::lora_linear;
use spt_ops::norm::reference;
use spt_ops::{gelu_erf, gelu_tanh, layer_norm, linear_cross_entropy, softmax_last_dim, Reduction};

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/compare.rs"]
mod compare;
#[path = "common/pool.rs"]
mod pool;
use compare::{compare, loadavg, machine, step, write_results};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

const COMMAND: &str = "cargo bench -p spt-ops --bench layers";
/// LoRA rank and scale (alpha = 2 r, as the presets).
const RANK: usize = 8;
const LORA_SCALE: f64 = 2.0;

fn f32_randn(shape: &[usize], seed: u64, std: f64) -> Result<Tensor> {
    (randn_f64(shape, seed)? * std)?.to_dtype(DType::F32)
}

/// Token ids in `0..vocab`, from a fixed LCG (the same ids for both variants).
fn targets(n: usize, vocab: usize) -> Result<Tensor> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let ids: Vec<u32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect();
    Tensor::from_vec(ids, n, &candle_core::Device::Cpu)
}

fn doc(ours: &str, baseline: &str, records: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({
        "command": COMMAND,
        "machine": machine(),
        "ours": ours,
        "baseline": baseline,
        "records": records,
    })
}

fn lm_head(reps: usize) -> Result<Vec<serde_json::Value>> {
    let (rows, d, vocab) = (2048usize, 768usize, 50257usize);
    let h = Var::from_tensor(&f32_randn(&[rows, d], 1, 1.0)?)?;
    let w = f32_randn(&[vocab, d], 2, 0.02)?;
    let t = targets(rows, vocab)?;
    let mut records = Vec::new();
    for trainable in [false, true] {
        // A tracked W gets its gradient computed; a plain tensor is frozen.
        let wv = if trainable {
            Some(Var::from_tensor(&w)?)
        } else {
            None
        };
        let w = wv.as_ref().map_or(&w, |v| v.as_tensor());
        let case = serde_json::json!({
            "rows": rows, "d": d, "vocab": vocab,
            "weights": if trainable { "trainable" } else { "frozen" },
        });
        records.push(compare(
            "linear_cross_entropy",
            case,
            reps,
            |_| step(|| linear_cross_entropy(h.as_tensor(), w, &t, None, Reduction::Mean)),
            |_| step(|| linear_cross_entropy_reference(h.as_tensor(), w, &t, None, Reduction::Mean)),
        )?);
    }
    Ok(records)
}

/// The LoRA layer from candle ops, as a candle model writes it.
fn lora_composed(x: &Tensor, w: &Tensor, b: &Tensor, a: &Tensor, bb: &Tensor) -> Result<Tensor> {
    let base = x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?;
    base + (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&bb.t()?)? * LORA_SCALE)?
}

fn lora(reps: usize) -> Result<Vec<serde_json::Value>> {
    // (rows, in, out, which projection): MiniLM's q/k/v/o, fc1, fc2; GPT-2's c_attn, c_fc, c_proj (fc2).
    let shapes = [
        (4096usize, 384usize, 384usize, "MiniLM attention q / k / v / o"),
        (4096, 384, 1536, "MiniLM fc1"),
        (4096, 1536, 384, "MiniLM fc2"),
        (2048, 768, 2304, "GPT-2 c_attn"),
        (2048, 768, 3072, "GPT-2 fc1 (c_fc)"),
        (2048, 3072, 768, "GPT-2 fc2 (c_proj)"),
    ];
    let mut records = Vec::new();
    for (i, &(rows, d_in, d_out, what)) in shapes.iter().enumerate() {
        let seed = 10 * i as u64;
        let x = Var::from_tensor(&f32_randn(&[rows, d_in], seed, 1.0)?)?;
        let w = f32_randn(&[d_out, d_in], seed + 1, (d_in as f64).powf(-0.5))?;
        let b = f32_randn(&[d_out], seed + 2, 0.02)?;
        // Non-zero B (as after some training), so every product is real work.
        let a = Var::from_tensor(&f32_randn(&[RANK, d_in], seed + 3, 0.02)?)?;
        let bb = Var::from_tensor(&f32_randn(&[d_out, RANK], seed + 4, 0.01)?)?;
        let u = f32_randn(&[rows, d_out], seed + 5, 1.0)?;
        let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), bb.as_tensor());
        let case = serde_json::json!({"rows": rows, "in": d_in, "out": d_out, "rank": RANK, "layer": what});
        records.push(compare(
            "lora_linear",
            case,
            reps,
            |_| {
                step(|| {
                    lora_linear(xt, &w, Some(&b), at, bt, LORA_SCALE)?
                        .mul(&u)?
                        .sum_all()
                })
            },
            |_| step(|| lora_composed(xt, &w, &b, at, bt)?.mul(&u)?.sum_all()),
        )?);
    }
    Ok(records)
}

/// The norm or activation `op` on x, ours or its composed form; layer norm with frozen `g`, `b`.
fn norm_or_activation(op: &str, composed: bool, x: &Tensor, g: &Tensor, b: &Tensor) -> Result<Tensor> {
    match (op, composed) {
        ("layer_norm", false) => layer_norm(x, g, b, 1e-12),
        ("layer_norm", true) => reference::layer_norm(x, g, b, 1e-12),
        ("softmax", false) => softmax_last_dim(x),
        ("softmax", true) => reference::softmax(x),
        ("gelu_erf", false) => gelu_erf(x),
        ("gelu_erf", true) => x.gelu_erf(),
        ("gelu_tanh", false) => gelu_tanh(x),
        ("gelu_tanh", true) => x.gelu(),
        _ => candle_core::bail!("layers bench: no op {op}"),
    }
}

fn norm_activation(reps: usize) -> Result<Vec<serde_json::Value>> {
    // (op, rows, d, where the shape comes from)
    let cases = [
        ("layer_norm", 4096, 384, "MiniLM sublayer output"),
        ("layer_norm", 2048, 768, "GPT-2 sublayer input"),
        (
            "softmax",
            8 * 12 * 512,
            512,
            "MiniLM attention scores (B 8, H 12, L 512)",
        ),
        (
            "softmax",
            4 * 12 * 512,
            512,
            "GPT-2 attention scores (B 4, H 12, L 512)",
        ),
        ("gelu_erf", 4096, 1536, "MiniLM FFN hidden"),
        ("gelu_tanh", 2048, 3072, "GPT-2 FFN hidden"),
    ];
    let mut records = Vec::new();
    for (i, &(op, rows, d, what)) in cases.iter().enumerate() {
        let x = Var::from_tensor(&f32_randn(&[rows, d], 100 + i as u64, 1.0)?)?;
        let g = Tensor::ones(d, DType::F32, &candle_core::Device::Cpu)?;
        let b = Tensor::zeros(d, DType::F32, &candle_core::Device::Cpu)?;
        let case = serde_json::json!({"op": op, "rows": rows, "d": d, "shape": what});
        records.push(compare(
            op,
            case,
            reps,
            |_| step(|| norm_or_activation(op, false, x.as_tensor(), &g, &b)),
            |_| step(|| norm_or_activation(op, true, x.as_tensor(), &g, &b)),
        )?);
    }
    Ok(records)
}

fn main() -> Result<()> {
    alloc::keep_freed_memory();
    pool::run(bench)
}

fn bench() -> Result<()> {
    println!("machine: {}; load average {}", machine(), loadavg());
    write_results(
        "lora-linear.json",
        &doc(
            "spt_ops::lora::lora_linear (one op: the merged weight W + s·B A formed per call, one GEMM each way, x Aᵀ recomputed in backward, no dW)",
            "the layer from candle ops: x Wᵀ + b + s·(x Aᵀ) Bᵀ (six graph nodes; candle's matmul backward also forms the frozen W's gradient)",
            lora(11)?,
        ),
    )?;
    write_results(
        "linear-cross-entropy.json",
        &doc(
            "spt_ops::linear_cross_entropy (rows in chunks of 1024: logits, softmax − onehot and the gradients formed in the forward; no [N, V] tensor kept)",
            "spt_ops::cross_entropy::linear_cross_entropy_reference: candle matmul h Wᵀ, max-subtracted log-softmax from candle ops, gather, mean",
            lm_head(5)?,
        ),
    )?;
    write_results(
        "norm-activation.json",
        &doc(
            "spt_ops::layer_norm / softmax_last_dim / gelu_erf / gelu_tanh (one op each, vectorised, exact backward)",
            "layer norm and softmax from candle ops (spt_ops::norm::reference, autograd); candle's gelu_erf / gelu (tanh) ops with their backward",
            norm_activation(11)?,
        ),
    )
}
