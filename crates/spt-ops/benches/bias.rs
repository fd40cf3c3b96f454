//! `bias_add` (one op, a parallel bias gradient) against candle's `broadcast_add`, forward +
//! backward of `Σ y ⊙ u` with x and b both tracked (a dense linear layer's bias in full
//! fine-tuning), in one process and interleaved rep by rep. Bytes: heap held between the
//! forward and the backward. Writes `bench/results/bias-add.json`.
//!
//! Run: `cargo bench -p spt-ops --bench bias`.

use candle_core::{DType, Result, Tensor, Var};
use spt_ops::bias::bias_add_reference;
use spt_ops::bias_add;
use spt_ops::gradcheck::randn_f64;

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/compare.rs"]
mod compare;
#[path = "common/pool.rs"]
mod pool;
use compare::{compare, loadavg, step, write_results};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// Reps timed per variant and case (after one warm-up).
const REPS: usize = 21;

type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;

fn main() -> Result<()> {
    alloc::keep_freed_memory();
    pool::run(bench)
}

fn bench() -> Result<()> {
    let threads = rayon::current_num_threads();
    println!("{threads} rayon threads; load average {}", loadavg());
    let f32t = |t: Tensor| t.to_dtype(DType::F32);
    let mut records = Vec::new();
    // MiniLM B8 x L512 (d 384, d_ff 1536), GPT-2 small B4 x L512 (d 768, 3 d, d_ff 3072), and
    // the demo's batch of 16 x 64 tokens at d_ff 1536.
    for (rows, n) in [
        (4096usize, 384usize),
        (4096, 1536),
        (2048, 768),
        (2048, 2304),
        (2048, 3072),
        (1024, 1536),
    ] {
        let x = Var::from_tensor(&f32t(randn_f64(&[rows, n], 1)?)?)?;
        let b = Var::from_tensor(&f32t(randn_f64(&[n], 2)?)?)?;
        let u = f32t(randn_f64(&[rows, n], 3)?)?;
        let run = |op: Op| step(|| op(x.as_tensor(), b.as_tensor())?.mul(&u)?.sum_all());
        records.push(compare(
            "bias_add",
            serde_json::json!({"rows": rows, "n": n}),
            REPS,
            |_| run(bias_add),
            |_| run(bias_add_reference),
        )?);
    }
    write_results(
        "bias-add.json",
        &serde_json::json!({
            "command": "cargo bench -p spt-ops --bench bias",
            "machine": format!("{threads} rayon threads"),
            "ours": "spt_ops::bias_add (one op; the bias gradient summed over rows in parallel tasks)",
            "baseline": "candle's broadcast_add (its backward sums the bias gradient with sum_keepdim over the rows)",
            "records": records,
        }),
    )
}
