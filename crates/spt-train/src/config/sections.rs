//! The config file's sections. A file groups the settings into `[data]`, `[optim]`, `[loop]`,
//! `[lora]`, `[spt]`, `[spt.attention]` and `[spt.ffn]` (the run's own settings, such as `model`
//! and `mode`, stay at the top); [`FinetuneConfig`](super::FinetuneConfig) stays one flat struct,
//! so the code reads `cfg.lr`. Flat files (every key at the top, as run directories written
//! before the sections hold) still load, and so does a mix; a setting given twice is an error.
//! `--set section.key=value` names a setting the same way.

use serde_json::{Map, Value};

/// `(field of FinetuneConfig, section, key in that section)`; a field not listed stays at the top.
pub const LAYOUT: &[(&str, &str, &str)] = &[
    ("train_files", "data", "train_files"),
    ("validation_files", "data", "validation_files"),
    ("validation_split", "data", "validation_split"),
    ("split_by", "data", "split_by"),
    ("format", "data", "format"),
    ("text_column", "data", "text_column"),
    ("text_pair_column", "data", "text_pair_column"),
    ("label_column", "data", "label_column"),
    ("drop_labels", "data", "drop_labels"),
    ("label_map", "data", "label_map"),
    ("max_length", "data", "max_length"),
    ("block_size", "data", "block_size"),
    ("epochs", "optim", "epochs"),
    ("max_steps", "optim", "max_steps"),
    ("batch_size", "optim", "batch_size"),
    ("eval_batch_size", "optim", "eval_batch_size"),
    ("grad_accum", "optim", "grad_accum"),
    ("lr", "optim", "lr"),
    ("warmup_steps", "optim", "warmup_steps"),
    ("warmup_ratio", "optim", "warmup_ratio"),
    ("schedule", "optim", "schedule"),
    ("weight_decay", "optim", "weight_decay"),
    ("adam_beta1", "optim", "adam_beta1"),
    ("adam_beta2", "optim", "adam_beta2"),
    ("adam_eps", "optim", "adam_eps"),
    ("max_grad_norm", "optim", "max_grad_norm"),
    ("eval_every", "loop", "eval_every"),
    ("save_every", "loop", "save_every"),
    ("keep_last", "loop", "keep_last"),
    ("log_every", "loop", "log_every"),
    ("progress", "loop", "progress"),
    ("lora_rank", "lora", "rank"),
    ("lora_alpha", "lora", "alpha"),
    ("lora_dropout", "lora", "dropout"),
    ("modules_to_save", "lora", "modules_to_save"),
    ("calibration_batches", "spt", "calibration_batches"),
    ("attn_k", "spt.attention", "k"),
    ("attn_k_fraction", "spt.attention", "k_fraction"),
    ("attn_tile", "spt.attention", "tile"),
    ("pq_subspaces", "spt.attention", "pq_subspaces"),
    ("pq_codewords", "spt.attention", "pq_codewords"),
    ("pq_refresh_every", "spt.attention", "pq_refresh_every"),
    ("ffn_blocks", "spt.ffn", "blocks"),
    ("ffn_top_k", "spt.ffn", "top_k"),
    ("ffn_units", "spt.ffn", "units"),
    ("ffn_correction", "spt.ffn", "correction"),
    ("router_aux_weight", "spt.ffn", "router_aux_weight"),
    ("router_lr_scale", "spt.ffn", "router_lr_scale"),
];

/// The section names (a dotted path for a nested one).
fn is_section(path: &str) -> bool {
    LAYOUT
        .iter()
        .any(|(_, s, _)| *s == path || s.starts_with(&format!("{path}.")))
}

/// The flat field of a sectioned `path` (`section.key`), if any.
pub fn field_of(path: &str) -> Option<&'static str> {
    LAYOUT
        .iter()
        .find(|(_, s, k)| format!("{s}.{k}") == path)
        .map(|(f, _, _)| *f)
}

/// The `section.key` paths a mistyped `--set` name most likely meant: a key or a flat field
/// name given without its section (`lr`, `ffn_top_k`), or a key put in the wrong section.
pub fn suggest(path: &str) -> Vec<String> {
    let last = path.rsplit('.').next().unwrap_or(path);
    LAYOUT
        .iter()
        .filter(|(f, _, k)| *k == last || *f == last)
        .map(|(_, s, k)| format!("{s}.{k}"))
        .filter(|p| p != path)
        .collect()
}

/// `section.key` of a flat field (its own name at the top level).
pub fn path_of(field: &str) -> String {
    match LAYOUT.iter().find(|(f, _, _)| *f == field) {
        Some((_, s, k)) => format!("{s}.{k}"),
        None => field.to_string(),
    }
}

/// The sectioned form of a flat settings object (null values, i.e. unset options, left out).
pub fn nest(flat: &Map<String, Value>) -> Value {
    let mut root = Map::new();
    for (field, v) in flat {
        if v.is_null() {
            continue;
        }
        let path = path_of(field);
        let mut parts: Vec<&str> = path.split('.').collect();
        let key = parts.pop().unwrap_or(field);
        let mut table = &mut root;
        for p in parts {
            let entry = table
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            table = match entry {
                Value::Object(m) => m,
                _ => unreachable!("set to an object just above"),
            };
        }
        table.insert(key.to_string(), v.clone());
    }
    Value::Object(root)
}

/// The flat form of a settings object whose keys are sectioned, flat or both. Errors name an
/// unknown `section.key` or a setting given twice.
pub fn flatten(root: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut flat = Map::new();
    fn put(field: String, shown: String, v: Value, flat: &mut Map<String, Value>) -> Result<(), String> {
        if flat.insert(field.clone(), v).is_some() {
            return Err(format!(
                "`{shown}` is given twice (as `{field}` and as `{}`)",
                path_of(&field)
            ));
        }
        Ok(())
    }
    fn walk(
        prefix: &str,
        table: Map<String, Value>,
        out: &mut Vec<(String, String, Value)>,
    ) -> Result<(), String> {
        for (k, v) in table {
            let path = format!("{prefix}.{k}");
            match (v, is_section(&path)) {
                (Value::Object(m), true) => walk(&path, m, out)?,
                (v, _) => match field_of(&path) {
                    Some(f) => out.push((f.to_string(), path, v)),
                    None => return Err(format!("unknown setting `{path}`")),
                },
            }
        }
        Ok(())
    }
    for (k, v) in root {
        match v {
            Value::Object(m) if is_section(&k) => {
                let mut found = Vec::new();
                walk(&k, m, &mut found)?;
                for (field, path, v) in found {
                    put(field, path, v, &mut flat)?;
                }
            }
            v => put(k.clone(), k, v, &mut flat)?,
        }
    }
    Ok(flat)
}

/// Parses a `--set` value as a TOML value (`0.001`, `true`, `"text"`, `[1, 2]`); anything that is
/// not one is taken as a bare string (`--set data.format=csv`). A NaN or infinite number is an
/// error: the settings pass through JSON, which has neither, and would silently drop it.
pub fn parse_value(text: &str) -> Result<Value, String> {
    let Some(v) = toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
    else {
        return Ok(Value::String(text.to_string()));
    };
    if let Some(at) = non_finite(&v, "") {
        return Err(format!("{text}{at} is not a finite number"));
    }
    serde_json::to_value(v).map_err(|e| e.to_string())
}

/// Where `v` holds a NaN or infinite float: `""` for `v` itself, else its dotted key path
/// (`.lr`); `None` if nowhere.
pub fn non_finite(v: &toml::Value, at: &str) -> Option<String> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => Some(at.to_string()),
        toml::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| non_finite(x, &format!("{at}[{i}]"))),
        toml::Value::Table(t) => t.iter().find_map(|(k, x)| non_finite(x, &format!("{at}.{k}"))),
        _ => None,
    }
}
