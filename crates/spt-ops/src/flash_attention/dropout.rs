//! Attention-probability dropout drawn from a counter hash instead of a stored mask: element
//! `(b·H + h, i, j)` is kept iff `hash(row_key(seed, bh, i) + j) ≥ p · 2³²`. The backward pass
//! regenerates exactly the forward's mask from the seed, so nothing `[B, H, L, L]` is stored.

use crate::util::Float;
use candle_core::{Device, Result, Tensor};

/// The dropout mask of one op call (attention probabilities in `flash_attention`, the sublayer
/// output in `residual_layer_norm`): a seed and a drop probability. The mask is a counter hash
/// of the seed and the element's position, so backward regenerates it instead of storing it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeededDropout {
    /// Probability of zeroing each element, in `[0, 1)`.
    pub p: f64,
    /// Seed of this call's mask; use a new one per step (and per layer).
    pub seed: u64,
}

impl SeededDropout {
    /// Refuses a probability outside `[0, 1)` (NaN included), naming `op`.
    pub(crate) fn check(self, op: &str) -> Result<()> {
        if !(0.0..1.0).contains(&self.p) {
            candle_core::bail!("{op}: dropout p must be in [0, 1), got {}", self.p);
        }
        Ok(())
    }

    /// `dropout` checked, and kept only where it drops something.
    pub(crate) fn active(dropout: Option<Self>, op: &str) -> Result<Option<Self>> {
        match dropout {
            Some(dr) => {
                dr.check(op)?;
                Ok((dr.p > 0.0).then_some(dr))
            }
            None => Ok(None),
        }
    }
}

/// The kernels' form of [`SeededDropout`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowDropout {
    seed: u64,
    threshold: u32,
    /// `1 / (1 − p)`.
    keep_scale: f64,
}

impl RowDropout {
    pub(crate) fn new(d: SeededDropout) -> Self {
        Self {
            seed: d.seed,
            threshold: threshold(d.p),
            keep_scale: 1.0 / (1.0 - d.p),
        }
    }

    /// `row[j] ← row[j] · factor · D_ij` for query row `i` of head `bh`, where `D_ij` is 0 or
    /// `1/(1−p)`.
    pub(crate) fn apply_scaled<T: DropoutElem>(&self, row: &mut [T], bh: usize, i: usize, factor: T) {
        let kept = factor * T::lit(self.keep_scale);
        T::apply(row, row_key(self.seed, bh, i), self.threshold, kept);
    }
}

fn threshold(p: f64) -> u32 {
    (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32
}

/// splitmix64 of (seed, row): one well-mixed 32-bit key per query row.
fn row_key(seed: u64, bh: usize, i: usize) -> u32 {
    let row = ((bh as u64) << 32) ^ i as u64;
    let mut z = seed ^ row.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

/// A 32-bit integer hash (xor-shift-multiply, two rounds): consecutive inputs give
/// independent-looking outputs, and it vectorises (32-bit multiplies only).
#[inline(always)]
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

#[inline(always)]
fn apply_generic<T: Float>(row: &mut [T], key: u32, threshold: u32, kept: T) {
    for (j, x) in row.iter_mut().enumerate() {
        let keep = hash32(key.wrapping_add(j as u32)) >= threshold;
        *x = if keep { *x * kept } else { T::zero() };
    }
}

/// Element types the dropout loop is specialised for (f32 gets an AVX2 build of the same loop).
pub(crate) trait DropoutElem: Float {
    fn apply(row: &mut [Self], key: u32, threshold: u32, kept: Self);
}

impl DropoutElem for f64 {
    fn apply(row: &mut [f64], key: u32, threshold: u32, kept: f64) {
        apply_generic(row, key, threshold, kept)
    }
}

impl DropoutElem for f32 {
    fn apply(row: &mut [f32], key: u32, threshold: u32, kept: f32) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected on this CPU.
            return unsafe { apply_avx2(row, key, threshold, kept) };
        }
        apply_generic(row, key, threshold, kept)
    }
}

/// The same loop compiled with AVX2 enabled, so the hash runs 8 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_avx2(row: &mut [f32], key: u32, threshold: u32, kept: f32) {
    apply_generic(row, key, threshold, kept)
}

/// The multipliers `D` (0 or `1/(1−p)`) that [`super::flash_attention`] applies for `dropout`,
/// as an f32 tensor `[b, h, lq, lk]`: for references and tests, not for training (it is the
/// `[B, H, L, L]` tensor the fused op avoids).
pub fn attention_dropout_mask(
    dropout: SeededDropout,
    (b, h, lq, lk): (usize, usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    dropout.check("attention_dropout_mask")?;
    let d = RowDropout::new(dropout);
    let mut out = vec![1f32; b * h * lq * lk];
    for (r, row) in out.chunks_mut(lk.max(1)).enumerate().take(b * h * lq) {
        apply_generic(
            row,
            row_key(d.seed, r / lq, r % lq),
            d.threshold,
            d.keep_scale as f32,
        );
    }
    Tensor::from_vec(out, (b, h, lq, lk), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_rate_matches_p_and_avx2_matches_scalar() {
        let d = RowDropout::new(SeededDropout { p: 0.1, seed: 7 });
        let mut dropped = 0usize;
        let n = 200 * 1000;
        for i in 0..200 {
            let mut a = vec![1f32; 1000];
            let mut b = a.clone();
            d.apply_scaled(&mut a, 3, i, 1.0);
            apply_generic(&mut b, row_key(7, 3, i), d.threshold, d.keep_scale as f32);
            assert_eq!(a, b, "row {i}: the AVX2 and scalar loops disagree");
            dropped += a.iter().filter(|&&x| x == 0.0).count();
        }
        let rate = dropped as f64 / n as f64;
        // 200 000 Bernoulli(0.1) draws: sd 0.00067, so ±0.003 is > 4 sd.
        assert!((rate - 0.1).abs() < 0.003, "drop rate {rate}");
    }

    #[test]
    fn p_zero_keeps_everything_and_seeds_differ() {
        let d = RowDropout::new(SeededDropout { p: 0.0, seed: 1 });
        let mut a = vec![2f64; 64];
        d.apply_scaled(&mut a, 0, 0, 0.5);
        assert!(a.iter().all(|&x| x == 1.0));
        let m1 =
            attention_dropout_mask(SeededDropout { p: 0.5, seed: 1 }, (1, 2, 8, 8), &Device::Cpu).unwrap();
        let m2 =
            attention_dropout_mask(SeededDropout { p: 0.5, seed: 2 }, (1, 2, 8, 8), &Device::Cpu).unwrap();
        let diff = (m1 - m2)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff > 0.0, "two seeds gave the same mask");
    }
}
