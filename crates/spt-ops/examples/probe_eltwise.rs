// Temporary profiling probe (not committed).
use candle_core::{DType, Device, Result, Tensor, Var};
use std::time::Instant;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> Result<()> {
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let _ = rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build_global();
    spt_ops::on_pool(&Device::Cpu, || -> Result<()> {
        let which = std::env::args().nth(1).unwrap_or("gelu".into());
        let reps: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(50);
        let (r, c) = if which == "gelu" {
            (4096, 1536)
        } else {
            (4096, 384)
        };
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (r, c), &Device::Cpu)?)?;
        let u = Tensor::randn(0f32, 1., (r, c), &Device::Cpu)?;
        let g = Tensor::ones(c, DType::F32, &Device::Cpu)?;
        let b = Tensor::zeros(c, DType::F32, &Device::Cpu)?;
        let mut ts = vec![];
        for _ in 0..reps {
            let t0 = Instant::now();
            let y = match which.as_str() {
                "gelu" => spt_ops::gelu_erf(x.as_tensor())?,
                "gelu_fwd" => {
                    let y = spt_ops::gelu_erf(x.as_tensor())?;
                    ts.push(t0.elapsed().as_secs_f64());
                    continue;
                }
                _ => spt_ops::layer_norm(x.as_tensor(), &g, &b, 1e-12)?,
            };
            let l = y.mul(&u)?.sum_all()?;
            let _g = l.backward()?;
            ts.push(t0.elapsed().as_secs_f64());
        }
        ts.sort_by(f64::total_cmp);
        println!("{which}: median {:.5} s", ts[ts.len() / 2]);
        Ok(())
    })
}
