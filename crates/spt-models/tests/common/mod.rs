//! Helpers shared by the spt-models integration tests.
#![allow(dead_code)]

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// `crates/spt-models/tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Loads `expected.safetensors` of a fixture.
pub fn expected(name: &str) -> Result<HashMap<String, Tensor>> {
    let p = fixture(name).join("expected.safetensors");
    candle_core::safetensors::load(&p, &Device::Cpu).with_context(|| format!("reading {}", p.display()))
}

/// `max|a − b| / max|b|`: error relative to the reference tensor's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    anyhow::ensure!(a.dims() == b.dims(), "shape {:?} vs {:?}", a.dims(), b.dims());
    // NaN-aware (candle's max passes NaN over).
    let diff = spt_ops::gradcheck::max_abs_diff(a, b)?;
    let scale = spt_ops::gradcheck::max_abs(b)?;
    Ok(if scale == 0.0 { diff } else { diff / scale })
}

/// Maximum absolute difference (NaN where one holds a NaN the other does not).
pub fn max_abs(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(spt_ops::gradcheck::max_abs_diff(a, b)?)
}
