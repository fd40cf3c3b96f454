//! Routed FFN (SPT §2): the FFN hidden dimension is split into `n_blocks` contiguous blocks and
//! each token runs only the top-k blocks its router picks.
//!
//! - Block `e` of fc1 is rows `[e·b, (e+1)·b)` of `W1 [d_ff, d]` and `b1`; block `e` of fc2 is the
//!   same columns of `W2 [d, d_ff]`. Both are read in place (no per-step weight copies).
//! - Router: `Linear(d → n_blocks)`; per token the `k` highest scores win (ties → lower block).
//! - Gate ([`GateMode`]): applied **once**, to the block's fc2 output, so the router learns from
//!   the task loss: `k·softmax` over the kept scores ([`GateMode::SoftmaxKept`]). Equal scores give
//!   gate 1 (the dense FFN restricted to the kept blocks) and the gates of a token sum to k. With
//!   `k = 1` it is constant (1) and the router learns only from the optional load-balancing loss.
//!   [`GateMode::Ones`] (gate ≡ 1) is the reference: with every block kept it is exactly the dense
//!   FFN ([`RoutedFfn::forward_dense`] and the tests use it).
//! - Execution: a deterministic counting sort groups the (token, slot) pairs by block
//!   ([`Routing`]); [`gather_matmul`] runs fc1 (+ bias) as a grouped GEMM, the activation follows,
//!   and [`scatter_matmul`] runs fc2 scaled by the gates and scatter-adds into the tokens; then
//!   `+ b2`. Backward is exact and skips the gradient of every untracked (frozen) weight.
//! - LoRA (optional): on the **active blocks only**, like the reference, but consistent: the
//!   routed layer with LoRA equals the routed layer with merged weights `W1 + (α/r)·B1 A1` and
//!   `W2 + (α/r)·B2 A2` (the gate scales the block's LoRA output too). fc1's `x A1ᵀ` is computed
//!   once for all blocks, B1's rows are routed like W1's; fc2's A2 columns are routed like W2's
//!   and B2 is applied once per token.
//! - [`RoutedFfn::cluster_units`] / [`RoutedFfn::permute_units`] regroup the hidden units so that
//!   units firing together share a block (exact for the dense FFN).
//! - Linear correction (optional, [`RoutedFfnConfig::correction`]): a constant `C [d+1, d]`;
//!   a token that skips blocks gets `[x, 1] C` added, the part of the skipped blocks' output
//!   that is linear in `x` (see `correction.rs`).
//! - Calibration (`calibrate.rs`): [`RoutedFfn::init_router`] fits the router to rank blocks by
//!   their activation norm, then the linear correction, and [`RoutedFfn::quality`] reports how
//!   close the routed output is to the dense one.
//!
//! Options that were measured and dropped (skip biases, an output-norm router target, router
//! refits, a sigmoid gate) are in docs/experiments/routed-ffn.md.

mod calibrate;
mod chunked;
mod cluster;
pub mod composed;
mod correction;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod frozen;
mod lora_ops;
mod ops;
pub mod reference;
mod router;
mod rows;

pub use calibrate::{RouterFitConfig, RoutingQuality};
pub use cluster::UnitClusterConfig;
pub use correction::{add_linear_correction, linear_correction_reference};
pub use lora_ops::routed_lora_ffn;
pub use ops::{
    gather_matmul, gather_matmul_act, scatter_matmul, scatter_matmul_bias, AddKind, GatherMatmul,
    ScatterMatmul,
};
pub use router::{BlockTopK, Routing};
pub use rows::{gather_rows, sum_rows};

use crate::activation::Activation;
use crate::lora::{delta_weight, dropout, uniform, DropoutSeeds, LoraConfig, LoraError};
use crate::norm::softmax_last_dim;
use crate::util::{check_float, check_same, read_tensor, read_var};
use candle_core::{bail, DType, Result, Tensor, Var};
use std::sync::Arc;

/// Up to this many tokens an evaluation forward on the CPU (decoding) runs its GEMMs once per
/// active block (`RoutedFfn::forward_unfused`). At GPT-2 small's shape (d 768, d_ff 3072, 2 of 8 blocks), per call: one
/// token 0.23 ms (0.43 with LoRA) against the fused ops' 2.3-17 ms (3.5-5 ms), whose per-call
/// weight setup one token's GEMVs do not amortise; at 16 tokens 2.5 ms (3.4-3.7) against
/// 2.7-19 ms (5-6 ms); from 32 tokens the fused ops win with BERT's weight layout (2 cores).
const FEW_TOKENS: usize = 16;

/// How a kept block's fc2 output is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMode {
    /// `k · softmax(kept scores)`: 1 for equal scores, sums to k per token.
    #[default]
    SoftmaxKept,
    /// Gate ≡ 1: no router gradient from the task loss. With all blocks kept, the dense FFN (the
    /// reference the tests and [`RoutedFfn::forward_dense`] use).
    Ones,
}

/// How a [`RoutedFfn`] routes: the one routed-FFN configuration, used by the op and, per layer,
/// by spt-models' `sparsify` (`SptConfig::ffn`). What belongs to the weights is given with them
/// ([`RoutedFfn::new`]'s activation) and LoRA is added by [`RoutedFfn::with_lora`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutedFfnConfig {
    /// Blocks d_ff is split into (must divide d_ff).
    pub n_blocks: usize,
    /// Blocks each token runs.
    pub top_k: BlockTopK,
    /// [`GateMode::SoftmaxKept`]; [`GateMode::Ones`] is the dense reference (with every block).
    #[serde(default)]
    pub gate: GateMode,
    /// Return the Switch-style load-balancing loss `n·Σ_e f_e·P_e` (off by default).
    #[serde(default)]
    pub aux_loss: bool,
    /// Seed of the router's random initialisation (`sparsify` uses `seed ^ layer`).
    #[serde(default)]
    pub seed: u64,
    /// Add a linear correction `[x, 1] C` for tokens that skip blocks: the least-squares linear
    /// stand-in for the skipped blocks' output (fitted by [`RoutedFfn::init_router`], a
    /// constant). Unused when every block runs.
    #[serde(default)]
    pub correction: bool,
}

impl RoutedFfnConfig {
    /// Defaults: softmax-kept gate, no aux loss, seed 0, no correction.
    pub fn new(n_blocks: usize, top_k: BlockTopK) -> Self {
        Self {
            n_blocks,
            top_k,
            gate: GateMode::default(),
            aux_loss: false,
            seed: 0,
            correction: false,
        }
    }
}

/// What [`RoutedFfn::forward_t`] returns.
#[derive(Debug, Clone)]
pub struct RoutedFfnOutput {
    /// `[.., d]`, the shape of the input.
    pub y: Tensor,
    /// The load-balancing loss (scalar) when enabled: add it, weighted, to the task loss.
    pub aux_loss: Option<Tensor>,
    /// The routing used.
    pub routing: Arc<Routing>,
    /// `[R]` gate of each routed row (block-sorted order).
    pub gates: Tensor,
}

impl RoutedFfnOutput {
    /// The gates as a `[T, n_blocks]` matrix, 0 where a token skips a block (differentiable).
    pub fn gate_matrix(&self) -> Result<Tensor> {
        gate_matrix(&self.gates, &self.routing)
    }
}

/// Scatters routed-row gates `[R]` into a `[T, n_blocks]` matrix (0 for skipped blocks).
pub fn gate_matrix(gates: &Tensor, routing: &Routing) -> Result<Tensor> {
    let (t, n, k) = (routing.n_tokens(), routing.n_blocks(), routing.k());
    let blocks = routing.blocks()?;
    let idx: Vec<u32> = routing
        .row_src()?
        .iter()
        .map(|&s| {
            let tok = s as usize / k;
            (tok * n) as u32 + blocks[s as usize]
        })
        .collect();
    let idx = Tensor::from_vec(idx, routing.n_rows(), gates.device())?;
    Tensor::zeros(t * n, gates.dtype(), gates.device())?
        .index_add(&idx, gates, 0)?
        .reshape((t, n))
}

/// Gates `[R]` (routed-row order) from router scores `[T, n_blocks]` under `routing`.
/// Differentiable in the scores (except [`GateMode::Ones`], which is constant).
pub fn router_gates(logits: &Tensor, routing: &Arc<Routing>, gate: GateMode) -> Result<Tensor> {
    let dev = logits.device();
    let (t, k, n) = (routing.n_tokens(), routing.k(), routing.n_blocks());
    if logits.dims() != [t, n] {
        bail!(
            "routed_ffn: router scores are {:?}, expected [T, n_blocks] = [{t}, {n}]",
            logits.dims()
        );
    }
    let per_slot = match gate {
        GateMode::Ones => return Tensor::ones(routing.n_rows(), logits.dtype(), dev),
        // A gather along dim 1 rather than a 1-D index_select: the backward of a 1-D index_select
        // is an index_add with one column, which candle's CUDA kernel runs on a single thread
        // (6 ms each at 8192 tokens × 4 of 8 blocks on an H200, half the routed FFN's step).
        GateMode::SoftmaxKept => {
            let kept = logits.contiguous()?.gather(&routing.blocks_tensor(dev)?, 1)?; // [T, k]
            (softmax_last_dim(&kept)? * k as f64)?
        }
    };
    // Per (token, slot) → routed-row order: a row move (its adjoint is the gradient).
    let pairs = rows::RowMap::pairs(routing)?;
    rows::move_rows(&per_slot.reshape((t * k, 1))?, rows::Move::Gather, pairs)?.flatten_all()
}

/// The routed FFN as a function (no LoRA):
/// `y[t] = Σ_{kept e} gate · act(x W1_eᵀ + b1_e) W2_eᵀ + b2` for `x [T, d]`, `W1 [d_ff, d]`,
/// `b1 [d_ff]`, `W2 [d, d_ff]`, `b2 [d]`, `gates [R]`.
#[allow(clippy::too_many_arguments)]
pub fn routed_ffn(
    x: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
    gates: &Tensor,
    routing: &Arc<Routing>,
    act: Activation,
) -> Result<Tensor> {
    let h = gather_matmul_act(x, w1, Some(b1), Some(act), routing)?; // [R, b]
    scatter_matmul_bias(&h, gates, w2, Some(b2), routing) // [T, d]
}

#[derive(Debug)]
struct FfnLora {
    a1: Var, // [r, d]
    b1: Var, // [d_ff, r]
    a2: Var, // [r, d_ff]
    b2: Var, // [d, r]
    cfg: LoraConfig,
    seeds: DropoutSeeds,
}

/// The routed FFN layer. The FFN weights are whatever tensors the caller passes: plain tensors
/// are frozen (no gradient work at all), `Var` tensors are trained. The router (and LoRA factors,
/// if configured) are this layer's own `Var`s; see [`trainable_vars`](Self::trainable_vars).
#[derive(Debug)]
pub struct RoutedFfn {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    router_w: Var,              // [n_blocks, d]
    router_b: Var,              // [n_blocks]
    correction: Option<Tensor>, // [d+1, d], constant; see RoutedFfnConfig::correction
    activation: Activation,
    cfg: RoutedFfnConfig,
    k: usize,
    block: usize,
    lora: Option<FfnLora>,
    merged: bool,
    /// Inference only: the router and LoRA factors are read detached (see `freeze`).
    frozen: bool,
    /// Inference only: fc1's and fc2's GEMM operands, made once (`frozen.rs`).
    frozen_operands: frozen::FrozenOperands,
}

impl RoutedFfn {
    /// Builds the layer from the pretrained `W1 [d_ff, d]`, `b1 [d_ff]`, `W2 [d, d_ff]`,
    /// `b2 [d]` (HF Linear layout) and the FFN's `activation`. The router starts as PyTorch's
    /// `nn.Linear` default (`U(−1/√d, 1/√d)`, seeded); call [`init_router`](Self::init_router) to
    /// fit it instead.
    pub fn new(
        w1: &Tensor,
        b1: &Tensor,
        w2: &Tensor,
        b2: &Tensor,
        activation: Activation,
        cfg: RoutedFfnConfig,
    ) -> Result<Self> {
        let op = "routed_ffn";
        check_float(op, "W1", w1)?;
        check_same(op, &[("W1", w1), ("b1", b1), ("W2", w2), ("b2", b2)])?;
        let (d_ff, d) = match w1.dims() {
            &[f, d] if f > 0 && d > 0 => (f, d),
            dims => bail!("{op}: W1 is {dims:?}, expected [d_ff, d] with d_ff, d ≥ 1"),
        };
        if b1.dims() != [d_ff] {
            bail!("{op}: b1 is {:?}, expected [d_ff] = [{d_ff}]", b1.dims());
        }
        if w2.dims() != [d, d_ff] {
            bail!("{op}: W2 is {:?}, expected [d, d_ff] = [{d}, {d_ff}]", w2.dims());
        }
        if b2.dims() != [d] {
            bail!("{op}: b2 is {:?}, expected [d] = [{d}]", b2.dims());
        }
        let n = cfg.n_blocks;
        if n == 0 || d_ff % n != 0 {
            bail!("{op}: d_ff = {d_ff} is not divisible by n_blocks = {n}");
        }
        let k = cfg.top_k.resolve(n)?;
        let (dt, dev) = (w1.dtype(), w1.device());
        let bound = 1.0 / (d as f64).sqrt();
        let router_w = Var::from_tensor(&uniform(&[n, d], bound, cfg.seed, dt, dev)?)?;
        let router_b = Var::from_tensor(&uniform(&[n], bound, cfg.seed ^ 0xB1A5, dt, dev)?)?;
        let correction = match cfg.correction {
            true => Some(Tensor::zeros((d + 1, d), dt, dev)?),
            false => None,
        };
        Ok(Self {
            w1: w1.clone(),
            b1: b1.clone(),
            w2: w2.clone(),
            b2: b2.clone(),
            router_w,
            router_b,
            correction,
            activation,
            cfg,
            k,
            block: d_ff / n,
            lora: None,
            merged: false,
            frozen: false,
            frozen_operands: Default::default(),
        })
    }

    /// Adds LoRA on the FFN weights (active blocks only): A1 `[r, d]`, B1 `[d_ff, r]`, A2
    /// `[r, d_ff]`, B2 `[d, r]`, the B factors zero (so the layer is unchanged), seeded from
    /// `lc.seed`.
    pub fn with_lora(mut self, lc: LoraConfig) -> Result<Self> {
        let op = "routed_ffn";
        if self.lora.is_some() {
            bail!("{op}: the layer already has LoRA");
        }
        let (d, d_ff) = (self.d_model(), self.d_ff());
        let (dt, dev) = (self.w1.dtype(), self.w1.device().clone());
        let dev = &dev;
        lc.check(op)?;
        if lc.rank > d.min(d_ff) {
            bail!(
                "{op}: LoRA rank {} is above min(d, d_ff) = {}",
                lc.rank,
                d.min(d_ff)
            );
        }
        let r = lc.rank;
        self.lora = Some(FfnLora {
            a1: Var::from_tensor(&uniform(&[r, d], 1.0 / (d as f64).sqrt(), lc.seed, dt, dev)?)?,
            b1: Var::zeros((d_ff, r), dt, dev)?,
            a2: Var::from_tensor(&uniform(
                &[r, d_ff],
                1.0 / (d_ff as f64).sqrt(),
                lc.seed ^ 0xA2,
                dt,
                dev,
            )?)?,
            b2: Var::zeros((d, r), dt, dev)?,
            cfg: lc,
            seeds: DropoutSeeds::new(lc.seed ^ 0xD0),
        });
        Ok(self)
    }

    /// The FFN's activation.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Model width d.
    pub fn d_model(&self) -> usize {
        self.w1.dims()[1]
    }

    /// FFN width d_ff.
    pub fn d_ff(&self) -> usize {
        self.w1.dims()[0]
    }

    /// Hidden units per block.
    pub fn block_size(&self) -> usize {
        self.block
    }

    /// Blocks kept per token.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The configuration.
    pub fn config(&self) -> &RoutedFfnConfig {
        &self.cfg
    }

    /// The router's `(weight [n_blocks, d], bias [n_blocks])`.
    pub fn router(&self) -> (&Var, &Var) {
        (&self.router_w, &self.router_b)
    }

    /// Restarts the LoRA dropout masks from `seed` (call once per training step, so a resumed
    /// run repeats the masks of an uninterrupted one). No-op without LoRA.
    pub fn seed_dropout(&self, seed: u64) {
        if let Some(l) = &self.lora {
            l.seeds.reseed(seed);
        }
    }

    /// The tensors to hand to the optimiser: the router, and LoRA's A1, B1, A2, B2 if
    /// configured. (FFN weights passed in as `Var`s are the caller's to train.)
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            ("router.weight".to_string(), self.router_w.clone()),
            ("router.bias".to_string(), self.router_b.clone()),
        ];
        if let Some(l) = &self.lora {
            v.push(("fc1.lora_a".into(), l.a1.clone()));
            v.push(("fc1.lora_b".into(), l.b1.clone()));
            v.push(("fc2.lora_a".into(), l.a2.clone()));
            v.push(("fc2.lora_b".into(), l.b2.clone()));
        }
        v
    }

    fn check_input(&self, x: &Tensor) -> Result<(Vec<usize>, usize)> {
        let d = self.d_model();
        check_same("routed_ffn", &[("W1", &self.w1), ("x", x)])?;
        let dims = x.dims().to_vec();
        if dims.last() != Some(&d) {
            bail!("routed_ffn: x is {dims:?}, expected [.., d] = [.., {d}]");
        }
        let t = dims[..dims.len() - 1].iter().product();
        Ok((dims, t))
    }

    /// Router scores `[T, n_blocks]` for `x2 [T, d]`; recorded only if something learns from them.
    pub fn router_logits(&self, x2: &Tensor) -> Result<Tensor> {
        let needs_grad =
            !self.frozen && crate::grad_enabled() && (self.cfg.gate != GateMode::Ones || self.cfg.aux_loss);
        let x2 = if needs_grad { x2.clone() } else { x2.detach() };
        x2.matmul(&self.read(&self.router_w).t()?)?
            .broadcast_add(&self.read(&self.router_b))
    }

    /// For inference: the router, the LoRA factors and the FFN weights are read detached, so
    /// nothing records a graph (candle has no no-grad mode; an op records whenever an input is
    /// a `Var`). Their values, saving and merging are unchanged. From the second CPU forward of
    /// more than a few tokens (under `MatmulPrecision::Bf16` from the first forward, packed for
    /// bf16 products too, with the correction), fc1's and fc2's operands (LoRA folded in,
    /// transposed) are kept and reused, so set the adapters' values before freezing: a value written into a LoRA
    /// `Var` afterwards is not seen (merge, unmerge and `permute_units` drop the kept copy).
    pub fn freeze(&mut self) {
        self.frozen = true;
        self.frozen_operands = Default::default();
        for w in [&mut self.w1, &mut self.b1, &mut self.w2, &mut self.b2] {
            *w = w.detach();
        }
    }

    /// One of this layer's `Var`s as the forward reads it (detached once frozen).
    fn read(&self, v: &Var) -> Tensor {
        read_var(v, self.frozen)
    }

    /// Top-k routing of `x [.., d]` by the current router.
    pub fn route(&self, x: &Tensor) -> Result<Arc<Routing>> {
        let (_, t) = self.check_input(x)?;
        let x2 = x.reshape((t, self.d_model()))?.detach();
        let logits = self.router_logits(&x2)?.detach();
        self.routing_from_logits(&logits)
    }

    /// On the device of the scores when they are on CUDA (see [`Routing::from_scores`]).
    fn routing_from_logits(&self, logits: &Tensor) -> Result<Arc<Routing>> {
        Ok(Arc::new(Routing::from_scores(&logits.detach(), self.k)?))
    }

    /// `x [.., d] → y [.., d]` through the top-k blocks; dropout (LoRA inputs) only when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<RoutedFfnOutput> {
        let (dims, t) = self.check_input(x)?;
        let x2 = x.reshape((t, self.d_model()))?;
        let logits = self.router_logits(&x2)?;
        let routing = self.routing_from_logits(&logits)?;
        self.forward_routed(x, &x2, &dims, &logits, routing, self.cfg.gate, train)
    }

    /// Forward with a given routing (e.g. every block) and gate mode; the router supplies the
    /// scores the gates are computed from.
    pub fn forward_with_routing(
        &self,
        x: &Tensor,
        routing: Arc<Routing>,
        gate: GateMode,
        train: bool,
    ) -> Result<RoutedFfnOutput> {
        let (dims, t) = self.check_input(x)?;
        if routing.n_tokens() != t || routing.n_blocks() != self.cfg.n_blocks {
            bail!(
                "routed_ffn: routing is for {} tokens × {} blocks, expected {t} × {}",
                routing.n_tokens(),
                routing.n_blocks(),
                self.cfg.n_blocks
            );
        }
        let x2 = x.reshape((t, self.d_model()))?;
        let logits = self.router_logits(&x2)?;
        self.forward_routed(x, &x2, &dims, &logits, routing, gate, train)
    }

    /// The dense FFN through the same kernels: every block, gate ≡ 1 (LoRA included).
    pub fn forward_dense(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, t) = self.check_input(x)?;
        let n = self.cfg.n_blocks;
        let blocks = (0..t).flat_map(|_| 0..n as u32).collect();
        let routing = Arc::new(Routing::from_blocks(t, n, n, blocks)?);
        Ok(self.forward_with_routing(x, routing, GateMode::Ones, train)?.y)
    }

    /// Switch-style balance loss `n · Σ_e f_e · P_e`: f_e the fraction of routed rows in block e
    /// (constant), P_e the mean router softmax probability of e. 1 when perfectly balanced.
    fn aux_loss(&self, logits: &Tensor, routing: &Routing) -> Result<Tensor> {
        let n = routing.n_blocks();
        let rows = routing.n_rows().max(1) as f64;
        let f: Vec<f64> = routing.block_counts().iter().map(|&c| c as f64 / rows).collect();
        let f = Tensor::from_vec(f, n, logits.device())?.to_dtype(logits.dtype())?;
        let p = softmax_last_dim(logits)?.mean(0)?;
        p.mul(&f)?.sum_all()? * n as f64
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_routed(
        &self,
        x: &Tensor,
        x2: &Tensor,
        dims: &[usize],
        logits: &Tensor,
        routing: Arc<Routing>,
        gate: GateMode,
        train: bool,
    ) -> Result<RoutedFfnOutput> {
        let (dt, dev) = (x.dtype(), x.device());
        if routing.n_tokens() == 0 {
            return Ok(RoutedFfnOutput {
                y: Tensor::zeros(dims, dt, dev)?,
                // No tokens, no imbalance: a loss of 0 keeps `aux_loss: Some` whenever enabled.
                aux_loss: if self.cfg.aux_loss {
                    Some(Tensor::zeros((), dt, dev)?)
                } else {
                    None
                },
                routing,
                gates: Tensor::zeros(0, dt, dev)?,
            });
        }
        let gates = router_gates(logits, &routing, gate)?;
        let lora = self.lora.as_ref().filter(|_| !self.merged);
        let few = !train && routing.n_tokens() <= FEW_TOKENS && x2.device().is_cpu();
        // With bf16 products the kept operands are packed once too, so nothing is set up per
        // call: every forward takes them, few tokens and the first call included (so that each
        // forward multiplies the same way).
        let packed = crate::matmul_precision() == crate::MatmulPrecision::Bf16 && x2.dtype() == DType::F32;
        if (!few || packed) && self.reads_frozen_operands(x2, &gates, train, packed) {
            let y = self.forward_frozen(x2, &routing, &gates)?;
            return self.finish(y, x2, dims, logits, routing, gates);
        }
        if let Some(l) = lora.filter(|l| !few && self.fuses_lora(x2, l, train)) {
            // One op: both projections multiply by their merged weight (see lora_ops.rs).
            let f = [&l.a1, &l.b1, &l.a2, &l.b2].map(|v| self.read(v));
            let base = [&self.w1, &self.b1, &self.w2, &self.b2];
            let adapters = [&f[0], &f[1], &f[2], &f[3]];
            let (s, act) = (l.cfg.scale(), self.activation);
            let y = lora_ops::routed_lora_ffn(x2, &gates, base, adapters, s, act, &routing)?;
            return self.finish(y, x2, dims, logits, routing, gates);
        }
        let y = self.forward_unfused(x2, &routing, &gates, lora, train, few)?;
        self.finish(y, x2, dims, logits, routing, gates)
    }

    /// The FFN from the grouped GEMMs with LoRA composed around them (LoRA dropout, trainable
    /// weights, other devices), before the correction. With `per_block` (an evaluation of a few
    /// tokens on the CPU: decoding) each GEMM runs once per active block on the weights in place
    /// (`composed.rs`, candle ops, so still differentiable): the fused ops' per-call setup reads
    /// all of W1 and W2 (a copy, the transpose their grouped GEMMs read) whatever the token
    /// count, for one token with 2 of 8 blocks several times the weights the token needs.
    fn forward_unfused(
        &self,
        x2: &Tensor,
        routing: &Arc<Routing>,
        gates: &Tensor,
        lora: Option<&FfnLora>,
        train: bool,
        per_block: bool,
    ) -> Result<Tensor> {
        let b = self.block_size();
        // Trained base weights (no LoRA) are `Var`s: inside `no_grad` they are read detached.
        let base = |t: &Tensor| read_tensor(t, self.frozen);
        let (w1, b1, w2, b2) = (base(&self.w1), base(&self.b1), base(&self.w2), base(&self.b2));
        // `add`: a bias [n_blocks·b] or a routed base [R, b].
        let gather = |x: &Tensor, w: &Tensor, add: &Tensor, act: Option<Activation>| {
            if per_block {
                let kind = if add.rank() == 1 {
                    AddKind::Bias
                } else {
                    AddKind::Base
                };
                composed::gather_matmul_act_per_block(x, w, Some((add, kind)), act, routing, b)
            } else {
                gather_matmul_act(x, w, Some(add), act, routing)
            }
        };
        let scatter = |h: &Tensor, w: &Tensor, bias: Option<&Tensor>| -> Result<Tensor> {
            if per_block {
                composed::scatter_matmul_bias_with(h, gates, w, bias, routing, b, w.dim(0)?, false)
            } else {
                scatter_matmul_bias(h, gates, w, bias, routing)
            }
        };
        // fc1: act(x W1_eᵀ + b1_e [+ LoRA: (α/r)·(x A1ᵀ) B1_eᵀ]) on the routed rows, [R, b]. With
        // LoRA, B1's routed rows plus b1 form the base the fused W1 GEMM adds to.
        let act = Some(self.activation);
        let h = match lora {
            None => gather(x2, &w1, &b1, act)?,
            Some(l) => {
                let xin = if train {
                    dropout(x2, l.cfg.dropout, l.seeds.next())?
                } else {
                    x2.clone()
                };
                let u = (xin.matmul(&self.read(&l.a1).t()?)? * l.cfg.scale())?; // [T, r]
                let routed = gather(&u, &self.read(&l.b1), &b1, None)?; // [R, b]
                gather(x2, &w1, &routed, act)?
            }
        };
        // fc2: gate · h · W2_eᵀ scattered into the tokens (+ b2, inside the kernel when frozen),
        // + LoRA: A2's columns routed like W2's, B2 once per token; α/r scales the [T, r] side.
        let mut y = scatter(&h, &w2, Some(&b2))?; // [T, d]
        if let Some(l) = lora {
            let hin = if train {
                dropout(&h, l.cfg.dropout, l.seeds.next())?
            } else {
                h.clone()
            };
            let v = (scatter(&hin, &self.read(&l.a2), None)? * l.cfg.scale())?; // [T, r]
            y = y.add(&v.matmul(&self.read(&l.b2).t()?)?)?;
        }
        Ok(y)
    }

    /// Whether the LoRA layer runs as the one op of `lora_ops.rs`: on the CPU in f32 or f64,
    /// with frozen FFN weights, and with the adapters seeing the base weights' input (no LoRA
    /// dropout, or evaluation).
    fn fuses_lora(&self, x2: &Tensor, l: &FfnLora, train: bool) -> bool {
        let frozen = [&self.w1, &self.b1, &self.w2, &self.b2]
            .iter()
            .all(|w| !w.track_op());
        x2.device().is_cpu()
            && matches!(x2.dtype(), DType::F32 | DType::F64)
            && frozen
            && (l.cfg.dropout == 0.0 || !train)
    }

    /// The correction term, the output shape and the aux loss, after fc2.
    fn finish(
        &self,
        mut y: Tensor,
        x2: &Tensor,
        dims: &[usize],
        logits: &Tensor,
        routing: Arc<Routing>,
        gates: Tensor,
    ) -> Result<RoutedFfnOutput> {
        if routing.k() < routing.n_blocks() {
            y = self.add_correction(y, x2)?;
        }
        let y = y.reshape(dims)?;
        let aux_loss = if self.cfg.aux_loss {
            Some(self.aux_loss(logits, &routing)?)
        } else {
            None
        };
        Ok(RoutedFfnOutput {
            y,
            aux_loss,
            routing,
            gates,
        })
    }

    /// The effective `(W1, W2)`: the base weights plus the LoRA updates (if any, and unmerged).
    pub fn merged_weights(&self) -> Result<(Tensor, Tensor)> {
        match self.lora.as_ref().filter(|_| !self.merged) {
            None => Ok((self.w1.clone(), self.w2.clone())),
            Some(l) => {
                let d1 = delta_weight(&l.a1, &l.b1, &l.cfg)?;
                let d2 = delta_weight(&l.a2, &l.b2, &l.cfg)?;
                Ok(((&self.w1 + d1)?, (&self.w2 + d2)?))
            }
        }
    }

    /// Folds the LoRA updates into W1 and W2 (frozen base weights only). While merged the LoRA
    /// factors get no gradient.
    pub fn merge(&mut self) -> std::result::Result<(), LoraError> {
        if self.lora.is_none() {
            return Err(LoraError::Candle(candle_core::Error::Msg(
                "routed_ffn: merge needs a LoRA configuration".into(),
            )));
        }
        if self.merged {
            return Err(LoraError::AlreadyMerged);
        }
        self.check_frozen_base("merge")?;
        let (w1, w2) = self.merged_weights()?;
        (self.w1, self.w2) = (w1.detach(), w2.detach());
        self.merged = true;
        self.frozen_operands = Default::default();
        Ok(())
    }

    /// Undoes [`merge`](Self::merge) (exact up to rounding).
    pub fn unmerge(&mut self) -> std::result::Result<(), LoraError> {
        let Some(l) = self.lora.as_ref() else {
            return Err(LoraError::NotMerged);
        };
        if !self.merged {
            return Err(LoraError::NotMerged);
        }
        self.check_frozen_base("unmerge")?;
        let d1 = delta_weight(&l.a1, &l.b1, &l.cfg)?;
        let d2 = delta_weight(&l.a2, &l.b2, &l.cfg)?;
        (self.w1, self.w2) = ((&self.w1 - d1)?.detach(), (&self.w2 - d2)?.detach());
        self.merged = false;
        self.frozen_operands = Default::default();
        Ok(())
    }

    /// Merging replaces W1 and W2 by constants: trained ones (a `Var` or a view of one) would
    /// silently stop training, so they are refused.
    fn check_frozen_base(&self, what: &str) -> std::result::Result<(), LoraError> {
        if self.w1.track_op() || self.w2.track_op() {
            return Err(LoraError::Candle(candle_core::Error::Msg(format!(
                "routed_ffn: {what} needs frozen FFN weights (W1 or W2 is trained here)"
            ))));
        }
        Ok(())
    }

    /// LoRA factors `(A1 [r, d], B1 [d_ff, r], A2 [r, d_ff], B2 [d, r])`, if configured.
    pub fn lora_factors(&self) -> Option<(&Var, &Var, &Var, &Var)> {
        self.lora.as_ref().map(|l| (&l.a1, &l.b1, &l.a2, &l.b2))
    }

    /// The FFN weights `(W1, b1, W2, b2)` currently used (merged ones while merged).
    pub fn weights(&self) -> (&Tensor, &Tensor, &Tensor, &Tensor) {
        (&self.w1, &self.b1, &self.w2, &self.b2)
    }
}
