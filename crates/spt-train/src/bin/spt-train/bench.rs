//! `spt-train bench`: time fine-tuning steps, dense vs LoRA vs SPT, each mode in a fresh child
//! process.

use crate::say;
use std::path::{Path, PathBuf};

use crate::common::{check_output_file, device, mode_name, task_of};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use spt_ops::MatmulPrecision;
use spt_train::config::{resolve_model, FinetuneConfig, Mode};
use spt_train::data::TaskKind;
use spt_train::tasks::{calibration_batches, ModelTask};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Model directory or hub id whose config gives the shapes.
    #[arg(long)]
    pub(crate) model: String,
    #[arg(long, value_enum, default_values_t = [Mode::Dense, Mode::Lora, Mode::Spt], value_delimiter = ',')]
    pub(crate) modes: Vec<Mode>,
    #[arg(long, default_value_t = 8)]
    pub(crate) batch_size: usize,
    #[arg(long, default_value_t = 512)]
    pub(crate) seq_len: usize,
    /// Timed steps per mode (median reported).
    #[arg(long, default_value_t = 5)]
    pub(crate) steps: usize,
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: usize,
    /// Keys per query in spt mode (default: the fast preset's, every key).
    #[arg(long)]
    pub(crate) attn_k: Option<usize>,
    /// FFN blocks kept per token (of 8) in spt mode (default: the fast preset's, 2).
    #[arg(long)]
    pub(crate) ffn_top_k: Option<usize>,
    /// The linear correction for skipped FFN blocks in spt mode (default: the fast preset's, on).
    #[arg(long)]
    pub(crate) ffn_correction: Option<bool>,
    /// Write results JSON here (bench/results/finetune-speed.json format).
    #[arg(long)]
    pub(crate) output: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// f32 or bf16: the precision of the CPU's products with layer weights (as finetune's
    /// --matmul-precision); a bf16 run's records name it in their case.
    #[arg(long, default_value_t = MatmulPrecision::F32, value_name = "f32|bf16")]
    pub(crate) matmul_precision: MatmulPrecision,
    /// Replace this model's records in an existing --output file instead of starting a new one.
    #[arg(long)]
    pub(crate) append: bool,
    /// Internal: time one mode in this process and print one JSON line.
    #[arg(long, hide = true)]
    pub(crate) child: Option<Mode>,
}

pub(crate) fn bench(a: &BenchArgs) -> Result<()> {
    if a.batch_size == 0 || a.seq_len == 0 || a.steps == 0 {
        bail!("--batch-size, --seq-len and --steps must be at least 1");
    }
    let blocks = FinetuneConfig::default().ffn_blocks;
    if let Some(k) = a.ffn_top_k.filter(|&k| k == 0 || k > blocks) {
        bail!("--ffn-top-k is {k}, expected 1 to {blocks} (the FFN has {blocks} blocks)");
    }
    if a.attn_k == Some(0) {
        bail!("--attn-k must be at least 1");
    }
    if a.append && a.output.is_none() {
        bail!("--append merges into an --output file; give one");
    }
    // Recorded as the setting, a k past the keys would name a sparsity that never ran.
    if let Some(k) = a.attn_k.filter(|&k| k > a.seq_len) {
        bail!(
            "--attn-k {k} exceeds the {} keys of --seq-len {}: at most {} (every key)",
            a.seq_len,
            a.seq_len,
            a.seq_len
        );
    }
    if let Some(m) = a
        .modes
        .iter()
        .enumerate()
        .find_map(|(i, m)| a.modes[..i].contains(m).then_some(m))
    {
        bail!("--modes names {} twice; each mode is timed once", mode_name(*m));
    }
    let spt_flags = [
        a.attn_k.map(|_| "--attn-k"),
        a.ffn_top_k.map(|_| "--ffn-top-k"),
        a.ffn_correction.map(|_| "--ffn-correction"),
    ];
    if a.child.is_none() && !a.modes.contains(&Mode::Spt) {
        if let Some(flag) = spt_flags.into_iter().flatten().next() {
            bail!("{flag} sets the spt mode, which --modes leaves out; add spt to --modes or drop {flag}");
        }
    }
    if let Some(out) = a.output.as_deref().filter(|_| a.child.is_none()) {
        let what =
            "a record of spt-train bench (a JSON object with `records` and the `command` that wrote them)";
        check_output_file(out, "--output", what, is_bench_record)?;
    }
    if a.matmul_precision == MatmulPrecision::Bf16 && a.device != "cpu" {
        bail!(
            "--matmul-precision bf16 is a setting of the CPU kernels, and --device is {}",
            a.device
        );
    }
    let dev = device(&a.device)?;
    let model_dir = resolve_model(&a.model)?;
    if let Some(mode) = a.child {
        return bench_child(a, mode, &model_dir, &dev);
    }
    // Checked here, before a child process starts and builds the model only to refuse it.
    if let Some(max) = spt_train::pipeline::model_max_length(&model_dir).filter(|&m| a.seq_len > m) {
        bail!(
            "--seq-len {} exceeds the {max} positions of {} (its config.json)",
            a.seq_len,
            model_dir.display()
        );
    }
    if a.seq_len < 2 && task_of(&a.model)? == TaskKind::Lm {
        bail!("--seq-len 1: a language model's next-token loss needs at least 2 tokens");
    }
    check_batch_fits(a, &model_dir)?;
    crate::common::apply_matmul_precision(a.matmul_precision);
    let model_name = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| a.model.clone());
    // Which model, wherever the command runs and whichever clone holds it, without writing a
    // path into the record: its config and the sizes of its weight files.
    let model_id = {
        let mut key = std::fs::read(model_dir.join("config.json")).unwrap_or_default();
        let mut weights: Vec<String> = std::fs::read_dir(&model_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.ends_with(".safetensors") || n == "pytorch_model.bin"
            })
            .map(|e| {
                format!(
                    "\n{}:{}",
                    e.file_name().to_string_lossy(),
                    e.metadata().map_or(0, |m| m.len())
                )
            })
            .collect();
        weights.sort();
        key.extend(weights.concat().bytes());
        format!("{:016x}", spt_train::checkpoint::fnv1a64(&key))
    };
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let load_before = loadavg();
    let exe = std::env::current_exe().context("locating the spt-train executable")?;
    let mut results: Vec<(Mode, serde_json::Value)> = Vec::new();
    for &mode in &a.modes {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["-q", "bench", "--model"])
            .arg(&a.model)
            .args(["--batch-size", &a.batch_size.to_string()])
            .args(["--seq-len", &a.seq_len.to_string()])
            .args(["--steps", &a.steps.to_string()])
            .args(["--warmup", &a.warmup.to_string()])
            .args(["--device", &a.device])
            .args(["--matmul-precision", &a.matmul_precision.to_string()])
            .args(["--child", &format!("{mode:?}").to_lowercase()]);
        if let Some(k) = a.attn_k {
            cmd.args(["--attn-k", &k.to_string()]);
        }
        if let Some(k) = a.ffn_top_k {
            cmd.args(["--ffn-top-k", &k.to_string()]);
        }
        if let Some(c) = a.ffn_correction {
            cmd.args(["--ffn-correction", &c.to_string()]);
        }
        eprintln!(
            "bench: {model_name} B{}xL{} {mode:?} ...",
            a.batch_size, a.seq_len
        );
        let out = cmd
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            #[cfg(unix)]
            let signal = std::os::unix::process::ExitStatusExt::signal(&out.status);
            #[cfg(not(unix))]
            let signal: Option<i32> = None;
            let why = match signal {
                // SIGKILL with no message of its own: the kernel's out-of-memory killer, as a rule.
                Some(9) => {
                    " killed by SIGKILL (out of memory, most likely: try a smaller --batch-size or --seq-len)"
                }
                Some(_) => " killed by a signal",
                None => "",
            };
            bail!(
                "the {mode:?} child failed{why}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("parsing the {mode:?} child's output `{}`", line.trim()))?;
        eprintln!(
            "bench: {mode:?}: median {:.3} s/step, peak RSS {:.0} MiB",
            v["median_s"].as_f64().unwrap_or(f64::NAN),
            v["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0
        );
        results.push((mode, v));
    }
    let load_after = loadavg();
    // With a non-default sparsity, each record's case names the run's spt setting, so runs at
    // different settings can share one --output file.
    let setting = (a.attn_k.is_some() || a.ffn_top_k.is_some() || a.ffn_correction.is_some()).then(|| {
        let d = spt_train::presets::base_config(
            Mode::Spt,
            TaskKind::Classify,
            Some(spt_train::presets::Preset::Fast),
        );
        format!(
            "spt k = {}, FFN {}/{}{}",
            a.attn_k.unwrap_or_else(|| preset_keys(a.seq_len)),
            a.ffn_top_k.unwrap_or(d.ffn_top_k),
            d.ffn_blocks,
            match a.ffn_correction.unwrap_or(d.ffn_correction) {
                true => ", linear correction",
                false => "",
            }
        )
    });
    // A bf16 run's records name their precision in the case (f32 ones keep the old case).
    let precision = (a.matmul_precision != MatmulPrecision::F32).then(|| a.matmul_precision.to_string());
    let base = results
        .iter()
        .find(|(m, _)| *m == Mode::Dense)
        .map(|(_, v)| v.clone());
    let records: Vec<serde_json::Value> = results
        .iter()
        .map(|(mode, v)| {
            let ours = v["median_s"].as_f64().unwrap_or(f64::NAN);
            let ours_b = v["peak_rss_bytes"].as_u64().unwrap_or(0);
            let (bs, bb, bg) = match &base {
                Some(b) => (
                    b["median_s"].as_f64(),
                    b["peak_rss_bytes"].as_u64(),
                    b["peak_device_bytes"].as_u64(),
                ),
                None => (None, None, None),
            };
            let ours_g = v["peak_device_bytes"].as_u64();
            let mut case = serde_json::json!({"model": model_name, "B": a.batch_size, "L": a.seq_len, "mode": format!("{mode:?}").to_lowercase()});
            if let Some(s) = &setting {
                case["setting"] = s.clone().into();
            }
            if let Some(p) = &precision {
                case["matmul_precision"] = p.clone().into();
            }
            serde_json::json!({
                "case": case,
                "ours_s": ours,
                "baseline_s": bs,
                "speedup": bs.map(|b| b / ours),
                "ours_bytes": ours_b,
                "baseline_bytes": bb,
                "memory_ratio": bb.map(|b| ours_b as f64 / b as f64),
                "bytes_kind": "peak RSS",
                "ours_device_bytes": ours_g,
                "baseline_device_bytes": bg,
                "device_memory_ratio": ours_g.zip(bg).map(|(o, b)| o as f64 / b as f64),
                "baseline": "dense full fine-tuning, same run",
                "steps": a.steps,
                "warmup": a.warmup,
                "step_times_s": v["step_times_s"],
                "build_s": v["build_s"],
                "trainable_params": v["trainable_params"],
                "total_params": v["total_params"],
                "attn_k": v["attn_k"],
                "ffn_top_k": v["ffn_top_k"],
                "ffn_correction": v["ffn_correction"],
                "weights": v["weights"],
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "model_id": model_id,
            })
        })
        .collect();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let machine = spt_train::bench::machine_json_on(&a.device);
    let mut doc = serde_json::json!({"command": command, "machine": machine, "records": records});
    if let Some(out) = &a.output {
        if a.append && out.is_file() {
            let text = std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
            let old: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", out.display()))?;
            // Replaces the records of this model (at this run's setting, if it names one). The
            // case names a model by its folder's name: another folder of that name (a record
            // with another model_id) is another model.
            let same = |r: &serde_json::Value| {
                r["case"]["model"] == serde_json::json!(model_name)
                    && r["case"].get("setting").and_then(|s| s.as_str()) == setting.as_deref()
                    && r["case"].get("matmul_precision").and_then(|s| s.as_str()) == precision.as_deref()
                    && r["model_id"].as_str().is_none_or(|id| id == model_id)
            };
            let mut merged: Vec<serde_json::Value> = old["records"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|r| !same(r))
                .collect();
            merged.extend(doc["records"].as_array().cloned().unwrap_or_default());
            let mut commands = match &old["command"] {
                serde_json::Value::Array(v) => v.clone(),
                serde_json::Value::String(s) => vec![s.clone().into()],
                _ => Vec::new(),
            };
            commands.push(command.into());
            // Other keys of the file (a note of the user's) stay.
            let mut kept = old.as_object().cloned().unwrap_or_default();
            kept.insert("command".into(), commands.into());
            kept.insert("machine".into(), machine.clone());
            kept.insert("records".into(), merged.into());
            doc = kept.into();
        }
        crate::common::write_output_file(out, serde_json::to_string_pretty(&doc)?.as_bytes())?;
        say!("bench: wrote {}", out.display());
    } else {
        crate::emit(&format!("{}\n", serde_json::to_string_pretty(&doc)?))?;
    }
    Ok(())
}

/// Whether `text` is what `bench --output` writes: a JSON object with `records` and the bench
/// command(s) behind them (an earlier record is replaced, or merged into with `--append`).
fn is_bench_record(text: &str) -> bool {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    let by_bench = |c: &serde_json::Value| c.as_str().is_some_and(|c| c.contains(" bench "));
    let command = match &doc["command"] {
        serde_json::Value::Array(cs) => !cs.is_empty() && cs.iter().all(by_bench),
        c => by_bench(c),
    };
    command && doc["records"].is_array()
}

/// Keys per query of the fast preset (which `finetune --mode spt` starts from) at `seq_len`.
fn preset_keys(seq_len: usize) -> usize {
    let d = spt_train::presets::base_config(
        Mode::Spt,
        TaskKind::Classify,
        Some(spt_train::presets::Preset::Fast),
    );
    let f = d.attn_k_fraction.unwrap_or(1.0);
    ((f * seq_len as f64).round() as usize).clamp(1, seq_len)
}

/// Refuses a batch whose activations alone, in the lightest mode asked for, exceed this
/// machine's memory: the child would be killed by the kernel, or spend minutes swapping first.
fn check_batch_fits(a: &BenchArgs, model_dir: &Path) -> Result<()> {
    let Some(physical) = spt_models::physical_memory_bytes() else {
        return Ok(());
    };
    let task = task_of(&a.model)?;
    let cfg_path = model_dir.join("config.json");
    let d = spt_train::presets::base_config(Mode::Spt, task, spt_train::presets::effective(Mode::Spt, None));
    let mut least = u128::MAX;
    for &mode in &a.modes {
        let (keys, ffn) = match mode {
            Mode::Spt => (
                Some(a.attn_k.unwrap_or_else(|| preset_keys(a.seq_len))),
                Some((d.ffn_blocks, a.ffn_top_k.unwrap_or(d.ffn_top_k))),
            ),
            _ => (None, None),
        };
        let bytes =
            spt_train::bench::activation_lower_bound(&cfg_path, task, a.batch_size, a.seq_len, keys, ffn)?;
        least = least.min(bytes);
    }
    if least != u128::MAX && least > physical as u128 {
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        bail!(
            "a batch of {} × {} tokens keeps at least {:.1} GiB of activations for its backward, more than \
             this machine's {:.1} GiB: use a smaller --batch-size or --seq-len",
            a.batch_size,
            a.seq_len,
            gib(least),
            gib(physical as u128)
        );
    }
    Ok(())
}

/// One mode, timed in this (fresh) process: prints `{median_s, step_times_s, peak_rss_bytes, …}`.
pub(crate) fn bench_child(a: &BenchArgs, mode: Mode, model_dir: &Path, dev: &Device) -> Result<()> {
    let task_kind = task_of(&a.model)?;
    crate::common::apply_matmul_precision(a.matmul_precision);
    let attn_k = a.attn_k.unwrap_or_else(|| preset_keys(a.seq_len));
    // spt mode starts from the fast preset, as `finetune --mode spt` does. lora and spt are
    // timed without the pooler, which both train by default (one 384 × 384 layer on B rows), as
    // PEFT is timed without it in bench/peer/steps.py.
    let d = spt_train::presets::base_config(mode, task_kind, spt_train::presets::effective(mode, None));
    let ffn_top_k = a.ffn_top_k.unwrap_or(d.ffn_top_k);
    let ffn_correction = a.ffn_correction.unwrap_or(d.ffn_correction);
    let cfg = FinetuneConfig {
        task: task_kind,
        mode,
        attn_k: Some(attn_k),
        attn_k_fraction: None,
        ffn_top_k,
        ffn_correction,
        pq_refresh_every: 0,
        modules_to_save: Vec::new(),
        ..d
    };
    let cfg_path = model_dir.join("config.json");
    let v = spt_train::pipeline::model_config(model_dir).with_context(|| {
        format!(
            "{}: missing, unreadable or not JSON (a model folder needs its config.json)",
            cfg_path.display()
        )
    })?;
    let vocab = v["vocab_size"].as_u64().unwrap_or(1000) as usize;
    let data = spt_train::bench::synthetic_data(task_kind, vocab, a.batch_size, a.seq_len, 7);
    let calibration = if mode == Mode::Spt {
        calibration_batches(&data, 1, a.batch_size, 7, dev)?
    } else {
        Vec::new()
    };
    let has_weights = spt_models::WeightSource::from_dir(model_dir).is_ok();
    let n_cfg = v["id2label"].as_object().map(|m| m.len()).filter(|&n| n > 0);
    let num_labels = (task_kind == TaskKind::Classify).then_some(n_cfg.unwrap_or(2));
    // Device memory counts from before the weights exist (weights, optimizer state, steps), as
    // peak RSS does on the CPU.
    let ((task, times, build_s), device_bytes) = spt_train::bench::with_peak_device_memory(dev, || {
        let src = if has_weights {
            spt_models::WeightSource::from_dir(model_dir)?
        } else if task_kind == TaskKind::Lm {
            spt_train::bench::random_gpt2_weights(&cfg_path, 7, dev)?
        } else {
            spt_train::bench::random_bert_weights(&cfg_path, 7, dev)?
        };
        let t0 = std::time::Instant::now();
        let mut task = ModelTask::build_from_source(&cfg, &cfg_path, &src, num_labels, dev, calibration)?;
        let build_s = t0.elapsed().as_secs_f64();
        drop(src);
        let times = spt_train::bench::time_steps(&mut task, &data, a.warmup, a.steps, dev)?;
        Ok((task, times, build_s))
    })?;
    let rss = spt_train::bench::peak_rss_bytes()?;
    crate::emit(&format!(
        "{}\n",
        serde_json::json!({
            "median_s": spt_train::bench::median(&times),
            "step_times_s": times,
            "build_s": build_s,
            "peak_rss_bytes": rss,
            "peak_device_bytes": device_bytes,
            "trainable_params": task.summary.trainable,
            "total_params": task.summary.total,
            "attn_k": (mode == Mode::Spt).then_some(attn_k),
            "ffn_top_k": (mode == Mode::Spt).then_some(ffn_top_k),
            "ffn_correction": (mode == Mode::Spt).then_some(ffn_correction),
            "weights": if has_weights { "checkpoint" } else { "random init" },
        })
    ))?;
    Ok(())
}
