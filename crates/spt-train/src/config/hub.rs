//! Model resolution: a local directory, else a Hugging Face hub id from the cache or downloaded.

use std::path::{Path, PathBuf};

use spt_models::weights::{shard_files, CHECKPOINT_FILES};

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

/// Where hub ids are looked up, read from the environment as `huggingface_hub` reads it.
#[derive(Clone, Debug)]
pub struct Hub {
    /// The local cache ([`hub_cache`]).
    pub cache: hf_hub::Cache,
    /// The server: `HF_ENDPOINT` (a mirror), else `https://huggingface.co`.
    pub endpoint: String,
    /// No downloads, cache only ([`hub_offline`]).
    pub offline: bool,
    /// `HF_TOKEN`, for private and gated repositories; `None`: the token file of the cache's
    /// parent folder (`huggingface-cli login`), if any.
    pub token: Option<String>,
}

impl Hub {
    /// `HF_HUB_CACHE` / `HF_HOME`, `HF_ENDPOINT` and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        Self {
            cache: hub_cache(),
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .map(|e| e.trim_end_matches('/').to_string())
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "https://huggingface.co".into()),
            offline: hub_offline(),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()),
        }
    }
}

const TOKENIZER_SETS: [&[&str]; 3] = [&["tokenizer.json"], &["vocab.json", "merges.txt"], &["vocab.txt"]];

/// A local directory as is; otherwise a hub id looked up in the cache and, unless offline,
/// downloaded. Returns the directory holding `config.json`, the checkpoint (`model.safetensors`,
/// sharded safetensors with their index, or `pytorch_model.bin`) and the tokenizer files.
pub fn resolve_model(id_or_path: &str) -> Result<PathBuf, ConfigError> {
    resolve_model_with(id_or_path, &Hub::from_env())
}

/// [`resolve_model`] with an explicit cache, endpoint and offline switch.
pub fn resolve_model_with(id_or_path: &str, hub: &Hub) -> Result<PathBuf, ConfigError> {
    let err = |msg: String| ConfigError::Model {
        id: id_or_path.to_string(),
        msg,
    };
    if id_or_path.trim().is_empty() {
        return Err(err(
            "is empty: give a model directory or a Hugging Face hub id (e.g. sentence-transformers/all-MiniLM-L6-v2)".into(),
        ));
    }
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
    if let Some(dir) = cached_model(&hub.cache.model(id_or_path.to_string())) {
        return Ok(dir);
    }
    if hub.offline {
        return Err(err(format!(
            "not a local directory, and the Hugging Face cache at {} holds no whole copy of it (config.json and \
             a checkpoint); HF_HUB_OFFLINE is set, so it cannot be downloaded. Download it once with network \
             access, or pass a local directory",
            hub.cache.path().display()
        )));
    }
    let mut builder =
        hf_hub::api::sync::ApiBuilder::from_cache(hub.cache.clone()).with_endpoint(hub.endpoint.clone());
    if hub.token.is_some() {
        builder = builder.with_token(hub.token.clone());
    }
    let api = builder
        .build()
        .map_err(|e| err(format!("cannot start the hub client: {e}")))?;
    let info = api
        .model(id_or_path.to_string())
        .info()
        .map_err(|e| err(format!("cannot list its files on {}: {e}", hub.endpoint)))?;
    // Every file from the commit that was listed: fetched by branch, files could come from two
    // commits (a cached config.json from an older one) and land in two snapshot folders.
    let remote = api.repo(hf_hub::Repo::with_revision(
        id_or_path.to_string(),
        hf_hub::RepoType::Model,
        info.sha.clone(),
    ));
    let listed: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let has = |f: &str| listed.iter().any(|l| l == f);
    // A repository can hold thousands of files: an error names the first few.
    let files = || {
        let shown: Vec<&str> = listed.iter().take(20).map(String::as_str).collect();
        let more = listed.len().saturating_sub(shown.len());
        shown.join(", ")
            + &if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
    };
    let fetch = |f: &str| {
        remote
            .get(f)
            .map_err(|e| err(format!("cannot download {f}: {e}")))
    };
    if !has("config.json") {
        return Err(err(format!(
            "the hub repository has no config.json (files: {})",
            files()
        )));
    }
    // The loader's first choice that the repository has (an index brings its shards below).
    let Some(weights) = CHECKPOINT_FILES.into_iter().find(|f| has(f)) else {
        return Err(err(format!(
            "the hub repository has none of {} (files: {}); sharded .bin checkpoints are not read",
            CHECKPOINT_FILES.join(", "),
            files()
        )));
    };
    let config = fetch("config.json")?;
    let weights_path = fetch(weights)?;
    if weights.ends_with(".index.json") {
        for shard in shard_names(&weights_path).map_err(err)? {
            fetch(&shard)?;
        }
    }
    if let Some(set) = TOKENIZER_SETS.iter().find(|set| set.iter().all(|f| has(f))) {
        for f in *set {
            fetch(f)?;
        }
        // The settings transformers applies over those files (casing, a prefix space).
        if has("tokenizer_config.json") {
            fetch("tokenizer_config.json")?;
        }
    }
    // The branch now names this commit, so later (and offline) lookups find this snapshot.
    hub.cache
        .model(id_or_path.to_string())
        .create_ref(&info.sha)
        .map_err(|e| err(format!("cannot record the downloaded commit in the cache: {e}")))?;
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| err("the hub returned no file paths".into()))?;
    if weights_path.parent() != Some(dir.as_path()) {
        return Err(err(format!(
            "the hub served config.json and {weights} from different commits ({} and {})",
            dir.display(),
            weights_path.parent().unwrap_or(Path::new("?")).display()
        )));
    }
    Ok(dir)
}

/// The cached snapshot that holds `config.json` and a whole checkpoint, if any: the first
/// checkpoint file present, the one `WeightSource::from_dir` reads, with every shard it names.
fn cached_model(repo: &hf_hub::CacheRepo) -> Option<PathBuf> {
    let dir = repo.get("config.json")?.parent()?.to_path_buf();
    let first = CHECKPOINT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())?;
    let whole = !first.to_string_lossy().ends_with(".index.json")
        || shard_names(&first).is_ok_and(|s| s.iter().all(|s| dir.join(s).is_file()));
    whole.then_some(dir)
}

/// The shard files a `*.safetensors.index.json` names, each a file of the repository itself (a
/// downloaded index decides what is fetched, and where it goes in the cache).
fn shard_names(index: &Path) -> Result<Vec<String>, String> {
    let shards = shard_files(index).map_err(|e| e.to_string())?;
    match shards
        .iter()
        .find(|f| f.is_empty() || f.contains("..") || f.starts_with('/'))
    {
        Some(f) => Err(format!(
            "{}: shard `{f}` is not a file name in the repository",
            index.display()
        )),
        None => Ok(shards),
    }
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
