//! [`FinetuneConfig`]: every `spt-train finetune` setting, loadable from TOML or JSON, and the
//! [`FinetuneArgs`] flags that override it; model resolution (local directory or hub id).
//!
//! Precedence: defaults (the mode's learning rate and, in spt mode, the preset's settings) <
//! `--config FILE` < flags < `--set section.key=value`. The file is written in sections
//! (`sections.rs`; a flat file of the field names is read too), and unknown keys are an error.
//! Flags mostly carry the field names with `-` for `_` (`--train-file` fills `train_files`).
//!
//! - here: the settings, their defaults, loading a file and what the trainer takes from them;
//! - `args.rs`: the flags and how they override a file;
//! - `validate.rs`: [`FinetuneConfig::validate`];
//! - `hub.rs`: model resolution (local directory, hub cache, download);
//! - `sections.rs`: the file's sections (`[data]`, `[optim]`, `[loop]`, `[lora]`, `[spt]`,
//!   `[spt.attention]`, `[spt.ffn]`) and `--set section.key=value`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{ColumnSpec, DataFormat, TaskKind};
use crate::optim::{AdamWConfig, ScheduleKind};
use crate::presets::Preset;
use crate::trainer::{Resume, TrainerConfig};

/// Configuration errors; each names the file, the setting or the model.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("invalid setting `{field}`: {msg}")]
    Invalid { field: String, msg: String },
    #[error("model `{id}`: {msg}")]
    Model { id: String, msg: String },
}

/// The first of `given` (setting, value) that does not fit its setting's type on its own, as
/// "section.key: why" (serde's message for the whole table names no key).
fn name_bad_key(
    defaults: &serde_json::Map<String, serde_json::Value>,
    given: &[(String, serde_json::Value)],
) -> Option<String> {
    given.iter().find_map(|(k, v)| {
        let mut one = defaults.clone();
        one.retain(|_, v| !v.is_null());
        one.insert(k.clone(), v.clone());
        serde_json::from_value::<FinetuneConfig>(serde_json::Value::Object(one))
            .err()
            .map(|e| format!("{}: {e}", sections::path_of(k)))
    })
}

/// The settings that giving `field` replaces, with the value that leaves them unset: the two ways
/// of giving attention's k and the warmup, and a run length in epochs over `max_steps`.
fn replaced_by(field: &str) -> Vec<(&'static str, serde_json::Value)> {
    match field {
        "attn_k" => vec![("attn_k_fraction", serde_json::Value::Null)],
        "attn_k_fraction" => vec![("attn_k", serde_json::Value::Null)],
        "warmup_steps" => vec![("warmup_ratio", 0.0.into())],
        "warmup_ratio" => vec![("warmup_steps", serde_json::Value::Null)],
        "epochs" => vec![("max_steps", serde_json::Value::Null)],
        _ => Vec::new(),
    }
}

fn invalid(field: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        msg: msg.into(),
    }
}

/// How the model is fine-tuned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Full fine-tuning of every weight.
    Dense,
    /// Frozen weights + LoRA adapters.
    Lora,
    /// Sparse attention + routed FFN + LoRA.
    Spt,
}

/// Which hidden units form each routed-FFN block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FfnUnits {
    /// Contiguous ranges of d_ff, as the checkpoint orders them (the SPT reference).
    Contiguous,
    /// Units that fire on the same calibration tokens grouped together (balanced k-means).
    #[default]
    Clustered,
}

/// Settings of earlier versions whose option was removed, with the value that selects the
/// behaviour that remains. A config file may still carry them with that value (it is dropped);
/// any other value is refused by name. Their measurements: docs/experiments/routed-ffn.md.
pub const REMOVED_SETTINGS: [(&str, &str); 4] = [
    ("ffn_gate", "\"softmax-kept\""),
    ("ffn_router_target", "\"activation-norm\""),
    ("router_refit_every", "0"),
    ("ffn_skip_bias", "false"),
];

/// Drops the removed settings that keep the remaining behaviour; errors on any other value.
fn strip_removed_settings(table: &mut serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
    for (key, kept) in REMOVED_SETTINGS {
        let Some(v) = table.get(key) else { continue };
        if serde_json::from_str::<serde_json::Value>(kept).ok().as_ref() != Some(v) {
            return Err(format!(
                "`{key} = {v}`: this option was removed from spt (only `{key} = {kept}` remains, the \
                 behaviour it now always has; the measurements that led to its removal are in \
                 docs/experiments/routed-ffn.md). Remove the line to run with the remaining behaviour"
            ));
        }
        table.remove(key);
    }
    Ok(())
}

/// Every setting of `spt-train finetune`. See the field comments for meaning and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    // --- model and task ---
    /// Local directory or Hugging Face hub id (required).
    pub model: String,
    pub task: TaskKind,
    /// Tokenizer directory or file; default: the model directory.
    pub tokenizer: Option<PathBuf>,

    // --- data ---
    /// Training files (classification: CSV/TSV/JSONL; lm: plain text, or the text column of a
    /// CSV/TSV/JSONL file). Required.
    pub train_files: Vec<PathBuf>,
    /// Validation files; when empty, `validation_split` of the training rows are held out.
    pub validation_files: Vec<PathBuf>,
    /// Fraction held out when there are no validation files (0: no validation).
    pub validation_split: f64,
    /// Column whose values never straddle the split (e.g. `movie_name`).
    pub split_by: Option<String>,
    /// File format; default: from the extension.
    pub format: Option<DataFormat>,
    pub text_column: String,
    pub text_pair_column: Option<String>,
    pub label_column: String,
    /// Rows with these labels are dropped (e.g. `plot`).
    pub drop_labels: Vec<String>,
    /// A fixed label mapping (`labels.json`); default: sorted distinct training labels.
    pub label_map: Option<PathBuf>,
    /// Truncation length in tokens; default: the model's maximum.
    pub max_length: Option<usize>,
    /// LM block length in tokens.
    pub block_size: usize,

    // --- output ---
    pub output_dir: PathBuf,
    /// Use an existing output directory that is not ours, or restart over an earlier run.
    pub overwrite: bool,

    // --- mode and sparsity ---
    pub mode: Mode,
    /// The measured recipe the spt settings start from (spt mode: `fast` unless given); the
    /// other settings override it.
    pub preset: Option<Preset>,
    /// Keys each query attends to (spt); exclusive with `attn_k_fraction`.
    pub attn_k: Option<usize>,
    /// Fraction of the sequence each query attends to (spt), in (0, 1].
    pub attn_k_fraction: Option<f64>,
    /// Block mode (spt): each tile of this many queries shares its top ⌈k / tile⌉ key blocks of
    /// this many keys; `None` (default): each query keeps its own top-k. Faster, but it keeps
    /// less attention mass (docs/results/speed.md).
    pub attn_tile: Option<usize>,
    /// PQ subspaces per head and codewords per subspace (spt); default: the model's choice.
    pub pq_subspaces: Option<usize>,
    pub pq_codewords: Option<usize>,
    /// Refresh PQ codebooks every N steps (0: never).
    pub pq_refresh_every: u64,
    /// FFN blocks (spt) and how many each token uses.
    pub ffn_blocks: usize,
    pub ffn_top_k: usize,
    /// Which hidden units form each block.
    pub ffn_units: FfnUnits,
    /// A constant linear correction `[x, 1] C` for the FFN blocks a token skips, fitted on the
    /// calibration tokens to what the routing misses of the dense FFN (spt).
    pub ffn_correction: bool,
    /// Batches of 16 training examples (seeded draw) that fit the PQ codebooks, routers and unit
    /// groups, and that the codebook refresh cycles through (spt).
    pub calibration_batches: usize,
    /// Weight of the router load-balancing loss (0: off).
    pub router_aux_weight: f64,
    /// The routers' learning rate as a multiple of `lr` (spt). Default
    /// ([`FinetuneConfig::router_lr_scale`]): 0 with adapters, so the routers keep their fit to the
    /// calibration tokens; 1 when every weight trains (`lora_rank = 0`).
    pub router_lr_scale: Option<f64>,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Modules trained in full in lora and spt modes besides the adapters and the task head, by
    /// HF module name (e.g. `pooler`), like PEFT's `modules_to_save`.
    pub modules_to_save: Vec<String>,
    /// GPT-2 only: start from random weights (the model directory holds only config.json and
    /// tokenizer files); for experiments on model shapes without a checkpoint.
    pub random_init: bool,

    // --- optimisation ---
    pub epochs: u64,
    /// Overrides `epochs` when set.
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    /// Default: `batch_size`.
    pub eval_batch_size: Option<usize>,
    pub grad_accum: usize,
    pub lr: f64,
    /// Warmup updates; default: `warmup_ratio` of the total.
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: f64,
    pub schedule: ScheduleKind,
    /// AdamW decoupled weight decay (never on biases and LayerNorm weights).
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Global gradient-norm clip (0: off).
    pub max_grad_norm: f64,
    pub seed: u64,

    // --- loop ---
    /// Evaluate every N steps (0: at the end only).
    pub eval_every: u64,
    /// Checkpoint every N steps (0: at the end only; Ctrl-C always saves).
    pub save_every: u64,
    /// Checkpoints kept (0: all).
    pub keep_last: usize,
    pub log_every: u64,
    /// `latest` or a checkpoint directory.
    pub resume: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The precision of the CPU kernels' products with layer weights (LoRA's frozen ones, the
    /// routed FFN's blocks and linear correction, GPT-2's LM head) and of the fused dense
    /// attention: `f32` (default) or `bf16` (bf16 inputs, f32 accumulation; AMX where the CPU
    /// has it). See `spt_ops::precision`. `spt-train finetune`
    /// applies it; a program of its own calls `spt_ops::set_matmul_precision`.
    pub matmul_precision: spt_ops::MatmulPrecision,
    pub progress: bool,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            task: TaskKind::Classify,
            tokenizer: None,
            train_files: Vec::new(),
            validation_files: Vec::new(),
            validation_split: 0.1,
            split_by: None,
            format: None,
            text_column: "text".into(),
            text_pair_column: None,
            label_column: "label".into(),
            drop_labels: Vec::new(),
            label_map: None,
            max_length: None,
            block_size: 128,
            output_dir: PathBuf::from("spt-output"),
            overwrite: false,
            mode: Mode::Dense,
            preset: None,
            attn_k: None,
            attn_k_fraction: None,
            attn_tile: None,
            pq_subspaces: None,
            pq_codewords: None,
            pq_refresh_every: 100,
            ffn_blocks: 8,
            ffn_top_k: 2,
            ffn_units: FfnUnits::default(),
            ffn_correction: false,
            calibration_batches: 4,
            router_aux_weight: 0.0,
            router_lr_scale: None,
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            modules_to_save: Vec::new(),
            random_init: false,
            epochs: 3,
            max_steps: None,
            batch_size: 16,
            eval_batch_size: None,
            grad_accum: 1,
            lr: crate::presets::default_lr(Mode::Dense),
            warmup_steps: None,
            warmup_ratio: 0.0,
            schedule: ScheduleKind::Linear,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            save_every: 0,
            keep_last: 3,
            log_every: 10,
            resume: None,
            device: "cpu".into(),
            matmul_precision: spt_ops::MatmulPrecision::F32,
            progress: true,
        }
    }
}

impl FinetuneConfig {
    /// Reads a TOML (`.toml`) or JSON (`.json`) config file over the defaults of the mode, task
    /// and preset it names (as `finetune --config` does: a file that gives only `mode = "lora"`
    /// has LoRA's learning rate and modules to save); unknown keys are an error, and so is a removed setting ([`REMOVED_SETTINGS`]) unless it has the
    /// value of the behaviour that remains (old run directories' `finetune.toml` files list every
    /// setting). The file may be sectioned or flat ([`sections`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let table = Self::read_table(path)?;
        let file = (path, table);
        let base = Self::defaults_for(Some(&file), None, None, None)?;
        base.overlay(path, file.1)
    }

    /// The settings a config file gives, by field name (`ffn_top_k` for `[spt.ffn] top_k`):
    /// what a caller that takes only some of a file's settings can say it left unused.
    pub fn file_settings(path: &Path) -> Result<Vec<String>, ConfigError> {
        Ok(Self::read_table(path)?.keys().cloned().collect())
    }

    /// Reads a run's own finetune.toml (the one beside its checkpoints) over the plain defaults:
    /// finetune writes every setting, so a key it lacks is a setting that run's spt-train did not
    /// have yet, whose behaviour then was the default's (an old spt run's attention, an old LoRA
    /// run's frozen pooler), not today's preset's. Otherwise as [`FinetuneConfig::load`].
    pub fn load_run(path: &Path) -> Result<Self, ConfigError> {
        Self::default().overlay(path, Self::read_table(path)?)
    }

    /// The settings a checkpoint was trained with (its manifest's `config`, finetune's
    /// [`FinetuneConfig::run_identity`]), over the plain defaults as [`FinetuneConfig::load_run`]
    /// reads a run's finetune.toml. `manifest` names the file in errors.
    pub fn from_checkpoint(manifest: &Path, config: &serde_json::Value) -> Result<Self, ConfigError> {
        let file_err = |msg: String| ConfigError::File {
            path: manifest.to_path_buf(),
            msg,
        };
        let serde_json::Value::Object(map) = config else {
            return Err(file_err("its `config` is not a table of settings".into()));
        };
        let mut map = map.clone();
        map.retain(|_, v| !v.is_null());
        strip_removed_settings(&mut map).map_err(file_err)?;
        Self::default().overlay(manifest, map)
    }

    /// A config file's keys as a flat JSON object (sections flattened, removed settings that keep
    /// the remaining behaviour dropped).
    fn read_table(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, ConfigError> {
        let file_err = |msg: String| ConfigError::File {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let text = crate::data::strip_bom(&text);
        let value: serde_json::Value = match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("toml") => {
                let table: toml::Value = toml::from_str(text).map_err(|e| file_err(e.to_string()))?;
                // JSON has no NaN or infinity: converted, such a value would silently vanish.
                if let Some(at) = sections::non_finite(&table, "") {
                    return Err(file_err(format!(
                        "{}: not a finite number",
                        at.trim_start_matches('.')
                    )));
                }
                serde_json::to_value(table).map_err(|e| file_err(e.to_string()))?
            }
            Some("json") => {
                serde_json::from_str::<crate::unique_json::UniqueKeys>(text)
                    .map_err(|e| file_err(e.to_string()))?
                    .0
            }
            _ => return Err(file_err("use a .toml or .json file".into())),
        };
        let serde_json::Value::Object(table) = value else {
            return Err(file_err("expected a table of settings".into()));
        };
        let mut table = sections::flatten(table).map_err(file_err)?;
        strip_removed_settings(&mut table).map_err(file_err)?;
        Ok(table)
    }

    /// These settings with a config file's keys written over them (a key the file gives for
    /// one of `attn_k` / `attn_k_fraction` clears the other).
    fn overlay(
        self,
        path: &Path,
        file: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, ConfigError> {
        let file_err = |msg: String| ConfigError::File {
            path: path.to_path_buf(),
            msg,
        };
        let mut base = match serde_json::to_value(&self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => {
                return Err(file_err(
                    "internal: the defaults do not serialise to a table".into(),
                ))
            }
        };
        for (given, other) in [("attn_k", "attn_k_fraction"), ("attn_k_fraction", "attn_k")] {
            if file.contains_key(given) && !file.contains_key(other) {
                base.remove(other);
            }
        }
        // TOML has no null: an absent Option is absent, so drop the defaults' nulls first.
        base.retain(|_, v| !v.is_null());
        let keys: Vec<(String, serde_json::Value)> =
            file.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let defaults = base.clone();
        base.extend(file);
        serde_json::from_value(serde_json::Value::Object(base))
            .map_err(|e| file_err(name_bad_key(&defaults, &keys).unwrap_or_else(|| e.to_string())))
    }

    /// The settings as a sectioned TOML file (what a run directory's `finetune.toml` holds).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let err = |e: String| invalid("config", format!("cannot write the settings as TOML: {e}"));
        let flat = match serde_json::to_value(self).map_err(|e| err(e.to_string()))? {
            serde_json::Value::Object(m) => m,
            v => return Err(err(format!("expected a table, got {v}"))),
        };
        toml::to_string_pretty(&sections::nest(&flat)).map_err(|e| err(e.to_string()))
    }

    /// These settings with every local path resolved (absolute, links and `..` followed as the
    /// OS did; the model only when it names an existing directory, not a hub id), as a run's own
    /// finetune.toml and its checkpoints record them: resuming the run, or evaluating its
    /// validation split, from another directory then reads the same files, even after the
    /// directory it started from is gone. A path whose resolved form is not valid UTF-8 (the
    /// model is a `String`) is kept as given; `resume`, which neither record keeps, too.
    pub fn with_absolute_paths(&self) -> Self {
        let abs = |p: &Path| crate::output_dir::resolve(p).unwrap_or_else(|_| p.to_path_buf());
        let model = if Path::new(&self.model).exists() {
            abs(Path::new(&self.model))
                .to_str()
                .map_or_else(|| self.model.clone(), str::to_owned)
        } else {
            self.model.clone()
        };
        Self {
            model,
            tokenizer: self.tokenizer.as_deref().map(abs),
            train_files: self.train_files.iter().map(|p| abs(p)).collect(),
            validation_files: self.validation_files.iter().map(|p| abs(p)).collect(),
            label_map: self.label_map.as_deref().map(abs),
            output_dir: abs(&self.output_dir),
            ..self.clone()
        }
    }

    /// Whether a local path among these settings is relative (the model counts when it names an
    /// existing directory, or has no hub id's `owner/name` form).
    pub fn has_relative_paths(&self) -> bool {
        let model = Path::new(&self.model);
        let paths = self
            .tokenizer
            .iter()
            .chain(&self.train_files)
            .chain(&self.validation_files);
        paths.chain(&self.label_map).any(|p| p.is_relative())
            || (model.is_relative() && (model.exists() || self.model.matches('/').count() != 1))
    }

    /// The local paths (model, tokenizer, data files, label map) of `other`, over these.
    pub fn take_paths_from(&mut self, other: &FinetuneConfig) {
        self.model.clone_from(&other.model);
        self.tokenizer.clone_from(&other.tokenizer);
        self.train_files.clone_from(&other.train_files);
        self.validation_files.clone_from(&other.validation_files);
        self.label_map.clone_from(&other.label_map);
    }

    /// Applies `--set` overrides: `section.key=value` (or a top-level setting's name), the value
    /// read as TOML (`0.001`, `true`, `[1, 2]`, `"text"`) or else as a bare string.
    pub fn apply_sets(&mut self, sets: &[String]) -> Result<(), ConfigError> {
        if sets.is_empty() {
            return Ok(());
        }
        // The round trip below goes through JSON, which would turn a NaN or infinite flag value
        // into an unset one: name it here (TOML keeps such floats).
        if let Some(at) = toml::Value::try_from(&*self)
            .ok()
            .and_then(|v| sections::non_finite(&v, ""))
        {
            let field = at.trim_start_matches('.');
            return Err(invalid(field, "not a finite number"));
        }
        let mut flat = match serde_json::to_value(&*self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err(invalid("set", "cannot represent the settings as a table")),
        };
        let mut seen = std::collections::BTreeMap::new();
        let mut given = Vec::new();
        for s in sets {
            let Some((path, value)) = s.split_once('=') else {
                return Err(invalid("set", format!("`{s}`: expected section.key=value")));
            };
            let path = path.trim();
            let field = match sections::field_of(path) {
                Some(f) => f.to_string(),
                None if !path.contains('.') && flat.contains_key(path) && sections::path_of(path) == path => {
                    path.to_string()
                }
                None => {
                    let hint = match sections::suggest(path)[..] {
                        [] => "sections: data, optim, loop, lora, spt, spt.attention, spt.ffn".to_string(),
                        ref near => format!("did you mean {}?", near.join(" or ")),
                    };
                    return Err(invalid(path, format!("--set {s}: no such setting ({hint})")));
                }
            };
            // These choose the defaults every other setting starts from, which are set by now.
            if let Some(flag) = ["mode", "preset", "task"].iter().find(|f| **f == field) {
                return Err(invalid(
                    path,
                    format!("--set {s}: give --{flag} instead (it chooses the defaults the other settings start from)"),
                ));
            }
            if let Some(first) = seen.insert(field.clone(), s.clone()) {
                return Err(invalid(
                    path,
                    format!("--set {s}: the same setting as --set {first}; give it once"),
                ));
            }
            let value =
                sections::parse_value(value.trim()).map_err(|e| invalid(path, format!("--set {s}: {e}")))?;
            given.push((field, value));
        }
        // One way of giving a setting replaces the other (a file's, a preset's), unless that one
        // is --set too (then validation names both).
        for (field, value) in given {
            for (partner, cleared) in replaced_by(&field) {
                if !seen.contains_key(partner) {
                    flat.insert(partner.to_string(), cleared);
                }
            }
            flat.insert(field, value);
        }
        let defaults = serde_json::to_value(&*self)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        let table = serde_json::Value::Object(flat);
        *self = Self::deserialize(&table).map_err(|e| {
            let given: Vec<(String, serde_json::Value)> = table
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| defaults.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            invalid(
                "set",
                name_bad_key(&defaults, &given).unwrap_or_else(|| format!("{}: {e}", sets.join(" "))),
            )
        })?;
        Ok(())
    }

    /// The routers' lr multiple: the set value, else 0 with adapters (fine-tuning keeps the
    /// routers' calibration fit: trained at the adapters' lr they destabilised runs) and 1 when
    /// every weight trains.
    pub fn router_lr_scale(&self) -> f64 {
        self.router_lr_scale
            .unwrap_or(if self.lora_rank == 0 { 1.0 } else { 0.0 })
    }

    /// The columns to read.
    pub fn columns(&self) -> ColumnSpec {
        ColumnSpec {
            text: self.text_column.clone(),
            text_pair: self.text_pair_column.clone(),
            label: Some(self.label_column.clone()),
            group: self.split_by.clone(),
        }
    }

    /// Where to resume from.
    pub fn resume_from(&self) -> Resume {
        match self.resume.as_deref() {
            None => Resume::No,
            Some("latest") => Resume::Latest,
            Some(p) => Resume::From(PathBuf::from(p)),
        }
    }

    /// The settings that define a run, as JSON, for checkpoint manifests: everything except how
    /// this invocation starts (`resume`, `overwrite`, `progress`), so a resumed run matches.
    pub fn run_identity(&self) -> serde_json::Value {
        let mut c = self.with_absolute_paths();
        c.resume = None;
        c.overwrite = false;
        c.progress = true;
        serde_json::to_value(&c).unwrap_or(serde_json::Value::Null)
    }

    /// The loop settings for a training set of `n_train` items.
    pub fn trainer_config(&self, n_train: usize) -> TrainerConfig {
        let mut t = TrainerConfig {
            epochs: self.epochs,
            max_steps: self.max_steps,
            batch_size: self.batch_size,
            eval_batch_size: self.eval_batch_size.unwrap_or(self.batch_size),
            grad_accum: self.grad_accum,
            lr: self.lr,
            warmup_steps: 0,
            schedule: self.schedule,
            adamw: AdamWConfig {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_eps,
                weight_decay: self.weight_decay,
            },
            lr_scales: if self.mode == Mode::Spt && self.router_lr_scale() != 1.0 {
                vec![("router".into(), self.router_lr_scale())]
            } else {
                Vec::new()
            },
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            eval_every: self.eval_every,
            save_every: self.save_every,
            keep_last: self.keep_last,
            log_every: self.log_every,
            output_dir: self.output_dir.clone(),
            progress: self.progress,
            run_config: self.run_identity(),
            ..TrainerConfig::default()
        };
        let total = crate::trainer::planned_steps(&t, n_train);
        t.warmup_steps = self
            .warmup_steps
            .unwrap_or((self.warmup_ratio * total as f64).ceil() as u64);
        t
    }
}

mod args;
mod hub;
pub mod sections;
#[cfg(test)]
mod tests;
mod validate;

pub use args::FinetuneArgs;
pub use hub::{hub_cache, hub_offline, resolve_model, resolve_model_with, Hub};
