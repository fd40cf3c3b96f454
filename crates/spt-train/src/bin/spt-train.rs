//! `spt-train`: fine-tune, evaluate and use BERT / GPT-2 checkpoints with sparse training.
//!
//! The model-independent parts (config, data, tokenizer, output dir, trainer, checkpoints) are
//! wired here; building the models comes from spt-models. Until that lands, the places that need
//! a model stop with an error that says "requires spt-models integration".

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use spt_train::checkpoint::{
    check_output_dir, latest_checkpoint, load_checkpoint, prepare_output_dir, write_file_atomic,
};
use spt_train::config::{resolve_model, FinetuneArgs, FinetuneConfig, Mode};
use spt_train::data::{read_classification, ColumnSpec, DataFormat, LabelMap, TaskKind, TextTokenizer};
use spt_train::pipeline::{load_tokenizer, model_max_length, prepare_data};
use spt_train::data::EncodedDataset;
use spt_train::tasks::{calibration_batches, ModelTask};
use spt_train::trainer::{install_ctrlc_handler, Trainer};

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
    /// Training mode the checkpoint was made with.
    #[arg(long, value_enum, default_value = "dense")]
    mode: Mode,
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
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long)]
    text_pair_column: Option<String>,
    #[arg(long, default_value = "label")]
    label_column: String,
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
    #[arg(long)]
    attn_k: Option<usize>,
    /// Write results JSON here (bench/results/finetune-speed.json format).
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
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

/// The single place where a model is needed; spt-models wiring replaces this body.
fn requires_models(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what} requires spt-models integration (not wired into spt-train yet)")
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
        (Mode::Spt, Some(t)) => calibration_batches(t, 4, 16, cfg.seed, device)?,
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
                l.quantization_mse.map(|m| format!("{m:.4}")).unwrap_or_else(|| "-".into()),
                l.ffn,
                l.routing
                    .map(|q| format!(" (cosine to dense {:.3}, oracle recall {:.2})", q.cosine, q.oracle_recall))
                    .unwrap_or_default(),
                l.calibration_tokens,
                l.lora.len()
            );
        }
    }
    Ok(task)
}

fn finetune(args: &FinetuneArgs) -> Result<()> {
    let cfg = FinetuneConfig::from_args(args).context("reading the finetune settings")?;
    let dev = device(&cfg.device)?;
    let resume = cfg.resume_from();
    check_output_dir(
        &cfg.output_dir,
        cfg.overwrite,
        resume != spt_train::trainer::Resume::No,
    )?;
    let model_dir = resolve_model(&cfg.model)?;
    prepare_output_dir(
        &cfg.output_dir,
        cfg.overwrite,
        resume != spt_train::trainer::Resume::No,
    )?;
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
    let stop = install_ctrlc_handler()?;
    let mut trainer = Trainer::new(task, cfg.trainer_config(data.train.len()), dev).with_stop_flag(stop);
    let summary = trainer.train(&data.train, data.validation.as_ref(), &resume)?;
    if let Some((step, rep)) = summary.evals.last() {
        println!("{}", serde_json::json!({ "step": step, "eval": rep }));
    }
    if summary.stopped {
        eprintln!("stopped at step {}; resume with --resume", summary.steps);
    }
    Ok(())
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

fn eval(a: &EvalArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1, got 0");
    }
    let _dev = device(&a.model.device)?;
    let model_dir = resolve_model(&a.model.model)?;
    let ck = a.model.checkpoint.as_deref().map(checkpoint_path).transpose()?;
    if let Some(c) = &ck {
        load_checkpoint(c, &Device::Cpu).with_context(|| format!("checking {}", c.display()))?;
    }
    let mut cfg = match &a.config {
        Some(p) => FinetuneConfig::load(p)?,
        None => FinetuneConfig::default(),
    };
    cfg.model = a.model.model.clone();
    cfg.task = a.task;
    cfg.train_files = a.data_files.clone();
    cfg.validation_files.clear();
    cfg.validation_split = 0.0;
    cfg.format = a.format;
    cfg.text_column = a.text_column.clone();
    cfg.text_pair_column = a.text_pair_column.clone();
    cfg.label_column = a.label_column.clone();
    cfg.drop_labels = a.drop_labels.clone();
    cfg.max_length = a.max_length.or(cfg.max_length);
    cfg.block_size = a.block_size;
    if let Some(p) = labels_path(&a.label_map, &a.model.checkpoint) {
        cfg.label_map = Some(p);
    }
    let tok = load_tokenizer(&cfg, &model_dir)?;
    let data = prepare_data(&cfg, &tok, None)?;
    tracing::info!(examples = data.train.len(), "evaluation data ready");
    Err(requires_models("eval"))
}

fn predict(a: &PredictArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1, got 0");
    }
    let _dev = device(&a.model.device)?;
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
    Err(requires_models("predict"))
}

fn generate(a: &GenerateArgs) -> Result<()> {
    if !(a.temperature > 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be positive, got {}", a.temperature);
    }
    let _dev = device(&a.model.device)?;
    let model_dir = resolve_model(&a.model.model)?;
    let tok = tokenizer_for(&model_dir, None)?;
    let prompt = tok.encode_raw(&a.prompt)?;
    tracing::info!(prompt_tokens = prompt.len(), "prompt ready");
    Err(requires_models("generate"))
}

fn export(a: &ExportArgs) -> Result<()> {
    check_output_dir(&a.out, a.overwrite, false)?;
    let _model_dir = resolve_model(&a.model.model)?;
    let ck = match &a.model.checkpoint {
        Some(c) => checkpoint_path(c)?,
        None => bail!("export needs --checkpoint (a checkpoint or a run directory)"),
    };
    load_checkpoint(&ck, &Device::Cpu).with_context(|| format!("checking {}", ck.display()))?;
    prepare_output_dir(&a.out, a.overwrite, false)?;
    Err(requires_models("export"))
}

fn bench(a: &BenchArgs) -> Result<()> {
    if a.batch_size == 0 || a.seq_len == 0 || a.steps == 0 {
        bail!("--batch-size, --seq-len and --steps must be at least 1");
    }
    let _dev = device(&a.device)?;
    let _model_dir = resolve_model(&a.model)?;
    Err(requires_models("bench"))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    match run(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Finetune(a) => finetune(a),
        Command::Eval(a) => eval(a),
        Command::Predict(a) => predict(a),
        Command::Generate(a) => generate(a),
        Command::Export(a) => export(a),
        Command::Bench(a) => bench(a),
    }
}
