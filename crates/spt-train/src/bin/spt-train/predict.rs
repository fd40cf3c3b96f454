//! `spt-train predict`: classify texts from a file or stdin.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::common::{
    check_model, check_output_file, config_has_any, device, find_labels, load_trained, tokenizer_for,
    write_output_file, ModelArgs, PrecisionArgs,
};
use anyhow::{bail, Context, Result};
use clap::Args;
use spt_train::config::resolve_model;
use spt_train::data::{epoch_batches, BatchOrder, EncodedDataset, EncodedItem};
use spt_train::data::{read_classification, ColumnSpec, DataFormat, LabelMap, TaskKind};

#[derive(Args)]
pub(crate) struct PredictArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) precision: PrecisionArgs,
    /// CSV / TSV / JSONL file, or `-` for one text per line on stdin (a blank line is an empty
    /// text: each input line gets its output line).
    #[arg(long, default_value = "-")]
    pub(crate) input: String,
    /// csv, tsv or jsonl (default: from the file's extension).
    #[arg(long, value_enum)]
    pub(crate) format: Option<DataFormat>,
    /// Text column of a CSV / TSV / JSONL input (default: the run's, for --checkpoint; else `text`).
    #[arg(long)]
    pub(crate) text_column: Option<String>,
    /// Second text column, for sentence pairs (default: the run's, for --checkpoint; else none).
    #[arg(long)]
    pub(crate) text_pair_column: Option<String>,
    /// labels.json of the run (default: the classes the checkpoint records; for a checkpoint of
    /// an older spt-train, its run's labels.json; without a checkpoint, the id2label of the
    /// model's config.json, as an export writes it).
    #[arg(long)]
    pub(crate) label_map: Option<PathBuf>,
    /// Write JSON lines here instead of stdout (`-`: stdout, as `--input -` is stdin).
    #[arg(long)]
    pub(crate) output: Option<PathBuf>,
    /// Texts per batch.
    #[arg(long, default_value_t = 32)]
    pub(crate) batch_size: usize,
    /// Truncation length in tokens (default: the run's, for --checkpoint; else the model's maximum).
    #[arg(long)]
    pub(crate) max_length: Option<usize>,
}

pub(crate) fn predict(a: &PredictArgs) -> Result<()> {
    a.model.check_checkpoint()?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1, got 0");
    }
    // `-` is stdout, not a file of that name.
    let output = a.output.as_deref().filter(|p| *p != Path::new("-"));
    if let Some(out) = output {
        let what = "predictions spt-train wrote (JSON lines with text, label, id and score)";
        check_output_file(out, "--output", what, is_predictions)?;
    }
    a.precision.apply(&a.model.device)?;
    let dev = device(&a.model.device)?;
    let model_dir = resolve_model(&a.model.model)?;
    check_model(TaskKind::Classify, &model_dir)?;
    // A run's texts were read with its columns and truncated at its max_length: the same here.
    let run = a.model.run_settings()?;
    // An LM run's checkpoint has no classes: said before asking for them.
    if let (Some(r), Some(c)) = (&run, &a.model.checkpoint) {
        if r.task != TaskKind::Classify {
            bail!(
                "{} was trained for {}; predict classifies texts (use generate for a language model)",
                c.display(),
                crate::common::task_name(r.task)
            );
        }
    }
    let max_length = a.max_length.or(run.as_ref().and_then(|r| r.max_length));
    let tok = tokenizer_for(&a.model, run.as_ref(), &model_dir, max_length)?;
    let labels = find_labels(&a.label_map, &a.model.checkpoint, &model_dir)?;
    if labels.is_none() && !config_has_any(&model_dir, &["num_labels", "id2label"]) {
        let cfg = model_dir.join("config.json");
        match &a.model.checkpoint {
            Some(c) => bail!(
                "no class labels: {} has no labels.json beside it, and {} gives neither num_labels \
                 nor id2label; pass --label-map (the run's labels.json)",
                c.display(),
                cfg.display()
            ),
            None => bail!(
                "{} has no classification head to predict with ({} gives neither num_labels nor \
                 id2label): pass --checkpoint (a finetune run) or a fine-tuned model (`spt-train \
                 export` writes one)",
                model_dir.display(),
                cfg.display()
            ),
        }
    }
    // The flag's, else the run's.
    let pair_column = (a.text_pair_column.clone()).or(run.as_ref().and_then(|r| r.text_pair_column.clone()));
    // Each text with the line it starts on (for stdin, its line; for a file, the row's line,
    // past the header, blank lines and quoted line breaks), for the messages that name it.
    let texts: Vec<(String, Option<String>, u64)> = if a.input == "-" {
        // A line of stdin is one text: column settings cannot apply, and a pair model would
        // classify a lone text as if its second text were empty.
        if let Some(c) = &pair_column {
            let from = match &a.text_pair_column {
                Some(_) => format!("--text-pair-column {c}"),
                None => format!("the run's text_pair_column `{c}`"),
            };
            bail!(
                "stdin gives one text per line, but {from} asks for text pairs: give them in a CSV, \
                 TSV or JSONL file with --input"
            );
        }
        if let Some(c) = &a.text_column {
            bail!("--text-column {c}: stdin lines are the texts themselves; the flag applies to an --input file");
        }
        // A CSV header and its quoted fields would be classified as texts.
        if let Some(f) = a.format {
            bail!(
                "--format {}: stdin is read as one text per line; give a CSV, TSV or JSONL file with --input",
                clap::ValueEnum::to_possible_value(&f).map_or("?".into(), |v| v.get_name().to_string())
            );
        }
        let mut out = Vec::new();
        for (i, line) in std::io::stdin().lock().lines().enumerate() {
            // Every line, blank ones too: output line i answers input line i.
            out.push((
                line.with_context(|| format!("stdin: line {}", i + 1))?,
                None,
                i as u64 + 1,
            ));
        }
        out
    } else {
        let cols = ColumnSpec {
            text: (a.text_column.clone())
                .or(run.as_ref().map(|r| r.text_column.clone()))
                .unwrap_or_else(|| "text".into()),
            text_pair: pair_column,
            label: None,
            group: None,
        };
        read_classification(Path::new(&a.input), a.format, &cols, &[])?
            .examples
            .into_iter()
            .map(|e| (e.text, e.text_pair, e.line))
            .collect()
    };
    let from = if a.input == "-" { "stdin" } else { a.input.as_str() };
    let encoded: Vec<_> = texts
        .iter()
        .map(|(t, p, line)| tok.encode(t, p.as_deref(), &format!("{from}:{line}")))
        .collect::<std::result::Result<_, _>>()?;
    spt_train::pipeline::check_ids_fit_model(encoded.iter().map(|e| &e.ids[..]), &model_dir)?;
    spt_train::pipeline::check_type_ids_fit_model(encoded.iter().map(|e| &e.type_ids[..]), &model_dir)?;
    tracing::info!(
        texts = encoded.len(),
        labels = labels.as_ref().map(|l| l.len()),
        "inputs ready"
    );
    let (mut task, _) = load_trained(
        &a.model,
        TaskKind::Classify,
        labels.as_ref().map(LabelMap::len),
        &dev,
        None,
        None,
    )?;
    task.net.freeze()?; // inference only: nothing recorded for a backward
                        // After the model's settings are checked, so that a wrong flag is named first.
    if texts
        .iter()
        .all(|(t, p, _)| t.trim().is_empty() && p.as_deref().is_none_or(|p| p.trim().is_empty()))
    {
        bail!("{from}: no texts to predict (no line holds any text)");
    }
    let data = EncodedDataset {
        task: TaskKind::Classify,
        items: encoded
            .into_iter()
            .map(|e| EncodedItem {
                input_ids: e.ids,
                token_type_ids: e.type_ids,
                label: Some(0),
            })
            .collect(),
        pad_id: tok.pad_id(),
    };
    // Batched by length, as `eval` batches (padding is small), written in input order.
    let mut out: Vec<Option<String>> = vec![None; data.len()];
    for chunk in epoch_batches(&data.lengths(), a.batch_size, 0, 0, BatchOrder::EVAL)? {
        let batch = data.batch(&chunk, &dev)?;
        let probs = task.net.probabilities(&batch)?;
        for (&i, p) in chunk.iter().zip(probs) {
            if p.iter().any(|v| !v.is_finite()) {
                bail!(
                    "{from}:{}: the model's class probabilities are not finite (diverged weights, or a \
                     setting that overflows such as a huge LoRA alpha)",
                    texts[i].2
                );
            }
            let (best, score) =
                p.iter().enumerate().fold(
                    (0usize, f32::MIN),
                    |acc, (j, &v)| if v > acc.1 { (j, v) } else { acc },
                );
            let label = labels
                .as_ref()
                .and_then(|l| l.label(best as u32))
                .map(str::to_string)
                .unwrap_or_else(|| best.to_string());
            let rec = serde_json::json!({"text": texts[i].0, "label": label, "id": best, "score": score});
            out[i] = Some(rec.to_string());
        }
    }
    let mut lines = String::new();
    for line in out.into_iter().flatten() {
        lines.push_str(&line);
        lines.push('\n');
    }
    match output {
        Some(p) => write_output_file(p, lines.as_bytes())?,
        None => crate::emit(&lines)?,
    }
    Ok(())
}

/// Whether `text` is what `predict --output` writes, line for line: a JSON object with exactly
/// `id` (a class index), `label` (a string), `score` (a probability) and `text` (a string),
/// serialised as this command serialises it. A user's own JSONL with those keys (another key
/// order, spacing, a rating for a score) is not.
fn is_predictions(text: &str) -> bool {
    let ours = |line: &str| -> Option<()> {
        let mut v: serde_json::Value = serde_json::from_str(line).ok()?;
        // The score was an f32 written as f64; parsed back it can be an ulp off, which the f32
        // it came from recovers (so the line prints as it was written).
        let f32_score = v.get("score")?.as_f64()? as f32;
        v["score"] = serde_json::json!(f32_score);
        let o = v.as_object()?;
        let score = o.get("score")?.as_f64()?;
        let shape = o.len() == 4
            && o.get("id")?.is_u64()
            && o.get("label")?.is_string()
            && o.get("text")?.is_string()
            && (0.0..=1.0).contains(&score);
        (shape && serde_json::to_string(&v).ok().as_deref() == Some(line)).then_some(())
    };
    let mut lines = text.lines().peekable();
    lines.peek().is_some() && lines.all(|l| ours(l).is_some())
}

#[cfg(test)]
mod tests {
    use super::is_predictions;

    /// Scores are f32s written as f64s; serde_json (without float_roundtrip) parses some of
    /// their 17 digits an ulp off, and predict refused its own earlier output.
    #[test]
    fn predicts_own_lines_are_recognised_whatever_their_score() {
        let ours = r#"{"id":0,"label":"a","score":0.41580626368522644,"text":"x"}"#;
        assert!(is_predictions(ours));
        for users in [
            r#"{"id":0,"label":"a","score":4.5,"text":"x"}"#,
            r#"{"id":0, "label":"a","score":0.5,"text":"x"}"#,
            r#"{"label":"a","id":0,"score":0.5,"text":"x"}"#,
            r#"[1, 2]"#,
        ] {
            assert!(!is_predictions(users), "{users}");
        }
    }
}
