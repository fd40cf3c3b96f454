//! A LoRA run as a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`):
//! what `peft.PeftModel.from_pretrained(base, dir)` loads onto the model the run started from,
//! and a few megabytes where the merged export ([`crate::tasks::export_hf_dir`]) is the whole
//! model.
//!
//! The layout is PEFT's own: each adapter as `base_model.model.{module}.lora_A.weight` `[r, in]`
//! and `….lora_B.weight` `[out, r]` (the names spt-models already gives them), and the modules
//! trained in full (the new head, `modules_to_save`) as `base_model.model.{module}.{param}`.
//! PEFT applies `W + (alpha / r)·B·A`, the update our LoRA layers add (`tests/cli_export_peft.rs`
//! checks an adapter against the merged export; `bench/peer/peft_adapter.py` loads one in PEFT).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::Device;

use crate::config::{FinetuneConfig, Mode};
use crate::data::TaskKind;
use crate::tasks::{write_export_dir, ModelTask};
use crate::{Error, Result};

/// The files an adapter export writes.
pub const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Why `cfg`'s run cannot be written as a PEFT adapter, if it cannot.
pub fn adapter_refusal(cfg: &FinetuneConfig) -> Option<String> {
    match cfg.mode {
        Mode::Dense => Some(
            "a dense run trained every weight and has no adapters: export the whole model \
             (--format hf)"
                .into(),
        ),
        Mode::Spt => Some(
            "an spt run's adapters were trained under sparse attention and a routed FFN, which \
             PEFT does not have: export the merged dense model (--format hf)"
                .into(),
        ),
        Mode::Lora if cfg.random_init => Some(
            "a --random-init run starts from random weights, not from a checkpoint that PEFT \
             could load the adapter onto: export the merged model (--format hf)"
                .into(),
        ),
        Mode::Lora => None,
    }
}

/// Writes `task` (a LoRA run with settings `cfg`) as a PEFT adapter directory `out`; `base` is
/// recorded as `base_model_name_or_path`. Written through a temporary sibling directory, as the
/// merged export is; an earlier export in `out` is replaced only with `overwrite`.
pub fn export_peft_adapter(
    task: &ModelTask,
    cfg: &FinetuneConfig,
    base: &str,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    if let Some(why) = adapter_refusal(cfg) {
        return Err(Error::Msg(format!("--format peft: {why}")));
    }
    let files: Vec<String> = ADAPTER_FILES.iter().map(|f| f.to_string()).collect();
    crate::output_dir::check_export_dir(out, &files, overwrite)?;
    // The adapter is what trained: LoRA factors, and the modules trained in full (the head,
    // `modules_to_save`), which PEFT is given by their full paths: a name as typed (`pooler.`)
    // could match nothing there, or more than was trained.
    let mut tensors = HashMap::new();
    let mut targets = BTreeSet::new();
    let mut saved = BTreeSet::new();
    for (name, var) in task.net.params().named_vars() {
        if let Some(module) = name
            .strip_suffix(".lora_A.weight")
            .or_else(|| name.strip_suffix(".lora_B.weight"))
        {
            targets.insert(module.to_string());
        } else if let Some((module, _)) = name.rsplit_once('.') {
            saved.insert(module.to_string());
        }
        let t = var.as_tensor().to_device(&Device::Cpu)?.contiguous()?;
        tensors.insert(format!("base_model.model.{name}"), t);
    }
    // PEFT gives a module to save no adapter: one inside it would be dropped on load.
    let inside =
        |t: &str, s: &str| t == s || t.starts_with(&format!("{s}.")) || t.ends_with(&format!(".{s}"));
    if let Some((t, s)) = targets
        .iter()
        .find_map(|t| saved.iter().find(|s| inside(t, s)).map(|s| (t, s)))
    {
        return Err(Error::Msg(format!(
            "--format peft: `{t}` has LoRA adapters and lies in `{s}`, which trained in full \
             (modules_to_save); PEFT would drop its adapters on load: export the merged model \
             (--format hf)"
        )));
    }
    if targets.is_empty() {
        return Err(Error::Msg(
            "--format peft: the model has no LoRA adapters (lora_rank = 0?)".into(),
        ));
    }
    let saved: Vec<String> = saved.into_iter().collect();
    let config = adapter_config(cfg, base, &targets, &saved);
    write_export_dir(out, &files, overwrite, |tmp| {
        spt_models::save_tensors(&tensors, tmp.join("adapter_model.safetensors"))?;
        let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Msg(e.to_string()))?;
        let dst = tmp.join("adapter_config.json");
        std::fs::write(&dst, text).map_err(|e| Error::io(&dst, e))
    })
}

/// PEFT's `LoraConfig` for the run: the adapted modules by their full names (a suffix such as
/// `dense` would also catch the pooler), and the modules trained in full.
fn adapter_config(
    cfg: &FinetuneConfig,
    base: &str,
    targets: &BTreeSet<String>,
    saved: &[String],
) -> serde_json::Value {
    let classify = cfg.task == TaskKind::Classify;
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": if classify { "SEQ_CLS" } else { "CAUSAL_LM" },
        "base_model_name_or_path": base,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets.iter().collect::<Vec<_>>(),
        "modules_to_save": if saved.is_empty() { serde_json::Value::Null } else { saved.into() },
        // GPT-2's Conv1D weights are [in, out].
        "fan_in_fan_out": !classify,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}
