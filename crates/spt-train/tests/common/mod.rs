//! Helpers shared by the CLI tests: run the binary as a user would, and the tiny fixture models
//! and data they run on.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Runs `spt-train args` (with `stdin` piped in, if given) and returns its output, whatever the
/// exit status.
pub fn run(args: &[&str], stdin: Option<&str>) -> Output {
    run_at(None, args, stdin)
}

/// [`run`] from the directory `cwd` (relative paths in `args` are read from there).
pub fn run_in(cwd: &Path, args: &[&str]) -> Output {
    run_at(Some(cwd), args, None)
}

fn run_at(cwd: Option<&Path>, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_spt-train"));
    c.args(args).env("RUST_LOG", "warn");
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("run spt-train");
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// [`run`], asserting success.
pub fn run_ok(args: &[&str], stdin: Option<&str>) -> Output {
    let o = run(args, stdin);
    assert!(
        o.status.success(),
        "spt-train {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// [`run`], asserting failure; returns stderr.
pub fn run_err(args: &[&str]) -> String {
    let o = run(args, None);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "spt-train {args:?} succeeded: {e}");
    assert!(e.contains("error:"), "spt-train {args:?}: no error line: {e}");
    e
}

/// The last line of stdout as JSON (finetune's summary).
pub fn last_json(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().expect("a summary line")).expect("JSON")
}

pub const WORDS: [&str; 12] = [
    "good", "bad", "great", "awful", "movie", "film", "the", "a", "was", "very", "story", "actor",
];

/// A fixture model copied with a word-level tokenizer.json (the fixtures ship none); `patch`
/// edits its config.json (e.g. to turn dropout on).
pub fn fixture_with(name: &str, root: &Path, patch: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../spt-models/tests/fixtures")
        .join(name);
    let dst = root.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("model.safetensors"), dst.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    patch(&mut cfg);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[PAD]", "[UNK]", "<|endoftext|>"]
        .iter()
        .chain(WORDS.iter())
        .enumerate()
    {
        vocab.insert((*w).to_string(), i.into());
    }
    // Cover the model's whole vocabulary (1000), so every sampled id decodes.
    for i in vocab.len()..1000 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dst.join("tokenizer.json"), tok.to_string()).unwrap();
    dst
}

/// [`fixture_with`] unchanged.
pub fn fixture(name: &str, root: &Path) -> PathBuf {
    fixture_with(name, root, |_| {})
}

/// 60 three-class reviews over 5 movies, under `header` (text, label and movie columns).
pub fn reviews_csv(dir: &Path, name: &str, header: &str) -> PathBuf {
    let mut rows = format!("{header}\n");
    for i in 0..60 {
        let (w, l) = [("good", "pos"), ("bad", "neg"), ("story", "neutral")][i % 3];
        rows.push_str(&format!("the {w} movie was very {w},{l},m{}\n", i % 5));
    }
    let path = dir.join(name);
    std::fs::write(&path, rows).unwrap();
    path
}

/// Removes the classification head (`classifier.*`) from `dir`'s model.safetensors: a base
/// model, whose runs initialise a head sized by their data.
pub fn drop_head(dir: &Path) {
    let path = dir.join("model.safetensors");
    let weights = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let headless: std::collections::HashMap<_, _> = weights
        .into_iter()
        .filter(|(k, _)| !k.starts_with("classifier."))
        .collect();
    candle_core::safetensors::save(&headless, &path).unwrap();
}

/// Every file under `dir` with its bytes, for byte-for-byte comparisons.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `finetune --model MODEL --train-file DATA --output-dir OUT --no-progress`, then `extra` (the
/// mode, steps, batch size a test wants).
pub fn finetune_args<'a>(model: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "finetune",
        "--model",
        model,
        "--train-file",
        data,
        "--output-dir",
        out,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    args
}
