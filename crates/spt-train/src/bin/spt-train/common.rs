//! What the subcommands share: the model arguments, the device, building the task, finding a
//! checkpoint's run settings, labels and tokenizer, and loading a trained model.

use crate::say;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use spt_train::checkpoint::{latest_checkpoint, load_checkpoint_weights};
use spt_train::config::{resolve_model, FinetuneConfig, Mode};
use spt_train::data::EncodedDataset;
use spt_train::data::{LabelMap, TaskKind, TextTokenizer};
use spt_train::pipeline::open_tokenizer;
use spt_train::tasks::{calibration_batches, ModelTask, ParamSummary};

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Local model directory or Hugging Face hub id.
    #[arg(long)]
    pub(crate) model: String,
    /// A checkpoint directory, or a run's output directory (its latest checkpoint); export needs
    /// one, and eval and predict do unless --model is a fine-tuned (exported) model.
    #[arg(long)]
    pub(crate) checkpoint: Option<PathBuf>,
    /// Training mode the checkpoint was made with (default: the one it records, or its run's
    /// finetune.toml; else, for eval, the mode of `--config`; else dense). A run's checkpoint is
    /// rebuilt in the run's mode: a different `--mode` is refused.
    #[arg(long, value_enum)]
    pub(crate) mode: Option<Mode>,
    /// Tokenizer: a directory with tokenizer.json (or vocab.json + merges.txt, or vocab.txt), or
    /// a tokenizer.json file (default: the one --checkpoint was trained with, per its recorded
    /// settings; else --model's).
    #[arg(long)]
    pub(crate) tokenizer: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}

/// `--matmul-precision` of the inference commands (eval, predict, generate).
#[derive(Args)]
pub(crate) struct PrecisionArgs {
    /// f32 or bf16: the precision of the CPU's products with layer weights and in attention
    /// (bf16 inputs, f32 sums; AMX where the CPU has it). Default f32; give a bf16 run's
    /// setting to reproduce its own evaluation to the last digits.
    #[arg(long, default_value_t = spt_ops::MatmulPrecision::F32, value_name = "f32|bf16")]
    pub(crate) matmul_precision: spt_ops::MatmulPrecision,
}

impl PrecisionArgs {
    /// Refuses bf16 off the CPU, then sets the process's precision.
    pub(crate) fn apply(&self, device: &str) -> Result<()> {
        if self.matmul_precision == spt_ops::MatmulPrecision::Bf16 && device != "cpu" {
            bail!("--matmul-precision bf16 is a setting of the CPU kernels, and --device is {device}");
        }
        apply_matmul_precision(self.matmul_precision);
        Ok(())
    }
}

impl ModelArgs {
    /// Refuses a `--checkpoint` that names no checkpoint (nothing there, a file, a folder
    /// without checkpoints) before anything else is read from it.
    pub(crate) fn check_checkpoint(&self) -> Result<()> {
        if let Some(c) = &self.checkpoint {
            checkpoint_path(c).context("--checkpoint")?;
        }
        Ok(())
    }

    /// The settings `--checkpoint` was trained with ([`run_config`]), if any: they
    /// supply the defaults a later command needs to read data as the run did (tokenizer, columns,
    /// max_length, block_size).
    pub(crate) fn run_settings(&self) -> Result<Option<FinetuneConfig>> {
        run_config(self.checkpoint.as_deref())
    }

    /// The tokenizer's source: `--tokenizer`, else the `tokenizer` of `run` (the run's
    /// settings, [`ModelArgs::run_settings`]), else none (the model directory's own files).
    pub(crate) fn tokenizer_source(&self, run: Option<&FinetuneConfig>) -> Option<PathBuf> {
        self.tokenizer
            .clone()
            .or_else(|| run.and_then(|r| r.tokenizer.clone()))
    }
}

pub(crate) fn device(spec: &str) -> Result<Device> {
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
/// dense / LoRA / SPT mode); spt mode calibrates on batches drawn from `train`. `resuming`: the
/// trained values will come from a checkpoint, so no head is reported as newly initialised.
pub(crate) fn build_task(
    cfg: &FinetuneConfig,
    model_dir: &Path,
    num_labels: Option<usize>,
    train: Option<&EncodedDataset>,
    device: &Device,
    resuming: bool,
) -> Result<ModelTask> {
    let calibration = match (cfg.mode, train) {
        (Mode::Spt, Some(t)) => calibration_batches(t, cfg.calibration_batches, 16, cfg.seed, device)?,
        _ => Vec::new(),
    };
    if cfg.random_init {
        tracing::warn!("random initial weights (--random-init): not a pretrained model");
    }
    let task = ModelTask::build(cfg, model_dir, num_labels, device, calibration)
        .with_context(|| format!("building the {:?} model from {}", cfg.mode, model_dir.display()))?;
    if resuming {
        let summary = ParamSummary {
            initialised: Vec::new(),
            ..task.summary.clone()
        };
        say!("{summary}; trained values come from the checkpoint being resumed");
    } else {
        say!("{}", task.summary);
    }
    if let Some(r) = &task.sparsify_report {
        for l in &r.layers {
            say!(
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

/// The model's config.json against the task, before any data is read or weights allocated: the
/// architecture (`model_type`), so that `--task lm` on BERT is named as such rather than as a
/// missing tensor, then the config itself, sizes included.
pub(crate) fn check_model(task: TaskKind, model_dir: &Path) -> Result<()> {
    check_model_type(task, model_dir)?;
    check_model_config(task, model_dir)
}

/// The first half of [`check_model`]: the directory holds a config.json whose `model_type`
/// suits the task.
pub(crate) fn check_model_type(task: TaskKind, model_dir: &Path) -> Result<()> {
    if !model_dir.join("config.json").is_file() {
        bail!(
            "--model {}: no config.json; a model directory holds a Hugging Face checkpoint \
             (config.json, model.safetensors and the tokenizer files)",
            model_dir.display()
        );
    }
    match (task, model_type(model_dir)?.as_deref()) {
        (TaskKind::Lm, Some("bert")) => bail!(
            "--task lm: {} is a BERT model (model_type \"bert\" in config.json), which has no language-model head; use --task classify, or a GPT-2 model",
            model_dir.display()
        ),
        (TaskKind::Classify, Some("gpt2")) => bail!(
            "{} is a GPT-2 model (model_type \"gpt2\" in config.json) and the task is classification; spt-train classifies with BERT models: use a BERT model, or train and evaluate the GPT-2 model as a language model (--task lm)",
            model_dir.display()
        ),
        (_, None | Some("bert" | "gpt2")) => {}
        (_, Some(other)) => bail!(
            "{}: model_type \"{other}\" in config.json; spt-train fine-tunes BERT (model_type \"bert\") and GPT-2 (\"gpt2\") checkpoints",
            model_dir.display()
        ),
    }
    Ok(())
}

/// The second half of [`check_model`]: the config itself, sizes included.
pub(crate) fn check_model_config(task: TaskKind, model_dir: &Path) -> Result<()> {
    let p = model_dir.join("config.json");
    match task {
        TaskKind::Classify => spt_models::BertConfig::from_file(&p).map(drop),
        TaskKind::Lm => spt_models::GPT2Config::from_file(&p).map(drop),
    }
    .with_context(|| format!("checking {}", p.display()))
}

/// The weights' scalars the model's config.json implies (see `param_count` of the configs).
pub(crate) fn model_param_count(task: TaskKind, model_dir: &Path) -> Result<u128> {
    let p = model_dir.join("config.json");
    match task {
        TaskKind::Classify => spt_models::BertConfig::from_file(&p).map(|c| c.param_count()),
        TaskKind::Lm => spt_models::GPT2Config::from_file(&p).map(|c| c.param_count()),
    }
    .with_context(|| format!("reading {}", p.display()))
}

/// The checkpoint a `--checkpoint` names: itself, or the latest one of a run directory or of its
/// `checkpoints/` folder.
pub(crate) fn checkpoint_path(p: &Path) -> Result<PathBuf> {
    if p.join("manifest.json").is_file() {
        return Ok(p.to_path_buf());
    }
    if !p.exists() {
        bail!("{}: no such checkpoint or run folder", p.display());
    }
    if !p.is_dir() {
        bail!(
            "{}: a file, not a checkpoint or run folder (a folder holding manifest.json, or a run \
             folder with checkpoints/)",
            p.display()
        );
    }
    let name = std::path::absolute(p)
        .ok()
        .and_then(|a| a.file_name().map(|n| n.to_owned()));
    // A checkpoint's own folder without its manifest (not a run folder to look inside).
    if name
        .as_ref()
        .and_then(|n| n.to_str())
        .is_some_and(spt_train::checkpoint::is_checkpoint_name)
        || p.join("model.safetensors").is_file()
    {
        bail!(
            "{}: no manifest.json, so not an spt-train checkpoint (a damaged one, or a model \
             folder, which goes to --model); give a checkpoint, or a run folder for its latest \
             complete one",
            p.display()
        );
    }
    let named_checkpoints = name.is_some_and(|n| n == "checkpoints");
    if named_checkpoints {
        return Ok(latest_checkpoint(p)?);
    }
    Ok(latest_checkpoint(&p.join("checkpoints"))?)
}

/// The labels.json to read: `--label-map`; else that of the run that holds the checkpoint;
/// else, without a checkpoint, the `id2label` of the model's config.json (what `export` writes,
/// and what a fine-tuned Hub model carries), unless those are HF's placeholder names (`LABEL_0`,
/// …), which say nothing: then the labels come from the data, as in fine-tuning.
pub(crate) fn labels_path(
    given: &Option<PathBuf>,
    checkpoint: &Option<PathBuf>,
    model_dir: &Path,
) -> Option<PathBuf> {
    if given.is_some() {
        return given.clone();
    }
    if let Some(c) = checkpoint {
        return in_run(c, "labels.json");
    }
    let cfg = model_dir.join("config.json");
    // An id2label that does not load is returned too, so that reading it names what is wrong
    // (ids with gaps, a label2id that disagrees) rather than predicting bare ids.
    let Ok(map) = LabelMap::load(&cfg) else {
        return config_has_any(model_dir, &["id2label"]).then_some(cfg);
    };
    let named = map
        .labels()
        .iter()
        .enumerate()
        .any(|(i, l)| *l != format!("LABEL_{i}"));
    named.then_some(cfg)
}

/// Whether the model's config.json has any of `keys` at the top level (false when it does not
/// read as JSON: loading the model names that).
pub(crate) fn config_has_any(model_dir: &Path, keys: &[&str]) -> bool {
    spt_train::pipeline::model_config(model_dir).is_some_and(|v| keys.iter().any(|k| v.get(k).is_some()))
}

/// The classes `checkpoint` (a checkpoint or a run folder) records for its head, in its order:
/// they outlive an edited or lost labels.json. None for a checkpoint from before the record.
pub(crate) fn recorded_classes(checkpoint: &Option<PathBuf>) -> Result<Option<LabelMap>> {
    let recorded = checkpoint
        .as_deref()
        .and_then(|c| checkpoint_path(c).ok())
        .and_then(|ck| spt_train::trainer::DataRecord::of(&ck))
        .and_then(|r| r.classes);
    Ok(recorded.map(LabelMap::new).transpose()?)
}

/// The label mapping: `--label-map`; else the classes the checkpoint records
/// ([`recorded_classes`]); else the file [`labels_path`] finds. A `--label-map` beside recorded
/// classes must list as many, and none of theirs at another index (other names rename them,
/// with a warning).
pub(crate) fn find_labels(
    given: &Option<PathBuf>,
    checkpoint: &Option<PathBuf>,
    model_dir: &Path,
) -> Result<Option<LabelMap>> {
    let recorded = recorded_classes(checkpoint)?;
    let Some(file) = given else {
        if recorded.is_some() {
            return Ok(recorded);
        }
        return Ok(labels_path(given, checkpoint, model_dir)
            .map(|p| LabelMap::load(&p))
            .transpose()?);
    };
    let map = LabelMap::load(file)?;
    check_label_map(file, &map, recorded.as_ref())?;
    Ok(Some(map))
}

/// A `--label-map` (`map`, read from `file`) against the classes the checkpoint records: class
/// i of the head is the i-th recorded class, so a map of another size cannot name the head's
/// classes, and a recorded name at another index would relabel them in silence (refused);
/// other names rename them (a warning).
pub(crate) fn check_label_map(file: &Path, map: &LabelMap, recorded: Option<&LabelMap>) -> Result<()> {
    let Some(rec) = recorded else { return Ok(()) };
    let (got, want) = (map.labels(), rec.labels());
    let moved = got
        .iter()
        .enumerate()
        .any(|(i, g)| want.iter().position(|w| w == g).is_some_and(|j| j != i));
    if got.len() != want.len() || moved {
        bail!(
            "--label-map {}: classes {got:?}, but the checkpoint was trained with {want:?} (class \
             i of its head is the i-th); drop --label-map to use the checkpoint's",
            file.display()
        );
    }
    if got != want {
        tracing::warn!(
            "--label-map {}: the checkpoint's classes {want:?} are named {got:?} here",
            file.display()
        );
    }
    Ok(())
}

/// The tokenizer of `m` (see [`ModelArgs::tokenizer_source`]) for texts truncated to
/// `max_length` tokens, as finetune opens it (capped at the model's positions).
pub(crate) fn tokenizer_for(
    m: &ModelArgs,
    run: Option<&FinetuneConfig>,
    model_dir: &Path,
    max_length: Option<usize>,
) -> Result<TextTokenizer> {
    let source = m.tokenizer_source(run);
    let opened = open_tokenizer(source.as_deref(), model_dir, max_length);
    // A tokenizer the run recorded (not given here) is named as the run's.
    match (opened, &m.tokenizer, &source) {
        (Err(e), None, Some(p)) => Err(anyhow::Error::new(e).context(format!(
            "the tokenizer {} recorded in the run's settings (give --tokenizer to use another)",
            p.display()
        ))),
        (opened, _, _) => Ok(opened?),
    }
}

/// A task as the `--task` flag spells it.
pub(crate) fn task_name(t: TaskKind) -> &'static str {
    match t {
        TaskKind::Classify => "sequence classification (--task classify)",
        TaskKind::Lm => "language modelling (--task lm)",
    }
}

/// The `finetune.toml` of the run that `p` (a run folder, or a checkpoint inside one) belongs to.
pub(crate) fn run_config_path(p: &Path) -> Option<PathBuf> {
    in_run(p, "finetune.toml")
}

/// The file `name` of the checkpoint or run folder `p`: in `p` itself, else in the run that
/// holds it ([`run_dir_of`]). Never in a folder above the run: a `labels.json` or
/// `finetune.toml` there (the working directory, for a relative `p` of one component) belongs
/// to something else.
fn in_run(p: &Path, name: &str) -> Option<PathBuf> {
    std::iter::once(std::path::absolute(p).ok()?)
        .chain(run_dir_of(p))
        .map(|d| d.join(name))
        .find(|f| f.is_file())
}

/// The run folder that a checkpoint or run folder `p` names: the run holding the checkpoint
/// `p` (`RUN/checkpoints/step-N`, or a checkpoint copied into the run itself, `RUN/best`), the
/// run of its `checkpoints/` folder, or `p` itself when it is no checkpoint; none for a
/// checkpoint kept outside a run. `..` is resolved as written (`--checkpoint ../step-4` from
/// inside `step-5`).
pub(crate) fn run_dir_of(p: &Path) -> Option<PathBuf> {
    let mut abs = PathBuf::new();
    for c in std::path::absolute(p).ok()?.components() {
        match c {
            std::path::Component::ParentDir => {
                abs.pop();
            }
            std::path::Component::CurDir => {}
            c => abs.push(c),
        }
    }
    let p = abs;
    let in_checkpoints = |d: &Path| d.file_name().is_some_and(|n| n == "checkpoints");
    if p.join("manifest.json").is_file() {
        let parent = p.parent()?;
        if in_checkpoints(parent) {
            parent.parent().map(Path::to_path_buf)
        } else {
            // A run folder's marker says so (an older spt-train's marker recorded no kind);
            // an export's, or none, is no run.
            use spt_train::output_dir::{read_marker, DirKind, Marker};
            match read_marker(parent).ok()? {
                Marker::Current(o) if o.kind == DirKind::Run => Some(parent.to_path_buf()),
                Marker::Legacy => Some(parent.to_path_buf()),
                _ => None,
            }
        }
    } else if in_checkpoints(&p) {
        p.parent().map(Path::to_path_buf)
    } else {
        Some(p)
    }
}

/// The finetune settings a checkpoint was trained with: its manifest's own (a later resume with
/// other settings rewrites the run's finetune.toml, not what this checkpoint means), else, for a
/// checkpoint from before the manifest held them whole, its run's `finetune.toml`, else none.
/// `checkpoint` is a checkpoint or a run folder (its latest checkpoint).
pub(crate) fn run_config(checkpoint: Option<&Path>) -> Result<Option<FinetuneConfig>> {
    let Some(given) = checkpoint else {
        return Ok(None);
    };
    let from_toml = || -> Result<Option<FinetuneConfig>> {
        match run_config_path(given) {
            Some(p) => Ok(Some(
                FinetuneConfig::load_run(&p).with_context(|| format!("reading {}", p.display()))?,
            )),
            None => Ok(None),
        }
    };
    if let Ok(ck) = checkpoint_path(given) {
        if let Ok(m) = spt_train::checkpoint::read_manifest(&ck) {
            let manifest = ck.join("manifest.json");
            match FinetuneConfig::from_checkpoint(&manifest, &m.config) {
                Ok(mut c) => {
                    // A checkpoint of an older spt-train recorded paths as they were typed,
                    // relative to a directory it does not name; its run's finetune.toml may hold
                    // them resolved.
                    if c.has_relative_paths() {
                        if let Some(t) = from_toml()? {
                            c.take_paths_from(&t);
                        }
                    }
                    return Ok(Some(c));
                }
                Err(e) if m.config.get("model").is_some() => tracing::warn!(
                    "{}: cannot read the settings it records ({e}); using its run's finetune.toml",
                    manifest.display()
                ),
                Err(_) => {} // a manifest written through the library, with settings of its own
            }
        }
    }
    from_toml()
}

/// The model of `--model`, prepared in the run's mode and holding the checkpoint's trained values.
///
/// Without a checkpoint the model is built from `settings` (or the defaults) in `--mode` (or the
/// settings' mode). In spt mode that fits its PQ codebooks and routers on batches drawn from
/// `calibrate`, as fine-tuning does, and refuses when there is nothing to fit them on: random
/// routing would give meaningless results.
pub(crate) fn load_trained(
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
    if let (Some((_, run_mode)), Some(asked), Some(c)) = (&trained_on, m.mode, &ck) {
        if asked != *run_mode {
            bail!(
                "--mode {}: {} was trained in {} mode (its recorded settings), and a checkpoint \
                 is rebuilt in the mode it was trained in; drop --mode, or export it \
                 (`spt-train export`) and evaluate the export in another mode",
                mode_name(asked),
                c.display(),
                mode_name(*run_mode)
            );
        }
    }
    if let (Some(r), Some(c)) = (&run, &ck) {
        if r.task != task {
            bail!(
                "{} was trained for {}, per its recorded settings; this command needs a checkpoint \
                 of {}",
                c.display(),
                task_name(r.task),
                task_name(task)
            );
        }
    }
    let mut cfg = run.unwrap_or_else(|| {
        let mut c = settings.cloned().unwrap_or_default();
        c.mode = m
            .mode
            .unwrap_or(if settings.is_some() { c.mode } else { Mode::Dense });
        c
    });
    cfg.task = task;
    // Read before the model is built: without the run's finetune.toml, the modules it trained in
    // full besides adapters, head and routers (the pooler by default) are read off the checkpoint
    // (a `--config` file written by hand need not list them).
    let loaded = match &ck {
        Some(c) => Some(load_checkpoint_weights(c, dev).with_context(|| format!("loading {}", c.display()))?),
        None => None,
    };
    if let (false, Some(l)) = (from_run, &loaded) {
        if cfg.mode != Mode::Dense {
            let mut saved: Vec<String> = l
                .model
                .keys()
                .filter(|n| !n.contains(".lora_") && !n.contains(".router.") && !n.starts_with("classifier."))
                .filter_map(|n| n.rsplit_once('.').map(|(module, _)| module.to_string()))
                .collect();
            saved.sort();
            saved.dedup();
            cfg.modules_to_save = saved;
        }
    }
    let mut t = match (ck.is_none() && cfg.mode == Mode::Spt, calibrate) {
        (true, Some(data)) => build_task(&cfg, &model_dir, num_labels, Some(data), dev, false)?,
        (true, None) => bail!(
            "--mode spt without --checkpoint: the sparse model fits its PQ codebooks and routers on \
             data, and this command has none to fit them on; pass --checkpoint (an spt run) or use \
             `spt-train eval`, which fits them on its data"
        ),
        (false, _) => {
            // A dense checkpoint replaces every weight; with adapters the frozen base is drawn
            // again from the run's seed, as in training.
            match (cfg.random_init, &ck) {
                (false, _) => {}
                (true, None) => tracing::warn!("random initial weights (--random-init): not a pretrained model"),
                (true, Some(_)) if cfg.mode == Mode::Dense => {}
                (true, Some(_)) => say!(
                    "a --random-init run: its frozen base weights are drawn from its seed ({}), as in training",
                    cfg.seed
                ),
            }
            ModelTask::build(&cfg, &model_dir, num_labels, dev, Vec::new())
                .with_context(|| format!("building the {:?} model from {}", cfg.mode, model_dir.display()))?
        }
    };
    if ck.is_none() && !t.summary.initialised.is_empty() {
        bail!(
            "{} has no trained {} ({} not in its weights): a freshly initialised head gives \
             meaningless results; pass --checkpoint (a finetune run) or a fine-tuned model \
             (`spt-train export` writes one)",
            model_dir.display(),
            match task {
                TaskKind::Classify => "classification head",
                TaskKind::Lm => "language-model head",
            },
            t.summary.initialised.join(", ")
        );
    }
    if !from_run && ck.is_some() && m.mode.is_none() && settings.is_none() {
        tracing::warn!("the checkpoint records no settings and has no finetune.toml beside it; assuming a dense run (pass --mode)");
    }
    if let (Some(c), Some(loaded)) = (&ck, loaded) {
        let origin = || match &trained_on {
            Some((model, mode)) => format!(
                "restoring {} (trained from {model} in {mode:?} mode, per its recorded settings; this is {})",
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

/// A mode as its flag value spells it.
pub(crate) fn mode_name(m: Mode) -> String {
    use clap::ValueEnum;
    m.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| format!("{m:?}"))
}

/// The JSON file at `p` (a byte-order mark skipped), `None` when there is none; an error names
/// the file.
pub(crate) fn read_json(p: &Path) -> Result<Option<serde_json::Value>> {
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let v = serde_json::from_str(spt_train::data::strip_bom(&text))
        .with_context(|| format!("parsing {}", p.display()))?;
    Ok(Some(v))
}

/// `model_type` from the model's config.json, if it names one.
pub(crate) fn model_type(dir: &Path) -> Result<Option<String>> {
    let Some(v) = read_json(&dir.join("config.json"))? else {
        return Ok(None);
    };
    Ok(v.get("model_type").and_then(|t| t.as_str()).map(str::to_string))
}

/// classify or lm, from the model's config.json (`model_type`).
pub(crate) fn task_of(model: &str) -> Result<TaskKind> {
    let dir = resolve_model(model)?;
    Ok(match model_type(&dir)?.as_deref() {
        Some("gpt2") => TaskKind::Lm,
        _ => TaskKind::Classify,
    })
}

/// Refuses, before any work, an output whose folder cannot be written: `dir` (or, where it does
/// not exist yet, the nearest folder above it, where it will be made). Found after the work, an
/// unwritable destination cost the whole run.
pub(crate) fn check_writable(flag: &str, dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Some(existing) = dir.ancestors().find(|d| d.as_os_str().is_empty() || d.exists()) else {
        return Ok(());
    };
    // A link on the way whose target is gone: the folders could not be made under it.
    if let Some(link) = dir
        .ancestors()
        .take_while(|d| *d != existing)
        .find(|d| d.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()))
    {
        bail!(
            "{flag}: {} is a link to {}, which does not exist",
            link.display(),
            std::fs::read_link(link).map_or_else(|_| "?".into(), |t| t.display().to_string())
        );
    }
    let existing = if existing.as_os_str().is_empty() {
        Path::new(".")
    } else {
        existing
    };
    if !existing.is_dir() {
        bail!("{flag}: {} is a file, not a folder", existing.display());
    }
    #[cfg(unix)]
    if let Err(e) = nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK) {
        bail!(
            "{flag}: cannot write in {}: {}",
            existing.display(),
            std::io::Error::from_raw_os_error(e as i32)
        );
    }
    Ok(())
}

/// The file an output path names: itself, or where its link (or chain of links, as the OS
/// follows them) ends. A chain that does not end (a loop) is an error.
fn link_target(flag: &str, path: &Path) -> Result<PathBuf> {
    let mut to = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::read_link(&to) {
            Ok(next) => to = to.parent().unwrap_or(Path::new("")).join(next),
            Err(_) => return Ok(to),
        }
    }
    bail!("{flag} {}: a loop of links", path.display())
}

/// Writes an output file that [`check_output_file`] passed: through a link to the file it names,
/// which that check read. Renamed over, the link would become a plain file and its target keep
/// the old bytes.
pub(crate) fn write_output_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let to = link_target("output", path)?;
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    spt_train::checkpoint::write_file_atomic(&to, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Refuses an output file (`flag` names the option) that exists and is not one this command
/// wrote, judged by `ours` on its text: spt-train never overwrites a file it did not write,
/// whatever the flags. Called before any work, so a refusal costs nothing.
pub(crate) fn check_output_file(
    path: &Path,
    flag: &str,
    what: &str,
    ours: impl Fn(&str) -> bool,
) -> Result<()> {
    // Where the write will land: a link's target, in its own folder.
    let target = link_target(flag, path)?;
    check_writable(flag, target.parent().unwrap_or(Path::new("")))?;
    if !path.exists() {
        return Ok(());
    }
    if !path.is_file() {
        bail!("{flag} {}: exists and is not a file", path.display());
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    if !ours(&text) {
        bail!(
            "{flag} {}: the file exists and is not {what}; spt-train never overwrites files it did \
             not write, so choose another path",
            path.display()
        );
    }
    // A rename replaces a read-only file too (and root writes anything): one made read-only
    // was kept on purpose.
    if std::fs::metadata(path).is_ok_and(|m| m.permissions().readonly()) {
        bail!(
            "{flag} {}: the file is read-only, which says it is to be kept; make it writable, or \
             choose another path",
            path.display()
        );
    }
    Ok(())
}

/// Sets the process's matmul precision (`spt_ops::precision`), with a note where bf16 has no
/// AMX to run on.
pub(crate) fn apply_matmul_precision(p: spt_ops::MatmulPrecision) {
    spt_ops::set_matmul_precision(p);
    if p == spt_ops::MatmulPrecision::Bf16 && !spt_ops::bf16_matmul_is_native() {
        crate::say!(
            "note: this CPU has no AMX: the bf16 products are computed in f32 from rounded inputs, \
             slower than f32 products"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's files are found from any of its checkpoints, never in a folder above the run.
    #[test]
    fn run_files_are_looked_up_in_the_run_only() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let run = root.join("run");
        let other = root.join("other");
        for d in [
            "run/checkpoints/step-1",
            "run/checkpoints/step-2",
            "run/best",
            "other/ck",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for ck in [
            "run/checkpoints/step-1",
            "run/checkpoints/step-2",
            "run/best",
            "other/ck",
        ] {
            std::fs::write(root.join(ck).join("manifest.json"), "{}").unwrap();
        }
        std::fs::write(run.join(spt_train::output_dir::OUTPUT_MARKER), "").unwrap();
        // A decoy above the run, and in the folder above a checkpoint kept outside one.
        std::fs::write(root.join("labels.json"), "").unwrap();
        std::fs::write(other.join("labels.json"), "").unwrap();
        assert_eq!(in_run(&run, "labels.json"), None);
        assert_eq!(in_run(&other.join("ck"), "labels.json"), None);
        std::fs::write(run.join("labels.json"), "").unwrap();
        let want = Some(run.join("labels.json"));
        for p in [
            run.clone(),
            run.join("checkpoints"),
            run.join("checkpoints/step-2"),
            run.join("best"),
            run.join("checkpoints/step-2/../step-1"),
            run.join("checkpoints/./step-1"),
        ] {
            assert_eq!(in_run(&p, "labels.json"), want, "{}", p.display());
        }
        // A checkpoint's own file comes first.
        std::fs::write(other.join("ck/labels.json"), "").unwrap();
        assert_eq!(
            in_run(&other.join("ck"), "labels.json"),
            Some(other.join("ck/labels.json"))
        );
        assert_eq!(run_dir_of(&other.join("ck")), None);
    }
}
