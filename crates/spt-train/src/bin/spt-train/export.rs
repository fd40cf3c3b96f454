//! `spt-train export`: merge LoRA and write a Hugging Face model directory, or write a LoRA run's
//! adapter as PEFT does.

use crate::say;
use std::path::{Path, PathBuf};

use crate::common::{check_model, check_writable, device, find_labels, load_trained, task_of, ModelArgs};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use spt_train::config::resolve_model;
use spt_train::data::{LabelMap, TaskKind, TextTokenizer};
use spt_train::output_dir::check_export_dir;
use spt_train::peft::{adapter_refusal, export_peft_adapter, ADAPTER_FILES};
use spt_train::tasks::{export_files, export_hf_dir};

/// What `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// A Hugging Face model directory: LoRA merged into the weights, config, tokenizer.
    Hf,
    /// A PEFT adapter (lora runs): adapter_config.json and adapter_model.safetensors, for
    /// `PeftModel.from_pretrained` on the run's base model.
    Peft,
}

#[derive(Args)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Directory to write (hf: config.json, model.safetensors with HF names, tokenizer files;
    /// peft: adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// hf: the merged model; peft: the adapter alone, as PEFT saves one.
    #[arg(long, value_enum, default_value = "hf")]
    pub(crate) format: Format,
    /// Replace an earlier export in --out (only one that spt-train wrote), or write into a
    /// folder that is not spt-train's where none of the export's files exist.
    #[arg(long)]
    pub(crate) overwrite: bool,
}

pub(crate) fn export(a: &ExportArgs) -> Result<()> {
    if a.model.checkpoint.is_none() {
        bail!("export needs --checkpoint (a checkpoint or a run directory)");
    }
    a.model.check_checkpoint()?;
    // The export is built on the CPU; a device is still checked, as every command checks it.
    if !device(&a.model.device)?.is_cpu() {
        say!(
            "note: export runs on the CPU; --device {} is not used",
            a.model.device
        );
    }
    // Refuse before the (slow) load: the checks are repeated when the files are moved in.
    let model_dir = resolve_model(&a.model.model)?;
    let out = &link_target(&a.out)?;
    // An earlier export used as the base: exporting over it would replace the input it reads.
    if let (Ok(out), Ok(src)) = (out.canonicalize(), model_dir.canonicalize()) {
        if out == src {
            bail!(
                "--out {} is the model being exported from (--model): write the export to another \
                 directory",
                a.out.display()
            );
        }
    }
    let run = a.model.run_settings()?;
    // What is written, checked before the load: the merged model with the run's tokenizer (so
    // that the export tokenises text as the run did), or the adapter of a LoRA run.
    let (files, tokenizer) = match a.format {
        Format::Hf => {
            let tokenizer = a.model.tokenizer_source(run.as_ref());
            (export_files(&model_dir, tokenizer.as_deref()), tokenizer)
        }
        Format::Peft => {
            let Some(cfg) = &run else {
                bail!(
                    "--format peft needs the run's finetune.toml beside --checkpoint (its LoRA rank, \
                     alpha and trained modules); none was found"
                );
            };
            if let Some(why) = adapter_refusal(cfg) {
                bail!("--format peft: {why}");
            }
            (ADAPTER_FILES.iter().map(|f| f.to_string()).collect(), None)
        }
    };
    check_export_dir(out, &files, a.overwrite)?;
    // The export is staged beside --out, then moved in.
    check_writable("--out", out.parent().unwrap_or(Path::new("")))?;
    if out.is_dir() {
        check_writable("--out", out)?;
    }
    let task_kind = task_of(&a.model.model)?;
    check_model(task_kind, &model_dir)?;
    if a.format == Format::Hf {
        check_tokenizer_files(tokenizer.as_deref().unwrap_or(&model_dir))?;
    }
    // A language model has no classes: a labels.json found beside it is not its own.
    let labels = match task_kind {
        TaskKind::Classify => find_labels(&None, &a.model.checkpoint, &model_dir)?,
        TaskKind::Lm => None,
    };
    let (mut task, model_dir) = load_trained(
        &a.model,
        task_kind,
        labels.as_ref().map(LabelMap::len),
        &Device::Cpu,
        None,
        None,
    )?;
    if let (Format::Peft, Some(cfg)) = (a.format, &run) {
        export_peft_adapter(&task, cfg, &cfg.model, out, a.overwrite)?;
        say!(
            "exported the adapter to {} (load it with peft.PeftModel.from_pretrained onto {})",
            a.out.display(),
            cfg.model
        );
        // The adapter carries no label names: the base must be built with the head's size.
        if let Some(l) = &labels {
            let names: Vec<String> = (0..l.len())
                .map(|i| format!("{i} = {}", l.label(i as u32).unwrap_or_default()))
                .collect();
            say!(
                "its classifier has {} classes ({}): load the base with num_labels={}",
                l.len(),
                names.join(", "),
                l.len()
            );
        }
        return Ok(());
    }
    if task.sparse_layers() > 0 {
        say!(
            "note: the export is a dense Hugging Face model (LoRA merged); sparse attention and FFN \
             routing are training-time approximations and are not part of it"
        );
    }
    export_hf_dir(
        &mut task,
        &model_dir,
        tokenizer.as_deref(),
        labels.as_ref(),
        out,
        a.overwrite,
    )?;
    say!("exported to {}", a.out.display());
    Ok(())
}

/// `--out` made absolute (`.` and `..` resolved, so that `--out .` has a name and a parent to
/// stage beside), or, for a link, the folder it points to: the export is staged beside that
/// folder and renamed into it (the link stays). A link to nothing or to a file, and `/`, are
/// refused by name, before the model is loaded.
fn link_target(out: &Path) -> Result<PathBuf> {
    let is_link = out.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        let abs = spt_train::output_dir::resolve(out).with_context(|| format!("--out {}", out.display()))?;
        if abs.file_name().is_none() {
            bail!(
                "--out {}: the root folder; write the export to a folder of its own",
                out.display()
            );
        }
        return Ok(abs);
    }
    let to = std::fs::read_link(out).map_or_else(|_| "?".into(), |t| t.display().to_string());
    match out.canonicalize() {
        Ok(t) if t.is_dir() => Ok(t),
        Ok(t) => bail!(
            "--out {} is a link to {}, which is not a folder",
            out.display(),
            t.display()
        ),
        Err(_) => bail!(
            "--out {} is a link to {to}, which does not exist: create that folder, or give another --out",
            out.display()
        ),
    }
}

/// The export copies the model's tokenizer files as they are: a broken one is refused here, by
/// name, rather than shipped inside a model that loads; a missing one is worth a warning, since
/// the export then cannot tokenise text on its own. `src`: a directory, or a tokenizer.json file.
fn check_tokenizer_files(src: &Path) -> Result<()> {
    let checked = if src.is_dir() {
        let any = ["tokenizer.json", "vocab.json", "vocab.txt"]
            .iter()
            .any(|f| src.join(f).is_file());
        if !any {
            tracing::warn!(
                "{} has no tokenizer files (tokenizer.json, vocab.json + merges.txt or vocab.txt), \
                 so the export has none: pass --tokenizer to export one",
                src.display()
            );
            return Ok(());
        }
        TextTokenizer::from_model_dir(src, 512)
    } else {
        TextTokenizer::from_file(src, 512)
    };
    checked.map(drop).with_context(|| {
        format!(
            "checking the tokenizer that the export copies from {}",
            src.display()
        )
    })
}
