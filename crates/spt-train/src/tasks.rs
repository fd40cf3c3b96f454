//! The models of spt-models as [`TrainTask`]s: `BertForSequenceClassification` (classify) and
//! `GPT2LMHeadModel` (lm), in dense, LoRA or SPT mode.
//!
//! The three modes share one code path and differ only in how the model is prepared:
//! - `dense`: every weight is a trainable `Var`;
//! - `lora`: the base is frozen, LoRA adapters wrap q, k, v, o, fc1, fc2, the (new) head trains;
//! - `spt`: as `lora`, plus sparse attention (PQ codebooks fitted on calibration batches drawn,
//!   seeded, from the training data) and a routed FFN (router fitted on the same tokens), via
//!   [`spt_models::sparsify()`]. The codebooks refresh every `pq_refresh_every` steps and are
//!   checkpointed through [`TrainTask::extra_state`].
//!
//! Dropout is seeded from [`StepCtx::seed`], so a resumed run repeats the same masks.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use spt_models::pq::{KeyTopK, PqConfig, Refresh};
use spt_models::routed_ffn::{BlockTopK, RoutedFfnConfig, RouterFitConfig};
use spt_models::{
    sparsify, ActivationAccounting, AttentionCore, BertConfig, BertForSequenceClassification,
    CalibrationBatch, FfnCalibration, GPT2Config, GPT2LMHeadModel, KeyGrouping, LoadOptions, LoraSettings,
    LoraTarget, NamedParams, SparseAttentionConfig, SparsifyReport, SptConfig, SptModel, Trainable,
    WeightSource,
};

use crate::config::{FfnUnits, FinetuneConfig, Mode};
use crate::data::{Batch, EncodedDataset, LabelMap, TaskKind};
use crate::losses::{classification_eval, classification_loss};
use crate::rng::SplitMix64;
use crate::trainer::{EvalOutput, StepCtx, TrainTask};
use crate::{Error, Result};

/// The model behind a task.
pub enum Net {
    Classifier(Box<BertForSequenceClassification>),
    Lm(Box<GPT2LMHeadModel>),
}

impl Net {
    fn spt(&mut self) -> &mut dyn SptModel {
        match self {
            Net::Classifier(m) => m.as_mut(),
            Net::Lm(m) => m.as_mut(),
        }
    }

    pub(crate) fn params(&self) -> &dyn NamedParams {
        match self {
            Net::Classifier(m) => m.as_ref(),
            Net::Lm(m) => m.as_ref(),
        }
    }

    fn seed_dropout(&self, seed: u64) {
        match self {
            Net::Classifier(m) => m.seed_dropout(seed),
            Net::Lm(m) => m.seed_dropout(seed),
        }
    }

    /// Logits: `[B, C]` (classify) or `[B, L, V]` (lm).
    pub fn forward(&self, batch: &Batch, train: bool) -> candle_core::Result<Tensor> {
        Ok(match self {
            Net::Classifier(m) => m.forward_t(
                &batch.input_ids,
                Some(&batch.token_type_ids),
                Some(&batch.attention_mask),
                train,
            )?,
            Net::Lm(m) => m.forward_t(&batch.input_ids, Some(&batch.attention_mask), train)?,
        })
    }

    /// A classifier's class probabilities of every item of `batch`, read to the host: the
    /// forward (inference) and the softmax, on rayon's pool ([`spt_ops::on_pool`]), as `spt-train
    /// predict` runs them.
    pub fn probabilities(&self, batch: &Batch) -> candle_core::Result<Vec<Vec<f32>>> {
        spt_ops::on_pool(batch.input_ids.device(), || {
            candle_nn::ops::softmax_last_dim(&self.forward(batch, false)?)?.to_vec2::<f32>()
        })
    }

    /// The number of transformer layers.
    pub fn num_layers(&mut self) -> usize {
        self.spt().num_layers()
    }

    /// Freezes the model for inference, where a trainable weight makes every op keep its inputs
    /// for a backward that never runs: the parameters (weights, head, pooler), and the LoRA
    /// factors and routers that spt-ops' layers hold as their own `Var`s. The forward then frees
    /// its activations as it goes (dense MiniLM, batch 32: peak RSS 697 → 247 MiB).
    pub fn freeze(&mut self) -> candle_core::Result<()> {
        let frozen = |_: &str| false;
        let err = |e: spt_models::ModelError| candle_core::Error::Msg(e.to_string());
        match self {
            Net::Classifier(m) => m.set_trainable(&frozen),
            Net::Lm(m) => m.set_trainable(&frozen),
        }
        .map_err(err)?;
        self.spt().freeze_adapters().map_err(err)?;
        Ok(())
    }
}

/// Parameter counts of a prepared model.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ParamSummary {
    /// Scalars in every parameter (base weights, head, adapters, routers).
    pub total: usize,
    /// Scalars that train.
    pub trainable: usize,
    /// Canonical names of weights not in the checkpoint that were initialised (new heads).
    pub initialised: Vec<String>,
}

impl std::fmt::Display for ParamSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "parameters: {} trainable of {} ({:.2}%)",
            self.trainable,
            self.total,
            100.0 * self.trainable as f64 / self.total.max(1) as f64
        )?;
        if !self.initialised.is_empty() {
            write!(f, "; newly initialised: {}", self.initialised.join(", "))?;
        }
        Ok(())
    }
}

impl ParamSummary {
    /// Bytes that training holds however small the batch: f32 weights, and a gradient and
    /// AdamW's two moments per trainable scalar.
    pub fn training_bytes(&self) -> u128 {
        4 * self.total as u128 + 12 * self.trainable as u128
    }

    /// Refuses training that cannot fit in `physical` bytes of memory, before anything is
    /// written: the process would otherwise be killed mid-run. `batch` is what one micro-batch's
    /// backward keeps (see [`BatchActivations`]); its bytes are a lower bound, as the rest.
    pub fn check_fits(&self, physical: Option<u64>, batch: Option<BatchActivations>) -> Result<()> {
        let Some(physical) = physical else {
            return Ok(());
        };
        let act = batch.map_or(0, |b| b.bytes);
        let need = self.training_bytes().saturating_add(act);
        if need <= physical as u128 {
            return Ok(());
        }
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        let (acts, advice) = match batch {
            Some(b) if act > 0 => (
                format!(
                    ", and {:.1} GiB of activations for a batch of {} × {} tokens",
                    gib(act),
                    b.batch,
                    b.seq_len
                ),
                if act >= self.training_bytes() {
                    "use a smaller batch or shorter sequences"
                } else {
                    "train fewer parameters (--mode lora or spt) or use a smaller model"
                },
            ),
            _ => (
                String::new(),
                "train fewer parameters (--mode lora or spt) or use a smaller model",
            ),
        };
        Err(Error::Msg(format!(
            "training needs at least {:.1} GiB for the weights ({} parameters) and the gradients \
             and AdamW state of the {} trainable ones{acts}, more than this machine's {:.1} GiB: \
             {advice}",
            gib(need),
            self.total,
            self.trainable,
            gib(physical as u128)
        )))
    }
}

/// The activations one micro-batch of `batch` sequences of `seq_len` tokens keeps for its
/// backward ([`ModelTask::batch_activations`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchActivations {
    pub batch: usize,
    pub seq_len: usize,
    pub bytes: u128,
}

/// A model + loss for the trainer, in one of the three modes.
pub struct ModelTask {
    pub net: Net,
    pub mode: Mode,
    pub summary: ParamSummary,
    /// What `sparsify` did (spt mode).
    pub sparsify_report: Option<SparsifyReport>,
    /// Batches the codebook refresh cycles through (spt mode).
    calibration: Vec<CalibrationBatch>,
    refresh_every: u64,
    /// Keys per query of the sparse layers and their grouping (to rebuild them from saved
    /// codebooks).
    attn_top_k: Option<KeyTopK>,
    attn_grouping: KeyGrouping,
    vars: Vec<(String, Var)>,
    /// Weight of the routers' load-balancing loss in the training loss (0: off).
    router_aux_weight: f64,
}

/// How many PQ subspaces: the setting, else the largest divisor of the head dimension ≤ 8.
fn pq_subspaces(cfg: &FinetuneConfig, head_dim: usize) -> usize {
    cfg.pq_subspaces.unwrap_or_else(|| {
        (1..=8.min(head_dim))
            .rev()
            .find(|s| head_dim.is_multiple_of(*s))
            .unwrap_or(1)
    })
}

/// Per-query selection, or block mode with `attn_tile`-token tiles.
pub fn key_grouping(cfg: &FinetuneConfig) -> KeyGrouping {
    match cfg.attn_tile {
        Some(tile) => KeyGrouping::Blocks { tile },
        None => KeyGrouping::PerQuery,
    }
}

/// The sparse-attention top-k of the settings (default: a quarter of the keys), which
/// [`FinetuneConfig::validate_model`] has checked.
pub fn attention_top_k(cfg: &FinetuneConfig) -> KeyTopK {
    match (cfg.attn_k, cfg.attn_k_fraction) {
        (Some(k), _) => KeyTopK::Count(k),
        (None, Some(f)) => KeyTopK::Fraction(f),
        (None, None) => KeyTopK::Fraction(0.25),
    }
}

/// The `SptConfig` of a mode. `fit` = fit codebooks and routers on calibration batches (a new
/// run); without it (restoring a checkpoint) attention stays dense here and the saved codebooks
/// are installed afterwards.
fn spt_config(cfg: &FinetuneConfig, head_dim: usize, fit: bool) -> Result<Option<SptConfig>> {
    if cfg.mode == Mode::Dense {
        return Ok(None);
    }
    cfg.validate_model()?;
    // Rank 0 (spt only): no adapters; every weight trains through the sparse layers.
    let lora = (cfg.lora_rank > 0).then(|| LoraSettings {
        targets: vec![
            LoraTarget::Query,
            LoraTarget::Key,
            LoraTarget::Value,
            LoraTarget::Output,
            LoraTarget::Fc1,
            LoraTarget::Fc2,
        ],
        config: spt_models::lora::LoraConfig {
            rank: cfg.lora_rank,
            alpha: cfg.lora_alpha,
            dropout: cfg.lora_dropout as f32,
            seed: cfg.seed,
        },
    });
    let mut sc = SptConfig {
        lora,
        ..SptConfig::default()
    };
    if cfg.mode == Mode::Spt {
        let top_k = attention_top_k(cfg);
        // Keeping every key is dense attention (the fused kernel): no codebook to fit, refresh
        // or save.
        let every_key = matches!(top_k, KeyTopK::Fraction(f) if f >= 1.0);
        if fit && !every_key {
            sc.attention = Some(SparseAttentionConfig {
                pq: PqConfig {
                    n_subspaces: pq_subspaces(cfg, head_dim),
                    n_codewords: cfg.pq_codewords.unwrap_or(16),
                    seed: cfg.seed,
                    ..PqConfig::default()
                },
                top_k,
                grouping: key_grouping(cfg),
            });
        }
        sc.ffn = Some(RoutedFfnConfig {
            seed: cfg.seed,
            aux_loss: cfg.router_aux_weight > 0.0,
            correction: cfg.ffn_correction,
            ..RoutedFfnConfig::new(cfg.ffn_blocks, BlockTopK::Count(cfg.ffn_top_k))
        });
        sc.ffn_calibration = FfnCalibration {
            router_fit: fit.then(RouterFitConfig::default),
            // Regrouping permutes frozen weights only: with every weight training there is
            // no fixed activation pattern to group by either.
            cluster_units: fit && cfg.ffn_units == FfnUnits::Clustered && cfg.lora_rank > 0,
        };
    }
    Ok(Some(sc))
}

/// Whether parameter `name` lies in a module called `module` (a dotted path, matched whole
/// segments at any depth): `bert.pooler.dense.weight` is in `pooler` and in `bert.pooler`.
fn in_module(name: &str, module: &str) -> bool {
    let module = module.trim_matches('.');
    !module.is_empty() && (name.starts_with(&format!("{module}.")) || name.contains(&format!(".{module}.")))
}

/// `n` calibration batches of `batch_size` items drawn (seeded) from `data`.
pub fn calibration_batches(
    data: &EncodedDataset,
    n: usize,
    batch_size: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<CalibrationBatch>> {
    if data.is_empty() || n == 0 || batch_size == 0 {
        return Ok(Vec::new());
    }
    let mut idx: Vec<usize> = (0..data.len()).collect();
    SplitMix64::derive(seed, 0xCA11_B4A7).shuffle(&mut idx);
    idx.chunks(batch_size)
        .take(n)
        .map(|c| {
            let b = data.batch(c, device)?;
            Ok(CalibrationBatch {
                input_ids: b.input_ids,
                attention_mask: Some(b.attention_mask),
                token_type_ids: (data.task == TaskKind::Classify).then_some(b.token_type_ids),
            })
        })
        .collect()
}

/// The data's label count against a classifier head that the checkpoint already has, so the
/// mismatch is named as such (not as a tensor shape) with the ways out.
fn check_classifier_size(src: &WeightSource, num_labels: Option<usize>, config_path: &Path) -> Result<()> {
    let (Some(n), Some(w)) = (num_labels, src.get("classifier.weight")) else {
        return Ok(());
    };
    let m = w.dim(0)?;
    if m == n {
        return Ok(());
    }
    let dir = config_path.parent().unwrap_or(Path::new("."));
    // Reached from fine-tuning (the data's labels) and from eval and predict (a label map, or
    // the model's id2label): the ways out of each are named.
    Err(Error::Msg(format!(
        "{n} labels against a classifier of {m} classes in {}: to fine-tune, give the data the \
         model's {m} labels (--drop-label for extra ones, --label-map for their order), or start \
         from a model without a classification head (a new head is initialised for the data's \
         labels); to evaluate or predict, give a --label-map of its {m} classes",
        dir.display()
    )))
}

impl ModelTask {
    /// Bytes of activations a training micro-batch of `batch × seq_len` tokens keeps for its
    /// backward, by spt-models' accounting (a lower bound; a size too large to count saturates).
    pub fn batch_activations(&self, batch: usize, seq_len: usize) -> BatchActivations {
        let layers = match &self.net {
            Net::Classifier(m) => m.activation_bytes_per_layer(batch, seq_len, true),
            Net::Lm(m) => m.activation_bytes_per_layer(batch, seq_len, true),
        };
        BatchActivations {
            batch,
            seq_len,
            bytes: layers.iter().map(|l| l.total() as u128).sum(),
        }
    }

    /// Loads the model in `model_dir` and prepares it for `cfg.mode`. `calibration` batches fit
    /// the PQ codebooks and routers (spt); pass none when the state comes from a checkpoint.
    pub fn build(
        cfg: &FinetuneConfig,
        model_dir: &Path,
        num_labels: Option<usize>,
        device: &Device,
        calibration: Vec<CalibrationBatch>,
    ) -> Result<Self> {
        let config_path = model_dir.join("config.json");
        let src = if cfg.random_init {
            if cfg.task != TaskKind::Lm {
                return Err(Error::Msg(
                    "--random-init is only available for GPT-2 (--task lm)".into(),
                ));
            }
            crate::bench::random_gpt2_weights(&config_path, cfg.seed, device)?
        } else {
            WeightSource::from_dir(model_dir)?
        };
        Self::build_from_source(cfg, &config_path, &src, num_labels, device, calibration)
    }

    /// As [`ModelTask::build`], with the weights given (e.g. random ones for benchmarks).
    pub fn build_from_source(
        cfg: &FinetuneConfig,
        config_path: &Path,
        src: &WeightSource,
        num_labels: Option<usize>,
        device: &Device,
        calibration: Vec<CalibrationBatch>,
    ) -> Result<Self> {
        let fit = !calibration.is_empty();
        // Besides LoRA and routers (added by sparsify): the head and --modules-to-save.
        let saved = cfg.modules_to_save.clone();
        let head_or_saved =
            move |n: &str| n.starts_with("classifier.") || saved.iter().any(|m| in_module(n, m));
        let trainable = match cfg.mode {
            Mode::Dense => Trainable::All,
            Mode::Spt if cfg.lora_rank == 0 => Trainable::All,
            Mode::Lora | Mode::Spt => Trainable::only(head_or_saved.clone()),
        };
        let opts = LoadOptions {
            dtype: DType::F32,
            device: device.clone(),
            trainable,
            init_seed: cfg.seed,
        };
        let (mut net, report, head_dim) = match cfg.task {
            TaskKind::Classify => {
                let c = BertConfig::from_file(config_path)?;
                check_classifier_size(src, num_labels, config_path)?;
                let (m, r) = BertForSequenceClassification::load(&c, src, &opts, num_labels)?;
                (Net::Classifier(Box::new(m)), r, c.head_dim())
            }
            TaskKind::Lm => {
                let c = GPT2Config::from_file(config_path)?;
                let (m, r) = GPT2LMHeadModel::load(&c, src, &opts)?;
                (Net::Lm(Box::new(m)), r, c.head_dim())
            }
        };
        // Tensors the model leaves unused are most often a head it does not have (an MLM head),
        // but may be layers that config.json does not count: named, as transformers does.
        if !report.unused.is_empty() {
            let shown: Vec<&str> = report.unused.iter().take(6).map(String::as_str).collect();
            tracing::warn!(
                "{}: {} tensor(s) of the checkpoint are not used by the model that {} describes \
                 ({}{}): expected for a head this task does not have; otherwise check the config",
                src.origin()
                    .map_or("the weights".into(), |p| p.display().to_string()),
                report.unused.len(),
                config_path.display(),
                shown.join(", "),
                if report.unused.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            );
        }
        // A newly initialised head (and pooler) must train in every mode; where every weight
        // trains (dense, and spt without adapters) it already does.
        let trains_all = cfg.mode == Mode::Dense || (cfg.mode == Mode::Spt && cfg.lora_rank == 0);
        if !trains_all && !report.initialised.is_empty() {
            let init = report.initialised.clone();
            let pred = |n: &str| init.iter().any(|i| i == n) || head_or_saved(n);
            match &mut net {
                Net::Classifier(m) => m.set_trainable(&pred)?,
                Net::Lm(m) => m.set_trainable(&pred)?,
            }
        }
        let mut sparsify_report = None;
        if let Some(sc) = spt_config(cfg, head_dim, fit)? {
            let calib = if fit && cfg.mode == Mode::Spt {
                &calibration[..]
            } else {
                &[]
            };
            sparsify_report = Some(sparsify(net.spt(), &sc, calib)?);
        }
        let mut summary = ParamSummary {
            initialised: report.initialised,
            ..ParamSummary::default()
        };
        net.params().visit_params(&mut |p| {
            summary.total += p.tensor().elem_count();
            if p.is_trainable() {
                summary.trainable += p.tensor().elem_count();
            }
        });
        let vars = net.params().named_vars();
        if cfg.mode != Mode::Dense {
            if let Some(m) = cfg
                .modules_to_save
                .iter()
                .find(|m| !vars.iter().any(|(n, _)| in_module(n, m)))
            {
                return Err(Error::Msg(format!(
                    "--modules-to-save: no parameter of the model is in a module named `{m}`"
                )));
            }
        }
        let attn_top_k = match cfg.mode {
            Mode::Spt => Some(attention_top_k(cfg)),
            _ => None,
        };
        Ok(Self {
            net,
            mode: cfg.mode,
            summary,
            sparsify_report: sparsify_report.filter(|_| cfg.mode == Mode::Spt),
            calibration: if cfg.mode == Mode::Spt {
                calibration
            } else {
                Vec::new()
            },
            refresh_every: cfg.pq_refresh_every,
            attn_top_k,
            attn_grouping: key_grouping(cfg),
            vars,
            router_aux_weight: cfg.router_aux_weight,
        })
    }

    /// Loads trained values (and codebooks) from a checkpoint's tensors. Every tensor is checked
    /// before any is applied: a refused checkpoint leaves the model as it was.
    pub fn load_trained(
        &mut self,
        model: &HashMap<String, Tensor>,
        extra: &HashMap<String, Tensor>,
    ) -> Result<()> {
        for (name, var) in &self.vars {
            let t = model.get(name).ok_or_else(|| {
                Error::Msg(format!(
                    "the checkpoint has no tensor `{name}`, which the {:?} model trains: it was made \
                     in another mode or from another model (its run's finetune.toml says which)",
                    self.mode
                ))
            })?;
            if t.dims() != var.dims() {
                // The head's size comes from the label map: say so rather than only the shapes.
                let head = match (name.starts_with("classifier."), t.dims().first()) {
                    (true, Some(classes)) => format!(
                        ": the checkpoint's classifier has {classes} classes, the label map gives {}; \
                         use the run's own labels.json",
                        var.dims()[0]
                    ),
                    _ => String::new(),
                };
                return Err(Error::Msg(format!(
                    "checkpoint tensor `{name}` has shape {:?}, the model expects {:?}{head}",
                    t.dims(),
                    var.dims()
                )));
            }
        }
        // A tensor nobody reads means the checkpoint is not this model's: applying the rest
        // would silently give another model.
        if model.len() != self.vars.len() {
            let known: std::collections::HashSet<&str> = self.vars.iter().map(|(n, _)| n.as_str()).collect();
            let mut extra: Vec<&String> = model.keys().filter(|k| !known.contains(k.as_str())).collect();
            extra.sort();
            return Err(Error::Msg(format!(
                "the checkpoint holds tensors the {:?} model does not train: {extra:?}; it was made \
                 in another mode or from another model (its run's finetune.toml says which)",
                self.mode
            )));
        }
        // Unit orders first: the saved LoRA factors are in the saved order. (load_buffers checks
        // every buffer before it applies one.)
        self.load_extra_state(extra)?;
        for (name, var) in &self.vars {
            var.set(&model[name].to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Folds every LoRA adapter into its weights (for export or faster inference); see
    /// [`SptModel::merge_lora`].
    pub fn merge_lora(&mut self) -> Result<()> {
        self.net.spt().merge_lora()?;
        Ok(())
    }

    /// The weights under their Hugging Face names, without adapters or routers (call
    /// [`ModelTask::merge_lora`] first).
    pub fn hf_tensors(&self) -> Vec<(String, Tensor)> {
        self.net
            .params()
            .named_tensors()
            .into_iter()
            .filter(|(n, _)| !n.contains(".lora_A.") && !n.contains(".lora_B.") && !n.contains(".router."))
            .collect()
    }

    /// The number of sparse-attention layers.
    pub fn sparse_layers(&mut self) -> usize {
        let m = self.net.spt();
        (0..m.num_layers())
            .filter(|&i| {
                m.layer_slots(i)
                    .is_some_and(|s| matches!(s.attention, AttentionCore::Sparse(_)))
            })
            .count()
    }
}

impl TrainTask for ModelTask {
    fn loss(&mut self, batch: &Batch, ctx: &StepCtx) -> candle_core::Result<Tensor> {
        if ctx.train {
            self.net.seed_dropout(ctx.seed);
        }
        let loss = match &self.net {
            Net::Classifier(_) => classification_loss(&self.net.forward(batch, ctx.train)?, batch)?,
            // Fused head + loss: the [B, L, vocab] logits are never kept (see spt_ops::cross_entropy).
            Net::Lm(m) => m.forward_loss(&batch.input_ids, Some(&batch.attention_mask), ctx.train)?,
        };
        // Only training forwards with the weight on store a balancing loss (aux_loss is set from it).
        if !(ctx.train && self.router_aux_weight > 0.0) {
            return Ok(loss);
        }
        match self.net.spt().take_router_aux_loss()? {
            Some(aux) => loss + (aux * self.router_aux_weight)?,
            None => Ok(loss),
        }
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }

    fn eval_batch(&mut self, batch: &Batch) -> candle_core::Result<EvalOutput> {
        match &self.net {
            Net::Classifier(_) => classification_eval(&self.net.forward(batch, false)?, batch),
            Net::Lm(m) => {
                let (loss_sum, count) = m.nll_sum(&batch.input_ids, Some(&batch.attention_mask))?;
                Ok(EvalOutput {
                    loss_sum,
                    count: count as f64,
                    predictions: None,
                })
            }
        }
    }

    fn extra_state(&mut self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        Ok(self.net.spt().named_buffers()?.into_iter().collect())
    }

    fn load_extra_state(&mut self, state: &HashMap<String, Tensor>) -> candle_core::Result<()> {
        let buffers: Vec<(String, Tensor)> = state.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        let attention = self.attn_top_k.map(|k| (k, self.attn_grouping));
        self.net
            .spt()
            .load_buffers(&buffers, attention)
            .map_err(|e| candle_core::Error::Msg(format!("restoring the checkpoint's fitted state: {e}")))?;
        Ok(())
    }

    fn after_step(&mut self, step: u64) -> candle_core::Result<()> {
        if self.refresh_every == 0
            || self.calibration.is_empty()
            || !step.is_multiple_of(self.refresh_every)
            || self.sparse_layers() == 0
        {
            return Ok(());
        }
        let i = ((step / self.refresh_every) as usize) % self.calibration.len();
        let batch = self.calibration[i].clone();
        let n = self
            .net
            .spt()
            .refresh_codebooks(&batch, Refresh::Ema { decay: 0.9 })?;
        tracing::debug!(step, layers = n, "PQ codebooks refreshed");
        Ok(())
    }
}

/// The tokenizer and generation files an export copies from the model directory.
pub(crate) const EXPORT_COPIED: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
];

/// Where each file that an export copies comes from: the tokenizer files from `tokenizer` when
/// given (a directory, or a `tokenizer.json` file), else from `model_dir`; `generation_config.json`
/// from `model_dir`. Only files that exist.
fn export_sources(model_dir: &Path, tokenizer: Option<&Path>) -> Vec<(&'static str, PathBuf)> {
    EXPORT_COPIED
        .iter()
        .filter_map(|&f| {
            let src = match tokenizer {
                Some(t) if f != "generation_config.json" => match (t.is_dir(), f) {
                    (true, _) => t.join(f),
                    (false, "tokenizer.json") => t.to_path_buf(),
                    // Its settings applied over that file in training (tokenize.rs): kept with it.
                    (false, "tokenizer_config.json") => t.parent()?.join(f),
                    (false, _) => return None,
                },
                _ => model_dir.join(f),
            };
            src.is_file().then_some((f, src))
        })
        .collect()
}

/// The files [`export_hf_dir`] writes for a model in `model_dir` (tokenizer files from
/// `tokenizer` when given).
pub fn export_files(model_dir: &Path, tokenizer: Option<&Path>) -> Vec<String> {
    let mut v = vec!["config.json".to_string(), "model.safetensors".to_string()];
    v.extend(
        export_sources(model_dir, tokenizer)
            .into_iter()
            .map(|(f, _)| f.to_string()),
    );
    v.sort();
    v
}

/// Writes `task` as a Hugging Face model directory `out`: LoRA merged, `model.safetensors` with
/// HF key names (no adapters, routers or codebooks), `config.json` (with the label mapping for a
/// classifier) and the tokenizer files of `tokenizer` (a directory or a tokenizer.json file), else
/// of `model_dir`. Built in a temporary sibling directory and
/// moved in by [`crate::output_dir::install_export`], so no file is half-written and files that
/// spt-train did not write are never replaced (an earlier export needs `overwrite`).
pub fn export_hf_dir(
    task: &mut ModelTask,
    model_dir: &Path,
    tokenizer: Option<&Path>,
    labels: Option<&LabelMap>,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    let files = export_files(model_dir, tokenizer);
    crate::output_dir::check_export_dir(out, &files, overwrite)?;
    task.merge_lora()?;
    let tensors: HashMap<String, Tensor> = task
        .hf_tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    write_export_dir(out, &files, overwrite, |tmp| {
        spt_models::save_tensors(&tensors, tmp.join("model.safetensors"))?;
        let cfg_path = model_dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let text = crate::data::strip_bom(&text);
        let mut cfg: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Msg(format!("{}: {e}", cfg_path.display())))?;
        // Class names belong to a classifier's config; a language model keeps its own.
        let labels = labels.filter(|_| matches!(task.net, Net::Classifier(_)));
        if let (Some(obj), Some(l)) = (cfg.as_object_mut(), labels) {
            let name = |i: usize| l.label(i as u32).unwrap_or_default().to_string();
            let id2label: serde_json::Map<String, serde_json::Value> =
                (0..l.len()).map(|i| (i.to_string(), name(i).into())).collect();
            let label2id: serde_json::Map<String, serde_json::Value> =
                (0..l.len()).map(|i| (name(i), i.into())).collect();
            obj.insert("id2label".into(), id2label.into());
            obj.insert("label2id".into(), label2id.into());
            obj.insert(
                "architectures".into(),
                serde_json::json!(["BertForSequenceClassification"]),
            );
        }
        let cfg_text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
        let dst = tmp.join("config.json");
        std::fs::write(&dst, cfg_text).map_err(|e| Error::io(&dst, e))?;
        for (f, src) in export_sources(model_dir, tokenizer) {
            let dst = tmp.join(f);
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            // Without a byte-order mark, which spt-train skips and Hugging Face's loaders refuse.
            let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            std::fs::write(&dst, bytes).map_err(|e| Error::io(&dst, e))?;
        }
        Ok(())
    })
}

/// Writes an export directory `out` that will hold `files`: `write` fills a temporary sibling
/// directory, which [`crate::output_dir::install_export`] then moves in, so no file is
/// half-written and files that spt-train did not write are never replaced.
pub(crate) fn write_export_dir(
    out: &Path,
    files: &[String],
    overwrite: bool,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Msg(format!("{}: not a directory name", out.display())))?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    crate::output_dir::remove_stale_export_staging(parent, &name, files)?;
    let tmp = crate::output_dir::export_staging(parent, &name, std::process::id());
    // This process's name: left by a process of the same pid that was killed. Removed only when
    // it holds an export's files; a link or anything else under the name is refused.
    if let Ok(m) = tmp.symlink_metadata() {
        if !(m.is_dir() && crate::output_dir::holds_only_export_files(&tmp, files)?) {
            return Err(Error::Msg(format!(
                "{} exists and is not an export's staging folder: remove it, or export elsewhere",
                tmp.display()
            )));
        }
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = crate::output_dir::install_export(&tmp, out, overwrite) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ParamSummary;

    /// A folder under this process's staging name is removed only when it holds an export's
    /// files (a killed export of a process with the same pid); anything else is refused and kept.
    #[test]
    fn export_staging_under_our_pid_is_removed_only_when_it_is_an_exports() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let files = vec!["config.json".to_string()];
        let staging = crate::output_dir::export_staging(tmp.path(), "out", std::process::id());
        let write = |d: &std::path::Path| {
            std::fs::write(d.join("config.json"), "{}").map_err(|e| crate::Error::io(d, e))
        };
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("notes.txt"), "mine").unwrap();
        let e = super::write_export_dir(&out, &files, false, write).unwrap_err();
        assert!(e.to_string().contains("is not an export's staging folder"), "{e}");
        assert_eq!(std::fs::read(staging.join("notes.txt")).unwrap(), b"mine");
        assert!(!out.exists());
        std::fs::remove_file(staging.join("notes.txt")).unwrap();
        std::fs::write(staging.join("config.json"), "{\"half").unwrap();
        super::write_export_dir(&out, &files, false, write).unwrap();
        assert_eq!(std::fs::read(out.join("config.json")).unwrap(), b"{}");
        assert!(!staging.exists());
    }

    #[test]
    fn training_that_cannot_fit_in_memory_is_refused_with_the_figures() {
        let full = ParamSummary {
            total: 1 << 30,
            trainable: 1 << 30,
            initialised: Vec::new(),
        };
        // 4 GiB of weights + 12 GiB of gradients and moments.
        assert_eq!(full.training_bytes(), 16 << 30);
        let e = full.check_fits(Some(15 << 30), None).unwrap_err().to_string();
        assert!(
            e.contains("16.0 GiB") && e.contains("15.0 GiB") && e.contains("--mode lora"),
            "{e}"
        );
        full.check_fits(Some(16 << 30), None).unwrap();
        full.check_fits(None, None).unwrap();
        // The same model with adapters only: the frozen weights count once.
        let lora = ParamSummary {
            trainable: 1 << 20,
            ..full
        };
        lora.check_fits(Some(5 << 30), None).unwrap();
        // Activations count too, and when they are most of it the advice is a smaller batch.
        let batch = |bytes| {
            Some(super::BatchActivations {
                batch: 64,
                seq_len: 512,
                bytes,
            })
        };
        lora.check_fits(Some(5 << 30), batch(1 << 29)).unwrap();
        let e = lora
            .check_fits(Some(9 << 30), batch(6 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("6.0 GiB of activations for a batch of 64 × 512 tokens")
                && e.contains("smaller batch"),
            "{e}"
        );
    }
}
