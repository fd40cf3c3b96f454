//! `spt-train eval`: accuracy and macro-F1 (classify) or loss and perplexity (lm).

use std::path::PathBuf;

use crate::common::{
    check_label_map, check_model_config, check_model_type, device, labels_path, load_trained,
    recorded_classes, task_name, task_of, ModelArgs, PrecisionArgs,
};
use anyhow::{bail, Context, Result};
use clap::Args;
use spt_train::config::{resolve_model, FinetuneArgs, FinetuneConfig};
use spt_train::data::{DataFormat, LabelMap, TaskKind};
use spt_train::pipeline::{load_tokenizer, prepare_data, prepare_data_with_labels};
use spt_train::trainer::evaluate;

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) precision: PrecisionArgs,
    /// A finetune config file: data columns and split are taken from it (default: the settings
    /// --checkpoint was trained with); so are mode and sparsity settings without --checkpoint
    /// (a checkpoint is rebuilt with the settings it was trained with).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// classify or lm (default: `--config`'s task, else the `--checkpoint` run's, else the
    /// model's: lm for GPT-2).
    #[arg(long, value_enum)]
    pub(crate) task: Option<TaskKind>,
    /// Data file; repeat for several.
    #[arg(long = "data-file", required = true)]
    pub(crate) data_files: Vec<PathBuf>,
    /// csv, tsv or jsonl (default: from the file's extension); --task lm reads a CSV / TSV /
    /// JSONL file's --text-column, any other file as plain text.
    #[arg(long, value_enum)]
    pub(crate) format: Option<DataFormat>,
    /// Text column (default: `--config`'s, else the --checkpoint run's, else `text`).
    #[arg(long)]
    pub(crate) text_column: Option<String>,
    /// Second text column, for sentence pairs (default: `--config`'s, else the --checkpoint run's,
    /// else none).
    #[arg(long)]
    pub(crate) text_pair_column: Option<String>,
    /// Label column (default: `--config`'s, else the --checkpoint run's, else `label`).
    #[arg(long)]
    pub(crate) label_column: Option<String>,
    /// Drop rows with this label; repeat for several (default: `--config`'s, else the --checkpoint
    /// run's).
    #[arg(long = "drop-label")]
    pub(crate) drop_labels: Vec<String>,
    /// labels.json of the run (default: the classes the checkpoint records; for a checkpoint of
    /// an older spt-train, its run's labels.json; without a checkpoint, the id2label of the
    /// model's config.json, as an export writes it).
    #[arg(long)]
    pub(crate) label_map: Option<PathBuf>,
    /// Examples per evaluation batch.
    #[arg(long, default_value_t = 32)]
    pub(crate) batch_size: usize,
    /// Truncation length in tokens (default: `--config`'s, else the --checkpoint run's, else the
    /// model's maximum).
    #[arg(long)]
    pub(crate) max_length: Option<usize>,
    /// LM block length in tokens (default: `--config`'s, else the --checkpoint run's, else 128).
    #[arg(long)]
    pub(crate) block_size: Option<usize>,
    /// Rows to evaluate: every row of the data files, or the validation rows that the seeded
    /// split of `--config` (`validation_split`, `split_by`, `seed`) holds out of them.
    #[arg(long, value_enum, default_value = "all")]
    pub(crate) split: EvalSplit,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum EvalSplit {
    All,
    Validation,
}

pub(crate) fn eval(a: &EvalArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1, got 0");
    }
    a.model.check_checkpoint()?;
    a.precision.apply(&a.model.device)?;
    let dev = device(&a.model.device)?;
    let model_dir = resolve_model(&a.model.model)?;
    // The run's own settings when no --config is given: its data is then read as it was in
    // training (tokenizer, columns, dropped labels, max_length, block_size).
    let (mut cfg, settings_from) = match &a.config {
        Some(p) => (
            FinetuneConfig::load(p)?,
            Some(format!("--config {}", p.display())),
        ),
        None => match a.model.run_settings()? {
            Some(run) => (run, Some("--checkpoint's run".to_string())),
            None => (FinetuneConfig::default(), None),
        },
    };
    // A checkpoint is rebuilt with the model settings it was trained with (`load_trained`):
    // --config's, where they differ, are said to go unused rather than dropped silently.
    if let (Some(p), Some(run)) = (&a.config, a.model.run_settings()?) {
        let given = FinetuneConfig::file_settings(p)?;
        let unused = model_setting_changes(&run, &cfg, &given);
        if !unused.is_empty() {
            tracing::warn!(
                "--config {}: {} not used: {} is rebuilt with the settings it was trained with; \
                 to evaluate other ones, export it (`spt-train export`) and evaluate the export",
                p.display(),
                unused.join(", "),
                a.model.checkpoint.as_deref().unwrap_or(p).display()
            );
        }
    }
    // A run's settings belong to its task: reading an LM run's columns as a classifier's would
    // fail on a column the run never had.
    let task = match (a.task, &settings_from) {
        (Some(t), Some(from)) if t != cfg.task => bail!(
            "{from} is a {} run (its `task`), and --task asks for {}; drop --task, or give \
             that task's run config",
            task_name(cfg.task),
            task_name(t)
        ),
        (Some(t), _) => t,
        (None, Some(_)) => cfg.task,
        (None, None) => task_of(&a.model.model)?,
    };
    // Why the task is what it is matters to a model of the wrong type, not to a broken config.
    check_model_type(task, &model_dir).map_err(|e| match (a.task, &settings_from) {
        (None, Some(from)) => e.context(format!("{from} is a {} run", task_name(task))),
        _ => e,
    })?;
    check_model_config(task, &model_dir)?;
    // Flags of the other task, read past without a word.
    let unused: Vec<&str> = match task {
        TaskKind::Lm => [
            ("--max-length", a.max_length.is_some()),
            ("--label-column", a.label_column.is_some()),
            ("--drop-label", !a.drop_labels.is_empty()),
            ("--text-pair-column", a.text_pair_column.is_some()),
        ]
        .iter()
        .filter(|(_, given)| *given)
        .map(|(f, _)| *f)
        .collect(),
        TaskKind::Classify => a.block_size.map(|_| "--block-size").into_iter().collect(),
    };
    if !unused.is_empty() {
        tracing::warn!(
            "{} {} no effect on {}",
            unused.join(", "),
            if unused.len() == 1 { "has" } else { "have" },
            task_name(task)
        );
    }
    // The flags go through the same merge as finetune's: a flag given overrides `--config`
    // (or, without one, the defaults).
    cfg.apply(&FinetuneArgs {
        model: Some(a.model.model.clone()),
        task: Some(task),
        train_files: a.data_files.clone(),
        format: a.format,
        text_column: a.text_column.clone(),
        text_pair_column: a.text_pair_column.clone(),
        label_column: a.label_column.clone(),
        drop_labels: a.drop_labels.clone(),
        label_map: labels_path(&a.label_map, &a.model.checkpoint, &model_dir),
        max_length: a.max_length,
        block_size: a.block_size,
        tokenizer: a.model.tokenizer.clone(),
        ..FinetuneArgs::default()
    });
    if a.split == EvalSplit::Validation && !cfg.validation_files.is_empty() {
        // That run held nothing out of its training files: a split of them would be rows it
        // trained on, reported as held out.
        let files: Vec<String> = cfg
            .validation_files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        bail!(
            "--split validation: {} took its validation rows from --validation-file ({}), not from a split \
             of its training files; evaluate that file with --data-file {} --split all",
            settings_from.as_deref().unwrap_or("the run"),
            files.join(", "),
            files.join(" --data-file ")
        );
    }
    cfg.validation_files.clear();
    if a.split == EvalSplit::All {
        cfg.validation_split = 0.0;
    } else if settings_from.is_none() || cfg.validation_split <= 0.0 {
        bail!(
            "--split validation needs the settings of a run that held out rows (validation_split > 0): \
             --config RUN/finetune.toml, or --checkpoint RUN"
        );
    }
    let tok = load_tokenizer(&cfg, &model_dir)?;
    // Rows are scored against the classes the checkpoint's head answers in: a --label-map is
    // held to them (refused in another order or count).
    let recorded = recorded_classes(&a.model.checkpoint)?;
    if let Some(f) = &a.label_map {
        check_label_map(f, &LabelMap::load(f)?, recorded.as_ref())?;
    }
    let data = match (&a.label_map, recorded) {
        (None, Some(classes)) => prepare_data_with_labels(&cfg, &tok, &classes)?,
        _ => prepare_data(&cfg, &tok, None)?,
    };
    spt_train::pipeline::check_data_fits_model(&data, &model_dir)?;
    if a.split == EvalSplit::Validation {
        check_same_held_out_rows(a, &cfg, data.held_out.as_ref())?;
    }
    let settings = settings_from.as_ref().map(|_| &cfg);
    let (mut model, _) = load_trained(
        &a.model,
        task,
        data.labels.as_ref().map(LabelMap::len),
        &dev,
        settings,
        Some(&data.train),
    )?;
    // Inference only: frozen weights record nothing for a backward (MiniLM, batch 32: peak RSS
    // 697 → 247 MiB).
    model.net.freeze()?;
    let rows = match a.split {
        EvalSplit::All => &data.train,
        EvalSplit::Validation => data
            .validation
            .as_ref()
            .context("the --config split held out no validation rows")?,
    };
    tracing::info!(examples = rows.len(), "evaluation data ready");
    let rep = evaluate(&mut model, rows, a.batch_size, &dev)?;
    crate::emit(&format!("{}\n", serde_json::to_string(&rep)?))?;
    Ok(())
}

/// `--split validation` re-splits `--data-file` by row: another file, or the training file after
/// an edit, gives other rows (most of them rows the run trained on), reported as held out. The
/// checkpoint records the rows its run held out; those must be the rows evaluated. Checked
/// before the model is built (an spt model calibrates first).
fn check_same_held_out_rows(
    a: &EvalArgs,
    cfg: &FinetuneConfig,
    now: Option<&spt_train::data::DataFingerprint>,
) -> Result<()> {
    let Some(ck) = a.model.checkpoint.as_deref() else {
        return Ok(());
    };
    let ck = crate::common::checkpoint_path(ck)?;
    let Some(record) = spt_train::trainer::DataRecord::of(&ck) else {
        return Ok(()); // a checkpoint from before the record
    };
    if record.held_out_mixed {
        bail!(
            "--split validation: {}'s run changed its held-out rows when it was resumed (another \
             validation_split, validation file or data), so steps before the resume trained on \
             some of the rows it now holds out; evaluate a file it never trained on with --split all",
            ck.display()
        );
    }
    let Some(then) = record.held_out else {
        return Ok(());
    };
    if now == Some(&then) {
        return Ok(());
    }
    // A --config whose split differs from the run's splits other rows out of the same file.
    if let Ok(Some(run)) = crate::common::run_config(Some(&ck)) {
        let mut differ = Vec::new();
        if run.validation_split != cfg.validation_split {
            differ.push(format!(
                "validation_split {} (the run's: {})",
                cfg.validation_split, run.validation_split
            ));
        }
        if run.seed != cfg.seed {
            differ.push(format!("seed {} (the run's: {})", cfg.seed, run.seed));
        }
        if run.split_by != cfg.split_by {
            differ.push(format!(
                "split_by {:?} (the run's: {:?})",
                cfg.split_by, run.split_by
            ));
        }
        if !differ.is_empty() {
            bail!(
                "--split validation: these settings split the training files otherwise than {}'s \
                 run did: {}; evaluate with the run's own settings (--checkpoint without --config, \
                 or --config RUN/finetune.toml)",
                ck.display(),
                differ.join(", ")
            );
        }
    }
    let files: Vec<String> = a.data_files.iter().map(|p| p.display().to_string()).collect();
    // What decides the held-out rows besides the file: for an LM, the blocks follow the
    // tokenizer and block size too.
    let settings = match cfg.task {
        TaskKind::Classify => "--drop-label, the columns",
        TaskKind::Lm => "--block-size, --tokenizer",
    };
    bail!(
        "--split validation: the rows split from {} are not the ones {} held out ({} rows now, {} \
         then; checksums {} and {}): give the run's training files unchanged, with its own {settings} \
         (a file edited since, another file, or other settings split differently)",
        files.join(", "),
        ck.display(),
        now.map_or(0, |n| n.rows),
        then.rows,
        now.map_or("-", |n| n.fnv1a64.as_str()),
        then.fnv1a64
    );
}

/// The settings that shape the model (mode, adapters, sparse layers) that a config file sets
/// (`in_file`) and `given` holds other than `run`, as `name: run's → given`. A setting the file
/// leaves out is no change: the defaults that `given` holds in its place were not asked for.
fn model_setting_changes(run: &FinetuneConfig, given: &FinetuneConfig, in_file: &[String]) -> Vec<String> {
    const MODEL: [&str; 15] = [
        "mode",
        "preset",
        "attn_k",
        "attn_k_fraction",
        "attn_tile",
        "pq_subspaces",
        "pq_codewords",
        "ffn_blocks",
        "ffn_top_k",
        "ffn_units",
        "ffn_correction",
        "lora_rank",
        "lora_alpha",
        "modules_to_save",
        "random_init",
    ];
    let pick = |c: &FinetuneConfig| -> serde_json::Value {
        let v = serde_json::to_value(c).unwrap_or_default();
        MODEL
            .iter()
            .filter(|k| in_file.iter().any(|f| f == *k))
            .map(|k| (k.to_string(), v.get(*k).cloned().unwrap_or_default()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    spt_train::trainer::config_changes(&pick(run), &pick(given))
}
