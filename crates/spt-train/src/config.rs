//! [`FinetuneConfig`]: every `spt-train finetune` setting, loadable from TOML or JSON, and the
//! [`FinetuneArgs`] flags that override it; model resolution (local directory or hub id).
//!
//! Precedence: built-in defaults < `--config FILE` < flags. The file uses the same names as the
//! struct fields (flags are the same names with `-` for `_`), and unknown keys are an error.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{ColumnSpec, DataFormat, TaskKind};
use crate::optim::{AdamWConfig, ScheduleKind};
use crate::presets::{self, Preset};
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

/// How a routed FFN scales each kept block's output (spt-ops' `GateMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FfnGate {
    /// `k · softmax` over the kept blocks' router scores (sums to k per token).
    #[default]
    SoftmaxKept,
    /// `2·σ(score)` per kept block (the SPT reference's gate).
    Sigmoid,
    /// 1 for every kept block: the router learns nothing from the task loss.
    Ones,
}

impl From<FfnGate> for spt_models::routed_ffn::GateMode {
    fn from(g: FfnGate) -> Self {
        match g {
            FfnGate::SoftmaxKept => Self::SoftmaxKept,
            FfnGate::Sigmoid => Self::Sigmoid,
            FfnGate::Ones => Self::Ones,
        }
    }
}

/// What a routed FFN's router is fitted to rank blocks by (spt-ops' `RouterTarget`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FfnRouterTarget {
    /// The block's hidden activation norm.
    #[default]
    ActivationNorm,
    /// The norm of the block's contribution to the FFN output.
    OutputNorm,
}

impl From<FfnRouterTarget> for spt_models::routed_ffn::RouterTarget {
    fn from(t: FfnRouterTarget) -> Self {
        match t {
            FfnRouterTarget::ActivationNorm => Self::ActivationNorm,
            FfnRouterTarget::OutputNorm => Self::OutputNorm,
        }
    }
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
    /// Training files (classification: CSV/TSV/JSONL; lm: plain text). Required.
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
    /// PQ subspaces per head and codewords per subspace (spt); default: the model's choice.
    pub pq_subspaces: Option<usize>,
    pub pq_codewords: Option<usize>,
    /// Refresh PQ codebooks every N steps (0: never).
    pub pq_refresh_every: u64,
    /// FFN blocks (spt) and how many each token uses.
    pub ffn_blocks: usize,
    pub ffn_top_k: usize,
    /// How kept blocks are scaled by the router.
    pub ffn_gate: FfnGate,
    /// Which hidden units form each block.
    pub ffn_units: FfnUnits,
    /// What the router is fitted to rank blocks by, on the calibration tokens.
    pub ffn_router_target: FfnRouterTarget,
    /// Refit the routers every N steps on the calibration batches, as the model now is (0: never;
    /// spt).
    pub router_refit_every: u64,
    /// A constant per-block bias added for tokens that skip the block, fitted to the block's
    /// mean output on the calibration tokens (spt; default off).
    pub ffn_skip_bias: bool,
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
            pq_subspaces: None,
            pq_codewords: None,
            pq_refresh_every: 100,
            ffn_blocks: 8,
            ffn_top_k: 2,
            ffn_gate: FfnGate::default(),
            ffn_units: FfnUnits::default(),
            ffn_router_target: FfnRouterTarget::default(),
            router_refit_every: 0,
            ffn_skip_bias: false,
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
            progress: true,
        }
    }
}

/// The flags of `spt-train finetune`; each overrides the config file's field of the same name.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct FinetuneArgs {
    /// TOML or JSON file with any of these settings (flags win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Local model directory or Hugging Face hub id (honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_enum)]
    pub task: Option<TaskKind>,
    /// Tokenizer directory or tokenizer.json (default: the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Training file; repeat for several.
    #[arg(long = "train-file", value_name = "FILE")]
    pub train_files: Vec<PathBuf>,
    /// Validation file; repeat for several.
    #[arg(long = "validation-file", value_name = "FILE")]
    pub validation_files: Vec<PathBuf>,
    /// Held-out fraction when no validation file is given (0: none).
    #[arg(long)]
    pub validation_split: Option<f64>,
    /// Column kept whole on one side of the split (e.g. movie_name).
    #[arg(long)]
    pub split_by: Option<String>,
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    #[arg(long)]
    pub text_column: Option<String>,
    #[arg(long)]
    pub text_pair_column: Option<String>,
    #[arg(long)]
    pub label_column: Option<String>,
    /// Drop rows with this label; repeat for several.
    #[arg(long = "drop-label", value_name = "LABEL")]
    pub drop_labels: Vec<String>,
    /// Fixed label mapping (labels.json).
    #[arg(long)]
    pub label_map: Option<PathBuf>,
    /// Truncate texts to this many tokens (default: the model's maximum).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// LM block length.
    #[arg(long)]
    pub block_size: Option<usize>,
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Use a non-empty output directory that spt-train did not create, or restart an earlier run.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// SPT recipe (spt mode; default fast). fast: keys k = L/8, FFN 2 of 8 blocks + correction,
    /// pooler trained, lr 1e-3 (≈2.7× dense's step, ~20 % of its memory, a few points below dense
    /// accuracy). accurate: k = L/2, FFN 6 of 8 + correction, pooler, lr 1e-3 (within 1 point of
    /// dense, ≈1.5× its step). Other flags override the preset's values.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Keys per query for sparse attention (exclusive with --attn-k-fraction).
    #[arg(long)]
    pub attn_k: Option<usize>,
    /// Fraction of keys per query for sparse attention.
    #[arg(long)]
    pub attn_k_fraction: Option<f64>,
    #[arg(long)]
    pub pq_subspaces: Option<usize>,
    #[arg(long)]
    pub pq_codewords: Option<usize>,
    /// Refresh PQ codebooks every N steps (0: never).
    #[arg(long)]
    pub pq_refresh_every: Option<u64>,
    /// Routed-FFN blocks.
    #[arg(long)]
    pub ffn_blocks: Option<usize>,
    /// Routed-FFN blocks used per token.
    #[arg(long)]
    pub ffn_top_k: Option<usize>,
    /// How kept FFN blocks are scaled by the router.
    #[arg(long, value_enum)]
    pub ffn_gate: Option<FfnGate>,
    /// Which hidden units form each routed-FFN block.
    #[arg(long, value_enum)]
    pub ffn_units: Option<FfnUnits>,
    /// What the routers are fitted to rank FFN blocks by.
    #[arg(long, value_enum)]
    pub ffn_router_target: Option<FfnRouterTarget>,
    /// Refit the routers every N steps on the calibration batches (0: never).
    #[arg(long)]
    pub router_refit_every: Option<u64>,
    /// Per-block bias for tokens that skip an FFN block, fitted to its mean output (default false).
    #[arg(long)]
    pub ffn_skip_bias: Option<bool>,
    /// Linear correction for the FFN blocks a token skips, fitted on the calibration tokens.
    #[arg(long)]
    pub ffn_correction: Option<bool>,
    /// Batches of 16 training examples that calibrate the sparse layers (spt).
    #[arg(long)]
    pub calibration_batches: Option<usize>,
    /// Router load-balancing loss weight (0: off).
    #[arg(long)]
    pub router_aux_weight: Option<f64>,
    /// The routers' learning rate as a multiple of --lr (spt). Default: 0 with adapters (the
    /// routers keep their fit to the calibration tokens), 1 with --lora-rank 0.
    #[arg(long)]
    pub router_lr_scale: Option<f64>,
    /// LoRA rank (lora, spt). In spt mode 0 means no adapters: every weight trains through the
    /// sparse attention and routed FFN (e.g. training from random weights).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Modules trained in full besides the adapters and head (lora, spt), comma-separated HF
    /// module names, e.g. `pooler` (PEFT's `modules_to_save`).
    #[arg(long, value_delimiter = ',', value_name = "MODULES")]
    pub modules_to_save: Vec<String>,
    /// GPT-2 only: random initial weights instead of a checkpoint.
    #[arg(long)]
    pub random_init: bool,
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Total optimizer updates (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub eval_batch_size: Option<usize>,
    /// Micro-batches per optimizer update.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub adam_eps: Option<f64>,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, alias = "clip")]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub eval_every: Option<u64>,
    #[arg(long)]
    pub save_every: Option<u64>,
    #[arg(long)]
    pub keep_last: Option<usize>,
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Resume from the latest checkpoint in --output-dir, or from the given checkpoint directory.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    pub resume: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

macro_rules! set_if_some {
    ($args:ident, $cfg:ident; plain: $($p:ident),* ; optional: $($o:ident),* ; list: $($l:ident),*) => {
        $( if let Some(v) = $args.$p.clone() { $cfg.$p = v; } )*
        $( if let Some(v) = $args.$o.clone() { $cfg.$o = Some(v); } )*
        $( if !$args.$l.is_empty() { $cfg.$l = $args.$l.clone(); } )*
    };
}

impl FinetuneConfig {
    /// Reads a TOML (`.toml`) or JSON (`.json`) config file over the built-in defaults; unknown
    /// keys are an error.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::default().overlay(path, Self::read_table(path)?)
    }

    /// A config file's keys, as a JSON object.
    fn read_table(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, ConfigError> {
        let file_err = |msg: String| ConfigError::File {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let value: serde_json::Value = match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("toml") => toml::from_str(&text).map_err(|e| file_err(e.to_string()))?,
            Some("json") => serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))?,
            _ => return Err(file_err("use a .toml or .json file".into())),
        };
        match value {
            serde_json::Value::Object(m) => Ok(m),
            _ => Err(file_err("expected a table of settings".into())),
        }
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
        base.extend(file);
        serde_json::from_value(serde_json::Value::Object(base)).map_err(|e| file_err(e.to_string()))
    }

    /// Defaults (the mode's learning rate and, in spt mode, the preset), then `--config`, then
    /// the flags; then [`FinetuneConfig::validate`].
    pub fn from_args(args: &FinetuneArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(p) => Some((p, Self::read_table(p)?)),
            None => None,
        };
        fn key<T: serde::de::DeserializeOwned>(
            file: &Option<(&PathBuf, serde_json::Map<String, serde_json::Value>)>,
            name: &str,
        ) -> Result<Option<T>, ConfigError> {
            let Some((p, m)) = file else { return Ok(None) };
            m.get(name)
                .map(|v| serde_json::from_value(v.clone()))
                .transpose()
                .map_err(|e| ConfigError::File {
                    path: p.to_path_buf(),
                    msg: format!("{name}: {e}"),
                })
        }
        let mode = match args.mode {
            Some(m) => m,
            None => key(&file, "mode")?.unwrap_or(Mode::Dense),
        };
        let task = match args.task {
            Some(t) => t,
            None => key(&file, "task")?.unwrap_or(TaskKind::Classify),
        };
        let preset = match args.preset {
            Some(p) => Some(p),
            None => key(&file, "preset")?,
        };
        if preset.is_some() && mode != Mode::Spt {
            return Err(invalid(
                "preset",
                format!("presets are spt recipes; the mode is {mode:?}").to_lowercase(),
            ));
        }
        let mut cfg = presets::base_config(mode, task, presets::effective(mode, preset));
        if let Some((p, m)) = file {
            cfg = cfg.overlay(p, m)?;
        }
        cfg.apply(args);
        if args.validation_split.is_some() && !cfg.validation_files.is_empty() {
            return Err(invalid(
                "validation_split",
                "--validation-split holds rows out of the training files, --validation-file gives the \
                 validation rows: give one, not both",
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies the flags that were given.
    pub fn apply(&mut self, a: &FinetuneArgs) {
        let c = self;
        // A flag for one way of giving k replaces the other (which may come from the preset).
        if a.attn_k.is_some() && a.attn_k_fraction.is_none() {
            c.attn_k_fraction = None;
        }
        if a.attn_k_fraction.is_some() && a.attn_k.is_none() {
            c.attn_k = None;
        }
        set_if_some!(a, c;
            plain: model, task, validation_split, text_column, label_column, block_size, output_dir, mode,
                pq_refresh_every, ffn_blocks, ffn_top_k, ffn_gate, ffn_units, ffn_router_target, router_refit_every, ffn_skip_bias, ffn_correction, calibration_batches, router_aux_weight, lora_rank, lora_alpha, lora_dropout,
                epochs, batch_size, grad_accum, lr, warmup_ratio, schedule, weight_decay, adam_beta1, adam_beta2,
                adam_eps, max_grad_norm, seed, eval_every, save_every, keep_last, log_every, device;
            optional: preset, tokenizer, router_lr_scale, split_by, format, text_pair_column, label_map, max_length, attn_k,
                attn_k_fraction, pq_subspaces, pq_codewords, max_steps, eval_batch_size, warmup_steps, resume;
            list: train_files, validation_files, drop_labels, modules_to_save
        );
        if a.overwrite {
            c.overwrite = true;
        }
        if a.no_progress {
            c.progress = false;
        }
        if a.random_init {
            c.random_init = true;
        }
    }

    /// Checks ranges and combinations; errors name the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.trim().is_empty() {
            return Err(invalid("model", "required: a local directory or a hub id"));
        }
        if self.train_files.is_empty() {
            return Err(invalid("train_files", "required: at least one --train-file"));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", "batch size must be at least 1, got 0"));
        }
        if self.eval_batch_size == Some(0) {
            return Err(invalid("eval_batch_size", "batch size must be at least 1, got 0"));
        }
        if self.grad_accum == 0 {
            return Err(invalid("grad_accum", "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid("lr", format!("must be positive, got {}", self.lr)));
        }
        if !(0.0..1.0).contains(&self.validation_split) {
            return Err(invalid(
                "validation_split",
                format!("must be in [0, 1), got {}", self.validation_split),
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(invalid(
                "warmup_ratio",
                format!("must be in [0, 1], got {}", self.warmup_ratio),
            ));
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            return Err(invalid("epochs", "must be at least 1 (or set max_steps)"));
        }
        if self.max_steps == Some(0) {
            return Err(invalid("max_steps", "must be at least 1"));
        }
        if self.max_length == Some(0) {
            return Err(invalid("max_length", "must be at least 1"));
        }
        if self.block_size < 2 {
            return Err(invalid(
                "block_size",
                format!("must be at least 2, got {}", self.block_size),
            ));
        }
        if self.attn_k.is_some() && self.attn_k_fraction.is_some() {
            return Err(invalid("attn_k", "give attn_k or attn_k_fraction, not both"));
        }
        if self.attn_k == Some(0) {
            return Err(invalid("attn_k", "must be at least 1"));
        }
        if let Some(f) = self.attn_k_fraction {
            if !(f > 0.0 && f <= 1.0) {
                return Err(invalid("attn_k_fraction", format!("must be in (0, 1], got {f}")));
            }
        }
        if self.ffn_blocks == 0 || self.ffn_top_k == 0 || self.ffn_top_k > self.ffn_blocks {
            return Err(invalid(
                "ffn_top_k",
                format!(
                    "need 1 ≤ ffn_top_k ≤ ffn_blocks, got {} of {}",
                    self.ffn_top_k, self.ffn_blocks
                ),
            ));
        }
        if self.mode == Mode::Lora && self.lora_rank == 0 {
            return Err(invalid(
                "lora_rank",
                "must be at least 1 in lora mode (spt mode takes 0: no adapters, every weight trains)",
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(invalid(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            ));
        }
        if self.mode == Mode::Spt && self.calibration_batches == 0 {
            return Err(invalid("calibration_batches", "must be at least 1 in spt mode"));
        }
        if !(self.router_aux_weight.is_finite() && self.router_aux_weight >= 0.0) {
            return Err(invalid("router_aux_weight", "must be ≥ 0"));
        }
        let router_lr = self.router_lr_scale();
        if !(router_lr.is_finite() && router_lr >= 0.0) {
            return Err(invalid(
                "router_lr_scale",
                format!("must be finite and ≥ 0, got {router_lr}"),
            ));
        }
        if self.mode == Mode::Spt && self.router_aux_weight > 0.0 && router_lr == 0.0 {
            return Err(invalid(
                "router_aux_weight",
                "the balancing loss trains only the routers, which are frozen (router_lr_scale 0, \
                 the default with adapters): set --router-lr-scale > 0 as well",
            ));
        }
        for (name, b) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(invalid(name, format!("must be in [0, 1), got {b}")));
            }
        }
        for (name, v, what) in [
            (
                "max_grad_norm",
                self.max_grad_norm,
                "finite and ≥ 0 (0 turns clipping off)",
            ),
            ("weight_decay", self.weight_decay, "finite and ≥ 0"),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(name, format!("must be {what}, got {v}")));
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return Err(invalid(
                "adam_eps",
                format!(
                    "must be finite and > 0 (it keeps the update's denominator away from 0), got {}",
                    self.adam_eps
                ),
            ));
        }
        if self.lora_rank > 0 && !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(invalid(
                "lora_alpha",
                format!(
                    "must be finite and > 0 (the adapter's scale is alpha / rank), got {}",
                    self.lora_alpha
                ),
            ));
        }
        if self.warmup_steps.is_some() && self.warmup_ratio > 0.0 {
            return Err(invalid(
                "warmup_steps",
                format!(
                    "give warmup_steps or warmup_ratio, not both (got {} steps and ratio {})",
                    self.warmup_steps.unwrap_or(0),
                    self.warmup_ratio
                ),
            ));
        }
        if !(self.device == "cpu"
            || self.device == "cuda"
            || self
                .device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok()))
        {
            return Err(invalid(
                "device",
                format!("expected cpu, cuda or cuda:N, got `{}`", self.device),
            ));
        }
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
        let mut c = self.clone();
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

/// Is `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set to a true value?
pub fn hub_offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|k| {
        std::env::var(k).is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
    })
}

/// The hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => hf_hub::Cache::new(PathBuf::from(p)),
        None => hf_hub::Cache::from_env(),
    }
}

/// Files a model directory needs, and the tokenizer alternatives tried in order.
const REQUIRED_FILES: [&str; 2] = ["config.json", "model.safetensors"];
const TOKENIZER_SETS: [&[&str]; 3] = [&["tokenizer.json"], &["vocab.json", "merges.txt"], &["vocab.txt"]];

/// A local directory as is; otherwise a hub id looked up in the cache and, unless offline,
/// downloaded. Returns the directory holding `config.json`, `model.safetensors` and the
/// tokenizer files.
pub fn resolve_model(id_or_path: &str) -> Result<PathBuf, ConfigError> {
    resolve_model_with(id_or_path, &hub_cache(), hub_offline())
}

/// [`resolve_model`] with an explicit cache and offline switch.
pub fn resolve_model_with(
    id_or_path: &str,
    cache: &hf_hub::Cache,
    offline: bool,
) -> Result<PathBuf, ConfigError> {
    let err = |msg: String| ConfigError::Model {
        id: id_or_path.to_string(),
        msg,
    };
    let p = Path::new(id_or_path);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let looks_like_path =
        id_or_path.starts_with(['.', '/', '~']) || id_or_path.matches('/').count() > 1 || p.is_file();
    if looks_like_path {
        return Err(err(
            "is not a directory (a model directory needs config.json and model.safetensors)".into(),
        ));
    }
    let repo = cache.model(id_or_path.to_string());
    let cached: Option<Vec<PathBuf>> = REQUIRED_FILES.iter().map(|f| repo.get(f)).collect();
    if let Some(files) = cached {
        if let Some(dir) = files[0].parent() {
            return Ok(dir.to_path_buf());
        }
    }
    if offline {
        return Err(err(format!(
            "not a local directory and not in the Hugging Face cache at {}; HF_HUB_OFFLINE is set, so it cannot be \
             downloaded. Download it once with network access, or pass a local directory",
            cache.path().display()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .build()
        .map_err(|e| err(format!("cannot start the hub client: {e}")))?;
    let remote = api.model(id_or_path.to_string());
    let mut dir = None;
    for f in REQUIRED_FILES {
        let path = remote
            .get(f)
            .map_err(|e| err(format!("cannot download {f}: {e}")))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    for set in TOKENIZER_SETS {
        if set.iter().all(|f| remote.get(f).is_ok()) {
            break;
        }
    }
    dir.ok_or_else(|| err("the hub returned no file paths".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FinetuneArgs,
    }

    fn parse(argv: &[&str]) -> FinetuneArgs {
        Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    const FLAGS: &[&str] = &[
        "--model",
        "sentence-transformers/all-MiniLM-L6-v2",
        "--task",
        "classify",
        "--train-file",
        "data/rt/rt.csv",
        "--validation-split",
        "0.2",
        "--split-by",
        "movie_name",
        "--text-column",
        "text",
        "--label-column",
        "category",
        "--drop-label",
        "plot",
        "--max-length",
        "128",
        "--output-dir",
        "runs/rt",
        "--mode",
        "spt",
        "--attn-k",
        "32",
        "--ffn-blocks",
        "16",
        "--ffn-top-k",
        "4",
        "--ffn-skip-bias",
        "true",
        "--router-lr-scale",
        "0.1",
        "--lora-rank",
        "16",
        "--lora-alpha",
        "32",
        "--modules-to-save",
        "pooler,bert.embeddings.LayerNorm",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--grad-accum",
        "2",
        "--lr",
        "0.0003",
        "--warmup-ratio",
        "0.1",
        "--schedule",
        "cosine",
        "--weight-decay",
        "0.01",
        "--clip",
        "1.0",
        "--seed",
        "7",
        "--eval-every",
        "100",
        "--save-every",
        "200",
        "--keep-last",
        "2",
    ];

    const TOML: &str = r#"
        model = "sentence-transformers/all-MiniLM-L6-v2"
        task = "classify"
        train_files = ["data/rt/rt.csv"]
        validation_split = 0.2
        split_by = "movie_name"
        text_column = "text"
        label_column = "category"
        drop_labels = ["plot"]
        max_length = 128
        output_dir = "runs/rt"
        mode = "spt"
        attn_k = 32
        ffn_blocks = 16
        ffn_top_k = 4
        ffn_skip_bias = true
        router_lr_scale = 0.1
        lora_rank = 16
        lora_alpha = 32.0
        modules_to_save = ["pooler", "bert.embeddings.LayerNorm"]
        epochs = 2
        batch_size = 32
        grad_accum = 2
        lr = 0.0003
        warmup_ratio = 0.1
        schedule = "cosine"
        weight_decay = 0.01
        max_grad_norm = 1.0
        seed = 7
        eval_every = 100
        save_every = 200
        keep_last = 2
    "#;

    #[test]
    fn toml_json_and_flags_are_equivalent() {
        let from_flags = FinetuneConfig::from_args(&parse(FLAGS)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("c.toml");
        std::fs::write(&t, TOML).unwrap();
        let from_toml = FinetuneConfig::from_args(&parse(&["--config", t.to_str().unwrap()])).unwrap();
        assert_eq!(from_toml, from_flags);
        let j = dir.path().join("c.json");
        std::fs::write(&j, serde_json::to_string(&from_flags).unwrap()).unwrap();
        assert_eq!(FinetuneConfig::load(&j).unwrap(), from_flags);
        assert_eq!(from_flags.mode, Mode::Spt);
        assert_eq!(from_flags.drop_labels, vec!["plot".to_string()]);
        assert_eq!(
            from_flags.modules_to_save,
            ["pooler", "bert.embeddings.LayerNorm"]
        );
        // Flags override the file.
        let over = FinetuneConfig::from_args(&parse(&[
            "--config",
            t.to_str().unwrap(),
            "--lr",
            "0.001",
            "--resume",
        ]))
        .unwrap();
        assert_eq!(over.lr, 0.001);
        assert_eq!(over.resume_from(), Resume::Latest);
        assert_eq!(over.seed, 7);
        let same_run = FinetuneConfig {
            lr: from_toml.lr,
            ..over.clone()
        };
        assert_eq!(same_run.run_identity(), from_toml.run_identity()); // --resume does not change it
                                                                       // Trainer settings: 1000 items / 32 = 32 batches × 2 epochs / 2 accum = 32 steps, warmup 10%.
        let tc = from_flags.trainer_config(1000);
        assert_eq!(tc.warmup_steps, 4);
        assert_eq!(tc.adamw.weight_decay, 0.01);
        assert_eq!(tc.max_grad_norm, 1.0);
        assert_eq!(tc.lr_scales, vec![("router".to_string(), 0.1)]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("bad.toml");
        std::fs::write(&t, "model = \"m\"\nlearning_rate = 0.1\n").unwrap();
        let e = FinetuneConfig::load(&t).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("learning_rate"), "{e}");
        let base = ["--model", "m", "--train-file", "a.csv"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            FinetuneConfig::from_args(&parse(&v)).unwrap_err().to_string()
        };
        assert!(with(&["--batch-size", "0"]).contains("batch size must be at least 1"));
        assert!(with(&["--attn-k", "4", "--attn-k-fraction", "0.5"]).contains("not both"));
        assert!(with(&["--ffn-blocks", "2", "--ffn-top-k", "3"]).contains("ffn_top_k"));
        assert!(with(&["--device", "tpu"]).contains("device"));
        assert!(with(&["--router-lr-scale=-1"]).contains("router_lr_scale"));
        // The balancing loss needs routers that train; with adapters they are frozen by default.
        let e = with(&["--mode", "spt", "--router-aux-weight", "0.1"]);
        assert!(
            e.contains("router_aux_weight") && e.contains("--router-lr-scale"),
            "{e}"
        );
        let ok = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            FinetuneConfig::from_args(&parse(&v)).unwrap()
        };
        let aux = ["--mode", "spt", "--router-aux-weight", "0.1"];
        assert_eq!(
            ok(&[&aux[..], &["--router-lr-scale", "0.5"]].concat()).router_lr_scale(),
            0.5
        );
        assert_eq!(
            ok(&[&aux[..], &["--lora-rank", "0"]].concat()).router_lr_scale(),
            1.0
        );
        assert_eq!(ok(&["--mode", "spt"]).router_lr_scale(), 0.0);
        assert_eq!(
            ok(&["--mode", "spt"]).trainer_config(100).lr_scales,
            vec![("router".to_string(), 0.0)]
        );
        assert!(ok(&["--mode", "lora"]).trainer_config(100).lr_scales.is_empty());
        let e = FinetuneConfig::from_args(&parse(&["--train-file", "a.csv"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`model`"), "{e}");
    }

    #[test]
    fn model_resolution_local_cached_and_offline() {
        let dir = tempfile::tempdir().unwrap();
        let cache = hf_hub::Cache::new(dir.path().join("hub"));
        // Offline and uncached: the error names the id and says why.
        let e = resolve_model_with("someone/tiny-bert", &cache, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("someone/tiny-bert") && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        // Cached (hub cache layout: refs/main → snapshots/<commit>/files).
        let repo = dir.path().join("hub/models--someone--tiny-bert");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::write(snap.join(f), "{}").unwrap();
        }
        assert_eq!(
            resolve_model_with("someone/tiny-bert", &cache, true).unwrap(),
            snap
        );
        // Local directory.
        assert_eq!(
            resolve_model_with(snap.to_str().unwrap(), &cache, true).unwrap(),
            snap
        );
        let e = resolve_model_with("./no/such/dir", &cache, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("./no/such/dir") && e.contains("not a directory"),
            "{e}"
        );
    }
}
