//! `export --format peft`: a LoRA run's adapter in PEFT's layout. Adding it to the base weights
//! as PEFT does (`W + (alpha / r)·B·A`, transposed for GPT-2's `[in, out]` Conv1D weights; the
//! fully trained modules replacing theirs) must give the merged export's weights. That PEFT
//! itself loads these files is checked by bench/peer/peft_adapter.py (torch is not in CI).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{fixture, reviews_csv, run_err, run_ok};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    spt_ops::gradcheck::max_abs_diff(a, b).unwrap() as f32
}

/// Trains a 2-step LoRA run of `model`, exports it both ways, and checks the adapter against
/// the merged export; returns the adapter's config.
fn adapter_matches_merged_export(tmp: &Path, model: &Path, train: &[&str]) -> serde_json::Value {
    let run = tmp.join("run");
    let args = [
        &["finetune", "--model", s(model), "--output-dir", s(&run)][..],
        train,
        &[
            "--mode",
            "lora",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "5e-2",
            "--lora-rank",
            "4",
            "--lora-alpha",
            "12",
            "--no-progress",
        ],
    ]
    .concat();
    run_ok(&args, None);
    let (merged, adapter) = (tmp.join("merged"), tmp.join("adapter"));
    let export = |out: &Path, format: &str| {
        run_ok(
            &[
                "export",
                "--model",
                s(model),
                "--checkpoint",
                s(&run),
                "--out",
                s(out),
                "--format",
                format,
            ],
            None,
        )
    };
    export(&merged, "hf");
    export(&adapter, "peft");
    let mut files: Vec<String> = std::fs::read_dir(&adapter)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| !f.starts_with('.'))
        .collect();
    files.sort();
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors"]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    assert_eq!(cfg["lora_alpha"].as_f64(), Some(12.0));
    assert_eq!(cfg["base_model_name_or_path"].as_str(), Some(s(model)));
    let scale = 12.0 / 4.0;
    let fan_in_fan_out = cfg["fan_in_fan_out"].as_bool().unwrap();

    let base = tensors(&model.join("model.safetensors"));
    let ad = tensors(&adapter.join("adapter_model.safetensors"));
    let want = tensors(&merged.join("model.safetensors"));
    let targets: HashSet<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut merged_by_hand = base.clone();
    let mut seen = HashSet::new();
    for (key, t) in &ad {
        let name = key.strip_prefix("base_model.model.").expect(key);
        if let Some(module) = name.strip_suffix(".lora_A.weight") {
            assert!(targets.contains(module), "{module} is not in target_modules");
            seen.insert(module);
            let b = &ad[&format!("base_model.model.{module}.lora_B.weight")];
            assert_eq!((t.dim(0).unwrap(), b.dim(1).unwrap()), (4, 4), "{module}: rank");
            let delta = (b.matmul(t).unwrap() * scale).unwrap();
            let delta = if fan_in_fan_out { delta.t().unwrap() } else { delta };
            let w = format!("{module}.weight");
            let updated = (&base[&w] + delta).unwrap();
            merged_by_hand.insert(w, updated);
        } else if !name.ends_with(".lora_B.weight") {
            // A module trained in full: it must be one PEFT is told to load.
            let saved: Vec<&str> = cfg["modules_to_save"]
                .as_array()
                .map(|a| a.iter().map(|m| m.as_str().unwrap()).collect())
                .unwrap_or_default();
            assert!(
                saved
                    .iter()
                    .any(|m| name.starts_with(&format!("{m}.")) || name.contains(&format!(".{m}."))),
                "{name} trained in full but not in modules_to_save {saved:?}"
            );
            merged_by_hand.insert(name.to_string(), t.clone());
        }
    }
    assert_eq!(seen, targets, "every target module has its factors");
    for (name, w) in &want {
        let got = merged_by_hand
            .get(name)
            .unwrap_or_else(|| panic!("{name}: in the merged export, not in base + adapter"));
        let d = max_diff(got, w);
        assert!(
            d < 1e-5,
            "{name}: base + adapter differs from the merged export by {d}"
        );
    }
    // The adapter moved the weights: the check above is not base against base.
    let moved = targets
        .iter()
        .map(|m| max_diff(&base[&format!("{m}.weight")], &want[&format!("{m}.weight")]))
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-4,
        "two steps at lr 5e-2 left every adapted weight in place"
    );
    cfg
}

#[test]
fn a_bert_lora_run_exports_as_a_peft_adapter_equal_to_its_merged_export() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let cfg = adapter_matches_merged_export(tmp.path(), &model, &["--train-file", s(&data)]);
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["fan_in_fan_out"], false);
    // The pooler (trained by default in lora mode) and the new head load as modules to save, by
    // their full paths; no "dense" suffix that would also adapt the pooler.
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["bert.pooler.dense", "classifier"])
    );
    let targets = cfg["target_modules"].as_array().unwrap();
    assert!(
        targets
            .iter()
            .all(|t| t.as_str().unwrap().contains(".encoder.layer.")),
        "{cfg}"
    );
    // 2 layers x (q, k, v, o, fc1, fc2).
    assert_eq!(targets.len(), 12, "{cfg}");

    // A dense run has no adapter to export: refused by name, nothing written.
    let dense = tmp.path().join("dense");
    run_ok(
        &common::finetune_args(s(&model), s(&data), s(&dense), &["--max-steps", "1"]),
        None,
    );
    let out = tmp.path().join("nothing");
    let e = run_err(&[
        "export",
        "--model",
        s(&model),
        "--checkpoint",
        s(&dense),
        "--out",
        s(&out),
        "--format",
        "peft",
    ]);
    assert!(e.contains("dense run") && e.contains("--format hf"), "{e}");
    assert!(!out.exists());
}

#[test]
fn a_gpt2_lora_run_exports_as_a_peft_adapter_equal_to_its_merged_export() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gpt2", tmp.path());
    let text = tmp.path().join("t.txt");
    std::fs::write(
        &text,
        "the good movie was very good and the bad film was bad\n".repeat(40),
    )
    .unwrap();
    let cfg = adapter_matches_merged_export(
        tmp.path(),
        &model,
        &["--task", "lm", "--train-file", s(&text), "--block-size", "16"],
    );
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["fan_in_fan_out"], true);
    assert!(cfg["modules_to_save"].is_null(), "{cfg}");
}

/// An adapter export removes and replaces only what spt-train wrote: a user's folder, a user's
/// own adapter files, files added to an earlier export, and a user's folder named like an
/// interrupted export's staging folder all survive, whatever the flags.
#[test]
fn a_peft_export_keeps_every_file_it_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let run = tmp.path().join("run");
    run_ok(
        &common::finetune_args(
            s(&model),
            s(&data),
            s(&run),
            &["--mode", "lora", "--max-steps", "1"],
        ),
        None,
    );
    let export = |out: &Path, format: &str, overwrite: bool| {
        let mut args = vec![
            "export",
            "--model",
            s(&model),
            "--checkpoint",
            s(&run),
            "--out",
            s(out),
            "--format",
            format,
        ];
        if overwrite {
            args.push("--overwrite");
        }
        common::run(&args, None)
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();

    // A user's folder: refused without --overwrite; with it, the adapter goes in beside their file.
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    assert!(!export(&mine, "peft", false).status.success());
    assert!(!mine.join("adapter_config.json").exists());
    assert!(export(&mine, "peft", true).status.success());
    assert!(mine.join("adapter_model.safetensors").is_file());
    assert_eq!(read(&mine.join("notes.txt")), "mine");

    // A user's own adapter, which the export would replace: refused even with --overwrite.
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("adapter_config.json"), "their adapter").unwrap();
    let o = export(&theirs, "peft", true);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("adapter_config.json"));
    assert_eq!(read(&theirs.join("adapter_config.json")), "their adapter");
    assert!(!theirs.join("adapter_model.safetensors").exists());

    // An earlier export, merged, then the adapter over it: the merged files (ours) give way,
    // the README the user added stays.
    let out = tmp.path().join("out");
    assert!(export(&out, "hf", false).status.success());
    std::fs::write(out.join("README.md"), "my card").unwrap();
    assert!(
        !export(&out, "peft", false).status.success(),
        "an earlier export needs --overwrite"
    );
    // A user's folder named like a dead export's staging folder, holding their file.
    let staging = tmp.path().join(format!(".out.tmp-{}", u32::MAX - 1));
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("adapter_config.json.bak"), "kept").unwrap();
    assert!(export(&out, "peft", true).status.success());
    assert!(out.join("adapter_config.json").is_file() && !out.join("model.safetensors").exists());
    assert_eq!(read(&out.join("README.md")), "my card");
    assert_eq!(read(&staging.join("adapter_config.json.bak")), "kept");
}
