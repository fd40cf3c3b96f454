//! Data: readers, label maps, splits, tokenisation, LM packing and batching.
//!
//! - [`read`]: CSV / TSV / JSONL classification files, [`LabelMap`], seeded (grouped) splits,
//!   plain-text LM files.
//! - [`tokenize`]: [`TextTokenizer`] over the `tokenizers` crate (BERT WordPiece, GPT-2 BPE) with
//!   truncation and a one-time warning.
//! - [`batch`]: encoded datasets, LM block packing, length-bucketed batch order and [`Batch`]
//!   tensors.
//!
//! Every error names the file, line and column it comes from ([`DataError`]).

pub mod batch;

/// `text` without a leading UTF-8 byte-order mark (Notepad and PowerShell write one; JSON has
/// none, and TOML and CSV readers skip it).
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

pub mod read;
pub mod tokenize;

use std::path::PathBuf;

pub use batch::{
    encode_classification, epoch_batches, make_batch, pack_lm, raw_rows_fingerprint, Batch, BatchOrder,
    DataFingerprint, EncodedDataset, EncodedItem,
};
pub use read::{
    read_classification, read_classification_counted, read_lm_texts, split_train_validation,
    ClassificationData, ColumnSpec, DataFormat, LabelMap, RawExample,
};
pub use tokenize::TextTokenizer;

/// What a dataset is for: sequence classification or causal language modelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Classify,
    Lm,
}

/// A data error, naming the file, line and column where that applies.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {error}", if path.as_os_str().is_empty() { "(an empty path)".into() } else { path.display().to_string() })]
    Io {
        path: PathBuf,
        // Named `error`, not `source`: shown in the message, not chained (no double printing).
        error: std::io::Error,
    },
    /// `detail` empty: the file holds no rows at all; else what left none.
    #[error("{}: {}", path.display(), if detail.is_empty() { "the file is empty (no data rows)".to_string() } else { format!("no data rows{detail}") })]
    Empty { path: PathBuf, detail: String },
    #[error("{}: line {line}: missing column `{column}` (columns: {available})", path.display())]
    MissingColumn {
        path: PathBuf,
        line: u64,
        column: String,
        available: String,
    },
    #[error("{}: line {line}, column `{column}`: label `{label}` is not in the label mapping (known: {known})", path.display())]
    UnknownLabel {
        path: PathBuf,
        line: u64,
        column: String,
        label: String,
        known: String,
    },
    #[error("{}: line {line}, column {column}: not valid UTF-8", path.display())]
    NonUtf8 {
        path: PathBuf,
        line: u64,
        column: String,
    },
    #[error("{}: line {line}: {msg}", path.display())]
    Parse { path: PathBuf, line: u64, msg: String },
    #[error("batch size must be at least 1, got 0")]
    ZeroBatchSize,
    #[error("tokenizer {source_name}: {msg}")]
    Tokenizer { source_name: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            error: source,
        }
    }
}
