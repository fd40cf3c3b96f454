//! Building blocks with named [`Param`]s: linear (PyTorch `[out, in]` or GPT-2 Conv1D `[in, out]`),
//! the differentiable layer norm from spt-ops, embeddings and a real dropout.

use crate::error::{ModelError, Result};
use crate::weights::{Loader, NamedParams, Param};
use candle_core::{DType, Tensor, TensorId, D};
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_ops::lora::{HeadsLayout, LoraConfig, LoraError, LoraLinear};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How a linear weight is stored in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `torch.nn.Linear`: `[out, in]`, `y = x Wᵀ + b`.
    OutIn,
    /// HF GPT-2 `Conv1D`: `[in, out]`, `y = x W + b`. Kept as stored, so gradients have the
    /// checkpoint's shape and save under the same key.
    InOut,
}

/// Rows up to which a dense [`Linear`] computes `yᵀ = W xᵀ` rather than `y = x Wᵀ`: the `gemm`
/// crate packs its right operand on every call, and with few rows packing all of `W` costs more
/// than the product (a one-off probe, MiniLM classification forward at batch 1: 64 tokens 24 →
/// 16 ms, 8 tokens 15 → 7 ms; even at 128 rows, slower from 256).
pub(crate) const FEW_ROWS: usize = 64;

/// A linear layer, optionally wrapped by LoRA ([`Linear::add_lora`]).
#[derive(Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    pub layout: WeightLayout,
    /// The LoRA wrapper (spt-ops' `LoraLinear`, holding the frozen base weight) when present.
    lora: Option<LoraLinear>,
    /// `{module}.lora_A.weight` `[r, in]` and `{module}.lora_B.weight` `[out, r]` (PEFT names),
    /// sharing the `Var`s of `lora`.
    lora_params: Vec<Param>,
    /// The LoRA input dropout drawn from the model's seed source (see [`Linear::add_lora_seeded`]).
    lora_dropout: Option<Dropout>,
    /// A frozen `OutIn` weight's contiguous `[in, out]` copy, for the CPU forward's GEMM, with
    /// the id of the tensor it was copied from (see [`Linear::gemm_weight`]).
    gemm_ready: Mutex<Option<(TensorId, Tensor)>>,
    /// A frozen weight packed for bf16 products, with the id of the tensor it was packed from
    /// (see [`Linear::packed_weight`]).
    bf16_ready: spt_ops::PackedCache,
    /// The ids of the weight and bias tensors that the LoRA wrapper holds copies of: a weight
    /// replaced through the public fields afterwards would be exported but never computed with.
    lora_base: Option<(TensorId, Option<TensorId>)>,
}

impl Linear {
    /// Loads `{prefix}.weight` and `{prefix}.bias` (base-model relative names).
    pub(crate) fn load(
        l: &mut Loader,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        layout: WeightLayout,
    ) -> Result<Self> {
        let shape = match layout {
            WeightLayout::OutIn => [out_dim, in_dim],
            WeightLayout::InOut => [in_dim, out_dim],
        };
        let weight = l.base(&format!("{prefix}.weight"), &shape)?;
        let bias = Some(l.base(&format!("{prefix}.bias"), &[out_dim])?);
        Self::new(weight, bias, layout)
    }

    /// A linear layer from its parameters: a rank-2 weight in `layout`, and a bias of one value
    /// per output.
    pub fn new(weight: Param, bias: Option<Param>, layout: WeightLayout) -> Result<Self> {
        let w = weight.tensor().dims();
        if w.len() != 2 {
            return Err(ModelError::BadInput {
                name: "Linear weight",
                reason: format!("'{}' is {w:?}, expected a matrix ({layout:?})", weight.name()),
            });
        }
        let out = match layout {
            WeightLayout::OutIn => w[0],
            WeightLayout::InOut => w[1],
        };
        if let Some(b) = &bias {
            if b.tensor().dims() != [out] {
                return Err(ModelError::ShapeMismatch {
                    name: b.name().to_string(),
                    expected: vec![out],
                    got: b.tensor().dims().to_vec(),
                });
            }
        }
        Ok(Self {
            weight,
            bias,
            layout,
            lora: None,
            lora_params: Vec::new(),
            lora_dropout: None,
            gemm_ready: Mutex::new(None),
            bf16_ready: Default::default(),
            lora_base: None,
        })
    }

    /// The module name (the weight's name without `.weight`).
    pub fn module_name(&self) -> &str {
        self.weight
            .name()
            .strip_suffix(".weight")
            .unwrap_or(self.weight.name())
    }

    /// The weight as `[out, in]` (a view for `InOut`).
    pub fn weight_out_in(&self) -> Result<Tensor> {
        Ok(match self.layout {
            WeightLayout::OutIn => self.weight.tensor().clone(),
            WeightLayout::InOut => self.weight.tensor().t()?,
        })
    }

    /// A second handle on this layer: the same weight and bias (tensors and `Var`s shared), for
    /// building another form of it beside this one. A layer with a LoRA adapter is refused.
    pub(crate) fn share_weights(&self) -> Result<Linear> {
        if self.lora.is_some() {
            return Err(ModelError::InvalidConfig {
                field: "lora",
                value: self.module_name().to_string(),
                reason: "a layer with a LoRA adapter cannot be shared".into(),
            });
        }
        Self::new(self.weight.clone(), self.bias.clone(), self.layout)
    }

    /// Wraps the layer with LoRA: `y = x Wᵀ + b + (α/r)·dropout(x) Aᵀ Bᵀ`, B zero-initialised.
    /// The base weight and bias are frozen (kept under their HF names for export); A and B are
    /// new trainable parameters named `{module}.lora_A.weight` / `{module}.lora_B.weight`, in no
    /// `VarMap` ([`NamedParams::add_to_var_map`] puts them in one). `cfg.seed` draws A: give each
    /// layer its own (`sparsify` does), or every layer starts from the same A. Set the base
    /// weight before: the adapter computes with the base it is given here (a weight replaced
    /// through this layer later is refused; the `Var` it came from must not be written).
    pub fn add_lora(&mut self, cfg: LoraConfig) -> Result<()> {
        // Checked before the base is frozen: a refused adapter leaves the layer as it was.
        self.check_lora(&cfg)?;
        let w = self.weight_out_in()?.contiguous()?;
        self.weight.freeze();
        if let Some(b) = &mut self.bias {
            b.freeze();
        }
        let lora = LoraLinear::new(&w, self.bias.as_ref().map(|b| b.tensor()), cfg)?;
        let m = self.module_name().to_string();
        self.lora_params = vec![
            Param::from_var(format!("{m}.lora_A.weight"), lora.lora_a().clone()),
            Param::from_var(format!("{m}.lora_B.weight"), lora.lora_b().clone()),
        ];
        self.lora = Some(lora);
        self.lora_base = Some(self.base_ids());
        // The adapter's op reads the weight from now on: the forward's copy is never read again.
        *self.gemm_ready.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        self.bf16_ready = Default::default();
        Ok(())
    }

    fn base_ids(&self) -> (TensorId, Option<TensorId>) {
        (
            self.weight.tensor().id(),
            self.bias.as_ref().map(|b| b.tensor().id()),
        )
    }

    /// Refuses to compute with (or merge into) the LoRA wrapper's base when the public weight or
    /// bias was replaced after [`Linear::add_lora`]: the wrapper computes with its own copy.
    fn check_lora_base(&self) -> Result<()> {
        match self.lora_base {
            Some(ids) if ids != self.base_ids() => Err(ModelError::InvalidConfig {
                field: "lora",
                value: self.module_name().to_string(),
                reason: "its weight or bias was replaced after add_lora, but the adapter \
                         computes with the base it was given: set the base weights before \
                         add_lora"
                    .into(),
            }),
            _ => Ok(()),
        }
    }

    /// Whether [`Linear::add_lora`] would take `cfg`: no adapter yet, a valid config, a rank
    /// within the weight's.
    pub(crate) fn check_lora(&self, cfg: &LoraConfig) -> Result<()> {
        if self.lora.is_some() {
            return Err(ModelError::InvalidConfig {
                field: "lora",
                value: self.module_name().to_string(),
                reason: "this layer already has a LoRA adapter".into(),
            });
        }
        cfg.check(self.module_name())?;
        let (out, d_in) = (self.out_features(), self.in_features());
        if cfg.rank > out.min(d_in) {
            return Err(ModelError::InvalidConfig {
                field: "lora_rank",
                value: cfg.rank.to_string(),
                reason: format!(
                    "{} is [{out}, {d_in}]: a LoRA rank above min(out, in) = {} adds nothing",
                    self.module_name(),
                    out.min(d_in)
                ),
            });
        }
        Ok(())
    }

    /// [`Linear::add_lora`] with the LoRA input dropout drawn from a shared seed source (the
    /// model's, so `seed_dropout` makes LoRA dropout reproducible too).
    pub fn add_lora_seeded(&mut self, cfg: LoraConfig, rng: Arc<DropoutRng>) -> Result<()> {
        self.add_lora(cfg)?;
        self.lora_dropout = Some(Dropout::with_rng(cfg.dropout as f64, rng)?);
        Ok(())
    }

    /// The LoRA wrapper, if any.
    pub fn lora(&self) -> Option<&LoraLinear> {
        self.lora.as_ref()
    }

    /// For inference: the adapter reads its factors detached ([`LoraLinear::freeze`]). Returns
    /// whether there was one.
    pub fn freeze_lora(&mut self) -> bool {
        self.lora.as_mut().map(LoraLinear::freeze).is_some()
    }

    /// Folds the LoRA update into the (frozen) weight for inference or export; the exported
    /// weight is then `W + (α/r)·B A`. Errors if there is no adapter or it is already merged.
    pub fn merge_lora(&mut self) -> Result<()> {
        self.check_lora_base()?;
        let lora = self.lora.as_mut().ok_or_else(|| no_lora(&self.weight))?;
        lora.merge().map_err(lora_err)?;
        self.sync_merged_weight()
    }

    /// Undoes [`Linear::merge_lora`].
    pub fn unmerge_lora(&mut self) -> Result<()> {
        self.check_lora_base()?;
        let lora = self.lora.as_mut().ok_or_else(|| no_lora(&self.weight))?;
        lora.unmerge().map_err(lora_err)?;
        self.sync_merged_weight()
    }

    /// Copies LoRA's current base weight (merged or not) back into `weight`, in its layout.
    fn sync_merged_weight(&mut self) -> Result<()> {
        if let Some(lora) = &self.lora {
            let w = match self.layout {
                WeightLayout::OutIn => lora.weight().clone(),
                WeightLayout::InOut => lora.weight().t()?.contiguous()?,
            };
            self.weight = Param::frozen(self.weight.name().to_string(), &w);
            self.lora_base = Some(self.base_ids());
        }
        Ok(())
    }

    /// (0 for a weight that is not a matrix, set by hand through the public field: the forward
    /// then fails in candle's matmul, naming the shapes.)
    pub fn in_features(&self) -> usize {
        self.weight_dim(false)
    }

    /// (0 for a weight that is not a matrix; see [`Linear::in_features`].)
    pub fn out_features(&self) -> usize {
        self.weight_dim(true)
    }

    /// The weight's output (`out`) or input dimension, by its layout.
    fn weight_dim(&self, out: bool) -> usize {
        let d = self.weight.tensor().dims();
        let i = match (self.layout, out) {
            (WeightLayout::OutIn, true) | (WeightLayout::InOut, false) => 0,
            _ => 1,
        };
        if d.len() == 2 {
            d[i]
        } else {
            0
        }
    }

    /// The weight as `[in, out]` (a view for `OutIn`).
    pub fn weight_in_out(&self) -> Result<Tensor> {
        Ok(match self.layout {
            WeightLayout::OutIn => self.weight.tensor().t()?,
            WeightLayout::InOut => self.weight.tensor().clone(),
        })
    }

    /// The weight as `[in, out]` for the forward's GEMM. A frozen `OutIn` weight on the CPU is
    /// copied into that layout on first use and the copy kept (a frozen weight is constant; a
    /// new one, by id, is copied again): the `gemm` crate splits a product over a transposed
    /// view less evenly on 2 threads (a probe, 870 × 384 × 1536: 259 → 315 GFLOP/s; MiniLM
    /// classification in sorted batches of 32: 2.84 / 2.83 → 2.73 / 2.62 s, two A/B pairs). A
    /// trainable weight changes every step, and cuBLAS reads the view as it is: both use it.
    /// The copy costs one more `[out, in]` of memory per frozen layer (~42 MB for MiniLM-L6's
    /// dense linears), and it assumes a frozen weight is not changed in place (a `Var` it was
    /// frozen from, see [`Param::freeze`], must not be stepped afterwards).
    fn gemm_weight(&self) -> Result<Tensor> {
        let w = self.weight.tensor();
        if self.layout == WeightLayout::InOut || self.weight.is_trainable() || !w.device().is_cpu() {
            return self.weight_in_out();
        }
        let mut ready = self.gemm_ready.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = ready.as_ref().filter(|(id, _)| *id == w.id()) {
            return Ok(t.clone());
        }
        let t = w.t()?.contiguous()?;
        *ready = Some((w.id(), t.clone()));
        Ok(t)
    }

    /// The weight packed for bf16 products ([`spt_ops::packed_linear`]) when this forward of `x`
    /// takes them: `MatmulPrecision::Bf16`, a frozen f32 weight on the CPU, nothing tracked
    /// (inference). Packed on first use and kept, as [`Linear::gemm_weight`] keeps its copy
    /// (half its bytes); a new weight, by id, is packed again.
    fn packed_weight(&self, x: &Tensor) -> Result<Option<spt_ops::PackedWeight>> {
        let w = self.weight.tensor();
        let untracked = !x.track_op() && self.bias.as_ref().is_none_or(|b| !b.tensor().track_op());
        if spt_ops::matmul_precision() != spt_ops::MatmulPrecision::Bf16
            || self.weight.is_trainable()
            || w.track_op()
            || !untracked
            || !w.device().is_cpu()
            || w.dtype() != DType::F32
            || x.dtype() != DType::F32
            || self.in_features() == 0
            || self.out_features() == 0
        {
            return Ok(None);
        }
        Ok(Some(self.bf16_ready.get_or_pack(&self.weight_out_in()?)?))
    }

    /// `x [.., in] → [.., out]` (with the LoRA adapter's dropout active when `train`).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // p is checked in training whether or not the adapter is merged, as forward_t_parts does.
        let dropout_active = match (&self.lora, &self.lora_dropout) {
            (Some(l), Some(d)) => d.is_active(train)? && !l.is_merged(),
            _ => false,
        };
        match (&self.lora, &self.lora_dropout) {
            (Some(l), Some(d)) if dropout_active => {
                // LoraLinear's formula, with the model's seeded dropout on the LoRA input.
                self.check_input(x)?;
                Ok(l.forward_with_lora_input(x, &d.forward_t(x, true)?)?)
            }
            (Some(l), _) => {
                self.check_input(x)?;
                Ok(l.forward_t(x, train)?)
            }
            (None, _) => self.forward_with(x, !train),
        }
    }

    /// [`Linear::forward_t`]'s output split into `parts` equal pieces along the last dimension
    /// (GPT-2's fused q|k|v; 1 for the whole output), with x read from and the pieces written
    /// to the attention-head layout as `layout` says (the same values as `merge_heads` before
    /// and `split_heads` after). With an unmerged LoRA adapter and no active LoRA dropout this
    /// is one op per piece (`LoraLinear::forward_parts`: no narrow or head-layout node in the
    /// graph, so no padded or extra gradients in the backward); otherwise it is composed.
    pub fn forward_t_parts(
        &self,
        x: &Tensor,
        parts: usize,
        layout: HeadsLayout,
        train: bool,
    ) -> Result<Vec<Tensor>> {
        let dropout_active = match &self.lora_dropout {
            Some(d) => d.is_active(train)?,
            None => false,
        };
        if let Some(l) = self.lora.as_ref().filter(|_| !dropout_active) {
            if layout.input_heads {
                self.check_lora_base()?;
            } else {
                self.check_input(x)?;
            }
            return Ok(l.forward_parts(x, parts, layout, train)?);
        }
        let out = self.out_features();
        if parts == 0 || !out.is_multiple_of(parts) {
            return Err(ModelError::InvalidConfig {
                field: "parts",
                value: parts.to_string(),
                reason: format!(
                    "{} has {out} outputs, not divisible into {parts} parts",
                    self.module_name()
                ),
            });
        }
        spt_ops::heads::compose_parts(x, parts, layout, |x| self.forward_t(x, train))
    }

    /// [`Linear::forward_t_parts`] with one part.
    pub fn forward_t_heads(&self, x: &Tensor, layout: HeadsLayout, train: bool) -> Result<Tensor> {
        let mut y = self.forward_t_parts(x, 1, layout, train)?;
        Ok(y.remove(0))
    }

    /// (Called on the LoRA paths, so it checks the adapter's base too.)
    fn check_input(&self, x: &Tensor) -> Result<()> {
        self.check_lora_base()?;
        if x.dims().last() != Some(&self.in_features()) {
            return Err(ModelError::ShapeMismatch {
                name: format!("input of {}", self.weight.name()),
                expected: vec![self.in_features()],
                got: x.dims().last().map(|&d| vec![d]).unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// `x [.., in] → [.., out]`, eval mode. Up to 64 rows it computes `yᵀ = W xᵀ` (`FEW_ROWS`);
    /// under `MatmulPrecision::Bf16` a frozen layer with nothing tracked multiplies with its
    /// packed bf16 weight.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, true)
    }

    /// [`Linear::forward`], with the packed bf16 weight only where `packed` (evaluation: a
    /// training forward keeps the f32 products even through a frozen layer).
    fn forward_with(&self, x: &Tensor, packed: bool) -> Result<Tensor> {
        if let Some(l) = &self.lora {
            self.check_input(x)?;
            return Ok(l.forward_t(x, false)?);
        }
        let dims = x.dims().to_vec();
        let Some((&in_dim, lead)) = dims.split_last() else {
            return Err(ModelError::BadInput {
                name: "linear input",
                reason: "scalar input".into(),
            });
        };
        if in_dim != self.in_features() {
            return Err(ModelError::ShapeMismatch {
                name: format!("input of {}", self.weight.name()),
                expected: vec![self.in_features()],
                got: vec![in_dim],
            });
        }
        if let Some(p) = packed.then(|| self.packed_weight(x)).transpose()?.flatten() {
            return Ok(spt_ops::packed_linear(
                x,
                &p,
                self.bias.as_ref().map(|b| b.tensor()),
            )?);
        }
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let y = if let (Some(b), false) = (&self.bias, rows <= FEW_ROWS) {
            // The bias is the GEMM's starting value when nothing is tracked (inference).
            spt_ops::matmul_bias(&x2, &self.gemm_weight()?, b.tensor())?
        } else {
            let y = if rows <= FEW_ROWS {
                spt_ops::lora::few_rows_matmul(&x2, &self.weight_out_in()?)?.contiguous()?
            } else {
                x2.matmul(&self.gemm_weight()?)?
            };
            match &self.bias {
                // spt-ops' op: candle's broadcast_add sums the bias gradient with a strided loop.
                Some(b) => spt_ops::bias_add(&y, b.tensor())?,
                None => y,
            }
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features());
        Ok(y.reshape(out_dims)?)
    }
}

impl NamedParams for Linear {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        f(&self.weight);
        if let Some(b) = &self.bias {
            f(b);
        }
        self.lora_params.iter().for_each(f);
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        // With LoRA the base weight lives frozen inside the wrapper: unfreezing it here would
        // not train it, so only the adapter's parameters are offered.
        if self.lora.is_none() {
            f(&mut self.weight);
            if let Some(b) = &mut self.bias {
                f(b);
            }
        }
        self.lora_params.iter_mut().for_each(f);
    }
}

fn no_lora(w: &Param) -> ModelError {
    ModelError::InvalidConfig {
        field: "lora",
        value: w.name().to_string(),
        reason: "this layer has no LoRA adapter".into(),
    }
}

pub(crate) fn lora_err(e: LoraError) -> ModelError {
    match e {
        LoraError::Candle(c) => ModelError::Candle(c),
        other => ModelError::Lora(other.to_string()),
    }
}

/// Layer norm over the last dimension with an exact backward (`spt_ops::layer_norm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f64,
}

impl LayerNorm {
    pub(crate) fn load(l: &mut Loader, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: l.base(&format!("{prefix}.weight"), &[dim])?,
            bias: l.base(&format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(spt_ops::layer_norm(
            x,
            self.weight.tensor(),
            self.bias.tensor(),
            self.eps,
        )?)
    }

    /// `LayerNorm(dropout(x) + residual)`, the end of a post-LN sublayer, as one op
    /// (`spt_ops::residual_layer_norm`).
    pub fn forward_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        dropout: &Dropout,
        train: bool,
    ) -> Result<Tensor> {
        Ok(spt_ops::residual_layer_norm(
            x,
            residual,
            self.weight.tensor(),
            self.bias.tensor(),
            self.eps,
            dropout.seeded(train)?,
        )?)
    }
}

impl NamedParams for LayerNorm {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        f(&self.weight);
        f(&self.bias);
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.weight);
        f(&mut self.bias);
    }
}

/// A lookup table `[num, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Param,
}

impl Embedding {
    pub(crate) fn load(l: &mut Loader, name: &str, num: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: l.base(&format!("{name}.weight"), &[num, dim])?,
        })
    }

    /// (0 for a weight set by hand that has no rows dimension.)
    pub fn num_embeddings(&self) -> usize {
        self.weight.tensor().dims().first().copied().unwrap_or(0)
    }

    /// `ids [B, L]` (an integer dtype, each id below `num_embeddings`) → `[B, L, dim]`; other
    /// ids are a named error.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = check_ids(ids, "ids", "embedding", self.num_embeddings(), "num_embeddings")?;
        self.forward_checked(&ids)
    }

    /// [`Embedding::forward`] for u32 ids the model has already range-checked (one host read of
    /// the ids per forward, not one per embedding).
    pub(crate) fn forward_checked(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let e = self.weight.tensor().index_select(&flat, 0)?;
        Ok(e.reshape((b, l, ()))?)
    }
}

impl NamedParams for Embedding {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        f(&self.weight);
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.weight);
    }
}

/// The seed source shared by all dropouts of a model: a base seed and a call counter, so each
/// dropout call gets its own mask and a training run is reproducible (candle's CPU RNG cannot be
/// seeded). Reseed it per step (`seed_dropout` on the models) to make a resumed run repeat the
/// same masks.
#[derive(Debug, Default)]
pub struct DropoutRng {
    base: AtomicU64,
    calls: AtomicU64,
}

impl DropoutRng {
    /// A seed source whose masks start from `seed`.
    pub fn seeded(seed: u64) -> Self {
        let rng = Self::default();
        rng.seed(seed);
        rng
    }

    /// Restarts the sequence of masks from `seed`.
    pub fn seed(&self, seed: u64) {
        self.base.store(seed, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
    }

    fn next(&self) -> u64 {
        let c = self.calls.fetch_add(1, Ordering::Relaxed);
        // splitmix64 of (base, call): well-spread seeds for consecutive calls.
        let mut z = self.base.load(Ordering::Relaxed) ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Inverted dropout with seeded masks, active only when `train` is true: each element is zeroed
/// with probability `p`, the rest scaled by `1/(1−p)`; differentiable in the input.
#[derive(Debug, Clone)]
pub struct Dropout {
    /// In `[0, 1)`; a value set outside it is an error at the next training forward.
    pub p: f32,
    rng: Arc<DropoutRng>,
}

impl Dropout {
    /// A dropout with its own seed source, seeded apart from every other one made by `new` in
    /// this process (by the order they are made), so that layers built this way draw their own
    /// masks: with one seed each, the same call of every layer would drop the same positions.
    /// Give dropouts a shared [`DropoutRng`] ([`Dropout::with_rng`]) to reseed them together.
    pub fn new(p: f64) -> Result<Self> {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        // Far apart from the small seeds a user passes to `DropoutRng::seed`.
        let seed = n.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03);
        Self::with_rng(p, Arc::new(DropoutRng::seeded(seed)))
    }

    /// A dropout drawing its masks from a shared seed source.
    pub fn with_rng(p: f64, rng: Arc<DropoutRng>) -> Result<Self> {
        // Kept as f32: a p just below 1 (0.99999999) would round to 1 and drop everything.
        if !(0.0..1.0).contains(&p) || p as f32 >= 1.0 {
            return Err(ModelError::InvalidConfig {
                field: "dropout",
                value: p.to_string(),
                reason: "must be in [0, 1)".into(),
            });
        }
        Ok(Self { p: p as f32, rng })
    }

    /// Whether this call drops anything: `train` and `p > 0`. With `train`, `p` is checked
    /// first: it is a public field, and outside `[0, 1)` (NaN included) the mask would scale
    /// without dropping (p < 0), zero everything (p = 1) or give NaN, as the fused ops refuse.
    pub fn is_active(&self, train: bool) -> Result<bool> {
        if !train {
            return Ok(false);
        }
        if !(0.0..1.0).contains(&self.p) {
            return Err(ModelError::InvalidConfig {
                field: "Dropout.p",
                value: self.p.to_string(),
                reason: "must be in [0, 1)".into(),
            });
        }
        Ok(self.p > 0.0)
    }

    /// This call's mask for spt-ops' fused ops (flash attention, residual layer norm): a seed
    /// from the same sequence as the masks [`Dropout::forward_t`] draws; `None` when inactive.
    /// An error for a `p` outside `[0, 1)` in training.
    pub fn seeded(&self, train: bool) -> Result<Option<spt_ops::SeededDropout>> {
        Ok(self.is_active(train)?.then(|| spt_ops::SeededDropout {
            p: self.p as f64,
            seed: self.rng.next(),
        }))
    }

    /// `residual + dropout(x)`, the end of a pre-LN sublayer, as one op
    /// (`spt_ops::residual_dropout`: the mask is a counter hash of this call's seed, not stored).
    pub fn residual_add(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        Ok(spt_ops::residual_dropout(x, residual, self.seeded(train)?)?)
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !self.is_active(train)? {
            return Ok(x.clone());
        }
        let mut rng = StdRng::seed_from_u64(self.rng.next());
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f32>() < self.p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }
}

/// Checks that `ids` is an integer `[B, L]` tensor with values in `0..size`; returns it as u32.
pub(crate) fn check_ids(
    ids: &Tensor,
    name: &'static str,
    what: &'static str,
    size: usize,
    field: &'static str,
) -> Result<Tensor> {
    if ids.rank() != 2 {
        return Err(ModelError::BadInput {
            name,
            reason: format!("expected [batch, seq_len], got {:?}", ids.dims()),
        });
    }
    if !ids.dtype().is_int() {
        return Err(ModelError::BadInput {
            name,
            reason: format!(
                "expected an integer dtype (u8, u32, i16, i32 or i64), got {:?}",
                ids.dtype()
            ),
        });
    }
    if ids.elem_count() == 0 {
        return Err(ModelError::BadInput {
            name,
            reason: format!(
                "is {:?}: an empty batch or sequence; give at least one token",
                ids.dims()
            ),
        });
    }
    // candle casts i16 / i32 only on the CPU (its CUDA kernels have none): widened there, a
    // copy of a [B, L] index tensor that the bounds check reads back anyway.
    let ids = match ids.dtype() {
        DType::I16 | DType::I32 => ids
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::I64)?
            .to_device(ids.device())?,
        _ => ids.clone(),
    };
    {
        let as_i64 = ids.to_dtype(DType::I64)?.flatten_all()?;
        // One read of both bounds: one host synchronisation per batch on a GPU.
        let bounds = Tensor::stack(&[as_i64.max(0)?, as_i64.min(0)?], 0)?.to_vec1::<i64>()?;
        let (max, min) = (bounds[0], bounds[1]);
        if min < 0 {
            return Err(ModelError::TokenOutOfRange {
                what,
                id: min,
                size,
                field,
            });
        }
        if max as u64 >= size as u64 {
            return Err(ModelError::TokenOutOfRange {
                what,
                id: max,
                size,
                field,
            });
        }
    }
    Ok(ids.to_dtype(DType::U32)?)
}

/// Checks an optional `[B, L]` mask against the ids' shape. Its 0/1 values are checked where
/// they are read ([`binary_mask_values`]): by `PreparedMask::new` in every forward, by the
/// next-token targets of a loss. It keeps its own dtype: converted to an f16 model's first, a
/// stray 1e-8 would read as padding and 0.9999 as "attend", unchecked.
pub(crate) fn check_mask(mask: Option<&Tensor>, dims: (usize, usize)) -> Result<Option<Tensor>> {
    let Some(m) = mask else { return Ok(None) };
    if m.dims() != [dims.0, dims.1] {
        return Err(ModelError::BadInput {
            name: "attention_mask",
            reason: format!("expected shape [{}, {}], got {:?}", dims.0, dims.1, m.dims()),
        });
    }
    Ok(Some(m.detach()))
}

/// The values of a `[B, L]` attention mask (one host read), refusing any but 0 and 1: HF's
/// additive form (0 to attend, −10000 or −inf to skip) read as 0/1 would invert the mask,
/// silently.
pub(crate) fn binary_mask_values(m: &Tensor) -> Result<Vec<f64>> {
    let cols = m.dims().last().copied().unwrap_or(1).max(1);
    // f64 holds every value of every mask dtype exactly (i64 past 2^53 is not 0 or 1 either way).
    let values = m.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if let Some(i) = values.iter().position(|&x| x != 0.0 && x != 1.0) {
        return Err(ModelError::BadInput {
            name: "attention_mask",
            reason: format!(
                "holds {} at [{}, {}]; expected 1 (attend) or 0 (padding), as HF tokenizers give it, \
                 not an additive mask (0 / -10000)",
                values[i],
                i / cols,
                i % cols
            ),
        });
    }
    Ok(values)
}

/// `log_softmax` over the last dim with the max detached (cheaper backward, same gradient).
pub(crate) fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `ModuleT` (not `Module`): candle's blanket `ModuleT` for a `Module` would drop the train flag.
impl candle_core::ModuleT for Linear {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(Linear::forward_t(self, xs, train)?)
    }
}

impl candle_core::Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        Ok(Embedding::forward(self, ids)?)
    }
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        Ok(LayerNorm::forward(self, xs)?)
    }
}

impl candle_core::ModuleT for Dropout {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(Dropout::forward_t(self, xs, train)?)
    }
}
