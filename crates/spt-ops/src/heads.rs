//! Attention head layout changes as single graph nodes: [`split_heads`] (`[B, L, H·d] →
//! [B, H, L, d]`, contiguous) and [`merge_heads`] (its inverse), each the other's backward.
//!
//! Why an op for a reshape: composed from candle ops, a split is `reshape → transpose →
//! contiguous`, three autograd nodes, and candle's backward accumulates each node's gradient
//! into a fresh zeroed tensor (`zeros_like` + `add`): three memsets and three full passes per
//! tensor where one strided copy is the whole work. Attention splits q, k, v and merges its
//! output in every layer, so this is 4 activation-sized tensors a layer. On the CPU (f32, f64)
//! the op copies rows in parallel; elsewhere it is the composed form.

use crate::util::par_vec;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// `[B, L, H·d] → [B, H, L, d]` (contiguous), differentiable.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let Ok((b, l, hd)) = x.dims3() else {
        bail!("split_heads: x is {:?}, expected [B, L, H·d]", x.dims())
    };
    if heads == 0 || hd % heads != 0 {
        bail!(
            "split_heads: width {hd} of {:?} is not a multiple of {heads} heads",
            x.dims()
        );
    }
    if !fused(x) {
        return x
            .reshape((b, l, heads, hd / heads))?
            .transpose(1, 2)?
            .contiguous();
    }
    // A size-1 dimension's stride is never stepped (candle's is_contiguous ignores it too).
    let x = if hd == 1 || x.stride()[2] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op1(Heads {
        dir: Dir::Split,
        b,
        l,
        h: heads,
        d: hd / heads,
    })
}

/// `[B, H, L, d] → [B, L, H·d]` (contiguous), differentiable: the inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let Ok((b, h, l, d)) = x.dims4() else {
        bail!("merge_heads: x is {:?}, expected [B, H, L, d]", x.dims())
    };
    if h == 0 {
        // Its backward (split into 0 heads) could not run.
        bail!("merge_heads: x is {:?}, which has 0 heads", x.dims())
    }
    if !fused(x) {
        return x.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d));
    }
    x.contiguous()?.apply_op1(Heads {
        dir: Dir::Merge,
        b,
        l,
        h,
        d,
    })
}

/// `y [.., P·w]` as `parts` (P) tensors `[.., w]`, each split into `heads` when given
/// (`[B, L, w] → [B, H, L, w/H]`): the composed form of a projection whose output is several
/// attention inputs (GPT-2's fused q|k|v), for callers without the fused op.
pub fn split_parts(y: &Tensor, parts: usize, heads: Option<usize>) -> Result<Vec<Tensor>> {
    let out = y.dim(candle_core::D::Minus1)?;
    if parts == 0 || out % parts != 0 {
        bail!(
            "split_parts: cannot split {out} outputs of {:?} into {parts} equal parts",
            y.dims()
        );
    }
    let width = out / parts;
    (0..parts)
        .map(|i| {
            let part = y.narrow(candle_core::D::Minus1, i * width, width)?;
            match heads {
                Some(h) => split_heads(&part, h),
                None => Ok(part),
            }
        })
        .collect()
}

/// The composed form of a projection `f` whose input and parts use the attention-head layout
/// as `layout` says: `split_parts(f(merge_heads(x)), parts, heads)`, each step only when asked.
/// For callers without the fused op (a LoRA layer that is merged or draws a dropout mask, a
/// plain linear layer).
pub fn compose_parts<E: From<candle_core::Error>>(
    x: &Tensor,
    parts: usize,
    layout: crate::HeadsLayout,
    f: impl FnOnce(&Tensor) -> std::result::Result<Tensor, E>,
) -> std::result::Result<Vec<Tensor>, E> {
    let y = if layout.input_heads {
        f(&merge_heads(x)?)?
    } else {
        f(x)?
    };
    Ok(split_parts(&y, parts, layout.output_heads)?)
}

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Split,
    Merge,
}

struct Heads {
    dir: Dir,
    b: usize,
    l: usize,
    h: usize,
    d: usize,
}

impl Heads {
    /// The output: one parallel task per (batch, head) block of `L·d` values in split layout.
    /// `x` is the input's storage and `at(b, i)` the offset of its row (b, i): a split's input may
    /// be a narrowed view (GPT-2's q, k, v are column ranges of one projection).
    fn run<T: Copy + Send + Sync + Default>(
        &self,
        x: &[T],
        at: impl Fn(usize, usize) -> usize + Sync,
    ) -> Vec<T> {
        let (l, h, d) = (self.l, self.h, self.d);
        let len = self.b * h * l * d;
        if len == 0 {
            return Vec::new();
        }
        match self.dir {
            Dir::Split => par_vec(len, l * d, T::default(), |bh, dst| {
                let (b, hh) = (bh / h, bh % h);
                for (i, row) in dst.chunks_mut(d).enumerate() {
                    let src = at(b, i) + hh * d;
                    row.copy_from_slice(&x[src..src + d]);
                }
            }),
            // Merge writes rows of H·d: one task per (batch, position) row.
            Dir::Merge => par_vec(len, h * d, T::default(), |bi, dst| {
                let (b, i) = (bi / l, bi % l);
                for (hh, part) in dst.chunks_mut(d).enumerate() {
                    let src = at(0, 0) + ((b * h + hh) * l + i) * d;
                    part.copy_from_slice(&x[src..src + d]);
                }
            }),
        }
    }

    fn out_shape(&self) -> Shape {
        match self.dir {
            Dir::Split => Shape::from((self.b, self.h, self.l, self.d)),
            Dir::Merge => Shape::from((self.b, self.l, self.h * self.d)),
        }
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        match self.dir {
            Dir::Split => "split_heads",
            Dir::Merge => "merge_heads",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (start, st) = (l.start_offset(), l.stride());
        // Rows of H·d contiguous values at any row stride (split), or a contiguous input (merge).
        let rows_ok = match self.dir {
            Dir::Split => st[2] == 1 || l.dims()[2] == 1,
            Dir::Merge => l.is_contiguous(),
        };
        if !rows_ok {
            bail!(
                "{op}: x {:?} with strides {st:?} has non-contiguous rows",
                l.dims()
            );
        }
        let at = |b: usize, i: usize| start + b * st[0] + i * st[1];
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(v, at)),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(v, at)),
            other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, self.out_shape()))
    }

    fn bwd(&self, _x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.dir {
            Dir::Split => merge_heads(grad)?,
            Dir::Merge => split_heads(grad, self.h)?,
        }))
    }
}

/// Where an op's `[N, width]` operand rows sit in memory: plainly, or as attention heads
/// `[B, H, L, width/H]` with row `b·L + l` split over the H heads. An op that reads or writes the
/// heads layout itself saves attention's `split_heads` / `merge_heads` node, and with it the
/// zero-fill and add candle's backward spends on every node's input gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowLayout {
    Plain,
    Heads { h: usize, l: usize },
}

impl RowLayout {
    /// The offset of each head's part of row `r` (`width/H` values each), in head order; only
    /// called for the heads layout (a plain row is one piece).
    fn parts(h: usize, l: usize, r: usize, width: usize) -> impl Iterator<Item = (usize, usize)> {
        let (d, b, i) = (width / h, r / l, r % l);
        (0..h).map(move |hh| (((b * h + hh) * l + i) * d, d))
    }

    /// Rows `r0..r0 + m` of a `width`-wide operand as a row-major `[m, width]` slice: borrowed
    /// when plain, gathered into `buf` otherwise.
    pub(crate) fn read<'a, T: Copy>(
        self,
        src: &'a [T],
        width: usize,
        r0: usize,
        m: usize,
        buf: &'a mut Vec<T>,
    ) -> &'a [T] {
        let RowLayout::Heads { h, l } = self else {
            return &src[r0 * width..(r0 + m) * width];
        };
        buf.clear();
        for r in r0..r0 + m {
            for (at, d) in Self::parts(h, l, r, width) {
                buf.extend_from_slice(&src[at..at + d]);
            }
        }
        buf
    }

    /// Lets `fill` write rows `r0..r0 + m` of the `width`-wide `dst` as a row-major `[m, width]`
    /// slice: `dst`'s own rows when plain, `buf` scattered into `dst` afterwards otherwise.
    ///
    /// # Safety
    /// `dst` must hold all rows of the operand, and no other thread may touch rows `r0..r0 + m`.
    pub(crate) unsafe fn write<T: crate::util::Float>(
        self,
        dst: crate::blas::SendPtr<T>,
        width: usize,
        r0: usize,
        m: usize,
        buf: &mut Vec<T>,
        fill: impl FnOnce(&mut [T]),
    ) {
        let RowLayout::Heads { h, l } = self else {
            fill(std::slice::from_raw_parts_mut(dst.0.add(r0 * width), m * width));
            return;
        };
        buf.clear();
        buf.resize(m * width, T::zero());
        fill(buf);
        for (j, r) in (r0..r0 + m).enumerate() {
            let mut src = &buf[j * width..(j + 1) * width];
            for (at, d) in Self::parts(h, l, r, width) {
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst.0.add(at), d);
                src = &src[d..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn composed_split(x: &Tensor, h: usize) -> Result<Tensor> {
        let (b, l, hd) = x.dims3()?;
        x.reshape((b, l, h, hd / h))?.transpose(1, 2)?.contiguous()
    }

    #[test]
    fn split_and_merge_equal_the_composed_forms_and_their_gradients() -> Result<()> {
        let (b, l, h, d) = (2, 5, 3, 4);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, l, h * d), &Device::Cpu)?)?;
        let w = Tensor::randn(0f32, 1.0, (b, h, l, d), &Device::Cpu)?;
        let ours = split_heads(x.as_tensor(), h)?;
        let theirs = composed_split(x.as_tensor(), h)?;
        assert_eq!(ours.dims(), [b, h, l, d]);
        assert_eq!(
            ours.flatten_all()?.to_vec1::<f32>()?,
            theirs.flatten_all()?.to_vec1::<f32>()?
        );
        let g1 = ours.mul(&w)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&w)?.sum_all()?.backward()?;
        let (g1, g2) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        assert_eq!(
            g1.flatten_all()?.to_vec1::<f32>()?,
            g2.flatten_all()?.to_vec1::<f32>()?
        );
        // Merge inverts split, and its gradient is the split of the upstream gradient.
        let back = merge_heads(&ours)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            x.as_tensor().flatten_all()?.to_vec1::<f32>()?
        );
        let y = Var::from_tensor(&w)?;
        let u = Tensor::randn(0f32, 1.0, (b, l, h * d), &Device::Cpu)?;
        let g = merge_heads(y.as_tensor())?.mul(&u)?.sum_all()?.backward()?;
        let want = composed_split(&u, h)?;
        assert_eq!(
            g.get(y.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn a_narrowed_input_splits_like_its_copy() -> Result<()> {
        // GPT-2 takes q, k, v as column ranges of one [B, L, 3·H·d] projection.
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 36), &Device::Cpu)?)?;
        let k = qkv.as_tensor().narrow(2, 12, 12)?;
        assert!(!k.is_contiguous());
        let ours = split_heads(&k, 3)?;
        let theirs = composed_split(&k.contiguous()?, 3)?;
        assert_eq!(
            ours.flatten_all()?.to_vec1::<f32>()?,
            theirs.flatten_all()?.to_vec1::<f32>()?
        );
        let w = Tensor::randn(0f32, 1.0, ours.dims(), &Device::Cpu)?;
        let g1 = ours.mul(&w)?.sum_all()?.backward()?;
        let g2 = composed_split(&k, 3)?.mul(&w)?.sum_all()?.backward()?;
        let (g1, g2) = (g1.get(qkv.as_tensor()).unwrap(), g2.get(qkv.as_tensor()).unwrap());
        assert_eq!(
            g1.flatten_all()?.to_vec1::<f32>()?,
            g2.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    /// A width of 1 never steps its stride: a transposed `[B, 1, L]` is a contiguous `[B, L, 1]`
    /// whose last stride is L, and splits (and back-propagates) like its copy.
    #[test]
    fn a_size_one_width_with_any_stride_splits_like_its_copy() -> Result<()> {
        let src = Var::from_tensor(&Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((2, 1, 3))?)?;
        let x = src.as_tensor().transpose(1, 2)?; // [2, 3, 1], strides [3, 1, 3]
        assert!(x.is_contiguous() && x.stride()[2] != 1);
        let ours = split_heads(&x, 1)?;
        let theirs = composed_split(&x.contiguous()?, 1)?;
        assert_eq!(ours.dims(), [2, 1, 3, 1]);
        assert_eq!(
            ours.flatten_all()?.to_vec1::<f32>()?,
            theirs.flatten_all()?.to_vec1::<f32>()?
        );
        let w = Tensor::arange(1f32, 7., &Device::Cpu)?.reshape((2, 1, 3, 1))?;
        let g = ours.mul(&w)?.sum_all()?.backward()?;
        assert_eq!(
            g.get(src.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?,
            [1., 2., 3., 4., 5., 6.]
        );
        Ok(())
    }

    #[test]
    fn a_width_that_heads_do_not_divide_is_a_named_error() {
        let x = Tensor::zeros((1, 2, 10), DType::F32, &Device::Cpu).unwrap();
        let e = split_heads(&x, 3).unwrap_err().to_string();
        assert!(e.contains("split_heads") && e.contains("3 heads"), "{e}");
    }

    #[test]
    fn split_parts_are_narrowed_then_split_pieces() -> Result<()> {
        let y = Tensor::randn(0f32, 1.0, (2, 5, 12), &Device::Cpu)?;
        let parts = split_parts(&y, 3, Some(2))?;
        assert_eq!(parts.len(), 3);
        for (i, p) in parts.iter().enumerate() {
            let want = split_heads(&y.narrow(2, 4 * i, 4)?, 2)?;
            assert_eq!(p.dims(), [2, 2, 5, 2]);
            assert_eq!(
                p.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?
            );
        }
        let plain = split_parts(&y, 2, None)?;
        assert_eq!(
            plain[1].flatten_all()?.to_vec1::<f32>()?,
            y.narrow(2, 6, 6)?.flatten_all()?.to_vec1::<f32>()?
        );
        let e = split_parts(&y, 5, None).unwrap_err().to_string();
        assert!(e.contains("cannot split 12 outputs of [2, 5, 12] into 5"), "{e}");
        Ok(())
    }
}
