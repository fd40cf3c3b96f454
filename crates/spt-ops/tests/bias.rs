//! `bias_add`: a bias over rows. f64 finite differences for both inputs (across the 64-row task
//! seam), candle's `broadcast_add` as reference over random shapes with x / b frozen or
//! tracked, a bias gradient independent of the thread count, and named errors for bad input.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::max_diff;
use spt_ops::bias::bias_add_reference;
use spt_ops::bias_add;
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    for (lead, n) in [(vec![3usize], 5usize), (vec![2, 70], 3), (vec![130], 1)] {
        let mut shape = lead.clone();
        shape.push(n);
        let x = randn_f64(&shape, 1)?;
        let b = randn_f64(&[n], 2)?;
        check_gradients(
            |t| bias_add(&t[0], &t[1]),
            &[x, b],
            &[0, 1],
            GradCheck {
                max_elems: 96,
                ..Default::default()
            },
        )
        .map_err(|e| candle_core::Error::Msg(format!("shape {shape:?}: {e}")))?;
    }
    Ok(())
}

/// The bias gradient is summed in fixed row tasks, so a one-thread pool gives the same bits.
#[test]
fn bias_gradient_is_independent_of_the_thread_count() -> Result<()> {
    let x = Var::from_tensor(&randn_f64(&[1000, 37], 3)?.to_dtype(DType::F32)?)?;
    let b = Var::from_tensor(&randn_f64(&[37], 4)?.to_dtype(DType::F32)?)?;
    let up = randn_f64(&[1000, 37], 5)?.to_dtype(DType::F32)?;
    let grad = || -> Result<Vec<u32>> {
        let g = (bias_add(x.as_tensor(), b.as_tensor())? * &up)?
            .sum_all()?
            .backward()?;
        let db = g.get(b.as_tensor()).expect("db").to_vec1::<f32>()?;
        Ok(db.iter().map(|v| v.to_bits()).collect())
    };
    let many = grad()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let one = pool.install(grad)?;
    assert_eq!(many, one);
    Ok(())
}

#[test]
fn bad_input_is_a_named_error() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 8), DType::F32, &dev)?;
    let err = |r: Result<Tensor>| r.unwrap_err().to_string();
    let e = err(bias_add(&x, &Tensor::zeros(7, DType::F32, &dev)?));
    assert!(
        e.contains("b is [7], expected [8]") && e.contains("[4, 8]"),
        "{e}"
    );
    let e = err(bias_add(&x, &Tensor::zeros((1, 8), DType::F32, &dev)?));
    assert!(e.contains("b is [1, 8], expected [8]"), "{e}");
    let e = err(bias_add(&x, &Tensor::zeros(8, DType::F64, &dev)?));
    assert!(e.contains("b has dtype F64"), "{e}");
    // Other dtypes take candle's path.
    let h = bias_add(&x.to_dtype(DType::BF16)?, &Tensor::ones(8, DType::BF16, &dev)?)?;
    assert_eq!(h.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?, 32.0);
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

    /// The op equals `broadcast_add` in values and in both gradients, over ranks 1 to 3, row
    /// counts across task seams, and x / b frozen or tracked.
    #[test]
    fn op_equals_broadcast_add(
        lead in proptest::collection::vec(1usize..90, 0..3), n in 1usize..70,
        x_tracked in proptest::bool::ANY, b_tracked in proptest::bool::ANY,
        seed in 0u64..10_000,
    ) {
        let run = || -> Result<()> {
            let mut shape = lead.clone();
            shape.push(n);
            let f = |s: &[usize], k: u64| randn_f64(s, seed * 8 + k).and_then(|t| t.to_dtype(DType::F32));
            let var = |t: Tensor, tracked: bool| -> Result<(Var, Tensor)> {
                let v = Var::from_tensor(&t)?;
                let t = if tracked { v.as_tensor().clone() } else { v.as_tensor().detach() };
                Ok((v, t))
            };
            let (xv, x) = var(f(&shape, 0)?, x_tracked)?;
            let (bv, b) = var(f(&[n], 1)?, b_tracked)?;
            let up = f(&shape, 4)?;
            let got = bias_add(&x, &b)?;
            let want = bias_add_reference(&x, &b)?;
            assert_eq!(max_diff(&got, &want)?, 0.0, "values");
            if !(x_tracked || b_tracked) {
                return Ok(());
            }
            let (gg, gw) = ((got * &up)?.sum_all()?.backward()?, (want * &up)?.sum_all()?.backward()?);
            for (v, tracked, name) in [(&xv, x_tracked, "dx"), (&bv, b_tracked, "db")] {
                let (a, b) = (gg.get(v.as_tensor()), gw.get(v.as_tensor()));
                assert_eq!(a.is_some(), tracked, "{name}: gradient presence");
                if let (Some(a), Some(b)) = (a, b) {
                    // dx is the upstream gradient itself; db sums up to 8100 rows in another
                    // order than candle.
                    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0) as f64;
                    let tol = if name == "dx" { 0.0 } else { 1e-5 * scale };
                    assert!(max_diff(a, b)? <= tol, "{name}");
                }
            }
            Ok(())
        };
        run().unwrap();
    }
}
