//! The model-agnostic training loop.
//!
//! A model plugs in by implementing [`TrainTask`]: a loss on a [`Batch`], its trainable
//! variables by name, and optionally an evaluation output and extra state to checkpoint. The
//! dense, LoRA and SPT modes differ only in which variables `trainable()` returns and in what the
//! model does inside `loss`, so they share this one loop.
//!
//! One *step* is one optimizer update over `grad_accum` micro-batches. The loop:
//! 1. draws the step's seed from the trainer RNG ([`SplitMix64`], saved in checkpoints);
//! 2. for each micro-batch (in the order [`epoch_batches`] gives for `(seed, epoch)`): `loss`,
//!    `backward` of `loss / n_micro`, gradients summed;
//! 3. clips the global gradient norm, sets the scheduled learning rate, steps AdamW;
//! 4. calls [`TrainTask::after_step`] (e.g. a PQ codebook refresh schedule);
//! 5. logs, evaluates every `eval_every` steps and checkpoints every `save_every` steps.
//!
//! Resuming restores the trainable values, the optimizer moments, the task's extra state, the
//! RNG state and the data position, so on the CPU the losses equal those of an uninterrupted run
//! bit for bit. When the stop flag is set (Ctrl-C, see [`install_ctrlc_handler`]), the loop ends
//! after the current step and writes a checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    latest_checkpoint, load_checkpoint, save_checkpoint, CheckpointData, CheckpointIo, DataPosition, FsIo,
};
use crate::data::{epoch_batches, Batch, BatchOrder, DataError, EncodedDataset, TaskKind};
use crate::metrics::{accuracy, macro_f1, perplexity, MeanLoss, MetricRecord, MetricsWriter};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule, ScheduleKind};
use crate::rng::SplitMix64;
use crate::{Error, Result};

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

/// A model + loss the trainer can fit. See the module docs.
pub trait TrainTask {
    /// Mean loss over `batch`, as a scalar float tensor still attached to the graph.
    fn loss(&mut self, batch: &Batch, ctx: &StepCtx) -> candle_core::Result<Tensor>;

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
    fn extra_state(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
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
    fn trainable(&self) -> Vec<(String, Var)> {
        (**self).trainable()
    }
    fn eval_batch(&mut self, batch: &Batch) -> candle_core::Result<EvalOutput> {
        (**self).eval_batch(batch)
    }
    fn extra_state(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
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
    /// Learning-rate multipliers by module name segment (see [`AdamW::scale_lr`]), e.g.
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

/// Installs a Ctrl-C handler once per process and returns its flag. The first Ctrl-C sets the
/// flag (the trainer then saves and stops); a second one exits at once with status 130.
pub fn install_ctrlc_handler() -> Result<Arc<AtomicBool>> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    if let Some(f) = FLAG.get() {
        return Ok(f.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    let f2 = flag.clone();
    ctrlc::set_handler(move || {
        if f2.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing the current step and saving a checkpoint (Ctrl-C again to quit now)");
    })
    .map_err(|e| Error::Msg(format!("cannot install the Ctrl-C handler: {e}")))?;
    Ok(FLAG.get_or_init(|| flag).clone())
}

/// Evaluates `task` on `data` in length-sorted batches of `batch_size`.
pub fn evaluate<T: TrainTask + ?Sized>(
    task: &mut T,
    data: &EncodedDataset,
    batch_size: usize,
    device: &Device,
) -> Result<EvalReport> {
    let batches = epoch_batches(&data.lengths(), batch_size, 0, 0, BatchOrder::EVAL)?;
    let mut loss = MeanLoss::default();
    let (mut preds, mut labels) = (Vec::new(), Vec::new());
    let mut have_preds = true;
    for idx in &batches {
        let batch = data.batch(idx, device)?;
        let out = task.eval_batch(&batch)?;
        if out.count > 0.0 {
            loss.add(out.loss_sum / out.count, out.count);
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
    let mean = loss.mean();
    let (acc, f1) = if have_preds && !preds.is_empty() {
        let classes = preds.iter().chain(labels.iter()).copied().max().unwrap_or(0) as usize + 1;
        (
            Some(accuracy(&preds, &labels)),
            Some(macro_f1(&preds, &labels, classes)),
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
/// `ceil(epochs · ceil(n_items / batch_size) / grad_accum)`.
pub fn planned_steps(cfg: &TrainerConfig, n_items: usize) -> u64 {
    if let Some(m) = cfg.max_steps {
        return m;
    }
    let n_batches = (n_items as u64).div_ceil(cfg.batch_size.max(1) as u64);
    (cfg.epochs * n_batches).div_ceil(cfg.grad_accum.max(1) as u64)
}

/// The training loop over a [`TrainTask`].
pub struct Trainer<T: TrainTask> {
    task: T,
    cfg: TrainerConfig,
    device: Device,
    stop: Arc<AtomicBool>,
    io: Box<dyn CheckpointIo>,
}

struct LoopState {
    step: u64,
    pos: DataPosition,
    rng: SplitMix64,
}

impl<T: TrainTask> Trainer<T> {
    pub fn new(task: T, cfg: TrainerConfig, device: Device) -> Self {
        Self {
            task,
            cfg,
            device,
            stop: Arc::new(AtomicBool::new(false)),
            io: Box::new(FsIo),
        }
    }

    /// Uses `flag` as the stop request (e.g. from [`install_ctrlc_handler`]).
    pub fn with_stop_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop = flag;
        self
    }

    /// Writes checkpoints through `io` (tests simulate a full disk with it).
    pub fn with_checkpoint_io(mut self, io: Box<dyn CheckpointIo>) -> Self {
        self.io = io;
        self
    }

    pub fn task(&self) -> &T {
        &self.task
    }

    pub fn task_mut(&mut self) -> &mut T {
        &mut self.task
    }

    pub fn into_task(self) -> T {
        self.task
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.cfg.output_dir.join("checkpoints")
    }

    /// Number of optimizer updates a run over `n_items` training items makes.
    pub fn total_steps(&self, n_items: usize) -> u64 {
        planned_steps(&self.cfg, n_items)
    }

    fn validate(&self, train: &EncodedDataset) -> Result<()> {
        let c = &self.cfg;
        if c.batch_size == 0 || c.eval_batch_size == 0 {
            return Err(DataError::ZeroBatchSize.into());
        }
        if c.grad_accum == 0 {
            return Err(Error::Msg("grad_accum must be at least 1".into()));
        }
        if !(c.lr.is_finite() && c.lr > 0.0) {
            return Err(Error::Msg(format!(
                "learning rate must be positive, got {}",
                c.lr
            )));
        }
        if train.is_empty() {
            return Err(Error::Msg("the training set is empty".into()));
        }
        if c.max_steps.is_none() && c.epochs == 0 {
            return Err(Error::Msg("set epochs ≥ 1 or max_steps".into()));
        }
        Ok(())
    }

    /// Evaluates the current model on `data`.
    pub fn evaluate(&mut self, data: &EncodedDataset) -> Result<EvalReport> {
        evaluate(&mut self.task, data, self.cfg.eval_batch_size, &self.device)
    }

    fn restore(&mut self, path: &Path, opt: &mut AdamW) -> Result<LoopState> {
        let ck = load_checkpoint(path, &self.device)?;
        // Extra state first: it may reorder what the trained values are loaded into.
        self.task.load_extra_state(&ck.extra)?;
        let vars = self.task.trainable();
        for (name, var) in &vars {
            let t = ck.model.get(name).ok_or_else(|| {
                Error::Msg(format!(
                    "checkpoint {}: no tensor for trainable parameter `{name}`; it was made in another mode or from another model (its finetune.toml says which)",
                    path.display()
                ))
            })?;
            if t.shape() != var.shape() {
                return Err(Error::Msg(format!(
                    "checkpoint {}: `{name}` is {:?}, the model has {:?}",
                    path.display(),
                    t.shape(),
                    var.shape()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        if ck.model.len() != vars.len() {
            let known: std::collections::HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
            let extra: Vec<&String> = ck.model.keys().filter(|k| !known.contains(k.as_str())).collect();
            return Err(Error::Msg(format!(
                "checkpoint {}: holds parameters the model does not train: {extra:?}; it was made in another mode or from another model (its finetune.toml says which)",
                path.display()
            )));
        }
        opt.load_state_dict(&ck.optimizer)
            .map_err(|e| Error::Msg(format!("checkpoint {}: {e}", path.display())))?;
        let changed = config_changes(&ck.manifest.config, &self.cfg.run_config);
        if !changed.is_empty() {
            tracing::warn!(
                "checkpoint {} was written with other settings ({}); continuing with the current ones",
                path.display(),
                changed.join(", ")
            );
        }
        Ok(LoopState {
            step: ck.manifest.step,
            pos: ck.manifest.data,
            rng: SplitMix64::new(ck.manifest.rng_state),
        })
    }

    fn save(&mut self, st: &LoopState, opt: &AdamW) -> Result<PathBuf> {
        let model = self
            .task
            .trainable()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        let data = CheckpointData {
            step: st.step,
            data: st.pos,
            rng_state: st.rng.state,
            config: self.cfg.run_config.clone(),
            extra_json: serde_json::Value::Null,
            model,
            optimizer: opt.state_dict()?,
            extra: self.task.extra_state()?,
        };
        let p = save_checkpoint(
            &self.checkpoint_dir(),
            &data,
            self.cfg.keep_last,
            self.io.as_ref(),
        )?;
        tracing::info!(step = st.step, path = %p.display(), "checkpoint saved");
        Ok(p)
    }

    /// Trains on `train`, evaluating on `eval` if given. See the module docs.
    pub fn train(
        &mut self,
        train: &EncodedDataset,
        eval: Option<&EncodedDataset>,
        resume: &Resume,
    ) -> Result<TrainSummary> {
        self.validate(train)?;
        std::fs::create_dir_all(&self.cfg.output_dir).map_err(|e| Error::io(&self.cfg.output_dir, e))?;
        let vars_named = self.task.trainable();
        if vars_named.is_empty() {
            return Err(Error::Msg("the task has no trainable parameters".into()));
        }
        let vars: Vec<Var> = vars_named.iter().map(|(_, v)| v.clone()).collect();
        let n_params: usize = vars.iter().map(|v| v.elem_count()).sum();
        let mut opt = AdamW::new(vars_named, self.cfg.adamw)?;
        for (module, scale) in &self.cfg.lr_scales {
            let n = opt.scale_lr(module, *scale)?;
            if n == 0 {
                tracing::warn!("lr scale {scale} for `{module}`: no trainable parameter has that name");
            } else {
                tracing::info!("lr scale {scale} for `{module}`: {n} parameters");
            }
        }
        let metrics = MetricsWriter::new(self.cfg.output_dir.join("metrics.jsonl"));

        let mut st = LoopState {
            step: 0,
            pos: DataPosition::default(),
            rng: SplitMix64::new(self.cfg.seed),
        };
        let resume_path = match resume {
            Resume::No => None,
            Resume::Latest => Some(latest_checkpoint(&self.checkpoint_dir())?),
            Resume::From(p) => Some(p.clone()),
        };
        let mut resumed_from = None;
        if let Some(p) = &resume_path {
            st = self.restore(p, &mut opt)?;
            metrics.truncate_after(st.step)?;
            resumed_from = Some(st.step);
            tracing::info!(step = st.step, path = %p.display(), "resumed");
        }

        let bs = self.cfg.batch_size;
        let n_batches = train.len().div_ceil(bs) as u64;
        let total = self.total_steps(train.len());
        let sched = LrSchedule {
            base_lr: self.cfg.lr,
            warmup_steps: self.cfg.warmup_steps,
            total_steps: total,
            kind: self.cfg.schedule,
        };
        tracing::info!(
            examples = train.len(),
            trainable_params = n_params,
            steps = total,
            batch_size = bs,
            grad_accum = self.cfg.grad_accum,
            "training"
        );
        let lengths = train.lengths();
        let order = BatchOrder {
            shuffle: true,
            bucket_batches: self.cfg.bucket_batches,
        };
        let mut epoch_cache: Option<(u64, Vec<Vec<usize>>)> = None;

        let pb = if self.cfg.progress {
            let pb = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(PROGRESS_TEMPLATE) {
                pb.set_style(style);
            }
            pb
        } else {
            indicatif::ProgressBar::hidden()
        };
        pb.set_position(st.step);

        let mut summary = TrainSummary {
            steps: st.step,
            train_losses: Vec::new(),
            evals: Vec::new(),
            stopped: false,
            last_checkpoint: None,
            resumed_from,
            step_times_s: Vec::new(),
        };
        let started = Instant::now();
        let mut tokens_seen: u64 = 0;
        let mut window = MeanLoss::default();
        let mut last_saved = resumed_from;
        let mut last_eval = None;

        while st.step < total {
            if self.stop.load(Ordering::SeqCst) {
                // Ctrl-C (or another stop request): save where we are and leave.
                if last_saved != Some(st.step) {
                    summary.last_checkpoint = Some(self.save(&st, &opt)?);
                    last_saved = Some(st.step);
                }
                summary.stopped = true;
                pb.suspend(|| tracing::warn!(step = st.step, "stopped on request; checkpoint written"));
                break;
            }
            // Gather the micro-batches of this step.
            let mut micro = Vec::with_capacity(self.cfg.grad_accum);
            while micro.len() < self.cfg.grad_accum {
                if st.pos.batch >= n_batches {
                    st.pos = DataPosition {
                        epoch: st.pos.epoch + 1,
                        batch: 0,
                    };
                }
                if self.cfg.max_steps.is_none() && st.pos.epoch >= self.cfg.epochs {
                    break;
                }
                let batches = match epoch_cache.take() {
                    Some((e, b)) if e == st.pos.epoch => b,
                    _ => epoch_batches(&lengths, bs, self.cfg.seed, st.pos.epoch, order)?,
                };
                let idx = batches.get(st.pos.batch as usize).ok_or_else(|| {
                    Error::Msg(format!("data position {:?} is past the end of the epoch", st.pos))
                })?;
                micro.push(train.batch(idx, &self.device)?);
                epoch_cache = Some((st.pos.epoch, batches));
                st.pos.batch += 1;
            }
            if micro.is_empty() {
                break;
            }
            let n = micro.len();
            let step_started = Instant::now();
            let step_seed = st.rng.next_u64();
            let lr = sched.lr_at(st.step);
            let mut acc: Option<GradStore> = None;
            let mut loss_sum = 0f64;
            for (i, batch) in micro.iter().enumerate() {
                let ctx = StepCtx {
                    step: st.step,
                    micro: i,
                    seed: SplitMix64::derive(step_seed, i as u64).next_u64(),
                    train: true,
                };
                let loss = self.task.loss(batch, &ctx)?;
                let value = loss.detach().to_dtype(DType::F32)?.to_scalar::<f32>()?;
                if !value.is_finite() {
                    return Err(Error::Msg(format!(
                        "loss is {value} at step {} (micro-batch {i})",
                        st.step + 1
                    )));
                }
                loss_sum += value as f64;
                tokens_seen += batch.n_tokens as u64;
                let scaled = if n > 1 { (loss / n as f64)? } else { loss };
                let grads = scaled.backward()?;
                acc = Some(match acc {
                    None => grads,
                    Some(mut a) => {
                        for v in &vars {
                            if let Some(g) = grads.get(v.as_tensor()) {
                                let sum = match a.get(v.as_tensor()) {
                                    Some(prev) => (prev + g)?,
                                    None => g.clone(),
                                };
                                a.insert(v.as_tensor(), sum);
                            }
                        }
                        a
                    }
                });
            }
            let Some(mut grads) = acc else { break };
            let gnorm = clip_grad_norm(&vars, &mut grads, self.cfg.max_grad_norm)?;
            if !gnorm.is_finite() {
                return Err(Error::Msg(format!(
                    "gradient norm is {gnorm} at step {}",
                    st.step + 1
                )));
            }
            opt.step(&grads, lr)?;
            drop(grads);
            st.step += 1;
            self.task.after_step(st.step)?;
            summary.step_times_s.push(step_started.elapsed().as_secs_f64());

            let step_loss = (loss_sum / n as f64) as f32;
            summary.train_losses.push((st.step, step_loss));
            window.add(step_loss as f64, 1.0);
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            let tok_s = tokens_seen as f64 / elapsed;
            pb.set_position(st.step);
            pb.set_message(format!("loss {step_loss:.4} lr {lr:.2e} {tok_s:.0} tok/s"));
            let epoch_f = st.pos.epoch as f64 + st.pos.batch as f64 / n_batches.max(1) as f64;
            if self.cfg.log_every > 0 && (st.step % self.cfg.log_every == 0 || st.step == total) {
                let mut values = BTreeMap::new();
                values.insert("grad_norm".to_string(), gnorm);
                values.insert("tokens_per_s".to_string(), tok_s);
                let rec = MetricRecord {
                    step: st.step,
                    epoch: epoch_f,
                    split: "train".into(),
                    loss: window.mean(),
                    lr: Some(lr),
                    values,
                };
                metrics.append(&rec)?;
                pb.suspend(|| {
                    tracing::info!(
                        step = st.step,
                        loss = rec.loss,
                        lr,
                        grad_norm = gnorm,
                        tokens_per_s = tok_s,
                        "train"
                    )
                });
                window = MeanLoss::default();
            }
            if let Some(ev) = eval {
                if self.cfg.eval_every > 0 && st.step % self.cfg.eval_every == 0 {
                    let rep = self.evaluate(ev)?;
                    self.record_eval(&metrics, &pb, st.step, epoch_f, &rep)?;
                    summary.evals.push((st.step, rep));
                    last_eval = Some(st.step);
                }
            }
            if self.cfg.save_every > 0 && st.step % self.cfg.save_every == 0 {
                summary.last_checkpoint = Some(self.save(&st, &opt)?);
                last_saved = Some(st.step);
            }
        }
        pb.finish_and_clear();
        summary.steps = st.step;
        if !summary.stopped {
            if let Some(ev) = eval {
                if last_eval != Some(st.step) {
                    let epoch_f = st.pos.epoch as f64 + st.pos.batch as f64 / n_batches.max(1) as f64;
                    let rep = self.evaluate(ev)?;
                    self.record_eval(&metrics, &pb, st.step, epoch_f, &rep)?;
                    summary.evals.push((st.step, rep));
                }
            }
            if last_saved != Some(st.step) {
                summary.last_checkpoint = Some(self.save(&st, &opt)?);
            }
        }
        let svg = self.cfg.output_dir.join("loss.svg");
        if let Err(e) = crate::metrics::plot_metrics_file(metrics.path(), &svg) {
            tracing::warn!("loss plot not written: {e}");
        }
        Ok(summary)
    }

    fn record_eval(
        &self,
        metrics: &MetricsWriter,
        pb: &indicatif::ProgressBar,
        step: u64,
        epoch: f64,
        rep: &EvalReport,
    ) -> Result<()> {
        metrics.append(&MetricRecord {
            step,
            epoch,
            split: "eval".into(),
            loss: rep.loss,
            lr: None,
            values: rep.values(),
        })?;
        pb.suspend(|| {
            tracing::info!(
                step,
                loss = rep.loss,
                accuracy = rep.accuracy,
                macro_f1 = rep.macro_f1,
                perplexity = rep.perplexity,
                "eval"
            )
        });
        Ok(())
    }
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
        assert_eq!(planned_steps(&cfg, 50), 11); // ceil(3 · 7 / 2)
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
}
