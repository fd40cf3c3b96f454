//! `packed_linear` (a frozen weight packed once, bf16 products on AMX) against the f32 path a
//! frozen layer takes in inference (spt-models' `Linear`: `few_rows_matmul` plus `bias_add` up
//! to 64 rows, else `matmul_bias` with the weight's `[in, out]` copy), at MiniLM's layer shapes
//! for one text (26 tokens) and a length-sorted batch of 32 texts (870 tokens), and GPT-2
//! small's decoding step (one row: c_attn and the LM head). Both sides get their prepared
//! weight once; `pack_s` is what packing costs per call if it were not kept. Interleaved rep by
//! rep, each rep enough calls for ~20 ms. Writes `bench/results/packed-linear.json`.
//!
//! Run: `cargo bench -p spt-ops --bench packed`.

use candle_core::{DType, Result, Tensor};
use spt_ops::gradcheck::randn_f64;
use spt_ops::{bias_add, matmul_bias, packed_linear, PackedWeight};
use std::time::Instant;

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/compare.rs"]
mod compare;
#[path = "common/pool.rs"]
mod pool;
use compare::{compare, loadavg, machine, median, write_results};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

const REPS: usize = 15;

fn main() -> Result<()> {
    alloc::keep_freed_memory();
    pool::run(bench)
}

/// Seconds per call of `f`, over `calls` calls.
fn per_call(calls: usize, f: impl Fn() -> Result<Tensor>) -> Result<(f64, usize)> {
    let t0 = Instant::now();
    for _ in 0..calls {
        f()?;
    }
    Ok((t0.elapsed().as_secs_f64() / calls as f64, 0))
}

fn bench() -> Result<()> {
    println!("{}; load average {}", machine(), loadavg());
    let f32t = |shape: &[usize], seed| randn_f64(shape, seed)?.to_dtype(DType::F32);
    let mut records = Vec::new();
    let cases = [
        ("MiniLM, one text", 26, 384, 1536),
        ("MiniLM, one text", 26, 1536, 384),
        ("MiniLM, one text", 26, 384, 384),
        ("MiniLM, sorted batch of 32", 870, 384, 1536),
        ("MiniLM, sorted batch of 32", 870, 1536, 384),
        ("MiniLM, sorted batch of 32", 870, 384, 384),
        ("GPT-2 small, decoding", 1, 768, 2304),
        ("GPT-2 small, decoding (LM head)", 1, 768, 50257),
    ];
    for (what, rows, d_in, out) in cases {
        let w = (f32t(&[out, d_in], 1)? * 0.05)?;
        let b = f32t(&[out], 2)?;
        let x = f32t(&[rows, d_in], 3)?;
        let w_in_out = w.t()?.contiguous()?;
        let packed = PackedWeight::new(&w)?;
        let calls = (2e7 / (rows * d_in * out) as f64).ceil().clamp(1.0, 2000.0) as usize;
        let mut pack_s: Vec<f64> = (0..5)
            .map(|_| {
                let t0 = Instant::now();
                PackedWeight::new(&w).map(|_| t0.elapsed().as_secs_f64())
            })
            .collect::<Result<_>>()?;
        let mut rec = compare(
            "packed_linear",
            serde_json::json!({"shape": what, "rows": rows, "in": d_in, "out": out}),
            REPS,
            |_| per_call(calls, || packed_linear(&x, &packed, Some(&b))),
            |_| {
                per_call(calls, || {
                    if rows <= 64 {
                        let y = spt_ops::lora::few_rows_matmul(&x, &w)?;
                        bias_add(&y, &b)
                    } else {
                        matmul_bias(&x, &w_in_out, &b)
                    }
                })
            },
        )?;
        rec["pack_s"] = median(&mut pack_s).into();
        rec["calls_per_rep"] = calls.into();
        records.push(rec);
    }
    write_results(
        "packed-linear.json",
        &serde_json::json!({
            "command": "cargo bench -p spt-ops --bench packed",
            "machine": machine(),
            "bf16_native": spt_ops::bf16_matmul_is_native(),
            "ours": "spt_ops::packed_linear: x Wᵀ + b with W packed once (bf16, AMX tiles), x rounded to bf16 on the fly, f32 sums; the weight as a frozen layer keeps it (pack_s: packing it once)",
            "baseline": "the f32 path of a frozen Linear in inference: few_rows_matmul + bias_add up to 64 rows, else matmul_bias with the weight's [in, out] copy (gemm)",
            "records": records,
        }),
    )
}
