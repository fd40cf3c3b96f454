//! A frozen layer's fc1 and fc2 weights as the grouped GEMMs read them, kept across forwards.
//!
//! The LoRA op forms its operands on every call: a row-major copy of W plus LoRA's `s·B A`,
//! then the transpose its GEMMs read (`lora_ops.rs`, `chunked.rs`). That is three passes over
//! both weights whatever the token count; for one text of ~26 tokens it was most of the layer's
//! time. Once [`RoutedFfn::freeze`] has fixed the values (inference), the same operands are
//! formed once (`lora_ops::operands_t`, W alone without adapters) and reused, through the
//! whole-FFN kernel (`chunked.rs`), which does the same arithmetic in the same order as the op
//! and, without adapters, as the grouped GEMMs of `cpu.rs`: the output is the same to the bit
//! (a test checks both).
//!
//! They are made on the second forward that would form them, not the first: a layer that runs
//! one such forward (a prompt before cached decoding) would hold a copy of both weights for
//! nothing.

use super::cpu::HostRouting;
use super::{chunked, lora_ops};
use super::{RoutedFfn, Routing};
use crate::precision::bf16_products;
use crate::util::{with_slices, Float};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// `W1'ᵀ` by blocks `[n, d, b]` and `W2'ᵀ [d_ff, d]`, LoRA folded in, on the CPU; and under
/// `MatmulPrecision::Bf16` their blocks packed for bf16 products, on the first forward that
/// takes them (packing per forward cost as much as the products of a one-text forward).
struct Operands {
    w1b: Tensor,
    w2t: Tensor,
    bf16: OnceLock<Option<chunked::PackedBlocks>>,
}

impl std::fmt::Debug for Operands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operands")
            .field("w1b", &self.w1b)
            .field("w2t", &self.w2t)
            .field("bf16", &self.bf16.get().map(|p| p.is_some()))
            .finish()
    }
}

/// The cache a layer carries; reset whenever its weights or adapters change.
#[derive(Debug, Default)]
pub(super) struct FrozenOperands {
    calls: AtomicUsize,
    operands: OnceLock<Operands>,
    /// The linear correction's `C_xᵀ` packed for bf16 products, with the id of the correction
    /// tensor it came from (`correction.rs`).
    pub(super) correction: crate::PackedCache,
}

impl FrozenOperands {
    /// A copy would be made twice from here on: make it once. `eager`: from the first call (bf16
    /// products, so that every forward takes the same products).
    fn wanted(&self, eager: bool) -> bool {
        self.operands.get().is_some() || eager || self.calls.fetch_add(1, Ordering::Relaxed) >= 1
    }
}

impl RoutedFfn {
    /// Whether a forward of `x2` can read the kept operands: frozen, evaluation, f32/f64 on the
    /// CPU, nothing tracked (a gradient would need the ops' backward). `eager`: kept from the
    /// first such forward rather than the second.
    pub(super) fn reads_frozen_operands(
        &self,
        x2: &Tensor,
        gates: &Tensor,
        train: bool,
        eager: bool,
    ) -> bool {
        self.frozen
            && !train
            && x2.device().is_cpu()
            && matches!(x2.dtype(), DType::F32 | DType::F64)
            && !x2.track_op()
            && !gates.track_op()
            && self.frozen_operands.wanted(eager)
    }

    /// fc2(act(fc1(x))) on the routed rows, `[T, d]`, before the correction: the whole-FFN
    /// kernel with the kept operands.
    pub(super) fn forward_frozen(
        &self,
        x2: &Tensor,
        routing: &Arc<Routing>,
        gates: &Tensor,
    ) -> Result<Tensor> {
        let ops = match self.frozen_operands.operands.get() {
            Some(ops) => ops,
            None => {
                let made = self.make_operands(x2.dtype())?;
                self.frozen_operands.operands.get_or_init(|| made)
            }
        };
        match x2.dtype() {
            DType::F32 => self.run_frozen::<f32>(ops, x2, routing, gates),
            _ => self.run_frozen::<f64>(ops, x2, routing, gates),
        }
    }

    fn run_frozen<T: Float + crate::activation::ActScalar + candle_core::WithDType>(
        &self,
        ops: &Operands,
        x2: &Tensor,
        routing: &Arc<Routing>,
        gates: &Tensor,
    ) -> Result<Tensor> {
        let op = "routed_ffn (frozen)";
        let (t, d) = x2.dims2()?;
        let hr = HostRouting::new(routing)?;
        let ts = [x2, &ops.w1b, &self.b1, gates, &ops.w2t, &self.b2];
        let y = with_slices::<T, _>(op, &ts, |s| {
            let mut f = chunked::Forward {
                x: s[0],
                w1b: s[1],
                b1: s[2],
                gates: s[3],
                w2t: s[4],
                b2: s[5],
                d,
                d_out: d,
                block: self.block,
                act: self.activation,
                packed: None,
            };
            let n = hr.n_blocks();
            // Packed outside `get_or_init`: packing runs rayon tasks, and a thread waiting on
            // them may run another forward of this layer (rayon-rs/rayon#1251).
            f.packed = match (bf16_products::<T>(), ops.bf16.get()) {
                (false, _) => None,
                (true, Some(p)) => p.as_ref(),
                (true, None) => {
                    let made = chunked::pack_forward(&f, n);
                    ops.bf16.get_or_init(|| made).as_ref()
                }
            };
            Ok(chunked::forward(hr, &f, false).0)
        })?;
        Tensor::from_vec(y, (t, d), &Device::Cpu)
    }

    /// `W' = W + s·B A` as the LoRA ops form it per call (or W alone), then transposed (W1 by
    /// blocks).
    fn make_operands(&self, dtype: DType) -> Result<Operands> {
        match dtype {
            DType::F32 => self.make_operands_t::<f32>(),
            _ => self.make_operands_t::<f64>(),
        }
    }

    fn make_operands_t<T: Float + candle_core::WithDType>(&self) -> Result<Operands> {
        let op = "routed_ffn (frozen)";
        let (d_ff, d) = self.w1.dims2()?;
        let dev = Device::Cpu;
        let (w1, w2) = (&self.w1, &self.w2);
        let (w1b, w2t) = match self.lora.as_ref().filter(|_| !self.merged) {
            Some(l) => {
                let f = [&l.a1, &l.b1, &l.a2, &l.b2].map(|v| self.read(v));
                let (r, s) = (l.cfg.rank, T::lit(l.cfg.scale()));
                with_slices::<T, _>(op, &[&f[0], &f[1], &f[2], &f[3]], |a| {
                    lora_ops::operands_t(op, w1, w2, Some(([a[0], a[1], a[2], a[3]], r, s)), self.block)
                })?
            }
            None => lora_ops::operands_t::<T>(op, w1, w2, None, self.block)?,
        };
        Ok(Operands {
            w1b: Tensor::from_vec(w1b, (d_ff / self.block, d, self.block), &dev)?,
            w2t: Tensor::from_vec(w2t, (d_ff, d), &dev)?,
            bf16: OnceLock::new(),
        })
    }
}
