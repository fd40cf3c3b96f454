//! placeholder
#[derive(Debug, thiserror::Error)]
pub enum ConfigError { #[error("{0}")] Invalid(String) }
