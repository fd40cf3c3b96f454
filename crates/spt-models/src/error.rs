//! The error type of spt-models: every bad checkpoint, config or input names the thing at fault.

use std::path::PathBuf;

/// Errors from loading or running a model. Converts to and from [`candle_core::Error`], so it
/// composes with candle code in both directions.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor the model needs is not in the checkpoint (under any of the names tried).
    #[error("missing tensor '{name}' in the checkpoint (tried: {})", tried.join(", "))]
    MissingTensor { name: String, tried: Vec<String> },

    /// A checkpoint tensor has the wrong shape.
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A checkpoint file cannot be read or parsed (corrupt, truncated, unknown format).
    #[error("cannot read checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    /// Saving weights failed (a full disk, a folder without write permission).
    #[error("cannot write {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },

    /// A config file cannot be read or parsed.
    #[error("bad config {}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },

    /// A config value that is valid JSON but that we don't support or that is inconsistent.
    #[error("invalid config: {field} = {value}: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        reason: String,
    },

    /// `position_embedding_type` other than "absolute".
    #[error("unsupported position_embedding_type '{0}' (only \"absolute\" is supported)")]
    UnsupportedPositionEmbedding(String),

    /// `hidden_act` / `activation_function` we don't know.
    #[error("unknown activation '{0}' (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu)")]
    UnknownActivation(String),

    /// A sequence longer than the position table.
    #[error("sequence length {len} exceeds {field} = {max}")]
    SequenceTooLong {
        len: usize,
        max: usize,
        field: &'static str,
    },

    /// A token id outside `0..vocab_size` (or a token-type id outside `0..type_vocab_size`).
    #[error("{what} id {id} is out of range: {field} = {size}")]
    TokenOutOfRange {
        what: &'static str,
        id: i64,
        size: usize,
        field: &'static str,
    },

    /// An input tensor of the wrong rank, shape or dtype.
    #[error("bad input '{name}': {reason}")]
    BadInput { name: &'static str, reason: String },

    /// A LoRA merge-state error (already merged / not merged).
    #[error("{0}")]
    Lora(String),

    /// Any other candle error, from inside a forward or backward pass.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<ModelError> for candle_core::Error {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Candle(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Result with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
