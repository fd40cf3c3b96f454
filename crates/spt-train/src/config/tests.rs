use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: FinetuneArgs,
}

fn parse(argv: &[&str]) -> FinetuneArgs {
    Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied()))
        .unwrap()
        .args
}

const FLAGS: &[&str] = &[
    "--model",
    "sentence-transformers/all-MiniLM-L6-v2",
    "--task",
    "classify",
    "--train-file",
    "data/rt/rt.csv",
    "--validation-split",
    "0.2",
    "--split-by",
    "movie_name",
    "--text-column",
    "text",
    "--label-column",
    "category",
    "--drop-label",
    "plot",
    "--max-length",
    "128",
    "--output-dir",
    "runs/rt",
    "--mode",
    "spt",
    "--attn-k",
    "32",
    "--ffn-blocks",
    "16",
    "--ffn-top-k",
    "4",
    "--ffn-correction",
    "true",
    "--router-lr-scale",
    "0.1",
    "--lora-rank",
    "16",
    "--lora-alpha",
    "32",
    "--modules-to-save",
    "pooler,bert.embeddings.LayerNorm",
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--grad-accum",
    "2",
    "--lr",
    "0.0003",
    "--warmup-ratio",
    "0.1",
    "--schedule",
    "cosine",
    "--weight-decay",
    "0.01",
    "--clip",
    "1.0",
    "--seed",
    "7",
    "--eval-every",
    "100",
    "--save-every",
    "200",
    "--keep-last",
    "2",
];

const TOML: &str = r#"
    model = "sentence-transformers/all-MiniLM-L6-v2"
    task = "classify"
    train_files = ["data/rt/rt.csv"]
    validation_split = 0.2
    split_by = "movie_name"
    text_column = "text"
    label_column = "category"
    drop_labels = ["plot"]
    max_length = 128
    output_dir = "runs/rt"
    mode = "spt"
    attn_k = 32
    ffn_blocks = 16
    ffn_top_k = 4
    ffn_correction = true
    router_lr_scale = 0.1
    lora_rank = 16
    lora_alpha = 32.0
    modules_to_save = ["pooler", "bert.embeddings.LayerNorm"]
    epochs = 2
    batch_size = 32
    grad_accum = 2
    lr = 0.0003
    warmup_ratio = 0.1
    schedule = "cosine"
    weight_decay = 0.01
    max_grad_norm = 1.0
    seed = 7
    eval_every = 100
    save_every = 200
    keep_last = 2
"#;

#[test]
fn toml_json_and_flags_are_equivalent() {
    let from_flags = FinetuneConfig::from_args(&parse(FLAGS)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("c.toml");
    std::fs::write(&t, TOML).unwrap();
    let from_toml = FinetuneConfig::from_args(&parse(&["--config", t.to_str().unwrap()])).unwrap();
    assert_eq!(from_toml, from_flags);
    let j = dir.path().join("c.json");
    std::fs::write(&j, serde_json::to_string(&from_flags).unwrap()).unwrap();
    assert_eq!(FinetuneConfig::load(&j).unwrap(), from_flags);
    assert_eq!(from_flags.mode, Mode::Spt);
    assert_eq!(from_flags.drop_labels, vec!["plot".to_string()]);
    assert_eq!(
        from_flags.modules_to_save,
        ["pooler", "bert.embeddings.LayerNorm"]
    );
    // Flags override the file.
    let over = FinetuneConfig::from_args(&parse(&[
        "--config",
        t.to_str().unwrap(),
        "--lr",
        "0.001",
        "--resume",
    ]))
    .unwrap();
    assert_eq!(over.lr, 0.001);
    assert_eq!(over.resume_from(), Resume::Latest);
    assert_eq!(over.seed, 7);
    let same_run = FinetuneConfig {
        lr: from_toml.lr,
        ..over.clone()
    };
    assert_eq!(same_run.run_identity(), from_toml.run_identity()); // --resume does not change it
                                                                   // Trainer settings: 1000 items / 32 = 32 batches × 2 epochs / 2 accum = 32 steps, warmup 10%.
    let tc = from_flags.trainer_config(1000);
    assert_eq!(tc.warmup_steps, 4);
    assert_eq!(tc.adamw.weight_decay, 0.01);
    assert_eq!(tc.max_grad_norm, 1.0);
    assert_eq!(tc.lr_scales, vec![("router".to_string(), 0.1)]);
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("bad.toml");
    std::fs::write(&t, "model = \"m\"\nlearning_rate = 0.1\n").unwrap();
    let e = FinetuneConfig::load(&t).unwrap_err().to_string();
    assert!(e.contains("bad.toml") && e.contains("learning_rate"), "{e}");
    let base = ["--model", "m", "--train-file", "a.csv"];
    let with = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        FinetuneConfig::from_args(&parse(&v)).unwrap_err().to_string()
    };
    assert!(with(&["--batch-size", "0"]).contains("batch size must be at least 1"));
    assert!(with(&["--attn-k", "4", "--attn-k-fraction", "0.5"]).contains("not both"));
    assert!(with(&["--ffn-blocks", "2", "--ffn-top-k", "3"]).contains("ffn_top_k"));
    assert!(with(&["--device", "tpu"]).contains("device"));
    assert!(with(&["--router-lr-scale=-1"]).contains("router_lr_scale"));
    // The balancing loss needs routers that train; with adapters they are frozen by default.
    let e = with(&["--mode", "spt", "--router-aux-weight", "0.1"]);
    assert!(
        e.contains("router_aux_weight") && e.contains("--router-lr-scale"),
        "{e}"
    );
    let ok = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        FinetuneConfig::from_args(&parse(&v)).unwrap()
    };
    let aux = ["--mode", "spt", "--router-aux-weight", "0.1"];
    assert_eq!(
        ok(&[&aux[..], &["--router-lr-scale", "0.5"]].concat()).router_lr_scale(),
        0.5
    );
    assert_eq!(
        ok(&[&aux[..], &["--lora-rank", "0"]].concat()).router_lr_scale(),
        1.0
    );
    assert_eq!(ok(&["--mode", "spt"]).router_lr_scale(), 0.0);
    assert_eq!(
        ok(&["--mode", "spt"]).trainer_config(100).lr_scales,
        vec![("router".to_string(), 0.0)]
    );
    assert!(ok(&["--mode", "lora"]).trainer_config(100).lr_scales.is_empty());
    let e = FinetuneConfig::from_args(&parse(&["--train-file", "a.csv"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`model`"), "{e}");
}

/// `--matmul-precision` reaches the config and its file; bf16 off the CPU and a value other
/// than f32 / bf16 are refused by name; a file from before the setting loads as f32.
#[test]
fn matmul_precision_is_read_checked_and_defaults_to_f32() {
    use spt_ops::MatmulPrecision;
    let base = ["--model", "m", "--train-file", "a.csv"];
    fn args<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    let cfg = FinetuneConfig::from_args(&parse(&args(&base, &["--matmul-precision", "bf16"]))).unwrap();
    assert_eq!(cfg.matmul_precision, MatmulPrecision::Bf16);
    let e = FinetuneConfig::from_args(&parse(&args(
        &base,
        &["--matmul-precision", "bf16", "--device", "cuda"],
    )))
    .unwrap_err()
    .to_string();
    assert!(e.contains("matmul_precision") && e.contains("cuda"), "{e}");
    let e = Cli::try_parse_from(
        ["x"]
            .into_iter()
            .chain(args(&base, &["--matmul-precision", "fp16"])),
    )
    .err()
    .expect("fp16 refused")
    .to_string();
    assert!(e.contains("expected f32 or bf16"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("finetune.toml");
    std::fs::write(&t, "model = \"m\"\ntrain_files = [\"a.csv\"]\n").unwrap();
    assert_eq!(
        FinetuneConfig::load(&t).unwrap().matmul_precision,
        MatmulPrecision::F32
    );
    std::fs::write(
        &t,
        "model = \"m\"\ntrain_files = [\"a.csv\"]\nmatmul_precision = \"bf16\"\n",
    )
    .unwrap();
    assert_eq!(
        FinetuneConfig::load(&t).unwrap().matmul_precision,
        MatmulPrecision::Bf16
    );
}

/// A run directory's finetune.toml from before an option was removed: with the remaining
/// behaviour's value it loads, with any other value it is refused, naming the setting.
#[test]
fn removed_settings_are_refused_by_name_unless_they_keep_the_behaviour() {
    let dir = tempfile::tempdir().unwrap();
    let old = "model = \"m\"\ntrain_files = [\"a.csv\"]\nffn_gate = \"softmax-kept\"\n\
               ffn_router_target = \"activation-norm\"\nrouter_refit_every = 0\nffn_skip_bias = false\n";
    let t = dir.path().join("finetune.toml");
    std::fs::write(&t, old).unwrap();
    let cfg = FinetuneConfig::load(&t).unwrap();
    assert_eq!(cfg.model, "m");
    let j = dir.path().join("finetune.json");
    std::fs::write(
        &j,
        r#"{"model": "m", "ffn_skip_bias": false, "router_refit_every": 0}"#,
    )
    .unwrap();
    assert_eq!(FinetuneConfig::load(&j).unwrap().model, "m");
    for (line, key) in [
        ("ffn_skip_bias = true", "ffn_skip_bias"),
        ("ffn_router_target = \"output-norm\"", "ffn_router_target"),
        ("router_refit_every = 100", "router_refit_every"),
        ("ffn_gate = \"sigmoid\"", "ffn_gate"),
    ] {
        std::fs::write(&t, format!("model = \"m\"\n{line}\n")).unwrap();
        let e = FinetuneConfig::load(&t).unwrap_err().to_string();
        assert!(
            e.contains("finetune.toml") && e.contains(key) && e.contains("removed"),
            "{e}"
        );
    }
    std::fs::write(&j, r#"{"model": "m", "ffn_skip_bias": true}"#).unwrap();
    let e = FinetuneConfig::load(&j).unwrap_err().to_string();
    assert!(e.contains("ffn_skip_bias") && e.contains("removed"), "{e}");
    // The flags are gone too.
    assert!(Cli::try_parse_from(["x", "--ffn-skip-bias", "true"]).is_err());
    assert!(Cli::try_parse_from(["x", "--router-refit-every", "10"]).is_err());
}

#[test]
fn model_resolution_local_cached_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub {
        cache: hf_hub::Cache::new(dir.path().join("hub")),
        endpoint: "http://127.0.0.1:9".into(),
        offline: true,
        token: None,
    };
    // Offline and uncached: the error names the id and says why.
    let e = resolve_model_with("someone/tiny-bert", &hub)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("someone/tiny-bert") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    // Cached (hub cache layout: refs/main → snapshots/<commit>/files).
    let repo = dir.path().join("hub/models--someone--tiny-bert");
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::write(snap.join(f), "{}").unwrap();
    }
    assert_eq!(resolve_model_with("someone/tiny-bert", &hub).unwrap(), snap);
    // Local directory.
    assert_eq!(resolve_model_with(snap.to_str().unwrap(), &hub).unwrap(), snap);
    let e = resolve_model_with("./no/such/dir", &hub).unwrap_err().to_string();
    assert!(
        e.contains("./no/such/dir") && e.contains("not a directory"),
        "{e}"
    );
}

/// The sectioned file: what a run writes loads back to the same settings; the flat form of older
/// run directories still loads; a mix works; a setting given twice or an unknown one is named.
#[test]
fn sectioned_and_flat_files_load_to_the_same_settings() {
    let cfg = FinetuneConfig::from_args(&parse(FLAGS)).unwrap();
    let text = cfg.to_toml().unwrap();
    for section in [
        "[data]",
        "[optim]",
        "[loop]",
        "[lora]",
        "[spt]",
        "[spt.attention]",
        "[spt.ffn]",
    ] {
        assert!(text.contains(section), "{section} missing from\n{text}");
    }
    assert!(
        text.contains("top_k = 4") && !text.contains("ffn_top_k"),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("finetune.toml");
    std::fs::write(&t, &text).unwrap();
    assert_eq!(FinetuneConfig::load(&t).unwrap(), cfg);
    // Flat (TOML above, as older runs wrote it; without a preset key, so through from_args,
    // which applies the preset as the flags did) and mixed forms.
    std::fs::write(&t, TOML).unwrap();
    let flat = FinetuneConfig::from_args(&parse(&["--config", t.to_str().unwrap()])).unwrap();
    assert_eq!(flat, cfg);
    let mixed = "model = \"m\"\nlr = 0.01\n[spt.ffn]\ntop_k = 3\n[lora]\nrank = 4\n";
    std::fs::write(&t, mixed).unwrap();
    let m = FinetuneConfig::load(&t).unwrap();
    assert_eq!((m.lr, m.ffn_top_k, m.lora_rank), (0.01, 3, 4));
    std::fs::write(&t, "lr = 0.01\n[optim]\nlr = 0.02\n").unwrap();
    let e = FinetuneConfig::load(&t).unwrap_err().to_string();
    assert!(e.contains("twice") && e.contains("optim.lr"), "{e}");
    std::fs::write(&t, "[spt.ffn]\ntopk = 3\n").unwrap();
    let e = FinetuneConfig::load(&t).unwrap_err().to_string();
    assert!(e.contains("`spt.ffn.topk`"), "{e}");
    // JSON keeps the last of a repeated key without a word (a whole `optim` block was lost).
    let j = dir.path().join("finetune.json");
    for text in [
        r#"{"model": "m", "optim": {"lr": 0.5}, "optim": {"max_steps": 3}}"#,
        r#"{"model": "m", "optim": {"lr": 0.5, "lr": 0.1}}"#,
    ] {
        std::fs::write(&j, text).unwrap();
        let e = FinetuneConfig::load(&j).unwrap_err().to_string();
        assert!(
            e.contains("finetune.json") && e.contains("appears twice"),
            "{text}: {e}"
        );
    }
}

#[test]
fn set_overrides_any_setting_by_its_section() {
    let base = ["--model", "m", "--train-file", "a.csv", "--mode", "spt"];
    let with = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        FinetuneConfig::from_args(&parse(&v))
    };
    let c = with(&[
        "--set",
        "spt.ffn.top_k=6",
        "--set",
        "optim.lr=1e-3",
        "--set",
        "spt.ffn.correction=true",
        "--set",
        "data.format=csv",
        "--set",
        "seed=7",
        "--ffn-top-k",
        "2",
    ])
    .unwrap();
    assert_eq!(
        (c.ffn_top_k, c.lr, c.ffn_correction, c.format, c.seed),
        (6, 1e-3, true, Some(crate::data::DataFormat::Csv), 7)
    );
    let e = with(&["--set", "spt.ffn.topk=6"]).unwrap_err().to_string();
    assert!(e.contains("spt.ffn.topk") && e.contains("no such setting"), "{e}");
    // A key without its section, or a flat field's name, is pointed at its path.
    let e = with(&["--set", "lr=0.1"]).unwrap_err().to_string();
    assert!(e.contains("did you mean optim.lr?"), "{e}");
    let e = with(&["--set", "ffn_top_k=2"]).unwrap_err().to_string();
    assert!(e.contains("did you mean spt.ffn.top_k?"), "{e}");
    let e = with(&["--set", "optim.rank=4"]).unwrap_err().to_string();
    assert!(e.contains("did you mean lora.rank?"), "{e}");
    let e = with(&["--set", "optim.lr=fast"]).unwrap_err().to_string();
    assert!(e.contains("--set") || e.contains("set"), "{e}");
    // The result is validated like the flags.
    let e = with(&["--set", "spt.ffn.top_k=9"]).unwrap_err().to_string();
    assert!(e.contains("ffn_top_k"), "{e}");
    // NaN and infinity, which JSON cannot hold, are named instead of silently unset: in a
    // --set value, in a flag beside a --set, and in a TOML file.
    let e = with(&["--set", "spt.attention.k_fraction=nan"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("spt.attention.k_fraction") && e.contains("not a finite number"),
        "{e}"
    );
    let e = with(&["--attn-k-fraction", "NaN", "--set", "seed=1"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("attn_k_fraction") && e.contains("not a finite number"),
        "{e}"
    );
    let e = with(&["--lr", "inf", "--set", "seed=1"]).unwrap_err().to_string();
    assert!(e.contains("lr") && e.contains("not a finite number"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("nan.toml");
    std::fs::write(&t, "model = \"m\"\n[spt.attention]\nk_fraction = nan\n").unwrap();
    let e = FinetuneConfig::load(&t).unwrap_err().to_string();
    assert!(
        e.contains("nan.toml") && e.contains("spt.attention.k_fraction") && e.contains("finite"),
        "{e}"
    );
    // A value of the wrong type is named by its key, in a file and in --set.
    for (text, key) in [
        ("model = \"m\"\n[optim]\nlr = \"fast\"\n", "optim.lr"),
        ("model = \"m\"\n[optim]\nbatch_size = -1\n", "optim.batch_size"),
        ("model = \"m\"\n[optim]\nbatch_size = 1.5\n", "optim.batch_size"),
    ] {
        std::fs::write(&t, text).unwrap();
        let e = FinetuneConfig::load(&t).unwrap_err().to_string();
        assert!(e.contains("nan.toml") && e.contains(key), "{text}: {e}");
    }
    let e = with(&["--set", "optim.batch_size=-1"]).unwrap_err().to_string();
    assert!(e.contains("optim.batch_size"), "{e}");
    // A setting given twice is refused, naming both.
    let e = with(&["--set", "optim.lr=1e-3", "--set", "optim.lr=2e-3"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("optim.lr=1e-3") && e.contains("optim.lr=2e-3") && e.contains("once"),
        "{e}"
    );
}

/// Every "(default: X)" that `finetune --help` states is the value a run gets without the flag.
#[test]
fn help_states_the_real_defaults() {
    use clap::CommandFactory;
    let help = Cli::command().render_long_help().to_string();
    let d = FinetuneConfig::default();
    let lr = |m| format!("{:e}", crate::presets::default_lr(m));
    let schedule = format!("{:?}", d.schedule).to_lowercase();
    let expected: Vec<(&str, String)> = vec![
        ("--task", format!("{:?}", d.task).to_lowercase()),
        ("--validation-split", d.validation_split.to_string()),
        ("--text-column", d.text_column.clone()),
        ("--label-column", d.label_column.clone()),
        ("--output-dir", d.output_dir.display().to_string()),
        ("--mode", format!("{:?}", d.mode).to_lowercase()),
        ("--ffn-blocks", d.ffn_blocks.to_string()),
        ("--lora-rank", d.lora_rank.to_string()),
        ("--lora-alpha", d.lora_alpha.to_string()),
        ("--epochs", d.epochs.to_string()),
        ("--batch-size", d.batch_size.to_string()),
        ("--grad-accum", d.grad_accum.to_string()),
        (
            "--lr",
            format!("dense {}, lora and spt {}", lr(Mode::Dense), lr(Mode::Lora)),
        ),
        ("--warmup-ratio", d.warmup_ratio.to_string()),
        ("--schedule", schedule),
        ("--weight-decay", d.weight_decay.to_string()),
        ("--max-grad-norm", d.max_grad_norm.to_string()),
        ("--seed", d.seed.to_string()),
        ("--eval-every", d.eval_every.to_string()),
        ("--save-every", d.save_every.to_string()),
        ("--device", d.device.clone()),
    ];
    assert_eq!(lr(Mode::Lora), lr(Mode::Spt));
    for (flag, value) in expected {
        // The flag's entry: from its line to the next flag's.
        let start = help
            .find(&format!("      {flag} "))
            .unwrap_or_else(|| panic!("{flag} is not in the help"));
        let rest = &help[start + flag.len() + 6..];
        let entry = &rest[..rest.find("\n      --").unwrap_or(rest.len())];
        let entry = entry.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            entry.contains(&format!("(default: {value})")),
            "{flag}: the help says `{entry}`, the default is {value}"
        );
    }
}

#[test]
fn an_empty_modules_to_save_turns_the_presets_pooler_off() {
    let base = ["--model", "m", "--train-file", "t.csv", "--preset", "fast"];
    let cfg = |extra: &[&str]| {
        let argv: Vec<&str> = base.iter().chain(extra).copied().collect();
        FinetuneConfig::from_args(&parse(&argv)).unwrap()
    };
    assert_eq!(cfg(&[]).modules_to_save, vec!["pooler".to_string()]);
    assert!(cfg(&["--modules-to-save", ""]).modules_to_save.is_empty());
    assert_eq!(
        cfg(&["--modules-to-save", "pooler,"]).modules_to_save,
        vec!["pooler".to_string()]
    );
}

/// Flags that change nothing in the run are said (as warnings), each by its name.
#[test]
fn settings_without_effect_are_named() {
    let base = ["--model", "m", "--train-file", "a.csv"];
    let unused = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        FinetuneConfig::from_args(&parse(&v)).unwrap().unused_settings()
    };
    assert!(unused(&[]).is_empty());
    assert!(unused(&["--mode", "spt", "--attn-k-fraction", "0.25", "--attn-tile", "64"]).is_empty());
    let u = unused(&["--split-by", "movie", "--validation-file", "b.csv"]);
    assert!(u.len() == 1 && u[0].contains("--split-by"), "{u:?}");
    let u = unused(&["--modules-to-save", "pooler"]);
    assert!(u.len() == 1 && u[0].contains("dense mode"), "{u:?}");
    let u = unused(&["--mode", "spt", "--attn-tile", "64"]); // the fast preset keeps every key
    assert!(u.len() == 1 && u[0].contains("--attn-tile"), "{u:?}");
    // The same data file twice, by two spellings, and validation rows that are training rows.
    let u = unused(&["--train-file", "./a.csv", "--validation-file", "b.csv"]);
    assert!(u.len() == 1 && u[0].contains("more than once"), "{u:?}");
    let u = unused(&["--validation-file", "a.csv"]);
    assert!(u.len() == 1 && u[0].contains("also a training file"), "{u:?}");
    let u = unused(&["--validation-file", "b.csv", "--validation-file", "./b.csv"]);
    assert!(u.len() == 1 && u[0].contains("validation_files"), "{u:?}");
    assert!(unused(&["--train-file", "b.csv", "--validation-file", "c.csv"]).is_empty());
}

#[test]
fn flags_another_mode_uses_are_named() {
    let a = FinetuneArgs {
        lora_rank: Some(4),
        ffn_top_k: Some(3),
        attn_k_fraction: Some(0.5),
        ..FinetuneArgs::default()
    };
    assert_eq!(
        a.flags_ignored_in(Mode::Dense),
        ["--lora-rank", "--attn-k-fraction", "--ffn-top-k"]
    );
    assert_eq!(
        a.flags_ignored_in(Mode::Lora),
        ["--attn-k-fraction", "--ffn-top-k"]
    );
    assert!(a.flags_ignored_in(Mode::Spt).is_empty());
    assert!(FinetuneArgs::default().flags_ignored_in(Mode::Dense).is_empty());
}

/// A hand-written config file that names only a mode (or a preset) is read over that mode's
/// defaults, as `finetune --config` reads it: `eval --config` must build the model the run
/// trained, not a dense-default one.
#[test]
fn a_partial_config_file_is_read_over_its_modes_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("my.toml");
    for text in [
        "mode = \"lora\"\n",
        "preset = \"accurate\"\n",
        "mode = \"spt\"\ntask = \"lm\"\n",
        "mode = \"spt\"\n[spt.attention]\nk_fraction = 0.25\n",
    ] {
        std::fs::write(&t, format!("model = \"m\"\ntrain_files = [\"a.csv\"]\n{text}")).unwrap();
        let loaded = FinetuneConfig::load(&t).unwrap();
        let flags = FinetuneConfig::from_args(&parse(&["--config", t.to_str().unwrap()])).unwrap();
        assert_eq!(loaded, flags, "{text}");
    }
    std::fs::write(&t, "mode = \"lora\"\n").unwrap();
    let lora = FinetuneConfig::load(&t).unwrap();
    assert_eq!(lora.lr, crate::presets::default_lr(Mode::Lora));
    assert_eq!(lora.modules_to_save, vec!["pooler".to_string()]);
    std::fs::write(&t, "preset = \"accurate\"\n").unwrap();
    let acc = FinetuneConfig::load(&t).unwrap();
    assert_eq!(acc.mode, Mode::Spt);
    assert_eq!(
        (acc.attn_k_fraction, acc.ffn_blocks, acc.ffn_top_k),
        (Some(1.0), 8, 6)
    );
    std::fs::write(&t, "mode = \"lora\"\npreset = \"fast\"\n").unwrap();
    let e = FinetuneConfig::load(&t).unwrap_err().to_string();
    assert!(e.contains("preset"), "{e}");
}

/// A run's own finetune.toml from before a setting existed is read (`load_run`, for the file
/// beside a checkpoint) over the plain defaults, as that run trained: an old LoRA run's pooler
/// stays frozen, an old spt run's attention is not the fast preset's. `load` (a `--config`
/// file) reads the same file over its mode's defaults, as finetune --config does.
#[test]
fn a_runs_own_settings_are_read_over_the_plain_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("finetune.toml");
    let run = "model = \"m\"\ntrain_files = [\"a.csv\"]\noutput_dir = \"runs/x\"\n";
    std::fs::write(&t, format!("{run}mode = \"lora\"\n")).unwrap();
    let old_lora = FinetuneConfig::load_run(&t).unwrap();
    assert_eq!((old_lora.mode, old_lora.modules_to_save.len()), (Mode::Lora, 0));
    assert_eq!(FinetuneConfig::load(&t).unwrap().modules_to_save, ["pooler"]);
    std::fs::write(&t, format!("{run}mode = \"spt\"\n")).unwrap();
    let old_spt = FinetuneConfig::load_run(&t).unwrap();
    assert_eq!((old_spt.preset, old_spt.attn_k_fraction), (None, None));
    // A complete file written by a run today reads the same either way.
    let today = crate::presets::base_config(Mode::Spt, crate::data::TaskKind::Classify, Some(Preset::Fast));
    let today = FinetuneConfig {
        model: "m".into(),
        train_files: vec!["a.csv".into()],
        ..today
    };
    std::fs::write(&t, today.to_toml().unwrap()).unwrap();
    assert_eq!(FinetuneConfig::load_run(&t).unwrap(), today);
    assert_eq!(FinetuneConfig::load(&t).unwrap(), today);
}

/// A flag overrides the config file for settings given two ways too: `--epochs` over the file's
/// max_steps (which kept winning), `--warmup-ratio` over its warmup_steps and `--attn-k` over its
/// k fraction (both refused as "not both"), `--preset` over its `mode = "dense"` (refused); and
/// so does `--set`. Classification settings in an LM run are named as having no effect.
#[test]
fn a_flag_replaces_the_files_other_form_of_a_setting() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("f.toml");
    let load = |text: &str, flags: &[&str]| {
        std::fs::write(&t, text).unwrap();
        let mut argv = vec!["--config", t.to_str().unwrap()];
        argv.extend_from_slice(flags);
        FinetuneConfig::from_args(&parse(&argv))
    };
    let base = "model = \"m\"\ntrain_files = [\"a.csv\"]\n";
    let c = load(&format!("{base}max_steps = 2\n"), &["--epochs", "1"]).unwrap();
    assert_eq!((c.max_steps, c.epochs), (None, 1));
    let c = load(&format!("{base}max_steps = 2\n"), &["--set", "optim.epochs=3"]).unwrap();
    assert_eq!((c.max_steps, c.epochs), (None, 3));
    let c = load(&format!("{base}warmup_steps = 2\n"), &["--warmup-ratio", "0.5"]).unwrap();
    assert_eq!((c.warmup_steps, c.warmup_ratio), (None, 0.5));
    let c = load(&format!("{base}warmup_ratio = 0.5\n"), &["--warmup-steps", "3"]).unwrap();
    assert_eq!((c.warmup_steps, c.warmup_ratio), (Some(3), 0.0));
    let spt = format!("{base}mode = \"spt\"\n[spt.attention]\nk_fraction = 0.5\n");
    let c = load(&spt, &["--attn-k", "4"]).unwrap();
    assert_eq!((c.attn_k, c.attn_k_fraction), (Some(4), None));
    let c = load(&spt, &["--set", "spt.attention.k=4"]).unwrap();
    assert_eq!((c.attn_k, c.attn_k_fraction), (Some(4), None));
    let c = load(&format!("{base}mode = \"dense\"\n"), &["--preset", "fast"]).unwrap();
    assert_eq!(c.mode, Mode::Spt);
    // Both forms on the command line are still refused.
    let e = load(base, &["--warmup-ratio", "0.5", "--warmup-steps", "3"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not both"), "{e}");
    // --set cannot choose the mode, preset or task: the defaults were already taken (a --set
    // mode=lora run kept dense's learning rate).
    let e = load(base, &["--max-steps", "5", "--set", "optim.epochs=3"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("replaces max_steps, which a flag gives"), "{e}");
    let e = load(base, &["--epochs", "3", "--set", "optim.max_steps=10"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("outranks --epochs"), "{e}");
    for set in ["mode=lora", "preset=fast", "task=lm"] {
        let e = load(base, &["--set", set]).unwrap_err().to_string();
        assert!(e.contains("give --") && e.contains("instead"), "{set}: {e}");
    }
    let c = load(
        &format!("{base}task = \"lm\"\nsplit_by = \"movie\"\n"),
        &["--drop-label", "x"],
    )
    .unwrap();
    let unused = c.unused_settings().join("\n");
    assert!(
        unused.contains("split_by") && unused.contains("drop_labels"),
        "{unused}"
    );
    // A file's LoRA and FFN settings in dense mode, and a block size for a classifier.
    let c = load(
        &format!("{base}mode = \"dense\"\nblock_size = 64\n[lora]\nrank = 4\n[spt.ffn]\ntop_k = 3\n"),
        &[],
    )
    .unwrap();
    assert_eq!(c.settings_ignored_in_mode(), ["lora_rank", "ffn_top_k"]);
    assert!(c.unused_settings().join("\n").contains("block_size"));
    let c = load(&format!("{base}mode = \"dense\"\n"), &[]).unwrap();
    assert!(c.settings_ignored_in_mode().is_empty() && c.unused_settings().is_empty());
}
