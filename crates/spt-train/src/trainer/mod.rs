//! The model-agnostic training loop.
//!
//! A model plugs in by implementing [`TrainTask`]: a loss on a [`Batch`], its trainable
//! variables by name, and optionally an evaluation output and extra state to checkpoint. The
//! dense, LoRA and SPT modes differ only in which variables `trainable()` returns and in what the
//! model does inside `loss`, so they share this one loop.
//!
//! One *step* is one optimizer update over `grad_accum` micro-batches, run on the CPU on a thread
//! of rayon's pool ([`spt_ops::on_pool`]; hence `TrainTask: Send`). The loop:
//! 1. draws the step's seed from the trainer RNG ([`SplitMix64`](crate::rng::SplitMix64), saved in checkpoints);
//! 2. for each micro-batch (in the order [`epoch_batches`] gives for `(seed, epoch)`; a step
//!    never spans two epochs): `loss`, `backward` of the loss weighted by the micro-batch's share
//!    of the step's items ([`TrainTask::loss_count`]), gradients summed;
//! 3. clips the global gradient norm, sets the scheduled learning rate, steps AdamW;
//! 4. calls [`TrainTask::after_step`] (e.g. a PQ codebook refresh schedule);
//! 5. logs, evaluates every `eval_every` steps and checkpoints every `save_every` steps.
//!
//! Resuming restores the trainable values, the optimizer moments, the task's extra state, the
//! RNG state and the data position, so on the CPU the losses equal those of an uninterrupted run
//! bit for bit. When the stop flag is set (Ctrl-C, see [`install_ctrlc_handler`]), the loop ends
//! after the current step and writes a checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::data::{epoch_batches, Batch, BatchOrder, EncodedDataset, TaskKind};
use crate::metrics::{accuracy, macro_f1, perplexity, MeanLoss};
use crate::optim::{AdamWConfig, ScheduleKind};
use crate::{Error, Result};

mod run;

pub use run::{
    check_no_later, check_run_folder, check_settings, check_within_run, DataOrder, DataRecord, Trainer,
};

/// The progress bar: bar, steps, elapsed < ETA, then "loss … lr … tok/s".
pub const PROGRESS_TEMPLATE: &str = "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}";

/// What the loop tells the task about the current forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepCtx {
    /// Optimizer updates done before this one.
    pub step: u64,
    /// Index of the micro-batch within the step.
    pub micro: usize,
    /// Seed for this forward pass's randomness (dropout …). Derived from the trainer RNG, so it
    /// is restored on resume; candle's CPU RNG cannot be seeded, so use this instead.
    pub seed: u64,
    /// Training (dropout on) or evaluation.
    pub train: bool,
}

/// What a task returns for one evaluation batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalOutput {
    /// Sum of the per-item (classification) or per-token (LM) losses.
    pub loss_sum: f64,
    /// How many items / tokens `loss_sum` covers.
    pub count: f64,
    /// Predicted class per example (classification), in batch order.
    pub predictions: Option<Vec<u32>>,
}

/// A model + loss the trainer can fit. See the module docs. `Send`: the trainer runs each step on
/// rayon's pool ([`spt_ops::on_pool`]).
pub trait TrainTask: Send {
    /// Mean loss over `batch`, as a scalar float tensor still attached to the graph.
    fn loss(&mut self, batch: &Batch, ctx: &StepCtx) -> candle_core::Result<Tensor>;

    /// How many items `loss` averages over in `batch`. With gradient accumulation each
    /// micro-batch's loss weighs by its share of the step's items, so the step's gradient is
    /// that of the mean over all of them (as transformers' Trainer weighs by
    /// `num_items_in_batch`). The default counts what [`crate::losses`] averages over: examples
    /// for a classifier, predicted tokens for a causal LM.
    fn loss_count(&self, batch: &Batch) -> f64 {
        crate::losses::loss_count(batch)
    }

    /// The variables to train, by their (Hugging Face style) names. Names decide weight decay
    /// ([`crate::optim::is_no_decay`]) and key the checkpoint. Must be the same on every call.
    fn trainable(&self) -> Vec<(String, Var)>;

    /// Evaluation of one batch. The default uses `loss` with `train = false`, weighted by the
    /// number of examples, and no predictions; classifiers should return predictions, LMs a
    /// per-token loss sum.
    fn eval_batch(&mut self, batch: &Batch) -> candle_core::Result<EvalOutput> {
        let ctx = StepCtx {
            step: 0,
            micro: 0,
            seed: 0,
            train: false,
        };
        let loss = self
            .loss(batch, &ctx)?
            .detach()
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok(EvalOutput {
            loss_sum: loss * batch.size as f64,
            count: batch.size as f64,
            predictions: None,
        })
    }

    /// Extra named tensors to checkpoint (e.g. PQ codebooks).
    fn extra_state(&mut self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        Ok(BTreeMap::new())
    }

    /// Restores [`TrainTask::extra_state`] on resume.
    fn load_extra_state(&mut self, _state: &HashMap<String, Tensor>) -> candle_core::Result<()> {
        Ok(())
    }

    /// Called after every optimizer update with the number of updates done.
    fn after_step(&mut self, _step: u64) -> candle_core::Result<()> {
        Ok(())
    }
}

/// A boxed task is a task, so the CLI can pick the model at run time.
impl<T: TrainTask + ?Sized> TrainTask for Box<T> {
    fn loss(&mut self, batch: &Batch, ctx: &StepCtx) -> candle_core::Result<Tensor> {
        (**self).loss(batch, ctx)
    }
    fn loss_count(&self, batch: &Batch) -> f64 {
        (**self).loss_count(batch)
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        (**self).trainable()
    }
    fn eval_batch(&mut self, batch: &Batch) -> candle_core::Result<EvalOutput> {
        (**self).eval_batch(batch)
    }
    fn extra_state(&mut self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        (**self).extra_state()
    }
    fn load_extra_state(&mut self, state: &HashMap<String, Tensor>) -> candle_core::Result<()> {
        (**self).load_extra_state(state)
    }
    fn after_step(&mut self, step: u64) -> candle_core::Result<()> {
        (**self).after_step(step)
    }
}

/// Settings of the loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    pub epochs: u64,
    /// Overrides `epochs` when set (the data then cycles through as many epochs as needed).
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub schedule: ScheduleKind,
    pub adamw: AdamWConfig,
    /// Learning-rate multipliers by module name segment (see [`AdamW::scale_lr`](crate::optim::AdamW::scale_lr)), e.g.
    /// `("router", 0.1)`.
    pub lr_scales: Vec<(String, f64)>,
    /// Global gradient-norm clip; 0 disables.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: u64,
    /// Checkpoints to keep (0: all).
    pub keep_last: usize,
    /// Log the mean train loss every N steps.
    pub log_every: u64,
    pub output_dir: PathBuf,
    /// Show the progress bar.
    pub progress: bool,
    /// Length bucketing window in batches (0/1: off).
    pub bucket_batches: usize,
    /// The run's resolved config, stored in every checkpoint's manifest.
    pub run_config: serde_json::Value,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            max_steps: None,
            batch_size: 16,
            eval_batch_size: 64,
            grad_accum: 1,
            lr: 5e-5,
            warmup_steps: 0,
            schedule: ScheduleKind::Linear,
            adamw: AdamWConfig::default(),
            lr_scales: Vec::new(),
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            save_every: 0,
            keep_last: 3,
            log_every: 10,
            output_dir: PathBuf::from("out"),
            progress: true,
            bucket_batches: BatchOrder::TRAIN.bucket_batches,
            run_config: serde_json::Value::Null,
        }
    }
}

/// Where to start from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Fresh run.
    No,
    /// The newest checkpoint in `<output_dir>/checkpoints`.
    Latest,
    /// A given checkpoint directory.
    From(PathBuf),
}

/// Evaluation results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub loss: f64,
    pub accuracy: Option<f64>,
    pub macro_f1: Option<f64>,
    pub perplexity: Option<f64>,
    pub examples: usize,
}

impl EvalReport {
    /// The report an `eval` line of metrics.jsonl holds, for an evaluation of `examples` rows.
    pub(crate) fn from_record(r: &crate::metrics::MetricRecord, examples: usize) -> Self {
        let value = |k: &str| r.values.get(k).copied();
        Self {
            loss: r.loss,
            accuracy: value("accuracy"),
            macro_f1: value("macro_f1"),
            perplexity: value("perplexity"),
            examples,
        }
    }

    fn values(&self) -> BTreeMap<String, f64> {
        let mut v = BTreeMap::new();
        for (k, x) in [
            ("accuracy", self.accuracy),
            ("macro_f1", self.macro_f1),
            ("perplexity", self.perplexity),
        ] {
            if let Some(x) = x {
                v.insert(k.to_string(), x);
            }
        }
        v
    }
}

/// What a training run did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    /// Optimizer updates done in total (including those before a resume).
    pub steps: u64,
    /// `(step, mean train loss of that step)` for the steps run in this call.
    pub train_losses: Vec<(u64, f32)>,
    /// `(step, report)` for the evaluations of this call. A resumed run with nothing left to
    /// train reports its checkpoint's evaluation, read back from metrics.jsonl.
    pub evals: Vec<(u64, EvalReport)>,
    /// The stop flag ended the run early.
    pub stopped: bool,
    pub last_checkpoint: Option<PathBuf>,
    /// Step the run resumed from, if any.
    pub resumed_from: Option<u64>,
    /// Wall-clock seconds of each step run in this call (forward, backward, update; not eval or
    /// checkpointing).
    pub step_times_s: Vec<f64>,
}

impl TrainSummary {
    /// Median of [`TrainSummary::step_times_s`], if any step ran.
    pub fn median_step_s(&self) -> Option<f64> {
        let mut v = self.step_times_s.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }
}

/// Installs a Ctrl-C handler once per process and returns its flag; SIGTERM (what `docker stop`
/// and Slurm send) counts as Ctrl-C. The first sets the flag (the trainer then saves and stops);
/// a second one exits at once with status 130. SIGHUP keeps the action it had: a run started
/// under `nohup` goes on when its terminal closes. The handler replaces SIGINT / SIGTERM handlers
/// installed before it (ctrlc's own refuse it: then this is an error) and stays for the process:
/// the flag is never reset, so after an interrupted run a later `train` with it stops at once.
pub fn install_ctrlc_handler() -> Result<Arc<AtomicBool>> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    if let Some(f) = FLAG.get() {
        return Ok(f.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    let f2 = flag.clone();
    #[cfg(unix)]
    let hup = sighup::take()?;
    let installed = ctrlc::set_handler(move || {
        if f2.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        // Not eprintln!: it panics when stderr is gone (a closed terminal).
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\ninterrupted (Ctrl-C or SIGTERM): finishing the current step and saving a checkpoint \
             (interrupt again to quit now)"
        );
    });
    // Restored whether or not ctrlc took the handlers (it refuses when the process has one).
    #[cfg(unix)]
    sighup::restore(&hup)?;
    installed.map_err(|e| Error::Msg(format!("cannot install the Ctrl-C handler: {e}")))?;
    Ok(FLAG.get_or_init(|| flag).clone())
}

/// SIGHUP's action around ctrlc's handler, which takes it with SIGTERM.
#[cfg(unix)]
mod sighup {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

    fn set(action: &SigAction) -> crate::Result<SigAction> {
        // SAFETY: SIG_DFL, SIG_IGN or an action read back from the OS, installed once at start-up
        // before any training thread; no Rust handler function is registered here.
        unsafe { sigaction(Signal::SIGHUP, action) }
            .map_err(|e| crate::Error::Msg(format!("cannot read or set the SIGHUP action: {e}")))
    }

    /// The current action, leaving the default one in place until [`restore`].
    pub(super) fn take() -> crate::Result<SigAction> {
        set(&SigAction::new(
            SigHandler::SigDfl,
            SaFlags::empty(),
            SigSet::empty(),
        ))
    }

    pub(super) fn restore(action: &SigAction) -> crate::Result<()> {
        set(action).map(|_| ())
    }
}

/// Evaluates `task` on `data` in length-sorted batches of `batch_size`.
pub fn evaluate<T: TrainTask + ?Sized>(
    task: &mut T,
    data: &EncodedDataset,
    batch_size: usize,
    device: &Device,
) -> Result<EvalReport> {
    if data.is_empty() {
        return Err(Error::Msg("evaluate: the evaluation set is empty".into()));
    }
    let batches = epoch_batches(&data.lengths(), batch_size, 0, 0, BatchOrder::EVAL)?;
    let (mut loss, mut counted) = (MeanLoss::default(), 0.0);
    let (mut preds, mut labels) = (Vec::new(), Vec::new());
    let mut have_preds = true;
    for idx in &batches {
        let batch = data.batch(idx, device)?;
        // Gradients off: a trainable model's forward would record a graph nothing reads (and
        // keep its activations); the values are the same up to rounding (untracked paths).
        let out = spt_ops::on_pool(device, || spt_ops::no_grad(|| task.eval_batch(&batch)))?;
        if out.count > 0.0 {
            loss.add(out.loss_sum / out.count, out.count);
            counted += out.count;
        }
        match (out.predictions, data.task) {
            (Some(p), TaskKind::Classify) => {
                if p.len() != batch.size {
                    return Err(Error::Msg(format!(
                        "eval_batch returned {} predictions for a batch of {}",
                        p.len(),
                        batch.size
                    )));
                }
                preds.extend(p);
                labels.extend(batch.labels.to_vec1::<u32>()?);
            }
            _ => have_preds = false,
        }
    }
    if counted == 0.0 {
        // No figure to report: a mean over nothing is NaN, which JSON can only write as null.
        return Err(Error::Msg(format!(
            "evaluate: eval_batch counted no example or token in {} examples",
            data.len()
        )));
    }
    let mean = loss.mean();
    // NaN logits still have an argmax: an accuracy reported beside them would be made up.
    if !mean.is_finite() {
        return Err(Error::Msg(format!(
            "evaluate: the loss over {} examples is {mean}: the model's outputs are not finite \
             (diverged weights, or a setting that overflows such as a huge LoRA alpha)",
            data.len()
        )));
    }
    let (acc, f1) = if have_preds && !preds.is_empty() {
        let classes = preds.iter().chain(labels.iter()).copied().max().unwrap_or(0) as usize + 1;
        (
            Some(accuracy(&preds, &labels)?),
            Some(macro_f1(&preds, &labels, classes)?),
        )
    } else {
        (None, None)
    };
    let ppl = (data.task == TaskKind::Lm).then(|| perplexity(mean));
    Ok(EvalReport {
        loss: mean,
        accuracy: acc,
        macro_f1: f1,
        perplexity: ppl,
        examples: data.len(),
    })
}

/// Optimizer updates a run over `n_items` training items makes: `max_steps`, else
/// `epochs · ceil(ceil(n_items / batch_size) / grad_accum)` (an epoch's last update takes what is
/// left of it, as in transformers' Trainer).
pub fn planned_steps(cfg: &TrainerConfig, n_items: usize) -> u64 {
    if let Some(m) = cfg.max_steps {
        return m;
    }
    let n_batches = (n_items as u64).div_ceil(cfg.batch_size.max(1) as u64);
    steps_left(Default::default(), n_batches, cfg.epochs, cfg.grad_accum)
}

/// Updates left from data position `pos` to the end of `epochs` epochs of `n_batches` batches,
/// `grad_accum` batches an update and no update across an epoch's end: what a resumed run makes
/// after its checkpoint (its total may differ from [`planned_steps`] when the checkpoint was
/// made with another `grad_accum`).
pub fn steps_left(
    pos: crate::checkpoint::DataPosition,
    n_batches: u64,
    epochs: u64,
    grad_accum: usize,
) -> u64 {
    // Saturating: the trainer refuses epoch counts that overflow; this only plans.
    if pos.epoch >= epochs {
        return 0;
    }
    let ga = grad_accum.max(1) as u64;
    let this_epoch = n_batches.saturating_sub(pos.batch).div_ceil(ga);
    let later_epochs = epochs - pos.epoch - 1;
    this_epoch.saturating_add(later_epochs.saturating_mul(n_batches.div_ceil(ga)))
}

/// The settings that differ between two run configs (JSON objects), as `name: old → new`.
pub fn config_changes(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (old.as_object(), new.as_object()) else {
        return if old == new {
            Vec::new()
        } else {
            vec![format!("config: {old} → {new}")]
        };
    };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let show = |v: Option<&serde_json::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} → {}", show(a.get(k)), show(b.get(k))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_changes_name_each_setting() {
        let a = serde_json::json!({"lr": 0.001, "seed": 1, "mode": "spt"});
        let b = serde_json::json!({"lr": 0.0005, "seed": 1, "epochs": 2});
        assert_eq!(
            config_changes(&a, &b),
            vec![
                "epochs: (unset) → 2",
                "lr: 0.001 → 0.0005",
                "mode: \"spt\" → (unset)"
            ]
        );
        assert!(config_changes(&a, &a).is_empty());
    }

    #[test]
    fn progress_template_parses_and_steps_are_planned() {
        assert!(indicatif::ProgressStyle::with_template(PROGRESS_TEMPLATE).is_ok());
        let cfg = TrainerConfig {
            epochs: 3,
            batch_size: 8,
            grad_accum: 2,
            ..Default::default()
        };
        assert_eq!(planned_steps(&cfg, 50), 12); // 3 · ceil(7 / 2): no step spans two epochs
        assert_eq!(
            planned_steps(
                &TrainerConfig {
                    max_steps: Some(5),
                    ..cfg
                },
                50
            ),
            5
        );
    }

    #[test]
    fn steps_left_count_from_the_data_position() {
        use crate::checkpoint::DataPosition;
        let pos = |epoch, batch| DataPosition { epoch, batch };
        let cfg = TrainerConfig {
            epochs: 3,
            batch_size: 8,
            grad_accum: 2,
            ..Default::default()
        };
        // From the start, and from each step of a run: what planned_steps says.
        assert_eq!(steps_left(pos(0, 0), 7, 3, 2), planned_steps(&cfg, 50));
        assert_eq!(steps_left(pos(1, 2), 7, 3, 2), 7); // after step 5 of 12
        assert_eq!(steps_left(pos(0, 7), 7, 3, 2), 8); // an epoch's end, not yet advanced
        assert_eq!(steps_left(pos(2, 7), 7, 3, 2), 0);
        assert_eq!(steps_left(pos(0, 4), 7, 3, 1), 3 + 14); // grad_accum changed to 1
        assert_eq!(steps_left(pos(5, 0), 7, 3, 2), 0); // fewer epochs than done
    }

    #[test]
    fn settings_the_data_cannot_carry_are_refused_by_name() {
        use crate::data::{EncodedDataset, EncodedItem, TaskKind};
        let item = EncodedItem {
            input_ids: vec![1, 2, 3],
            token_type_ids: vec![0, 0, 0],
            label: Some(0),
        };
        let train = EncodedDataset {
            task: TaskKind::Classify,
            items: vec![item; 10],
            pad_id: 0,
        };
        let ok = TrainerConfig {
            epochs: 2,
            batch_size: 4,
            grad_accum: 3, // 3 batches an epoch: the most a step may gather
            ..Default::default()
        };
        check_settings(&ok, &train).unwrap();
        let e = check_settings(
            &TrainerConfig {
                grad_accum: 4,
                ..ok.clone()
            },
            &train,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("grad_accum = 4") && e.contains("at most 3"), "{e}");
        let e = check_settings(
            &TrainerConfig {
                epochs: u64::MAX / 2,
                ..ok.clone()
            },
            &train,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("epochs") && e.contains("too large"), "{e}");
        // max_steps bounds the run: no epoch count is multiplied out.
        let capped = TrainerConfig {
            epochs: u64::MAX,
            max_steps: Some(2),
            ..ok
        };
        check_settings(&capped, &train).unwrap();
        assert_eq!(
            planned_steps(
                &TrainerConfig {
                    max_steps: None,
                    ..capped
                },
                10
            ),
            u64::MAX // an epoch is one step: saturated
        );
    }
}
