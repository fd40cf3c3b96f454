//! `spt-train`: fine-tune, evaluate and use BERT / GPT-2 checkpoints with sparse training.
//!
//! The subcommands are wired here from the library: config, data, tokenizer, output dir, trainer
//! and checkpoints from spt-train, the models from spt-models.

mod bench;
mod common;
mod eval;
mod export;
mod finetune;
mod generate;
mod predict;

use anyhow::Result;

/// Freed buffers are kept for reuse (see `spt_train::alloc`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use spt_train::config::FinetuneArgs;

use bench::BenchArgs;
use eval::EvalArgs;
use export::ExportArgs;
use generate::GenerateArgs;
use predict::PredictArgs;

/// What `finetune --help` adds after the flags: the presets, and where the other settings are.
const FINETUNE_HELP: &str = "\
Presets (--preset NAME implies --mode spt, whose default is fast; MiniLM, docs/results). Both
keep every attention key (the fused dense kernel: faster on the CPU than PQ selection).
  fast      FFN 2 of 8 + linear correction, LoRA r 8, pooler trained, lr 1e-3: accuracy 0.797
            (dense 0.827); step 6.2x PyTorch full fine-tuning's speed
  accurate  FFN 6 of 8, otherwise as fast: accuracy 0.814, 1.4 points below dense; 4.7x
Default lr without --lr: dense 1e-4, lora and spt 1e-3; lora and spt also train a classifier's
pooler (--modules-to-save \"\" for none). Every other setting (PQ, FFN units, calibration,
routers, LoRA dropout, Adam, warmup, logging): --set section.key=value or --config FILE (the
hidden flags of earlier versions still work). Reference: docs/cli.md.";

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
    #[command(after_help = FINETUNE_HELP)]
    Finetune(Box<FinetuneArgs>),
    /// Accuracy and macro-F1 (classify) or loss and perplexity (lm) of a model or checkpoint.
    Eval(EvalArgs),
    /// Classify texts from a file or stdin.
    Predict(PredictArgs),
    /// Sample text from a GPT-2 model.
    Generate(GenerateArgs),
    /// Merge LoRA and write a Hugging Face-compatible model directory, or a PEFT adapter.
    Export(ExportArgs),
    /// Time fine-tuning steps, dense vs LoRA vs SPT, on real model shapes.
    Bench(BenchArgs),
}

/// `-q`: the progress lines printed with [`say!`] are left out as well as the info logs.
pub(crate) static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// An informational line on stderr (a summary, where a file went), left out under `-q`. Warnings
/// and notes about removed files are printed whatever the flags.
macro_rules! say {
    ($($t:tt)*) => {
        if !$crate::QUIET.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!($($t)*);
        }
    };
}
pub(crate) use say;

/// Writes a command's result to stdout. A reader that went away (`| head`) ends the output, not
/// the process with a panic (`println!` panics on a closed pipe).
pub(crate) fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn init_tracing(verbose: u8, quiet: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
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
        // Colour codes only for a terminal: a log redirected to a file stays plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// How a command ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    /// Stopped by Ctrl-C after saving: exit 130, as shells report SIGINT, so scripts can tell.
    Interrupted,
}

fn main() -> std::process::ExitCode {
    // With RUST_BACKTRACE set, candle attaches a backtrace to each of its errors and prints it in
    // their message, so a one-line error became 25 frames. Library backtraces follow
    // RUST_LIB_BACKTRACE where it is set, panics' RUST_BACKTRACE alone: set it to keep errors
    // to their message (RUST_LIB_BACKTRACE=1 brings the frames back). Before any thread starts.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    spt_train::threads::fix_thread_count();
    spt_train::alloc::keep_freed_memory();
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
        Command::Finetune(a) => return finetune::finetune(a),
        Command::Eval(a) => eval::eval(a),
        Command::Predict(a) => predict::predict(a),
        Command::Generate(a) => generate::generate(a),
        Command::Export(a) => export::export(a),
        Command::Bench(a) => bench::bench(a),
    }?;
    Ok(Outcome::Done)
}
