//! [`FinetuneArgs`]: the flags of `spt-train finetune`, and how they override a config file.

use std::path::{Path, PathBuf};

use super::{invalid, ConfigError, FfnUnits, FinetuneConfig, Mode};
use crate::data::{DataFormat, TaskKind};
use crate::optim::ScheduleKind;
use crate::presets::{self, Preset};

/// What identifies a data file: its device and inode where it exists (so a hard link is the same
/// file), else its path without `.` components.
fn file_key(p: &Path) -> String {
    #[cfg(unix)]
    if let Ok(m) = std::fs::metadata(p) {
        use std::os::unix::fs::MetadataExt;
        return format!("{}:{}", m.dev(), m.ino());
    }
    let path: PathBuf = std::fs::canonicalize(p).unwrap_or_else(|_| {
        p.components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect()
    });
    path.display().to_string()
}

/// The flags of `spt-train finetune`; each overrides the config file's field of the same name.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct FinetuneArgs {
    /// TOML or JSON file with any of these settings (flags win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Local model directory or Hugging Face hub id (honours HF_HOME, HF_HUB_CACHE, HF_ENDPOINT,
    /// HF_HUB_OFFLINE).
    #[arg(long)]
    pub model: Option<String>,
    /// classify (BERT, a label per text) or lm (GPT-2, next-token loss) (default: classify).
    #[arg(long, value_enum, hide_possible_values = true, value_name = "classify|lm")]
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
    /// Held-out fraction when no validation file is given (0: none) (default: 0.1).
    #[arg(long)]
    pub validation_split: Option<f64>,
    /// Column kept whole on one side of the split (e.g. movie_name).
    #[arg(long)]
    pub split_by: Option<String>,
    /// csv, tsv or jsonl (default: from the file's extension); --task lm reads a CSV / TSV /
    /// JSONL file's --text-column, any other file as plain text.
    #[arg(long, value_enum, hide = true)]
    pub format: Option<DataFormat>,
    /// Column (CSV, TSV) or key (JSONL) holding the text (default: text).
    #[arg(long)]
    pub text_column: Option<String>,
    /// Second text column or key, for sentence-pair tasks (default: none).
    #[arg(long)]
    pub text_pair_column: Option<String>,
    /// Column or key holding the label (default: label).
    #[arg(long)]
    pub label_column: Option<String>,
    /// Drop rows with this label; repeat for several.
    #[arg(long = "drop-label", value_name = "LABEL")]
    pub drop_labels: Vec<String>,
    /// Fixed label mapping (labels.json).
    #[arg(long, hide = true)]
    pub label_map: Option<PathBuf>,
    /// Truncate texts to this many tokens (default: the model's maximum).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Tokens per training block for --task lm: the text is packed into blocks of this length
    /// (default: 128).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Run directory: checkpoints, metrics, the resolved settings (default: spt-output).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Use a non-empty output directory that spt-train did not create, or restart an earlier run.
    #[arg(long)]
    pub overwrite: bool,
    /// What trains: every weight (dense), LoRA adapters (lora), or SPT's sparse layers + LoRA
    /// (default: dense).
    #[arg(long, value_enum, hide_possible_values = true, value_name = "dense|lora|spt")]
    pub mode: Option<Mode>,
    /// SPT recipe (default fast; implies --mode spt); see "Presets" below. Other flags override
    /// its values.
    #[arg(long, value_enum, hide_possible_values = true, value_name = "fast|accurate")]
    pub preset: Option<Preset>,
    /// Keys per query for sparse attention (exclusive with --attn-k-fraction).
    #[arg(long)]
    pub attn_k: Option<usize>,
    /// Fraction of keys per query for sparse attention.
    #[arg(long)]
    pub attn_k_fraction: Option<f64>,
    /// Block mode: tiles of N queries share key blocks of N keys (default: per-query top-k).
    #[arg(long, value_name = "N")]
    pub attn_tile: Option<usize>,
    #[arg(long, hide = true)]
    pub pq_subspaces: Option<usize>,
    #[arg(long, hide = true)]
    pub pq_codewords: Option<usize>,
    /// Refresh PQ codebooks every N steps (0: never).
    #[arg(long, hide = true)]
    pub pq_refresh_every: Option<u64>,
    /// Routed-FFN blocks (default: 8).
    #[arg(long)]
    pub ffn_blocks: Option<usize>,
    /// Routed-FFN blocks used per token (default: the preset's).
    #[arg(long)]
    pub ffn_top_k: Option<usize>,
    /// Which hidden units form each routed-FFN block.
    #[arg(long, value_enum, hide = true)]
    pub ffn_units: Option<FfnUnits>,
    /// Linear correction for the FFN blocks a token skips, fitted on the calibration tokens
    /// (default: the preset's).
    #[arg(long)]
    pub ffn_correction: Option<bool>,
    /// Batches of 16 training examples that calibrate the sparse layers (spt).
    #[arg(long, hide = true)]
    pub calibration_batches: Option<usize>,
    /// Router load-balancing loss weight (0: off).
    #[arg(long, hide = true)]
    pub router_aux_weight: Option<f64>,
    /// The routers' learning rate as a multiple of --lr (spt). Default: 0 with adapters (the
    /// routers keep their fit to the calibration tokens), 1 with --lora-rank 0.
    #[arg(long, hide = true)]
    pub router_lr_scale: Option<f64>,
    /// LoRA rank (lora, spt). In spt mode 0 means no adapters: every weight trains through the
    /// sparse attention and routed FFN (e.g. training from random weights) (default: 8).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA updates are scaled by alpha / rank (default: 16).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long, hide = true)]
    pub lora_dropout: Option<f64>,
    /// Modules trained in full besides the adapters and head (lora, spt), comma-separated HF
    /// module names, e.g. `pooler` (PEFT's `modules_to_save`); `""` for none (default: pooler
    /// for classifiers, none for language models).
    #[arg(long, value_delimiter = ',', value_name = "MODULES")]
    pub modules_to_save: Vec<String>,
    /// GPT-2 only: random initial weights instead of a checkpoint.
    #[arg(long, hide = true)]
    pub random_init: bool,
    /// Passes over the training data (default: 3).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Total optimizer updates (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Examples per micro-batch (default: 16).
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, hide = true)]
    pub eval_batch_size: Option<usize>,
    /// Micro-batches per optimizer update (default: 1).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate (default: dense 1e-4, lora and spt 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, hide = true)]
    pub warmup_steps: Option<u64>,
    /// Fraction of the optimizer steps spent warming the learning rate up (default: 0).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Learning-rate decay after the warm-up (default: linear).
    #[arg(
        long,
        value_enum,
        hide_possible_values = true,
        value_name = "linear|cosine|constant"
    )]
    pub schedule: Option<ScheduleKind>,
    /// AdamW's decoupled weight decay (default: 0.01).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long, hide = true)]
    pub adam_beta1: Option<f64>,
    #[arg(long, hide = true)]
    pub adam_beta2: Option<f64>,
    #[arg(long, hide = true)]
    pub adam_eps: Option<f64>,
    /// Clip the global gradient norm to this (0: off) (default: 1).
    #[arg(long, alias = "clip")]
    pub max_grad_norm: Option<f64>,
    /// Seeds the data order, the validation split, dropout and new weights (default: 42).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate every N optimizer steps (0: only at the end) (default: 0).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Save a checkpoint every N optimizer steps (0: only at the end and on Ctrl-C) (default: 0).
    #[arg(long)]
    pub save_every: Option<u64>,
    #[arg(long, hide = true)]
    pub keep_last: Option<usize>,
    #[arg(long, hide = true)]
    pub log_every: Option<u64>,
    /// Resume from the latest checkpoint in --output-dir, or from the given checkpoint directory
    /// (or run folder: its latest checkpoint).
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    pub resume: Option<String>,
    /// cpu, cuda or cuda:N (default: cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// f32 or bf16: the precision of the CPU's products with layer weights (LoRA's frozen ones,
    /// the routed FFN's blocks and linear correction, GPT-2's LM head) and of the fused dense
    /// attention: bf16 inputs, f32 accumulation, on AMX where the CPU has it (default: f32).
    #[arg(long, value_name = "f32|bf16")]
    pub matmul_precision: Option<spt_ops::MatmulPrecision>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Any setting by its place in the config file, e.g. `--set spt.ffn.top_k=6` or
    /// `--set optim.lr=1e-3` (after `--config` and the other flags); repeat for several.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
}

macro_rules! set_if_some {
    ($args:ident, $cfg:ident; plain: $($p:ident),* ; optional: $($o:ident),* ; list: $($l:ident),*) => {
        $( if let Some(v) = $args.$p.clone() { $cfg.$p = v; } )*
        $( if let Some(v) = $args.$o.clone() { $cfg.$o = Some(v); } )*
        $( if !$args.$l.is_empty() { $cfg.$l = $args.$l.clone(); } )*
    };
}

impl FinetuneConfig {
    /// Defaults (the mode's learning rate and, in spt mode, the preset), then `--config`, then
    /// the flags, then `--set`; then [`FinetuneConfig::validate`].
    pub fn from_args(args: &FinetuneArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(p) => Some((p.as_path(), Self::read_table(p)?)),
            None => None,
        };
        let mut cfg = Self::defaults_for(file.as_ref(), args.mode, args.task, args.preset)?;
        if let Some((p, m)) = file {
            cfg = cfg.overlay(p, m)?;
        }
        cfg.apply(args);
        args.check_sets_against_flags()?;
        cfg.apply_sets(&args.set)?;
        if args.validation_split.is_some() && !cfg.validation_files.is_empty() {
            return Err(invalid(
                "validation_split",
                "--validation-split holds rows out of the training files, --validation-file gives the \
                 validation rows: give one, not both",
            ));
        }
        cfg.validate()?;
        for unused in cfg.unused_settings() {
            tracing::warn!("{unused}");
        }
        let ignored = args.flags_ignored_in(cfg.mode);
        // The same settings from the config file or --set, where no flag gave them.
        let from_file: Vec<&str> = cfg
            .settings_ignored_in_mode()
            .into_iter()
            .filter(|f| !ignored.contains(&format!("--{}", f.replace('_', "-")).as_str()))
            .collect();
        if !from_file.is_empty() {
            tracing::warn!(
                "{} (from the config file or --set) {} no effect in {} mode",
                from_file.join(", "),
                if from_file.len() == 1 { "has" } else { "have" },
                format!("{:?}", cfg.mode).to_lowercase(),
            );
        }
        if !ignored.is_empty() {
            let wants = if cfg.mode == Mode::Dense {
                "--mode lora or --mode spt"
            } else {
                "--mode spt"
            };
            tracing::warn!(
                "{} {} no effect in {} mode; add {wants} to use {}",
                ignored.join(", "),
                if ignored.len() == 1 { "has" } else { "have" },
                format!("{:?}", cfg.mode).to_lowercase(),
                if ignored.len() == 1 { "it" } else { "them" },
            );
        }
        Ok(cfg)
    }

    /// The defaults a config file is read over: those of the mode, task and preset given by
    /// flag, else by the file, else dense classification ([`presets::base_config`]).
    pub(super) fn defaults_for(
        file: Option<&(&Path, serde_json::Map<String, serde_json::Value>)>,
        mode: Option<Mode>,
        task: Option<TaskKind>,
        preset: Option<Preset>,
    ) -> Result<Self, ConfigError> {
        fn key<T: serde::de::DeserializeOwned>(
            file: Option<&(&Path, serde_json::Map<String, serde_json::Value>)>,
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
        let preset_flag = preset;
        let preset = match preset {
            Some(p) => Some(p),
            None => key(file, "preset")?,
        };
        // A preset is an spt recipe, so it implies the mode when none is given.
        let mode = match (mode, preset_flag) {
            (Some(m), _) => m,
            (None, Some(_)) => Mode::Spt,
            (None, None) => {
                key(file, "mode")?.unwrap_or(if preset.is_some() { Mode::Spt } else { Mode::Dense })
            }
        };
        let task = match task {
            Some(t) => t,
            None => key(file, "task")?.unwrap_or(TaskKind::Classify),
        };
        if preset.is_some() && mode != Mode::Spt {
            return Err(invalid(
                "preset",
                format!("presets are spt recipes; the mode is {mode:?}").to_lowercase(),
            ));
        }
        Ok(presets::base_config(mode, task, presets::effective(mode, preset)))
    }

    /// The LoRA settings (dense mode) and sparse-layer settings (dense and lora modes) that differ
    /// from the mode's defaults, and so were set, to no effect.
    pub fn settings_ignored_in_mode(&self) -> Vec<&'static str> {
        const LORA: [&str; 3] = ["lora_rank", "lora_alpha", "lora_dropout"];
        // (attn_tile: named by unused_settings in every mode that keeps each key.)
        const SPT: [&str; 12] = [
            "attn_k",
            "attn_k_fraction",
            "pq_subspaces",
            "pq_codewords",
            "pq_refresh_every",
            "ffn_blocks",
            "ffn_top_k",
            "ffn_units",
            "ffn_correction",
            "calibration_batches",
            "router_aux_weight",
            "router_lr_scale",
        ];
        let unused: Vec<&'static str> = match self.mode {
            Mode::Dense => LORA.iter().chain(SPT.iter()).copied().collect(),
            Mode::Lora => SPT.to_vec(),
            Mode::Spt => return Vec::new(),
        };
        let defaults = presets::base_config(self.mode, self.task, presets::effective(self.mode, self.preset));
        let (Ok(now), Ok(then)) = (serde_json::to_value(self), serde_json::to_value(&defaults)) else {
            return Vec::new();
        };
        unused
            .into_iter()
            .filter(|f| now.get(*f) != then.get(*f))
            .collect()
    }

    /// Settings that were given but change nothing in this run, each said in a sentence.
    pub fn unused_settings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let defaults = presets::base_config(self.mode, self.task, presets::effective(self.mode, self.preset));
        if self.task == TaskKind::Classify && self.block_size != defaults.block_size {
            out.push(
                "block_size (--block-size) has no effect in a classification run: texts are cut at \
                 max_length (--max-length)"
                    .into(),
            );
        }
        if self.task == TaskKind::Lm {
            // Classification settings an LM run reads past.
            let given = [
                ("split_by (--split-by)", self.split_by.is_some()),
                ("drop_labels (--drop-label)", !self.drop_labels.is_empty()),
                (
                    "text_pair_column (--text-pair-column)",
                    self.text_pair_column.is_some(),
                ),
                ("label_map (--label-map)", self.label_map.is_some()),
            ];
            for (name, _) in given.iter().filter(|(_, set)| *set) {
                out.push(format!(
                    "{name} has no effect in a language-modelling run (--task lm): it reads only \
                     the text, split into blocks"
                ));
            }
        }
        if self.eval_every > 0 && self.validation_split <= 0.0 && self.validation_files.is_empty() {
            out.push(format!(
                "eval_every (--eval-every {}) has no effect: there are no validation rows (--validation-split \
                 0 and no --validation-file)",
                self.eval_every
            ));
        }
        if self.split_by.is_some() && !self.validation_files.is_empty() {
            out.push("split_by (--split-by) has no effect: the validation rows come from --validation-file, none are held out".into());
        }
        if self.mode == Mode::Dense && !self.modules_to_save.is_empty() {
            out.push(format!(
                "modules_to_save (--modules-to-save {}) has no effect in dense mode: every weight trains",
                self.modules_to_save.join(",")
            ));
        }
        out.extend(self.repeated_data_files());
        let every_key = self.mode != Mode::Spt
            || (self.attn_k.is_none() && self.attn_k_fraction.is_some_and(|f| f >= 1.0));
        if self.attn_tile.is_some() && every_key {
            out.push(
                "attn_tile (--attn-tile) has no effect: attention keeps every key (the fused dense kernel)"
                    .into(),
            );
        }
        out
    }

    /// A training file given twice (its rows train twice per epoch), a validation file given
    /// twice (its rows count twice), and a validation file that is also a training file (its
    /// score measures rows the model trains on), each in a sentence. Files are compared as the
    /// file system sees them: `./a.csv`, a link and a hard link to `a.csv` are `a.csv`.
    fn repeated_data_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut train = std::collections::HashSet::new();
        for p in &self.train_files {
            if !train.insert(file_key(p)) {
                out.push(format!(
                    "train_files (--train-file) names {} more than once: its rows are trained on \
                     that many times per epoch",
                    p.display()
                ));
            }
        }
        let mut validation = std::collections::HashSet::new();
        for p in &self.validation_files {
            let key = file_key(p);
            if train.contains(&key) {
                out.push(format!(
                    "validation file {} is also a training file: its score measures rows the \
                     model trains on",
                    p.display()
                ));
            } else if !validation.insert(key) {
                out.push(format!(
                    "validation_files (--validation-file) names {} more than once: its rows count \
                     that many times in every evaluation",
                    p.display()
                ));
            }
        }
        out.dedup();
        out
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
        // Likewise the run's length and the warmup (from a config file, say).
        if a.epochs.is_some() && a.max_steps.is_none() {
            c.max_steps = None;
        }
        if a.warmup_ratio.is_some() && a.warmup_steps.is_none() {
            c.warmup_steps = None;
        }
        if a.warmup_steps.is_some() && a.warmup_ratio.is_none() {
            c.warmup_ratio = 0.0;
        }
        // A preset is an spt recipe: given as a flag, it outranks a file's mode.
        if a.preset.is_some() && a.mode.is_none() {
            c.mode = Mode::Spt;
        }
        set_if_some!(a, c;
            plain: model, task, validation_split, text_column, label_column, block_size, output_dir, mode,
                pq_refresh_every, ffn_blocks, ffn_top_k, ffn_units, ffn_correction, calibration_batches, router_aux_weight, lora_rank, lora_alpha, lora_dropout,
                epochs, batch_size, grad_accum, lr, warmup_ratio, schedule, weight_decay, adam_beta1, adam_beta2,
                adam_eps, max_grad_norm, seed, eval_every, save_every, keep_last, log_every, device,
                matmul_precision;
            optional: preset, tokenizer, router_lr_scale, split_by, format, text_pair_column, label_map, max_length, attn_k,
                attn_k_fraction, attn_tile, pq_subspaces, pq_codewords, max_steps, eval_batch_size, warmup_steps, resume;
            list: train_files, validation_files, drop_labels, modules_to_save
        );
        // `--modules-to-save ""`: none (a preset's pooler off), not a module named "".
        c.modules_to_save.retain(|m| !m.trim().is_empty());
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
}

impl FinetuneArgs {
    /// Refuses a `--set` of one form of a setting beside a flag of the other (`--max-steps 5
    /// --set optim.epochs=3`): one of the two would vanish without a word.
    fn check_sets_against_flags(&self) -> Result<(), ConfigError> {
        let flag_given = |field: &str| match field {
            "attn_k" => self.attn_k.is_some(),
            "attn_k_fraction" => self.attn_k_fraction.is_some(),
            "warmup_steps" => self.warmup_steps.is_some(),
            "warmup_ratio" => self.warmup_ratio.is_some(),
            "max_steps" => self.max_steps.is_some(),
            _ => false,
        };
        for s in &self.set {
            let path = s.split_once('=').map_or(s.as_str(), |(p, _)| p.trim());
            // An unknown path is named by apply_sets.
            let Some(field) = super::sections::field_of(path) else {
                continue;
            };
            // max_steps outranks epochs rather than replacing it: beside --epochs, one is lost.
            if field == "max_steps" && self.epochs.is_some() {
                return Err(invalid(
                    path,
                    format!("--set {s} outranks --epochs, which would be ignored; give one of them"),
                ));
            }
            if let Some((partner, _)) = super::replaced_by(field).into_iter().find(|(p, _)| flag_given(p)) {
                return Err(invalid(
                    path,
                    format!(
                        "--set {s} replaces {partner}, which a flag gives (--{}); give one of them",
                        partner.replace('_', "-")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The flags given on the command line that `mode` does not use: the LoRA flags in dense
    /// mode, the sparse-layer flags in dense and lora modes. (`--modules-to-save` in dense mode
    /// is reported by [`FinetuneConfig::unused_settings`].)
    pub fn flags_ignored_in(&self, mode: Mode) -> Vec<&'static str> {
        let lora = [
            ("--lora-rank", self.lora_rank.is_some()),
            ("--lora-alpha", self.lora_alpha.is_some()),
            ("--lora-dropout", self.lora_dropout.is_some()),
        ];
        let spt = [
            ("--attn-k", self.attn_k.is_some()),
            ("--attn-k-fraction", self.attn_k_fraction.is_some()),
            ("--attn-tile", self.attn_tile.is_some()),
            ("--pq-subspaces", self.pq_subspaces.is_some()),
            ("--pq-codewords", self.pq_codewords.is_some()),
            ("--pq-refresh-every", self.pq_refresh_every.is_some()),
            ("--ffn-blocks", self.ffn_blocks.is_some()),
            ("--ffn-top-k", self.ffn_top_k.is_some()),
            ("--ffn-units", self.ffn_units.is_some()),
            ("--ffn-correction", self.ffn_correction.is_some()),
            ("--calibration-batches", self.calibration_batches.is_some()),
            ("--router-aux-weight", self.router_aux_weight.is_some()),
            ("--router-lr-scale", self.router_lr_scale.is_some()),
        ];
        let unused: &[(&'static str, bool)] = match mode {
            Mode::Dense => &[&lora[..], &spt[..]].concat(),
            Mode::Lora => &spt,
            Mode::Spt => &[],
        };
        unused
            .iter()
            .filter(|(_, given)| *given)
            .map(|(f, _)| *f)
            .collect()
    }
}
