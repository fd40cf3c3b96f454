//! spt-train: the model-independent half of fine-tuning.
//!
//! - [`optim`]: AdamW with decay / no-decay groups, f32 moments, state save/load, global-norm
//!   gradient clipping and learning-rate schedules.
//! - [`data`]: CSV / TSV / JSONL classification readers, label maps, seeded (grouped) splits, LM
//!   text packing, tokenizers, length-bucketed batches as candle tensors.
//! - [`checkpoint`]: atomic, versioned, checksummed directory checkpoints.
//! - [`output_dir`]: which files of an output directory spt-train wrote, and the rules that keep
//!   everyone else's files safe.
//! - [`metrics`]: accuracy, macro-F1, perplexity, `metrics.jsonl`, `loss.svg`.
//! - [`trainer`]: the [`trainer::TrainTask`] trait a model implements and the [`trainer::Trainer`]
//!   loop (accumulation, schedule, clipping, eval, checkpoints, bit-exact resume, Ctrl-C).
//! - [`config`]: [`config::FinetuneConfig`] (TOML / JSON, equal to the CLI flags) and model
//!   resolution (local directory or Hugging Face hub id).
//! - [`pipeline`]: from a config to tokenised train / validation sets.
//! - [`presets`]: the measured recipes `finetune` starts from (`--preset fast|accurate`).
//! - [`losses`]: masked causal-LM loss and classification loss / eval outputs over a batch.
//! - [`tasks`]: the BERT classifier and GPT-2 LM as [`trainer::TrainTask`]s in dense, LoRA or SPT
//!   mode (one code path), checkpoint restore and LoRA-merged HF export.
//! - [`bench`](mod@bench): random weights, synthetic batches, timed steps and peak RSS for `spt-train bench`.
//! - [`rng`]: the serialisable SplitMix64 behind data order and per-step seeds.
//! - [`threads`]: the CPU thread count, fixed once per process (candle recounts it per matmul).
//! - [`peft`]: a LoRA run as a PEFT adapter directory (`export --format peft`).
//! - [`alloc`]: the allocator setting the binary and the benchmarks share (freed buffers kept
//!   for reuse).

pub mod alloc;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod losses;
pub mod metrics;
pub mod optim;
pub mod output_dir;
pub mod peft;
pub mod pipeline;
pub mod presets;
pub mod rng;
pub mod tasks;
pub mod threads;
pub mod trainer;
mod unique_json;

pub use error::{Error, Result};
