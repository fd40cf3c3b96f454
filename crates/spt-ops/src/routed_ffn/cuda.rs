//! CUDA launchers for `kernels/routed_ffn.cu`: the routing on the device ([`route`],
//! [`pad_maps`]) and the row gather and its adjoint row sum of `rows.rs` over a [`RowMap`], f32
//! or bf16.

use super::router::{DeviceIndex, Routing, CHUNK_TOKENS};
use super::rows::{Index, RowMap};
use crate::cuda::{
    by_float, cfg_blocks, cfg_elems, cuda_storage, func, i32_arg, kname, launched, tensor, view, KernelFloat,
    ROUTED_FFN,
};
use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor};

const THREADS: u32 = 128;

/// Most blocks a device routing takes: route_topk and route_rank keep a token's choices in a
/// 64-bit mask. Routers with more blocks are routed on the host.
pub(crate) const MAX_DEVICE_BLOCKS: usize = 64;

/// The routing of `scores [T, n]` (f32 or bf16, on CUDA, T ≥ 1, 1 ≤ k ≤ n ≤ 64) on the device:
/// its index arrays and the host copy of its group starts (the one device → host read).
pub(crate) fn route(scores: &Tensor, k: usize) -> Result<(DeviceIndex, Vec<usize>)> {
    by_float!("route", scores.dtype(), route_t(scores, k))
}

fn route_t<T: KernelFloat>(scores: &Tensor, k: usize) -> Result<(DeviceIndex, Vec<usize>)> {
    let op = "route";
    let (t, n) = scores.dims2()?;
    let pairs = t * k;
    let nc = t.div_ceil(CHUNK_TOKENS);
    i32_arg(op, "T·n_blocks", t * n)?;
    let scores = scores.contiguous()?;
    let dev = scores.device().as_cuda_device()?.clone();
    let mut blocks = dev.alloc_zeros::<u32>(pairs)?;
    {
        let (ss, sl) = scores.storage_and_layout();
        let sv = view::<T>(op, "scores", cuda_storage(op, "scores", &ss)?, sl)?;
        let name = kname::<T>("route_topk");
        let f = func(&dev, ROUTED_FFN, &name)?;
        let mut a = f.builder();
        a.arg(&sv).arg(&mut blocks);
        candle_core::builder_arg!(a, t as i32, n as i32, k as i32);
        launched(op, &name, unsafe { a.launch(cfg_elems(t, THREADS)) })?;
    }
    // Ranks inside each (block, chunk) group, and the groups' counts: one block per chunk.
    let mut rank = dev.alloc_zeros::<u32>(pairs)?;
    let mut counts = dev.alloc_zeros::<u32>(n * nc)?;
    let f = func(&dev, ROUTED_FFN, "route_rank")?;
    let mut a = f.builder();
    a.arg(&blocks).arg(&mut rank).arg(&mut counts);
    candle_core::builder_arg!(a, t as i32, n as i32, k as i32);
    let cfg = cfg_blocks(nc, CHUNK_TOKENS as u32, 4 * CHUNK_TOKENS as u32);
    launched(op, "route_rank", unsafe { a.launch(cfg) })?;
    // The one read back: n·n_chunks counts, whose prefix sums place every row.
    let counts = dev.clone_dtoh(&counts)?;
    let mut starts = Vec::with_capacity(counts.len() + 1);
    starts.push(0usize);
    for c in &counts {
        starts.push(starts[starts.len() - 1] + *c as usize);
    }
    if starts[starts.len() - 1] != pairs {
        bail!(
            "{op}: the device routing counted {} rows, expected T·k = {pairs}",
            starts[starts.len() - 1]
        );
    }
    let starts_dev = dev.clone_htod(&starts.iter().map(|&s| s as u32).collect::<Vec<_>>())?;
    let mut row_token = dev.alloc_zeros::<u32>(pairs)?;
    let mut row_src = dev.alloc_zeros::<u32>(pairs)?;
    let mut token_rows = dev.alloc_zeros::<u32>(pairs)?;
    let f = func(&dev, ROUTED_FFN, "route_place")?;
    let mut a = f.builder();
    a.arg(&blocks)
        .arg(&rank)
        .arg(&starts_dev)
        .arg(&mut row_token)
        .arg(&mut row_src)
        .arg(&mut token_rows);
    candle_core::builder_arg!(a, pairs as i32, k as i32, CHUNK_TOKENS as i32, nc as i32);
    launched(op, "route_place", unsafe { a.launch(cfg_elems(pairs, THREADS)) })?;
    let index = DeviceIndex {
        blocks: tensor(blocks, &dev, pairs),
        row_token: tensor(row_token, &dev, pairs),
        row_src: tensor(row_src, &dev, pairs),
        token_rows: tensor(token_rows, &dev, pairs),
    };
    Ok((index, starts))
}

/// The padded layout's maps of a device routing, `(tokens → padded rows, padded → routed
/// rows)`, built on its device; `rmax` is the fullest block's row count.
pub(crate) fn pad_maps(r: &Routing, rmax: usize) -> Result<(RowMap, RowMap)> {
    let op = "route_pad";
    let Some(d) = r.device_index() else {
        bail!("{op}: the routing has no device index arrays");
    };
    let (n, rows) = (r.n_blocks(), r.n_rows());
    let slots = n * rmax;
    i32_arg(op, "n_blocks·R_max", slots)?;
    let dev = d.blocks.device().as_cuda_device()?.clone();
    let starts: Vec<u32> = (0..=n)
        .map(|e| if e < n { r.block_rows(e).start } else { rows } as u32)
        .collect();
    let starts = dev.clone_htod(&starts)?;
    let mut padded_src = dev.alloc_zeros::<u32>(slots)?;
    let mut padded_copies = dev.alloc_zeros::<u32>(rows)?;
    let mut unpad_src = dev.alloc_zeros::<u32>(rows)?;
    let mut unpad_copies = dev.alloc_zeros::<u32>(slots)?;
    {
        let guards = [&d.blocks, &d.row_src, &d.row_token, &d.token_rows].map(|t| t.storage_and_layout());
        let names = ["blocks", "row_src", "row_token", "token_rows"];
        let mut views = Vec::with_capacity(4);
        for ((s, l), name) in guards.iter().zip(names) {
            views.push(view::<u32>(op, name, cuda_storage(op, name, s)?, l)?);
        }
        let f = func(&dev, ROUTED_FFN, op)?;
        let mut a = f.builder();
        for v in &views {
            a.arg(v);
        }
        a.arg(&starts)
            .arg(&mut padded_src)
            .arg(&mut padded_copies)
            .arg(&mut unpad_src)
            .arg(&mut unpad_copies);
        candle_core::builder_arg!(a, rows as i32, n as i32, rmax as i32);
        launched(op, op, unsafe { a.launch(cfg_elems(rows.max(slots), THREADS)) })?;
    }
    let padded = RowMap {
        src: Index::Device(tensor(padded_src, &dev, slots)),
        copies: Index::Device(tensor(padded_copies, &dev, rows)),
        per: r.k(),
        src_rows: r.n_tokens(),
        dst_rows: slots,
    };
    let unpad = RowMap {
        src: Index::Device(tensor(unpad_src, &dev, rows)),
        copies: Index::Device(tensor(unpad_copies, &dev, slots)),
        per: 1,
        src_rows: slots,
        dst_rows: rows,
    };
    Ok((padded, unpad))
}

/// Runs `launch` with a device view of `idx`: its own tensor for a device routing, else an
/// upload of the host array.
fn with_index<R>(
    op: &str,
    dev: &CudaDevice,
    idx: &Index,
    launch: impl FnOnce(&CudaView<'_, u32>) -> Result<R>,
) -> Result<R> {
    match idx {
        Index::Host(v) => {
            let up: CudaSlice<u32> = dev.clone_htod(v)?;
            launch(&up.slice(0..))
        }
        Index::Device(t) => {
            let (s, l) = t.storage_and_layout();
            let Storage::Cuda(cs) = &*s else {
                bail!("{op}: the routing's index arrays are not on a CUDA device");
            };
            if !t.device().as_cuda_device()?.same_device(dev) {
                bail!("{op}: the routing was built on another device than the input's");
            }
            launch(&view::<u32>(op, "row map", cs, l)?)
        }
    }
}

/// `out[i] = x[src[i]]` (zero where src is the sentinel) on CUDA, for `T` the storage's type.
pub(crate) fn gather_rows<T: KernelFloat>(
    m: &RowMap,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "gather_rows";
    let x = view::<T>(op, "x", s, l)?;
    let dev = &s.device;
    let (rows, d) = (m.dst_rows, l.dims()[1]);
    let mut out = dev.alloc_zeros::<T>(rows * d)?;
    if rows * d > 0 {
        i32_arg(op, "rows·d", rows * d)?;
        i32_arg(op, "source rows·d", m.src_rows * d)?;
        let name = kname::<T>("route_gather");
        let f = func(dev, ROUTED_FFN, &name)?;
        with_index(op, dev, &m.src, |idx| {
            let mut a = f.builder();
            a.arg(&x).arg(idx).arg(&mut out);
            candle_core::builder_arg!(a, d as i32);
            launched(op, &name, unsafe { a.launch(cfg_blocks(rows, THREADS, 0)) })
        })?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((rows, d)),
    ))
}

/// `out[j] = Σ_s y[copies[j·per + s]]` (sentinels skipped, slots in order) on CUDA, for `T` the
/// storage's element type.
pub(crate) fn sum_rows<T: KernelFloat>(
    m: &RowMap,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "sum_rows";
    let y = view::<T>(op, "y", s, l)?;
    let dev = &s.device;
    let (rows, n) = (m.src_rows, l.dims()[1]);
    let mut out = dev.alloc_zeros::<T>(rows * n)?;
    if rows * n > 0 {
        i32_arg(op, "destination rows·n", m.dst_rows * n)?;
        i32_arg(op, "source rows·n", rows * n)?;
        let name = kname::<T>("route_sum");
        let f = func(dev, ROUTED_FFN, &name)?;
        with_index(op, dev, &m.copies, |idx| {
            let mut a = f.builder();
            a.arg(&y).arg(idx).arg(&mut out);
            candle_core::builder_arg!(a, i32_arg(op, "copies per row", m.per)?, n as i32);
            launched(op, &name, unsafe { a.launch(cfg_blocks(rows, THREADS, 0)) })
        })?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((rows, n)),
    ))
}
