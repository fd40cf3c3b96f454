//! From a [`FinetuneConfig`] to tokenised train / validation sets: the model-independent part
//! of `spt-train finetune` and `eval`.

use std::path::{Path, PathBuf};

use crate::config::FinetuneConfig;
use crate::data::{
    encode_classification, pack_lm, raw_rows_fingerprint, read_classification_counted, read_lm_texts,
    split_train_validation, ClassificationData, ColumnSpec, DataError, DataFingerprint, DataFormat,
    EncodedDataset, LabelMap, TaskKind, TextTokenizer,
};
use crate::Result;

/// Tokenised data for a run.
#[derive(Debug)]
pub struct PreparedData {
    pub train: EncodedDataset,
    pub validation: Option<EncodedDataset>,
    /// The rows held out of the training files (a `validation_split`), as a checkpoint records
    /// them for `eval --split validation` to find again: a classifier's raw rows (text, pair,
    /// label), whatever the tokenisation; an LM's held-out blocks (they follow the block size).
    pub held_out: Option<DataFingerprint>,
    /// Classification only.
    pub labels: Option<LabelMap>,
}

/// A model's `config.json` as JSON (a byte-order mark skipped, as the model loader does), or
/// `None` when it does not read: loading the model names that.
pub fn model_config(model_dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(model_dir.join("config.json")).ok()?;
    serde_json::from_str(crate::data::strip_bom(&text)).ok()
}

/// The longest input a model takes, from its `config.json` (`max_position_embeddings`,
/// `n_positions` or `n_ctx`).
pub fn model_max_length(model_dir: &Path) -> Option<usize> {
    max_positions(&model_config(model_dir)?)
}

/// The positions a parsed `config.json` allows.
fn max_positions(config: &serde_json::Value) -> Option<usize> {
    ["max_position_embeddings", "n_positions", "n_ctx"]
        .iter()
        .find_map(|k| config.get(*k).and_then(|x| x.as_u64()))
        .map(|x| x as usize)
}

/// Checks tokenised data against the model in `model_dir` (its `config.json`): every token id
/// inside the vocabulary (another model's tokenizer gives ids past it) and every sequence within
/// the positions (`--block-size` of an LM run is not capped). Run before anything is written:
/// the model would otherwise fail at its first forward, inside a half-made run.
pub fn check_data_fits_model(data: &PreparedData, model_dir: &Path) -> Result<()> {
    let sets = || std::iter::once(&data.train).chain(data.validation.as_ref());
    check_ids_fit_model(
        sets().flat_map(|s| s.items.iter().map(|i| &i.input_ids[..])),
        model_dir,
    )?;
    check_type_ids_fit_model(
        sets().flat_map(|s| s.items.iter().map(|i| &i.token_type_ids[..])),
        model_dir,
    )
}

/// The token type ids a tokenizer gives (its post-processor's `type_id`s) against the model's
/// `type_vocab_size` (BERT; a model without one takes none): found before a run folder is made,
/// not at the first step.
pub fn check_type_ids_fit_model<'a>(
    seqs: impl IntoIterator<Item = &'a [u32]>,
    model_dir: &Path,
) -> Result<()> {
    let config = model_dir.join("config.json");
    let Some(types) = model_config(model_dir).and_then(|v| v.get("type_vocab_size").and_then(|x| x.as_u64()))
    else {
        return Ok(());
    };
    let max = seqs.into_iter().filter_map(|s| s.iter().copied().max()).max();
    match max {
        Some(t) if t as u64 >= types => Err(crate::Error::Msg(format!(
            "the tokenizer gives token type id {t}, but the model has {types} token types \
             (type_vocab_size in {}): use the model's own tokenizer",
            config.display()
        ))),
        _ => Ok(()),
    }
}

/// [`check_data_fits_model`] for any token id sequences (eval's, predict's and generate's inputs).
pub fn check_ids_fit_model<'a>(seqs: impl IntoIterator<Item = &'a [u32]>, model_dir: &Path) -> Result<()> {
    let config = model_dir.join("config.json");
    let Some(v) = model_config(model_dir) else {
        return Ok(()); // loading the model names a missing or unreadable config
    };
    let (mut max_id, mut longest) = (None::<u32>, 0usize);
    for ids in seqs {
        max_id = max_id.max(ids.iter().copied().max());
        longest = longest.max(ids.len());
    }
    if let (Some(id), Some(vocab)) = (max_id, v.get("vocab_size").and_then(|x| x.as_u64())) {
        if id as u64 >= vocab {
            return Err(crate::Error::Msg(format!(
                "the tokenizer gives token id {id}, but the model's vocabulary has {vocab} \
                 (vocab_size in {}): use the model's own tokenizer",
                config.display()
            )));
        }
    }
    if let Some(max) = max_positions(&v) {
        if longest > max {
            return Err(crate::Error::Msg(format!(
                "sequences of {longest} tokens, but the model takes at most {max} positions ({}): \
                 use a --block-size (LM) or --max-length of at most {max}",
                config.display()
            )));
        }
    }
    Ok(())
}

/// A classifier needs two labels in its training rows (`finetune`; an evaluation file may hold
/// one class).
pub fn check_training_labels(cfg: &FinetuneConfig, data: &PreparedData) -> Result<()> {
    let Some(labels) = &data.labels else {
        return Ok(());
    };
    if labels.len() >= 2 {
        return Ok(());
    }
    let held_out = if cfg.validation_files.is_empty() && cfg.validation_split > 0.0 {
        format!(" after holding out validation_split = {}", cfg.validation_split)
    } else {
        String::new()
    };
    let files: Vec<String> = cfg.train_files.iter().map(|p| p.display().to_string()).collect();
    Err(DataError::Invalid(format!(
        "{}: the training rows have one label, {:?} (column `{}`{held_out}): a classifier \
         needs at least two; check --label-column, --drop-label and --label-map",
        files.join(", "),
        labels.labels(),
        cfg.label_column
    ))
    .into())
}

/// The tokenizer: `cfg.tokenizer` (a directory or a `tokenizer.json`) or the model directory.
/// Truncation length: `cfg.max_length`, capped by the model's maximum, else the model's maximum,
/// else 512.
pub fn load_tokenizer(cfg: &FinetuneConfig, model_dir: &Path) -> Result<TextTokenizer> {
    open_tokenizer(cfg.tokenizer.as_deref(), model_dir, cfg.max_length)
}

/// The tokenizer in `src` (a directory or a tokenizer.json file; default: `model_dir`) for texts
/// truncated to `max_length` tokens, capped at the model's positions (default: that cap, else
/// 512).
pub fn open_tokenizer(
    src: Option<&Path>,
    model_dir: &Path,
    max_length: Option<usize>,
) -> Result<TextTokenizer> {
    let model_max = model_max_length(model_dir);
    let max_length = match (max_length, model_max) {
        (Some(m), Some(cap)) if m > cap => {
            tracing::warn!("max_length {m} exceeds the model's {cap} positions; using {cap}");
            cap
        }
        (Some(m), _) => m,
        (None, Some(cap)) => cap,
        (None, None) => 512,
    };
    let src = src.unwrap_or(model_dir);
    let tok = if src.is_dir() {
        TextTokenizer::from_model_dir(src, max_length)?
    } else {
        TextTokenizer::from_file(src, max_length)?
    };
    Ok(tok)
}

/// Reads `files`, adding to `dropped` the rows that each of `cfg.drop_labels` removed.
fn read_all(
    cfg: &FinetuneConfig,
    files: &[PathBuf],
    dropped: &mut [usize],
) -> Result<Vec<ClassificationData>> {
    let cols = cfg.columns();
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let (data, n) = read_classification_counted(f, cfg.format, &cols, &cfg.drop_labels)?;
        dropped.iter_mut().zip(n).for_each(|(d, n)| *d += n);
        out.push(data);
    }
    Ok(out)
}

/// Refuses a seeded split that leaves a label only on the validation side: the model would be
/// scored on a class it never saw, and the label map (built from the training rows) lacks it.
fn check_split_labels(
    cfg: &FinetuneConfig,
    train: &[ClassificationData],
    valid: &[ClassificationData],
) -> Result<()> {
    let seen: std::collections::HashSet<&str> = train
        .iter()
        .flat_map(|p| p.examples.iter().filter_map(|e| e.label.as_deref()))
        .collect();
    for part in valid {
        if let Some((e, label)) = part
            .examples
            .iter()
            .find_map(|e| e.label.as_deref().filter(|l| !seen.contains(l)).map(|l| (e, l)))
        {
            let by = cfg
                .split_by
                .as_ref()
                .map(|c| format!(", split_by = {c}"))
                .unwrap_or_default();
            return Err(DataError::Invalid(format!(
                "{}: line {}: label `{label}` falls only on the validation side of the split \
                 (validation_split = {}, seed = {}{by}), so the model could never learn it; use \
                 another --seed or --validation-split, a --validation-file, or --drop-label {label:?}",
                part.path.display(),
                e.line,
                cfg.validation_split,
                cfg.seed
            ))
            .into());
        }
    }
    Ok(())
}

fn concat(parts: Vec<EncodedDataset>) -> Option<EncodedDataset> {
    let mut it = parts.into_iter();
    let mut first = it.next()?;
    for p in it {
        first.items.extend(p.items);
    }
    Some(first)
}

/// An LM's texts: a plain text file line by line, and the text column (`text_column`) of a CSV,
/// TSV or JSONL file, one row a line (read line by line, such a file trained on its keys, quotes
/// and labels).
#[allow(clippy::type_complexity)]
fn lm_texts(cfg: &FinetuneConfig, paths: &[PathBuf]) -> Result<Vec<(PathBuf, Vec<(u64, String)>)>> {
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        match cfg.format.or_else(|| DataFormat::from_path(p).ok()) {
            None => out.extend(read_lm_texts(std::slice::from_ref(p))?),
            Some(format) => {
                let cols = ColumnSpec {
                    text: cfg.text_column.clone(),
                    text_pair: None,
                    label: None,
                    group: None,
                };
                let rows = read_classification_counted(p, Some(format), &cols, &[])?.0;
                out.push((
                    p.clone(),
                    rows.examples.into_iter().map(|e| (e.line, e.text)).collect(),
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(DataError::Invalid("no LM text files given".into()).into());
    }
    Ok(out)
}

/// Reads, splits, label-maps and tokenises the data `cfg` names. With `output_dir` the label
/// mapping is written there as `labels.json`.
pub fn prepare_data(
    cfg: &FinetuneConfig,
    tok: &TextTokenizer,
    output_dir: Option<&Path>,
) -> Result<PreparedData> {
    prepare(cfg, tok, output_dir, None)
}

/// [`prepare_data`] with the classes given (e.g. the ones a checkpoint's head was trained on),
/// over `cfg.label_map` and the data's own; a classification row whose label is not among them
/// is an error.
pub fn prepare_data_with_labels(
    cfg: &FinetuneConfig,
    tok: &TextTokenizer,
    labels: &LabelMap,
) -> Result<PreparedData> {
    prepare(cfg, tok, None, Some(labels))
}

fn prepare(
    cfg: &FinetuneConfig,
    tok: &TextTokenizer,
    output_dir: Option<&Path>,
    given: Option<&LabelMap>,
) -> Result<PreparedData> {
    match cfg.task {
        TaskKind::Classify => {
            let mut dropped = vec![0; cfg.drop_labels.len()];
            let train_parts = read_all(cfg, &cfg.train_files, &mut dropped)?;
            let (train_parts, valid_parts) = if !cfg.validation_files.is_empty() {
                let valid = read_all(cfg, &cfg.validation_files, &mut dropped)?;
                (train_parts, valid)
            } else if cfg.validation_split > 0.0 {
                let mut tr = Vec::new();
                let mut va = Vec::new();
                for part in train_parts {
                    let (a, b) =
                        split_train_validation(part, cfg.validation_split, cfg.seed, cfg.split_by.is_some())?;
                    tr.push(a);
                    va.push(b);
                }
                if cfg.label_map.is_none() && given.is_none() {
                    check_split_labels(cfg, &tr, &va)?;
                }
                (tr, va)
            } else {
                (train_parts, Vec::new())
            };
            for (label, n) in cfg.drop_labels.iter().zip(&dropped) {
                if *n == 0 {
                    tracing::warn!(
                        "--drop-label {label:?} matches no row's label (column `{}`); check its spelling",
                        cfg.label_column
                    );
                }
            }
            let labels = match (given, &cfg.label_map) {
                (Some(l), _) => l.clone(),
                (None, Some(p)) => LabelMap::load(p)?,
                (None, None) => {
                    let mut all = std::collections::BTreeSet::new();
                    for p in &train_parts {
                        all.extend(p.examples.iter().filter_map(|e| e.label.clone()));
                    }
                    let map = LabelMap::new(all.into_iter().collect())?;
                    for (a, b) in map.case_twins() {
                        tracing::warn!(
                            "labels {a:?} and {b:?} (column `{}`) differ only in case: they are two \
                             classes; spell them one way in the data if they are one",
                            cfg.label_column
                        );
                    }
                    map
                }
            };
            if let Some(dir) = output_dir {
                labels.save(&dir.join("labels.json"))?;
            }
            let enc = |parts: &[ClassificationData]| -> Result<Vec<EncodedDataset>> {
                parts
                    .iter()
                    .map(|p| Ok(encode_classification(p, tok, &labels)?))
                    .collect()
            };
            let train = concat(enc(&train_parts)?)
                .ok_or_else(|| DataError::Invalid("no training files given".into()))?;
            let validation = concat(enc(&valid_parts)?);
            let held_out = (cfg.validation_files.is_empty() && validation.is_some())
                .then(|| raw_rows_fingerprint(&valid_parts));
            if tok.truncated_count() > 0 {
                tracing::warn!(
                    "{} texts were truncated to {} tokens",
                    tok.truncated_count(),
                    tok.max_length()
                );
            }
            Ok(PreparedData {
                train,
                validation,
                held_out,
                labels: Some(labels),
            })
        }
        TaskKind::Lm => {
            let texts = lm_texts(cfg, &cfg.train_files)?;
            let mut train = pack_lm(&texts, tok, cfg.block_size)?;
            let validation = if !cfg.validation_files.is_empty() {
                Some(pack_lm(
                    &lm_texts(cfg, &cfg.validation_files)?,
                    tok,
                    cfg.block_size,
                )?)
            } else if cfg.validation_split > 0.0 {
                // Hold out the last blocks: contiguous text, so no overlap with training.
                let n_val = ((train.items.len() as f64) * cfg.validation_split).ceil() as usize;
                if n_val >= train.items.len() {
                    return Err(DataError::Invalid(format!(
                        "only {} blocks of {} tokens: too few to hold out {}",
                        train.items.len(),
                        cfg.block_size,
                        cfg.validation_split
                    ))
                    .into());
                }
                let items = train.items.split_off(train.items.len() - n_val);
                Some(EncodedDataset {
                    task: TaskKind::Lm,
                    items,
                    pad_id: train.pad_id,
                })
            } else {
                None
            };
            let held_out = cfg
                .validation_files
                .is_empty()
                .then(|| validation.as_ref().map(EncodedDataset::fingerprint))
                .flatten();
            Ok(PreparedData {
                train,
                validation,
                held_out,
                labels: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenize::tests::{tiny_bert_json, tiny_gpt2};

    #[test]
    fn classification_run_data_with_grouped_split() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("tokenizer.json"), tiny_bert_json()).unwrap();
        std::fs::write(model.join("config.json"), r#"{"max_position_embeddings": 6}"#).unwrap();
        let mut csv = String::from("category,text,movie_name,has_plot_and_reviews\n");
        for i in 0..60 {
            let (cat, text) = match i % 3 {
                0 => ("fresh", "the movie was great fun"),
                1 => ("rotten", "dull"),
                _ => ("plot", "a man is playing"),
            };
            csv.push_str(&format!("{cat},{text},Movie {},True\n", i % 12));
        }
        let data = dir.path().join("rt.csv");
        std::fs::write(&data, csv).unwrap();
        let cfg = FinetuneConfig {
            model: model.display().to_string(),
            train_files: vec![data],
            label_column: "category".into(),
            split_by: Some("movie_name".into()),
            drop_labels: vec!["plot".into()],
            validation_split: 0.25,
            max_length: Some(64),
            ..Default::default()
        };
        let tok = load_tokenizer(&cfg, &model).unwrap();
        assert_eq!(tok.max_length(), 6); // capped by the model
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let d = prepare_data(&cfg, &tok, Some(&out)).unwrap();
        let v = d.validation.unwrap();
        assert_eq!(d.train.len() + v.len(), 40);
        assert!(!v.is_empty() && v.len() < 20);
        assert!(d.train.items.iter().all(|i| i.input_ids.len() <= 6));
        assert_eq!(tok.truncated_count(), 20); // every "fresh" row: 5 words + [CLS] [SEP] > 6
        let labels = LabelMap::load(&out.join("labels.json")).unwrap();
        assert_eq!(labels.labels(), ["fresh", "rotten"]);

        // A label of one movie only: the seeds whose split sends that movie to validation are
        // refused, naming the label, its line and the split; the others train on it.
        let mut rare_csv = std::fs::read_to_string(&cfg.train_files[0]).unwrap();
        rare_csv.push_str("shocked,dull,Movie 0,True\nshocked,dull,Movie 0,True\n");
        let rare_path = dir.path().join("rare.csv");
        std::fs::write(&rare_path, rare_csv).unwrap();
        let (mut refused, mut kept) = (0, 0);
        for seed in 0..24 {
            let c = FinetuneConfig {
                train_files: vec![rare_path.clone()],
                seed,
                ..cfg.clone()
            };
            match prepare_data(&c, &tok, None) {
                Ok(d) => {
                    assert!(d.labels.unwrap().id("shocked").is_some());
                    kept += 1;
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("rare.csv: line 62")
                            && e.contains("`shocked`")
                            && e.contains("validation side")
                            && e.contains(&format!("seed = {seed}"))
                            && e.contains("split_by = movie_name"),
                        "{e}"
                    );
                    refused += 1;
                }
            }
        }
        assert!(refused > 0 && kept > 0, "{refused} {kept}");

        // Dropping every label but one leaves nothing to classify: refused, naming it.
        let one = FinetuneConfig {
            drop_labels: vec!["plot".into(), "rotten".into()],
            ..cfg
        };
        let d = prepare_data(&one, &tok, None).unwrap();
        let e = check_training_labels(&one, &d).unwrap_err().to_string();
        assert!(
            e.contains("rt.csv")
                && e.contains("one label")
                && e.contains("fresh")
                && e.contains("`category`"),
            "{e}"
        );
    }

    #[test]
    fn lm_run_data_holds_out_last_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let _ = tiny_gpt2(dir.path());
        let text = dir.path().join("t.txt");
        std::fs::write(&text, "Hello world\n".repeat(10)).unwrap();
        let cfg = FinetuneConfig {
            model: dir.path().display().to_string(),
            task: TaskKind::Lm,
            train_files: vec![text],
            block_size: 3,
            validation_split: 0.2,
            ..Default::default()
        };
        let tok = load_tokenizer(&cfg, dir.path()).unwrap();
        let d = prepare_data(&cfg, &tok, None).unwrap();
        // 10 × (Hello Ġworld Ċ) = 30 tokens = 10 blocks; 2 held out.
        assert_eq!(
            (d.train.len(), d.validation.as_ref().map(|v| v.len())),
            (8, Some(2))
        );
        assert_eq!(d.train.items[0].input_ids, vec![12, 17, 19]);
        assert!(d.labels.is_none());
        // The same texts as a JSONL file's text column (with a label beside them): the same
        // blocks; read line by line, the keys and labels used to be trained on.
        let jsonl = dir.path().join("t.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\": \"Hello world\", \"label\": \"x\"}\n".repeat(10),
        )
        .unwrap();
        let from_jsonl = prepare_data(
            &FinetuneConfig {
                train_files: vec![jsonl],
                ..cfg.clone()
            },
            &tok,
            None,
        )
        .unwrap();
        // 10 texts joined by newlines: 29 tokens, 9 blocks, 2 held out; no key or label in them.
        let held = from_jsonl.validation.as_ref().unwrap();
        let blocks = from_jsonl.train.items.iter().chain(&held.items);
        let ids: Vec<&[u32]> = blocks.map(|b| &b.input_ids[..]).collect();
        assert_eq!(ids, vec![&[12u32, 17, 19][..]; 9]);
        assert_eq!(from_jsonl.train.len(), 7);
    }
}
