//! [`Trainer`]: the loop itself (steps, evaluation, checkpoints, resuming); see the module docs
//! of [`crate::trainer`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Var};

use crate::checkpoint::{
    checkpoint_step, checkpoints_after, latest_checkpoint, list_checkpoints, load_checkpoint, read_manifest,
    save_checkpoint, CheckpointData, CheckpointIo, DataPosition, FsIo,
};
use crate::data::{epoch_batches, BatchOrder, DataFingerprint, EncodedDataset};
use crate::metrics::{MeanLoss, MetricRecord, MetricsWriter};
use crate::optim::{clip_scale, grad_norm, AdamW, LrSchedule};
use crate::rng::SplitMix64;
use crate::{Error, Result};

use super::{
    config_changes, evaluate, planned_steps, steps_left, EvalReport, Resume, StepCtx, TrainSummary,
    TrainTask, TrainerConfig, PROGRESS_TEMPLATE,
};

/// The training loop over a [`TrainTask`].
pub struct Trainer<T: TrainTask> {
    task: T,
    cfg: TrainerConfig,
    device: Device,
    stop: Arc<AtomicBool>,
    io: Box<dyn CheckpointIo>,
    /// What [`Trainer::check_resume`] restored, for [`Trainer::train`] to continue from.
    restored: Option<Restored>,
    /// The rows being trained, evaluated and held out on, recorded in every checkpoint.
    data: DataRecord,
}

/// Which rows a checkpoint's run trained and evaluated on and held out of its training files
/// ([`DataFingerprint`]s), as its manifest records them (`extra.data`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive] // a record grows with what checkpoints learn to keep
pub struct DataRecord {
    pub train: Option<DataFingerprint>,
    pub validation: Option<DataFingerprint>,
    pub held_out: Option<DataFingerprint>,
    /// The held-out rows changed at a resume on the way to this checkpoint (another split,
    /// validation file or data): the steps before it may have trained on some of them.
    #[serde(default)]
    pub held_out_mixed: bool,
    /// A classifier's class names in its head's order (a run's labels.json can be lost or
    /// edited; the checkpoint's head answers in this order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// The settings that order the training rows into steps: a resume under other ones reads
    /// its data position in another order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<DataOrder>,
}

/// What turns the training rows into a sequence of steps (with the data's fingerprint): the
/// shuffle seed, the batch and accumulation sizes and the length bucketing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataOrder {
    pub seed: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub bucket_batches: usize,
}

impl DataOrder {
    fn of(c: &TrainerConfig) -> Self {
        Self {
            seed: c.seed,
            batch_size: c.batch_size,
            grad_accum: c.grad_accum,
            bucket_batches: c.bucket_batches,
        }
    }

    /// `name: then → now` for each setting that differs and moves the rows: a data position
    /// counts batches, so another `grad_accum` reads the same rows next.
    fn changes(&self, now: &Self) -> Vec<String> {
        let pairs = [
            ("seed", self.seed, now.seed),
            ("batch_size", self.batch_size as u64, now.batch_size as u64),
            (
                "bucket_batches",
                self.bucket_batches as u64,
                now.bucket_batches as u64,
            ),
        ];
        pairs
            .iter()
            .filter(|(_, a, b)| a != b)
            .map(|(n, a, b)| format!("{n} {a} → {b}"))
            .collect()
    }
}

impl DataRecord {
    /// The record of `checkpoint`; none for a checkpoint from before the record.
    pub fn of(checkpoint: &Path) -> Option<Self> {
        let m = read_manifest(checkpoint).ok()?;
        serde_json::from_value(m.extra.get("data")?.clone()).ok()
    }
}

/// A checkpoint restored into the task: its path, the optimizer holding its state, its loop state.
struct Restored {
    path: PathBuf,
    opt: AdamW,
    st: LoopState,
}

struct LoopState {
    step: u64,
    pos: DataPosition,
    rng: SplitMix64,
}

impl<T: TrainTask> Trainer<T> {
    /// A trainer for `task`. Nothing is written until [`Trainer::train`], which writes into
    /// `cfg.output_dir` (see there).
    pub fn new(task: T, cfg: TrainerConfig, device: Device) -> Self {
        Self {
            task,
            cfg,
            device,
            stop: Arc::new(AtomicBool::new(false)),
            io: Box::new(FsIo),
            restored: None,
            data: DataRecord::default(),
        }
    }

    /// Records in each checkpoint which rows were held out of the training files
    /// ([`crate::pipeline::PreparedData::held_out`]), for `eval --split validation` to check
    /// that it evaluates those rows again.
    pub fn with_held_out(mut self, rows: Option<DataFingerprint>) -> Self {
        self.data.held_out = rows;
        self
    }

    /// Records a classifier's class names, in its head's order, in each checkpoint.
    pub fn with_classes(mut self, classes: Option<Vec<String>>) -> Self {
        self.data.classes = classes;
        self
    }

    /// Uses `flag` as the stop request (e.g. from [`install_ctrlc_handler`](super::install_ctrlc_handler)).
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

    /// Evaluates the current model on `data`.
    pub fn evaluate(&mut self, data: &EncodedDataset) -> Result<EvalReport> {
        evaluate(&mut self.task, data, self.cfg.eval_batch_size, &self.device)
    }

    /// Restores `resume`'s checkpoint (tensors into the task, state into the optimizer) before
    /// anything is written, so that a checkpoint that does not fit is refused first; a CLI calls
    /// it before touching the run folder. [`Trainer::train`] with the same `resume` continues
    /// from it without reading the checkpoint again (and restores it itself when not called);
    /// given none, it is refused, since the task holds this checkpoint's weights (given another
    /// checkpoint, it restores that one).
    pub fn check_resume(&mut self, resume: &Resume) -> Result<()> {
        let path = match resume {
            Resume::No => return Ok(()),
            Resume::Latest => latest_checkpoint(&self.checkpoint_dir())?,
            Resume::From(p) => p.clone(),
        };
        let mut opt = self.optimizer()?;
        let st = self.restore(&path, &mut opt)?;
        self.restored = Some(Restored { path, opt, st });
        Ok(())
    }

    /// The checkpoint [`Trainer::check_resume`] restored and its step, if any: with
    /// [`Trainer::total_steps`], whether the run has steps left before anything is written.
    pub fn resumed_checkpoint(&self) -> Option<(&Path, u64)> {
        self.restored.as_ref().map(|r| (r.path.as_path(), r.st.step))
    }

    /// AdamW over the task's trainable parameters, with the per-module learning-rate scales.
    fn optimizer(&self) -> Result<AdamW> {
        let mut opt = AdamW::new(self.task.trainable(), self.cfg.adamw)?;
        for (module, scale) in &self.cfg.lr_scales {
            let n = opt.scale_lr(module, *scale)?;
            if n == 0 {
                tracing::warn!("lr scale {scale} for `{module}`: no trainable parameter has that name");
            } else {
                tracing::info!("lr scale {scale} for `{module}`: {n} parameters");
            }
        }
        Ok(opt)
    }

    fn restore(&mut self, path: &Path, opt: &mut AdamW) -> Result<LoopState> {
        let ck = load_checkpoint(path, &self.device)?;
        let vars = self.task.trainable();
        let changed = config_changes(&ck.manifest.config, &self.cfg.run_config);
        // Which settings differ from the checkpoint's says why its tensors do not fit.
        let why = if changed.is_empty() {
            "it was made in another mode or from another model (its finetune.toml says which)".to_string()
        } else {
            format!(
                "it was written with other settings ({}): resume with the run's own (with spt-train, \
                 `--output-dir RUN --resume` alone reads its finetune.toml)",
                changed.join(", ")
            )
        };
        // Everything is checked before the task changes: a refused checkpoint leaves it as it
        // was. (`opt` is this resume's own, so loading its state is part of the check.)
        for (name, var) in &vars {
            let t = ck.model.get(name).ok_or_else(|| {
                Error::Msg(format!(
                    "checkpoint {}: no tensor for trainable parameter `{name}`; {why}",
                    path.display()
                ))
            })?;
            if t.shape() != var.shape() {
                return Err(Error::Msg(format!(
                    "checkpoint {}: `{name}` is {:?}, the model has {:?}; {why}",
                    path.display(),
                    t.shape(),
                    var.shape()
                )));
            }
        }
        if ck.model.len() != vars.len() {
            let known: std::collections::HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
            let extra: Vec<&String> = ck.model.keys().filter(|k| !known.contains(k.as_str())).collect();
            return Err(Error::Msg(format!(
                "checkpoint {}: holds parameters the model does not train: {extra:?}; {why}",
                path.display()
            )));
        }
        opt.load_state_dict(&ck.optimizer)
            .map_err(|e| Error::Msg(format!("checkpoint {}: {e}", path.display())))?;
        // Extra state first: it may reorder what the trained values are loaded into.
        self.task.load_extra_state(&ck.extra)?;
        for (name, var) in self.task.trainable() {
            let t = ck.model.get(&name).ok_or_else(|| {
                Error::Msg(format!(
                    "checkpoint {}: no tensor for trainable parameter `{name}` once its fitted state \
                     was restored; {why}",
                    path.display()
                ))
            })?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
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
        self.save_keeping(st, opt, self.cfg.keep_last)
    }

    /// [`Self::save`] keeping the latest `keep_last` checkpoints (0: all).
    fn save_keeping(&mut self, st: &LoopState, opt: &AdamW, keep_last: usize) -> Result<PathBuf> {
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
            extra_json: serde_json::json!({ "data": self.data }),
            model,
            optimizer: opt.state_dict()?,
            extra: self.task.extra_state()?,
        };
        let p = save_checkpoint(&self.checkpoint_dir(), &data, keep_last, self.io.as_ref())?;
        tracing::info!(step = st.step, path = %p.display(), "checkpoint saved");
        Ok(p)
    }

    /// Trains on `train`, evaluating on `eval` if given. See the module docs.
    ///
    /// Writes into `cfg.output_dir`: checkpoints (`checkpoints/step-N`, every `save_every` steps
    /// and always at the end), `metrics.jsonl` (appended; a resume first drops the records after
    /// its step) and `loss.svg` (redrawn at every evaluation and checkpoint, and at the end).
    /// Prepare the folder with [`crate::output_dir::prepare_run_dir`],
    /// as `spt-train finetune` does: it refuses a folder of someone else's files and clears an
    /// earlier run's (with `overwrite`), so two runs' metrics never mix. A new run or a fork
    /// into a folder holding checkpoints is refused ([`check_run_folder`]), as is a resume from
    /// a checkpoint with later ones in `checkpoints/` ([`check_no_later`]).
    ///
    /// The first train-loss record after a resume averages the steps since the resume (the
    /// steps before it, of the same logging window, are in no checkpoint); the per-step losses
    /// ([`TrainSummary`]) equal an uninterrupted run's.
    pub fn train(
        &mut self,
        train: &EncodedDataset,
        eval: Option<&EncodedDataset>,
        resume: &Resume,
    ) -> Result<TrainSummary> {
        check_settings(&self.cfg, train)?;
        if eval.is_some_and(|e| e.is_empty()) {
            return Err(Error::Msg(
                "the evaluation set is empty: pass None for no evaluation".into(),
            ));
        }
        std::fs::create_dir_all(&self.cfg.output_dir).map_err(|e| Error::io(&self.cfg.output_dir, e))?;
        let vars_named = self.task.trainable();
        if vars_named.is_empty() {
            return Err(Error::Msg("the task has no trainable parameters".into()));
        }
        let vars: Vec<Var> = vars_named.iter().map(|(_, v)| v.clone()).collect();
        let n_params: usize = vars.iter().map(|v| v.elem_count()).sum();
        let metrics = MetricsWriter::new(self.cfg.output_dir.join("metrics.jsonl"));
        let resume_path = match resume {
            Resume::No => None,
            Resume::Latest => Some(latest_checkpoint(&self.checkpoint_dir())?),
            Resume::From(p) => Some(p.clone()),
        };
        // check_resume put its checkpoint's weights into the task: training afresh would go on
        // from those weights under a new run's step and optimizer state. (Given another
        // checkpoint, as when `Latest` resolves to a newer one now, that one is restored below.)
        if let (Some(r), None) = (&self.restored, &resume_path) {
            return Err(Error::Msg(format!(
                "check_resume restored {}, but train was given no checkpoint: the task holds \
                 that checkpoint's weights; train with the same resume",
                r.path.display()
            )));
        }
        check_run_folder(&self.checkpoint_dir(), resume_path.as_deref())?;
        // What check_resume restored, if it restored this checkpoint; else restore it here.
        let restored = self
            .restored
            .take()
            .filter(|r| Some(&r.path) == resume_path.as_ref());
        let (mut opt, mut st) = match restored {
            Some(r) => (r.opt, r.st),
            None => {
                let mut opt = self.optimizer()?;
                let st = match &resume_path {
                    Some(p) => {
                        // Before the model takes the checkpoint's values: refused, it keeps its own.
                        let done = read_manifest(p)?.step;
                        check_within_run(p, done, self.total_steps(train.len()))?;
                        self.restore(p, &mut opt)?
                    }
                    None => LoopState {
                        step: 0,
                        pos: DataPosition::default(),
                        rng: SplitMix64::new(self.cfg.seed),
                    },
                };
                (opt, st)
            }
        };
        if let Some(p) = &resume_path {
            // (A checkpoint check_resume restored is checked here.)
            check_within_run(p, st.step, self.total_steps(train.len()))?;
        }
        let before = resume_path.as_deref().and_then(DataRecord::of);
        let mut now = DataRecord {
            train: Some(train.fingerprint()),
            validation: eval.map(EncodedDataset::fingerprint),
            held_out: self.data.held_out.take(),
            held_out_mixed: false,
            classes: self.data.classes.take(),
            order: Some(DataOrder::of(&self.cfg)),
        };
        // Held-out rows that changed at a resume (another split, validation file or data) may
        // be rows the steps before it trained on: said in every later checkpoint.
        now.held_out_mixed = before
            .as_ref()
            .is_some_and(|b| b.held_out_mixed || b.held_out != now.held_out);
        if let (Some(p), Some(b)) = (&resume_path, &before) {
            warn_if_rows_changed(p, b, &now);
            let changes = match (&b.order, &now.order) {
                (Some(then), Some(now)) => then.changes(now),
                _ => Vec::new(),
            };
            if !changes.is_empty() {
                tracing::warn!(
                    "{} was trained with another order of the rows ({}): the rest of its epoch \
                     repeats some rows and skips others",
                    p.display(),
                    changes.join(", ")
                );
            }
        }
        self.data = now;
        let mut resumed_from = None;
        if let Some(p) = &resume_path {
            metrics.truncate_after(st.step)?;
            resumed_from = Some(st.step);
            tracing::info!(step = st.step, path = %p.display(), "resumed");
        }

        let bs = self.cfg.batch_size;
        let n_batches = train.len().div_ceil(bs) as u64;
        let mut total = self.total_steps(train.len());
        if self.cfg.max_steps.is_none() && resumed_from.is_some() {
            // The updates left from where the checkpoint stopped reading: a checkpoint made
            // with another grad_accum or batch size (or by a build whose updates spanned epoch
            // ends) would otherwise stop short of the data or past it.
            let from_here = st.step + steps_left(st.pos, n_batches, self.cfg.epochs, self.cfg.grad_accum);
            if from_here != total {
                tracing::warn!(
                    "the checkpoint at step {} was made with another grad_accum or batch size (or by \
                     an older spt-train): the rest of the data makes {} updates, so this run ends at \
                     step {from_here}, not {total}, and the learning-rate schedule runs to there",
                    st.step,
                    from_here - st.step
                );
                total = from_here;
            }
        }
        let sched = LrSchedule {
            base_lr: self.cfg.lr,
            warmup_steps: self.cfg.warmup_steps,
            total_steps: total,
            kind: self.cfg.schedule,
        };
        if sched.warmup_steps >= total && sched.warmup_steps > 0 {
            tracing::warn!(
                "the warmup ({} steps) is as long as the run ({total} steps): the learning rate \
                 never reaches its peak {}",
                sched.warmup_steps,
                sched.base_lr
            );
        }
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
        // A resumed run whose checkpoint step was already evaluated (a finished run resumed, or
        // a save that failed after the evaluation) must not record that evaluation twice, unless
        // the validation rows changed since (warned about above): then it is evaluated again. A
        // checkpoint from before the rows were recorded is taken at its word.
        let same_rows = before
            .as_ref()
            .is_none_or(|b| b.validation.is_none() || b.validation == self.data.validation);
        let recorded_eval = match resumed_from {
            Some(step) if same_rows => metrics
                .read_all()?
                .into_iter()
                .rfind(|r| r.step == step && r.split == "eval"),
            _ => None,
        };
        let mut last_eval = recorded_eval.as_ref().map(|r| r.step);

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
                    // Only a hand-edited manifest can put the epoch at u64::MAX.
                    let epoch = st.pos.epoch.checked_add(1).ok_or_else(|| {
                        Error::Msg(format!(
                            "the data position's epoch {} cannot advance; was the checkpoint's manifest edited?",
                            st.pos.epoch
                        ))
                    })?;
                    st.pos = DataPosition { epoch, batch: 0 };
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
                // An epoch's last update takes what is left of it, as transformers' Trainer
                // does: a step never mixes two epochs' batches.
                if st.pos.batch >= n_batches {
                    break;
                }
            }
            if micro.is_empty() {
                break;
            }
            let n = micro.len();
            // Each micro-batch's mean loss weighs by the items it averages over, so that the
            // step's gradient is that of the mean over all its items (a short last batch does
            // not weigh as much as a full one); transformers weighs by `num_items_in_batch`.
            // (One micro-batch takes its loss as it is: nothing to count.)
            let counts: Vec<f64> = match n {
                1 => vec![1.0],
                _ => micro.iter().map(|b| self.task.loss_count(b)).collect(),
            };
            let total_count: f64 = counts.iter().sum();
            let weights: Vec<f64> = if counts.iter().all(|c| c.is_finite() && *c >= 0.0) && total_count > 0.0
            {
                counts.iter().map(|c| c / total_count).collect()
            } else {
                vec![1.0 / n as f64; n]
            };
            let step_started = Instant::now();
            let step_seed = st.rng.next_u64();
            let lr = sched.lr_at(st.step);
            // On the pool: each op's threads start without waking (spt_ops::on_pool).
            let task = &mut self.task;
            let max_norm = self.cfg.max_grad_norm;
            let step = st.step;
            let done = spt_ops::on_pool(&self.device, || -> Result<Option<(f64, f64)>> {
                let mut acc: Option<GradStore> = None;
                let mut loss_sum = 0f64;
                for (i, batch) in micro.iter().enumerate() {
                    let ctx = StepCtx {
                        step,
                        micro: i,
                        seed: SplitMix64::derive(step_seed, i as u64).next_u64(),
                        train: true,
                    };
                    let loss = task.loss(batch, &ctx)?;
                    if loss.rank() != 0 {
                        return Err(Error::Msg(format!(
                            "TrainTask::loss gave a tensor of shape {:?} at step {} (micro-batch \
                             {i}), expected a scalar (e.g. a mean over the batch)",
                            loss.dims(),
                            step + 1
                        )));
                    }
                    let value = loss.detach().to_dtype(DType::F32)?.to_scalar::<f32>()?;
                    if !value.is_finite() {
                        return Err(Error::Msg(format!(
                            "loss is {value} at step {} (micro-batch {i})",
                            step + 1
                        )));
                    }
                    loss_sum += value as f64 * weights[i];
                    let scaled = if n > 1 { (loss * weights[i])? } else { loss };
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
                let Some(grads) = acc else { return Ok(None) };
                // A loss that does not depend on the trainable variables (detached, or of an
                // integer dtype) would train nothing, silently.
                if !vars.iter().any(|v| grads.get(v.as_tensor()).is_some()) {
                    return Err(Error::Msg(format!(
                        "step {}: no trainable variable received a gradient; the task's loss does not \
                         depend on trainable() (detached, or not a float?)",
                        step + 1
                    )));
                }
                let gnorm = grad_norm(&vars, &grads)?;
                if !gnorm.is_finite() {
                    return Err(Error::Msg(format!(
                        "gradient norm is {gnorm} at step {}",
                        step + 1
                    )));
                }
                // Clipping is applied inside the update (no scaled copy of every gradient).
                opt.step_scaled(&grads, lr, clip_scale(gnorm, max_norm))?;
                drop(grads);
                task.after_step(step + 1)?;
                Ok(Some((loss_sum, gnorm)))
            })?;
            let Some((loss_sum, gnorm)) = done else { break };
            tokens_seen += micro.iter().map(|b| b.n_tokens as u64).sum::<u64>();
            st.step += 1;
            summary.step_times_s.push(step_started.elapsed().as_secs_f64());

            let step_loss = loss_sum as f32;
            summary.train_losses.push((st.step, step_loss));
            window.add(step_loss as f64, 1.0);
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            let tok_s = tokens_seen as f64 / elapsed;
            pb.set_position(st.step);
            pb.set_message(format!("loss {step_loss:.4} lr {lr:.2e} {tok_s:.0} tok/s"));
            let epoch_f = st.pos.epoch as f64 + st.pos.batch as f64 / n_batches.max(1) as f64;
            if self.cfg.log_every > 0 && (st.step.is_multiple_of(self.cfg.log_every) || st.step == total) {
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
                if self.cfg.eval_every > 0 && st.step.is_multiple_of(self.cfg.eval_every) {
                    let rep = self.evaluate_or_save(ev, &st, &opt, last_saved)?;
                    self.record_eval(&metrics, &pb, st.step, epoch_f, &rep)?;
                    summary.evals.push((st.step, rep));
                    last_eval = Some(st.step);
                    self.plot_loss(&metrics, false);
                }
            }
            if self.cfg.save_every > 0 && st.step.is_multiple_of(self.cfg.save_every) {
                summary.last_checkpoint = Some(self.save(&st, &opt)?);
                last_saved = Some(st.step);
                if last_eval != Some(st.step) {
                    self.plot_loss(&metrics, false);
                }
            }
        }
        pb.finish_and_clear();
        summary.steps = st.step;
        if !summary.stopped {
            if let Some(ev) = eval {
                if last_eval == Some(st.step) && summary.evals.is_empty() {
                    // Nothing trained since the checkpoint: its evaluation, as recorded, is
                    // this run's last (the same validation rows; the report's loss and
                    // metrics were written at full precision).
                    if let Some(r) = &recorded_eval {
                        summary.evals.push((r.step, EvalReport::from_record(r, ev.len())));
                    }
                }
                if last_eval != Some(st.step) {
                    let epoch_f = st.pos.epoch as f64 + st.pos.batch as f64 / n_batches.max(1) as f64;
                    let rep = self.evaluate_or_save(ev, &st, &opt, last_saved)?;
                    self.record_eval(&metrics, &pb, st.step, epoch_f, &rep)?;
                    summary.evals.push((st.step, rep));
                }
            }
            if last_saved != Some(st.step) {
                summary.last_checkpoint = Some(self.save(&st, &opt)?);
            }
        }
        self.plot_loss(&metrics, true);
        Ok(summary)
    }

    /// Redraws `loss.svg` from `metrics.jsonl`: at every evaluation and checkpoint, so that a
    /// long run can be watched (and a run that fails later keeps its curve), and at the end. A
    /// plot that cannot be drawn is not an error; it is said once, at the end.
    fn plot_loss(&self, metrics: &MetricsWriter, warn: bool) {
        let svg = self.cfg.output_dir.join("loss.svg");
        if let Err(e) = crate::metrics::plot_metrics_file(metrics.path(), &svg) {
            if warn {
                // An earlier redraw's plot stays (it is this run's, up to that step).
                let stale = if svg.exists() {
                    format!("; {} shows an earlier step", svg.display())
                } else {
                    String::new()
                };
                tracing::warn!("loss plot not written: {e}{stale}");
            }
        }
    }

    /// [`Trainer::evaluate`] in the loop: when it fails (non-finite outputs), the step is saved
    /// first, unless it already was, so the run ends with its last state on disk. Nothing is
    /// pruned then: the checkpoints before it may be the last good ones.
    fn evaluate_or_save(
        &mut self,
        ev: &EncodedDataset,
        st: &LoopState,
        opt: &AdamW,
        last_saved: Option<u64>,
    ) -> Result<EvalReport> {
        match self.evaluate(ev) {
            Ok(rep) => Ok(rep),
            Err(e) if last_saved != Some(st.step) => match self.save_keeping(st, opt, 0) {
                Ok(p) => Err(Error::Msg(format!(
                    "{e} (step {} saved to {}; earlier checkpoints kept)",
                    st.step,
                    p.display()
                ))),
                Err(s) => Err(Error::Msg(format!(
                    "{e}; saving step {} failed too: {s}",
                    st.step
                ))),
            },
            Err(e) => Err(e),
        }
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

/// The settings that depend on the training data, checked before anything is written (the
/// CLI calls it before making the run directory; [`Trainer::train`] again).
pub fn check_settings(c: &TrainerConfig, train: &EncodedDataset) -> Result<()> {
    for (name, n) in [
        ("batch_size", c.batch_size),
        ("eval_batch_size", c.eval_batch_size),
    ] {
        if n == 0 {
            return Err(Error::Msg(format!("{name} must be at least 1, got 0")));
        }
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
    c.adamw.check()?;
    if !(c.max_grad_norm.is_finite() && c.max_grad_norm >= 0.0) {
        return Err(Error::Msg(format!(
            "max_grad_norm = {}: expected a finite value ≥ 0 (0 turns clipping off)",
            c.max_grad_norm
        )));
    }
    if let Some((module, scale)) = c.lr_scales.iter().find(|(_, s)| !(s.is_finite() && *s >= 0.0)) {
        return Err(Error::Msg(format!(
            "lr scale {scale} for `{module}`: expected a finite value ≥ 0"
        )));
    }
    if c.max_steps.is_none() && c.epochs == 0 {
        return Err(Error::Msg("set epochs ≥ 1 or max_steps".into()));
    }
    // No update, yet a checkpoint and an evaluation as if the run had finished.
    if c.max_steps == Some(0) {
        return Err(Error::Msg("max_steps must be at least 1, got 0".into()));
    }
    // A step never takes more than an epoch: more micro-batches than an epoch has would
    // silently be an epoch per step.
    let n_batches = train.len().div_ceil(c.batch_size) as u64;
    if c.grad_accum as u64 > n_batches {
        return Err(Error::Msg(format!(
            "grad_accum = {} micro-batches per step, but an epoch of the training data has {n_batches} \
             ({} examples in batches of {}): use at most {n_batches}",
            c.grad_accum,
            train.len(),
            c.batch_size
        )));
    }
    if c.max_steps.is_none() && c.epochs.checked_mul(n_batches).is_none() {
        return Err(Error::Msg(format!(
            "epochs = {} is too large: {} batches per epoch would overflow the step count",
            c.epochs, n_batches
        )));
    }
    Ok(())
}

/// A resume on other rows than the checkpoint's run trained on goes on (the user may mean it),
/// but says so: the data position and the shuffle order refer to the old rows.
fn warn_if_rows_changed(checkpoint: &Path, then: &DataRecord, now: &DataRecord) {
    for (which, then, now) in [
        ("train", &then.train, &now.train),
        ("validation", &then.validation, &now.validation),
    ] {
        let Some(then) = then else {
            continue;
        };
        if now.as_ref() != Some(then) {
            let now = now.as_ref().map_or("none".to_string(), |c| {
                format!("{} rows, checksum {}", c.rows, c.fnv1a64)
            });
            tracing::warn!(
                "the {which} rows differ from those {} was trained with ({} rows, checksum {}; now {now}): \
                 {}",
                checkpoint.display(),
                then.rows,
                then.fnv1a64,
                if which == "train" {
                    "the data position and shuffle order it resumes refer to the old rows"
                } else {
                    "evaluations before and after the resume are not comparable"
                }
            );
        }
    }
}

/// Refuses to train into a checkpoint folder `dir` that holds another run's checkpoints: a new
/// run (`resume` None) or a fork (resuming a checkpoint of another folder) would put its
/// checkpoints beside them, take the newest of either for its latest, and prune the other run's
/// with its own (`keep_last`). Resuming a checkpoint of `dir` itself is [`check_no_later`]'s.
/// [`crate::output_dir::prepare_run_dir`] with `overwrite` clears an earlier run of the tool's.
pub fn check_run_folder(dir: &Path, resume: Option<&Path>) -> Result<()> {
    let held = list_checkpoints(dir)?;
    if held.is_empty() {
        return Ok(());
    }
    let real = |d: &Path| d.canonicalize().ok();
    // Absolute first: a checkpoint named from inside checkpoints/ has the parent "".
    let parent = |p: &Path| std::path::absolute(p).ok()?.parent().and_then(real);
    let what = match resume {
        Some(p) if parent(p).is_some_and(|d| Some(d) == real(dir)) => {
            return check_no_later(dir, p);
        }
        Some(p) => format!("resuming {} into another folder (a fork)", p.display()),
        None => "a new run".to_string(),
    };
    let names: Vec<String> = held
        .iter()
        .map(|(_, p)| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
        .collect();
    Err(Error::Msg(format!(
        "{what}: {} holds another run's checkpoints ({}); its checkpoints would mix with them \
         and prune them: train into a new or empty output folder, or resume that run",
        dir.display(),
        names.join(", ")
    )))
}

/// Refuses to resume from `checkpoint` while the run's checkpoint folder `dir` holds later
/// ones: the run would go on from the earlier step and leave the later ones of the abandoned
/// run in place, the newest of them taken for the run's latest (`Resume::Latest`). Remove them
/// first ([`crate::checkpoint::remove_checkpoints`]) or train into another output folder. (It
/// compares steps only: a fork into a folder of another run is [`check_run_folder`]'s.)
pub fn check_no_later(dir: &Path, checkpoint: &Path) -> Result<()> {
    let step = checkpoint_step(checkpoint)?;
    let later = checkpoints_after(dir, step)?;
    if !later.is_empty() {
        return Err(Error::Msg(format!(
            "resuming from {} (step {step}): {} holds later checkpoints ({}); continuing would mix \
             two runs: remove them first, or train into another output folder",
            checkpoint.display(),
            dir.display(),
            later.join(", ")
        )));
    }
    Ok(())
}

/// Refuses a resumed checkpoint past the run's last step: continuing would train nothing while
/// recording a shorter run than its checkpoints hold (fewer `--max-steps` or `--epochs` than
/// when it was written).
pub fn check_within_run(checkpoint: &Path, done: u64, total: u64) -> Result<()> {
    if done > total {
        return Err(Error::Msg(format!(
            "checkpoint {} is at step {done}, past this run's last step ({total}): give at least \
             {done} steps (max_steps or epochs; spt-train's --max-steps or --epochs) to continue it, or \
             resume an earlier checkpoint",
            checkpoint.display()
        )));
    }
    Ok(())
}
