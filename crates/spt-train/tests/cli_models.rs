//! `spt-train` on the tiny fixture models, run as a user would: finetune, eval, predict, export
//! (then reload with spt-models), generate.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{fixture, last_json, reviews_csv};

fn spt_train(args: &[&str], stdin: Option<&str>) -> Output {
    common::run_ok(args, stdin)
}

#[test]
fn classify_finetune_eval_predict_export() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let m = model.to_str().unwrap();
    let data = reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    let o = spt_train(
        &[
            "finetune",
            "--model",
            m,
            "--train-file",
            data.to_str().unwrap(),
            "--split-by",
            "movie",
            "--validation-split",
            "0.3",
            "--output-dir",
            r,
            "--mode",
            "lora",
            "--max-steps",
            "8",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--no-progress",
        ],
        None,
    );
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 8);
    assert!(last["median_step_s"].as_f64().unwrap() > 0.0);

    // eval: accuracy and macro-F1 of the run's latest checkpoint.
    let o = spt_train(
        &[
            "eval",
            "--model",
            m,
            "--checkpoint",
            r,
            "--data-file",
            data.to_str().unwrap(),
        ],
        None,
    );
    let rep: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let run_eval = rep.clone();
    let acc = rep["accuracy"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&acc) && rep["macro_f1"].as_f64().is_some(),
        "{rep}"
    );
    assert_eq!(rep["examples"], 60);
    // --split validation: the run's own held-out rows, the same figures as its final eval.
    let cfg = run.join("finetune.toml");
    let o = spt_train(
        &[
            "eval",
            "--model",
            m,
            "--checkpoint",
            r,
            "--data-file",
            data.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--split",
            "validation",
            "--batch-size",
            "8",
        ],
        None,
    );
    let rep: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(rep["examples"], last["eval"]["examples"], "{rep} vs {last}");
    assert_eq!(rep["accuracy"], last["eval"]["accuracy"], "{rep} vs {last}");
    // Without --config, the run's own settings (its finetune.toml beside the checkpoint): the
    // same rows held out, the same figures.
    let o = spt_train(
        &[
            "eval",
            "--model",
            m,
            "--checkpoint",
            r,
            "--split",
            "validation",
            "--data-file",
            data.to_str().unwrap(),
            "--batch-size",
            "8",
        ],
        None,
    );
    let from_run: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(from_run, rep);
    // An edited training file splits into other rows (mostly ones the run trained on): refused,
    // where it used to report them as held out.
    let edited = tmp.path().join("edited.csv");
    std::fs::write(
        &edited,
        std::fs::read_to_string(&data).unwrap().replace("very", "a"),
    )
    .unwrap();
    let e = common::run_err(&[
        "eval",
        "--model",
        m,
        "--checkpoint",
        r,
        "--split",
        "validation",
        "--data-file",
        edited.to_str().unwrap(),
    ]);
    assert!(e.contains("are not the ones") && e.contains("edited.csv"), "{e}");
    // A --config with another split is named as the cause (the data was blamed).
    let other = tmp.path().join("other-split.toml");
    let toml = std::fs::read_to_string(&cfg).unwrap();
    let line = toml
        .lines()
        .find(|l| l.starts_with("validation_split"))
        .expect("finetune.toml records validation_split")
        .to_string();
    std::fs::write(&other, toml.replace(&line, "validation_split = 0.5")).unwrap();
    let e = common::run_err(&[
        "eval",
        "--model",
        m,
        "--checkpoint",
        r,
        "--config",
        other.to_str().unwrap(),
        "--split",
        "validation",
        "--data-file",
        data.to_str().unwrap(),
    ]);
    assert!(
        e.contains("validation_split 0.5 (the run's: ") && !e.contains("are not the ones"),
        "{e}"
    );
    // The same rows under another truncation are still the held-out rows: evaluated.
    let o = spt_train(
        &[
            "eval",
            "--model",
            m,
            "--checkpoint",
            r,
            "--split",
            "validation",
            "--data-file",
            data.to_str().unwrap(),
            "--max-length",
            "4",
        ],
        None,
    );
    let short: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(short["examples"], rep["examples"]);
    // Resuming on it (into a fork) goes on, as it may be meant, but warns that the rows changed.
    let step8 = run.join("checkpoints/step-00000008");
    let fork = tmp.path().join("fork");
    let o = spt_train(
        &[
            "finetune",
            "--model",
            m,
            "--train-file",
            edited.to_str().unwrap(),
            "--split-by",
            "movie",
            "--validation-split",
            "0.3",
            "--output-dir",
            fork.to_str().unwrap(),
            "--mode",
            "lora",
            "--max-steps",
            "9",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--no-progress",
            "--resume",
            step8.to_str().unwrap(),
        ],
        None,
    );
    let warned = String::from_utf8_lossy(&o.stderr);
    assert!(warned.contains("the train rows differ from those"), "{warned}");
    assert_eq!(last_json(&o)["step"], 9);

    // predict: one JSON line per stdin line, with a label from labels.json.
    let o = spt_train(
        &["predict", "--model", m, "--checkpoint", r],
        Some("the good movie\nthe bad film\n"),
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert!(
            ["pos", "neg", "neutral"].contains(&l["label"].as_str().unwrap()),
            "{l}"
        );
    }
    // Batched by length, written in input order: texts of mixed lengths give, line for line,
    // the predictions of one text at a time.
    let texts: Vec<String> = (0..9)
        .map(|i| {
            let words = ["good", "bad", "film", "movie", "the", "plot", "great"];
            (0..1 + (i * 5) % 9)
                .map(|j| words[(i + j) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let input = texts.join("\n") + "\n";
    let predict = |bs: &str| -> Vec<serde_json::Value> {
        let o = spt_train(
            &["predict", "--model", m, "--checkpoint", r, "--batch-size", bs],
            Some(&input),
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (one, four) = (predict("1"), predict("4"));
    assert_eq!((one.len(), four.len()), (texts.len(), texts.len()));
    for ((a, b), t) in one.iter().zip(&four).zip(&texts) {
        assert_eq!(a["text"], t.as_str());
        assert_eq!(b["text"], t.as_str());
        assert_eq!(a["id"], b["id"], "{a} vs {b}");
        let (sa, sb) = (a["score"].as_f64().unwrap(), b["score"].as_f64().unwrap());
        assert!((sa - sb).abs() < 1e-5, "{a} vs {b}");
    }

    // export: an HF directory that loads without initialising anything, with the labels. A
    // tokenizer.json saved with a byte-order mark (which spt-train reads past) is exported
    // without one, as Hugging Face's loaders need.
    let tj = model.join("tokenizer.json");
    let text = std::fs::read(&tj).unwrap();
    std::fs::write(&tj, [&b"\xEF\xBB\xBF"[..], &text].concat()).unwrap();
    let out = tmp.path().join("export");
    spt_train(
        &[
            "export",
            "--model",
            m,
            "--checkpoint",
            r,
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["id2label"]["0"], "neg");
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), text);
    let st =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(
        st.keys().all(|k| !k.contains("lora_")),
        "adapters left in the export"
    );
    let (_, rep) =
        spt_models::BertForSequenceClassification::from_dir(&out, &spt_models::LoadOptions::frozen(), None)
            .unwrap();
    assert!(rep.initialised.is_empty() && rep.unused.is_empty(), "{rep:?}");
    // The export predicts as the run did, with the label names from its config.json.
    let e = out.to_str().unwrap();
    let o = spt_train(&["predict", "--model", e], Some("the good movie\nthe bad film\n"));
    let exported: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported.len(), lines.len());
    for (a, b) in lines.iter().zip(&exported) {
        assert_eq!((&a["label"], &a["id"]), (&b["label"], &b["id"]), "{a} vs {b}");
        let (sa, sb) = (a["score"].as_f64().unwrap(), b["score"].as_f64().unwrap());
        assert!((sa - sb).abs() < 1e-5, "{a} vs {b}");
    }
    // eval on the export reads its labels by name too: the run's figures on the same rows.
    let o = spt_train(
        &["eval", "--model", e, "--data-file", data.to_str().unwrap()],
        None,
    );
    let on_export = last_json(&o);
    // The run's figures on the same rows: the first eval above.
    let on_run = &run_eval;
    assert_eq!(on_export["examples"], on_run["examples"]);
    let (la, lb) = (
        on_export["loss"].as_f64().unwrap(),
        on_run["loss"].as_f64().unwrap(),
    );
    assert!((la - lb).abs() < 1e-5, "{on_export} vs {on_run}");
}

#[test]
fn generate_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gpt2", tmp.path());
    let m = model.to_str().unwrap();
    let gen = |seed: &str| {
        let o = spt_train(
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "the good movie",
                "--max-new-tokens",
                "6",
                "--temperature",
                "0.8",
                "--top-k",
                "5",
                "--seed",
                seed,
            ],
            None,
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let a = gen("1");
    assert_eq!(a, gen("1"), "same seed, same text");
    assert!(a.split_whitespace().count() >= 3, "{a}");
    // A tokenizer of 100 tokens on a model of 1000: only its tokens are sampled,
    // said in a note (the rest decoded to nothing and vanished from the text without a word).
    let tok = tmp.path().join("tinytok");
    std::fs::create_dir(&tok).unwrap();
    let words: String = (0..95).map(|i| format!("w{i}\n")).collect();
    std::fs::write(
        tok.join("vocab.txt"),
        format!("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n{words}"),
    )
    .unwrap();
    let o = spt_train(
        &[
            "generate",
            "--model",
            m,
            "--tokenizer",
            tok.to_str().unwrap(),
            "--prompt",
            "a b",
            "--max-new-tokens",
            "20",
            "--top-k",
            "0",
            "--seed",
            "3",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("the tokenizer has 100 of the model's 1000 token ids"),
        "{err}"
    );
    // Each of the 20 tokens is a word (about 1 in 10 was, before), unless [SEP] ended the text.
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.split_whitespace().count() >= 2 + 15, "{text}");
    // The prompt's words are not in that vocabulary: the prompt is printed as typed (it was
    // echoed as the tokenizer decoded it, "[UNK] [UNK]"), and what the model saw is said.
    assert!(text.starts_with("a b "), "{text}");
    assert!(
        err.contains(
            "note: the tokenizer reads the prompt as \"[UNK] [UNK]\" (words it lacks, or \
             normalised); the model continues that"
        ),
        "{err}"
    );
}

/// generate reads the model's generation_config.json as transformers does: every id its
/// `eos_token_id` lists ends the text, `do_sample: false` is greedy decoding (the seed changes
/// nothing; a sampling flag overrides it), and its sampling settings apply with
/// `do_sample: true` only.
#[test]
fn generate_follows_the_generation_config() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gpt2", tmp.path());
    let m = model.to_str().unwrap();
    let gen = |seed: &str, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--prompt",
            "the good movie",
            "--max-new-tokens",
            "8",
            "--seed",
            seed,
        ];
        args.extend_from_slice(extra);
        let o = spt_train(&args, None);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (free, _) = gen("1", &[]);
    assert!(free.len() > "the good movie".len(), "{free}");
    let config = model.join("generation_config.json");
    std::fs::write(&config, r#"{"do_sample": false}"#).unwrap();
    let (greedy, err) = gen("1", &[]);
    assert!(err.contains("do_sample: false (greedy)"), "{err}");
    assert_eq!(greedy, gen("2", &[]).0, "greedy: the seed changes nothing");
    assert_eq!(greedy, gen("3", &["--greedy"]).0);
    let (sampled, err) = gen("1", &["--top-k", "50"]);
    assert!(!err.contains("greedy"), "{err}");
    assert_eq!(sampled, free, "a flag overrides the file: sampling as without it");
    // Sampling settings without do_sample: true are not applied (transformers ignores them).
    std::fs::write(&config, r#"{"temperature": 0.01, "top_k": 1}"#).unwrap();
    let (ignored, err) = gen("1", &[]);
    assert!(!err.contains("generation_config.json"), "{err}");
    assert_eq!(ignored, free);
    std::fs::write(&config, r#"{"do_sample": true, "top_k": 1}"#).unwrap();
    let (top1, err) = gen("1", &[]);
    assert!(
        err.contains("from the model's generation_config.json: top_k: 1"),
        "{err}"
    );
    assert_eq!(top1, gen("2", &["--top-k", "1"]).0);
    // Every id listed ends the text: nothing is generated.
    let all: Vec<u32> = (0..1000).collect();
    std::fs::write(&config, serde_json::json!({ "eos_token_id": all }).to_string()).unwrap();
    assert_eq!(gen("1", &[]).0, "the good movie");
}

/// `spt-train bench` of dense and spt on `model`, one tiny step, into `out`.
fn bench_args<'a>(model: &'a str, out: &'a str) -> [&'a str; 16] {
    [
        "-q",
        "bench",
        "--model",
        model,
        "--modes",
        "dense,spt",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--output",
        out,
    ]
}

/// A BERT config without weights (a GPU machine the checkpoint cannot reach, say) is timed on
/// random weights of its shapes, and each record says so.
#[test]
fn bench_times_a_bert_config_without_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bert-config-only");
    std::fs::create_dir_all(&dir).unwrap();
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../spt-models/tests/fixtures/tiny-bert-cls/config.json");
    std::fs::copy(src, dir.join("config.json")).unwrap();
    let out = tmp.path().join("speed.json");
    spt_train(&bench_args(dir.to_str().unwrap(), out.to_str().unwrap()), None);
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let recs = doc["records"].as_array().unwrap();
    assert_eq!(recs.len(), 2, "{doc}");
    for r in recs {
        assert_eq!(r["weights"], "random init", "{r}");
        assert!(r["ours_s"].as_f64().unwrap() > 0.0, "{r}");
    }
}

/// `spt-train bench` on the tiny BERT: dense vs spt records with speed-ups and peak RSS; a
/// non-default sparsity names itself in each case, so two settings share one --append file.
#[test]
fn bench_records_each_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    let model = model.to_str().unwrap();
    let out = tmp.path().join("speed.json");
    let out_s = out.to_str().unwrap();
    let base = bench_args(model, out_s);
    spt_train(
        &[&base[..], &["--attn-k", "4", "--ffn-top-k", "4"]].concat(),
        None,
    );
    spt_train(&[&base[..], &["--ffn-top-k", "6", "--append"]].concat(), None);
    spt_train(
        &[&base[..], &["--ffn-correction", "false", "--append"]].concat(),
        None,
    );
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let recs = doc["records"].as_array().unwrap();
    let settings: Vec<(&str, &str)> = recs
        .iter()
        .map(|r| {
            (
                r["case"]["mode"].as_str().unwrap(),
                r["case"]["setting"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        settings,
        [
            ("dense", "spt k = 4, FFN 4/8, linear correction"),
            ("spt", "spt k = 4, FFN 4/8, linear correction"),
            ("dense", "spt k = 16, FFN 6/8, linear correction"),
            ("spt", "spt k = 16, FFN 6/8, linear correction"),
            ("dense", "spt k = 16, FFN 2/8"),
            ("spt", "spt k = 16, FFN 2/8"),
        ]
    );
    for r in recs {
        let s = r["ours_s"].as_f64().unwrap();
        assert!(s > 0.0 && r["speedup"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ours_bytes"].as_u64().unwrap() > 0, "{r}");
        assert!(r["build_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(recs[1]["ffn_top_k"], 4);
    assert_eq!(recs[3]["ffn_top_k"], 6);
    assert_eq!(recs[3]["attn_k"], 16); // the fast preset keeps every key
    assert_eq!(recs[3]["ffn_correction"], true);
    assert_eq!(recs[5]["ffn_correction"], false);
    // Another model in a folder of the same name: its records join the file (they replaced
    // these), and a key the user added to the file stays (it was dropped).
    let mut doc = doc.clone();
    doc["notes"] = "mine".into();
    std::fs::write(&out, serde_json::to_string(&doc).unwrap()).unwrap();
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    // Another model (its config differs) in a folder of the same name, each named by the same
    // relative path from its own parent (relative paths were compared from wherever the later
    // command ran, so one replaced the other).
    common::fixture_with("tiny-bert-cls", &other, |c| c["hidden_dropout_prob"] = 0.2.into());
    let at = |cwd: &Path| {
        let o = common::run_in(
            cwd,
            &[
                &bench_args("tiny-bert-cls", out_s)[..],
                &["--ffn-correction", "false", "--append"],
            ]
            .concat(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    at(tmp.path());
    at(&other);
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(doc["records"].as_array().unwrap().len(), 8, "{doc}");
    assert_eq!(doc["notes"], "mine");
    // The same model at the same setting replaces its own records only.
    spt_train(
        &[&base[..], &["--ffn-correction", "false", "--append"]].concat(),
        None,
    );
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(doc["records"].as_array().unwrap().len(), 8, "{doc}");
    // A top-k the FFN cannot have is refused before anything runs; so is a sequence longer than
    // the model's positions (the tiny BERT has 128), naming them.
    let err = common::run_err(&["-q", "bench", "--model", model, "--ffn-top-k", "9"]);
    assert!(err.contains("--ffn-top-k is 9, expected 1 to 8"), "{err}");
    let err = common::run_err(&[
        "-q",
        "bench",
        "--model",
        model,
        "--seq-len",
        "16",
        "--attn-k",
        "1000",
    ]);
    assert!(err.contains("--attn-k 1000 exceeds the 16 keys"), "{err}");
    // A mode twice, or an spt setting with spt left out, is refused (one was timed twice, the
    // other ignored).
    let err = common::run_err(&["-q", "bench", "--model", model, "--modes", "spt,spt"]);
    assert!(err.contains("--modes names spt twice"), "{err}");
    let err = common::run_err(&[
        "-q", "bench", "--model", model, "--modes", "lora", "--attn-k", "4",
    ]);
    assert!(err.contains("--attn-k sets the spt mode"), "{err}");
    let err = common::run_err(&["-q", "bench", "--model", model, "--seq-len", "129"]);
    assert!(
        err.contains("--seq-len 129 exceeds the 128 positions of"),
        "{err}"
    );
    // A batch that cannot fit is refused before a child builds it: one whose sizes overflow
    // (a capacity-overflow panic in the child; counted as saturated), and one of terabytes
    // (killed by the kernel).
    for batch in [usize::MAX.to_string(), "1000000000".to_string()] {
        let err = common::run_err(&[
            "-q",
            "bench",
            "--model",
            model,
            "--batch-size",
            &batch,
            "--seq-len",
            "16",
        ]);
        assert!(
            err.contains(&format!("{batch} × 16 tokens keeps at least"))
                && err.contains("smaller --batch-size"),
            "{err}"
        );
    }
    // --output naming a file bench did not write is refused before anything runs, and the file
    // is left as it was; with or without --append. The record written above may be rewritten.
    let mine = tmp.path().join("notes.json");
    for text in ["my notes", r#"{"records": [], "command": "python3 train.py"}"#] {
        std::fs::write(&mine, text).unwrap();
        for append in [false, true] {
            let mut args = bench_args(model, mine.to_str().unwrap()).to_vec();
            if append {
                args.push("--append");
            }
            let err = common::run_err(&args);
            assert!(
                err.contains("notes.json: the file exists and is not a record of spt-train bench"),
                "{err}"
            );
            assert_eq!(std::fs::read_to_string(&mine).unwrap(), text);
        }
    }
    spt_train(&base, None);
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(doc["records"].as_array().unwrap().len(), 2, "{doc}");
}

/// The tiny BERT classifier, a reviews CSV, and an spt config for `eval` on it (its columns and
/// split, 4 FFN blocks with 2 active, and `extra` lines): their paths under `dir`.
fn spt_eval_setup(dir: &Path, extra: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let model = fixture("tiny-bert-cls", dir);
    let data = reviews_csv(dir, "reviews.csv", "review,sentiment,movie");
    let cfg = dir.join("spt.toml");
    std::fs::write(
        &cfg,
        format!(
            "text_column = \"review\"\nlabel_column = \"sentiment\"\nvalidation_split = 0.3\n\
             split_by = \"movie\"\nmode = \"spt\"\nffn_blocks = 4\nffn_top_k = 2\n{extra}"
        ),
    )
    .unwrap();
    (model, data, cfg)
}

/// `eval` without a checkpoint takes its data columns and settings from `--config` (flags
/// override), and in spt mode fits the sparse layers on the training rows instead of routing
/// at random; commands without data refuse spt mode without a checkpoint.
#[test]
fn eval_without_checkpoint_uses_the_config_and_calibrates_spt() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, cfg) = spt_eval_setup(tmp.path(), "attn_k_fraction = 0.5\n");
    let m = model.to_str().unwrap();
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", "--model", m, "--data-file", data.to_str().unwrap()];
        args.extend(["--config", cfg.to_str().unwrap(), "--split", "validation"]);
        args.extend(extra);
        let o = spt_train(&args, None);
        let rep: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        (rep, String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (sparse, log) = eval(&[]);
    assert!(
        log.contains("layer 0: attention sparse")
            && log.contains("ffn routed")
            && log.contains("oracle cosine"),
        "spt eval did not calibrate: {log}"
    );
    let (dense, log) = eval(&["--mode", "dense"]);
    assert!(!log.contains("ffn routed"), "{log}");
    // Block mode (`attn_tile`, [spt.attention] tile) from a config file: the same calibration,
    // other keys kept, so another loss.
    let cfg_blocks = tmp.path().join("spt-blocks.toml");
    let flat = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg_blocks, format!("{flat}attn_tile = 2\n")).unwrap();
    let o = spt_train(
        &[
            "eval",
            "--model",
            m,
            "--data-file",
            data.to_str().unwrap(),
            "--config",
            cfg_blocks.to_str().unwrap(),
            "--split",
            "validation",
        ],
        None,
    );
    let blocks: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(blocks["examples"], sparse["examples"]);
    assert_ne!(
        blocks["loss"], sparse["loss"],
        "block mode kept the same keys as per-query selection"
    );
    assert_eq!(sparse["examples"], dense["examples"]);
    assert!(sparse["examples"].as_u64().unwrap() > 0 && sparse["examples"].as_u64().unwrap() < 60);
    // A flag overrides the config's column: no column `text` in this file.
    let o = Command::new(env!("CARGO_BIN_EXE_spt-train"))
        .args(["eval", "--model", m, "--data-file", data.to_str().unwrap()])
        .args(["--config", cfg.to_str().unwrap(), "--text-column", "text"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing column `text`"));
    // predict has no rows to fit the sparse layers on.
    let o = Command::new(env!("CARGO_BIN_EXE_spt-train"))
        .args(["predict", "--model", m, "--mode", "spt"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--mode spt without --checkpoint"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// spt without adapters trains every weight, also when the head is new (it used to freeze all
/// but the head, pooler and routers, as the adapter modes do).
#[test]
fn spt_without_adapters_trains_every_weight_beside_a_new_head() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", tmp.path());
    common::drop_head(&model);
    let data = reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let run = |mode: &str, rank: &str| -> serde_json::Value {
        let out = tmp.path().join(format!("run-{mode}-{rank}"));
        let o = spt_train(
            &[
                "finetune",
                "--model",
                model.to_str().unwrap(),
                "--train-file",
                data.to_str().unwrap(),
                "--output-dir",
                out.to_str().unwrap(),
                "--mode",
                mode,
                "--lora-rank",
                rank,
                "--ffn-blocks",
                "2",
                "--ffn-top-k",
                "1",
                "--max-steps",
                "1",
                "--batch-size",
                "8",
                "--no-progress",
            ],
            None,
        );
        last_json(&o)
    };
    let all = run("spt", "0");
    assert_eq!(all["trainable_params"], all["total_params"], "{all}");
    let adapters = run("spt", "4");
    let (t, n) = (
        adapters["trainable_params"].as_u64().unwrap(),
        adapters["total_params"].as_u64().unwrap(),
    );
    assert!(t < n / 2, "{adapters}");
}

/// `--matmul-precision bf16` on eval, predict and generate: the same examples and labels' shape
/// as f32, the loss and probabilities within bf16 rounding of f32's (spt mode: LoRA, routed FFN
/// and correction frozen and packed); refused off the CPU before anything is loaded.
#[test]
fn inference_commands_take_bf16_products() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, cfg) = spt_eval_setup(tmp.path(), "");
    let m = model.to_str().unwrap();
    let eval = |p: &str| -> serde_json::Value {
        let mut args = vec!["eval", "--model", m, "--data-file", data.to_str().unwrap()];
        args.extend(["--config", cfg.to_str().unwrap(), "--split", "validation"]);
        args.extend(["--matmul-precision", p]);
        serde_json::from_str(String::from_utf8_lossy(&spt_train(&args, None).stdout).trim()).unwrap()
    };
    let (e32, e16) = (eval("f32"), eval("bf16"));
    assert_eq!(e32["examples"], e16["examples"]);
    let (l32, l16) = (e32["loss"].as_f64().unwrap(), e16["loss"].as_f64().unwrap());
    assert!(
        (l32 - l16).abs() <= 3e-2 * l32.abs(),
        "eval loss {l32} (f32) against {l16} (bf16)"
    );
    let predict = |p: &str| -> Vec<f64> {
        let o = spt_train(
            &["predict", "--model", m, "--matmul-precision", p],
            Some("the good movie\na bad film with a plot\n"),
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["score"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (p32, p16) = (predict("f32"), predict("bf16"));
    assert_eq!(p32.len(), 2);
    for (a, b) in p32.iter().zip(&p16) {
        assert!((a - b).abs() < 2e-2, "predict score {a} (f32) against {b} (bf16)");
    }
    let gpt2 = fixture("tiny-gpt2", tmp.path());
    let o = spt_train(
        &[
            "generate",
            "--model",
            gpt2.to_str().unwrap(),
            "--prompt",
            "the good movie",
        ],
        None,
    );
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
    let o = spt_train(
        &[
            "generate",
            "--model",
            gpt2.to_str().unwrap(),
            "--prompt",
            "the good movie",
            "--matmul-precision",
            "bf16",
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("the good movie"));
    for cmd in ["eval", "predict", "generate"] {
        let o = Command::new(env!("CARGO_BIN_EXE_spt-train"))
            .args([
                cmd,
                "--model",
                m,
                "--device",
                "cuda",
                "--matmul-precision",
                "bf16",
            ])
            .args(if cmd == "eval" {
                vec!["--data-file", data.to_str().unwrap()]
            } else {
                vec![]
            })
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--matmul-precision bf16 is a setting of the CPU kernels"),
            "{cmd}: {err}"
        );
    }
}
