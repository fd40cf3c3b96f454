//! AdamW with decay / no-decay parameter groups, f32 moments, a saveable state, global-norm
//! gradient clipping and learning-rate schedules.
//!
//! candle-nn's `AdamW` decays every variable it is given, keeps its moments in the parameter's
//! dtype and cannot save them. This one:
//! - decides per parameter, by its Hugging Face name, whether weight decay applies
//!   ([`is_no_decay`]: biases and LayerNorm weights get none, as in HF Trainer);
//! - scales the learning rate of chosen modules by name ([`AdamW::scale_lr`]; PyTorch's
//!   per-group lr), e.g. the routed FFN's routers;
//! - keeps `exp_avg` / `exp_avg_sq` in f32 whatever the parameter dtype, and a per-parameter step
//!   count (a parameter without a gradient in a step is skipped, as in PyTorch);
//! - saves and restores that state by name ([`AdamW::state_dict`], [`AdamW::load_state_dict`]),
//!   bit-exactly.
//!
//! The update for a parameter θ with gradient g at its step t (decoupled weight decay λ):
//! ```text
//! m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
//! m̂ = m / (1−β1^t)             v̂ = v / (1−β2^t)
//! θ ← θ·(1 − lr·λ)   (decay group only; lr includes the parameter's scale)
//! θ ← θ − lr · m̂ / (√v̂ + ε)
//! ```

mod cpu;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var, D};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (PyTorch / HF defaults except `weight_decay`, which HF leaves at 0).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Refuses settings that make every update NaN or meaningless: β outside [0, 1) (β = 1
    /// divides by 1 − β^t = 0), ε not finite and > 0, weight decay not finite and ≥ 0.
    pub fn check(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("AdamW: {name} = {b}, expected a value in [0, 1)");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("AdamW: eps = {}, expected a finite value > 0", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "AdamW: weight_decay = {}, expected a finite value ≥ 0",
                self.weight_decay
            );
        }
        Ok(())
    }
}

/// True when a parameter takes no weight decay: biases and normalisation weights, by HF name
/// (`*.bias`, `*LayerNorm*` in BERT, `ln_1` / `ln_2` / `ln_f` in GPT-2, `*layer_norm*`,
/// `*rmsnorm*`, and a segment `norm` or `*_norm`, as transformers' Trainer matches them).
/// `norm` inside a longer word (`normalizer`, `denorm_proj`) is not a norm layer and decays.
pub fn is_no_decay(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let last = lower.rsplit('.').next().unwrap_or("");
    if last == "bias" || last.ends_with("_bias") {
        return true;
    }
    lower.split('.').any(|seg| {
        seg.contains("layernorm")
            || seg.contains("layer_norm")
            || seg.contains("rmsnorm")
            || seg == "norm"
            || seg.ends_with("_norm")
            || seg == "ln_f"
            || (seg.starts_with("ln_") && seg[3..].chars().all(|c| c.is_ascii_digit()))
    })
}

struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    /// Multiplies the scheduled lr for this parameter (PyTorch's per-group lr), 1 by default.
    lr_scale: f64,
    step: u64,
    moments: Moments,
}

/// A parameter's first and second moments (`exp_avg`, `exp_avg_sq`), f32.
enum Moments {
    /// Host vectors, updated in place with θ by one pass ([`cpu::update_in_place`]): f32
    /// parameters on the CPU.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Tensors on the parameter's device, replaced by the tensor-op update.
    Tensors { m: Tensor, v: Tensor },
}

impl Moments {
    /// Zero moments for `var`, on the host where the in-place update applies.
    fn zeros(var: &Var) -> Result<Self> {
        Ok(if cpu::applies(var) {
            let n = var.elem_count();
            Self::Host {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }
        } else {
            let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            Self::Tensors {
                m: zeros.clone(),
                v: zeros,
            }
        })
    }

    /// The moments of `var` from f32 tensors of its shape.
    fn new(var: &Var, m: Tensor, v: Tensor) -> Result<Self> {
        Ok(if cpu::applies(var) {
            Self::Host {
                m: m.flatten_all()?.to_vec1()?,
                v: v.flatten_all()?.to_vec1()?,
            }
        } else {
            let dev = var.device();
            Self::Tensors {
                m: m.to_device(dev)?,
                v: v.to_device(dev)?,
            }
        })
    }

    /// `(exp_avg, exp_avg_sq)` as tensors of `var`'s shape on its device.
    fn tensors(&self, var: &Var) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Self::Host { m, v } => (
                Tensor::from_slice(m, var.shape(), var.device())?,
                Tensor::from_slice(v, var.shape(), var.device())?,
            ),
            Self::Tensors { m, v } => (m.clone(), v.clone()),
        })
    }
}

/// AdamW over named variables, with per-name decay groups and a saveable state.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
}

impl AdamW {
    /// Builds the optimizer. Non-float variables are rejected; duplicate names are an error.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.check()?;
        let mut seen = HashSet::new();
        // One Var under two names would be updated twice per step.
        let mut vars = HashMap::new();
        let mut states = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                bail!("AdamW: parameter `{name}` is given twice");
            }
            if let Some(first) = vars.insert(var.as_tensor().id(), name.clone()) {
                bail!("AdamW: `{first}` and `{name}` are the same variable; give it once");
            }
            if !var.dtype().is_float() {
                bail!(
                    "AdamW: parameter `{name}` has dtype {:?}; only float parameters can be trained",
                    var.dtype()
                );
            }
            let moments = Moments::zeros(&var)?;
            states.push(ParamState {
                decay: !is_no_decay(&name),
                lr_scale: 1.0,
                name,
                var,
                step: 0,
                moments,
            });
        }
        Ok(Self { cfg, params: states })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// `(name, takes_weight_decay)` for each parameter, in the order given.
    pub fn groups(&self) -> Vec<(&str, bool)> {
        self.params.iter().map(|p| (p.name.as_str(), p.decay)).collect()
    }

    /// Scales the learning rate (and so the decoupled decay) of every parameter whose dotted name
    /// has `module` as a whole segment, e.g. `router` for `encoder.layer.3.intermediate.router.weight`.
    /// Returns how many parameters matched. The scale is configuration, not state: it is not in
    /// [`AdamW::state_dict`], so a resumed run sets it again.
    pub fn scale_lr(&mut self, module: &str, scale: f64) -> Result<usize> {
        if !(scale.is_finite() && scale >= 0.0) {
            bail!("AdamW: lr scale for `{module}` must be finite and ≥ 0, got {scale}");
        }
        let mut n = 0;
        for p in self.params.iter_mut() {
            if p.name.split('.').any(|seg| seg == module) {
                p.lr_scale = scale;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The variables, in the order given to [`AdamW::new`].
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// One update with learning rate `lr`. Parameters without a gradient in `grads` are skipped.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] on the gradients multiplied by `grad_scale` (a clipping factor from
    /// [`clip_scale`]), without forming the scaled gradients: the same bits as scaling them first.
    pub fn step_scaled(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        // Checked before any parameter moves: a NaN rate would make every weight NaN, a
        // negative one climb the loss.
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("AdamW: the learning rate must be finite and ≥ 0, got {lr}");
        }
        if !(grad_scale.is_finite() && grad_scale >= 0.0) {
            bail!("AdamW: the gradient scale must be finite and ≥ 0, got {grad_scale}");
        }
        for p in &self.params {
            match grads.get(p.var.as_tensor()) {
                Some(g) if g.shape() != p.var.shape() => bail!(
                    "AdamW: gradient of `{}` is {:?}, parameter is {:?}",
                    p.name,
                    g.shape(),
                    p.var.shape()
                ),
                _ => {}
            }
        }
        for p in self.params.iter_mut() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            p.step += 1;
            // β^t is 0 long before t leaves i32 (a restored step may be any u64).
            let t = i32::try_from(p.step).unwrap_or(i32::MAX);
            let lr = lr * p.lr_scale;
            let h = Hyper {
                beta1,
                beta2,
                eps,
                decay: if p.decay { lr * weight_decay } else { 0.0 },
                lr,
                t,
            };
            match &mut p.moments {
                Moments::Host { m, v } => cpu::update_in_place(&p.var, g, m, v, &h, grad_scale)?,
                Moments::Tensors { m, v } => {
                    let g = if grad_scale == 1.0 {
                        g.clone()
                    } else {
                        (g * grad_scale)?
                    };
                    let (theta, m1, v1) = tensor_update(&p.var, m, v, &g, &h)?;
                    p.var.set(&theta.to_dtype(p.var.dtype())?)?;
                    (*m, *v) = (m1, v1);
                }
            }
        }
        Ok(())
    }

    /// The largest per-parameter step count (the number of updates made so far).
    pub fn step_count(&self) -> u64 {
        self.params.iter().map(|p| p.step).max().unwrap_or(0)
    }

    /// Named state: `{name}.exp_avg`, `{name}.exp_avg_sq` (f32, parameter shape) and
    /// `{name}.step` (i64 scalar).
    pub fn state_dict(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            let (m, v) = p.moments.tensors(&p.var)?;
            out.insert(format!("{}.exp_avg", p.name), m);
            out.insert(format!("{}.exp_avg_sq", p.name), v);
            out.insert(
                format!("{}.step", p.name),
                Tensor::new(p.step as i64, p.var.device())?,
            );
        }
        Ok(out)
    }

    /// Restores a [`AdamW::state_dict`]. Every parameter's three entries must be present with the
    /// right shapes, and no entry may be left over; errors name the entry.
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let mut used = HashSet::new();
        let mut new_states = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let get = |suffix: &str| -> Result<(String, Tensor)> {
                let key = format!("{}.{suffix}", p.name);
                match state.get(&key) {
                    Some(t) => Ok((key, t.clone())),
                    None => bail!("optimizer state: missing `{key}`"),
                }
            };
            let (k1, m) = get("exp_avg")?;
            let (k2, v) = get("exp_avg_sq")?;
            let (k3, s) = get("step")?;
            for (k, t) in [(&k1, &m), (&k2, &v)] {
                if t.shape() != p.var.shape() {
                    bail!(
                        "optimizer state: `{k}` is {:?}, parameter is {:?}",
                        t.shape(),
                        p.var.shape()
                    );
                }
            }
            // NaN moments, or a negative second moment, make every later update NaN. Checked in
            // f32, as they are kept: an f64 moment past f32's range would load as infinity.
            let (m, v) = (m.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
            let finite = |t: &Tensor| spt_models::all_finite(t).map_err(candle_core::Error::wrap);
            if !finite(&m)? || !finite(&v)? {
                bail!("optimizer state: `{k1}` or `{k2}` holds NaN or infinite values (in f32)");
            }
            if v.elem_count() > 0 && v.to_dtype(DType::F64)?.min_all()?.to_scalar::<f64>()? < 0.0 {
                bail!("optimizer state: `{k2}` holds a negative value; a second moment is ≥ 0");
            }
            if s.dtype().is_float() {
                bail!(
                    "optimizer state: `{k3}` is {:?}, expected an integer step count",
                    s.dtype()
                );
            }
            let step = s.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
            let step = match step.as_slice() {
                [s] if *s >= 0 => *s as u64,
                _ => bail!("optimizer state: `{k3}` must be one non-negative integer, got {step:?}"),
            };
            new_states.push((Moments::new(&p.var, m, v)?, step));
            used.extend([k1, k2, k3]);
        }
        let mut extra: Vec<&String> = state.keys().filter(|k| !used.contains(*k)).collect();
        if !extra.is_empty() {
            extra.sort();
            bail!("optimizer state: entries for unknown parameters: {extra:?}");
        }
        for (p, (moments, step)) in self.params.iter_mut().zip(new_states) {
            p.moments = moments;
            p.step = step;
        }
        Ok(())
    }

    /// Writes the state to a safetensors file.
    pub fn save<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        let map: HashMap<String, Tensor> = self.state_dict()?.into_iter().collect();
        spt_models::save_tensors(&map, path).map_err(candle_core::Error::wrap)
    }

    /// Reads a state written by [`AdamW::save`].
    pub fn load<P: AsRef<Path>>(&mut self, path: P) -> Result<()> {
        let dev = match self.params.first() {
            Some(p) => p.var.device().clone(),
            None => candle_core::Device::Cpu,
        };
        let named =
            |e: candle_core::Error| candle_core::Error::Msg(format!("{}: {e}", path.as_ref().display()));
        // One tensor at a time: the moments are twice the trainable weights, and the whole file
        // beside them would double the peak.
        let mut state = spt_models::read_safetensors_file(path.as_ref())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if !dev.is_cpu() {
            for t in state.values_mut() {
                *t = t.to_device(&dev).map_err(named)?;
            }
        }
        self.load_state_dict(&state).map_err(named)
    }
}

/// Scales the gradients of `vars` in place so that their global L2 norm is at most `max_norm`
/// (no-op when `max_norm <= 0` or the norm is already small enough). Returns the norm before
/// clipping, computed in f64; it may be non-finite, which the caller should treat as an error.
pub fn clip_grad_norm(vars: &[Var], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(vars, grads)?;
    let scale = clip_scale(norm, max_norm);
    if scale != 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// The factor [`clip_grad_norm`] scales gradients of global norm `norm` by: `max_norm / (norm +
/// 1e-6)` when `norm` exceeds `max_norm > 0` (and is finite), else 1. For [`AdamW::step_scaled`],
/// which applies it inside the update instead of scaling every gradient first.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// The global L2 norm of the gradients of `vars` (f64 accumulation). The sum stays on the
/// gradients' device and is read once: one host synchronisation per step on a GPU, not one per
/// parameter. Each gradient is reduced over its last dimension first, as candle's CUDA `sum_all`
/// runs a whole tensor through one thread block.
pub fn grad_norm(vars: &[Var], grads: &GradStore) -> Result<f64> {
    // CPU gradients are summed on the host in one pass each; others stay on their device.
    let mut host = 0f64;
    let mut total: Option<Tensor> = None;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            if let Some(sum) = cpu::sum_squares(g)? {
                host += sum;
                continue;
            }
            let sq = g.to_dtype(DType::F64)?.sqr()?;
            let sq = if sq.rank() > 1 { sq.sum(D::Minus1)? } else { sq };
            let part = sq.sum_all()?;
            total = Some(match total {
                Some(t) => (t + part)?,
                None => part,
            });
        }
    }
    let device = match total {
        Some(t) => t.to_scalar::<f64>()?,
        None => 0.0,
    };
    Ok((host + device).sqrt())
}

/// Learning-rate decay after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// Linear warmup to `base_lr` over `warmup_steps` updates, then constant, linear or cosine decay
/// towards 0 at `total_steps`. A pure function of the step, so resuming needs no schedule state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub kind: ScheduleKind,
}

impl LrSchedule {
    /// Learning rate for the update with 0-based index `step` (the number of updates already made).
    /// Warmup gives `base·(step+1)/warmup`, so the first update is never at lr 0 and update
    /// `warmup−1` is at the full rate; decay reaches 0 at `total_steps`.
    pub fn lr_at(&self, step: u64) -> f64 {
        let base = self.base_lr;
        if step < self.warmup_steps {
            return base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps);
        if span == 0 {
            return base;
        }
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        match self.kind {
            ScheduleKind::Constant => base,
            ScheduleKind::Linear => base * (1.0 - progress),
            ScheduleKind::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// One parameter's AdamW constants for a step.
struct Hyper {
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// lr · λ in the decay group, else 0.
    decay: f64,
    lr: f64,
    t: i32,
}

/// The update as tensor ops (any device and dtype; moments `m`, `v` in f32): new θ (f32), m
/// and v.
fn tensor_update(
    var: &Var,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h: &Hyper,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = g.detach().to_dtype(DType::F32)?;
    let m = ((m * h.beta1)? + (&g * (1.0 - h.beta1))?)?;
    let v = ((v * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
    let m_hat = (&m * (1.0 / (1.0 - h.beta1.powi(h.t))))?;
    let v_hat = (&v * (1.0 / (1.0 - h.beta2.powi(h.t))))?;
    let mut theta = var.as_tensor().detach().to_dtype(DType::F32)?;
    if h.decay != 0.0 {
        theta = (theta * (1.0 - h.decay))?;
    }
    let update = (m_hat / (v_hat.sqrt()? + h.eps)?)?;
    let theta = (theta - (update * h.lr)?)?;
    Ok((theta, m, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(vals: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(vals, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn no_decay_names() {
        for n in [
            "bert.encoder.layer.0.attention.output.LayerNorm.weight",
            "bert.embeddings.LayerNorm.bias",
            "classifier.bias",
            "transformer.h.3.ln_1.weight",
            "transformer.h.3.ln_2.weight",
            "transformer.ln_f.weight",
            "h.0.attn.c_attn.bias",
            "model.layers.0.input_norm.weight",
            "model.norm.weight",
            "model.layers.1.RMSNorm.weight",
        ] {
            assert!(is_no_decay(n), "{n}");
        }
        for n in [
            "bert.encoder.layer.0.attention.self.query.weight",
            "classifier.weight",
            "transformer.h.3.mlp.c_fc.weight",
            "bert.embeddings.word_embeddings.weight",
            "h.0.attn.c_attn.lora_a",
            "encoder.normalizer.weight",
            "head.denorm_proj.weight",
            "enormous.weight",
        ] {
            assert!(!is_no_decay(n), "{n}");
        }
    }

    /// One and two hand-computed AdamW steps, in f64, for a decay and a no-decay parameter.
    #[test]
    fn adamw_matches_hand_computed_steps() -> Result<()> {
        let w = var(&[1.0, -2.0]);
        let b = var(&[0.5, 0.5]);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(
            vec![("lin.weight".into(), w.clone()), ("lin.bias".into(), b.clone())],
            cfg,
        )?;
        assert_eq!(opt.groups(), vec![("lin.weight", true), ("lin.bias", false)]);
        // loss = sum(w * c) + sum(b^2): dL/dw = c, dL/db = 2b
        let c = Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?;
        let lr = 0.01;
        let mut expect_w = [1.0f64, -2.0];
        let mut expect_b = [0.5f64, 0.5];
        let (mut mw, mut vw, mut mb, mut vb) = ([0f64; 2], [0f64; 2], [0f64; 2], [0f64; 2]);
        for t in 1..=2 {
            let loss = ((w.as_tensor() * &c)?.sum_all()? + b.as_tensor().sqr()?.sum_all()?)?;
            let grads = loss.backward()?;
            opt.step(&grads, lr)?;
            let bc1 = 1.0 - 0.9f64.powi(t);
            let bc2 = 1.0 - 0.999f64.powi(t);
            for i in 0..2 {
                let gw = [0.5, -1.0][i];
                mw[i] = 0.9 * mw[i] + 0.1 * gw;
                vw[i] = 0.999 * vw[i] + 0.001 * gw * gw;
                expect_w[i] *= 1.0 - lr * 0.1;
                expect_w[i] -= lr * (mw[i] / bc1) / ((vw[i] / bc2).sqrt() + 1e-8);
                let gb = 2.0 * expect_b[i];
                mb[i] = 0.9 * mb[i] + 0.1 * gb;
                vb[i] = 0.999 * vb[i] + 0.001 * gb * gb;
                expect_b[i] -= lr * (mb[i] / bc1) / ((vb[i] / bc2).sqrt() + 1e-8);
            }
            let got_w = w.as_tensor().to_vec1::<f32>()?;
            let got_b = b.as_tensor().to_vec1::<f32>()?;
            for i in 0..2 {
                assert!(
                    (got_w[i] as f64 - expect_w[i]).abs() < 1e-6,
                    "t={t} w[{i}] {} vs {}",
                    got_w[i],
                    expect_w[i]
                );
                assert!(
                    (got_b[i] as f64 - expect_b[i]).abs() < 1e-6,
                    "t={t} b[{i}] {} vs {}",
                    got_b[i],
                    expect_b[i]
                );
            }
        }
        // First step of Adam moves every coordinate by ~lr (m̂/√v̂ = sign(g)).
        assert_eq!(opt.step_count(), 2);
        Ok(())
    }

    /// The in-place CPU pass and the tensor ops give the same bits (θ, m and v), decay group
    /// or not, with and without a gradient scale; and the scale gives the bits of pre-scaled
    /// gradients.
    #[test]
    fn in_place_update_equals_the_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let n = 100_003; // several rayon chunks and a ragged tail
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits())
                .collect())
        };
        for decay in [true, false] {
            for scale in [1.0, 0.37] {
                let theta = Tensor::randn(0f32, 1.0, n, &dev)?;
                let (m, v) = (
                    Tensor::randn(0f32, 0.1, n, &dev)?,
                    Tensor::randn(0f32, 0.1, n, &dev)?.sqr()?,
                );
                let g = Tensor::randn(0f32, 1.0, n, &dev)?;
                let h = Hyper {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    decay: if decay { 1e-3 * 0.01 } else { 0.0 },
                    lr: 1e-3,
                    t: 3,
                };
                let var = Var::from_tensor(&theta)?;
                assert!(cpu::applies(&var));
                let (mut mh, mut vh) = (m.to_vec1::<f32>()?, v.to_vec1::<f32>()?);
                cpu::update_in_place(&var, &g, &mut mh, &mut vh, &h, scale)?;
                let scaled = (&g * scale)?;
                let ops = tensor_update(&Var::from_tensor(&theta)?, &m, &v, &scaled, &h)?;
                assert_eq!(
                    bits(var.as_tensor())?,
                    bits(&ops.0)?,
                    "θ, decay {decay}, scale {scale}"
                );
                assert_eq!(bits(&Tensor::new(mh, &dev)?)?, bits(&ops.1)?, "m");
                assert_eq!(bits(&Tensor::new(vh, &dev)?)?, bits(&ops.2)?, "v");
            }
        }
        Ok(())
    }

    /// The gradient norm's host pass equals an f64 reference (f32 and f64 gradients, sizes
    /// around the chunk and the 8-lane blocks).
    #[test]
    fn grad_norm_matches_an_f64_sum() -> Result<()> {
        let dev = Device::Cpu;
        let vars: Vec<Var> = [1usize, 7, 9, 40_000, 70_001]
            .iter()
            .map(|&n| Var::from_tensor(&Tensor::zeros(n, DType::F32, &dev)?))
            .collect::<Result<_>>()?;
        let mut total = Tensor::new(0f32, &dev)?;
        let mut grads_f64 = Vec::new();
        for v in &vars {
            let r = Tensor::randn(0f32, 1.0, v.shape(), &dev)?;
            grads_f64.push(r.to_dtype(DType::F64)?.to_vec1::<f64>()?);
            total = (total + (v.as_tensor() * r)?.sum_all()?)?;
        }
        let grads = total.backward()?;
        let expect = grads_f64.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        let got = grad_norm(&vars, &grads)?;
        assert!((got - expect).abs() <= 1e-12 * expect, "{got} vs {expect}");
        let g64 = Tensor::new(grads_f64[3].as_slice(), &dev)?;
        let s = cpu::sum_squares(&g64)?.expect("f64 on the CPU");
        let e: f64 = grads_f64[3].iter().map(|x| x * x).sum();
        assert!((s - e).abs() <= 1e-12 * e);
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert_eq!(clip_scale(f64::NAN, 1.0), 1.0);
        assert_eq!(clip_scale(4.0, 0.0), 1.0);
        assert!((clip_scale(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
        Ok(())
    }

    /// `step_scaled` and `clip_grad_norm` + `step` give the same parameters, bit for bit.
    #[test]
    fn step_scaled_equals_clipping_first() -> Result<()> {
        let target = Tensor::new(&[30.0f32, -10.0, 2.5], &Device::Cpu)?;
        let (a, b) = (var(&[0.1, 0.2, 0.3]), var(&[0.1, 0.2, 0.3]));
        let cfg = AdamWConfig::default();
        let mut oa = AdamW::new(vec![("w".into(), a.clone())], cfg)?;
        let mut ob = AdamW::new(vec![("w".into(), b.clone())], cfg)?;
        for _ in 0..3 {
            let mut ga = quad_loss(&a, &target)?;
            let norm = clip_grad_norm(std::slice::from_ref(&a), &mut ga, 1.0)?;
            assert!(norm > 1.0, "the test needs clipping to act");
            oa.step(&ga, 0.01)?;
            let gb = quad_loss(&b, &target)?;
            let scale = clip_scale(grad_norm(std::slice::from_ref(&b), &gb)?, 1.0);
            ob.step_scaled(&gb, 0.01, scale)?;
            let (x, y) = (a.as_tensor().to_vec1::<f32>()?, b.as_tensor().to_vec1::<f32>()?);
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{x:?} vs {y:?}"
            );
        }
        Ok(())
    }

    fn quad_loss(w: &Var, target: &Tensor) -> Result<GradStore> {
        (w.as_tensor() - target)?.sqr()?.sum_all()?.backward()
    }

    /// A parameter with lr scale s follows the unscaled update at lr·s (decay included); the
    /// scale matches whole name segments only; scale 0 freezes.
    #[test]
    fn lr_scale_is_a_per_module_learning_rate() -> Result<()> {
        let target = Tensor::new(&[3.0f32, -1.0, 0.25], &Device::Cpu)?;
        let init = [0.1f32, 0.2, 0.3];
        let cfg = AdamWConfig::default();
        let (r, frozen, other, plain) = (var(&init), var(&init), var(&init), var(&init));
        let mut scaled = AdamW::new(
            vec![
                ("l.3.router.weight".into(), r.clone()),
                ("l.3.zero.weight".into(), frozen.clone()),
                ("l.3.routers.weight".into(), other.clone()),
            ],
            cfg,
        )?;
        assert_eq!(scaled.scale_lr("router", 0.1)?, 1);
        assert_eq!(scaled.scale_lr("zero", 0.0)?, 1);
        assert_eq!(scaled.scale_lr("absent", 0.5)?, 0);
        assert!(scaled.scale_lr("router", -1.0).is_err());
        assert!(scaled.scale_lr("router", f64::NAN).is_err());
        let mut reference = AdamW::new(vec![("w".into(), plain.clone())], cfg)?;
        let loss = |ws: &[&Var]| -> Result<GradStore> {
            let mut total = Tensor::new(0f32, &Device::Cpu)?;
            for w in ws {
                total = (total + (w.as_tensor() - &target)?.sqr()?.sum_all()?)?;
            }
            total.backward()
        };
        for s in 0..4 {
            let lr = 0.05 / (s + 1) as f64;
            scaled.step(&loss(&[&r, &frozen, &other])?, lr)?;
            reference.step(&quad_loss(&plain, &target)?, lr * 0.1)?;
        }
        let bits = |v: &Var| -> Result<Vec<u32>> {
            Ok(v.as_tensor()
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits())
                .collect())
        };
        assert_eq!(bits(&r)?, bits(&plain)?);
        assert_eq!(frozen.as_tensor().to_vec1::<f32>()?, init.to_vec());
        // `routers` is not the segment `router`: full lr, so it moved further than the scaled one.
        let moved = |v: &Var| -> Result<f32> {
            let d = (v.as_tensor() - Tensor::new(&init, &Device::Cpu)?)?;
            d.abs()?.sum_all()?.to_scalar::<f32>()
        };
        assert!(moved(&other)? > 5.0 * moved(&r)?);
        Ok(())
    }

    #[test]
    fn save_load_then_step_is_bit_exact() -> Result<()> {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let target = Tensor::new(&[3.0f32, -1.0, 0.25], &Device::Cpu)?;
        let cfg = AdamWConfig::default();
        // Uninterrupted: 6 steps.
        let w1 = var(&[0.1, 0.2, 0.3]);
        let mut o1 = AdamW::new(vec![("w".into(), w1.clone())], cfg)?;
        for s in 0..6 {
            o1.step(&quad_loss(&w1, &target)?, 0.05 / (s + 1) as f64)?;
        }
        // Interrupted after 3: save params + state, rebuild from scratch, load, continue.
        let w2 = var(&[0.1, 0.2, 0.3]);
        let mut o2 = AdamW::new(vec![("w".into(), w2.clone())], cfg)?;
        for s in 0..3 {
            o2.step(&quad_loss(&w2, &target)?, 0.05 / (s + 1) as f64)?;
        }
        let path = dir.path().join("opt.safetensors");
        o2.save(&path)?;
        let saved_w = w2.as_tensor().to_vec1::<f32>()?;
        drop(o2);
        let w3 = var(&saved_w);
        let mut o3 = AdamW::new(vec![("w".into(), w3.clone())], cfg)?;
        o3.load(&path)?;
        assert_eq!(o3.step_count(), 3);
        for s in 3..6 {
            o3.step(&quad_loss(&w3, &target)?, 0.05 / (s + 1) as f64)?;
        }
        let a: Vec<u32> = w1
            .as_tensor()
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect();
        let b: Vec<u32> = w3
            .as_tensor()
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn load_state_dict_names_missing_and_extra_entries() -> Result<()> {
        let w = var(&[1.0]);
        let mut o = AdamW::new(vec![("enc.w".into(), w)], AdamWConfig::default())?;
        let mut sd: HashMap<String, Tensor> = o.state_dict()?.into_iter().collect();
        sd.remove("enc.w.exp_avg_sq");
        let err = o.load_state_dict(&sd).unwrap_err().to_string();
        assert!(err.contains("enc.w.exp_avg_sq"), "{err}");
        let mut sd: HashMap<String, Tensor> = o.state_dict()?.into_iter().collect();
        sd.insert(
            "other.exp_avg".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu)?,
        );
        let err = o.load_state_dict(&sd).unwrap_err().to_string();
        assert!(err.contains("other.exp_avg"), "{err}");
        // Values that make every later update NaN, and a step that is not a count.
        let dev = Device::Cpu;
        for (key, t, want) in [
            ("enc.w.exp_avg_sq", Tensor::new(&[-1f32], &dev)?, "negative"),
            ("enc.w.exp_avg", Tensor::new(&[f32::NAN], &dev)?, "NaN"),
            ("enc.w.step", Tensor::new(2.7f32, &dev)?, "integer step"),
        ] {
            let mut sd: HashMap<String, Tensor> = o.state_dict()?.into_iter().collect();
            sd.insert(key.into(), t);
            let err = o.load_state_dict(&sd).unwrap_err().to_string();
            assert!(err.contains(want), "{key}: {err}");
        }
        // A step count past i32 (it wrapped: no update, or NaN weights) updates as a late step
        // does, with the bias corrections at 1.
        let target = Tensor::new(&[0f32], &dev)?;
        for step in [1000i64, (1 << 31) + 5, (1 << 32) - 1, i64::MAX - 1] {
            let w = var(&[1.0]);
            let mut o = AdamW::new(vec![("enc.w".into(), w.clone())], AdamWConfig::default())?;
            let mut sd: HashMap<String, Tensor> = o.state_dict()?.into_iter().collect();
            sd.insert("enc.w.exp_avg".into(), Tensor::new(&[0.5f32], &dev)?);
            sd.insert("enc.w.exp_avg_sq".into(), Tensor::new(&[0.25f32], &dev)?);
            sd.insert("enc.w.step".into(), Tensor::new(step, &dev)?);
            o.load_state_dict(&sd)?;
            o.step(&quad_loss(&w, &target)?, 0.1)?;
            let after = w.as_tensor().to_vec1::<f32>()?[0];
            assert!(after.is_finite() && after < 1.0, "step {step}: {after}");
        }
        Ok(())
    }

    #[test]
    fn bad_settings_and_one_variable_under_two_names_are_refused() -> Result<()> {
        let w = var(&[1.0]);
        let e = AdamW::new(
            vec![("a".into(), w.clone()), ("b".into(), w.clone())],
            AdamWConfig::default(),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(e.contains("`a` and `b` are the same variable"), "{e}");
        let d = AdamWConfig::default();
        for (cfg, want) in [
            (AdamWConfig { beta1: 1.0, ..d }, "beta1"),
            (AdamWConfig { beta2: -0.5, ..d }, "beta2"),
            (AdamWConfig { eps: f64::NAN, ..d }, "eps"),
            (
                AdamWConfig {
                    weight_decay: f64::INFINITY,
                    ..d
                },
                "weight_decay",
            ),
        ] {
            let e = AdamW::new(vec![("a".into(), w.clone())], cfg)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        Ok(())
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<()> {
        let a = var(&[0.0, 0.0]);
        let b = var(&[0.0]);
        // grads: a -> [3, 4], b -> [12]; global norm 13
        let loss = ((a.as_tensor() * Tensor::new(&[3f32, 4.0], &Device::Cpu)?)?.sum_all()?
            + (b.as_tensor() * 12.0)?.sum_all()?)?;
        let mut grads = loss.backward()?;
        let vars = [a.clone(), b.clone()];
        let norm = clip_grad_norm(&vars, &mut grads, 1.0)?;
        assert!((norm - 13.0).abs() < 1e-9);
        let after = grad_norm(&vars, &grads)?;
        assert!((after - 1.0).abs() < 1e-5, "{after}");
        let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert!((ga[0] - 3.0 / 13.0).abs() < 1e-5 && (ga[1] - 4.0 / 13.0).abs() < 1e-5);
        // Below the limit: untouched.
        let norm2 = clip_grad_norm(&vars, &mut grads, 10.0)?;
        assert!((norm2 - after).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn schedules() {
        let s = LrSchedule {
            base_lr: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            kind: ScheduleKind::Linear,
        };
        assert_eq!(s.lr_at(0), 0.25);
        assert_eq!(s.lr_at(3), 1.0);
        assert_eq!(s.lr_at(4), 1.0);
        assert!((s.lr_at(9) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr_at(14), 0.0);
        assert_eq!(s.lr_at(100), 0.0);
        let c = LrSchedule {
            kind: ScheduleKind::Cosine,
            ..s
        };
        assert_eq!(c.lr_at(4), 1.0);
        assert!((c.lr_at(9) - 0.5).abs() < 1e-12);
        assert!(c.lr_at(14).abs() < 1e-12);
        let k = LrSchedule {
            kind: ScheduleKind::Constant,
            ..s
        };
        assert_eq!(k.lr_at(13), 1.0);
        let nw = LrSchedule {
            base_lr: 2.0,
            warmup_steps: 0,
            total_steps: 0,
            kind: ScheduleKind::Linear,
        };
        assert_eq!(nw.lr_at(0), 2.0);
    }
}
