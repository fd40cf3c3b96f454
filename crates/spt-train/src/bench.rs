//! Pieces of `spt-train bench`: random weights for a config, a synthetic batch, timed training
//! steps and the process's peak resident set size.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use spt_models::{BertConfig, GPT2Config, WeightSource};

use crate::data::{EncodedDataset, EncodedItem, TaskKind};
use crate::optim::{AdamW, AdamWConfig};
use crate::rng::SplitMix64;
use crate::tasks::ModelTask;
use crate::trainer::{StepCtx, TrainTask};
use crate::{Error, Result};

/// normal(0, 0.02)-ish weights (uniform with the same std), seeded, for timing only.
fn random(shape: &[usize], rng: &mut SplitMix64, std: f64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let a = std * 3f64.sqrt();
    let v: Vec<f32> = (0..n)
        .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * a)
        .map(|x| x as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Random GPT-2 weights (HF names) for the config at `config_path`: for timing real shapes
/// without a checkpoint. Not a trained model.
pub fn random_gpt2_weights(config_path: &Path, seed: u64, device: &Device) -> Result<WeightSource> {
    let c = GPT2Config::from_file(config_path)?;
    let (e, inner) = (c.n_embd, c.inner_dim());
    let mut rng = SplitMix64::new(seed);
    let mut m: HashMap<String, Tensor> = HashMap::new();
    let ones = |n: usize| Tensor::ones(n, DType::F32, device);
    let zeros = |n: usize| Tensor::zeros(n, DType::F32, device);
    m.insert(
        "wte.weight".into(),
        random(&[c.vocab_size, e], &mut rng, 0.02, device)?,
    );
    m.insert(
        "wpe.weight".into(),
        random(&[c.n_positions, e], &mut rng, 0.01, device)?,
    );
    for i in 0..c.n_layer {
        let p = format!("h.{i}");
        for ln in ["ln_1", "ln_2"] {
            m.insert(format!("{p}.{ln}.weight"), ones(e)?);
            m.insert(format!("{p}.{ln}.bias"), zeros(e)?);
        }
        for (name, rows, cols) in [
            ("attn.c_attn", e, 3 * e),
            ("attn.c_proj", e, e),
            ("mlp.c_fc", e, inner),
            ("mlp.c_proj", inner, e),
        ] {
            m.insert(
                format!("{p}.{name}.weight"),
                random(&[rows, cols], &mut rng, 0.02, device)?,
            );
            m.insert(format!("{p}.{name}.bias"), zeros(cols)?);
        }
    }
    m.insert("ln_f.weight".into(), ones(e)?);
    m.insert("ln_f.bias".into(), zeros(e)?);
    if !c.tie_word_embeddings {
        // An untied model has its own output layer (it failed to build without one).
        m.insert(
            "lm_head.weight".into(),
            random(&[c.vocab_size, e], &mut rng, 0.02, device)?,
        );
    }
    Ok(WeightSource::from_tensors(m))
}

/// Random BERT weights (HF names, pooler included) for the config at `config_path`: for timing
/// real shapes where the checkpoint is not at hand (e.g. a GPU machine the weights cannot reach).
/// Not a trained model.
pub fn random_bert_weights(config_path: &Path, seed: u64, device: &Device) -> Result<WeightSource> {
    let c = BertConfig::from_file(config_path)?;
    let (h, inner) = (c.hidden_size, c.intermediate_size);
    let mut rng = SplitMix64::new(seed);
    let mut m: HashMap<String, Tensor> = HashMap::new();
    let norm = |m: &mut HashMap<String, Tensor>, p: &str| -> Result<()> {
        m.insert(format!("{p}.weight"), Tensor::ones(h, DType::F32, device)?);
        m.insert(format!("{p}.bias"), Tensor::zeros(h, DType::F32, device)?);
        Ok(())
    };
    for (name, rows) in [
        ("word_embeddings", c.vocab_size),
        ("position_embeddings", c.max_position_embeddings),
        ("token_type_embeddings", c.type_vocab_size),
    ] {
        m.insert(
            format!("embeddings.{name}.weight"),
            random(&[rows, h], &mut rng, 0.02, device)?,
        );
    }
    norm(&mut m, "embeddings.LayerNorm")?;
    let mut linears = vec![("pooler.dense".to_string(), h, h)];
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for name in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            linears.push((format!("{p}.{name}"), h, h));
        }
        linears.push((format!("{p}.intermediate.dense"), inner, h));
        linears.push((format!("{p}.output.dense"), h, inner));
        norm(&mut m, &format!("{p}.attention.output.LayerNorm"))?;
        norm(&mut m, &format!("{p}.output.LayerNorm"))?;
    }
    // HF layout: weight [out, in].
    for (name, out, inp) in linears {
        m.insert(
            format!("{name}.weight"),
            random(&[out, inp], &mut rng, 0.02, device)?,
        );
        m.insert(format!("{name}.bias"), Tensor::zeros(out, DType::F32, device)?);
    }
    Ok(WeightSource::from_tensors(m))
}

/// Runs `f` and returns its result with the peak device memory it added, on CUDA: the device's
/// bytes in use (total − free, so the allocator's pool counts) sampled every 2 ms on another
/// thread, peak minus the value before `f`. `None` on the CPU (peak RSS covers it there).
pub fn with_peak_device_memory<R>(
    device: &Device,
    f: impl FnOnce() -> Result<R>,
) -> Result<(R, Option<u64>)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let ctx = d.cuda_stream().context().clone();
        let used = move || -> Result<u64> {
            let (free, total) = ctx
                .mem_get_info()
                .map_err(|e| Error::Msg(format!("reading CUDA memory use: {e:?}")))?;
            Ok((total - free) as u64)
        };
        device.synchronize()?;
        let before = used()?;
        let (stop, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(before)));
        let sampler = {
            let (stop, peak, used) = (stop.clone(), peak.clone(), used.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(u) = used() {
                        peak.fetch_max(u, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
        };
        let r = f();
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        return Ok((r?, Some(peak.load(Ordering::Relaxed).saturating_sub(before))));
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok((f()?, None))
}

/// A dataset of `b` random sequences of length `l` (labels in 0..2 for classify).
pub fn synthetic_data(task: TaskKind, vocab: usize, b: usize, l: usize, seed: u64) -> EncodedDataset {
    let mut rng = SplitMix64::new(seed);
    let items = (0..b)
        .map(|_| EncodedItem {
            input_ids: (0..l).map(|_| rng.below(vocab as u64) as u32).collect(),
            token_type_ids: vec![0; l],
            label: (task == TaskKind::Classify).then(|| rng.below(2) as u32),
        })
        .collect();
    EncodedDataset {
        task,
        items,
        pad_id: 0,
    }
}

/// Runs `warmup + steps` full training steps (forward, backward, AdamW) on `data` as one batch
/// and returns the timed steps' seconds.
pub fn time_steps(
    task: &mut ModelTask,
    data: &EncodedDataset,
    warmup: usize,
    steps: usize,
    device: &Device,
) -> Result<Vec<f64>> {
    let idx: Vec<usize> = (0..data.len()).collect();
    let batch = data.batch(&idx, device)?;
    let mut opt = AdamW::new(task.trainable(), AdamWConfig::default())?;
    let mut times = Vec::with_capacity(steps);
    for s in 0..warmup + steps {
        let t0 = Instant::now();
        let ctx = StepCtx {
            step: s as u64,
            micro: 0,
            seed: s as u64,
            train: true,
        };
        // As the trainer runs a step: on the pool.
        spt_ops::on_pool(device, || -> Result<()> {
            let loss = task.loss(&batch, &ctx)?;
            let grads = loss.backward()?;
            opt.step(&grads, 1e-5)?;
            drop(grads);
            task.after_step(s as u64 + 1)?;
            Ok(())
        })?;
        let dt = t0.elapsed().as_secs_f64();
        if s >= warmup {
            times.push(dt);
        }
    }
    Ok(times)
}

/// The median of `xs` (NaN when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Peak resident set size of this process in bytes (`VmHWM` of /proc/self/status).
pub fn peak_rss_bytes() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status").map_err(|e| Error::io("/proc/self/status", e))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| Error::Msg("no VmHWM in /proc/self/status".into()))
}

/// Runs the current benchmark binary once per mode, each in a fresh process with `env` set to
/// the mode (and this process's arguments), so that each peak RSS is that mode's own; returns
/// the JSON records the children print on stdout, one a line. Their stderr passes through.
pub fn child_records(env: &str, modes: &[&str]) -> Result<Vec<serde_json::Value>> {
    let exe = std::env::current_exe().map_err(|e| Error::io("the benchmark binary", e))?;
    let mut records = Vec::new();
    for mode in modes {
        let out = std::process::Command::new(&exe)
            .args(std::env::args().skip(1))
            .env(env, mode)
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| Error::io(&exe, e))?;
        if !out.status.success() {
            return Err(Error::Msg(format!("the {mode} child failed ({})", out.status)));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            records
                .push(serde_json::from_str(line).map_err(|e| Error::Msg(format!("the {mode} child: {e}")))?);
        }
    }
    Ok(records)
}

/// The `machine` object of a result file on the CPU: see [`machine_json_on`].
pub fn machine_json() -> serde_json::Value {
    machine_json_on("cpu")
}

/// The `machine` object of a result file: CPUs, the CPU's model name, OS, architecture and
/// `device`. The model name matters: this project's machines changed CPU between sessions, and
/// ratios compare across them where seconds do not.
pub fn machine_json_on(device: &str) -> serde_json::Value {
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": spt_ops::cpu_model().unwrap_or_else(|| "unknown".into()),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "device": device,
    })
}

/// Writes a result file as pretty JSON through a temporary file and a rename.
pub fn write_results(path: &Path, doc: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(doc).map_err(|e| Error::Msg(e.to_string()))? + "\n";
    crate::checkpoint::write_file_atomic(path, text.as_bytes()).map_err(|e| Error::io(path, e))
}

/// What a benchmark binary does first, as the `spt-train` binary does: the thread count counted
/// once ([`crate::threads`]) and freed memory kept ([`crate::alloc`]). Returns the repository
/// root (where `bench/results` and the assets are).
pub fn start() -> Result<std::path::PathBuf> {
    crate::threads::fix_thread_count();
    crate::alloc::keep_freed_memory();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().map_err(|e| Error::io(&root, e))
}

/// A lower bound on the bytes a training step of `batch × seq_len` tokens keeps for its
/// backward in `model_dir`'s model (f32, spt-models' accounting), with attention keeping `keys`
/// keys per query and the FFN running `ffn_blocks.1` of `ffn_blocks.0` blocks when given. Read
/// from config.json alone, so that `bench` refuses a batch that cannot fit before it builds one.
/// A batch too large to count gives at least `usize::MAX` bytes.
pub fn activation_lower_bound(
    config_path: &Path,
    task: TaskKind,
    batch: usize,
    seq_len: usize,
    keys: Option<usize>,
    ffn_blocks: Option<(usize, usize)>,
) -> Result<u128> {
    use spt_models::{activation_bytes, AttentionCost, FfnCost};
    // f32, dropout not counted: a lower bound.
    let (shape, layers) = match task {
        TaskKind::Classify => {
            let c = BertConfig::from_file(config_path)?;
            (c.layer_shape(batch, seq_len, 4, false), c.num_hidden_layers)
        }
        TaskKind::Lm => {
            let c = GPT2Config::from_file(config_path)?;
            (c.layer_shape(batch, seq_len, 4, false), c.n_layer)
        }
    };
    let attn = match keys {
        Some(k) if k < seq_len => AttentionCost::Sparse { k },
        _ => AttentionCost::Dense,
    };
    let ffn = match ffn_blocks {
        Some((n_blocks, top_k)) => FfnCost::Routed { n_blocks, top_k },
        None => FfnCost::Dense,
    };
    // (Saturated at usize::MAX per layer when too large to count: refused all the same.)
    Ok(activation_bytes(&shape, attn, ffn).total() as u128 * layers as u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names_the_cpu_model() {
        let m = machine_json_on("cuda:0");
        assert_eq!(m["device"], "cuda:0");
        let cpu = m["cpu"].as_str().expect("a cpu field");
        // This project's machines are Linux x86-64: the model name is read, not defaulted.
        if std::path::Path::new("/proc/cpuinfo").is_file() && cfg!(target_arch = "x86_64") {
            assert!(!cpu.is_empty() && cpu != "unknown", "{cpu}");
        }
    }

    #[test]
    fn random_weights_build_tied_and_untied_gpt2() {
        let dir = tempfile::tempdir().unwrap();
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../spt-models/tests/fixtures/tiny-gpt2/config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
        for tied in [true, false] {
            cfg["tie_word_embeddings"] = tied.into();
            let path = dir.path().join("config.json");
            std::fs::write(&path, cfg.to_string()).unwrap();
            let w = random_gpt2_weights(&path, 1, &Device::Cpu).unwrap();
            let c = GPT2Config::from_file(&path).unwrap();
            let opts = spt_models::LoadOptions::default();
            let (_, report) = spt_models::GPT2LMHeadModel::load(&c, &w, &opts).unwrap();
            assert!(
                report.unused.is_empty() && report.initialised.is_empty(),
                "{report:?}"
            );
        }
    }
}
