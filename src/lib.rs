//! Sparse fine-tuning (SPT) of BERT and GPT-2 for [candle](https://github.com/huggingface/candle):
//! PQ-selected sparse attention, a routed FFN and LoRA, each with a CPU kernel, a CUDA kernel and
//! an exact backward.
//!
//! This crate re-exports the three that do the work:
//!
//! - [`ops`] (`spt-ops`): candle `CustomOp`s — fused and sparse attention, PQ codebooks and key
//!   selection, the routed FFN, LoRA, and differentiable `layer_norm` / `softmax_last_dim`
//!   (candle-nn's fused ones have no backward and silently stop gradients).
//! - [`models`] (`spt-models`): trainable BERT and GPT-2 loaded from Hugging Face checkpoints,
//!   with per-layer dense ↔ sparse attention and FFN, and `sparsify()`.
//! - [`train`] (`spt-train`): AdamW, schedules, data readers, checkpoints, the `Trainer` loop and
//!   the `spt-train` command line.
//!
//! # Depending on it
//!
//! The crates are not on crates.io; depend on a clone of this repository (or on its git URL with
//! `git = "…"` instead of `path`):
//!
//! ```toml
//! [dependencies]
//! spt = { path = "../spt" }                     # everything, as spt::ops, spt::models, spt::train
//! spt-ops = { path = "../spt/crates/spt-ops" }  # or only the ops
//! candle-core = "0.11.1"
//! # spt's feature "cuda" builds the CUDA kernels (nvcc needed; docs/cuda.md)
//! ```
//!
//! # Fine-tuning from code
//!
//! The core of `spt-train finetune`, through the library: a config (the same settings as the
//! command line's flags and `finetune.toml`), the data, the model in its mode, the loop.
//!
//! ```no_run
//! use candle_core::Device;
//! use spt::train::config::{resolve_model, FinetuneConfig, Mode};
//! use spt::train::data::TaskKind;
//! use spt::train::output_dir::prepare_run_dir;
//! use spt::train::pipeline::{load_tokenizer, prepare_data};
//! use spt::train::presets::{base_config, Preset};
//! use spt::train::tasks::{calibration_batches, ModelTask};
//! use spt::train::trainer::{Resume, Trainer};
//!
//! # fn main() -> anyhow::Result<()> {
//! // `--mode spt --preset fast`, then the run's own settings.
//! let cfg = FinetuneConfig {
//!     model: "third_party/all-MiniLM-L6-v2".into(), // or a Hugging Face hub id
//!     train_files: vec!["data/rt/rotten_tomatoes_corpus_full.csv".into()],
//!     label_column: "category".into(),
//!     drop_labels: vec!["plot".into()],
//!     max_length: Some(64),
//!     output_dir: "runs/spt".into(),
//!     ..base_config(Mode::Spt, TaskKind::Classify, Some(Preset::Fast))
//! };
//! cfg.validate()?;
//! let dev = Device::Cpu;
//! let model_dir = resolve_model(&cfg.model)?;
//! let tok = load_tokenizer(&cfg, &model_dir)?;
//! let data = prepare_data(&cfg, &tok, None)?;
//! // SPT fits its PQ codebooks, routers and FFN unit groups on a few training batches.
//! let calibration = calibration_batches(&data.train, cfg.calibration_batches, 16, cfg.seed, &dev)?;
//! let labels = data.labels.as_ref().map(|l| l.len());
//! let task = ModelTask::build(&cfg, &model_dir, labels, &dev, calibration)?;
//! // The trainer writes checkpoints, metrics.jsonl and loss.svg there; the folder stays locked
//! // against another process while `_lock` lives.
//! let _lock = prepare_run_dir(&cfg.output_dir, false, false)?;
//! let mut trainer = Trainer::new(task, cfg.trainer_config(data.train.len()), dev)
//!     .with_held_out(data.held_out.clone());
//! let summary = trainer.train(&data.train, data.validation.as_ref(), &Resume::No)?;
//! println!("{:?}", summary.evals.last());
//! # Ok(())
//! # }
//! ```
//!
//! What the command line adds: it writes the run's `finetune.toml` and `labels.json` beside the
//! checkpoints (so that `eval`, `predict` and `export --checkpoint` read data as the run did), checks the labels and lengths against the model first
//! (`pipeline::check_training_labels`, `check_data_fits_model`), and sets the process up for
//! speed: `train::threads::fix_thread_count()` first in `main`, and mimalloc as the global
//! allocator with `train::alloc::keep_freed_memory()` (glibc's unmap / page-fault cycle cost
//! 17 % of a GPT-2 step).
//!
//! A model of your own trains the same way by implementing [`train::trainer::TrainTask`]
//! (`crates/spt-train/examples/toy_trainer.rs` does, for a bag-of-embeddings classifier). To put
//! the sparse layers into your own candle model instead, see `examples/sparse_block.rs` and the
//! README's `pq_sparse_attention` example; the `spt-train` command line is in `docs/cli.md`. In a
//! loop of your own on the CPU, run each step (or inference call) inside
//! [`ops::on_pool`]`(&device, || ...)`, as the trainer does: each op's threads then start
//! without waking (10–30 % faster on 2 cores).

pub use spt_models as models;
pub use spt_ops as ops;
pub use spt_train as train;
