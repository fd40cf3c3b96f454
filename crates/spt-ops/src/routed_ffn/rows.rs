//! The row moves around the routed GEMMs, as custom ops that are each other's adjoint:
//!
//! - [`gather_rows`] `x [T, d] → [R, d]`: routed row `r` is a copy of its token's row.
//! - [`sum_rows`] `y [R, n] → [T, n]`: each token's routed rows summed, slots in order.
//!
//! Both are instances of one pair over a [`RowMap`]: a gather (each destination row copies one
//! source row, or is zero) and its adjoint, a per-source-row sum of the rows that copied it. The
//! composed routed path (`composed.rs`) also uses the pair to lay the routed rows out padded per
//! block (one batched GEMM over every block) and back. Off the CPU they run
//! `kernels/routed_ffn.cu`; candle's `index_add` on CUDA gives one thread per column and leaves
//! the GPU mostly idle. The CPU versions are the reference for the kernels and sum in the same
//! order.

use super::router::Routing;
use crate::pq::SENTINEL;
use crate::util::{check_float, contiguous, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::{Arc, OnceLock};

/// A row map's index array: in host memory, or a u32 tensor on the device of a routing built
/// there.
#[derive(Debug)]
pub(crate) enum Index {
    Host(Vec<u32>),
    Device(Tensor),
}

impl Index {
    /// The host array, or a named error for a device array (a GPU routing used on the CPU).
    fn host(&self, op: &str) -> Result<&[u32]> {
        match self {
            Index::Host(v) => Ok(v),
            Index::Device(t) => bail!(
                "{op}: the routing was built on {:?}; move the input there (it is on the CPU)",
                t.device().location()
            ),
        }
    }
}

/// A row move between a source space of `src_rows` rows and a destination space of
/// `dst_rows` rows.
#[derive(Debug)]
pub(crate) struct RowMap {
    /// `[dst_rows]`: the source row each destination row copies, or [`SENTINEL`] (a zero row).
    pub(crate) src: Index,
    /// `[src_rows · per]`: the destination rows that copy each source row, in increasing slot
    /// order, [`SENTINEL`]-padded.
    pub(crate) copies: Index,
    pub(crate) per: usize,
    pub(crate) src_rows: usize,
    pub(crate) dst_rows: usize,
}

/// The cached map in `cell`, or `build`'s, stored there.
fn cached(cell: &OnceLock<Arc<RowMap>>, build: impl FnOnce() -> Result<RowMap>) -> Result<Arc<RowMap>> {
    if let Some(m) = cell.get() {
        return Ok(m.clone());
    }
    let m = Arc::new(build()?);
    Ok(cell.get_or_init(|| m).clone())
}

impl RowMap {
    fn host(src: Vec<u32>, copies: Vec<u32>, per: usize, src_rows: usize) -> Self {
        let dst_rows = src.len();
        Self {
            src: Index::Host(src),
            copies: Index::Host(copies),
            per,
            src_rows,
            dst_rows,
        }
    }

    /// Tokens → routed rows (sorted by block): the map of [`gather_rows`] / [`sum_rows`].
    pub(crate) fn routed(r: &Routing) -> Result<Arc<Self>> {
        cached(&r.row_maps.routed, || match r.device_index() {
            Some(d) => Ok(Self {
                src: Index::Device(d.row_token.clone()),
                copies: Index::Device(d.token_rows.clone()),
                per: r.k(),
                src_rows: r.n_tokens(),
                dst_rows: r.n_rows(),
            }),
            None => Ok(Self::host(
                r.row_token()?.to_vec(),
                token_rows(r)?,
                r.k(),
                r.n_tokens(),
            )),
        })
    }

    /// (token, slot) pairs `t·k + j` → routed rows: gathers per-slot values (the gates) into
    /// routed-row order.
    pub(crate) fn pairs(r: &Routing) -> Result<Arc<Self>> {
        cached(&r.row_maps.pairs, || match r.device_index() {
            Some(d) => Ok(Self {
                src: Index::Device(d.row_src.clone()),
                copies: Index::Device(d.token_rows.clone()),
                per: 1,
                src_rows: r.n_rows(),
                dst_rows: r.n_rows(),
            }),
            None => Ok(Self::host(r.row_src()?.to_vec(), token_rows(r)?, 1, r.n_rows())),
        })
    }

    /// Tokens → rows padded per block: block `e`'s rows at `e·R_max ..`, then zero rows up to
    /// the fullest block's count `R_max` ([`padded_rows`]).
    pub(crate) fn padded(r: &Routing) -> Result<Arc<Self>> {
        if r.device_index().is_some() {
            Self::device_padding(r)?;
        }
        cached(&r.row_maps.padded, || {
            let pad = pad_index(r);
            let rows = token_rows(r)?;
            let copies = rows.into_iter().map(|row| pad[row as usize]).collect();
            let mut src = vec![SENTINEL; r.n_blocks() * padded_rows(r)];
            for (&p, &t) in pad.iter().zip(r.row_token()?) {
                src[p as usize] = t;
            }
            Ok(Self::host(src, copies, r.k(), r.n_tokens()))
        })
    }

    /// Padded rows → routed rows: the gather drops the padding, its adjoint puts it back.
    pub(crate) fn unpad(r: &Routing) -> Result<Arc<Self>> {
        if r.device_index().is_some() {
            Self::device_padding(r)?;
        }
        cached(&r.row_maps.unpad, || {
            let src = pad_index(r);
            let mut copies = vec![SENTINEL; r.n_blocks() * padded_rows(r)];
            for (row, &p) in src.iter().enumerate() {
                copies[p as usize] = row as u32;
            }
            let src_rows = copies.len();
            Ok(Self::host(src, copies, 1, src_rows))
        })
    }

    /// Builds both padded-layout maps of a device routing on its device (one kernel).
    #[cfg(feature = "cuda")]
    fn device_padding(r: &Routing) -> Result<()> {
        let maps = &r.row_maps;
        if maps.padded.get().is_some() && maps.unpad.get().is_some() {
            return Ok(());
        }
        let (padded, unpad) = super::cuda::pad_maps(r, padded_rows(r))?;
        let _ = maps.padded.set(Arc::new(padded));
        let _ = maps.unpad.set(Arc::new(unpad));
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    fn device_padding(_: &Routing) -> Result<()> {
        Ok(())
    }
}

/// The row maps of one routing, built on first use and shared by the forward, the backward and
/// the gates (each is O(R) work and, for a host routing, one upload's worth of indices).
#[derive(Debug, Clone, Default)]
pub(crate) struct RowMaps {
    routed: OnceLock<Arc<RowMap>>,
    pairs: OnceLock<Arc<RowMap>>,
    padded: OnceLock<Arc<RowMap>>,
    unpad: OnceLock<Arc<RowMap>>,
}

/// Rows of the fullest block, `R_max`: the padded layout has `n_blocks · R_max` rows.
pub(crate) fn padded_rows(r: &Routing) -> usize {
    r.block_counts().into_iter().max().unwrap_or(0)
}

/// `[R]`: the padded row `e·R_max + i` of routed row `r` (the i-th row of its block e).
fn pad_index(r: &Routing) -> Vec<u32> {
    let rm = padded_rows(r);
    let mut out = vec![0u32; r.n_rows()];
    for e in 0..r.n_blocks() {
        let rows = r.block_rows(e);
        for (i, row) in rows.clone().enumerate() {
            out[row] = (e * rm + i) as u32;
        }
    }
    out
}

/// `x_g[r] = x[row_token[r]]`, `[T, d] → [R, d]`. Differentiable in `x`.
pub fn gather_rows(x: &Tensor, routing: &Arc<Routing>) -> Result<Tensor> {
    check_float("gather_rows", "x", x)?;
    match x.dims() {
        &[t, _] if t == routing.n_tokens() => {}
        d => bail!(
            "gather_rows: x is {d:?}, expected [T, d] with T = {} routed tokens",
            routing.n_tokens()
        ),
    }
    move_rows(x, Move::Gather, RowMap::routed(routing)?)
}

/// `out[t] = Σ_s y[row of (t, s)]`, `[R, n] → [T, n]`. Differentiable in `y`.
pub fn sum_rows(y: &Tensor, routing: &Arc<Routing>) -> Result<Tensor> {
    check_float("sum_rows", "y", y)?;
    match y.dims() {
        &[r, _] if r == routing.n_rows() => {}
        d => bail!(
            "sum_rows: y is {d:?}, expected [R, n] with R = {} routed rows",
            routing.n_rows()
        ),
    }
    move_rows(y, Move::Sum, RowMap::routed(routing)?)
}

/// The gather (source → destination rows) or the sum (destination → source rows) of `map`, on a
/// `[rows, width]` tensor whose row count the move expects. Differentiable.
pub(crate) fn move_rows(x: &Tensor, m: Move, map: Arc<RowMap>) -> Result<Tensor> {
    let op = m.name();
    let want = match m {
        Move::Gather => map.src_rows,
        Move::Sum => map.dst_rows,
    };
    if x.rank() != 2 || x.dim(0)? != want {
        bail!("{op}: input is {:?}, expected [{want}, width]", x.dims());
    }
    x.contiguous()?.apply_op1(RowMove(m, map))
}

/// The routed row of each (token, slot) pair `t·k + s`: the inverse of `row_src`.
fn token_rows(routing: &Routing) -> Result<Vec<u32>> {
    let mut out = vec![0u32; routing.n_rows()];
    for (r, &p) in routing.row_src()?.iter().enumerate() {
        out[p as usize] = r as u32;
    }
    Ok(out)
}

fn gather_cpu<T: Float>(x: &[T], width: usize, m: &RowMap, src: &[u32]) -> Vec<T> {
    let mut out = vec![T::zero(); m.dst_rows * width];
    for (o, &s) in out.chunks_mut(width.max(1)).zip(src) {
        if s != SENTINEL {
            o.copy_from_slice(&x[s as usize * width..(s as usize + 1) * width]);
        }
    }
    out
}

fn sum_cpu<T: Float>(y: &[T], width: usize, m: &RowMap, copies: &[u32]) -> Vec<T> {
    let mut out = vec![T::zero(); m.src_rows * width];
    for (o, copies) in out.chunks_mut(width.max(1)).zip(copies.chunks(m.per.max(1))) {
        for &r in copies.iter().filter(|&&r| r != SENTINEL) {
            let src = &y[r as usize * width..(r as usize + 1) * width];
            for (o, &v) in o.iter_mut().zip(src) {
                *o = *o + v;
            }
        }
    }
    out
}

/// Which way rows move: source → destination rows (a gather), or destination → source rows (a
/// sum): each other's adjoint.
#[derive(Clone, Copy)]
pub(crate) enum Move {
    Gather,
    Sum,
}

impl Move {
    fn name(self) -> &'static str {
        match self {
            Move::Gather => "gather_rows",
            Move::Sum => "sum_rows",
        }
    }
}

/// See [`move_rows`].
struct RowMove(Move, Arc<RowMap>);

impl CustomOp1 for RowMove {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (op, m, width) = (self.name(), &*self.1, l.dims()[1]);
        let (out_rows, idx) = match self.0 {
            Move::Gather => (m.dst_rows, m.src.host(op)?),
            Move::Sum => (m.src_rows, m.copies.host(op)?),
        };
        fn run<T: Float>(mv: Move, x: &[T], width: usize, m: &RowMap, idx: &[u32]) -> Vec<T> {
            match mv {
                Move::Gather => gather_cpu(x, width, m, idx),
                Move::Sum => sum_cpu(x, width, m, idx),
            }
        }
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(run(self.0, contiguous(op, "input", s, l)?, width, m, idx)),
            CpuStorage::F64(_) => CpuStorage::F64(run(self.0, contiguous(op, "input", s, l)?, width, m, idx)),
            other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((out_rows, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::by_float;
        let (op, m) = (self.name(), &*self.1);
        match self.0 {
            Move::Gather => by_float!(op, s.dtype(), super::cuda::gather_rows(m, s, l)),
            Move::Sum => by_float!(op, s.dtype(), super::cuda::sum_rows(m, s, l)),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let adjoint = match self.0 {
            Move::Gather => Move::Sum,
            Move::Sum => Move::Gather,
        };
        Ok(Some(move_rows(grad, adjoint, self.1.clone())?))
    }
}
