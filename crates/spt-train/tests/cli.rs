//! The `spt-train` binary's handling of bad input, run as a user would.

use std::path::Path;
use std::process::{Command, Output};

fn spt_train(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_spt-train"));
    c.args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HUB_CACHE")
        .env_remove("TRANSFORMERS_OFFLINE")
        .env("RUST_LOG", "warn");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run spt-train")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A model directory with only a tiny byte-level BPE tokenizer (enough for the data side).
fn tiny_model(dir: &Path) -> String {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let tokens = [
        "H",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "ll",
        "llo",
        "He",
        "Hello",
        "<|endoftext|>",
        "Ċ",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
        .collect();
    std::fs::write(
        model.join("vocab.json"),
        serde_json::Value::Object(vocab).to_string(),
    )
    .unwrap();
    std::fs::write(
        model.join("merges.txt"),
        "#version: 0.2\nl l\nll o\nH e\nHe llo\n",
    )
    .unwrap();
    std::fs::write(model.join("config.json"), r#"{"n_positions": 64}"#).unwrap();
    model.display().to_string()
}

/// The data is prepared, then the model is built (here it fails: the folder has no weights);
/// nothing is written before both succeed.
#[test]
fn finetune_prepares_data_then_needs_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = tmp.path().join("d.csv");
    let rows: String = (0..20)
        .map(|i| format!("{},Hello Hello,m{}\n", ["pos", "neg"][i % 2], i % 5))
        .collect();
    std::fs::write(&data, format!("label,text,movie\n{rows}")).unwrap();
    let out = tmp.path().join("run");
    let o = spt_train(
        &[
            "finetune",
            "--model",
            &model,
            "--train-file",
            data.to_str().unwrap(),
            "--split-by",
            "movie",
            "--validation-split",
            "0.2",
            "--output-dir",
            out.to_str().unwrap(),
            "--mode",
            "lora",
        ],
        &[],
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("building the Lora model from"), "{e}");
    assert!(!out.exists(), "the failed run left {} behind", out.display());
}

#[test]
fn bad_data_is_reported_with_file_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = tmp.path().join("d.csv");
    std::fs::write(&data, "label,txt\npos,Hello\n").unwrap();
    let out = tmp.path().join("run");
    let o = spt_train(
        &[
            "finetune",
            "--model",
            &model,
            "--train-file",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let e = stderr(&o);
    assert!(e.contains("d.csv: line 1: missing column `text`"), "{e}");
    // The data is checked before the run directory is made: a bad file leaves nothing behind.
    assert!(!out.exists(), "the failed run left {} behind", out.display());
    std::fs::write(&data, b"label,text\npos,Hello\nneg,He\xffllo\n").unwrap();
    let o = spt_train(
        &[
            "finetune",
            "--model",
            &model,
            "--train-file",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let e = stderr(&o);
    assert!(
        e.contains("d.csv: line 3, column `text`") && e.contains("UTF-8"),
        "{e}"
    );
    assert!(!out.exists(), "the failed run left {} behind", out.display());
}

#[test]
fn settings_errors_name_the_setting() {
    let o = spt_train(
        &[
            "finetune",
            "--model",
            "m",
            "--train-file",
            "a.csv",
            "--batch-size",
            "0",
        ],
        &[],
    );
    assert!(
        stderr(&o).contains("`batch_size`: batch size must be at least 1, got 0"),
        "{}",
        stderr(&o)
    );
    let o = spt_train(
        &[
            "finetune",
            "--model",
            "m",
            "--train-file",
            "a.csv",
            "--mode",
            "spt",
            "--calibration-batches",
            "0",
        ],
        &[],
    );
    assert!(
        stderr(&o).contains("`calibration_batches`: must be at least 1 in spt mode"),
        "{}",
        stderr(&o)
    );
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, "model = \"m\"\nbatchsize = 3\n").unwrap();
    let o = spt_train(&["finetune", "--config", cfg.to_str().unwrap()], &[]);
    let e = stderr(&o);
    assert!(e.contains("c.toml") && e.contains("batchsize"), "{e}");
}

#[test]
fn foreign_output_dir_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("thesis.tex"), "precious").unwrap();
    let o = spt_train(
        &[
            "finetune",
            "--model",
            &model,
            "--train-file",
            "x.csv",
            "--output-dir",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let e = stderr(&o);
    assert!(
        e.contains("not written by spt-train") && e.contains("--overwrite"),
        "{e}"
    );
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("thesis.tex")]);
}

#[test]
fn offline_uncached_hub_id_names_the_id() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let out = tmp.path().join("run");
    let o = spt_train(
        &[
            "finetune",
            "--model",
            "nobody/no-such-model",
            "--train-file",
            "x.csv",
            "--output-dir",
            out.to_str().unwrap(),
        ],
        &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", home.to_str().unwrap())],
    );
    let e = stderr(&o);
    assert!(
        e.contains("model `nobody/no-such-model`") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    assert!(!out.exists(), "nothing is created before the model is found");
}

#[test]
fn a_mistyped_local_path_is_named_beside_the_hub_error() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    std::fs::create_dir_all(models.join("bert-tiny")).unwrap();
    std::fs::write(models.join("bert-tiny/config.json"), "{}").unwrap();
    let home = tmp.path().join("hf");
    // `models/bert-tin` has the shape of a hub id (owner/name); the folder `models` is local.
    let o = Command::new(env!("CARGO_BIN_EXE_spt-train"))
        .args(["finetune", "--model", "models/bert-tin", "--train-file", "x.csv"])
        .current_dir(tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &home)
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("HF_HUB_OFFLINE")
            && e.contains("A local folder models exists, and has no bert-tin")
            && e.contains("bert-tiny"),
        "{e}"
    );
}
