//! `spt-train`: fine-tune, evaluate and use BERT / GPT-2 checkpoints with sparse training.
//!
//! The subcommands are wired here from the library: config, data, tokenizer, output dir, trainer
//! and checkpoints from spt-train, the models from spt-models.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Training allocates and frees the same large tensor buffers every step: glibc unmaps them and
/// pays page faults (and TLB shootdowns) to get them back, 17 % of a GPT-2 step here (perf).
/// mimalloc with purging off keeps them for reuse: the process stays at its peak footprint.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (mimalloc.h); the test below checks
/// it against the option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn keep_freed_memory() {
    // SAFETY: sets one process-wide allocator option to a documented value (-1: never purge).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
use candle_core::Device;
use candle_core::Tensor;
use clap::{Args, Parser, Subcommand};
use spt_train::checkpoint::{
    checkpoint_step, latest_checkpoint, list_checkpoints, load_checkpoint_weights, remove_checkpoints,
    write_file_atomic,
};
use spt_train::config::{resolve_model, FinetuneArgs, FinetuneConfig, Mode};
use spt_train::data::{read_classification, ColumnSpec, DataFormat, LabelMap, TaskKind, TextTokenizer};
use spt_train::data::{EncodedDataset, EncodedItem};
use spt_train::output_dir::{check_export_dir, check_run_dir, prepare_run_dir};
use spt_train::pipeline::{load_tokenizer, model_max_length, prepare_data};
use spt_train::rng::SplitMix64;
use spt_train::tasks::{calibration_batches, export_files, export_hf_dir, ModelTask, Net};
use spt_train::trainer::evaluate;
use spt_train::trainer::{install_ctrlc_handler, Resume, Trainer};

#[derive(Parser)]
#[command(
    name = "spt-train",
    version,
    about = "Sparse fine-tuning (SPT) of BERT and GPT-2 checkpoints with candle"
)]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a checkpoint (dense, LoRA or SPT) on classification or LM data.
    Finetune(Box<FinetuneArgs>),
    /// Accuracy and macro-F1 (classify) or loss and perplexity (lm) of a model or checkpoint.
    Eval(EvalArgs),
    /// Classify texts from a file or stdin.
    Predict(PredictArgs),
    /// Sample text from a GPT-2 model.
    Generate(GenerateArgs),
    /// Merge LoRA and write a Hugging Face-compatible model directory.
    Export(ExportArgs),
    /// Time fine-tuning steps, dense vs LoRA vs SPT, on real model shapes.
    Bench(BenchArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Local model directory or Hugging Face hub id.
    #[arg(long)]
    model: String,
    /// A checkpoint directory, or a run's output directory (its latest checkpoint).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Training mode the checkpoint was made with (default: dense; for eval without a
    /// checkpoint, the mode of `--config`).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A finetune config file: data columns, mode and sparsity settings are taken from it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "classify")]
    task: TaskKind,
    /// Data file; repeat for several.
    #[arg(long = "data-file", required = true)]
    data_files: Vec<PathBuf>,
    #[arg(long, value_enum)]
    format: Option<DataFormat>,
    /// Text column (default: `--config`'s, else `text`).
    #[arg(long)]
    text_column: Option<String>,
    #[arg(long)]
    text_pair_column: Option<String>,
    /// Label column (default: `--config`'s, else `label`).
    #[arg(long)]
    label_column: Option<String>,
    /// Drop rows with this label; repeat for several (default: `--config`'s).
    #[arg(long = "drop-label")]
    drop_labels: Vec<String>,
    /// labels.json of the run (default: the checkpoint run's labels.json).
    #[arg(long)]
    label_map: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long, default_value_t = 128)]
    block_size: usize,
    /// Rows to evaluate: every row of the data files, or the validation rows that the seeded
    /// split of `--config` (`validation_split`, `split_by`, `seed`) holds out of them.
    #[arg(long, value_enum, default_value = "all")]
    split: EvalSplit,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EvalSplit {
    All,
    Validation,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// CSV / TSV / JSONL file, or `-` for one text per line on stdin.
    #[arg(long, default_value = "-")]
    input: String,
    #[arg(long, value_enum)]
    format: Option<DataFormat>,
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long)]
    text_pair_column: Option<String>,
    /// labels.json of the run (default: the checkpoint run's labels.json).
    #[arg(long)]
    label_map: Option<PathBuf>,
    /// Write JSON lines here instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long)]
    max_length: Option<usize>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// Softmax temperature (> 0).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Directory to write (config.json, model.safetensors with HF names, tokenizer files).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Model directory or hub id whose config gives the shapes.
    #[arg(long)]
    model: String,
    #[arg(long, value_enum, default_values_t = [Mode::Dense, Mode::Lora, Mode::Spt], value_delimiter = ',')]
    modes: Vec<Mode>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Timed steps per mode (median reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Keys per query in spt mode (default L/8).
    #[arg(long)]
    attn_k: Option<usize>,
    /// FFN blocks kept per token (of 8) in spt mode (default: the fast preset's, 2).
    #[arg(long)]
    ffn_top_k: Option<usize>,
    /// The linear correction for skipped FFN blocks in spt mode (default: the fast preset's, on).
    #[arg(long)]
    ffn_correction: Option<bool>,
    /// Write results JSON here (bench/results/finetune-speed.json format).
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Replace this model's records in an existing --output file instead of starting a new one.
    #[arg(long)]
    append: bool,
    /// Internal: time one mode in this process and print one JSON line.
    #[arg(long, hide = true)]
    child: Option<Mode>,
}

fn init_tracing(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).context("opening CUDA device 0 (built with --features cuda?)"),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::new_cuda(n).with_context(|| format!("opening CUDA device {n}")),
            None => bail!("unknown device `{spec}`: expected cpu, cuda or cuda:N"),
        },
    }
}

/// Builds the trainable task for `cfg` (BertForSequenceClassification or GPT2LMHeadModel in
/// dense / LoRA / SPT mode); spt mode calibrates on batches drawn from `train`.
fn build_task(
    cfg: &FinetuneConfig,
    model_dir: &Path,
    num_labels: Option<usize>,
    train: Option<&EncodedDataset>,
    device: &Device,
) -> Result<ModelTask> {
    let calibration = match (cfg.mode, train) {
        (Mode::Spt, Some(t)) => calibration_batches(t, cfg.calibration_batches, 16, cfg.seed, device)?,
        _ => Vec::new(),
    };
    let task = ModelTask::build(cfg, model_dir, num_labels, device, calibration)
        .with_context(|| format!("building the {:?} model from {}", cfg.mode, model_dir.display()))?;
    eprintln!("{}", task.summary);
    if let Some(r) = &task.sparsify_report {
        for l in &r.layers {
            eprintln!(
                "layer {}: attention {} (PQ mse {}), ffn {}{}, {} calibration tokens, LoRA on {}",
                l.layer,
                l.attention,
                l.quantization_mse
                    .map(|m| format!("{m:.4}"))
                    .unwrap_or_else(|| "-".into()),
                l.ffn,
                l.routing
                    .map(|q| format!(
                        " ({} units, cosine to dense {:.3}{}, per token {:.3}, oracle recall {:.2}, oracle cosine {:.3}, per token {:.3})",
                        q.units,
                        q.cosine,
                        match (q.contiguous_cosine, q.clustered_cosine) {
                            (Some(c), Some(g)) => format!(" (contiguous {c:.3}, clustered {g:.3})"),
                            _ => String::new(),
                        },
                        q.token_cosine,
                        q.oracle_recall,
                        q.oracle_cosine,
                        q.oracle_token_cosine
                    ))
                    .unwrap_or_default(),
                l.calibration_tokens,
                l.lora.len()
            );
        }
    }
    Ok(task)
}

fn finetune(args: &FinetuneArgs) -> Result<Outcome> {
    let cfg = FinetuneConfig::from_args(args).context("reading the finetune settings")?;
    let dev = device(&cfg.device)?;
    let resume = resume_point(&cfg)?;
    let resuming = resume != Resume::No;
    check_run_dir(&cfg.output_dir, cfg.overwrite, resuming)?;
    let model_dir = resolve_model(&cfg.model)?;
    check_model(cfg.task, &model_dir)?;
    prepare_run_dir(&cfg.output_dir, cfg.overwrite, resuming)?;
    if let Resume::From(p) = &resume {
        discard_later_checkpoints(&cfg, p)?;
    }
    let resolved = toml::to_string_pretty(&cfg).context("serialising the resolved config")?;
    write_file_atomic(&cfg.output_dir.join("finetune.toml"), resolved.as_bytes())
        .with_context(|| format!("writing {}", cfg.output_dir.join("finetune.toml").display()))?;
    let tok = load_tokenizer(&cfg, &model_dir)?;
    let data = prepare_data(&cfg, &tok, Some(&cfg.output_dir))?;
    tracing::info!(
        train = data.train.len(),
        validation = data.validation.as_ref().map(|v| v.len()).unwrap_or(0),
        labels = data.labels.as_ref().map(|l| l.len()).unwrap_or(0),
        "data ready"
    );
    let task = build_task(
        &cfg,
        &model_dir,
        data.labels.as_ref().map(LabelMap::len),
        Some(&data.train),
        &dev,
    )?;
    let (trainable, total) = (task.summary.trainable, task.summary.total);
    let stop = install_ctrlc_handler()?;
    let mut trainer = Trainer::new(task, cfg.trainer_config(data.train.len()), dev).with_stop_flag(stop);
    let summary = trainer.train(&data.train, data.validation.as_ref(), &resume)?;
    let eval = summary.evals.last();
    println!(
        "{}",
        serde_json::json!({
            "step": summary.steps,
            "eval": eval.map(|(_, r)| r),
            "eval_step": eval.map(|(s, _)| s),
            "median_step_s": summary.median_step_s(),
            "step_times_s": summary.step_times_s,
            "mode": cfg.mode,
            "trainable_params": trainable,
            "total_params": total,
            "stopped": summary.stopped,
        })
    );
    if summary.stopped {
        eprintln!("stopped at step {}; resume with --resume", summary.steps);
        return Ok(Outcome::Interrupted);
    }
    Ok(Outcome::Done)
}

/// How a command ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    /// Stopped by Ctrl-C after saving: exit 130, as shells report SIGINT, so scripts can tell.
    Interrupted,
}

/// `--resume` resolved: `latest`, a checkpoint, or a run directory (its latest checkpoint).
fn resume_point(cfg: &FinetuneConfig) -> Result<Resume> {
    Ok(match cfg.resume_from() {
        Resume::From(p) => {
            if !p.exists() {
                bail!("--resume {}: no such checkpoint or run directory", p.display());
            }
            Resume::From(checkpoint_path(&p)?)
        }
        r => r,
    })
}

/// Resuming from `from` while the output directory holds later checkpoints would mix two runs:
/// with `--overwrite` they are discarded (named), otherwise refused with both ways out.
fn discard_later_checkpoints(cfg: &FinetuneConfig, from: &Path) -> Result<()> {
    let step = checkpoint_step(from)?;
    let ckpts = cfg.output_dir.join("checkpoints");
    let later: Vec<String> = list_checkpoints(&ckpts)?
        .into_iter()
        .filter(|(s, _)| *s > step)
        .map(|(_, p)| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
        .collect();
    if later.is_empty() {
        if !from.starts_with(&cfg.output_dir) {
            eprintln!(
                "note: resuming from {} into {}: a new run folder (a fork); the original run is unchanged",
                from.display(),
                cfg.output_dir.display()
            );
        }
        return Ok(());
    }
    if !cfg.overwrite {
        bail!(
            "--resume {}: {} already holds later checkpoints ({}); continuing would mix two runs. \
             Pass --output-dir NEW to fork the run into a new folder, or --overwrite to discard the later checkpoints",
            from.display(),
            cfg.output_dir.display(),
            later.join(", ")
        );
    }
    remove_checkpoints(&ckpts, |s| s > step)?;
    eprintln!(
        "note: --overwrite: discarded the later checkpoints {} of {}; the run continues from step {step}",
        later.join(", "),
        cfg.output_dir.display()
    );
    Ok(())
}

/// The model's config.json against the task, before any data is read or weights allocated: the
/// architecture (`model_type`), so that `--task lm` on BERT is named as such rather than as a
/// missing tensor, then the config itself, sizes included.
fn check_model(task: TaskKind, model_dir: &Path) -> Result<()> {
    match (task, model_type(model_dir)?.as_deref()) {
        (TaskKind::Lm, Some("bert")) => bail!(
            "--task lm: {} is a BERT model (model_type \"bert\" in config.json), which has no language-model head; use --task classify, or a GPT-2 model",
            model_dir.display()
        ),
        (TaskKind::Classify, Some("gpt2")) => bail!(
            "--task classify: {} is a GPT-2 model (model_type \"gpt2\" in config.json); spt-train classifies with BERT models: use --task lm, or a BERT model",
            model_dir.display()
        ),
        (_, None | Some("bert" | "gpt2")) => {}
        (_, Some(other)) => bail!(
            "{}: model_type \"{other}\" in config.json; spt-train fine-tunes BERT (model_type \"bert\") and GPT-2 (\"gpt2\") checkpoints",
            model_dir.display()
        ),
    }
    let p = model_dir.join("config.json");
    match task {
        TaskKind::Classify => spt_models::BertConfig::from_file(&p).map(drop),
        TaskKind::Lm => spt_models::GPT2Config::from_file(&p).map(drop),
    }
    .with_context(|| format!("checking {}", p.display()))
}

/// The checkpoint a `--checkpoint` names: itself, or the latest one of a run directory.
fn checkpoint_path(p: &Path) -> Result<PathBuf> {
    if p.join("manifest.json").is_file() {
        return Ok(p.to_path_buf());
    }
    Ok(latest_checkpoint(&p.join("checkpoints"))?)
}

/// labels.json: given, or next to the run that holds the checkpoint.
fn labels_path(given: &Option<PathBuf>, checkpoint: &Option<PathBuf>) -> Option<PathBuf> {
    if given.is_some() {
        return given.clone();
    }
    let c = checkpoint.as_ref()?;
    c.ancestors()
        .take(3)
        .map(|d| d.join("labels.json"))
        .find(|p| p.is_file())
}

fn find_labels(given: &Option<PathBuf>, checkpoint: &Option<PathBuf>) -> Result<Option<LabelMap>> {
    Ok(labels_path(given, checkpoint)
        .map(|p| LabelMap::load(&p))
        .transpose()?)
}

fn tokenizer_for(model_dir: &Path, max_length: Option<usize>) -> Result<TextTokenizer> {
    let max = max_length.or_else(|| model_max_length(model_dir)).unwrap_or(512);
    Ok(TextTokenizer::from_model_dir(model_dir, max)?)
}

/// The finetune settings of the run a checkpoint belongs to (its `finetune.toml`), else defaults.
fn run_config(checkpoint: Option<&Path>) -> Result<Option<FinetuneConfig>> {
    let Some(c) = checkpoint else { return Ok(None) };
    match c
        .ancestors()
        .take(4)
        .map(|d| d.join("finetune.toml"))
        .find(|p| p.is_file())
    {
        Some(p) => Ok(Some(
            FinetuneConfig::load(&p).with_context(|| format!("reading {}", p.display()))?,
        )),
        None => Ok(None),
    }
}

/// The model of `--model`, prepared in the run's mode and holding the checkpoint's trained values.
///
/// Without a checkpoint the model is built from `settings` (or the defaults) in `--mode` (or the
/// settings' mode). In spt mode that fits its PQ codebooks and routers on batches drawn from
/// `calibrate`, as fine-tuning does, and refuses when there is nothing to fit them on: random
/// routing would give meaningless results.
fn load_trained(
    m: &ModelArgs,
    task: TaskKind,
    num_labels: Option<usize>,
    dev: &Device,
    settings: Option<&FinetuneConfig>,
    calibrate: Option<&EncodedDataset>,
) -> Result<(ModelTask, PathBuf)> {
    let model_dir = resolve_model(&m.model)?;
    let ck = m.checkpoint.as_deref().map(checkpoint_path).transpose()?;
    let run = run_config(ck.as_deref())?;
    let from_run = run.is_some();
    let trained_on = run.as_ref().map(|r| (r.model.clone(), r.mode));
    let mut cfg = run.unwrap_or_else(|| {
        let mut c = settings.cloned().unwrap_or_default();
        c.mode = m
            .mode
            .unwrap_or(if settings.is_some() { c.mode } else { Mode::Dense });
        c
    });
    cfg.task = task;
    let mut t = match (ck.is_none() && cfg.mode == Mode::Spt, calibrate) {
        (true, Some(data)) => build_task(&cfg, &model_dir, num_labels, Some(data), dev)?,
        (true, None) => bail!(
            "--mode spt without --checkpoint: the sparse model fits its PQ codebooks and routers on \
             data, and this command has none to fit them on; pass --checkpoint (an spt run) or use \
             `spt-train eval`, which fits them on its data"
        ),
        (false, _) => ModelTask::build(&cfg, &model_dir, num_labels, dev, Vec::new())
            .with_context(|| format!("building the {:?} model from {}", cfg.mode, model_dir.display()))?,
    };
    if !from_run && ck.is_some() && m.mode.is_none() && settings.is_none() {
        tracing::warn!("no finetune.toml found beside the checkpoint; assuming a dense run (pass --mode)");
    }
    if let Some(c) = &ck {
        let loaded = load_checkpoint_weights(c, dev).with_context(|| format!("loading {}", c.display()))?;
        let origin = || match &trained_on {
            Some((model, mode)) => format!(
                "restoring {} (trained from {model} in {mode:?} mode, per its finetune.toml; this is {})",
                c.display(),
                model_dir.display()
            ),
            None => format!("restoring {}", c.display()),
        };
        t.load_trained(&loaded.model, &loaded.extra)
            .with_context(origin)?;
        if let Some((model, _)) = &trained_on {
            let same = resolve_model(model)
                .ok()
                .and_then(|d| d.canonicalize().ok())
                .zip(model_dir.canonicalize().ok())
                .is_some_and(|(a, b)| a == b);
            if !same {
                tracing::warn!(
                    "{} was trained from {model}, and is applied to {}: make sure it is the same model",
                    c.display(),
                    model_dir.display()
                );
            }
        }
        tracing::info!(checkpoint = %c.display(), mode = ?cfg.mode, "model restored");
    }
    Ok((t, model_dir))
}

/// `model_type` from the model's config.json, if it names one.
fn model_type(dir: &Path) -> Result<Option<String>> {
    let p = dir.join("config.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    Ok(v.get("model_type").and_then(|t| t.as_str()).map(str::to_string))
}

/// classify or lm, from the model's config.json (`model_type`).
fn task_of(model: &str) -> Result<TaskKind> {
    let dir = resolve_model(model)?;
    Ok(match model_type(&dir)?.as_deref() {
        Some("gpt2") => TaskKind::Lm,
        _ => TaskKind::Classify,
    })
}

fn eval(a: &EvalArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1, got 0");
    }
    let dev = device(&a.model.device)?;
    let model_dir = resolve_model(&a.model.model)?;
    check_model(a.task, &model_dir)?;
    let mut cfg = match &a.config {
        Some(p) => FinetuneConfig::load(p)?,
        None => FinetuneConfig::default(),
    };
    cfg.model = a.model.model.clone();
    cfg.task = a.task;
    cfg.train_files = a.data_files.clone();
    cfg.validation_files.clear();
    if a.split == EvalSplit::All {
        cfg.validation_split = 0.0;
    } else if a.config.is_none() || cfg.validation_split <= 0.0 {
        bail!("--split validation needs --config with a validation_split > 0 (the run's finetune.toml)");
    }
    // Data settings: a flag overrides `--config` (or, without one, the defaults).
    cfg.format = a.format.or(cfg.format);
    if let Some(c) = &a.text_column {
        cfg.text_column = c.clone();
    }
    cfg.text_pair_column = a.text_pair_column.clone().or(cfg.text_pair_column);
    if let Some(c) = &a.label_column {
        cfg.label_column = c.clone();
    }
    if !a.drop_labels.is_empty() {
        cfg.drop_labels = a.drop_labels.clone();
    }
    cfg.max_length = a.max_length.or(cfg.max_length);
    cfg.block_size = a.block_size;
    if let Some(p) = labels_path(&a.label_map, &a.model.checkpoint) {
        cfg.label_map = Some(p);
    }
    let tok = load_tokenizer(&cfg, &model_dir)?;
    let data = prepare_data(&cfg, &tok, None)?;
    let settings = a.config.as_ref().map(|_| &cfg);
    let (mut task, _) = load_trained(
        &a.model,
        a.task,
        data.labels.as_ref().map(LabelMap::len),
        &dev,
        settings,
        Some(&data.train),
    )?;
    let rows = match a.split {
        EvalSplit::All => &data.train,
        EvalSplit::Validation => data
            .validation
            .as_ref()
            .context("the --config split held out no validation rows")?,
    };
    tracing::info!(examples = rows.len(), "evaluation data ready");
    let rep = evaluate(&mut task, rows, a.batch_size, &dev)?;
    println!("{}", serde_json::to_string(&rep)?);
    Ok(())
}

fn predict(a: &PredictArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1, got 0");
    }
    let dev = device(&a.model.device)?;
    let model_dir = resolve_model(&a.model.model)?;
    let tok = tokenizer_for(&model_dir, a.max_length)?;
    let labels = find_labels(&a.label_map, &a.model.checkpoint)?;
    let texts: Vec<(String, Option<String>)> = if a.input == "-" {
        let mut out = Vec::new();
        for (i, line) in std::io::stdin().lock().lines().enumerate() {
            let line = line.with_context(|| format!("stdin: line {}", i + 1))?;
            if !line.trim().is_empty() {
                out.push((line, None));
            }
        }
        out
    } else {
        let cols = ColumnSpec {
            text: a.text_column.clone(),
            text_pair: a.text_pair_column.clone(),
            label: None,
            group: None,
        };
        read_classification(Path::new(&a.input), a.format, &cols, &[])?
            .examples
            .into_iter()
            .map(|e| (e.text, e.text_pair))
            .collect()
    };
    let encoded: Vec<_> = texts
        .iter()
        .enumerate()
        .map(|(i, (t, p))| tok.encode(t, p.as_deref(), &format!("{}:{}", a.input, i + 1)))
        .collect::<std::result::Result<_, _>>()?;
    tracing::info!(
        texts = encoded.len(),
        labels = labels.as_ref().map(|l| l.len()),
        "inputs ready"
    );
    let (task, _) = load_trained(
        &a.model,
        TaskKind::Classify,
        labels.as_ref().map(LabelMap::len),
        &dev,
        None,
        None,
    )?;
    let data = EncodedDataset {
        task: TaskKind::Classify,
        items: encoded
            .into_iter()
            .map(|e| EncodedItem {
                input_ids: e.ids,
                token_type_ids: e.type_ids,
                label: Some(0),
            })
            .collect(),
        pad_id: tok.pad_id(),
    };
    let mut lines = String::new();
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(a.batch_size) {
        let batch = data.batch(chunk, &dev)?;
        let logits = task.net.forward(&batch, false)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
        for (&i, p) in chunk.iter().zip(probs) {
            let (best, score) =
                p.iter().enumerate().fold(
                    (0usize, f32::MIN),
                    |acc, (j, &v)| if v > acc.1 { (j, v) } else { acc },
                );
            let label = labels
                .as_ref()
                .and_then(|l| l.label(best as u32))
                .map(str::to_string)
                .unwrap_or_else(|| best.to_string());
            let rec = serde_json::json!({"text": texts[i].0, "label": label, "id": best, "score": score});
            lines.push_str(&rec.to_string());
            lines.push('\n');
        }
    }
    match &a.output {
        Some(p) => {
            write_file_atomic(p, lines.as_bytes()).with_context(|| format!("writing {}", p.display()))?
        }
        None => print!("{lines}"),
    }
    Ok(())
}

fn generate(a: &GenerateArgs) -> Result<()> {
    if !(a.temperature > 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be positive, got {}", a.temperature);
    }
    let dev = device(&a.model.device)?;
    let model_dir = resolve_model(&a.model.model)?;
    if let Some(t) = model_type(&model_dir)?.filter(|t| t != "gpt2") {
        bail!(
            "generate needs a GPT-2 model; {} is model_type \"{t}\"",
            model_dir.display()
        );
    }
    let tok = tokenizer_for(&model_dir, None)?;
    let eos = tok.eos_id();
    let mut ids = tok.encode_raw(&a.prompt)?;
    if ids.is_empty() {
        ids.push(eos.unwrap_or(0));
    }
    let n_prompt = ids.len();
    let ctx_len = model_max_length(&model_dir).unwrap_or(1024);
    if n_prompt >= ctx_len {
        bail!("--prompt is {n_prompt} tokens; the model's context is {ctx_len}: shorten the prompt");
    }
    // No sliding window: past its context a GPT-2 would only see the last tokens, so the length
    // is capped there and said so.
    let max_new = a.max_new_tokens.min(ctx_len - n_prompt);
    if max_new < a.max_new_tokens {
        eprintln!(
            "note: --max-new-tokens {} capped at {max_new}: the prompt ({n_prompt} tokens) and the \
             generated text fit the model's context of {ctx_len} tokens",
            a.max_new_tokens
        );
    }
    tracing::info!(prompt_tokens = n_prompt, max_new, "prompt ready");
    let (task, _) = load_trained(&a.model, TaskKind::Lm, None, &dev, None, None)?;
    let Net::Lm(model) = &task.net else {
        bail!("generate needs a GPT-2 model (model_type gpt2)")
    };
    let mut rng = SplitMix64::new(a.seed);
    let decode = |ids: &[u32]| {
        tok.inner()
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding the generated tokens: {e}"))
    };
    // Stream: print the text as it grows (decoding the whole sequence each time, so multi-byte
    // characters split across tokens come out whole).
    let mut out = std::io::stdout().lock();
    let mut shown = decode(&ids)?;
    write!(out, "{shown}")?;
    out.flush()?;
    for _ in 0..max_new {
        let input = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
        let logits = model.forward_t(&input, None, false)?;
        let last: Vec<f32> = logits.get(0)?.get(ids.len() - 1)?.to_vec1()?;
        let next = sample_token(&last, a.temperature, a.top_k, &mut rng);
        if Some(next) == eos {
            break;
        }
        ids.push(next);
        let text = decode(&ids)?;
        if text.ends_with('\u{fffd}') {
            continue; // an incomplete character: its next byte comes with the next token
        }
        // Decoding is prefix-stable for byte-level BPE; if a tokenizer's is not, print from where
        // the texts part.
        let from = match text.strip_prefix(shown.as_str()) {
            Some(_) => shown.len(),
            None => common_prefix(&shown, &text),
        };
        write!(out, "{}", &text[from..])?;
        out.flush()?;
        shown = text;
    }
    writeln!(out)?;
    Ok(())
}

/// Byte length of the longest common prefix of `a` and `b` on a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or(a.len().min(b.len()))
}

fn export(a: &ExportArgs) -> Result<()> {
    if a.model.checkpoint.is_none() {
        bail!("export needs --checkpoint (a checkpoint or a run directory)");
    }
    // Refuse before the (slow) load: the checks are repeated when the files are moved in.
    let model_dir = resolve_model(&a.model.model)?;
    check_export_dir(&a.out, &export_files(&model_dir), a.overwrite)?;
    let task_kind = task_of(&a.model.model)?;
    let labels = find_labels(&None, &a.model.checkpoint)?;
    let (mut task, model_dir) = load_trained(
        &a.model,
        task_kind,
        labels.as_ref().map(LabelMap::len),
        &Device::Cpu,
        None,
        None,
    )?;
    if task.sparse_layers() > 0 {
        eprintln!(
            "note: the export is a dense Hugging Face model (LoRA merged); sparse attention and FFN \
             routing are training-time approximations and are not part of it"
        );
    }
    export_hf_dir(&mut task, &model_dir, labels.as_ref(), &a.out, a.overwrite)?;
    eprintln!("exported to {}", a.out.display());
    Ok(())
}

fn bench(a: &BenchArgs) -> Result<()> {
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
    let dev = device(&a.device)?;
    let model_dir = resolve_model(&a.model)?;
    if let Some(mode) = a.child {
        return bench_child(a, mode, &model_dir, &dev);
    }
    let model_name = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| a.model.clone());
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
            bail!(
                "the {mode:?} child failed: {}",
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
            a.attn_k.unwrap_or((a.seq_len / 8).max(1)),
            a.ffn_top_k.unwrap_or(d.ffn_top_k),
            d.ffn_blocks,
            match a.ffn_correction.unwrap_or(d.ffn_correction) {
                true => ", linear correction",
                false => "",
            }
        )
    });
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
                "trainable_params": v["trainable_params"],
                "total_params": v["total_params"],
                "attn_k": v["attn_k"],
                "ffn_top_k": v["ffn_top_k"],
                "ffn_correction": v["ffn_correction"],
                "weights": v["weights"],
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            })
        })
        .collect();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let machine = serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "device": a.device,
    });
    let mut doc = serde_json::json!({"command": command, "machine": machine, "records": records});
    if let Some(out) = &a.output {
        if a.append && out.is_file() {
            let text = std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
            let old: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", out.display()))?;
            // Replaces the records of this model (at this run's setting, if it names one).
            let same = |r: &serde_json::Value| {
                r["case"]["model"] == serde_json::json!(model_name)
                    && r["case"].get("setting").and_then(|s| s.as_str()) == setting.as_deref()
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
            doc = serde_json::json!({"command": commands, "machine": machine, "records": merged});
        }
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        write_file_atomic(out, serde_json::to_string_pretty(&doc)?.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("bench: wrote {}", out.display());
    } else {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(())
}

/// One mode, timed in this (fresh) process: prints `{median_s, step_times_s, peak_rss_bytes, …}`.
fn bench_child(a: &BenchArgs, mode: Mode, model_dir: &Path, dev: &Device) -> Result<()> {
    let task_kind = task_of(&a.model)?;
    let attn_k = a.attn_k.unwrap_or((a.seq_len / 8).max(1));
    // spt mode starts from the fast preset, as `finetune --mode spt` does (timed without the
    // pooler, which the preset also trains: one 384 × 384 layer).
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
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?,
    )?;
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
    let ((task, times), device_bytes) = spt_train::bench::with_peak_device_memory(dev, || {
        let src = if has_weights {
            spt_models::WeightSource::from_dir(model_dir)?
        } else if task_kind == TaskKind::Lm {
            spt_train::bench::random_gpt2_weights(&cfg_path, 7, dev)?
        } else {
            spt_train::bench::random_bert_weights(&cfg_path, 7, dev)?
        };
        let mut task = ModelTask::build_from_source(&cfg, &cfg_path, &src, num_labels, dev, calibration)?;
        drop(src);
        let times = spt_train::bench::time_steps(&mut task, &data, a.warmup, a.steps, dev)?;
        Ok((task, times))
    })?;
    let rss = spt_train::bench::peak_rss_bytes()?;
    println!(
        "{}",
        serde_json::json!({
            "median_s": spt_train::bench::median(&times),
            "step_times_s": times,
            "peak_rss_bytes": rss,
            "peak_device_bytes": device_bytes,
            "trainable_params": task.summary.trainable,
            "total_params": task.summary.total,
            "attn_k": (mode == Mode::Spt).then_some(attn_k),
            "ffn_top_k": (mode == Mode::Spt).then_some(ffn_top_k),
            "ffn_correction": (mode == Mode::Spt).then_some(ffn_correction),
            "weights": if has_weights { "checkpoint" } else { "random init" },
        })
    );
    Ok(())
}

/// Samples a token id from `logits` with temperature and top-k (0: all).
fn sample_token(logits: &[f32], temperature: f64, top_k: usize, rng: &mut SplitMix64) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let max = logits[order[0]] as f64;
    let w: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (k, &wi) in w.iter().enumerate() {
        if u < wi {
            return order[k] as u32;
        }
        u -= wi;
    }
    order[order.len() - 1] as u32
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    match run(&cli) {
        Ok(Outcome::Done) => std::process::ExitCode::SUCCESS,
        Ok(Outcome::Interrupted) => std::process::ExitCode::from(130),
        Err(e) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<Outcome> {
    match &cli.command {
        Command::Finetune(a) => return finetune(a),
        Command::Eval(a) => eval(a),
        Command::Predict(a) => predict(a),
        Command::Generate(a) => generate(a),
        Command::Export(a) => export(a),
        Command::Bench(a) => bench(a),
    }?;
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_delay_option_index_matches_mimalloc() {
        // The bundled mimalloc's options.c defaults `purge_delay` to 1000 ms (mimalloc.h still
        // says 10); no neighbouring option has that default, so a wrong index fails here.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reads a process-wide option.
            assert_eq!(
                unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
                1000
            );
        }
        keep_freed_memory();
        // SAFETY: as above.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            -1
        );
    }
}
