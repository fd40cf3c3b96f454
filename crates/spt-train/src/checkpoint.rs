//! Directory checkpoints, written atomically, versioned and checksummed.
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
//! remains and the previous checkpoints are untouched. Then only the newest `keep_last` remain:
//! a pruned checkpoint is first renamed aside (`.prune-…`), so a kill while it is deleted never
//! leaves a `step-…` folder that looks complete. Files in a checkpoint folder that a checkpoint
//! does not write are never deleted: such a folder loses only the checkpoint's own files.
//! [`remove_stale_temporaries`] removes what a killed process left behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Checkpoint format name stored in the manifest.
pub const FORMAT_NAME: &str = "spt-train-checkpoint";
/// Current manifest version; loading refuses others.
pub const FORMAT_VERSION: u32 = 1;

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
    #[error("checkpoint {} does not exist", path.display())]
    Missing { path: PathBuf },
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

/// Real files: create (a new file only: never over one already there, nor through a link),
/// write, `sync_all`.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsIo;

/// A new file at `path`: never through a link or over a file already there.
fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

impl CheckpointIo for FsIo {
    fn write_file(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let mut f = create_new(path)?;
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
        let mut f = create_new(path)?;
        f.write_all(&bytes[..n])?;
        *rem -= n as u64;
        if n < bytes.len() {
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        f.sync_all()
    }
}

/// Writes `bytes` to `path` through a temporary sibling, fsync and rename. Calls from threads
/// of one process take turns: the temporary's name is per process (what the stale-file cleanup
/// recognises), so two writes of one path at once would share it.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A panic while holding it left no shared state behind: the next writer goes on.
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    // A file under the name is one a crashed process of the same pid left: replaced. A link or
    // a folder is someone else's (a write would go through the link): left, and refused.
    match tmp.symlink_metadata() {
        Ok(m) if m.is_file() => std::fs::remove_file(&tmp)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a file spt-train left", tmp.display()),
            ))
        }
        Err(_) => {}
    }
    let res = FsIo
        .write_file(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path));
    if res.is_err() && tmp.symlink_metadata().is_ok_and(|m| m.is_file()) {
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
    fnv1a64_extend(FNV_OFFSET, bytes)
}

pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A file's length and [`fnv1a64`], read in 1 MiB pieces (a dense checkpoint's optimizer file
/// is gigabytes).
fn file_checksum(path: &Path) -> std::io::Result<(u64, u64)> {
    checksum_of(&mut std::fs::File::open(path)?)
}

/// [`file_checksum`] of an open file, from where it stands to its end.
fn checksum_of(f: &mut std::fs::File) -> std::io::Result<(u64, u64)> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 20];
    let (mut len, mut h) = (0u64, FNV_OFFSET);
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => return Ok((len, h)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        len += n as u64;
        h = fnv1a64_extend(h, &buf[..n]);
    }
}

/// FNV-1a continued over more bytes from the hash `h` of those before.
pub(crate) fn fnv1a64_extend(mut h: u64, bytes: &[u8]) -> u64 {
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

/// Whether `name` is a checkpoint folder's name (`step-N`).
pub fn is_checkpoint_name(name: &str) -> bool {
    parse_step(name).is_some()
}

/// The step of a folder named as [`checkpoint_dir_name`] names one, and only then: `step-5`,
/// `step-+5` and `step-0005` would all read as step 5.
fn parse_step(name: &str) -> Option<u64> {
    let step = name.strip_prefix("step-")?.parse().ok()?;
    (checkpoint_dir_name(step) == name).then_some(step)
}

/// The step a folder's name says, when it is named as a checkpoint.
fn folder_step(dir: &Path) -> Option<u64> {
    dir.file_name().and_then(|n| n.to_str()).and_then(parse_step)
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
    // A checkpoint that load_checkpoint would refuse is not written: pruning would otherwise
    // leave it the only one.
    for (tensor, t) in &data.model {
        let finite = spt_models::all_finite(t)
            .map_err(|e| CheckpointError::Tensor(format!("model `{tensor}`: {e}")))?;
        if !finite {
            return Err(CheckpointError::Tensor(format!(
                "model `{tensor}` holds NaN or infinite values: step {} not saved in {} (a \
                 checkpoint of it would not load)",
                data.step,
                dir.display()
            )));
        }
    }
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
        if final_path.symlink_metadata().is_err() {
            std::fs::rename(&tmp, &final_path).map_err(|e| io_err(&final_path, e))?;
            sync_dir(dir);
            return Ok(());
        }
        let (foreign, own) = foreign_entries(&final_path)?;
        if foreign.is_empty() {
            // Same step saved again (e.g. Ctrl-C right after a periodic save): replace it.
            let old = dir.join(format!(".old-{name}-{}", std::process::id()));
            std::fs::rename(&final_path, &old).map_err(|e| io_err(&final_path, e))?;
            std::fs::rename(&tmp, &final_path).map_err(|e| io_err(&final_path, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            // The folder also holds files spt-train did not write: they stay, and one that has
            // the name of a checkpoint file stops the save.
            let taken: Vec<&str> = foreign
                .iter()
                .map(String::as_str)
                .filter(|n| is_checkpoint_file(n))
                .collect();
            if !taken.is_empty() {
                return Err(io_err(
                    &final_path,
                    std::io::Error::other(format!(
                        "holds {}, which spt-train did not write (no checkpoint manifest of ours \
                         vouches for it); the checkpoint of step {} needs those names: move them \
                         away, or use another --output-dir",
                        taken.join(", "),
                        data.step
                    )),
                ));
            }
            // Ours are replaced one by one, the manifest removed first and written last, so
            // the folder never looks complete with a mix of old and new files.
            remove_checkpoint_files(&final_path, &own)?;
            for fname in TENSOR_FILES.iter().chain(["manifest.json"].iter()) {
                let (src, dst) = (tmp.join(fname), final_path.join(fname));
                std::fs::rename(&src, &dst).map_err(|e| io_err(&dst, e))?;
            }
            sync_dir(&final_path);
            std::fs::remove_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
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
            // Never the one just written, though a later-numbered one (of a run resumed from
            // elsewhere) outranks it.
            let cut = all[all.len() - keep_last].0;
            prune_checkpoints(dir, |s| s < cut && s != data.step)?;
        }
    }
    Ok(final_path)
}

/// Whether a checkpoint writes a file of this name into its folder.
fn is_checkpoint_file(name: &str) -> bool {
    name == "manifest.json" || TENSOR_FILES.contains(&name)
}

/// The files of `dir` that its checkpoint vouches for: `manifest.json` when it is a manifest of
/// ours, and each file it lists whose length and checksum match. A file named like a checkpoint
/// file that no manifest vouches for (a user's `model.safetensors` in a folder they made) is not
/// ours, so it is never replaced or removed.
fn own_files(dir: &Path) -> BTreeSet<String> {
    let mut own = BTreeSet::new();
    let Ok(manifest) = read_manifest(dir) else {
        return own;
    };
    // A copy of another step's checkpoint, named for this one, vouches for nothing here: a save
    // at this step must not replace it.
    if folder_step(dir).is_some_and(|s| s != manifest.step) {
        return own;
    }
    own.insert("manifest.json".to_string());
    for (name, entry) in &manifest.files {
        let p = dir.join(name);
        if !(TENSOR_FILES.contains(&name.as_str()) && p.symlink_metadata().is_ok_and(|m| m.is_file())) {
            continue;
        }
        if file_matches(&p, entry) {
            own.insert(name.clone());
        }
    }
    own
}

/// Whether the file at `p` has the length and checksum `entry` records, read in 1 MiB chunks
/// (a dense checkpoint's optimizer file is gigabytes).
fn file_matches(p: &Path, entry: &FileEntry) -> bool {
    // The length first: a file of another size is not read.
    if std::fs::metadata(p).map(|m| m.len()).ok() != Some(entry.bytes) {
        return false;
    }
    file_checksum(p).is_ok_and(|(len, h)| len == entry.bytes && format!("{h:016x}") == entry.fnv1a64)
}

/// What a checkpoint folder holds besides its own files ([`own_files`]: someone's notes, a
/// sub-folder, a file named like a checkpoint file that no manifest vouches for), sorted, with
/// the own files. A path that is not a folder is an error: it is not a checkpoint.
fn foreign_entries(dir: &Path) -> Result<(Vec<String>, BTreeSet<String>), CheckpointError> {
    if !dir.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        return Err(io_err(
            dir,
            std::io::Error::other("exists and is not a checkpoint folder; spt-train will not replace it"),
        ));
    }
    let own = own_files(dir);
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let e = e.map_err(|e| io_err(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !own.contains(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok((names, own))
}

/// Removes `own` (the files of `dir` its checkpoint wrote) from `dir`, the manifest first (so
/// that a kill midway never leaves a folder that looks complete), and nothing else.
fn remove_checkpoint_files(dir: &Path, own: &BTreeSet<String>) -> Result<(), CheckpointError> {
    for fname in ["manifest.json"].iter().chain(TENSOR_FILES.iter()) {
        let p = dir.join(fname);
        if own.contains(*fname) {
            std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Removes the checkpoints in `dir` whose step satisfies `which`. Each is renamed aside first
/// (its manifest goes with it), then deleted: a kill midway leaves a `.prune-…` folder, never a
/// `step-…` that looks complete. A checkpoint folder that also holds files spt-train did not
/// write loses only the checkpoint's own files and stays, with a warning. Returns the removed
/// checkpoints' original paths.
///
/// A checkpoint whose manifest does not read (damaged, or another format version) cannot vouch
/// for its files: it is refused, naming it, before anything is removed (`keep_last` pruning
/// passes such a checkpoint by instead).
pub fn remove_checkpoints(dir: &Path, which: impl Fn(u64) -> bool) -> Result<Vec<PathBuf>, CheckpointError> {
    remove_where(dir, which, true)
}

/// [`remove_checkpoints`] for `keep_last`: a checkpoint with a damaged manifest is left, with a
/// warning, rather than failing the save that prunes.
fn prune_checkpoints(dir: &Path, which: impl Fn(u64) -> bool) -> Result<Vec<PathBuf>, CheckpointError> {
    remove_where(dir, which, false)
}

/// Whether [`remove_checkpoints`] would remove the checkpoints `which` selects, touching
/// nothing: the error it would give for one whose manifest does not read, or `Ok`. A run can
/// then be refused before it loads anything.
pub fn check_removable(dir: &Path, which: impl Fn(u64) -> bool) -> Result<(), CheckpointError> {
    removable(dir, which, true).map(|_| ())
}

/// The checkpoints `which` selects whose manifests read, removed; one that does not read is
/// refused (`refuse_unread`, before anything is removed) or passed by with a warning.
fn remove_where(
    dir: &Path,
    which: impl Fn(u64) -> bool,
    refuse_unread: bool,
) -> Result<Vec<PathBuf>, CheckpointError> {
    remove_listed(dir, removable(dir, which, refuse_unread)?)
}

/// The checkpoints `which` selects whose manifests read (see [`remove_where`]).
fn removable(
    dir: &Path,
    which: impl Fn(u64) -> bool,
    refuse_unread: bool,
) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut chosen = Vec::new();
    for (s, p) in list_checkpoints(dir)?.into_iter().filter(|(s, _)| which(*s)) {
        match read_manifest(&p) {
            Ok(_) => chosen.push((s, p)),
            Err(e) if refuse_unread => {
                return Err(io_err(
                    &p,
                    std::io::Error::other(format!(
                        "not removed ({e}): with no manifest to vouch for its files, spt-train \
                         cannot tell them from yours; remove or move the folder yourself, then \
                         run again"
                    )),
                ));
            }
            Err(e) => tracing::warn!("not pruned: {e}"),
        }
    }
    Ok(chosen)
}

fn remove_listed(dir: &Path, chosen: Vec<(u64, PathBuf)>) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut removed = Vec::new();
    for (step, p) in chosen {
        let (foreign, own) = foreign_entries(&p)?;
        if !foreign.is_empty() {
            remove_checkpoint_files(&p, &own)?;
            tracing::warn!(
                path = %p.display(),
                kept = %foreign.join(", "),
                "removed the checkpoint's files; the folder stays, it holds files spt-train did not write"
            );
            removed.push(p);
            continue;
        }
        let aside = dir.join(format!(
            ".prune-{}-{}",
            checkpoint_dir_name(step),
            std::process::id()
        ));
        std::fs::rename(&p, &aside).map_err(|e| io_err(&p, e))?;
        sync_dir(dir);
        std::fs::remove_dir_all(&aside).map_err(|e| io_err(&aside, e))?;
        removed.push(p);
    }
    Ok(removed)
}

/// Whether process `pid` is running (Linux: /proc; elsewhere assumed not, since one output
/// directory is not meant to be shared by two runs at once).
pub(crate) fn pid_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
}

/// `name` as a temporary that a process no longer running left (see
/// [`remove_stale_temporaries`]): its kind (`.tmp-`, `.prune-`, `.old-`) and the NAME it was for.
pub(crate) fn stale_temporary(name: &str, ours: impl Fn(&str) -> bool) -> Option<(&'static str, &str)> {
    let (kind, rest) = [".tmp-", ".prune-", ".old-"]
        .iter()
        .find_map(|k| name.strip_prefix(k).map(|r| (*k, r)))?;
    let (what, pid) = rest.rsplit_once('-')?;
    let pid = pid.parse::<u32>().ok()?;
    (ours(what) && !pid_alive(pid)).then_some((kind, what))
}

/// Removes what a killed process left in `dir`: `.tmp-NAME-PID` (an unfinished save or atomic
/// write) and `.prune-NAME-PID` (a checkpoint being deleted), for the NAMEs `ours` accepts. A `.old-step-N-PID` (a checkpoint
/// being replaced by a new save of the same step) is renamed back when `step-N` is missing, else
/// removed. Entries of running processes are left alone. Returns the removed paths.
///
/// For a checkpoint folder, pass [`is_checkpoint_name`].
pub fn remove_stale_temporaries(
    dir: &Path,
    ours: impl Fn(&str) -> bool,
) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut removed = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_err(dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((kind, what)) = stale_temporary(&name, &ours) else {
            continue;
        };
        let p = entry.path();
        if kind == ".old-" && parse_step(what).is_some() && !dir.join(what).exists() {
            std::fs::rename(&p, dir.join(what)).map_err(|e| io_err(&p, e))?;
            continue;
        }
        let res = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        res.map_err(|e| io_err(&p, e))?;
        tracing::info!(path = %p.display(), "removed the leftovers of an interrupted write");
        removed.push(p);
    }
    Ok(removed)
}

/// The step a checkpoint's manifest records, without reading its tensors.
pub fn checkpoint_step(path: &Path) -> Result<u64, CheckpointError> {
    Ok(read_manifest(path)?.step)
}

/// The folder names of the checkpoints in `dir` later than `step`, in step order: what a resume
/// from `step` would leave beside itself.
pub fn checkpoints_after(dir: &Path, step: u64) -> Result<Vec<String>, CheckpointError> {
    Ok(list_checkpoints(dir)?
        .into_iter()
        .filter(|(s, _)| *s > step)
        .map(|(_, p)| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
        .collect())
}

/// A checkpoint's manifest, checked for its format and version (the files are not read).
pub fn read_manifest(path: &Path) -> Result<Manifest, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if !path.exists() {
        return Err(CheckpointError::Missing {
            path: path.to_path_buf(),
        });
    }
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
    serde_json::from_value(value).map_err(|e| corrupt(format!("manifest.json: {e}")))
}

/// Complete checkpoints (those with a manifest) in `dir`, oldest first.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    Ok(scan_checkpoints(dir)?.0)
}

/// The folders of `dir` named as checkpoints, in step order: complete ones (a manifest of ours)
/// with their paths, and the others with their names.
#[allow(clippy::type_complexity)]
fn scan_checkpoints(dir: &Path) -> Result<(Vec<(u64, PathBuf)>, Vec<(u64, String)>), CheckpointError> {
    let (mut out, mut other) = (Vec::new(), Vec::new());
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((out, other)),
        Err(e) => return Err(io_err(dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name();
        // spt-train makes real folders: a symlink named like one is someone else's, which
        // pruning could not remove (it refused, after the new checkpoint was written).
        let real_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if let Some(step) = name.to_str().and_then(parse_step).filter(|_| real_dir) {
            if manifest_is_ours(&entry.path().join("manifest.json"), step) {
                out.push((step, entry.path()));
            } else {
                other.push((step, name.to_string_lossy().into_owned()));
            }
        }
    }
    out.sort();
    other.sort();
    Ok((out, other))
}

/// Whether `path` is a manifest spt-train writes (of any format version, so that an old
/// checkpoint is listed, and refused by name when loaded): a `manifest.json` of someone else's
/// in a folder named like a checkpoint is not one, and takes no `keep_last` slot.
/// Its step must be the folder's: a copy of a checkpoint under another step's name (a user's
/// backup) would otherwise become the run's latest, and a resume from it would write over the
/// checkpoints after it.
///
/// A manifest that cannot be read, or JSON cut short, is taken as a damaged one of ours: listed,
/// so that loading it names the damage rather than an older checkpoint being used in silence.
fn manifest_is_ours(path: &Path, step: u64) -> bool {
    if !path.is_file() {
        return false;
    }
    let Ok(bytes) = std::fs::read(path) else {
        return true;
    };
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(v) => {
            v.get("format").and_then(|f| f.as_str()) == Some(FORMAT_NAME)
                && v.get("step").and_then(|s| s.as_u64()) == Some(step)
        }
        Err(e) => e.is_eof(),
    }
}

/// The newest complete checkpoint in `dir`. Newer folders named as checkpoints that are not
/// listed (no manifest.json, one of someone else's, or a copy under another step's name; a
/// manifest cut short is listed, and named when loaded) are passed over with a warning naming
/// them, so that an older checkpoint is not used in silence.
pub fn latest_checkpoint(dir: &Path) -> Result<PathBuf, CheckpointError> {
    let (mut listed, mut passed) = scan_checkpoints(dir)?;
    let latest = listed.last().map(|(s, _)| *s);
    passed.retain(|(step, _)| latest.is_none_or(|l| *step > l));
    if !passed.is_empty() {
        let names: Vec<&str> = passed.iter().map(|(_, n)| n.as_str()).collect();
        let msg = format!(
            "{}: passed over {} (no manifest.json of spt-train's: removed, unreadable, or not a \
             checkpoint); {}",
            dir.display(),
            names.join(", "),
            match &listed.last() {
                Some((_, p)) => format!("using the older {}", p.display()),
                None => "no complete checkpoint is left".to_string(),
            }
        );
        // Once per process: a command looks up the latest checkpoint several times.
        static SAID: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());
        if SAID.lock().unwrap_or_else(|e| e.into_inner()).insert(msg.clone()) {
            tracing::warn!("{msg}");
        }
    }
    listed
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| CheckpointError::NoCheckpoint {
            path: dir.to_path_buf(),
        })
}

/// Loads and validates a checkpoint: manifest format and version, every file's length and
/// checksum, and the safetensors contents.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<LoadedCheckpoint, CheckpointError> {
    load(path, device, true)
}

/// [`load_checkpoint`] without the optimizer state (empty in the result): what evaluation and
/// export need, so a checkpoint whose optimizer file is gone still serves them.
pub fn load_checkpoint_weights(path: &Path, device: &Device) -> Result<LoadedCheckpoint, CheckpointError> {
    load(path, device, false)
}

fn load(path: &Path, device: &Device, optimizer: bool) -> Result<LoadedCheckpoint, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let manifest = read_manifest(path)?;
    if let Some(named) = folder_step(path).filter(|&s| s != manifest.step) {
        return Err(corrupt(format!(
            "its manifest is step {}'s, the folder is named for step {named} (a copy under \
             another name?): runs ignore it; give it a name of your own to load it",
            manifest.step
        )));
    }
    let mut maps = Vec::with_capacity(3);
    for fname in TENSOR_FILES {
        if fname == "optimizer.safetensors" && !optimizer {
            maps.push(HashMap::new());
            continue;
        }
        let entry = manifest
            .files
            .get(fname)
            .ok_or_else(|| corrupt(format!("manifest lists no `{fname}`")))?;
        let fpath = path.join(fname);
        let cannot_read = |e: std::io::Error| corrupt(format!("cannot read {fname}: {e}"));
        // Checked in a streaming pass, then read one tensor at a time from the same open file
        // (what was checked is what loads, whatever a later save renames over the path): the
        // whole file in memory beside its tensors doubled the peak (the optimizer's file is
        // twice the weights). The length first: a file of another size is not read.
        let mut f = std::fs::File::open(&fpath).map_err(cannot_read)?;
        let len = f.metadata().map_err(cannot_read)?.len();
        if len != entry.bytes {
            return Err(corrupt(format!(
                "{fname} is {len} bytes, the manifest says {}",
                entry.bytes
            )));
        }
        let (read, sum) = checksum_of(&mut f).map_err(cannot_read)?;
        if read != len {
            return Err(corrupt(format!(
                "{fname} changed while it was read ({read} bytes of {len})"
            )));
        }
        let sum = format!("{sum:016x}");
        if sum != entry.fnv1a64 {
            return Err(corrupt(format!(
                "{fname} checksum {sum} does not match the manifest's {}",
                entry.fnv1a64
            )));
        }
        let mut map = spt_models::read_safetensors_from(&mut f, &fpath).map_err(|e| match e {
            spt_models::ModelError::Checkpoint { reason, .. } => corrupt(format!("{fname}: {reason}")),
            e => corrupt(format!("{fname}: {e}")),
        })?;
        if !device.is_cpu() {
            // Not damage: the device's own failure (out of memory), named as such.
            for t in map.values_mut() {
                *t = t
                    .to_device(device)
                    .map_err(|e| CheckpointError::Tensor(format!("{fname} onto {device:?}: {e}")))?;
            }
        }
        maps.push(map);
    }
    let extra = maps.pop().unwrap_or_default();
    let optimizer = maps.pop().unwrap_or_default();
    let model = maps.pop().unwrap_or_default();
    // Training stops at a non-finite loss, so such weights are damage, and would otherwise pass
    // into predictions, evaluations and exports as NaN scores.
    let mut names: Vec<&String> = model.keys().collect();
    names.sort();
    for name in names {
        let finite = spt_models::all_finite(&model[name])
            .map_err(|e| corrupt(format!("model.safetensors: `{name}`: {e}")))?;
        if !finite {
            return Err(corrupt(format!(
                "model.safetensors: `{name}` holds NaN or infinite values"
            )));
        }
    }
    Ok(LoadedCheckpoint {
        path: path.to_path_buf(),
        manifest,
        model,
        optimizer,
        extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// The temporary's name is predictable (per process): a file a crashed process of the same
    /// pid left under it is replaced; a link under it is never written through.
    #[cfg(unix)]
    #[test]
    fn atomic_writes_never_go_through_a_link_at_the_temporary_name() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("metrics.jsonl");
        let stale = tmp
            .path()
            .join(format!(".tmp-metrics.jsonl-{}", std::process::id()));
        std::fs::write(&stale, "left by a crash").unwrap();
        write_file_atomic(&path, b"ours").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"ours");
        assert!(!stale.exists());
        let victim = tmp.path().join("victim.txt");
        std::fs::write(&victim, "mine").unwrap();
        std::os::unix::fs::symlink(&victim, &stale).unwrap();
        let e = write_file_atomic(&path, b"again").unwrap_err();
        assert!(e.to_string().contains("not a file spt-train left"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"mine");
        assert_eq!(std::fs::read(&path).unwrap(), b"ours");
        assert!(stale.symlink_metadata().unwrap().file_type().is_symlink());
    }

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

    /// The streaming checksum is the whole-buffer one, across 1 MiB pieces and for an empty file.
    #[test]
    fn file_checksum_matches_fnv1a64_of_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 5, (1 << 20) + (1 << 19) + 3] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let p = dir.path().join(format!("f{len}"));
            std::fs::write(&p, &bytes).unwrap();
            assert_eq!(file_checksum(&p).unwrap(), (len as u64, fnv1a64(&bytes)), "{len}");
        }
    }

    /// Two threads writing one path at once both succeed and leave one whole payload (they share
    /// the temporary's name, so without taking turns one would rename the other's half-written
    /// file or find it gone).
    #[test]
    fn concurrent_atomic_writes_of_one_path_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        let payloads: Vec<Vec<u8>> = (0..2u8).map(|i| vec![b'a' + i; 1 << 16]).collect();
        std::thread::scope(|s| {
            for p in &payloads {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..100 {
                        write_file_atomic(path, p).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&path).unwrap();
        assert!(
            payloads.contains(&got),
            "a mixed or short file: {} bytes",
            got.len()
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "temporaries left behind");
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
    #[cfg(unix)]
    fn only_canonical_real_step_folders_are_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoints");
        let elsewhere = tmp.path().join("elsewhere");
        save_checkpoint(&elsewhere, &data(9), 0, &FsIo).unwrap();
        save_checkpoint(&dir, &data(1), 0, &FsIo).unwrap();
        // Copies under names that also read as a step number, and a symlink to a checkpoint.
        for name in ["step-5", "step-+6", "step-0007"] {
            let d = dir.join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::copy(dir.join("step-00000001/manifest.json"), d.join("manifest.json")).unwrap();
        }
        std::os::unix::fs::symlink(elsewhere.join("step-00000009"), dir.join("step-00000009")).unwrap();
        let listed: Vec<u64> = list_checkpoints(&dir).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(listed, vec![1]);
        // Pruning to one checkpoint leaves them all: it used to refuse the symlink after the
        // new checkpoint was written.
        save_checkpoint(&dir, &data(2), 1, &FsIo).unwrap();
        assert_eq!(
            names(&dir),
            vec!["step-+6", "step-00000002", "step-00000009", "step-0007", "step-5"]
        );
        assert!(elsewhere.join("step-00000009/manifest.json").is_file());
    }

    #[test]
    fn files_spt_train_did_not_write_survive_pruning_and_saving() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoints");
        save_checkpoint(&dir, &data(1), 0, &FsIo).unwrap();
        save_checkpoint(&dir, &data(2), 0, &FsIo).unwrap();
        let s1 = dir.join("step-00000001");
        std::fs::write(s1.join("README.md"), "my notes").unwrap();
        std::fs::create_dir(s1.join("plots")).unwrap();
        std::fs::write(s1.join("plots/a.txt"), "mine too").unwrap();
        // A user's folder named like a checkpoint, with no manifest, and a plain file.
        std::fs::create_dir(dir.join("step-00000005")).unwrap();
        std::fs::write(dir.join("step-00000005/NOTES.txt"), "keep").unwrap();
        std::fs::write(dir.join("step-00000007"), "a file").unwrap();

        // Pruning (keep the last one) removes step 1's own files and nothing else.
        save_checkpoint(&dir, &data(3), 1, &FsIo).unwrap();
        assert_eq!(names(&s1), vec!["README.md", "plots"]);
        assert_eq!(
            std::fs::read_to_string(s1.join("plots/a.txt")).unwrap(),
            "mine too"
        );
        assert_eq!(
            list_checkpoints(&dir)
                .unwrap()
                .iter()
                .map(|c| c.0)
                .collect::<Vec<_>>(),
            vec![3]
        );

        // Saving step 1 again writes the checkpoint beside the notes; it loads.
        save_checkpoint(&dir, &data(1), 0, &FsIo).unwrap();
        assert_eq!(
            names(&s1),
            vec![
                "README.md",
                "extra.safetensors",
                "manifest.json",
                "model.safetensors",
                "optimizer.safetensors",
                "plots"
            ]
        );
        assert_eq!(load_checkpoint(&s1, &Device::Cpu).unwrap().manifest.step, 1);
        // And once more over that mixed folder (the same step saved twice).
        save_checkpoint(&dir, &data(1), 0, &FsIo).unwrap();
        assert_eq!(std::fs::read_to_string(s1.join("README.md")).unwrap(), "my notes");
        assert_eq!(load_checkpoint(&s1, &Device::Cpu).unwrap().manifest.step, 1);

        // Step 5 goes into the user's folder beside its file; step 7 is refused, file intact.
        save_checkpoint(&dir, &data(5), 0, &FsIo).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("step-00000005/NOTES.txt")).unwrap(),
            "keep"
        );
        let e = save_checkpoint(&dir, &data(7), 0, &FsIo).unwrap_err().to_string();
        assert!(
            e.contains("step-00000007") && e.contains("not a checkpoint folder"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("step-00000007")).unwrap(),
            "a file"
        );

        // A user's folder holding a file named like a checkpoint's, that no manifest vouches
        // for: the save is refused, naming it, and the file is kept.
        let s9 = dir.join("step-00000009");
        std::fs::create_dir(&s9).unwrap();
        std::fs::write(s9.join("model.safetensors"), "USERDATA").unwrap();
        let e = save_checkpoint(&dir, &data(9), 0, &FsIo).unwrap_err().to_string();
        assert!(
            e.contains("step-00000009") && e.contains("model.safetensors") && e.contains("did not write"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(s9.join("model.safetensors")).unwrap(),
            "USERDATA"
        );
        assert_eq!(names(&s9), vec!["model.safetensors"]);
        // A checkpoint whose model file someone replaced: that file is no longer ours, so
        // pruning removes the rest and keeps it, and saving that step again is refused.
        std::fs::write(dir.join("step-00000003/model.safetensors"), "MINE NOW").unwrap();
        save_checkpoint(&dir, &data(4), 1, &FsIo).unwrap();
        assert_eq!(names(&dir.join("step-00000003")), vec!["model.safetensors"]);
        assert_eq!(
            std::fs::read_to_string(dir.join("step-00000003/model.safetensors")).unwrap(),
            "MINE NOW"
        );
        assert!(save_checkpoint(&dir, &data(3), 0, &FsIo).is_err());

        // Removing every checkpoint (a fresh start) keeps the users' folders.
        remove_checkpoints(&dir, |_| true).unwrap();
        assert!(list_checkpoints(&dir).unwrap().is_empty());
        assert_eq!(names(&s1), vec!["README.md", "plots"]);
        assert_eq!(names(&dir.join("step-00000005")), vec!["NOTES.txt"]);
        assert_eq!(names(&dir.join("step-00000009")), vec!["model.safetensors"]);
        assert!(
            !names(&dir).iter().any(|n| n.starts_with('.')),
            "{:?}",
            names(&dir)
        );
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
        // NaN weights are not saved (the checkpoint would not load) ...
        let mut bad = data(6);
        bad.model.insert(
            "enc.b".to_string(),
            Tensor::new(&[1f32, f32::NAN], &Device::Cpu).unwrap(),
        );
        let e = save_checkpoint(&dir, &bad, 0, &FsIo).unwrap_err().to_string();
        assert!(e.contains("`enc.b`") && e.contains("NaN"), "{e}");
        assert!(!dir.join("step-00000006").exists());
        // ... and intact files holding one (written otherwise) are named, for training and
        // evaluation alike.
        let p = save_checkpoint(&dir, &data(6), 0, &FsIo).unwrap();
        let bytes = serialize(&bad.model, "model.safetensors").unwrap();
        std::fs::write(p.join("model.safetensors"), &bytes).unwrap();
        let m = p.join("manifest.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
        v["files"]["model.safetensors"] = serde_json::json!({
            "bytes": bytes.len(),
            "fnv1a64": format!("{:016x}", fnv1a64(&bytes)),
        });
        std::fs::write(&m, serde_json::to_vec(&v).unwrap()).unwrap();
        for e in [
            load_checkpoint(&p, &Device::Cpu).unwrap_err().to_string(),
            load_checkpoint_weights(&p, &Device::Cpu).unwrap_err().to_string(),
        ] {
            assert!(
                e.contains("step-00000006") && e.contains("`enc.b`") && e.contains("NaN"),
                "{e}"
            );
        }
    }
}
