//! LoRA: `y = x Wᵀ + b + (α/r)·(dropout(x) Aᵀ) Bᵀ` with W, b frozen and A `[r, in]`, B `[out, r]`
//! trainable; plus a frozen-aware dense [`linear`] and a seeded, differentiable [`dropout`].
//!
//! Fixes of the SPT reference implementation's LoRA: A is Kaiming-uniform (not
//! N(0, 1)), the α/r scale and dropout are applied, and the unmerged forward scales only the LoRA
//! path, so merged and unmerged forwards agree for any α ≠ r.

mod fused;

pub use fused::{lora_linear, lora_linear_heads, HeadsLayout};
pub(crate) use fused::{merged_column_blocks, merged_into, merged_t, merged_t_blocks};

use crate::routed_ffn::{gather_matmul, Routing};
use crate::util::{check_float, check_same, read_var};
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// LoRA hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank r of the update B·A.
    pub rank: usize,
    /// α: the update is scaled by α/r.
    pub alpha: f64,
    /// Dropout probability on the LoRA path's input (train mode only).
    pub dropout: f32,
    /// Seed of A's initialisation and of the dropout masks.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 16.0,
            dropout: 0.0,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// The update scale α/r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Refuses rank 0, a non-finite alpha and a dropout outside `[0, 1)`, naming `op`.
    pub fn check(&self, op: &str) -> Result<()> {
        if self.rank == 0 {
            bail!("{op}: LoRA rank must be at least 1");
        }
        // The update is scaled in the weights' precision: an α/r past f32's range is inf there.
        if !(self.alpha.is_finite() && self.scale().abs() <= f32::MAX as f64) {
            bail!(
                "{op}: LoRA alpha must be finite, with alpha / rank within f32's range, got {}",
                self.alpha
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("{op}: LoRA dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }
}

/// Errors of merging a LoRA update into its frozen weight.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("lora: the update is already merged into the weight")]
    AlreadyMerged,
    #[error("lora: the update is not merged into the weight")]
    NotMerged,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A seeded `U(−bound, bound)` tensor.
pub(crate) fn uniform(shape: &[usize], bound: f64, seed: u64, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random_range(-bound..=bound)).collect();
    Tensor::from_vec(data, shape, dev)?.to_dtype(dtype)
}

/// Inverted dropout with a seeded mask: each element is zeroed with probability `p` and the rest
/// scaled by `1/(1−p)`. Differentiable in `x` (the mask is a constant). `p = 0` returns `x`.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if p == 0.0 {
        return Ok(x.clone());
    }
    if !(0.0..1.0).contains(&p) {
        bail!("dropout: probability must be in [0, 1), got {p}");
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p as f64);
    let mask: Vec<f64> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// Per-layer dropout seeds: a salt, a base seed and a call counter, so masks differ per call but
/// a run is reproducible. [`DropoutSeeds::reseed`] restarts the sequence (once per training step),
/// so a resumed run draws the same masks as an uninterrupted one.
#[derive(Debug)]
pub(crate) struct DropoutSeeds {
    salt: u64,
    base: AtomicU64,
    calls: AtomicU64,
}

impl DropoutSeeds {
    pub(crate) fn new(salt: u64) -> Self {
        Self {
            salt,
            base: AtomicU64::new(salt),
            calls: AtomicU64::new(0),
        }
    }

    /// Restarts the masks from `seed` (mixed with this layer's salt).
    pub(crate) fn reseed(&self, seed: u64) {
        self.base.store(
            self.salt ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93),
            Ordering::Relaxed,
        );
        self.calls.store(0, Ordering::Relaxed);
    }

    pub(crate) fn next(&self) -> u64 {
        let c = self.calls.fetch_add(1, Ordering::Relaxed);
        self.base.load(Ordering::Relaxed)
            ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(0x2545_F491_4F6C_DD1D)
    }
}

/// Dense `x Wᵀ + b` for `x [.., in]`, `W [out, in]`, `b [out]`, whose backward computes only the
/// gradients of tracked inputs: a frozen W costs no weight-gradient GEMM (candle's matmul
/// backward always computes both operands' gradients).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let op = "linear";
    check_float(op, "x", x)?;
    check_same(op, &[("x", x), ("w", w)])?;
    let (out, d_in) = match w.dims() {
        &[o, i] => (o, i),
        d => bail!("{op}: w is {d:?}, expected [out, in]"),
    };
    let dims = x.dims().to_vec();
    if dims.last() != Some(&d_in) {
        bail!("{op}: x is {dims:?}, expected [.., {d_in}] to match w [{out}, {d_in}]");
    }
    if out == 0 {
        bail!("{op}: w is [0, {d_in}], expected at least one output");
    }
    if let Some(b) = b {
        check_same(op, &[("x", x), ("b", b)])?;
        if b.dims() != [out] {
            bail!(
                "{op}: b is {:?}, expected [{out}] to match w [{out}, {d_in}]",
                b.dims()
            );
        }
    }
    if !x.device().is_cpu() {
        // No fused kernel off the CPU: candle's matmul (its backward also forms dW).
        let y = x.broadcast_matmul(&w.t()?)?;
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let t: usize = dims[..dims.len() - 1].iter().product();
    let routing = Arc::new(Routing::from_blocks(t, 1, 1, vec![0; t])?);
    let y = gather_matmul(&x.reshape((t, d_in))?, w, b, &routing)?;
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = out;
    }
    y.reshape(out_dims)
}

/// `x · wᵀ` for `x [rows, in]` with few rows and a weight `w [out, in]`, read in place. On the
/// CPU, when w's rows lie contiguously, as `(w · xᵀ)ᵀ`: gemm packs its right operand on every
/// call, and with few rows packing all of `w` costs more than the product (or gathers `wᵀ` one
/// strided element at a time). Untracked f32/f64 comes back contiguous (a tiled transpose), a
/// tracked product as the transposed view. The routed FFN's per-block GEMMs and spt-models'
/// dense `Linear` up to 64 rows use it, and so does a GPT-2's head when it decodes.
///
/// One row with nothing to differentiate (decoding) is a matrix-vector product bound by reading
/// `w`: on the CPU it runs on every thread (`gemv`), where candle's matmul would run it on one.
pub fn few_rows_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.rank() != 2 {
        candle_core::bail!("few_rows_matmul: w is {:?}, expected [out, in]", w.dims());
    }
    if x.device().is_cpu() {
        if let Some(y) = one_frozen_row(x, w)? {
            return Ok(y);
        }
        if w.stride()[1] == 1 {
            let y = w.matmul(&x.t()?)?.t()?;
            return Ok(untracked_row_major(&y)?.unwrap_or(y));
        }
    }
    x.matmul(&w.t()?)
}

/// `t` as a new contiguous tensor when it is an untracked f32/f64 CPU matrix, through
/// `blas::row_major` (a transposed view goes through the tiled transpose); `None` otherwise. Why:
/// `(w xᵀ)ᵀ` is a transposed view, and `Tensor::contiguous` copies it one strided element at a
/// time: 15 % of a one-text BERT forward. A tracked tensor keeps the view (its copy is candle's,
/// with a backward).
fn untracked_row_major(t: &Tensor) -> Result<Option<Tensor>> {
    if t.track_op() || !t.device().is_cpu() {
        return Ok(None);
    }
    let op = "few_rows_matmul";
    Ok(match t.dtype() {
        DType::F32 => Some(Tensor::from_vec(
            crate::blas::row_major::<f32>(op, t)?,
            t.dims(),
            t.device(),
        )?),
        DType::F64 => Some(Tensor::from_vec(
            crate::blas::row_major::<f64>(op, t)?,
            t.dims(),
            t.device(),
        )?),
        _ => None,
    })
}

/// `x · wᵀ` for one untracked row `x [1, in]` and an untracked `w [out, in]` of the same float
/// dtype that is contiguous, or the transposed view of a contiguous `[in, out]` (GPT-2's
/// Conv1D layout), on every thread (`gemv`); `None` for anything else.
fn one_frozen_row(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (out, d_in) = w.dims2()?;
    if x.dims() != [1, d_in]
        || out == 0
        || d_in == 0
        || !w.device().is_cpu()
        || x.track_op()
        || w.track_op()
        || x.dtype() != w.dtype()
        || !matches!(x.dtype(), DType::F32 | DType::F64)
    {
        return Ok(None);
    }
    let in_out = w.t()?;
    let (data, out_in) = if w.is_contiguous() {
        (w, true)
    } else if in_out.is_contiguous() {
        (&in_out, false)
    } else {
        return Ok(None);
    };
    fn run<T: crate::simd::Vector + candle_core::WithDType>(
        x: &Tensor,
        data: &Tensor,
        out_in: bool,
        out: usize,
    ) -> Result<Tensor> {
        let y = crate::util::with_slices::<T, _>("few_rows_matmul", &[x, data], |s| {
            let mut y = vec![T::zero(); out];
            if out_in {
                crate::gemv::rows_dot(s[1], s[0], &mut y);
            } else {
                crate::gemv::cols_axpy(s[1], s[0], &mut y);
            }
            Ok(y)
        })?;
        Tensor::from_vec(y, (1, out), x.device())
    }
    Ok(Some(match x.dtype() {
        DType::F64 => run::<f64>(x, data, out_in, out)?,
        _ => run::<f32>(x, data, out_in, out)?,
    }))
}

/// The merged update `(α/r)·B A` `[out, in]` of factors A `[r, in]`, B `[out, r]` (detached): what
/// merging adds to W, for [`LoraLinear`] and the routed FFN's fc1 / fc2 alike.
pub fn delta_weight(a: &Var, b: &Var, cfg: &LoraConfig) -> Result<Tensor> {
    b.as_tensor().detach().matmul(&a.as_tensor().detach())? * cfg.scale()
}

/// A linear layer with a frozen base weight and a trainable low-rank update.
#[derive(Debug)]
pub struct LoraLinear {
    w: Tensor,
    bias: Option<Tensor>,
    a: Var,
    b: Var,
    cfg: LoraConfig,
    merged: bool,
    /// Inference only: A and B are read detached, so no op records them.
    frozen: bool,
    seeds: DropoutSeeds,
    /// Once frozen, `W + s·B A` (or the merged W) packed for bf16 products on first use (see
    /// [`LoraLinear::packed_weight`]); emptied by merging and unmerging.
    packed: OnceLock<crate::PackedWeight>,
}

impl LoraLinear {
    /// Wraps the frozen `w [out, in]` and `bias [out]` (both detached here, so they never get a
    /// gradient). A `[r, in]` is Kaiming-uniform with a = √5 (PyTorch's `nn.Linear`/PEFT
    /// default, i.e. `U(−1/√in, 1/√in)`), seeded by `cfg.seed`; B `[out, r]` is zero.
    pub fn new(w: &Tensor, bias: Option<&Tensor>, cfg: LoraConfig) -> Result<Self> {
        let op = "lora_linear";
        cfg.check(op)?;
        check_float(op, "w", w)?;
        let (out, d_in) = match w.dims() {
            &[o, i] if o > 0 && i > 0 => (o, i),
            d => bail!("{op}: w is {d:?}, expected [out, in] with out, in ≥ 1"),
        };
        if let Some(bias) = bias {
            check_same(op, &[("w", w), ("bias", bias)])?;
            if bias.dims() != [out] {
                bail!("{op}: bias is {:?}, expected [{out}]", bias.dims());
            }
        }
        // As the routed FFN's LoRA: a rank past both dimensions adds nothing a full-rank update
        // lacks, and an absurd one would abort on allocation.
        if cfg.rank > out.min(d_in) {
            bail!(
                "{op}: LoRA rank {} is above min(out, in) = {} of w {:?}",
                cfg.rank,
                out.min(d_in),
                w.dims()
            );
        }
        let (dt, dev) = (w.dtype(), w.device());
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Var::from_tensor(&uniform(&[cfg.rank, d_in], bound, cfg.seed, dt, dev)?)?;
        let b = Var::zeros((out, cfg.rank), dt, dev)?;
        Ok(Self {
            w: w.detach(),
            bias: bias.map(|b| b.detach()),
            a,
            b,
            cfg,
            merged: false,
            frozen: false,
            seeds: DropoutSeeds::new(cfg.seed ^ 0x5EED),
            packed: OnceLock::new(),
        })
    }

    /// For inference: the forward reads A and B detached, so with a frozen base nothing records
    /// a graph (candle has no no-grad mode; an op records whenever an input is a `Var`). Their
    /// values, `lora_a` / `lora_b`, merging and saving are unchanged. Under
    /// `MatmulPrecision::Bf16` the evaluation forward multiplies by `W + s·B A` packed once
    /// ([`packed_linear`](fn@crate::packed_linear)): A and B must not be changed after this.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// The layer's whole weight packed for bf16 products, when this forward of `x` takes them:
    /// frozen, evaluation, `MatmulPrecision::Bf16`, f32 on the CPU, `x` untracked. Formed on
    /// first use, as merging forms it, and kept (half the f32 weight's bytes): per call it would
    /// cost about what the product of a few hundred rows does.
    fn packed_weight(&self, x: &Tensor, train: bool) -> Result<Option<&crate::PackedWeight>> {
        if !self.frozen
            || train
            || crate::matmul_precision() != crate::MatmulPrecision::Bf16
            || x.track_op()
            || !x.device().is_cpu()
            || x.dtype() != DType::F32
            || self.w.dtype() != DType::F32
        {
            return Ok(None);
        }
        if let Some(p) = self.packed.get() {
            return Ok(Some(p));
        }
        let w = if self.merged {
            self.w.clone()
        } else {
            (&self.w + self.delta_weight()?)?
        };
        let p = crate::PackedWeight::new(&w)?;
        Ok(Some(self.packed.get_or_init(|| p)))
    }

    /// A and B as the forward reads them (detached once frozen).
    fn factors(&self) -> (Tensor, Tensor) {
        (read_var(&self.a, self.frozen), read_var(&self.b, self.frozen))
    }

    /// Restarts this adapter's dropout masks from `seed` (call once per training step, so a
    /// resumed run repeats the masks of an uninterrupted one).
    pub fn seed_dropout(&self, seed: u64) {
        self.seeds.reseed(seed);
    }

    /// `x [.., in] → [.., out]`; dropout on the LoRA input only when `train`. While merged, the
    /// update lives in W and A, B get no gradient (merging is for export and inference).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(p) = self.packed_weight(x, train)? {
            if x.dims().last() != Some(&p.in_features()) {
                bail!(
                    "lora_linear: x is {:?}, expected [.., {}]",
                    x.dims(),
                    p.in_features()
                );
            }
            return crate::packed_linear(x, p, self.bias.as_ref());
        }
        if self.merged {
            return linear(x, &self.w, self.bias.as_ref());
        }
        let xin = if train {
            dropout(x, self.cfg.dropout, self.seeds.next())?
        } else {
            x.clone()
        };
        self.forward_with_lora_input(x, &xin)
    }

    /// LoRA's formula, written once: `x Wᵀ + b + (α/r)·(x_in Aᵀ) Bᵀ`, with `x_in` the LoRA
    /// path's input (`x` after dropout in training, `x` itself otherwise), for a caller that
    /// draws the dropout mask itself (spt-models' seeded dropout). Ignores the merged state:
    /// callers check [`is_merged`](Self::is_merged).
    pub fn forward_with_lora_input(&self, x: &Tensor, x_in: &Tensor) -> Result<Tensor> {
        let (a, b) = self.factors();
        if x_in.id() == x.id() {
            return lora_linear(x, &self.w, self.bias.as_ref(), &a, &b, self.cfg.scale());
        }
        let y = linear(x, &self.w, self.bias.as_ref())?;
        let u = x_in.broadcast_matmul(&a.t()?)?; // [.., r]
        let delta = u.broadcast_matmul(&b.t()?)?; // [.., out]
        y.add(&(delta * self.cfg.scale())?)
    }

    /// `x [.., in] →` `parts` tensors `[.., out/parts]`: the output split evenly along its last
    /// dimension (GPT-2's fused q|k|v; `parts = 1` for one output), each read from or written to
    /// the attention-head layout as `layout` says. The same values as narrowing
    /// [`forward_t`](Self::forward_t) with `merge_heads` / `split_heads` around it.
    ///
    /// Why not narrow: candle's backward of each narrow zero-pads its gradient to `[.., out]`
    /// and concatenates it on one thread, then adds the parts (GPT-2's c_attn: three
    /// `[B·L, 2304]` buffers filled, copied and summed per layer). Here each part is its own
    /// LoRA op on a row slice of W, b and B with A shared, so each part's gradient goes
    /// straight into its op; only the `[.., in]` input gradients are summed. With dropout
    /// active in training, or merged, it composes `forward_t` (the mask must be one draw).
    pub fn forward_parts(
        &self,
        x: &Tensor,
        parts: usize,
        layout: HeadsLayout,
        train: bool,
    ) -> Result<Vec<Tensor>> {
        let out = self.w.dim(0)?;
        if parts == 0 || out % parts != 0 {
            bail!(
                "lora_linear: cannot split {out} outputs into {parts} equal parts (w is {:?})",
                self.w.dims()
            );
        }
        let width = out / parts;
        let packed = self.packed_weight(x, train)?.is_some();
        if packed || self.merged || (train && self.cfg.dropout > 0.0) {
            return crate::heads::compose_parts(x, parts, layout, |x| self.forward_t(x, train));
        }
        let (a, b) = self.factors();
        (0..parts)
            .map(|i| {
                let rows = |t: &Tensor| t.narrow(0, i * width, width);
                let bias = self.bias.as_ref().map(rows).transpose()?;
                let (w, b) = (rows(&self.w)?, rows(&b)?);
                lora_linear_heads(x, &w, bias.as_ref(), &a, &b, self.cfg.scale(), layout)
            })
            .collect()
    }

    /// Folds the update into the frozen weight: `W ← W + (α/r)·B A`.
    pub fn merge(&mut self) -> std::result::Result<(), LoraError> {
        if self.merged {
            return Err(LoraError::AlreadyMerged);
        }
        self.w = (&self.w + self.delta_weight()?)?.detach();
        self.merged = true;
        self.packed = OnceLock::new();
        Ok(())
    }

    /// Undoes [`merge`](Self::merge): `W ← W − (α/r)·B A` (exact up to rounding).
    pub fn unmerge(&mut self) -> std::result::Result<(), LoraError> {
        if !self.merged {
            return Err(LoraError::NotMerged);
        }
        self.w = (&self.w - self.delta_weight()?)?.detach();
        self.merged = false;
        self.packed = OnceLock::new();
        Ok(())
    }

    fn delta_weight(&self) -> Result<Tensor> {
        delta_weight(&self.a, &self.b, &self.cfg)
    }

    /// Whether the update is currently folded into W.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// The trainable tensors, named `lora_a` and `lora_b`, for the optimiser.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_a".into(), self.a.clone()),
            ("lora_b".into(), self.b.clone()),
        ]
    }

    /// The current (frozen) base weight `[out, in]`, merged or not.
    pub fn weight(&self) -> &Tensor {
        &self.w
    }

    /// The frozen bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// A `[r, in]`.
    pub fn lora_a(&self) -> &Var {
        &self.a
    }

    /// B `[out, r]`.
    pub fn lora_b(&self) -> &Var {
        &self.b
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }
}

/// `ModuleT` rather than `Module`: candle's blanket `ModuleT` for a `Module` would ignore the
/// train flag and silently drop dropout.
impl candle_core::ModuleT for LoraLinear {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        LoraLinear::forward_t(self, x, train)
    }
}
