//! Model resolution: a local directory, else a Hugging Face hub id from the cache or downloaded.

use std::path::{Path, PathBuf};

use super::ConfigError;

/// Is `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set to a true value?
pub fn hub_offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|k| {
        std::env::var(k).is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
    })
}

/// The hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => hf_hub::Cache::new(PathBuf::from(p)),
        None => hf_hub::Cache::from_env(),
    }
}

/// Files a model directory needs, and the tokenizer alternatives tried in order.
const REQUIRED_FILES: [&str; 2] = ["config.json", "model.safetensors"];
const TOKENIZER_SETS: [&[&str]; 3] = [&["tokenizer.json"], &["vocab.json", "merges.txt"], &["vocab.txt"]];

/// A local directory as is; otherwise a hub id looked up in the cache and, unless offline,
/// downloaded. Returns the directory holding `config.json`, `model.safetensors` and the
/// tokenizer files.
pub fn resolve_model(id_or_path: &str) -> Result<PathBuf, ConfigError> {
    resolve_model_with(id_or_path, &hub_cache(), hub_offline())
}

/// [`resolve_model`] with an explicit cache and offline switch.
pub fn resolve_model_with(
    id_or_path: &str,
    cache: &hf_hub::Cache,
    offline: bool,
) -> Result<PathBuf, ConfigError> {
    let err = |msg: String| ConfigError::Model {
        id: id_or_path.to_string(),
        msg,
    };
    let p = Path::new(id_or_path);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let looks_like_path =
        id_or_path.starts_with(['.', '/', '~']) || id_or_path.matches('/').count() > 1 || p.is_file();
    if looks_like_path {
        return Err(err(
            "is not a directory (a model directory needs config.json and model.safetensors)".into(),
        ));
    }
    let err = |msg: String| err(msg + &mistyped_path_hint(p));
    let repo = cache.model(id_or_path.to_string());
    let cached: Option<Vec<PathBuf>> = REQUIRED_FILES.iter().map(|f| repo.get(f)).collect();
    if let Some(files) = cached {
        if let Some(dir) = files[0].parent() {
            return Ok(dir.to_path_buf());
        }
    }
    if offline {
        return Err(err(format!(
            "not a local directory and not in the Hugging Face cache at {}; HF_HUB_OFFLINE is set, so it cannot be \
             downloaded. Download it once with network access, or pass a local directory",
            cache.path().display()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .build()
        .map_err(|e| err(format!("cannot start the hub client: {e}")))?;
    let remote = api.model(id_or_path.to_string());
    let mut dir = None;
    for f in REQUIRED_FILES {
        let path = remote
            .get(f)
            .map_err(|e| err(format!("cannot download {f}: {e}")))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    for set in TOKENIZER_SETS {
        if set.iter().all(|f| remote.get(f).is_ok()) {
            break;
        }
    }
    dir.ok_or_else(|| err("the hub returned no file paths".into()))
}

/// `owner/name` is a hub id, unless `owner` is a local folder: then the user may have mistyped a
/// path, which is worth saying beside the hub's own error (only then is the folder read).
fn mistyped_path_hint(p: &Path) -> String {
    let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty() && d.is_dir()) else {
        return String::new();
    };
    let mut models: Vec<String> = std::fs::read_dir(d)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("config.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    models.sort();
    let held = if models.is_empty() {
        String::new()
    } else {
        format!(" (it holds the model directories {})", models.join(", "))
    };
    format!(
        ". A local folder {} exists, and has no {}{held}: a mistyped local path?",
        d.display(),
        p.file_name().unwrap_or_default().to_string_lossy()
    )
}
