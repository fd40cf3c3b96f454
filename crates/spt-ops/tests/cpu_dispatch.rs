//! The CPU kernels pick their instruction set at run time, so one binary runs on any x86-64.
//!
//! Where the dispatch happens:
//! - GEMM (candle's CPU matmul and spt-ops' grouped GEMMs): the `gemm` crate, built with its
//!   `x86-v4` feature (workspace Cargo.toml), checks `avx512f` once per call shape and otherwise
//!   takes its AVX2+FMA (or SSE / scalar) micro-kernels; the routed FFN's GEMMs over token rows
//!   take spt-ops' own AVX-512F kernel (`row_gemm.rs`) where the CPU has it and the shape
//!   gains from it, gemm otherwise;
//! - spt-ops' own dot / axpy / exp (`simd.rs`), GELU (`gelu_simd.rs`) and layer norm's f32 rows
//!   (`norm/rows.rs`): AVX2+FMA when detected, else scalar; GELU and the softmax exp take
//!   sixteen lanes with AVX-512F where the CPU has it.
//!
//! This test runs the same checks natively (AVX-512 where the CPU has it) and, under user-mode
//! QEMU, the fallback paths: a Haswell (AVX2+FMA, no AVX-512) and a Nehalem (SSE4.2 only: every
//! spt-ops kernel on its scalar path). QEMU comes from Debian's
//! `qemu-user`; `.ci/run` installs it and sets `SPT_REQUIRE_QEMU=1` so CI cannot skip that half.

use candle_core::{DType, Device, Tensor};

/// max |a − b| as f64.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    spt_ops::gradcheck::max_abs_diff(a, b).unwrap()
}

/// max |t|, at least 1: what an f32 rounding bound scales with.
fn scale_of(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1.0)
}

/// Seeded normal values in f32: the checks must not depend on the run (unseeded inputs once
/// put a layer norm error at 2.004e-6 against a 2e-6 bound).
fn randn32(shape: &[usize], seed: u64) -> Tensor {
    spt_ops::gradcheck::randn_f64(shape, seed)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// Matmuls of awkward shapes (edges of every micro-kernel tile), GELU and sparse attention
/// against f64 or dense references.
fn kernels_match_reference() {
    let dev = Device::Cpu;
    for (s, &(m, k, n)) in [(1, 1, 1), (7, 13, 5), (33, 64, 47), (64, 384, 96), (129, 70, 257)]
        .iter()
        .enumerate()
    {
        let a = randn32(&[m, k], 10 + s as u64);
        let b = randn32(&[k, n], 20 + s as u64);
        let got = a.matmul(&b).unwrap().to_dtype(DType::F64).unwrap();
        let want = a
            .to_dtype(DType::F64)
            .unwrap()
            .matmul(&b.to_dtype(DType::F64).unwrap())
            .unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(
            err < 1e-4 * (k as f64).sqrt(),
            "[{m}, {k}] x [{k}, {n}]: max error {err}"
        );
    }
    // The sparse attention kernels (simd.rs dot / axpy) against their dense reference.
    let [q, k, v] = [31, 32, 33].map(|seed| randn32(&[1, 2, 40, 16], seed));
    let mask = spt_ops::AttentionMask::causal();
    let dense = spt_ops::dense_attention(&q, &k, &v, &mask, 0.25).unwrap();
    // Every key selected: the sparse kernels must give dense attention.
    let pq = spt_ops::PqConfig {
        n_subspaces: 4,
        n_codewords: 4,
        ..Default::default()
    };
    let book = spt_ops::Codebook::fit(&k, &pq).unwrap();
    let sparse =
        spt_ops::pq_sparse_attention(&q, &k, &v, &book, spt_ops::KeyTopK::Fraction(1.0), &mask, 0.25)
            .unwrap();
    let err = max_abs_diff(&dense, &sparse);
    assert!(err < 1e-5, "sparse attention with every key vs dense: {err}");
    // The routed FFN's grouped GEMMs (row_gemm.rs's AVX-512 kernel where the CPU has it and a
    // group has 128 rows or more, gather + gemm + scatter otherwise), forward and the gradients
    // of x, the gates and the weights, f32 against f64. 1100 tokens: two chunks of 512 whose
    // groups (~205 rows, no two tokens adjacent) take the kernel, and a last chunk of 76 whose
    // groups do not; widths leave partial vectors and 6-row tiles.
    let (t, d, n, b, k) = (1100, 83, 5, 24, 2);
    let blocks: Vec<u32> = (0..t * k).map(|i| ((i / k * 3 + i % k) % n) as u32).collect();
    let routing = std::sync::Arc::new(spt_ops::Routing::from_blocks(t, n, k, blocks).unwrap());
    let ins = [
        vec![t, d],
        vec![t * k],
        vec![n * b, d],
        vec![n * b],
        vec![d, n * b],
        vec![d],
        vec![t, d],
    ]
    .iter()
    .enumerate()
    .map(|(i, shape)| spt_ops::gradcheck::randn_f64(shape, 60 + i as u64).unwrap())
    .collect::<Vec<_>>();
    let run = |dt: DType| {
        let v: Vec<candle_core::Var> = ins[..6]
            .iter()
            .map(|t| {
                candle_core::Var::from_tensor(&t.to_dtype(DType::F32).unwrap().to_dtype(dt).unwrap()).unwrap()
            })
            .collect();
        let act = Some(spt_ops::Activation::GeluErf);
        let h = spt_ops::routed_ffn::gather_matmul_act(&v[0], &v[2], Some(&v[3]), act, &routing).unwrap();
        let y = spt_ops::routed_ffn::scatter_matmul_bias(&h, &v[1], &v[4], Some(&v[5]), &routing).unwrap();
        let up = ins[6].to_dtype(dt).unwrap();
        let g = (&y * up).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![y];
        out.extend(v.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
        out
    };
    let (got, want) = (run(DType::F32), run(DType::F64));
    for (name, (a, b)) in ["y", "dx", "dgates", "dW1", "db1", "dW2", "db2"]
        .iter()
        .zip(got.iter().zip(&want))
    {
        // f32 rounding scales with the values (sums of ~100 unit products here).
        let (err, scale) = (max_abs_diff(a, b), scale_of(b));
        eprintln!("routed FFN {name}: max error {err:.3e}, values up to {scale:.1}");
        assert!(
            err < 2e-6 * scale,
            "routed FFN {name}, f32 vs f64: {err} (values up to {scale})"
        );
    }
    // GELU (both forms) and its backward, on a length that leaves a partial SIMD lane.
    let x = Tensor::arange(0u32, 1003, &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .affine(0.012, -6.0)
        .unwrap();
    for act in [spt_ops::Activation::GeluErf, spt_ops::Activation::GeluTanh] {
        let x32 = candle_core::Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let x64 = candle_core::Var::from_tensor(&x32.to_dtype(DType::F64).unwrap()).unwrap();
        let y32 = act.forward(&x32).unwrap();
        let y64 = act.forward(&x64).unwrap();
        let err = max_abs_diff(&y32, &y64);
        assert!(err < 1.5e-6, "{act:?} forward vs f64: {err}");
        let g32 = y32.sum_all().unwrap().backward().unwrap();
        let g64 = y64.sum_all().unwrap().backward().unwrap();
        let err = max_abs_diff(g32.get(&x32).unwrap(), g64.get(&x64).unwrap());
        assert!(err < 1.5e-6, "{act:?} derivative vs f64: {err}");
    }
    // Layer norm and the fused residual form (norm/rows.rs's kernels), forward and the gradients
    // of every input, in f32 against f64, at a width that leaves a partial SIMD chunk.
    let d = 389;
    let vars = [(0u64, vec![6, d]), (1, vec![6, d]), (2, vec![d]), (3, vec![d])].map(|(i, shape)| {
        let t = spt_ops::gradcheck::randn_f64(&shape, 40 + i)
            .unwrap()
            .affine(1.0, i as f64 * 0.3)
            .unwrap();
        (
            candle_core::Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap(),
            candle_core::Var::from_tensor(&t.to_dtype(DType::F32).unwrap().to_dtype(DType::F64).unwrap())
                .unwrap(),
        )
    });
    for fused in [false, true] {
        let run = |v: [&Tensor; 4]| {
            let y = if fused {
                spt_ops::residual_layer_norm(v[0], v[1], v[2], v[3], 1e-5, None).unwrap()
            } else {
                spt_ops::layer_norm(v[0], v[2], v[3], 1e-5).unwrap()
            };
            // A weighted loss, so the backward sees a non-uniform dy.
            let w = Tensor::arange(0u32, y.elem_count() as u32, &dev)
                .unwrap()
                .to_dtype(y.dtype())
                .unwrap();
            let w = (w.reshape(y.shape()).unwrap() * 0.01).unwrap().sin().unwrap();
            let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g)
        };
        let (y32, g32) = run(vars.each_ref().map(|v| v.0.as_tensor()));
        let (y64, g64) = run(vars.each_ref().map(|v| v.1.as_tensor()));
        // f32 rounding scales with the outputs (up to ~8 here): a bound relative to them.
        let (err, scale) = (max_abs_diff(&y32, &y64), scale_of(&y64));
        eprintln!("layer norm (fused {fused}): max error {err:.3e}, outputs up to {scale:.2}");
        assert!(
            err < 4e-7 * scale,
            "layer norm (fused {fused}) forward vs f64: {err} (outputs up to {scale})"
        );
        // Every input has a gradient; the plain norm has no residual (input 1).
        for (i, (v32, v64)) in vars.iter().enumerate() {
            let has = (g32.get(v32).is_some(), g64.get(v64).is_some());
            assert_eq!(
                has,
                (fused || i != 1, fused || i != 1),
                "layer norm (fused {fused}) input {i}"
            );
            let Some(want) = g64.get(v64) else { continue };
            let err = max_abs_diff(g32.get(v32).unwrap(), want);
            assert!(
                err < 1e-5,
                "layer norm (fused {fused}) gradient of input {i} vs f64: {err}"
            );
        }
    }
}

#[test]
fn kernels_are_right_on_this_cpu_and_on_an_avx2_only_cpu() {
    if std::env::var_os("SPT_DISPATCH_CHILD").is_some() {
        // The emulated run: report what this CPU has, then check.
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        eprintln!("child: avx512f {avx512}, simd path {}", spt_ops::simd_path());
        assert!(!avx512, "the emulated CPU should lack AVX-512");
        kernels_match_reference();
        return;
    }
    eprintln!(
        "native: avx512f {}, simd path {}",
        std::arch::is_x86_feature_detected!("avx512f"),
        spt_ops::simd_path()
    );
    kernels_match_reference();

    let qemu = ["qemu-x86_64", "qemu-x86_64-static"]
        .into_iter()
        .find(|q| std::process::Command::new(q).arg("--version").output().is_ok());
    let Some(qemu) = qemu else {
        assert!(
            std::env::var_os("SPT_REQUIRE_QEMU").is_none(),
            "SPT_REQUIRE_QEMU is set but qemu-x86_64 is not installed (apt-get install qemu-user)"
        );
        eprintln!("skipped the AVX2-only half: qemu-x86_64 not installed (apt-get install qemu-user)");
        return;
    };
    let exe = std::env::current_exe().unwrap();
    for (cpu, path) in [("Haswell", "avx2+fma"), ("Nehalem", "scalar")] {
        let out = std::process::Command::new(qemu)
            .args(["-cpu", cpu])
            .arg(&exe)
            .args([
                "--exact",
                "kernels_are_right_on_this_cpu_and_on_an_avx2_only_cpu",
                "--nocapture",
            ])
            .env("SPT_DISPATCH_CHILD", "1")
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the {cpu} run failed: {log}");
        for line in log.lines().filter(|l| l.starts_with("layer norm")) {
            eprintln!("{cpu}: {line}");
        }
        assert!(
            log.contains(&format!("child: avx512f false, simd path {path}")),
            "{cpu}: {log}"
        );
    }
}
