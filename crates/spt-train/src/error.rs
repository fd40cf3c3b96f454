//! The crate-wide error type. Every variant names the thing that went wrong.

use std::path::PathBuf;

/// Errors from spt-train's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Output(#[from] crate::output_dir::OutputError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Model(#[from] spt_models::ModelError),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        // Named `error`, not `source`: shown in the message, not chained (no double printing).
        error: std::io::Error,
    },
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
}

/// Result alias for spt-train.
pub type Result<T> = std::result::Result<T, Error>;
