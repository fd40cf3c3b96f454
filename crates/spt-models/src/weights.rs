//! Checkpoint loading: [`WeightSource`] (what is in the file), [`Param`] (a named weight, trainable
//! or frozen), and the loader that builds models from a source and reports what it did.
//!
//! The loader design:
//! - A [`WeightSource`] holds every tensor of a checkpoint by its file key: one `model.safetensors`,
//!   a sharded `model.safetensors.index.json`, or a `pytorch_model.bin`. Reading errors name the file.
//! - A model asks the loader for each parameter by its **canonical Hugging Face name** (the name
//!   HF gives it in the class being built, e.g. `bert.encoder.layer.0.attention.self.query.weight`
//!   for `BertForSequenceClassification`, `encoder.layer.0...` for `BertModel`). The loader tries
//!   the checkpoint keys with and without the base-model prefix (`bert.` / `transformer.`), plus
//!   the legacy `gamma`/`beta` LayerNorm names, checks the shape, converts dtype and device, and
//!   records which key it used.
//! - Each loaded tensor becomes a [`Param`]: a `Var` if [`LoadOptions::trainable`] says so, else a
//!   plain (frozen, detached) tensor, so backward never walks into frozen weights.
//! - A missing tensor is a [`ModelError::MissingTensor`] naming every key tried. The one exception
//!   is a task head that the model says may be new (the classifier): it is initialised from
//!   `LoadOptions::init_seed` and listed in [`LoadReport::initialised`].
//! - [`LoadReport`] lists the checkpoint keys nobody used (`unused`), the known buffers skipped on
//!   purpose (`ignored`: `position_ids`, GPT-2's `attn.bias`/`attn.masked_bias`), and the new
//!   tensors (`initialised`).

use crate::error::{ModelError, Result};
use crate::layers::{Dropout, DropoutRng};
use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// All tensors of one checkpoint, by file key, on the CPU.
#[derive(Debug, Clone)]
pub struct WeightSource {
    tensors: HashMap<String, Tensor>,
    origin: Option<PathBuf>,
}

fn ckpt_err(path: &Path, reason: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The checkpoint files of a model directory, in the order [`WeightSource::from_dir`] prefers
/// them (a sharded index brings the shards it names: [`shard_files`]).
pub const CHECKPOINT_FILES: [&str; 3] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
];

/// The shard files a `*.safetensors.index.json` names in its `weight_map`, each once, sorted.
pub fn shard_files(index: &Path) -> Result<Vec<String>> {
    Ok(read_index(index)?
        .into_values()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect())
}

/// An index's `weight_map`: tensor name → shard file.
fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| ckpt_err(path, e))?;
    let index: Index =
        serde_json::from_str(&text).map_err(|e| ckpt_err(path, format!("bad shard index: {e}")))?;
    Ok(index.weight_map)
}

impl WeightSource {
    /// Wraps tensors already in memory (tests, conversions).
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Self {
        Self {
            tensors,
            origin: None,
        }
    }

    /// Loads a checkpoint directory: `model.safetensors`, else `model.safetensors.index.json`,
    /// else `pytorch_model.bin`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        for name in CHECKPOINT_FILES {
            let p = dir.join(name);
            if p.is_file() {
                return Self::from_file(&p);
            }
        }
        Err(ckpt_err(
            dir,
            "no model.safetensors, model.safetensors.index.json or pytorch_model.bin in this directory",
        ))
    }

    /// Loads one checkpoint file, choosing the format by name: `*.safetensors`,
    /// `*.safetensors.index.json` (shards next to it), or `*.bin` / `*.pt` / `*.pth` (PyTorch pickle).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let tensors = if name.ends_with(".index.json") {
            Self::read_sharded(path)?
        } else if name.ends_with(".safetensors") {
            Self::read_safetensors(path)?
        } else if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
            Self::read_pickle(path)?
        } else {
            return Err(ckpt_err(
                path,
                "unknown checkpoint format (expected .safetensors, .index.json or .bin)",
            ));
        };
        Ok(Self {
            tensors,
            origin: Some(path.to_path_buf()),
        })
    }

    fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
        read_safetensors_file(path)
    }

    fn read_sharded(path: &Path) -> Result<HashMap<String, Tensor>> {
        let weight_map = read_index(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let shards: BTreeSet<&String> = weight_map.values().collect();
        let mut all = HashMap::new();
        for shard in shards {
            let shard_path = dir.join(shard);
            all.extend(Self::read_safetensors(&shard_path)?);
        }
        for (key, shard) in &weight_map {
            if !all.contains_key(key) {
                return Err(ckpt_err(
                    path,
                    format!("index lists '{key}' in {shard}, which does not contain it"),
                ));
            }
        }
        Ok(all)
    }

    fn read_pickle(path: &Path) -> Result<HashMap<String, Tensor>> {
        // candle's pickle reader is not hardened against every malformed input; keep a bad file
        // from taking the caller down.
        let read = std::panic::catch_unwind(|| candle_core::pickle::read_all(path));
        match read {
            Ok(Ok(v)) => Ok(v.into_iter().collect()),
            Ok(Err(e)) => {
                // torch.save writes a zip archive since torch 1.6 (it starts "PK"); before, a
                // bare pickle stream (0x80, the protocol opcode), which candle cannot read.
                let mut head = [0u8; 2];
                let read = std::fs::File::open(path).and_then(|mut f| {
                    use std::io::Read;
                    f.read_exact(&mut head)
                });
                let why = match (read.is_ok(), head) {
                    (true, [0x80, _]) => "the legacy torch.save format (before torch 1.6), which \
                                          spt-models cannot read: re-save it with a newer torch, or \
                                          convert it to safetensors"
                        .to_string(),
                    (true, [b'P', b'K']) => format!("a damaged or truncated PyTorch zip archive ({e})"),
                    _ => format!("not a PyTorch checkpoint: neither a zip archive nor a pickle ({e})"),
                };
                Err(ckpt_err(path, why))
            }
            Err(_) => Err(ckpt_err(path, "bad PyTorch checkpoint: the pickle reader failed")),
        }
    }

    /// The file this came from, if any.
    pub fn origin(&self) -> Option<&Path> {
        self.origin.as_deref()
    }

    /// Every key in the checkpoint, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    /// The tensor stored under `key`.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }

    /// True if any key starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.tensors.keys().any(|k| k.starts_with(prefix))
    }
}

/// Which loaded weights become trainable `Var`s; the rest are frozen plain tensors.
#[derive(Clone, Default)]
pub enum Trainable {
    /// Full fine-tuning: every parameter is a `Var`.
    #[default]
    All,
    /// Everything frozen (inference, or LoRA where adapters are added later).
    None,
    /// A `Var` when the predicate holds for the canonical HF name (see [`Trainable::only`]).
    Only(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

impl std::fmt::Debug for Trainable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("All"),
            Self::None => f.write_str("None"),
            Self::Only(_) => f.write_str("Only(<predicate>)"),
        }
    }
}

impl Trainable {
    /// Trainable where `pred(canonical HF name)` holds, e.g. `|n| n.starts_with("classifier.")`.
    pub fn only(pred: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self::Only(Arc::new(pred))
    }

    /// Whether the parameter with this canonical name is trainable.
    pub fn is_trainable(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::None => false,
            Self::Only(f) => f(name),
        }
    }
}

/// How to materialise a checkpoint.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Parameter dtype (F32 for parity with PyTorch; F64 for gradient checks).
    pub dtype: DType,
    pub device: Device,
    pub trainable: Trainable,
    /// Seed for new heads (normal(0, initializer_range) weights, zero bias).
    pub init_seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: Trainable::All,
            init_seed: 0,
        }
    }
}

impl LoadOptions {
    /// Everything frozen, F32, CPU: for inference and parity checks.
    pub fn frozen() -> Self {
        Self {
            trainable: Trainable::None,
            ..Self::default()
        }
    }
}

/// What loading did, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Checkpoint keys the model did not use (sorted). Not an error: e.g. an MLM head when
    /// loading `BertModel`.
    pub unused: Vec<String>,
    /// Checkpoint keys skipped on purpose: non-parameter buffers (sorted).
    pub ignored: Vec<String>,
    /// Canonical names of model tensors not in the checkpoint that were initialised (new heads).
    pub initialised: Vec<String>,
    /// Number of checkpoint tensors used.
    pub used: usize,
}

/// A named model weight: trainable (`Var`) or frozen (a detached tensor).
#[derive(Debug, Clone)]
pub struct Param {
    name: String,
    tensor: Tensor,
    var: Option<Var>,
    /// A trainable parameter's value as a detached tensor sharing the `Var`'s storage (every
    /// update writes that storage in place), read inside `spt_ops::no_grad`.
    detached: Option<Tensor>,
}

impl Param {
    /// A trainable parameter (the tensor is copied into a new `Var`: for a weight that a
    /// candle `VarMap` holds, use [`Param::from_var_map`] so that both train the same `Var`).
    pub fn trainable(name: impl Into<String>, t: &Tensor) -> Result<Self> {
        let var = Var::from_tensor(&t.detach())?;
        Ok(Self::from_var(name, var))
    }

    /// A trainable parameter sharing an existing `Var` (e.g. a LoRA factor owned by an op).
    pub fn from_var(name: impl Into<String>, var: Var) -> Self {
        Self {
            name: name.into(),
            tensor: var.as_tensor().clone(),
            detached: Some(var.as_detached_tensor()),
            var: Some(var),
        }
    }

    /// A trainable parameter sharing the `Var` that `map` holds under `name` (e.g. one a
    /// `VarBuilder::from_varmap` made), so that an optimizer over `map.all_vars()` trains what
    /// this layer computes with. See also [`NamedParams::add_to_var_map`].
    pub fn from_var_map(map: &candle_nn::VarMap, name: &str) -> Result<Self> {
        let data = map.data().lock().unwrap_or_else(|e| e.into_inner());
        let var = data.get(name).cloned().ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            tried: vec![format!("the VarMap's {} variables", data.len())],
        })?;
        Ok(Self::from_var(name, var))
    }

    /// A frozen parameter: backward never reaches it.
    pub fn frozen(name: impl Into<String>, t: &Tensor) -> Self {
        Self {
            name: name.into(),
            tensor: t.detach(),
            var: None,
            detached: None,
        }
    }

    /// Canonical Hugging Face name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor used in forward passes: tracked iff trainable, and never inside
    /// `spt_ops::no_grad` (the same values, read detached).
    pub fn tensor(&self) -> &Tensor {
        match &self.detached {
            Some(d) if !spt_ops::grad_enabled() => d,
            _ => &self.tensor,
        }
    }

    /// The `Var`, if trainable.
    pub fn var(&self) -> Option<&Var> {
        self.var.as_ref()
    }

    pub fn is_trainable(&self) -> bool {
        self.var.is_some()
    }

    /// Freezes the parameter (keeps its current value). The frozen tensor shares the `Var`'s
    /// storage: whoever still holds that `Var` must not update it afterwards (a frozen dense
    /// `Linear` keeps a copy of its weight in another layout, which would not follow).
    pub fn freeze(&mut self) {
        if let Some(v) = self.var.take() {
            self.tensor = v.as_detached_tensor();
            self.detached = None;
        }
    }

    /// Makes the parameter trainable (a new `Var` holding its current value).
    pub fn unfreeze(&mut self) -> Result<()> {
        if self.var.is_none() {
            *self = Self::trainable(std::mem::take(&mut self.name), &self.tensor)?;
        }
        Ok(())
    }

    /// Replaces the value, keeping trainability. Shapes must match.
    pub fn set(&mut self, t: &Tensor) -> Result<()> {
        if t.dims() != self.tensor.dims() {
            return Err(ModelError::ShapeMismatch {
                name: self.name.clone(),
                expected: self.tensor.dims().to_vec(),
                got: t.dims().to_vec(),
            });
        }
        let t = t.to_dtype(self.tensor.dtype())?.to_device(self.tensor.device())?;
        match &self.var {
            Some(v) => v.set(&t.detach().contiguous()?.copy()?)?,
            None => self.tensor = t.detach(),
        }
        Ok(())
    }
}

/// Anything that owns [`Param`]s: models and their modules. Gives trainers the named `Var`s for
/// optimizer groups and the named tensors for saving with HF keys.
pub trait NamedParams {
    /// Calls `f` on every parameter once, in a fixed order (a tied weight is visited once).
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param));
    /// Mutable variant of [`NamedParams::visit_params`].
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param));

    /// Trainable parameters as `(canonical HF name, Var)`.
    fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        self.visit_params(&mut |p| {
            if let Some(v) = p.var() {
                out.push((p.name().to_string(), v.clone()));
            }
        });
        out
    }

    /// Puts the trainable parameters' `Var`s (the same `Var`s, not copies) into `map` under
    /// `{prefix}{name}`, so that an optimizer over `map.all_vars()` trains them and `map.save`
    /// saves them: the `Var`s spt makes (LoRA factors, routers, [`Param::trainable`] copies) live
    /// in no `VarMap` otherwise. A `Var` the map already holds, under any name, is left where it
    /// is (an optimizer would step it twice). A name that `map` holds for another `Var`, or that
    /// two of these parameters share, is an error, and then nothing is added.
    fn add_to_var_map(&self, map: &candle_nn::VarMap, prefix: &str) -> Result<()> {
        let mut data = map.data().lock().unwrap_or_else(|e| e.into_inner());
        let held: std::collections::HashSet<_> = data.values().map(|v| v.id()).collect();
        let mut adding: HashMap<String, Var> = HashMap::new();
        for (name, var) in self.named_vars() {
            if held.contains(&var.id()) {
                continue;
            }
            let key = format!("{prefix}{name}");
            let taken = data.contains_key(&key) || adding.get(&key).is_some_and(|v| v.id() != var.id());
            if taken {
                return Err(ModelError::InvalidConfig {
                    field: "VarMap",
                    value: key,
                    reason: "another variable has this name (in the map, or among these \
                             parameters); add with another prefix, or name the layers apart"
                        .into(),
                });
            }
            adding.insert(key, var);
        }
        data.extend(adding);
        Ok(())
    }

    /// Every parameter as `(canonical HF name, tensor)`, for export.
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visit_params(&mut |p| out.push((p.name().to_string(), p.tensor().clone())));
        out
    }

    /// Makes parameters trainable where `pred(name)` holds and freezes the rest.
    fn set_trainable(&mut self, pred: &dyn Fn(&str) -> bool) -> Result<()> {
        let mut res = Ok(());
        self.visit_params_mut(&mut |p| {
            if pred(p.name()) {
                if let Err(e) = p.unfreeze() {
                    res = Err(e);
                }
            } else {
                p.freeze();
            }
        });
        res
    }

    /// Number of trainable scalars.
    fn num_trainable(&self) -> usize {
        let mut n = 0;
        self.visit_params(&mut |p| {
            if p.is_trainable() {
                n += p.tensor().elem_count();
            }
        });
        n
    }
}

/// Writes every parameter of `model` under its canonical HF name to a safetensors file, through
/// a temporary file renamed into place. LoRA factors are included under their PEFT-style names
/// (`{module}.lora_A.weight`); merge them first for a plain HF checkpoint.
pub fn save_safetensors(model: &(impl NamedParams + ?Sized), path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let tensors: HashMap<String, Tensor> = model
        .named_tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    save_tensors(&tensors, path)
}

/// Writes `tensors` to the safetensors file `path` through a temporary sibling renamed into
/// place, with the permissions of any new file (the process umask). Why not
/// `candle_core::safetensors::save` alone: its temporary file is private (0600) and keeps that
/// mode, so an exported model would be unreadable to the other users of a shared machine.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    // Named by the file being written: the temporary beside it is ours, not the user's concern.
    let write_err = |e: &dyn std::fmt::Display| ModelError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let write = || -> Result<()> {
        let mode = std::fs::File::create(&tmp)
            .and_then(|f| f.metadata())
            .map_err(|e| write_err(&e))?
            .permissions();
        candle_core::safetensors::save(tensors, &tmp).map_err(|e| write_err(&e))?;
        std::fs::set_permissions(&tmp, mode).map_err(|e| write_err(&e))?;
        // The data reaches the disk before the rename does: after a crash the path holds the
        // old file or the whole new one, never a renamed file of zeros.
        // Opened for writing: some platforms flush only a handle that may write.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| write_err(&e))?;
        std::fs::rename(&tmp, path).map_err(|e| write_err(&e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself persists with its folder (Linux); not every platform opens one.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    };
    let res = write();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// How a tensor missing from the checkpoint may be created.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// normal(0, std)
    Normal(f64),
    Zeros,
}

/// Builds [`Param`]s from a [`WeightSource`] and records what it used.
pub(crate) struct Loader<'a> {
    src: &'a WeightSource,
    opts: &'a LoadOptions,
    /// Prefix of the base model in canonical names of the class being built ("bert." or "").
    canonical_prefix: String,
    /// The base model's HF prefix ("bert." / "transformer."), which checkpoints may or may not have.
    model_prefix: String,
    used: BTreeSet<String>,
    /// Further keys to try for a base-model name, after its own (see [`Loader::alias`]).
    aliases: Vec<(String, String)>,
    initialised: Vec<String>,
    rng: StdRng,
    /// Shared by every dropout of the model being built.
    pub(crate) dropout_rng: Arc<DropoutRng>,
}

impl<'a> Loader<'a> {
    pub(crate) fn new(
        src: &'a WeightSource,
        opts: &'a LoadOptions,
        canonical_prefix: &str,
        model_prefix: &str,
    ) -> Self {
        Self {
            src,
            opts,
            canonical_prefix: canonical_prefix.to_string(),
            model_prefix: model_prefix.to_string(),
            used: BTreeSet::new(),
            aliases: Vec::new(),
            initialised: Vec::new(),
            rng: StdRng::seed_from_u64(opts.init_seed),
            dropout_rng: Arc::new(DropoutRng::default()),
        }
    }

    /// A dropout drawing from the model's shared seed source.
    pub(crate) fn dropout(&self, p: f64) -> Result<Dropout> {
        Dropout::with_rng(p, self.dropout_rng.clone())
    }

    /// Keys to try for a name relative to the base model.
    fn base_candidates(&self, name: &str) -> Vec<String> {
        let mut names = vec![name.to_string()];
        // Legacy TF-converted LayerNorm names.
        if let Some(stem) = name.strip_suffix("LayerNorm.weight") {
            names.push(format!("{stem}LayerNorm.gamma"));
        } else if let Some(stem) = name.strip_suffix("LayerNorm.bias") {
            names.push(format!("{stem}LayerNorm.beta"));
        }
        let mut out = Vec::new();
        for n in &names {
            out.push(n.clone());
            out.push(format!("{}{n}", self.model_prefix));
        }
        out.extend(
            self.aliases
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, k)| k.clone()),
        );
        out
    }

    /// Also reads the base-model parameter `name` from the checkpoint key `key` when the
    /// checkpoint has none under its own names (a tied GPT-2 saved with `lm_head.weight` only).
    pub(crate) fn alias(&mut self, name: &str, key: &str) {
        self.aliases.push((name.to_string(), key.to_string()));
    }

    /// Whether the checkpoint key `key` was read into a parameter.
    pub(crate) fn was_used(&self, key: &str) -> bool {
        self.used.contains(key)
    }

    /// The checkpoint's tensor `key`, as stored (not marked used).
    pub(crate) fn peek(&self, key: &str) -> Option<&Tensor> {
        self.src.get(key)
    }

    /// A base-model parameter (name relative to the base model, e.g. `embeddings.LayerNorm.weight`).
    pub(crate) fn base(&mut self, name: &str, shape: &[usize]) -> Result<Param> {
        let canonical = format!("{}{name}", self.canonical_prefix);
        let cands = self.base_candidates(name);
        self.load(canonical, cands, shape)
    }

    /// A top-level parameter (head), by its full canonical name, required.
    pub(crate) fn top(&mut self, name: &str, shape: &[usize]) -> Result<Param> {
        self.load(name.to_string(), vec![name.to_string()], shape)
    }

    /// A top-level parameter that may be new: initialised and reported when absent.
    pub(crate) fn top_or_init(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Param> {
        if self.src.get(name).is_some() {
            return self.top(name, shape);
        }
        let n: usize = shape.iter().product();
        let data: Vec<f64> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Normal(std) => (0..n).map(|_| std * std_normal(&mut self.rng)).collect(),
        };
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(self.opts.dtype)?
            .to_device(&self.opts.device)?;
        self.initialised.push(name.to_string());
        self.make(name.to_string(), &t)
    }

    fn load(&mut self, canonical: String, candidates: Vec<String>, shape: &[usize]) -> Result<Param> {
        let Some((key, t)) = candidates
            .iter()
            .find_map(|k| self.src.get(k).map(|t| (k.clone(), t)))
        else {
            let mut tried = candidates;
            tried.dedup();
            return Err(ModelError::MissingTensor {
                name: canonical,
                tried,
            });
        };
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: key,
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        if !t.dtype().is_float() {
            return Err(ModelError::Checkpoint {
                path: self.src.origin().map(Path::to_path_buf).unwrap_or_default(),
                reason: format!("tensor '{key}' has dtype {:?}, expected a float dtype", t.dtype()),
            });
        }
        // A NaN weight would surface only as a NaN loss at the first step, with nothing named.
        if !all_finite(t)? {
            return Err(ModelError::Checkpoint {
                path: self.src.origin().map(Path::to_path_buf).unwrap_or_default(),
                reason: format!("tensor '{key}' holds NaN or infinite values"),
            });
        }
        let t = t.to_dtype(self.opts.dtype)?.to_device(&self.opts.device)?;
        self.used.insert(key);
        self.make(canonical, &t)
    }

    fn make(&self, canonical: String, t: &Tensor) -> Result<Param> {
        if self.opts.trainable.is_trainable(&canonical) {
            Param::trainable(canonical, t)
        } else {
            Ok(Param::frozen(canonical, t))
        }
    }

    /// Finishes loading. `is_buffer` says which unused keys are known non-parameter buffers.
    pub(crate) fn finish(self, is_buffer: impl Fn(&str) -> bool) -> LoadReport {
        let mut unused = Vec::new();
        let mut ignored = Vec::new();
        for k in self.src.keys() {
            if self.used.contains(k) {
                continue;
            }
            if is_buffer(k) {
                ignored.push(k.to_string());
            } else {
                unused.push(k.to_string());
            }
        }
        LoadReport {
            unused,
            ignored,
            initialised: self.initialised,
            used: self.used.len(),
        }
    }
}

/// Every tensor of a safetensors file, on the CPU, read one at a time: the peak is the tensors
/// and the largest one's bytes, not the whole file beside the tensors (`std::fs::read` and
/// candle's `load_buffer`: twice a checkpoint's size, which got a model that fits in memory
/// killed while loading). The header, each tensor's byte range and its shape are checked
/// against the file first, so a truncated or corrupt file is an error naming it, not a panic.
pub fn read_safetensors_file(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut f = std::fs::File::open(path).map_err(|e| ckpt_err(path, e))?;
    read_safetensors_from(&mut f, path)
}

/// [`read_safetensors_file`] from a file already open (read from its start; `path` names it in
/// errors): a caller that checked the file's bytes reads the same file, whatever has been
/// renamed over its path since.
pub fn read_safetensors_from(f: &mut std::fs::File, path: &Path) -> Result<HashMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    use std::io::{Read, Seek, SeekFrom};
    let corrupt =
        |e: &dyn std::fmt::Display| ckpt_err(path, format!("corrupt or truncated safetensors: {e}"));
    f.seek(SeekFrom::Start(0)).map_err(|e| ckpt_err(path, e))?;
    let len = f.metadata().map_err(|e| ckpt_err(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| corrupt(&e))?;
    let n = u64::from_le_bytes(n);
    // The format's own bound on the header (100 MB), and the file's (whose length may say less
    // than was read: a pipe).
    let Some(rest) = len.checked_sub(8).filter(|&rest| n <= 100_000_000 && n <= rest) else {
        return Err(corrupt(&format!("a header of {n} bytes in a file of {len}")));
    };
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| corrupt(&e))?;
    // Deserialising checks that the tensors' byte ranges follow each other and match their
    // shapes and dtypes.
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header).map_err(|e| corrupt(&e))?;
    if n.checked_add(meta.data_len() as u64) != Some(rest) {
        return Err(corrupt(&format!(
            "the header describes {} bytes of data, the file holds {}",
            meta.data_len(),
            rest - n
        )));
    }
    check_shapes(&meta).map_err(|e| ckpt_err(path, e))?;
    let mut out = HashMap::new();
    let mut buf = Vec::new();
    for name in meta.offset_keys() {
        let Some(info) = meta.info(&name) else { continue };
        let (start, end) = info.data_offsets;
        f.seek(SeekFrom::Start(8 + n + start as u64))
            .map_err(|e| corrupt(&e))?;
        buf.resize(end - start, 0);
        f.read_exact(&mut buf).map_err(|e| corrupt(&e))?;
        // A bool tensor (GPT-2's `attn.bias` mask as transformers 4.10–4.29 saved it, a buffer
        // no model of ours reads) holds one byte per element: read as u8, which candle holds.
        let dtype = match info.dtype {
            safetensors::Dtype::BOOL => safetensors::Dtype::U8,
            d => d,
        };
        let view = safetensors::tensor::TensorView::new(dtype, info.shape.clone(), &buf)
            .map_err(|e| corrupt(&format!("tensor `{name}`: {e}")))?;
        // The bytes are checked: a failure here is a dtype candle cannot hold, not damage.
        let t = view.load(&Device::Cpu).map_err(|e| {
            ckpt_err(
                path,
                format!("tensor `{name}` is stored as {dtype:?}, which spt-models cannot read ({e})"),
            )
        })?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Refuses a safetensors buffer holding a shape whose strides overflow `usize`: with a zero
/// dimension (`[0, 2^40, 2^40]`) it holds no bytes and passes the format's checks, and candle's
/// stride computation then overflows (a panic in debug builds, wrapped strides in release). A
/// header that does not parse is left to the loader's own error.
pub fn check_safetensors_shapes(bytes: &[u8]) -> std::result::Result<(), String> {
    let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(bytes) else {
        return Ok(());
    };
    check_shapes(&meta)
}

/// See [`check_safetensors_shapes`].
fn check_shapes(meta: &safetensors::tensor::Metadata) -> std::result::Result<(), String> {
    let mut tensors: Vec<_> = meta.tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, info) in tensors {
        // The products candle's contiguous strides take, from the last dimension.
        let mut size = 1usize;
        for &d in info.shape.iter().rev() {
            size = size
                .checked_mul(d)
                .ok_or_else(|| format!("tensor `{name}` has shape {:?}, too large to address", info.shape))?;
        }
    }
    Ok(())
}

/// Whether every value of `t` is finite (integer tensors always are). Contiguous CPU tensors are
/// read in place, without a copy: loaders check every tensor of a checkpoint.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    use candle_core::{CpuStorage, Storage};
    if !t.dtype().is_float() {
        return Ok(true);
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            let known = match cpu {
                CpuStorage::F32(v) => Some(v[a..b].iter().all(|x| x.is_finite())),
                CpuStorage::F64(v) => Some(v[a..b].iter().all(|x| x.is_finite())),
                CpuStorage::F16(v) => Some(v[a..b].iter().all(|x| x.is_finite())),
                CpuStorage::BF16(v) => Some(v[a..b].iter().all(|x| x.is_finite())),
                _ => None,
            };
            if let Some(finite) = known {
                return Ok(finite);
            }
        }
    }
    if !t.device().is_cpu() {
        // On the device, reading one scalar back: x − x is 0 exactly when x is finite, NaN
        // otherwise, and the sum keeps a NaN.
        let z = t.sub(t)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        return Ok(z.is_finite());
    }
    // A strided or 8-bit CPU tensor: a copy (candle has no arithmetic on the 8-bit floats).
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(v.iter().all(|x| x.is_finite()))
}

/// Box–Muller standard normal (keeps us off rand_distr).
fn std_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Reads a JSON config file into `T`, naming the file on error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    parse_json(&text, path)
}

/// A config's JSON text (from `path`, named in errors) as `T`.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let err = |reason: String| ModelError::Config {
        path: path.to_path_buf(),
        reason,
    };
    // A byte-order mark (Notepad) is no JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // serde reads a struct from an array too, field by field in order: `[1, 2]` would become
    // vocab_size 1, hidden_size 2 and an error about those instead of the file's shape.
    if text.trim_start().starts_with('[') {
        return Err(err("expected a JSON object of settings, found an array".into()));
    }
    // Through serde_path_to_error, so that a value of the wrong type names its field
    // (`hidden_size: invalid type: string "64", expected usize`), not only a line and column.
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| match e.path().to_string() {
        p if p == "." => err(e.inner().to_string()),
        p => err(format!("{p}: {}", e.inner())),
    })?;
    // Text after the object is refused, as serde_json::from_str does.
    de.end().map_err(|e| err(e.to_string()))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed save names the file being written, as a write (it said "cannot read checkpoint"
    /// of the temporary beside it).
    #[test]
    fn a_failed_save_names_the_file_it_writes() {
        let missing = std::env::temp_dir().join(format!("spt-no-such-folder-{}", std::process::id()));
        let path = missing.join("model.safetensors");
        let t = HashMap::from([(
            "w".to_string(),
            Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        )]);
        let e = save_tensors(&t, &path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("cannot write {}", path.display())), "{e}");
    }
}
