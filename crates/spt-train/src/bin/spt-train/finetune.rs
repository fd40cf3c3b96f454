//! `spt-train finetune`: the run directory, resuming, training and the final evaluation.

use crate::say;
use std::path::{Path, PathBuf};

use crate::common::{
    build_task, check_model, check_writable, checkpoint_path, device, model_param_count, run_dir_of,
};
use crate::Outcome;
use anyhow::{bail, Context, Result};
use spt_train::checkpoint::{
    check_removable, checkpoint_step, checkpoints_after, latest_checkpoint, list_checkpoints,
    remove_checkpoints, write_file_atomic,
};
use spt_train::config::{resolve_model, FinetuneArgs, FinetuneConfig, Mode};
use spt_train::data::LabelMap;
use spt_train::output_dir::{check_run_dir, prepare_run_dir};
use spt_train::pipeline::{load_tokenizer, prepare_data};
use spt_train::tasks::ParamSummary;
use spt_train::trainer::{install_ctrlc_handler, DataRecord, Resume, Trainer};

pub(crate) fn finetune(args: &FinetuneArgs) -> Result<Outcome> {
    // A resume without --output-dir continues in the folder of the run it names (see
    // `resume_folder`), not in an output_dir a finetune.toml records.
    let with_run_dir;
    let args = match (&args.output_dir, resume_folder(args)) {
        (None, Some(run)) => {
            with_run_dir = FinetuneArgs {
                output_dir: Some(run),
                ..args.clone()
            };
            &with_run_dir
        }
        _ => args,
    };
    let with_run_config;
    let args = match resumed_run_config(args) {
        Some(p) => {
            say!(
                "note: --resume without --config or --model: the run's settings come from {}",
                p.display()
            );
            with_run_config = FinetuneArgs {
                config: Some(p),
                ..args.clone()
            };
            &with_run_config
        }
        None => {
            let model_set = args
                .set
                .iter()
                .any(|s| s.split('=').next().is_some_and(|k| k.trim() == "model"));
            if let (Some(r), None, None, false) =
                (args.resume.as_deref(), &args.config, &args.model, model_set)
            {
                // Nothing says what to train: the error is the missing run, not the missing --model.
                let dir = args
                    .output_dir
                    .clone()
                    .unwrap_or_else(|| FinetuneConfig::default().output_dir);
                let (what, path) = match r {
                    "latest" => ("--output-dir", dir),
                    p => ("--resume", PathBuf::from(p)),
                };
                if !path.exists() {
                    bail!(
                        "{what} {}: no such run directory or checkpoint to resume",
                        path.display()
                    );
                }
                bail!(
                    "{what} {}: holds no run settings (finetune.toml) to resume from; give --model and the \
                     data, or --config, to resume with",
                    path.display()
                );
            }
            args
        }
    };
    let mut cfg = FinetuneConfig::from_args(args).context("reading the finetune settings")?;
    if args.config.is_some() && !args.overwrite && cfg.overwrite && cfg.resume.is_some() {
        // A run folder's finetune.toml from before it recorded `overwrite = false`: resuming with
        // it must not discard later checkpoints on a permission given to another invocation.
        cfg.overwrite = false;
    }
    let dev = device(&cfg.device)?;
    crate::common::apply_matmul_precision(cfg.matmul_precision);
    let resume = resume_point(&cfg)?;
    let resuming = resume != Resume::No;
    check_run_dir(&cfg.output_dir, cfg.overwrite, resuming)?;
    // Later checkpoints that a resume would mix in, or (with --overwrite) that cannot vouch for
    // their files: refused before the data and model are read.
    if let Resume::From(p) = &resume {
        later_checkpoints(&cfg, p)?;
    }
    // Before the data and model are read: a folder that cannot be made was found only after.
    let out = &cfg.output_dir;
    if out.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) && !out.exists() {
        bail!(
            "--output-dir {}: a link to {}, which does not exist; create that folder or give another",
            out.display(),
            std::fs::read_link(out).map_or_else(|_| "?".into(), |t| t.display().to_string())
        );
    }
    check_writable("--output-dir", out)?;
    let model_dir = resolve_model(&cfg.model)?;
    check_model(cfg.task, &model_dir)?;
    // Training every weight (dense, or spt without adapters) holds a gradient and AdamW's two
    // moments beside each: what cannot fit in host memory is refused from the config, before the
    // data is read and the weights loaded (the exact check after building the model stays, with
    // the batch's activations; on a GPU they live in its memory instead).
    let trains_all = cfg.mode == Mode::Dense || (cfg.mode == Mode::Spt && cfg.lora_rank == 0);
    if trains_all && dev.is_cpu() {
        let n = usize::try_from(model_param_count(cfg.task, &model_dir)?).unwrap_or(usize::MAX);
        let all = ParamSummary {
            total: n,
            trainable: n,
            initialised: vec![],
        };
        all.check_fits(spt_models::physical_memory_bytes(), None)
            .with_context(|| format!("{} (full fine-tuning)", model_dir.join("config.json").display()))?;
    }
    // The data is read and the model built before the run directory is made, so that a bad
    // file or setting leaves nothing behind.
    let tok = load_tokenizer(&cfg, &model_dir)?;
    let data = prepare_data(&cfg, &tok, None).with_context(|| match &args.config {
        // A run's finetune.toml is often read from another directory than the one it was written in.
        Some(c) => format!(
            "reading the data {} names (relative paths are read from the current directory, {})",
            c.display(),
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        ),
        None => "reading the data".into(),
    })?;
    tracing::info!(
        train = data.train.len(),
        validation = data.validation.as_ref().map(|v| v.len()).unwrap_or(0),
        labels = data.labels.as_ref().map(|l| l.len()).unwrap_or(0),
        "data ready"
    );
    spt_train::trainer::check_settings(&cfg.trainer_config(data.train.len()), &data.train)?;
    spt_train::pipeline::check_training_labels(&cfg, &data)?;
    spt_train::pipeline::check_data_fits_model(&data, &model_dir)?;
    let task = build_task(
        &cfg,
        &model_dir,
        data.labels.as_ref().map(LabelMap::len),
        Some(&data.train),
        &dev,
        resuming,
    )?;
    // A step's batch holds at most every training row; on a GPU the activations live in its
    // memory, not the host's.
    let longest = data.train.lengths().into_iter().max().unwrap_or(0);
    let rows = cfg.batch_size.min(data.train.len());
    let batch = dev.is_cpu().then(|| task.batch_activations(rows, longest));
    task.summary
        .check_fits(spt_models::physical_memory_bytes(), batch)?;
    let (trainable, total) = (task.summary.trainable, task.summary.total);
    let mut trainer = Trainer::new(task, cfg.trainer_config(data.train.len()), dev)
        .with_held_out(data.held_out.clone())
        .with_classes(data.labels.as_ref().map(|l| l.labels().to_vec()));
    // The checkpoint must fit these settings before the run folder changes: a refused resume
    // leaves its finetune.toml, labels.json and later checkpoints as they were.
    if let Resume::From(p) = &resume {
        check_fork_target(&cfg, p)?;
    }
    check_same_labels(&cfg, &resume, data.labels.as_ref())?;
    check_same_random_base(&cfg, &resume)?;
    trainer.check_resume(&resume)?;
    if let Some((p, done)) = trainer.resumed_checkpoint() {
        spt_train::trainer::check_within_run(p, done, trainer.total_steps(data.train.len()))?;
    }
    // Held to the end of the run: a second spt-train into this folder is refused meanwhile.
    let _lock = prepare_run_dir(&cfg.output_dir, cfg.overwrite, resuming)?;
    if let Resume::From(p) = &resume {
        // Listed again under the lock: a run that ended meanwhile may have saved more.
        let later = later_checkpoints(&cfg, p)?;
        discard_later_checkpoints(&cfg, p, &later)?;
    }
    // `overwrite` and `resume` belong to this invocation, not to the run: a finetune.toml reused
    // with --config must not overwrite or resume on another invocation's word. Absolute paths:
    // the run is resumed and evaluated from wherever its user stands then.
    let resolved = FinetuneConfig {
        overwrite: false,
        resume: None,
        ..cfg.clone()
    }
    .with_absolute_paths()
    .to_toml()
    .context("serialising the resolved config")?;
    write_file_atomic(&cfg.output_dir.join("finetune.toml"), resolved.as_bytes())
        .with_context(|| format!("writing {}", cfg.output_dir.join("finetune.toml").display()))?;
    if let Some(labels) = &data.labels {
        labels.save(&cfg.output_dir.join("labels.json"))?;
    }
    let mut trainer = trainer.with_stop_flag(install_ctrlc_handler()?);
    let summary = trainer.train(&data.train, data.validation.as_ref(), &resume)?;
    if summary.resumed_from == Some(summary.steps) && summary.train_losses.is_empty() {
        say!(
            "note: the run was already at its last step ({}); nothing to train. Raise --max-steps or \
             --epochs to continue it",
            summary.steps
        );
    }
    let eval = summary.evals.last();
    crate::emit(&format!(
        "{}\n",
        serde_json::json!({
            "step": summary.steps,
            "eval": eval.map(|(_, r)| r),
            "eval_step": eval.map(|(s, _)| s),
            "median_step_s": summary.median_step_s(),
            "step_times_s": summary.step_times_s,
            "mode": cfg.mode,
            "trainable_params": trainable,
            "total_params": total,
            "stopped": summary.stopped,
        })
    ))?;
    if summary.stopped {
        eprintln!("stopped at step {}; resume with --resume", summary.steps);
        return Ok(Outcome::Interrupted);
    }
    Ok(Outcome::Done)
}

/// `finetune --resume` given neither `--config` nor `--model`: the finetune.toml of the run being
/// resumed, in that run's folder only ([`run_dir_of`]; a finetune.toml of the user's in a
/// folder above is not it).
fn resumed_run_config(args: &FinetuneArgs) -> Option<PathBuf> {
    if args.config.is_some() || args.model.is_some() {
        return None;
    }
    let run = match args.resume.as_deref()? {
        "latest" => args
            .output_dir
            .clone()
            .unwrap_or_else(|| FinetuneConfig::default().output_dir),
        p => run_dir_of(Path::new(p))?,
    };
    Some(run.join("finetune.toml")).filter(|f| f.is_file())
}

/// The folder a `--resume` without --output-dir continues in: the run it names, not the
/// output_dir a finetune.toml records (relative to where an older run started, or a moved or
/// copied run's old place; a fork is asked for by name). `--resume PATH`: PATH's run
/// ([`run_dir_of`]). `--resume` (latest): the run whose finetune.toml `--config` gives (a
/// copy of a run is resumed, not the original), else without --config and --model the default
/// output folder, whose finetune.toml supplies the settings; none for a --config template.
fn resume_folder(args: &FinetuneArgs) -> Option<PathBuf> {
    match args.resume.as_deref()? {
        "latest" => match &args.config {
            Some(c) => c
                .file_name()
                .is_some_and(|n| n == "finetune.toml")
                .then(|| c.parent())
                .flatten()
                .map(|d| {
                    if d.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        d
                    }
                })
                .filter(|d| {
                    !list_checkpoints(&d.join("checkpoints"))
                        .unwrap_or_default()
                        .is_empty()
                })
                .map(Path::to_path_buf),
            None => args.model.is_none().then(|| FinetuneConfig::default().output_dir),
        },
        p => run_dir_of(Path::new(p)),
    }
}

/// A resumed classifier's head reads its classes in its checkpoint's order (recorded in the
/// manifest; for a checkpoint from before that record, its run's labels.json): another label set
/// of the same size (renamed classes, another --label-map order) would pass the shape check,
/// rewrite labels.json, and make the run's earlier checkpoints answer with wrong names.
fn check_same_labels(cfg: &FinetuneConfig, resume: &Resume, labels: Option<&LabelMap>) -> Result<()> {
    let (ck, run) = match resume {
        Resume::No => return Ok(()),
        Resume::Latest => (
            latest_checkpoint(&cfg.output_dir.join("checkpoints")).ok(),
            Some(cfg.output_dir.clone()),
        ),
        Resume::From(p) => (Some(p.clone()), run_dir_of(p)),
    };
    let Some(labels) = labels else {
        return Ok(());
    };
    let recorded = ck
        .as_deref()
        .and_then(DataRecord::of)
        .and_then(|r| r.classes)
        .map(|c| {
            (
                c,
                format!("checkpoint {}", ck.as_deref().unwrap_or(Path::new("")).display()),
            )
        });
    let file = run.map(|r| r.join("labels.json"));
    let then = match (recorded, &file) {
        (Some(r), _) => r,
        (None, Some(f)) if f.is_file() => {
            let l = LabelMap::load(f).with_context(|| format!("reading {}", f.display()))?;
            (l.labels().to_vec(), f.display().to_string())
        }
        _ => return Ok(()),
    };
    if then.0 != labels.labels() {
        bail!(
            "--resume: {} gives the run's classes as {:?}, these settings give {:?}; a checkpoint's \
             head answers in that order: resume with a --label-map giving those classes in that \
             order ({}) and the same data, or start a new run",
            then.1,
            then.0,
            labels.labels(),
            match file {
                Some(f) if f.is_file() => format!("the run's {}", f.display()),
                _ => "the run's labels.json is gone".into(),
            }
        );
    }
    Ok(())
}

/// With --random-init and a frozen base (lora, or spt with adapters), the seed draws the base the
/// adapters were trained on, and a checkpoint holds only the adapters: resumed with another seed
/// (or the command retyped without its --seed), they would go on over a different random model.
fn check_same_random_base(cfg: &FinetuneConfig, resume: &Resume) -> Result<()> {
    let frozen_base = cfg.mode == Mode::Lora || (cfg.mode == Mode::Spt && cfg.lora_rank > 0);
    if !cfg.random_init || !frozen_base {
        return Ok(());
    }
    let ck = match resume {
        Resume::No => return Ok(()),
        Resume::Latest => latest_checkpoint(&cfg.output_dir.join("checkpoints"))?,
        Resume::From(p) => p.clone(),
    };
    let manifest = spt_train::checkpoint::read_manifest(&ck)?;
    if let Some(then) = manifest.config.get("seed").and_then(|s| s.as_u64()) {
        if then != cfg.seed {
            bail!(
                "--seed {}: {} was trained over a random frozen base drawn from seed {then} \
                 (--random-init); resume with --seed {then}",
                cfg.seed,
                ck.display()
            );
        }
    }
    Ok(())
}

/// Whether the checkpoint `from` is one of the run in `out` (as the OS resolves both): not a
/// fork. A run kept inside another's folder (`P/exp`) is its own run, not P's.
fn of_run(from: &Path, out: &Path) -> bool {
    let real = |p: &Path| p.canonicalize().ok();
    match run_dir_of(from).and_then(|r| real(&r)) {
        Some(run) => real(out) == Some(run),
        None => false,
    }
}

/// A fork (resuming another run's checkpoint into `--output-dir`) goes into a new or empty
/// folder: into a folder holding a run of its own it would put its checkpoints, metrics and
/// labels beside that run's, and the older checkpoints would be read with the fork's labels.
fn check_fork_target(cfg: &FinetuneConfig, from: &Path) -> Result<()> {
    let out = &cfg.output_dir;
    if of_run(from, out) {
        return Ok(());
    }
    // Checkpoints are what a run cannot lose; a fork killed before its first save leaves only
    // settings and metrics, and may be started again.
    if !list_checkpoints(&out.join("checkpoints"))?.is_empty() {
        bail!(
            "--resume {}: {} holds another run (its checkpoints); a fork \
             goes into a new or empty folder: choose another --output-dir, or drop --output-dir to \
             continue the run being resumed in its own folder",
            from.display(),
            out.display()
        );
    }
    Ok(())
}

/// `--resume` resolved: `latest`, a checkpoint, or a run directory (its latest checkpoint).
/// Checked before anything is written, so a run with nothing to resume leaves no folder behind.
pub(crate) fn resume_point(cfg: &FinetuneConfig) -> Result<Resume> {
    Ok(match cfg.resume_from() {
        Resume::Latest => {
            latest_checkpoint(&cfg.output_dir.join("checkpoints")).with_context(|| {
                format!(
                    "--resume: nothing to resume in {}; drop --resume to start a new run there",
                    cfg.output_dir.display()
                )
            })?;
            Resume::Latest
        }
        Resume::From(p) => {
            if !p.exists() {
                bail!("--resume {}: no such checkpoint or run directory", p.display());
            }
            Resume::From(checkpoint_path(&p)?)
        }
        r => r,
    })
}

/// The checkpoints of the output directory later than `from`, named; refused when there are
/// some and no `--overwrite` (resuming would mix two runs). Touches nothing, so it runs before
/// the run folder changes.
fn later_checkpoints(cfg: &FinetuneConfig, from: &Path) -> Result<Vec<String>> {
    let step = checkpoint_step(from)?;
    let later = checkpoints_after(&cfg.output_dir.join("checkpoints"), step)?;
    if !later.is_empty() && !cfg.overwrite {
        bail!(
            "--resume {}: {} already holds later checkpoints ({}); continuing would mix two runs. \
             Pass --output-dir NEW to fork the run into a new folder, or --overwrite to discard the later checkpoints",
            from.display(),
            cfg.output_dir.display(),
            later.join(", ")
        );
    }
    // Refused now, with the folder as it was, rather than by the removal itself.
    if !later.is_empty() {
        check_removable(&cfg.output_dir.join("checkpoints"), |s| s > step)?;
    }
    Ok(later)
}

/// Discards the checkpoints `later` than `from` ([`later_checkpoints`], which refused them
/// without `--overwrite`), naming them; says when resuming from `from` forks the run instead.
fn discard_later_checkpoints(cfg: &FinetuneConfig, from: &Path, later: &[String]) -> Result<()> {
    let step = checkpoint_step(from)?;
    let ckpts = cfg.output_dir.join("checkpoints");
    if later.is_empty() {
        if !of_run(from, &cfg.output_dir) {
            say!(
                "note: resuming from {} into {}: a new run folder (a fork); the original run is unchanged",
                from.display(),
                cfg.output_dir.display()
            );
        }
        return Ok(());
    }
    remove_checkpoints(&ckpts, |s| s > step)?;
    eprintln!(
        "note: --overwrite: discarded the later checkpoints {} of {}; the run continues from step {step}",
        later.join(", "),
        cfg.output_dir.display()
    );
    Ok(())
}
