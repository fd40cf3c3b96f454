//! The routed FFN's linear correction `y + [x, 1] C` as one op against its composed form
//! (candle's matmul and adds, whose backward also forms the constant C's gradient), forward +
//! backward of `Σ out ⊙ u` with y and x tracked, in one process and interleaved rep by rep; the
//! op with f32 and with bf16 products (`MatmulPrecision`), the composed form in f32 both times.
//! Bytes: heap held between the forward and the backward. Writes
//! `bench/results/linear-correction.json`.
//!
//! Run: `cargo bench -p spt-ops --bench correction`.

use candle_core::{DType, Result, Tensor, Var};
use spt_ops::gradcheck::randn_f64;
use spt_ops::routed_ffn::{add_linear_correction, linear_correction_reference};
use spt_ops::{set_matmul_precision, MatmulPrecision};

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/compare.rs"]
mod compare;
#[path = "common/pool.rs"]
mod pool;
use compare::{compare, loadavg, machine, step, write_results};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// Reps timed per variant and case (after one warm-up).
const REPS: usize = 15;

type Op = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

fn main() -> Result<()> {
    alloc::keep_freed_memory();
    pool::run(bench)
}

fn bench() -> Result<()> {
    println!("{}; load average {}", machine(), loadavg());
    let f32t = |t: Tensor| t.to_dtype(DType::F32);
    let mut records = Vec::new();
    // MiniLM B8 × L512 (d 384) and GPT-2 small B4 × L512 (d 768): the tokens of a bench step.
    for (t, d) in [(4096usize, 384usize), (2048, 768)] {
        let y = Var::from_tensor(&f32t(randn_f64(&[t, d], 1)?)?)?;
        let x = Var::from_tensor(&f32t(randn_f64(&[t, d], 2)?)?)?;
        let c = f32t((randn_f64(&[d + 1, d], 3)? * 0.05)?)?;
        let u = f32t(randn_f64(&[t, d], 4)?)?;
        let run = |op: Op| step(|| op(y.as_tensor(), x.as_tensor(), &c)?.mul(&u)?.sum_all());
        for p in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
            set_matmul_precision(p);
            records.push(compare(
                "add_linear_correction",
                serde_json::json!({"tokens": t, "d": d, "matmul_precision": p.to_string()}),
                REPS,
                |_| run(add_linear_correction),
                |_| run(linear_correction_reference),
            )?);
        }
        set_matmul_precision(MatmulPrecision::F32);
    }
    write_results(
        "linear-correction.json",
        &serde_json::json!({
            "command": "cargo bench -p spt-ops --bench correction",
            "machine": machine(),
            "bf16_native": spt_ops::bf16_matmul_is_native(),
            "ours": "spt_ops::routed_ffn::add_linear_correction (one op: x C and dx = g Cᵀ, no gradient for the constant C; bf16 products under matmul_precision bf16)",
            "baseline": "the composed form in f32: y + x.matmul(C[..d]) + C[d] (candle's matmul backward also forms C's gradient)",
            "records": records,
        }),
    )
}
