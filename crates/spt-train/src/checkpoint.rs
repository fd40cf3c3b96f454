//! Directory checkpoints, written atomically, versioned and checksummed; and the output-dir guard.
//!
//! Layout of one checkpoint, `<output>/checkpoints/step-00000120/`:
//! - `manifest.json`: format name and version, step, epoch, data position, RNG state, the run's
//!   config, and for each tensor file its byte length and FNV-1a-64 checksum;
//! - `model.safetensors`: the trainable parameters (full model or LoRA) by name;
//! - `optimizer.safetensors`: [`crate::optim::AdamW::state_dict`];
//! - `extra.safetensors`: anything else by name (e.g. PQ codebooks), possibly empty.
//!
//! Writing goes to `.tmp-step-…` in the same parent; each file is written through
//! [`CheckpointIo`] and fsynced, the manifest is written last, the directory is fsynced and then
//! renamed into place. On any error the temporary directory is removed, so nothing half-written
//! remains and the previous checkpoints are untouched. Then only the newest `keep_last` remain.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Checkpoint format name stored in the manifest.
pub const FORMAT_NAME: &str = "spt-train-checkpoint";
/// Current manifest version; loading refuses others.
pub const FORMAT_VERSION: u32 = 1;
/// The marker file that makes an output directory "ours".
pub const OUTPUT_MARKER: &str = ".spt-train-output";

const TENSOR_FILES: [&str; 3] = ["model.safetensors", "optimizer.safetensors", "extra.safetensors"];

/// Checkpoint and output-directory errors; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        // Named `error`, not `source`: shown in the message, not chained (no double printing).
        error: std::io::Error,
    },
    #[error("checkpoint {}: corrupt or incomplete: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint {}: format `{format}` version {version} is not supported (expected `{FORMAT_NAME}` version {FORMAT_VERSION})", path.display())]
    Version {
        path: PathBuf,
        format: String,
        version: u32,
    },
    #[error("output directory {} exists, is not empty and was not written by spt-train (no {OUTPUT_MARKER}); pass --overwrite to use it anyway", path.display())]
    ForeignOutputDir { path: PathBuf },
    #[error("output directory {} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite to start over", path.display())]
    ExistingRun { path: PathBuf },
    #[error("no checkpoint found in {}", path.display())]
    NoCheckpoint { path: PathBuf },
    #[error("{0}")]
    Tensor(String),
}

fn io_err(path: &Path, source: std::io::Error) -> CheckpointError {
    CheckpointError::Io {
        path: path.to_path_buf(),
        error: source,
    }
}

/// Where file bytes go. The default is the real file system; tests swap in one that fails after
/// a byte budget to simulate a full disk.
pub trait CheckpointIo: Send + Sync {
    /// Creates `path`, writes all of `bytes` and fsyncs it.
    fn write_file(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
}

/// Real files: create, write, `sync_all`.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsIo;

impl CheckpointIo for FsIo {
    fn write_file(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }
}

/// Real files, but after `budget` bytes in total every write fails with "No space left on
/// device" (ENOSPC) — the partial data up to the budget is still written, as on a full disk.
#[derive(Debug)]
pub struct DiskFullIo {
    remaining: std::sync::Mutex<u64>,
}

impl DiskFullIo {
    pub fn new(budget: u64) -> Self {
        Self {
            remaining: std::sync::Mutex::new(budget),
        }
    }
}

impl CheckpointIo for DiskFullIo {
    fn write_file(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let mut rem = self
            .remaining
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let n = (*rem).min(bytes.len() as u64) as usize;
        let mut f = std::fs::File::create(path)?;
        f.write_all(&bytes[..n])?;
        *rem -= n as u64;
        if n < bytes.len() {
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        f.sync_all()
    }
}

/// Writes `bytes` to `path` through a temporary sibling, fsync and rename.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let res = FsIo
        .write_file(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res?;
    sync_dir(parent);
    Ok(())
}

fn sync_dir(dir: &Path) {
    // Directory fsync persists the rename on Linux; not all platforms allow opening directories.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// FNV-1a, 64-bit: a cheap checksum that catches truncation and corruption (not tampering).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Byte length and checksum of one file in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    /// FNV-1a-64 as 16 hex digits.
    pub fnv1a64: String,
}

/// Where the data stream stands: the next micro-batch to read is batch `batch` of epoch `epoch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub batch: u64,
}

/// The JSON manifest of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Optimizer updates done.
    pub step: u64,
    pub data: DataPosition,
    /// [`crate::rng::SplitMix64`] state of the trainer.
    pub rng_state: u64,
    /// The run's resolved config (free-form JSON).
    pub config: serde_json::Value,
    /// Free-form extra state (e.g. loss history summary).
    #[serde(default)]
    pub extra: serde_json::Value,
    pub files: BTreeMap<String, FileEntry>,
}

/// What goes into a checkpoint besides the manifest bookkeeping.
#[derive(Clone, Debug, Default)]
pub struct CheckpointData {
    pub step: u64,
    pub data: DataPosition,
    pub rng_state: u64,
    pub config: serde_json::Value,
    pub extra_json: serde_json::Value,
    pub model: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub extra: BTreeMap<String, Tensor>,
}

/// A loaded, validated checkpoint.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub extra: HashMap<String, Tensor>,
}

/// Name of the checkpoint directory for `step`.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-").and_then(|s| s.parse().ok())
}

fn serialize(map: &BTreeMap<String, Tensor>, what: &str) -> Result<Vec<u8>, CheckpointError> {
    let items: Vec<(&str, Tensor)> = map
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| CheckpointError::Tensor(format!("{what}: {e}")))?;
    safetensors::serialize(items, None).map_err(|e| CheckpointError::Tensor(format!("{what}: {e}")))
}

/// Saves `data` as `<dir>/step-XXXXXXXX` atomically, then keeps only the newest `keep_last`
/// checkpoints (0 keeps all). Returns the new checkpoint's path.
pub fn save_checkpoint(
    dir: &Path,
    data: &CheckpointData,
    keep_last: usize,
    io: &dyn CheckpointIo,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let name = checkpoint_dir_name(data.step);
    let final_path = dir.join(&name);
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    let result = (|| -> Result<(), CheckpointError> {
        std::fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut files = BTreeMap::new();
        for (fname, map) in TENSOR_FILES
            .iter()
            .zip([&data.model, &data.optimizer, &data.extra])
        {
            let bytes = serialize(map, fname)?;
            let p = tmp.join(fname);
            io.write_file(&p, &bytes).map_err(|e| io_err(&p, e))?;
            files.insert(
                fname.to_string(),
                FileEntry {
                    bytes: bytes.len() as u64,
                    fnv1a64: format!("{:016x}", fnv1a64(&bytes)),
                },
            );
        }
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            step: data.step,
            data: data.data,
            rng_state: data.rng_state,
            config: data.config.clone(),
            extra: data.extra_json.clone(),
            files,
        };
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| CheckpointError::Tensor(format!("manifest: {e}")))?;
        let p = tmp.join("manifest.json");
        io.write_file(&p, &text).map_err(|e| io_err(&p, e))?;
        sync_dir(&tmp);
        if final_path.exists() {
            // Same step saved again (e.g. Ctrl-C right after a periodic save): replace it.
            let old = dir.join(format!(".old-{name}-{}", std::process::id()));
            std::fs::rename(&final_path, &old).map_err(|e| io_err(&final_path, e))?;
            std::fs::rename(&tmp, &final_path).map_err(|e| io_err(&final_path, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &final_path).map_err(|e| io_err(&final_path, e))?;
        }
        sync_dir(dir);
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if keep_last > 0 {
        let all = list_checkpoints(dir)?;
        if all.len() > keep_last {
            for (_, p) in &all[..all.len() - keep_last] {
                std::fs::remove_dir_all(p).map_err(|e| io_err(p, e))?;
            }
        }
    }
    Ok(final_path)
}

/// Complete checkpoints (those with a manifest) in `dir`, oldest first.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(parse_step) {
            if entry.path().join("manifest.json").is_file() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint in `dir`.
pub fn latest_checkpoint(dir: &Path) -> Result<PathBuf, CheckpointError> {
    list_checkpoints(dir)?
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| CheckpointError::NoCheckpoint {
            path: dir.to_path_buf(),
        })
}

/// Loads and validates a checkpoint: manifest format and version, every file's length and
/// checksum, and the safetensors contents.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<LoadedCheckpoint, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mpath = path.join("manifest.json");
    let text = std::fs::read(&mpath).map_err(|e| corrupt(format!("cannot read manifest.json: {e}")))?;
    let value: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| corrupt(format!("manifest.json is not valid JSON: {e}")))?;
    let format = value
        .get("format")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if format != FORMAT_NAME || version != FORMAT_VERSION {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            format,
            version,
        });
    }
    let manifest: Manifest =
        serde_json::from_value(value).map_err(|e| corrupt(format!("manifest.json: {e}")))?;
    let mut maps = Vec::with_capacity(3);
    for fname in TENSOR_FILES {
        let entry = manifest
            .files
            .get(fname)
            .ok_or_else(|| corrupt(format!("manifest lists no `{fname}`")))?;
        let fpath = path.join(fname);
        let bytes = std::fs::read(&fpath).map_err(|e| corrupt(format!("cannot read {fname}: {e}")))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(corrupt(format!(
                "{fname} is {} bytes, the manifest says {}",
                bytes.len(),
                entry.bytes
            )));
        }
        let sum = format!("{:016x}", fnv1a64(&bytes));
        if sum != entry.fnv1a64 {
            return Err(corrupt(format!(
                "{fname} checksum {sum} does not match the manifest's {}",
                entry.fnv1a64
            )));
        }
        let map = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| corrupt(format!("{fname}: {e}")))?;
        maps.push(map);
    }
    let extra = maps.pop().unwrap_or_default();
    let optimizer = maps.pop().unwrap_or_default();
    let model = maps.pop().unwrap_or_default();
    Ok(LoadedCheckpoint {
        path: path.to_path_buf(),
        manifest,
        model,
        optimizer,
        extra,
    })
}

/// The checks of [`prepare_output_dir`] without touching anything, so a CLI can refuse early.
pub fn check_output_dir(dir: &Path, overwrite: bool, resume: bool) -> Result<(), CheckpointError> {
    let marker = dir.join(OUTPUT_MARKER);
    let empty = !dir.exists()
        || std::fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .next()
            .is_none();
    if !empty && !marker.is_file() && !overwrite {
        return Err(CheckpointError::ForeignOutputDir {
            path: dir.to_path_buf(),
        });
    }
    if marker.is_file() && !resume && !overwrite && !list_checkpoints(&dir.join("checkpoints"))?.is_empty() {
        return Err(CheckpointError::ExistingRun {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Prepares an output directory for a run.
///
/// - Missing or empty: created and marked as ours.
/// - Not empty and not ours (no marker): refused unless `overwrite` (then marked and used; other
///   files are left alone).
/// - Ours: fine when `resume`; otherwise, if it holds checkpoints, refused unless `overwrite`,
///   which deletes `checkpoints/` and `metrics.jsonl` so the new run starts clean.
pub fn prepare_output_dir(dir: &Path, overwrite: bool, resume: bool) -> Result<(), CheckpointError> {
    let marker = dir.join(OUTPUT_MARKER);
    check_output_dir(dir, overwrite, resume)?;
    if marker.is_file() && !resume {
        let ckpts = dir.join("checkpoints");
        if !list_checkpoints(&ckpts)?.is_empty() {
            std::fs::remove_dir_all(&ckpts).map_err(|e| io_err(&ckpts, e))?;
            let m = dir.join("metrics.jsonl");
            if m.exists() {
                std::fs::remove_file(&m).map_err(|e| io_err(&m, e))?;
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    if !marker.is_file() {
        write_file_atomic(&marker, b"spt-train output directory\n").map_err(|e| io_err(&marker, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn data(step: u64) -> CheckpointData {
        let dev = Device::Cpu;
        let mut model = BTreeMap::new();
        model.insert(
            "enc.w".to_string(),
            Tensor::arange(0f32, 64.0, &dev).unwrap().reshape((8, 8)).unwrap(),
        );
        model.insert(
            "enc.b".to_string(),
            Tensor::new(&[step as f32, 1.5], &dev).unwrap(),
        );
        let mut optimizer = BTreeMap::new();
        optimizer.insert("enc.w.step".to_string(), Tensor::new(step as i64, &dev).unwrap());
        let mut extra = BTreeMap::new();
        extra.insert(
            "layer0.pq_codebooks".to_string(),
            Tensor::ones((2, 4, 3), DType::F32, &dev).unwrap(),
        );
        CheckpointData {
            step,
            data: DataPosition {
                epoch: 1,
                batch: step * 2,
            },
            rng_state: 0xDEAD_BEEF_0000_0000 + step,
            config: serde_json::json!({"lr": 1e-3}),
            extra_json: serde_json::json!({"note": "x"}),
            model,
            optimizer,
            extra,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn save_load_round_trip_and_keep_last() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoints");
        for s in [10, 20, 30] {
            save_checkpoint(&dir, &data(s), 2, &FsIo).unwrap();
        }
        assert_eq!(names(&dir), vec!["step-00000020", "step-00000030"]);
        let latest = latest_checkpoint(&dir).unwrap();
        let ck = load_checkpoint(&latest, &Device::Cpu).unwrap();
        assert_eq!(ck.manifest.step, 30);
        assert_eq!(ck.manifest.data, DataPosition { epoch: 1, batch: 60 });
        assert_eq!(ck.manifest.rng_state, 0xDEAD_BEEF_0000_0000 + 30);
        assert_eq!(ck.manifest.config, serde_json::json!({"lr": 1e-3}));
        assert_eq!(ck.model["enc.b"].to_vec1::<f32>().unwrap(), vec![30.0, 1.5]);
        assert_eq!(ck.model["enc.w"].dims(), &[8, 8]);
        assert_eq!(ck.optimizer["enc.w.step"].to_scalar::<i64>().unwrap(), 30);
        assert_eq!(ck.extra["layer0.pq_codebooks"].dims(), &[2, 4, 3]);
        // Saving the same step again replaces it.
        save_checkpoint(&dir, &data(30), 2, &FsIo).unwrap();
        assert_eq!(names(&dir), vec!["step-00000020", "step-00000030"]);
    }

    #[test]
    fn disk_full_leaves_nothing_half_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoints");
        save_checkpoint(&dir, &data(1), 3, &FsIo).unwrap();
        let before = std::fs::read(dir.join("step-00000001/model.safetensors")).unwrap();
        let total: u64 = std::fs::read_dir(dir.join("step-00000001"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        // Fail early, in the middle, and on the manifest's last byte.
        for budget in [10, total / 3, 2 * total / 3, total - 1] {
            let err = save_checkpoint(&dir, &data(2), 3, &DiskFullIo::new(budget)).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("No space left") || msg.contains("os error 28"),
                "{msg}"
            );
            assert_eq!(names(&dir), vec!["step-00000001"], "budget {budget}");
        }
        assert_eq!(
            std::fs::read(dir.join("step-00000001/model.safetensors")).unwrap(),
            before
        );
        assert_eq!(
            load_checkpoint(&dir.join("step-00000001"), &Device::Cpu)
                .unwrap()
                .manifest
                .step,
            1
        );
        // With room enough, the same IO succeeds.
        save_checkpoint(&dir, &data(2), 3, &DiskFullIo::new(1 << 20)).unwrap();
        assert_eq!(names(&dir), vec!["step-00000001", "step-00000002"]);
    }

    #[test]
    fn corrupt_checkpoints_give_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let p = save_checkpoint(&dir, &data(5), 0, &FsIo).unwrap();
        // Truncated tensor file.
        let f = p.join("optimizer.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_checkpoint(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("step-00000005") && e.contains("optimizer.safetensors") && e.contains("bytes"),
            "{e}"
        );
        // Same length, flipped byte.
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        std::fs::write(&f, &flipped).unwrap();
        let e = load_checkpoint(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        std::fs::write(&f, &bytes).unwrap();
        assert!(load_checkpoint(&p, &Device::Cpu).is_ok());
        // Truncated manifest.
        let m = p.join("manifest.json");
        let text = std::fs::read(&m).unwrap();
        std::fs::write(&m, &text[..text.len() / 2]).unwrap();
        let e = load_checkpoint(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("manifest.json"), "{e}");
        // Another version.
        let mut v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        v["version"] = serde_json::json!(99);
        std::fs::write(&m, serde_json::to_vec(&v).unwrap()).unwrap();
        let e = load_checkpoint(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("version 99"), "{e}");
        assert!(matches!(
            latest_checkpoint(&tmp.path().join("none")),
            Err(CheckpointError::NoCheckpoint { .. })
        ));
    }

    #[test]
    fn output_dir_guard() {
        let tmp = tempfile::tempdir().unwrap();
        let foreign = tmp.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
        let e = prepare_output_dir(&foreign, false, false).unwrap_err();
        assert!(matches!(e, CheckpointError::ForeignOutputDir { .. }), "{e}");
        assert!(e.to_string().contains("--overwrite"));
        prepare_output_dir(&foreign, true, false).unwrap();
        assert!(foreign.join(OUTPUT_MARKER).is_file() && foreign.join("notes.txt").is_file());
        // Fresh and empty dirs are fine.
        let fresh = tmp.path().join("a/b");
        prepare_output_dir(&fresh, false, false).unwrap();
        prepare_output_dir(&fresh, false, false).unwrap();
        // Ours with checkpoints: needs resume or overwrite.
        save_checkpoint(&fresh.join("checkpoints"), &data(3), 0, &FsIo).unwrap();
        assert!(matches!(
            prepare_output_dir(&fresh, false, false),
            Err(CheckpointError::ExistingRun { .. })
        ));
        prepare_output_dir(&fresh, false, true).unwrap();
        prepare_output_dir(&fresh, true, false).unwrap();
        assert!(list_checkpoints(&fresh.join("checkpoints")).unwrap().is_empty());
    }
}
