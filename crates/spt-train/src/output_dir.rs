//! Which files in an output directory spt-train wrote, and the rules that follow from it.
//!
//! Every directory the CLI writes (a fine-tuning run or an export) holds a marker,
//! `.spt-train-output`, that records the kind of directory and the top-level names the tool
//! claimed in it. The rules:
//!
//! - A name is claimed only while nothing of that name exists, so a claimed name is always ours.
//! - `--overwrite` replaces or removes only claimed names; files the tool did not write are never
//!   deleted or replaced, whatever the flags. A folder of someone else's holding a name the tool
//!   needs is refused, naming the files.
//! - An export is built in a temporary sibling, then moved in file by file (each rename atomic).
//! - A marker from an older spt-train (plain text, no list) is trusted for `--resume` only: it
//!   cannot tell which files were the tool's, so nothing in it is deleted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    check_removable, is_checkpoint_name, list_checkpoints, remove_checkpoints, remove_stale_temporaries,
    write_file_atomic, CheckpointError,
};

/// The marker file that makes an output directory "ours".
pub const OUTPUT_MARKER: &str = ".spt-train-output";

/// The top-level names a fine-tuning run writes in its output directory.
pub const RUN_ENTRIES: [&str; 5] = [
    "checkpoints",
    "finetune.toml",
    "labels.json",
    "loss.svg",
    "metrics.jsonl",
];

const MARKER_VERSION: u32 = 2;

/// Whether an export (either format) can write a file of this name.
fn export_writes(name: &str) -> bool {
    ["config.json", "model.safetensors"].contains(&name)
        || crate::tasks::EXPORT_COPIED.contains(&name)
        || crate::peft::ADAPTER_FILES.contains(&name)
}

/// Whether a directory of `kind` can hold `name` as spt-train's: what the marker may claim.
/// A marker is a file in the user's folder; one edited by hand (or copied in with a folder
/// someone handed over) could list `../notes.txt` or the user's own README, and entries are
/// what `--overwrite` removes.
fn claimable(kind: DirKind, name: &str) -> bool {
    match kind {
        DirKind::Run => RUN_ENTRIES.contains(&name),
        DirKind::Export => export_writes(name),
    }
}

/// What an output directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirKind {
    /// A fine-tuning run (`spt-train finetune`).
    Run,
    /// A Hugging Face model directory (`spt-train export`).
    Export,
}

/// The marker's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    pub written_by: String,
    pub version: u32,
    pub kind: DirKind,
    /// Top-level names in the directory that spt-train claimed (and so may replace).
    pub entries: BTreeSet<String>,
}

impl Ownership {
    fn new(kind: DirKind, entries: impl IntoIterator<Item = String>) -> Self {
        Self {
            written_by: "spt-train".into(),
            version: MARKER_VERSION,
            kind,
            entries: entries.into_iter().collect(),
        }
    }
}

/// What a directory's marker says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Marker {
    /// No marker: not written by spt-train (or missing / empty).
    None,
    /// A marker from an older spt-train, with no record of what it wrote.
    Legacy,
    Current(Ownership),
}

/// Output-directory errors; each names the directory and, where it matters, the files.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("output directory {} exists, is not empty and was not written by spt-train (no {OUTPUT_MARKER}); pass --overwrite to write beside its files (spt-train never deletes or replaces files it did not write), or choose another directory", path.display())]
    Foreign { path: PathBuf },
    #[error("output directory {} holds {} that spt-train did not write and would have to replace; spt-train never replaces files it did not write: move them away or choose another directory", path.display(), names.join(", "))]
    Collision { path: PathBuf, names: Vec<String> },
    #[error("output directory {} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite to start over (only the files spt-train wrote there are removed)", path.display())]
    ExistingRun { path: PathBuf },
    #[error("output directory {} holds an earlier export; pass --overwrite to replace the files spt-train wrote there (other files are kept)", path.display())]
    ExistingExport { path: PathBuf },
    #[error("output directory {} holds {}, not {}; choose another directory", path.display(), describe(*found), describe(*wanted))]
    WrongKind {
        path: PathBuf,
        found: DirKind,
        wanted: DirKind,
    },
    #[error("output directory {} was marked by an older spt-train that did not record which files it wrote, and it holds {}; spt-train will not delete them: remove them yourself or choose another directory", path.display(), names.join(", "))]
    Legacy { path: PathBuf, names: Vec<String> },
    #[error("output directory {}: exists and is not a directory; choose another path", path.display())]
    NotADirectory { path: PathBuf },
    #[error("output directory {} is inside the checkpoints of the run in {}, which manages that folder; choose a path outside it", path.display(), run.display())]
    InsideRun { path: PathBuf, run: PathBuf },
    #[error("output directory {} is in use by another spt-train process (it holds the folder's lock); wait for that run to end, or choose another directory", path.display())]
    Busy { path: PathBuf },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// Held while a process writes a run folder (returned by [`prepare_run_dir`]): an exclusive
/// advisory lock (`flock`) on the folder itself, so that a second spt-train into the same folder
/// is refused instead of mixing its checkpoints, metrics and settings with the first's. Released
/// when dropped, or by the OS when the process ends however it ends. Where the folder cannot be
/// locked (a file system without locks), runs go unguarded.
#[derive(Debug)]
#[must_use = "the run folder is unlocked when the RunLock is dropped: keep it for the whole run"]
pub struct RunLock {
    _dir: Option<std::fs::File>,
}

/// The folder's lock. Held by someone else, it is tried again for a second before `Busy`: another
/// process's check (which takes the lock for an instant) must not refuse a run starting then.
fn lock_run_dir(dir: &Path) -> Result<RunLock, OutputError> {
    let Ok(f) = std::fs::File::open(dir) else {
        return Ok(RunLock { _dir: None });
    };
    for attempt in 0.. {
        match f.try_lock() {
            Ok(()) => return Ok(RunLock { _dir: Some(f) }),
            Err(std::fs::TryLockError::WouldBlock) if attempt < 20 => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => break,
            Err(std::fs::TryLockError::Error(e)) => {
                tracing::warn!(
                    "{}: cannot lock the folder ({e}); a second spt-train writing it at the same \
                     time would not be refused",
                    dir.display()
                );
                return Ok(RunLock { _dir: None });
            }
        }
    }
    Err(OutputError::Busy {
        path: dir.to_path_buf(),
    })
}

fn describe(k: DirKind) -> &'static str {
    match k {
        DirKind::Run => "a fine-tuning run (spt-train finetune)",
        DirKind::Export => "an exported model (spt-train export)",
    }
}

fn io_err(path: &Path, error: std::io::Error) -> OutputError {
    OutputError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Whether `dir` is missing or an empty directory; anything there that is not a directory (a
/// file, a link to one) is refused by name rather than as the OS's "Not a directory".
fn is_empty_dir(dir: &Path) -> Result<bool, OutputError> {
    if !dir.exists() {
        return Ok(true);
    }
    if !dir.is_dir() {
        return Err(OutputError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    Ok(std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .next()
        .is_none())
}

/// Whether `dir` holds nothing but what an interrupted start of a run left (a run stopped before
/// its marker was in place leaves `.tmp-.spt-train-output-PID` or `.tmp-finetune.toml-PID`):
/// such a folder is ours to start in, not a stranger's.
fn only_stale_run_temporaries(dir: &Path) -> Result<bool, OutputError> {
    let ours = |n: &str| n == OUTPUT_MARKER || RUN_ENTRIES.contains(&n);
    for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let name = e.map_err(|e| io_err(dir, e))?.file_name();
        if crate::checkpoint::stale_temporary(&name.to_string_lossy(), ours).is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Refuses `dir` at or inside a run's `checkpoints/` folder: the run prunes and replaces what
/// is there. The path is resolved as the OS would (links and `..` of the part that exists).
fn check_outside_run_checkpoints(dir: &Path) -> Result<(), OutputError> {
    if dir.as_os_str().is_empty() {
        return Err(io_err(
            dir,
            std::io::Error::other("an empty path; give a directory"),
        ));
    }
    let resolved = resolve(dir).map_err(|e| io_err(dir, e))?;
    for a in resolved.ancestors() {
        if a.file_name().is_some_and(|n| n == "checkpoints") {
            if let Some(run) = a.parent() {
                if matches!(
                    read_marker(run)?,
                    Marker::Current(Ownership {
                        kind: DirKind::Run,
                        ..
                    }) | Marker::Legacy
                ) {
                    return Err(OutputError::InsideRun {
                        path: dir.to_path_buf(),
                        run: run.to_path_buf(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// `path` made absolute: its longest existing prefix canonicalised (links followed, `..`
/// resolved), the rest, which does not exist and so holds no links, normalised lexically.
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let abs = std::path::absolute(path)?;
    let parts: Vec<Component> = abs.components().collect();
    let mut cut = parts.len();
    let base = loop {
        let prefix: PathBuf = parts[..cut].iter().collect();
        if let Ok(c) = prefix.canonicalize() {
            break c;
        }
        if cut <= 1 {
            break prefix;
        }
        cut -= 1;
    };
    let mut out = base;
    for c in &parts[cut..] {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Ok(out)
}

/// Reads `dir`'s marker.
pub fn read_marker(dir: &Path) -> Result<Marker, OutputError> {
    let p = dir.join(OUTPUT_MARKER);
    if !p.is_file() {
        return Ok(Marker::None);
    }
    let bytes = std::fs::read(&p).map_err(|e| io_err(&p, e))?;
    Ok(match serde_json::from_slice::<Ownership>(&bytes) {
        Ok(mut o) if o.written_by == "spt-train" => {
            let foreign: Vec<String> = o
                .entries
                .iter()
                .filter(|n| !claimable(o.kind, n))
                .cloned()
                .collect();
            if !foreign.is_empty() {
                tracing::warn!(
                    marker = %p.display(),
                    "ignoring entries that spt-train never writes there: {} (they are kept, never removed or replaced)",
                    foreign.join(", ")
                );
                o.entries.retain(|n| claimable(o.kind, n));
            }
            Marker::Current(o)
        }
        // The plain-text marker of spt-train before version 2 (or one damaged beyond reading).
        _ => Marker::Legacy,
    })
}

fn write_marker(dir: &Path, o: &Ownership) -> Result<(), OutputError> {
    let p = dir.join(OUTPUT_MARKER);
    let text = serde_json::to_vec_pretty(o).map_err(|e| io_err(&p, std::io::Error::other(e)))?;
    write_file_atomic(&p, &text).map_err(|e| io_err(&p, e))
}

/// `names` that exist in `dir`.
fn existing<'a>(dir: &Path, names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    names
        .into_iter()
        .filter(|n| dir.join(n).symlink_metadata().is_ok())
        .map(|n| n.to_string())
        .collect()
}

/// The checks of [`prepare_run_dir`], touching nothing, so a CLI can refuse before loading: a
/// folder another process is writing is refused too.
pub fn check_run_dir(dir: &Path, overwrite: bool, resume: bool) -> Result<(), OutputError> {
    if dir.is_dir() {
        drop(lock_run_dir(dir)?);
    }
    check_unlocked_run_dir(dir, overwrite, resume)
}

/// [`check_run_dir`] without the lock probe (the caller holds the lock, or will take it).
fn check_unlocked_run_dir(dir: &Path, overwrite: bool, resume: bool) -> Result<(), OutputError> {
    check_outside_run_checkpoints(dir)?;
    if is_empty_dir(dir)? || only_stale_run_temporaries(dir)? {
        return Ok(());
    }
    let path = || dir.to_path_buf();
    match read_marker(dir)? {
        Marker::None => {
            if !overwrite {
                return Err(OutputError::Foreign { path: path() });
            }
            let names = existing(dir, RUN_ENTRIES);
            if !names.is_empty() {
                return Err(OutputError::Collision { path: path(), names });
            }
        }
        Marker::Legacy => {
            if !resume {
                // What a fresh start would remove: refused, since nothing says whose it is.
                let mut names = existing(dir, ["loss.svg", "metrics.jsonl"]);
                if !list_checkpoints(&dir.join("checkpoints"))?.is_empty() {
                    names.insert(0, "checkpoints/".into());
                }
                if !names.is_empty() {
                    return Err(OutputError::Legacy { path: path(), names });
                }
            }
        }
        Marker::Current(o) => {
            if o.kind != DirKind::Run {
                return Err(OutputError::WrongKind {
                    path: path(),
                    found: o.kind,
                    wanted: DirKind::Run,
                });
            }
            let unclaimed = RUN_ENTRIES.iter().copied().filter(|n| !o.entries.contains(*n));
            let names = existing(dir, unclaimed);
            if !names.is_empty() {
                return Err(OutputError::Collision { path: path(), names });
            }
            if !resume && !overwrite && !list_checkpoints(&dir.join("checkpoints"))?.is_empty() {
                return Err(OutputError::ExistingRun { path: path() });
            }
            // The checkpoints `overwrite` will remove must vouch for their files: one that does
            // not is refused now, before the data and the model are loaded, not after.
            if !resume && overwrite {
                check_removable(&dir.join("checkpoints"), |_| true)?;
            }
        }
    }
    Ok(())
}

/// Prepares `dir` for a fine-tuning run.
///
/// - Missing or empty: created and claimed.
/// - Someone else's (no marker): refused unless `overwrite`; then the run's names are claimed
///   beside the other files, and refused if any of them exists.
/// - A run of ours: fine with `resume`. Otherwise its checkpoints need `overwrite`, and the
///   previous run's checkpoints, metrics and plot are removed (only those spt-train wrote).
///
/// Stale temporaries of a killed save are removed in every case. The folder stays locked against
/// other processes while the returned [`RunLock`] lives: keep it for the whole run.
pub fn prepare_run_dir(dir: &Path, overwrite: bool, resume: bool) -> Result<RunLock, OutputError> {
    // An existing folder is locked first, so that one in use is refused as such, not for what
    // the run using it has written; a new one is checked (touching nothing) before it is made.
    let lock = if dir.is_dir() {
        lock_run_dir(dir)?
    } else {
        check_unlocked_run_dir(dir, overwrite, resume)?;
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        lock_run_dir(dir)?
    };
    // Again under the lock: a run that ended between the first check and the lock may have left
    // checkpoints that this one must not discard without `overwrite`.
    check_unlocked_run_dir(dir, overwrite, resume)?;
    let mut own = match read_marker(dir)? {
        Marker::Current(o) => o,
        Marker::None | Marker::Legacy => Ownership::new(DirKind::Run, []),
    };
    for n in RUN_ENTRIES {
        own.entries.insert(n.to_string());
    }
    write_marker(dir, &own)?;
    let ckpts = dir.join("checkpoints");
    remove_stale_temporaries(&ckpts, is_checkpoint_name)?;
    remove_stale_temporaries(dir, |n| n == OUTPUT_MARKER || RUN_ENTRIES.contains(&n))?;
    if !resume {
        remove_checkpoints(&ckpts, |_| true)?;
        // An empty checkpoints/ goes; one still holding something else stays.
        let _ = std::fs::remove_dir(&ckpts);
        for n in ["metrics.jsonl", "loss.svg"] {
            let p = dir.join(n);
            if p.is_file() {
                std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
            }
        }
    }
    Ok(lock)
}

/// The checks of [`install_export`] for an export of `files` into `out`, touching nothing.
pub fn check_export_dir(out: &Path, files: &[String], overwrite: bool) -> Result<(), OutputError> {
    check_outside_run_checkpoints(out)?;
    if is_empty_dir(out)? {
        return Ok(());
    }
    let path = || out.to_path_buf();
    match read_marker(out)? {
        // An older spt-train's run (its marker recorded no files): an export would take the
        // folder over, and the run could no longer be resumed.
        Marker::Legacy if !existing(out, RUN_ENTRIES).is_empty() => {
            return Err(OutputError::WrongKind {
                path: path(),
                found: DirKind::Run,
                wanted: DirKind::Export,
            });
        }
        // An old marker over none of an export's files says nothing to keep: a folder like any.
        Marker::None | Marker::Legacy if existing(out, files.iter().map(String::as_str)).is_empty() => {
            if !overwrite {
                return Err(OutputError::Foreign { path: path() });
            }
        }
        Marker::None => {
            let names = existing(out, files.iter().map(String::as_str));
            if !overwrite {
                return Err(OutputError::Foreign { path: path() });
            }
            return Err(OutputError::Collision { path: path(), names });
        }
        Marker::Legacy => {
            return Err(OutputError::Legacy {
                path: path(),
                names: existing(out, files.iter().map(String::as_str)),
            })
        }
        Marker::Current(o) => {
            if o.kind != DirKind::Export {
                return Err(OutputError::WrongKind {
                    path: path(),
                    found: o.kind,
                    wanted: DirKind::Export,
                });
            }
            if !overwrite {
                return Err(OutputError::ExistingExport { path: path() });
            }
            let unclaimed = files
                .iter()
                .map(String::as_str)
                .filter(|n| !o.entries.contains(*n));
            let names = existing(out, unclaimed);
            if !names.is_empty() {
                return Err(OutputError::Collision { path: path(), names });
            }
        }
    }
    Ok(())
}

/// The staging directory of an export into `parent/name` by process `pid`.
pub fn export_staging(parent: &Path, name: &str, pid: u32) -> PathBuf {
    parent.join(format!(".{name}.tmp-{pid}"))
}

/// Removes the staging directories (`.NAME.tmp-PID`, see [`export_staging`]) that exports into
/// `parent/name` left when they were killed: only those of processes no longer running, and only
/// when they hold nothing but plain files from `files` (what an export writes), so a folder the
/// tool did not write is never deleted. Returns the removed paths.
pub fn remove_stale_export_staging(
    parent: &Path,
    name: &str,
    files: &[String],
) -> Result<Vec<PathBuf>, OutputError> {
    let mut removed = Vec::new();
    let prefix = format!(".{name}.tmp-");
    let rd = match std::fs::read_dir(parent) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_err(parent, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| io_err(parent, e))?;
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        let Some(Ok(pid)) = entry_name.strip_prefix(&prefix).map(str::parse::<u32>) else {
            continue;
        };
        let path = entry.path();
        // `file_type` does not follow links: a link named like a staging folder is never ours.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if crate::checkpoint::pid_alive(pid) || !is_dir {
            continue;
        }
        let ours = holds_only_export_files(&path, files)?;
        if !ours {
            tracing::warn!(path = %path.display(), "left alone: looks like an export's staging folder but holds files an export does not write");
            continue;
        }
        std::fs::remove_dir_all(&path).map_err(|e| io_err(&path, e))?;
        tracing::info!(path = %path.display(), "removed the staging folder of an interrupted export");
        removed.push(path);
    }
    Ok(removed)
}

/// Whether the folder `path` holds nothing but plain files an export of `files` writes: the
/// files, or a temporary of one where a kill came mid-write (the atomic write's `.tmp-FILE-PID`,
/// the weights' `.FILE.tmp-PID`, and the `.tmpXXXXXX` the safetensors writer makes beside it).
pub fn holds_only_export_files(path: &Path, files: &[String]) -> Result<bool, OutputError> {
    let digits = |r: &str| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit());
    let export_file = |n: &str| {
        let scratch = n
            .strip_prefix(".tmp")
            .is_some_and(|r| r.len() == 6 && r.bytes().all(|b| b.is_ascii_alphanumeric()));
        scratch
            || files.iter().any(|f| {
                n == f
                    || n.strip_prefix(".tmp-")
                        .and_then(|r| r.strip_prefix(f.as_str()))
                        .and_then(|r| r.strip_prefix('-'))
                        .is_some_and(digits)
                    || n.strip_prefix('.')
                        .and_then(|r| r.strip_prefix(f.as_str()))
                        .and_then(|r| r.strip_prefix(".tmp-"))
                        .is_some_and(digits)
            })
    };
    Ok(std::fs::read_dir(path).map_err(|e| io_err(path, e))?.all(|e| {
        e.is_ok_and(|e| {
            e.file_type().is_ok_and(|t| t.is_file()) && export_file(&e.file_name().to_string_lossy())
        })
    }))
}

/// Moves the files of the finished export in `staged` (a sibling of `out`, holding only plain
/// files) into `out` under the rules of [`check_export_dir`], and removes `staged`.
///
/// A new `out` is `staged` renamed. Into an existing one (empty or not: the folder itself, its
/// permissions and anyone's working directory in it stay) each file is renamed over its earlier
/// version; files of an earlier export that this one does not write are removed; anything else
/// in `out` stays as it was.
pub fn install_export(staged: &Path, out: &Path, overwrite: bool) -> Result<(), OutputError> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(staged).map_err(|e| io_err(staged, e))? {
        let e = e.map_err(|e| io_err(staged, e))?;
        files.push(e.file_name().to_string_lossy().into_owned());
    }
    files.sort();
    check_export_dir(out, &files, overwrite)?;
    let own = Ownership::new(DirKind::Export, files.iter().cloned());
    if out.symlink_metadata().is_err() {
        write_marker(staged, &own)?;
        return std::fs::rename(staged, out).map_err(|e| io_err(out, e));
    }
    let earlier = match read_marker(out)? {
        Marker::Current(o) => o.entries,
        _ => BTreeSet::new(),
    };
    // Claim the union first, so a failure midway leaves every file we moved in recorded.
    let mut both = own.clone();
    both.entries.extend(earlier.iter().cloned());
    write_marker(out, &both)?;
    for f in &files {
        let (src, dst) = (staged.join(f), out.join(f));
        std::fs::rename(&src, &dst).map_err(|e| io_err(&dst, e))?;
    }
    for f in earlier.difference(&own.entries) {
        let p = out.join(f);
        if p.is_file() {
            std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
        }
    }
    write_marker(out, &own)?;
    std::fs::remove_dir(staged).map_err(|e| io_err(staged, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap()
    }

    #[test]
    fn a_start_interrupted_before_its_marker_leaves_a_folder_it_can_start_in() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("run");
        std::fs::create_dir(&d).unwrap();
        // A process that no longer runs (pid_max is at most 2^22 on Linux).
        let dead = 4_194_305;
        for n in [OUTPUT_MARKER, "finetune.toml"] {
            std::fs::write(d.join(format!(".tmp-{n}-{dead}")), "").unwrap();
        }
        drop(prepare_run_dir(&d, false, false).unwrap());
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [OUTPUT_MARKER]);
        // Anything else in the folder still makes it a stranger's.
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join(format!(".tmp-{OUTPUT_MARKER}-{dead}")), "").unwrap();
        std::fs::write(other.join(format!(".tmp-notes.txt-{dead}")), "").unwrap();
        let e = prepare_run_dir(&other, false, false).unwrap_err();
        assert!(matches!(e, OutputError::Foreign { .. }), "{e}");
        assert_eq!(
            std::fs::read_dir(&other).unwrap().count(),
            2,
            "the refused folder changed"
        );
    }

    #[test]
    fn a_run_folder_is_locked_while_its_run_holds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("run");
        let lock = prepare_run_dir(&d, false, false).unwrap();
        for (overwrite, resume) in [(false, false), (true, false), (false, true)] {
            let e = check_run_dir(&d, overwrite, resume).unwrap_err();
            assert!(matches!(e, OutputError::Busy { .. }), "{e}");
            let e = prepare_run_dir(&d, overwrite, resume).unwrap_err();
            assert!(matches!(e, OutputError::Busy { .. }), "{e}");
        }
        drop(lock);
        drop(prepare_run_dir(&d, false, true).unwrap());
    }

    #[test]
    fn a_file_where_a_directory_goes_is_refused_by_name_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("notes");
        std::fs::write(&f, "mine").unwrap();
        for overwrite in [false, true] {
            let e = prepare_run_dir(&f, overwrite, false).unwrap_err();
            assert!(matches!(e, OutputError::NotADirectory { .. }), "{e}");
            assert!(e.to_string().contains("notes") && e.to_string().contains("not a directory"));
            let e = check_export_dir(&f, &["config.json".into()], overwrite).unwrap_err();
            assert!(matches!(e, OutputError::NotADirectory { .. }), "{e}");
        }
        assert_eq!(bytes(&f), b"mine");
    }

    #[test]
    fn run_dir_claims_only_free_names_and_cleans_only_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("run");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("notes.txt"), "mine").unwrap();
        assert!(matches!(
            prepare_run_dir(&d, false, false),
            Err(OutputError::Foreign { .. })
        ));
        // A user's metrics.jsonl is never adopted, with or without --overwrite.
        std::fs::write(d.join("metrics.jsonl"), "user line\n").unwrap();
        let e = prepare_run_dir(&d, true, false).unwrap_err();
        assert!(
            matches!(&e, OutputError::Collision { names, .. } if names == &["metrics.jsonl"]),
            "{e}"
        );
        std::fs::remove_file(d.join("metrics.jsonl")).unwrap();
        drop(prepare_run_dir(&d, true, false).unwrap());
        match read_marker(&d).unwrap() {
            Marker::Current(o) => {
                assert_eq!(o.kind, DirKind::Run);
                assert!(o.entries.contains("metrics.jsonl") && !o.entries.contains("notes.txt"));
            }
            m => panic!("{m:?}"),
        }
        // Our metrics and a user's file inside checkpoints/: the second overwrite keeps the latter.
        std::fs::write(d.join("metrics.jsonl"), "ours\n").unwrap();
        std::fs::create_dir_all(d.join("checkpoints")).unwrap();
        std::fs::write(d.join("checkpoints/README"), "user").unwrap();
        drop(prepare_run_dir(&d, true, false).unwrap());
        assert!(!d.join("metrics.jsonl").exists());
        assert_eq!(bytes(&d.join("checkpoints/README")), b"user");
        assert_eq!(bytes(&d.join("notes.txt")), b"mine");
        // A checkpoint whose manifest was cut short cannot vouch for its files: --overwrite is
        // refused by the check that runs before anything is loaded (it was refused only by the
        // removal, after the marker was written again), and nothing changes.
        let ck = d.join("checkpoints/step-00000001");
        std::fs::create_dir_all(&ck).unwrap();
        std::fs::write(ck.join("manifest.json"), "{\"format\":").unwrap();
        let e = check_run_dir(&d, true, false).unwrap_err().to_string();
        assert!(e.contains("step-00000001") && e.contains("not removed"), "{e}");
        let marker = bytes(&d.join(OUTPUT_MARKER));
        assert!(prepare_run_dir(&d, true, false).is_err());
        assert_eq!(bytes(&d.join(OUTPUT_MARKER)), marker);
        assert_eq!(bytes(&ck.join("manifest.json")), b"{\"format\":");
        std::fs::remove_dir_all(&ck).unwrap();
        // An export folder is not a run folder.
        let x = tmp.path().join("x");
        std::fs::create_dir(&x).unwrap();
        write_marker(&x, &Ownership::new(DirKind::Export, ["config.json".to_string()])).unwrap();
        assert!(matches!(
            check_run_dir(&x, true, false),
            Err(OutputError::WrongKind { .. })
        ));
    }

    #[test]
    fn legacy_marker_is_trusted_for_resume_only() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("old");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join(OUTPUT_MARKER), "spt-train output directory\n").unwrap();
        std::fs::write(d.join("metrics.jsonl"), "whose?\n").unwrap();
        assert_eq!(read_marker(&d).unwrap(), Marker::Legacy);
        let e = prepare_run_dir(&d, true, false).unwrap_err();
        assert!(
            matches!(e, OutputError::Legacy { .. }) && e.to_string().contains("metrics.jsonl"),
            "{e}"
        );
        assert_eq!(bytes(&d.join("metrics.jsonl")), b"whose?\n");
        drop(prepare_run_dir(&d, false, true).unwrap());
        assert_eq!(bytes(&d.join("metrics.jsonl")), b"whose?\n");
        // A plot alone is not removed either.
        let p = tmp.path().join("plot");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join(OUTPUT_MARKER), "spt-train output directory\n").unwrap();
        std::fs::write(p.join("loss.svg"), "<svg/>").unwrap();
        assert!(matches!(
            prepare_run_dir(&p, true, false),
            Err(OutputError::Legacy { .. })
        ));
        assert_eq!(bytes(&p.join("loss.svg")), b"<svg/>");
        // An export into an old run (even with --overwrite) would take it over: refused.
        let run = tmp.path().join("oldrun");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join(OUTPUT_MARKER), "spt-train output directory\n").unwrap();
        std::fs::write(run.join("finetune.toml"), "mode = \"lora\"\n").unwrap();
        let s = tmp.path().join(".stage");
        std::fs::create_dir(&s).unwrap();
        std::fs::write(s.join("config.json"), "{}").unwrap();
        let e = install_export(&s, &run, true).unwrap_err();
        assert!(matches!(e, OutputError::WrongKind { .. }), "{e}");
        assert_eq!(read_marker(&run).unwrap(), Marker::Legacy);
        assert!(!run.join("config.json").exists());
    }

    /// An export into an existing empty folder fills that folder: it is not removed and
    /// replaced (which changed its permissions, and pulled it from under a shell inside it).
    #[cfg(unix)]
    #[test]
    fn export_into_an_empty_folder_keeps_the_folder() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("private");
        std::fs::create_dir(&out).unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o700)).unwrap();
        let inode = std::fs::metadata(&out).unwrap().ino();
        let s = tmp.path().join(".stage");
        std::fs::create_dir(&s).unwrap();
        std::fs::write(s.join("config.json"), "{}").unwrap();
        install_export(&s, &out, false).unwrap();
        let m = std::fs::metadata(&out).unwrap();
        assert_eq!((m.ino(), m.permissions().mode() & 0o777), (inode, 0o700));
        assert_eq!(bytes(&out.join("config.json")), b"{}");
        assert!(!s.exists());
        assert!(matches!(read_marker(&out).unwrap(), Marker::Current(o) if o.kind == DirKind::Export));
    }

    #[test]
    fn stale_export_staging_is_removed_only_when_it_is_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let files = vec!["config.json".to_string(), "model.safetensors".to_string()];
        // u32::MAX is never a running pid; our own pid always is.
        let dead = export_staging(tmp.path(), "out", u32::MAX);
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("config.json"), "{}").unwrap();
        // Killed while writing the weights: their temporaries are the export's too.
        for t in [
            ".tmp-model.safetensors-4194305",
            ".model.safetensors.tmp-4194305",
            ".tmpA1b2C3",
        ] {
            std::fs::write(dead.join(t), "half").unwrap();
        }
        let live = export_staging(tmp.path(), "out", std::process::id());
        std::fs::create_dir(&live).unwrap();
        let foreign = export_staging(tmp.path(), "out", u32::MAX - 1);
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
        let foreign_tmp = export_staging(tmp.path(), "out", u32::MAX - 3);
        std::fs::create_dir(&foreign_tmp).unwrap();
        std::fs::write(foreign_tmp.join(".tmp-notes.txt-12"), "mine").unwrap();
        let other = export_staging(tmp.path(), "other", u32::MAX);
        std::fs::create_dir(&other).unwrap();
        // A link named like a dead export's staging folder, to a user's folder of export-like files.
        let users = tmp.path().join("users");
        std::fs::create_dir(&users).unwrap();
        std::fs::write(users.join("config.json"), "user").unwrap();
        let link = export_staging(tmp.path(), "out", u32::MAX - 2);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&users, &link).unwrap();
        let removed = remove_stale_export_staging(tmp.path(), "out", &files).unwrap();
        assert_eq!(removed, vec![dead.clone()]);
        assert_eq!(bytes(&users.join("config.json")), b"user");
        #[cfg(unix)]
        assert!(link.symlink_metadata().is_ok());
        assert!(!dead.exists() && live.exists() && other.exists());
        assert_eq!(bytes(&foreign.join("notes.txt")), b"mine");
        assert_eq!(bytes(&foreign_tmp.join(".tmp-notes.txt-12")), b"mine");
    }

    #[test]
    fn export_moves_files_in_and_keeps_the_users() {
        let tmp = tempfile::tempdir().unwrap();
        let stage = |files: &[(&str, &str)]| {
            let s = tmp.path().join(".stage");
            std::fs::create_dir_all(&s).unwrap();
            for (n, t) in files {
                std::fs::write(s.join(n), t).unwrap();
            }
            s
        };
        let out = tmp.path().join("out");
        install_export(
            &stage(&[("config.json", "1"), ("model.safetensors", "1")]),
            &out,
            false,
        )
        .unwrap();
        assert_eq!(bytes(&out.join("config.json")), b"1");
        std::fs::write(out.join("README.md"), "user").unwrap();
        // Again: needs --overwrite, then replaces ours, drops our stale weights, keeps the user's.
        let s = stage(&[("config.json", "2")]);
        assert!(matches!(
            install_export(&s, &out, false),
            Err(OutputError::ExistingExport { .. })
        ));
        install_export(&s, &out, true).unwrap();
        assert_eq!(bytes(&out.join("config.json")), b"2");
        assert!(!out.join("model.safetensors").exists() && !s.exists());
        assert_eq!(bytes(&out.join("README.md")), b"user");
        // A foreign folder holding a name we write is refused, even with --overwrite.
        let src = tmp.path().join("model");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("config.json"), "weights").unwrap();
        let s = stage(&[("config.json", "3")]);
        let e = install_export(&s, &src, true).unwrap_err();
        assert!(matches!(e, OutputError::Collision { .. }), "{e}");
        assert_eq!(bytes(&src.join("config.json")), b"weights");
    }

    /// A marker edited by hand (or shipped inside a folder someone handed over) that claims a
    /// path outside the directory, an absolute path, or a name spt-train never writes there:
    /// those entries are ignored, so `--overwrite` removes nothing of them.
    #[test]
    fn forged_marker_entries_are_never_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let stage = || {
            let s = tmp.path().join(".stage");
            std::fs::create_dir_all(&s).unwrap();
            std::fs::write(s.join("config.json"), "{}").unwrap();
            s
        };
        install_export(&stage(), &out, false).unwrap();
        let victim = tmp.path().join("victim.txt");
        let absolute = tmp.path().join("absolute.txt");
        for (p, t) in [
            (&victim, "up"),
            (&absolute, "abs"),
            (&out.join("README.md"), "mine"),
        ] {
            std::fs::write(p, t).unwrap();
        }
        let forged = serde_json::json!({
            "written_by": "spt-train", "version": 2, "kind": "export",
            "entries": ["config.json", "../victim.txt", absolute.to_str().unwrap(), "README.md"],
        });
        std::fs::write(out.join(OUTPUT_MARKER), forged.to_string()).unwrap();
        let Marker::Current(o) = read_marker(&out).unwrap() else {
            panic!("marker not read")
        };
        assert_eq!(o.entries.iter().collect::<Vec<_>>(), ["config.json"]);
        install_export(&stage(), &out, true).unwrap();
        assert_eq!(bytes(&victim), b"up");
        assert_eq!(bytes(&absolute), b"abs");
        assert_eq!(bytes(&out.join("README.md")), b"mine");
        // A run's marker is held to a run's names the same way.
        let run = tmp.path().join("run");
        drop(prepare_run_dir(&run, false, false).unwrap());
        std::fs::write(run.join("notes.txt"), "mine").unwrap();
        let forged = serde_json::json!({
            "written_by": "spt-train", "version": 2, "kind": "run",
            "entries": ["metrics.jsonl", "../victim.txt", "notes.txt"],
        });
        std::fs::write(run.join(OUTPUT_MARKER), forged.to_string()).unwrap();
        drop(prepare_run_dir(&run, true, false).unwrap());
        let Marker::Current(o) = read_marker(&run).unwrap() else {
            panic!("marker not read")
        };
        assert!(
            o.entries.iter().all(|n| RUN_ENTRIES.contains(&n.as_str())),
            "{o:?}"
        );
        assert_eq!(bytes(&run.join("notes.txt")), b"mine");
        assert_eq!(bytes(&victim), b"up");
    }

    /// A run or an export inside a run's checkpoints folder is refused (the run prunes what is
    /// there); beside the run, or inside a folder that is not a run's, is fine.
    #[test]
    fn outputs_inside_a_runs_checkpoints_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        drop(prepare_run_dir(&run, false, false).unwrap());
        let ckpts = run.join("checkpoints");
        std::fs::create_dir_all(ckpts.join("step-00000002")).unwrap();
        for inside in [
            ckpts.join("step-00000002"),
            ckpts.join("new"),
            ckpts.join("step-00000002/deeper"),
        ] {
            let e = check_run_dir(&inside, true, false).unwrap_err();
            assert!(matches!(e, OutputError::InsideRun { .. }), "{e}");
            assert!(e.to_string().contains("inside the checkpoints of the run"), "{e}");
            let e = check_export_dir(&inside, &["config.json".into()], true).unwrap_err();
            assert!(matches!(e, OutputError::InsideRun { .. }), "{e}");
        }
        // The folder itself, a path that leaves it through `..` of a folder not yet made
        // (refused: it is still inside), and one through a link.
        let e = check_export_dir(&ckpts, &["config.json".into()], true).unwrap_err();
        assert!(matches!(e, OutputError::InsideRun { .. }), "{e}");
        let e = check_run_dir(&ckpts.join("new/../other"), true, false).unwrap_err();
        assert!(matches!(e, OutputError::InsideRun { .. }), "{e}");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&ckpts, &link).unwrap();
        let e = check_run_dir(&link.join("x"), true, false).unwrap_err();
        assert!(matches!(e, OutputError::InsideRun { .. }), "{e}");
        // Outside: beside the run, inside the run (not its checkpoints), out through `..`, and
        // a folder named checkpoints that is not a run's.
        check_run_dir(&tmp.path().join("run2"), false, false).unwrap();
        check_export_dir(&run.join("export"), &["config.json".into()], false).unwrap();
        check_export_dir(&ckpts.join("../../hf"), &["config.json".into()], false).unwrap();
        check_export_dir(
            &ckpts.join("step-00000002/../../../hf2"),
            &["config.json".into()],
            false,
        )
        .unwrap();
        let plain = tmp.path().join("mine/checkpoints/x");
        check_export_dir(&plain, &["config.json".into()], false).unwrap();
        let e = check_run_dir(Path::new(""), false, false).unwrap_err();
        assert!(e.to_string().contains("empty path"), "{e}");
    }
}
