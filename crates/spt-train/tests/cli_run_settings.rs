//! The commands after `finetune` read data as the run did, from the run's finetune.toml beside
//! `--checkpoint`: its tokenizer, columns, max_length and block_size; and `finetune --resume`
//! needs nothing but the run folder.

mod common;

use std::path::Path;

use common::{fixture, last_json, run, run_err, run_in, run_ok};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// 40 lines of text for a language model.
fn lm_text(dir: &Path) -> std::path::PathBuf {
    let words = ["the", "good", "movie", "was", "very", "bad", "story"];
    let text: String = (0..40)
        .map(|i| {
            (0..8)
                .map(|j| words[(i * 3 + j * 5) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
                + "\n"
        })
        .collect();
    let p = dir.join("text.txt");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_run_trained_with_its_own_tokenizer_keeps_it_for_eval_generate_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gpt2", tmp.path());
    // The model directory without tokenizer files, as a config-only GPT-2 is; the tokenizer
    // lives elsewhere and is given to finetune only.
    let tok_dir = tmp.path().join("tok");
    std::fs::create_dir(&tok_dir).unwrap();
    std::fs::rename(model.join("tokenizer.json"), tok_dir.join("tokenizer.json")).unwrap();
    let text = lm_text(tmp.path());
    let run_dir = tmp.path().join("run");
    let (m, r) = (s(&model), s(&run_dir));
    run_ok(
        &[
            "finetune",
            "--model",
            m,
            "--tokenizer",
            s(&tok_dir),
            "--task",
            "lm",
            "--train-file",
            s(&text),
            "--block-size",
            "16",
            "--output-dir",
            r,
            "--mode",
            "lora",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--no-progress",
        ],
        None,
    );
    // Without the run's tokenizer these all failed: "no tokenizer.json … in" the model directory.
    let eval = |extra: &[&str]| {
        let args = [
            &["eval", "--model", m, "--checkpoint", r, "--data-file", s(&text)][..],
            extra,
        ]
        .concat();
        last_json(&run_ok(&args, None))
    };
    let from_run = eval(&[]);
    // The run's block_size (16), not eval's old fixed default of 128 (which fits no block of this
    // text's 320 tokens in fewer than 3).
    assert_eq!(
        from_run["examples"],
        eval(&["--block-size", "16"])["examples"],
        "{from_run}"
    );
    assert_ne!(
        from_run["examples"],
        eval(&["--block-size", "8"])["examples"],
        "{from_run}"
    );
    assert!(from_run["perplexity"].as_f64().unwrap().is_finite(), "{from_run}");
    let gen = run_ok(
        &[
            "generate",
            "--model",
            m,
            "--checkpoint",
            r,
            "--prompt",
            "the good",
            "--max-new-tokens",
            "3",
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&gen.stdout).starts_with("the good"));
    // The run's tokenizer moved away: named as the run's, with the flag that replaces it.
    let moved = tmp.path().join("tok-moved");
    std::fs::rename(&tok_dir, &moved).unwrap();
    let e = run_err(&[
        "generate",
        "--model",
        m,
        "--checkpoint",
        r,
        "--prompt",
        "the good",
    ]);
    assert!(
        e.contains("recorded in the run's settings") && e.contains("--tokenizer"),
        "{e}"
    );
    std::fs::rename(&moved, &tok_dir).unwrap();
    let export = tmp.path().join("export");
    run_ok(
        &["export", "--model", m, "--checkpoint", r, "--out", s(&export)],
        None,
    );
    assert_eq!(
        std::fs::read(export.join("tokenizer.json")).unwrap(),
        std::fs::read(tok_dir.join("tokenizer.json")).unwrap(),
        "the export carries the run's tokenizer"
    );
    // A labels.json in the working directory belongs to something else: a relative --checkpoint
    // of one component used to find it (the run folder's parent is ""), and the LM export came
    // out with id2label and a BERT classifier's `architectures`.
    std::fs::write(
        tmp.path().join("labels.json"),
        r#"{"id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}}"#,
    )
    .unwrap();
    let o = run_in(
        tmp.path(),
        &[
            "export",
            "--model",
            m,
            "--checkpoint",
            "run",
            "--out",
            "export-rel",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(tmp.path().join("export-rel/config.json")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(cfg.get("id2label").is_none(), "{cfg}");
    assert_ne!(
        cfg["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
    // The export then generates on its own.
    run_ok(
        &[
            "generate",
            "--model",
            s(&export),
            "--prompt",
            "the",
            "--max-new-tokens",
            "2",
        ],
        None,
    );
    // --tokenizer still wins over the run's: a file that is not a tokenizer is named.
    let bad = tmp.path().join("not-a-tokenizer.json");
    std::fs::write(&bad, "{}").unwrap();
    let e = run_err(&[
        "generate",
        "--model",
        m,
        "--checkpoint",
        r,
        "--tokenizer",
        s(&bad),
    ]);
    assert!(e.contains("not-a-tokenizer.json"), "{e}");
}

#[test]
fn eval_and_predict_read_the_runs_columns_and_max_length() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "review,verdict,film");
    let run_dir = tmp.path().join("run");
    let (m, r, d) = (s(&model), s(&run_dir), s(&data));
    run_ok(
        &[
            "finetune",
            "--model",
            m,
            "--train-file",
            d,
            "--text-column",
            "review",
            "--label-column",
            "verdict",
            "--split-by",
            "film",
            "--validation-split",
            "0.3",
            "--max-length",
            "3",
            "--output-dir",
            r,
            "--mode",
            "lora",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--no-progress",
        ],
        None,
    );
    // No column flags: the run's. (Before: "missing column `label`".)
    let rep = last_json(&run_ok(
        &["eval", "--model", m, "--checkpoint", r, "--data-file", d],
        None,
    ));
    assert_eq!(rep["examples"], 60, "{rep}");
    let held_out = last_json(&run_ok(
        &[
            "eval",
            "--model",
            m,
            "--checkpoint",
            r,
            "--data-file",
            d,
            "--split",
            "validation",
        ],
        None,
    ));
    let n = held_out["examples"].as_u64().unwrap();
    assert!(n > 0 && n < 60, "{held_out}");
    // The run truncated at 3 tokens (of 6), and so does eval: a longer limit changes the loss.
    let longer = last_json(&run_ok(
        &[
            "eval",
            "--model",
            m,
            "--checkpoint",
            r,
            "--data-file",
            d,
            "--max-length",
            "12",
        ],
        None,
    ));
    assert_ne!(rep["loss"], longer["loss"], "{rep} {longer}");
    let o = run_ok(&["predict", "--model", m, "--checkpoint", r, "--input", d], None);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 60);
    // One output line per input line, a blank one included.
    let o = run_ok(
        &["predict", "--model", m, "--checkpoint", r],
        Some("a good movie\n\nbad\n"),
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let texts: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(texts, ["a good movie", "", "bad"], "{out}");
    // A file's text is named by its line (header, blank line and quoted line break counted),
    // not by its row: the first text longer than the run's 3 tokens is row 3, on line 6.
    let p = tmp.path().join("p.csv");
    std::fs::write(&p, "review\n\"good\n\"\n\nbad\nvery bad and long\n").unwrap();
    let o = run_ok(
        &["predict", "--model", m, "--checkpoint", r, "--input", s(&p)],
        None,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("p.csv:6: text is"), "{e}");
    // --config's model settings go unused beside a checkpoint, and are said to.
    let eval_with = |config: &Path| {
        let args = [
            "eval",
            "--model",
            m,
            "--checkpoint",
            r,
            "--data-file",
            d,
            "--config",
            s(config),
        ];
        let o = run_ok(&args, None);
        (String::from_utf8_lossy(&o.stderr).to_string(), last_json(&o))
    };
    let cfg = tmp.path().join("other.toml");
    let toml = std::fs::read_to_string(run_dir.join("finetune.toml")).unwrap();
    assert!(toml.contains("mode = \"lora\""), "{toml}");
    std::fs::write(&cfg, toml.replace("mode = \"lora\"", "mode = \"dense\"")).unwrap();
    let (e, got) = eval_with(&cfg);
    assert!(e.contains("mode: \"lora\" → \"dense\" not used"), "{e}");
    assert_eq!(got["loss"], rep["loss"]);
    // Nor does a file that gives only data settings (its mode is the default's, not asked for).
    let cols = tmp.path().join("cols.toml");
    std::fs::write(
        &cols,
        "[data]\ntext_column = \"review\"\nlabel_column = \"verdict\"\nmax_length = 3\n",
    )
    .unwrap();
    let (e, got) = eval_with(&cols);
    assert!(!e.contains("not used"), "{e}");
    assert_eq!(got["loss"], rep["loss"]);
    // The run's own file draws no such note.
    let (e, _) = eval_with(&run_dir.join("finetune.toml"));
    assert!(!e.contains("not used"), "{e}");
}

/// A run started with relative paths is resumed from another directory: the run's finetune.toml
/// records absolute paths (the model was taken for a hub id, the data not found), and the resume
/// continues in the folder being resumed (it used to start a new run under the current directory).
#[test]
fn a_run_is_resumed_from_another_directory_in_its_own_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, elsewhere) = (tmp.path().join("work"), tmp.path().join("elsewhere"));
    let job = work.join("job");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::create_dir_all(&job).unwrap();
    fixture("tiny-bert-cls", &work);
    common::reviews_csv(&work, "d.csv", "text,label,movie");
    // Started from a folder removed afterwards, through `..`: the paths recorded are resolved.
    let first = common::run_in(
        &job,
        &common::finetune_args(
            "../tiny-bert-cls",
            "../d.csv",
            "../run",
            &["--mode", "lora", "--max-steps", "2", "--save-every", "1"],
        ),
    );
    std::fs::remove_dir(&job).unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let run_dir = work.join("run");
    let o = common::run_in(
        &elsewhere,
        &[
            "finetune",
            "--resume",
            s(&run_dir),
            "--max-steps",
            "3",
            "--no-progress",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(last_json(&o)["step"], 3);
    assert!(run_dir.join("checkpoints/step-00000003").is_dir());
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "the resume wrote into the current directory"
    );
    let toml = std::fs::read_to_string(run_dir.join("finetune.toml")).unwrap();
    let abs = |p: &Path| format!("{:?}", p.to_str().unwrap());
    for p in [work.join("tiny-bert-cls"), work.join("d.csv"), run_dir.clone()] {
        assert!(toml.contains(&abs(&p)), "{} not recorded: {toml}", p.display());
    }
    // A moved run continues where it is now, not at the output_dir its finetune.toml recorded.
    let moved = tmp.path().join("moved");
    std::fs::rename(&run_dir, &moved).unwrap();
    let o = common::run_in(
        &elsewhere,
        &[
            "finetune",
            "--resume",
            s(&moved),
            "--max-steps",
            "4",
            "--no-progress",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(moved.join("checkpoints/step-00000004").is_dir());
    assert!(!run_dir.exists(), "the resume went back to the run's old place");
}

#[test]
fn resume_needs_only_the_run_folder_and_refuses_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let (m, d) = (s(&model), s(&data));
    let train = |out: &str, extra: &[&str]| {
        let args = [
            &[
                "finetune",
                "--model",
                m,
                "--train-file",
                d,
                "--output-dir",
                out,
                "--mode",
                "lora",
                "--batch-size",
                "8",
                "--save-every",
                "1",
                "--no-progress",
            ][..],
            extra,
        ]
        .concat();
        run(&args, None)
    };
    // Nothing to resume: refused, and the folder is not created.
    let fresh = tmp.path().join("fresh");
    let o = train(s(&fresh), &["--max-steps", "2", "--resume"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("nothing to resume"), "{e}");
    assert!(
        !fresh.exists(),
        "a refused --resume left {} behind",
        fresh.display()
    );

    let run_dir = tmp.path().join("run");
    let r = s(&run_dir);
    assert!(train(r, &["--max-steps", "2", "--overwrite"]).status.success());
    // --overwrite is this invocation's, not the run's: the saved settings do not grant it again.
    let toml = std::fs::read_to_string(run_dir.join("finetune.toml")).unwrap();
    assert!(toml.contains("overwrite = false"), "{toml}");
    // Resume with the run folder alone: its finetune.toml supplies the model, data and settings.
    let o = run_ok(
        &[
            "finetune",
            "--output-dir",
            r,
            "--resume",
            "--max-steps",
            "3",
            "--no-progress",
        ],
        None,
    );
    let at_3 = last_json(&o);
    assert_eq!(at_3["step"], 3);
    assert!(at_3["eval"]["loss"].is_f64(), "{at_3}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("finetune.toml"));
    // An older run folder's finetune.toml may say `overwrite = true` (the permission its first
    // invocation had): resuming from an earlier checkpoint with it must not discard the later
    // ones unless this invocation passes --overwrite itself.
    let old_style = std::fs::read_to_string(run_dir.join("finetune.toml"))
        .unwrap()
        .replace("overwrite = false", "overwrite = true");
    std::fs::write(run_dir.join("finetune.toml"), old_style).unwrap();
    let before = std::fs::read_dir(run_dir.join("checkpoints")).unwrap().count();
    let cfg = run_dir.join("finetune.toml");
    let step1 = run_dir.join("checkpoints/step-00000001");
    assert!(step1.is_dir());
    let e = run_err(&[
        "finetune",
        "--config",
        s(&cfg),
        "--resume",
        s(&step1),
        "--no-progress",
    ]);
    assert!(e.contains("already holds later checkpoints"), "{e}");
    assert_eq!(
        std::fs::read_dir(run_dir.join("checkpoints")).unwrap().count(),
        before
    );
    // Resuming a finished run trains nothing, and says so.
    let o = run_ok(
        &["finetune", "--output-dir", r, "--resume", "--no-progress"],
        None,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("already at its last step (3)"), "{e}");
    // It reports the evaluation its last step recorded, not `"eval": null`.
    let again = last_json(&o);
    assert_eq!(again["eval"], at_3["eval"], "{again}");
    assert_eq!(again["eval_step"], 3);
    // Other validation rows (another split) are evaluated, not answered with the old rows'
    // figures under the new count.
    let o = run_ok(
        &[
            "finetune",
            "--output-dir",
            r,
            "--resume",
            "--validation-split",
            "0.5",
            "--no-progress",
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("validation rows differ"));
    let other = last_json(&o);
    assert_eq!(other["eval_step"], 3);
    assert_ne!(other["eval"]["examples"], at_3["eval"]["examples"], "{other}");
    assert_ne!(other["eval"]["loss"], at_3["eval"]["loss"], "{other}");
    // Resuming it with fewer steps than its checkpoint holds is refused before its
    // finetune.toml (which says 3) is rewritten.
    let toml = std::fs::read(run_dir.join("finetune.toml")).unwrap();
    let e = run_err(&[
        "finetune",
        "--output-dir",
        r,
        "--resume",
        "--max-steps",
        "2",
        "--no-progress",
    ]);
    assert!(
        e.contains("step-00000003 is at step 3, past this run's last step (2)"),
        "{e}"
    );
    assert_eq!(std::fs::read(run_dir.join("finetune.toml")).unwrap(), toml);
}

/// `--random-init` warns where the weights are random, not where a checkpoint replaces them: a
/// dense run's checkpoint holds every weight; a LoRA run's frozen base is drawn again from its
/// seed, which is said instead.
#[test]
fn random_init_warns_only_where_the_weights_are_random() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gpt2", tmp.path());
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let text = lm_text(tmp.path());
    let warning = "random initial weights";
    for mode in ["dense", "lora"] {
        let run_dir = tmp.path().join(format!("run-{mode}"));
        let (m, r) = (s(&model), s(&run_dir));
        let train = run_ok(
            &[
                "finetune",
                "--model",
                m,
                "--task",
                "lm",
                "--random-init",
                "--train-file",
                s(&text),
                "--block-size",
                "16",
                "--output-dir",
                r,
                "--mode",
                mode,
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--no-progress",
            ],
            None,
        );
        assert!(String::from_utf8_lossy(&train.stderr).contains(warning), "{mode}");
        let gen = run_ok(
            &[
                "generate",
                "--model",
                m,
                "--checkpoint",
                r,
                "--prompt",
                "the good",
                "--max-new-tokens",
                "2",
            ],
            None,
        );
        let e = String::from_utf8_lossy(&gen.stderr);
        assert!(!e.contains(warning), "{mode}: {e}");
        assert_eq!(e.contains("drawn from its seed"), mode == "lora", "{mode}: {e}");
    }
}

/// A LoRA checkpoint whose finetune.toml is gone is rebuilt with `--mode lora` alone: the modules
/// it trained in full (the pooler, trained by default) are read off the checkpoint, as are its
/// tensors, and it evaluates as with its settings.
#[test]
fn a_lora_checkpoint_without_its_settings_restores_its_pooler() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let run_dir = tmp.path().join("run");
    let (m, r, d) = (s(&model), s(&run_dir), s(&data));
    let lora = ["--mode", "lora", "--max-steps", "3", "--lr", "5e-2"];
    run_ok(&common::finetune_args(m, d, r, &lora), None);
    let eval = |extra: &[&str]| {
        let args = [
            &["eval", "--model", m, "--checkpoint", r, "--data-file", d][..],
            extra,
        ]
        .concat();
        last_json(&run_ok(&args, None))
    };
    let with_settings = eval(&[]);
    std::fs::remove_file(run_dir.join("finetune.toml")).unwrap();
    let without = eval(&["--mode", "lora"]);
    assert_eq!(with_settings["examples"], without["examples"]);
    let (a, b) = (
        with_settings["loss"].as_f64().unwrap(),
        without["loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-6, "{with_settings} vs {without}");
}

/// A LoRA run from before the pooler default (`modules_to_save = []`), resumed with flags that
/// now mean "pooler trained": the refusal names the setting that changed, not only "another mode
/// or model".
#[test]
fn a_resume_whose_settings_changed_names_them() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let run_dir = tmp.path().join("run");
    let (m, d, r) = (s(&model), s(&data), s(&run_dir));
    let args = |extra: &[&str]| -> Vec<String> {
        let lora = [&["--mode", "lora", "--batch-size", "8"][..], extra].concat();
        common::finetune_args(m, d, r, &lora)
            .into_iter()
            .map(String::from)
            .collect()
    };
    let old = args(&["--max-steps", "2", "--save-every", "1", "--modules-to-save", ""]);
    run_ok(&old.iter().map(String::as_str).collect::<Vec<_>>(), None);
    // Refused resumes change no file of the run.
    let before = common::snapshot(&run_dir);
    let resume = args(&["--max-steps", "3", "--resume"]);
    let e = run_err(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("modules_to_save") && e.contains("--resume"), "{e}");
    // From the earlier checkpoint too: its later one is not discarded for a resume that fails.
    let step1 = run_dir.join("checkpoints/step-00000001");
    let from1 = args(&[
        "--max-steps",
        "3",
        "--overwrite",
        "--resume",
        s(&step1),
        "--lora-rank",
        "4",
    ]);
    let e = run_err(&from1.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("lora_rank"), "{e}");
    assert!(
        before == common::snapshot(&run_dir),
        "a refused resume changed the run folder"
    );
    // The run's own settings still resume it.
    run_ok(
        &[
            "finetune",
            "--output-dir",
            r,
            "--resume",
            "--max-steps",
            "3",
            "--no-progress",
        ],
        None,
    );
    // A fork (--resume from this run into a new folder) that does not fit makes no folder.
    let fork = tmp.path().join("fork");
    let dense_from_step1 = ["--mode", "dense", "--resume", s(&step1), "--batch-size", "8"];
    let e = run_err(&common::finetune_args(m, d, s(&fork), &dense_from_step1));
    assert!(
        e.contains("checkpoint") && e.contains("other settings") && e.contains("mode"),
        "{e}"
    );
    assert!(!fork.exists(), "a refused fork left {} behind", fork.display());
}

/// A run whose validation rows came from `--validation-file` held nothing out of its training
/// files: `eval --split validation` of those files would report rows it trained on as held out,
/// so it is refused, naming the file to evaluate instead.
#[test]
fn split_validation_of_a_run_with_a_validation_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let val = common::reviews_csv(tmp.path(), "v.csv", "text,label,movie");
    let run_dir = tmp.path().join("run");
    let (m, d, v, r) = (s(&model), s(&data), s(&val), s(&run_dir));
    let lora = [
        "--validation-file",
        v,
        "--mode",
        "lora",
        "--max-steps",
        "1",
        "--batch-size",
        "8",
    ];
    run_ok(&common::finetune_args(m, d, r, &lora), None);
    let e = run_err(&[
        "eval",
        "--model",
        m,
        "--checkpoint",
        r,
        "--data-file",
        d,
        "--split",
        "validation",
    ]);
    assert!(
        e.contains("--validation-file") && e.contains(&format!("--data-file {v} --split all")),
        "{e}"
    );
    run_ok(&["eval", "--model", m, "--checkpoint", r, "--data-file", v], None);
}

/// Errors that name what is wrong rather than a setting it led to: a resume with no run to
/// read, an empty --model, and a pair column that is the text or label column.
#[test]
fn resume_without_a_run_and_bad_columns_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let (m, d) = (s(&model), s(&data));
    let missing = tmp.path().join("missing");
    let e = run_err(&["finetune", "--output-dir", s(&missing), "--resume"]);
    assert!(
        e.contains("no such run directory") && e.contains("missing"),
        "{e}"
    );
    let e = run_err(&["finetune", "--output-dir", s(tmp.path()), "--resume", s(&missing)]);
    assert!(
        e.contains("--resume") && e.contains("no such run directory"),
        "{e}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = run_err(&["finetune", "--output-dir", s(&empty), "--resume"]);
    assert!(e.contains("holds no run settings (finetune.toml)"), "{e}");
    let e = run_err(&["eval", "--model", "", "--data-file", d]);
    assert!(
        e.contains("is empty: give a model directory or a Hugging Face hub id"),
        "{e}"
    );
    for (pair, what) in [("label", "label"), ("text", "text")] {
        let out = tmp.path().join(format!("run-{pair}"));
        let e = run_err(&common::finetune_args(
            m,
            d,
            s(&out),
            &["--text-pair-column", pair],
        ));
        assert!(
            e.contains(&format!("`{pair}` is already the {what} column")),
            "{e}"
        );
        assert!(!out.exists());
    }
    // The label column as the text: the model reads the answer (accuracy 1.0 on any data).
    let out = tmp.path().join("run-leak");
    let e = run_err(&common::finetune_args(m, d, s(&out), &["--text-column", "label"]));
    assert!(
        e.contains("column `label` is both the text column and the label column"),
        "{e}"
    );
    assert!(!out.exists());
    let e = run_err(&["eval", "--model", m, "--data-file", d, "--text-column", "label"]);
    assert!(e.contains("is both the text column and the label column"), "{e}");
}

/// stdin gives one text per line: a run trained on text pairs refuses it (it used to classify
/// the lone text as a pair with an empty second text), and so does a column flag it ignored.
#[test]
fn predict_from_stdin_refuses_what_it_cannot_read() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let run_dir = tmp.path().join("run");
    let (m, r) = (s(&model), s(&run_dir));
    let args = common::finetune_args(
        m,
        s(&data),
        r,
        &[
            "--text-pair-column",
            "movie",
            "--mode",
            "lora",
            "--max-steps",
            "1",
        ],
    );
    run_ok(&args, None);
    let o = run(
        &["predict", "--model", m, "--checkpoint", r],
        Some("good movie\n"),
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("the run's text_pair_column `movie`"),
        "{e}"
    );
    // A column flag stdin cannot apply is refused, on a run without pairs too.
    let plain = tmp.path().join("plain");
    run_ok(
        &common::finetune_args(m, s(&data), s(&plain), &["--mode", "lora", "--max-steps", "1"]),
        None,
    );
    let o = run(
        &[
            "predict",
            "--model",
            m,
            "--checkpoint",
            s(&plain),
            "--text-column",
            "review",
        ],
        Some("good movie\n"),
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("--text-column review: stdin lines are the texts"),
        "{e}"
    );
    // So is --format: a CSV header was classified as a text.
    let o = run(
        &[
            "predict",
            "--model",
            m,
            "--checkpoint",
            s(&plain),
            "--format",
            "csv",
        ],
        Some("text,label\nbad,neg\n"),
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("--format csv: stdin is read as one text per line"),
        "{e}"
    );
    // A file with both columns is read as the run was.
    let o = run_ok(
        &["predict", "--model", m, "--checkpoint", r, "--input", s(&data)],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 60);
}

/// A checkpoint with layers its config.json does not count trains on the layers it counts, and
/// says which tensors went unused (it dropped them without a word).
#[test]
fn unused_checkpoint_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture_with("tiny-bert-cls", tmp.path(), |c| c["num_hidden_layers"] = 1.into());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let out = tmp.path().join("run");
    let o = run_ok(
        &common::finetune_args(s(&model), s(&data), s(&out), &["--max-steps", "1"]),
        None,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("are not used by the model") && e.contains("encoder.layer.1."),
        "{e}"
    );
}

/// A tokenizer that gives ids past the model's vocabulary is refused by eval and predict before
/// the forward, naming the file to fix, and with RUST_BACKTRACE set the error stays one line
/// (candle's error used to carry 25 frames of backtrace into it).
#[test]
fn token_ids_past_the_vocabulary_are_refused_by_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let tok_path = model.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    tok["model"]["vocab"]["zzz"] = 5000.into();
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let data = tmp.path().join("d.csv");
    std::fs::write(&data, "text,label\ngood zzz,pos\nbad movie,neg\n").unwrap();
    let m = s(&model);
    let gpt = fixture("tiny-gpt2", tmp.path());
    let tok_path = gpt.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    tok["model"]["vocab"]["zzz"] = 5000.into();
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let cases: [(&[&str], Option<&str>); 3] = [
        (&["eval", "--model", m, "--data-file", s(&data)], None),
        (&["predict", "--model", m], Some("good zzz\n")),
        (
            &[
                "generate",
                "--model",
                s(&gpt),
                "--prompt",
                "good zzz",
                "--max-new-tokens",
                "2",
            ],
            None,
        ),
    ];
    for (args, stdin) in cases {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_spt-train"));
        c.args(args).env("RUST_BACKTRACE", "1").env("RUST_LOG", "warn");
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        c.stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        let o = child.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}: {e}");
        assert!(
            e.contains("token id 5000") && e.contains("use the model's own tokenizer"),
            "{args:?}: {e}"
        );
        assert!(!e.contains("backtrace") && !e.contains("   0: "), "{args:?}: {e}");
    }
}

/// A checkpoint means what it was trained as: a resume with another lora_alpha rewrites the
/// run's finetune.toml, and the earlier checkpoint is still rebuilt with its own alpha (it was
/// read with the new one, and its accuracy changed). The toml records no `resume`, so reused as
/// a --config it starts a run instead of resuming one.
#[test]
fn a_checkpoint_keeps_its_own_settings_after_a_resume_changes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let run_dir = tmp.path().join("run");
    let (m, d, r) = (s(&model), s(&data), s(&run_dir));
    let extra = [
        "--mode",
        "lora",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--lr",
        "1e-2",
    ];
    run_ok(&common::finetune_args(m, d, r, &extra), None);
    let step2 = run_dir.join("checkpoints/step-00000002");
    let eval = ["eval", "--model", m, "--checkpoint", s(&step2), "--data-file", d];
    let before = String::from_utf8_lossy(&run_ok(&eval, None).stdout).into_owned();
    let o = run_ok(
        &[
            "finetune",
            "--output-dir",
            r,
            "--resume",
            "--lora-alpha",
            "64",
            "--max-steps",
            "5",
            "--no-progress",
        ],
        None,
    );
    assert_eq!(last_json(&o)["step"], 5);
    let toml = std::fs::read_to_string(run_dir.join("finetune.toml")).unwrap();
    assert!(toml.contains("alpha = 64"), "{toml}");
    assert!(!toml.contains("resume"), "{toml}");
    let after = String::from_utf8_lossy(&run_ok(&eval, None).stdout).into_owned();
    assert_eq!(after, before);
    // Reused as --config for a new folder: a new run, not a resume of this one.
    let fresh = tmp.path().join("fresh");
    let o = run_ok(
        &[
            "finetune",
            "--config",
            s(&run_dir.join("finetune.toml")),
            "--output-dir",
            s(&fresh),
            "--max-steps",
            "1",
            "--no-progress",
        ],
        None,
    );
    assert_eq!(last_json(&o)["step"], 1);
}

/// A fork goes into a new or empty folder: resumed into another run's folder it used to put its
/// checkpoints and labels beside that run's. Without --output-dir, `--resume RUN` continues RUN
/// even under a --config whose output_dir says otherwise.
#[test]
fn a_fork_into_another_run_is_refused_and_resume_continues_its_own_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let (m, d) = (s(&model), s(&data));
    for out in [&one, &two] {
        run_ok(
            &common::finetune_args(m, d, s(out), &["--mode", "lora", "--max-steps", "2"]),
            None,
        );
    }
    let before = common::snapshot(&two);
    let e = run_err(&[
        "finetune",
        "--resume",
        s(&one),
        "--output-dir",
        s(&two),
        "--max-steps",
        "3",
        "--no-progress",
    ]);
    assert!(e.contains("holds another run"), "{e}");
    assert!(
        common::snapshot(&two) == before,
        "the refused fork changed the other run"
    );
    // A --config naming another output_dir: the resumed run continues in its own folder.
    let cfg = tmp.path().join("hand.toml");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::write(
        &cfg,
        format!(
            "model = {m:?}\ntrain_files = [{d:?}]\nmode = \"lora\"\noutput_dir = {:?}\n",
            s(&elsewhere)
        ),
    )
    .unwrap();
    let o = run_ok(
        &[
            "finetune",
            "--config",
            s(&cfg),
            "--resume",
            s(&one),
            "--max-steps",
            "3",
            "--no-progress",
        ],
        None,
    );
    assert_eq!(last_json(&o)["step"], 3);
    assert!(one.join("checkpoints/step-00000003").is_dir());
    assert!(
        !elsewhere.exists(),
        "the resume went to the --config's output_dir"
    );
}

/// What a resume continues: a copied run folder continues in the copy (it went back to the
/// original's recorded output_dir); a checkpoint kept outside a run's checkpoints/ folder does not
/// make the folder above it the run (with --overwrite, spt-train claimed it); and the classes
/// must be the run's, in its order (another --label-map order passed the shape check and renamed
/// the answers of the run's earlier checkpoints).
#[test]
fn a_resume_continues_the_run_it_names_with_its_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let (m, d) = (s(&model), s(&data));
    // The default output folder, resumed from where the copy is.
    let (here, there) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&there).unwrap();
    let orig = here.join("spt-output");
    run_ok(
        &common::finetune_args(m, d, s(&orig), &["--mode", "lora", "--max-steps", "2"]),
        None,
    );
    let copy = there.join("spt-output");
    assert!(std::process::Command::new("cp")
        .args(["-r", s(&orig), s(&copy)])
        .status()
        .unwrap()
        .success());
    let before = common::snapshot(&orig);
    let o = common::run_in(
        &there,
        &["finetune", "--resume", "--max-steps", "3", "--no-progress"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(last_json(&o)["step"], 3);
    assert!(copy.join("checkpoints/step-00000003").is_dir());
    assert!(
        common::snapshot(&orig) == before,
        "the copy's resume wrote into the original"
    );
    // A checkpoint kept aside: its parent folder is not taken for the run.
    let keep = tmp.path().join("keep");
    std::fs::create_dir(&keep).unwrap();
    let best = keep.join("best");
    let step2 = orig.join("checkpoints/step-00000002");
    assert!(std::process::Command::new("cp")
        .args(["-r", s(&step2), s(&best)])
        .status()
        .unwrap()
        .success());
    let cfg = orig.join("finetune.toml");
    let e = run_err(&[
        "finetune",
        "--config",
        s(&cfg),
        "--resume",
        s(&best),
        "--overwrite",
        "--no-progress",
    ]);
    assert!(e.contains("holds another run"), "{e}");
    assert!(!keep.join(".spt-train-output").exists() && !tmp.path().join(".spt-train-output").exists());
    // The same classes in another order: refused before the run changes.
    let labels = tmp.path().join("labels.json");
    std::fs::write(
        &labels,
        r#"{"id2label": {"0": "pos", "1": "neutral", "2": "neg"}, "label2id": {"pos": 0, "neutral": 1, "neg": 2}}"#,
    )
    .unwrap();
    let before = common::snapshot(&orig);
    let e = run_err(&[
        "finetune",
        "--output-dir",
        s(&orig),
        "--resume",
        "--label-map",
        s(&labels),
        "--max-steps",
        "3",
        "--no-progress",
    ]);
    assert!(
        e.contains("gives the run's classes as") && e.contains("labels.json"),
        "{e}"
    );
    assert!(common::snapshot(&orig) == before);
}

/// A checkpoint records its head's classes: with the run's labels.json lost, eval and predict
/// answer in the trained order (eval took a one-class file's labels for the classes and failed,
/// predict printed bare ids), and a resume with renamed classes is refused (it was accepted).
#[test]
fn a_checkpoint_keeps_its_classes_without_labels_json() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let (m, d) = (s(&model), s(&data));
    let run = tmp.path().join("run");
    let r = s(&run);
    run_ok(&common::finetune_args(m, d, r, &["--max-steps", "4"]), None);
    // One class of three: its labels alone would make it class 0.
    let one = tmp.path().join("neutral.csv");
    let text = std::fs::read_to_string(&data).unwrap();
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains(",neg,") && !l.contains(",pos,"))
        .collect();
    std::fs::write(&one, rows.join("\n")).unwrap();
    let answers = || {
        let eval = last_json(&run_ok(
            &["eval", "--model", m, "--checkpoint", r, "--data-file", s(&one)],
            None,
        ));
        let o = run_ok(&["predict", "--model", m, "--checkpoint", r, "--input", d], None);
        (
            (eval["accuracy"].clone(), eval["loss"].clone()),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    let before = answers();
    std::fs::remove_file(run.join("labels.json")).unwrap();
    let after = answers();
    assert_eq!(before, after);
    // --label-map against the recorded classes: their names in another order, or another count,
    // is refused naming the file (it relabelled the answers in silence, or blamed the model);
    // other names of the same count rename them, with a warning.
    let map = |name: &str, labels: [&str; 3]| {
        let p = tmp.path().join(name);
        let id2label: serde_json::Map<_, _> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), serde_json::json!(l)))
            .collect();
        std::fs::write(&p, serde_json::json!({ "id2label": id2label }).to_string()).unwrap();
        p
    };
    fn predict_with<'a>(m: &'a str, r: &'a str, d: &'a str, p: &'a Path) -> [&'a str; 9] {
        [
            "predict",
            "--model",
            m,
            "--checkpoint",
            r,
            "--input",
            d,
            "--label-map",
            s(p),
        ]
    }
    let e = run_err(&predict_with(
        m,
        r,
        d,
        &map("rev.json", ["pos", "neutral", "neg"]),
    ));
    assert!(e.contains("rev.json") && e.contains("trained with"), "{e}");
    let rev = tmp.path().join("rev.json");
    let e = run_err(&[
        "eval",
        "--model",
        m,
        "--checkpoint",
        r,
        "--data-file",
        d,
        "--label-map",
        s(&rev),
    ]);
    assert!(e.contains("rev.json") && e.contains("trained with"), "{e}");
    // One recorded name at another index is a relabelling too.
    let e = run_err(&predict_with(m, r, d, &map("some.json", ["pos", "meh", "good"])));
    assert!(e.contains("some.json") && e.contains("trained with"), "{e}");
    let o = run_ok(
        &predict_with(m, r, d, &map("named.json", ["bad", "meh", "good"])),
        None,
    );
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(err.contains("named.json") && err.contains("are named"), "{err}");
    assert!(
        out.contains("\"meh\"") || out.contains("\"good\"") || out.contains("\"bad\""),
        "{out}"
    );
    // Renamed classes of the same count.
    let renamed = tmp.path().join("renamed.csv");
    std::fs::write(&renamed, text.replace(",pos,", ",positive,")).unwrap();
    let renamed_order = tmp.path().join("renamed.json");
    std::fs::write(
        &renamed_order,
        r#"{"id2label": {"0": "positive", "1": "neg", "2": "neutral"}, "label2id": {"positive": 0, "neg": 1, "neutral": 2}}"#,
    )
    .unwrap();
    let e = run_err(&[
        "finetune",
        "--output-dir",
        r,
        "--resume",
        "--train-file",
        s(&renamed),
        "--label-map",
        s(&renamed_order),
        "--max-steps",
        "5",
        "--no-progress",
    ]);
    assert!(
        e.contains("gives the run's classes as") && e.contains("step-00000004"),
        "{e}"
    );
}

/// Resume edge cases from a hostile pass: a fork kept inside its parent's folder is its own run
/// (resumed back into the parent it mixed the two); `--resume RUN/checkpoints` and
/// `--checkpoint RUN/checkpoints` take the latest; `--config COPY/finetune.toml --resume`
/// continues the copy (it trained the original); a --random-init LoRA run resumed with another
/// seed is refused (its adapters went on over a different random base).
#[test]
fn resume_edge_cases_continue_the_right_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let (m, d) = (s(&model), s(&data));
    let p = tmp.path().join("P");
    let lora = ["--mode", "lora", "--max-steps", "4", "--save-every", "2"];
    run_ok(&common::finetune_args(m, d, s(&p), &lora), None);
    let exp = p.join("exp");
    let step2 = p.join("checkpoints/step-00000002");
    let fork = [
        "finetune",
        "--resume",
        s(&step2),
        "--output-dir",
        s(&exp),
        "--max-steps",
        "6",
        "--no-progress",
    ];
    run_ok(&fork, None);
    let before = common::snapshot(&p.join("checkpoints"));
    let e = run_err(&[
        "finetune",
        "--resume",
        s(&exp),
        "--output-dir",
        s(&p),
        "--max-steps",
        "8",
        "--no-progress",
    ]);
    assert!(e.contains("holds another run"), "{e}");
    assert!(common::snapshot(&p.join("checkpoints")) == before);
    // RUN/checkpoints names the run's latest checkpoint.
    let ckpts = exp.join("checkpoints");
    run_ok(
        &["eval", "--model", m, "--checkpoint", s(&ckpts), "--data-file", d],
        None,
    );
    let o = run_ok(
        &[
            "finetune",
            "--resume",
            s(&ckpts),
            "--max-steps",
            "7",
            "--no-progress",
        ],
        None,
    );
    assert_eq!(last_json(&o)["step"], 7);
    assert!(exp.join("checkpoints/step-00000007").is_dir());
    // A copy resumed through its own finetune.toml.
    let copy = tmp.path().join("copy");
    assert!(std::process::Command::new("cp")
        .args(["-r", s(&exp), s(&copy)])
        .status()
        .unwrap()
        .success());
    let o = run_ok(
        &[
            "finetune",
            "--config",
            s(&copy.join("finetune.toml")),
            "--resume",
            "--max-steps",
            "8",
            "--no-progress",
        ],
        None,
    );
    assert_eq!(last_json(&o)["step"], 8);
    assert!(copy.join("checkpoints/step-00000008").is_dir());
    assert!(!exp.join("checkpoints/step-00000008").exists());
    // --random-init LoRA: the seed is part of the model.
    let gpt = fixture("tiny-gpt2", tmp.path());
    let text = lm_text(tmp.path());
    let lm = tmp.path().join("lm");
    let lm_args = |extra: &[&'static str]| {
        let mut a = vec![
            "finetune",
            "--model",
            s(&gpt),
            "--task",
            "lm",
            "--random-init",
            "--mode",
            "lora",
            "--train-file",
            s(&text),
            "--block-size",
            "8",
            "--batch-size",
            "4",
            "--output-dir",
            s(&lm),
            "--no-progress",
        ];
        a.extend_from_slice(extra);
        a
    };
    run_ok(&lm_args(&["--seed", "5", "--max-steps", "2"]), None);
    let e = run_err(&lm_args(&["--resume", "--max-steps", "3"]));
    assert!(e.contains("drawn from seed 5") && e.contains("--seed 5"), "{e}");
    run_ok(&lm_args(&["--resume", "--seed", "5", "--max-steps", "3"]), None);
    // Held-out rows that change at a resume were trained on before it: eval --split validation
    // refuses them (it reported them as held out).
    let v = tmp.path().join("v");
    let val = common::reviews_csv(tmp.path(), "val.csv", "text,label,movie");
    let mut first = common::finetune_args(m, d, s(&v), &["--mode", "lora", "--max-steps", "2"]);
    first.extend(["--validation-file", s(&val)]);
    run_ok(&first, None);
    run_ok(
        &[
            "finetune",
            "--output-dir",
            s(&v),
            "--resume",
            "--max-steps",
            "3",
            "--validation-split",
            "0.2",
            "--set",
            "data.validation_files=[]",
            "--no-progress",
        ],
        None,
    );
    let e = run_err(&[
        "eval",
        "--model",
        m,
        "--checkpoint",
        s(&v),
        "--data-file",
        d,
        "--split",
        "validation",
    ]);
    assert!(e.contains("changed its held-out rows when it was resumed"), "{e}");
    // An unchanged resume keeps them held out.
    let w = tmp.path().join("w");
    run_ok(
        &common::finetune_args(m, d, s(&w), &["--mode", "lora", "--max-steps", "2"]),
        None,
    );
    run_ok(
        &[
            "finetune",
            "--output-dir",
            s(&w),
            "--resume",
            "--max-steps",
            "3",
            "--no-progress",
        ],
        None,
    );
    run_ok(
        &[
            "eval",
            "--model",
            m,
            "--checkpoint",
            s(&w),
            "--data-file",
            d,
            "--split",
            "validation",
        ],
        None,
    );
}

/// A model whose config.json gives an id2label that does not load (ids with a gap) is refused
/// by predict and eval, naming the file, instead of predicting bare ids.
#[test]
fn a_broken_id2label_is_named_not_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture_with("tiny-bert-cls", tmp.path(), |c| {
        c["id2label"] = serde_json::json!({"0": "fresh", "5": "rotten"});
    });
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let (m, d) = (s(&model), s(&data));
    let o = run(&["predict", "--model", m], Some("a good movie\n"));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("config.json") && e.contains("id2label"),
        "{e}"
    );
    let e = run_err(&["eval", "--model", m, "--data-file", d]);
    assert!(e.contains("config.json") && e.contains("id2label"), "{e}");
}

/// eval says why it chose the run's task only when the model's type contradicts it; a broken
/// config.json is named as itself, without that line.
#[test]
fn a_broken_model_config_is_named_without_the_task_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let data = common::reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let run_dir = tmp.path().join("run");
    let (m, d, r) = (s(&model), s(&data), s(&run_dir));
    let lora = ["--mode", "lora", "--max-steps", "1", "--batch-size", "8"];
    run_ok(&common::finetune_args(m, d, r, &lora), None);
    let broken_root = tmp.path().join("broken");
    let broken = common::fixture_with("tiny-bert-cls", &broken_root, |c| {
        c["num_attention_heads"] = 0.into()
    });
    let e = run_err(&["eval", "--model", s(&broken), "--checkpoint", r, "--data-file", d]);
    assert!(
        e.contains("num_attention_heads") && !e.contains("run is a"),
        "{e}"
    );
    let gpt2 = common::fixture("tiny-gpt2", tmp.path());
    let e = run_err(&["eval", "--model", s(&gpt2), "--checkpoint", r, "--data-file", d]);
    assert!(
        e.contains("GPT-2") && e.contains("is a sequence classification"),
        "{e}"
    );
}
