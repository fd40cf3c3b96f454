//! End to end on the tiny fixture models (BERT classifier, GPT-2 LM): fine-tune a few steps in
//! dense, LoRA and SPT mode through the same library path as `spt-train finetune`, then check
//! that the loss decreases, that `--resume` from a mid-run checkpoint equals the uninterrupted run
//! bit for bit, that a model rebuilt from the last checkpoint (as eval / predict / export do)
//! gives the trained logits, and that the exported Hugging Face directory reloads to the same
//! logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use spt_models::buffers::BufferKind;
use spt_models::{BertForSequenceClassification, GPT2LMHeadModel, LoadOptions};
use spt_train::checkpoint::{latest_checkpoint, load_checkpoint};
use spt_train::config::{FinetuneConfig, Mode};
use spt_train::data::TaskKind;
use spt_train::optim::ScheduleKind;
use spt_train::output_dir::prepare_run_dir;
use spt_train::pipeline::{load_tokenizer, prepare_data, PreparedData};
use spt_train::tasks::{calibration_batches, export_hf_dir, ModelTask};
use spt_train::trainer::{evaluate, Resume, StepCtx, TrainSummary, TrainTask, Trainer};

const WORDS: [&str; 20] = [
    "good", "bad", "great", "awful", "fine", "movie", "film", "plot", "the", "a", "was", "is", "very", "not",
    "fun", "boring", "story", "actor", "love", "hate",
];

/// SplitMix64, for the generated data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// A word-level `tokenizer.json` over [`WORDS`] (the fixtures ship no tokenizer).
fn write_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[PAD]", "[UNK]", "<|endoftext|>"]
        .iter()
        .chain(WORDS.iter())
        .enumerate()
    {
        vocab.insert((*w).to_string(), i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

fn fixture(name: &str, root: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/spt-models/tests/fixtures")
        .join(name);
    let dst = root.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    write_tokenizer(&dst);
    dst
}

/// Sentences whose label is given by a keyword, grouped by "movie".
fn write_csv(path: &Path) {
    let mut r = Rng(1);
    let pos = ["good", "great", "fine", "fun", "love"];
    let neg = ["bad", "awful", "boring", "hate", "not"];
    let filler = [
        "movie", "film", "plot", "the", "a", "was", "is", "very", "story", "actor",
    ];
    let mut s = String::from("text,label,movie\n");
    for i in 0..160 {
        // Three classes, as the fixture's head: a positive word, a negative word, or neither.
        let class = r.next() % 3;
        let mut ws: Vec<&str> = (0..4 + r.next() % 8).map(|_| r.pick(&filler)).collect();
        let at = (r.next() % (ws.len() as u64 + 1)) as usize;
        match class {
            0 => ws.insert(at, r.pick(&pos)),
            1 => ws.insert(at, r.pick(&neg)),
            _ => {}
        }
        let label = ["pos", "neg", "neutral"][class as usize];
        s.push_str(&format!("{},{label},m{}\n", ws.join(" "), i % 20));
    }
    std::fs::write(path, s).unwrap();
}

fn write_text(path: &Path) {
    let mut r = Rng(2);
    let mut s = String::new();
    // A repetitive pattern with some noise: learnable in a few steps.
    for _ in 0..120 {
        let line: Vec<&str> = (0..10)
            .map(|j| {
                if r.next().is_multiple_of(4) {
                    r.pick(&WORDS)
                } else {
                    WORDS[j % 6]
                }
            })
            .collect();
        s.push_str(&line.join(" "));
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

fn config(model: &Path, task: TaskKind, train: &Path, out: &Path, mode: Mode) -> FinetuneConfig {
    FinetuneConfig {
        model: model.display().to_string(),
        task,
        train_files: vec![train.to_path_buf()],
        validation_split: 0.2,
        split_by: (task == TaskKind::Classify).then(|| "movie".to_string()),
        block_size: 16,
        output_dir: out.to_path_buf(),
        mode,
        attn_k: Some(4),
        ffn_blocks: 4,
        ffn_top_k: 2,
        pq_refresh_every: 5,
        max_steps: Some(16),
        batch_size: 8,
        lr: 3e-3,
        schedule: ScheduleKind::Linear,
        warmup_steps: Some(2),
        save_every: 8,
        keep_last: 0,
        log_every: 1,
        seed: 11,
        progress: false,
        ..FinetuneConfig::default()
    }
}

/// A temp dir holding the tiny GPT-2 fixture and a training text: `(dir, model, train file)`.
fn tiny_gpt2_with_text() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gpt2", root.path());
    let train = root.path().join("train.txt");
    write_text(&train);
    (root, model, train)
}

/// The data and the task as `finetune` builds them (spt: calibrated on 2 batches of 8), untrained.
fn build_task(cfg: &FinetuneConfig, data_out: Option<&Path>) -> (ModelTask, PreparedData) {
    let dev = Device::Cpu;
    let model_dir = PathBuf::from(&cfg.model);
    let tok = load_tokenizer(cfg, &model_dir).unwrap();
    let data = prepare_data(cfg, &tok, data_out).unwrap();
    let calib = if cfg.mode == Mode::Spt {
        calibration_batches(&data.train, 2, 8, cfg.seed, &dev).unwrap()
    } else {
        Vec::new()
    };
    let nl = data.labels.as_ref().map(|l| l.len());
    let task = ModelTask::build(cfg, &model_dir, nl, &dev, calib).unwrap();
    (task, data)
}

/// What `spt-train finetune` does, through the library.
fn run(cfg: &FinetuneConfig, resume: Resume) -> (TrainSummary, ModelTask, PreparedData) {
    let dev = Device::Cpu;
    let _lock = prepare_run_dir(&cfg.output_dir, true, resume != Resume::No).unwrap();
    let (task, data) = build_task(cfg, Some(&cfg.output_dir));
    let mut trainer = Trainer::new(task, cfg.trainer_config(data.train.len()), dev);
    let summary = trainer
        .train(&data.train, data.validation.as_ref(), &resume)
        .unwrap();
    (summary, trainer.into_task(), data)
}

/// What eval / predict / export do: build without calibration, then restore a checkpoint's
/// tensors (PQ codebooks and FFN unit orders from `extra`, then the trained values).
fn rebuild(
    cfg: &FinetuneConfig,
    model: &Path,
    num_labels: Option<usize>,
    tensors: &HashMap<String, Tensor>,
    extra: &HashMap<String, Tensor>,
) -> ModelTask {
    let mut task = ModelTask::build(cfg, model, num_labels, &Device::Cpu, Vec::new()).unwrap();
    task.load_trained(tensors, extra).unwrap();
    task
}

fn mean(xs: &[(u64, f32)]) -> f32 {
    xs.iter().map(|x| x.1).sum::<f32>() / xs.len() as f32
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    spt::ops::gradcheck::max_abs_diff(a, b).unwrap() as f32
}

/// Fine-tunes `model` in every mode: loss falls, resume is bit-exact, export reloads equal.
fn check_model(name: &str, task: TaskKind) {
    let root = tempfile::tempdir().unwrap();
    let model = fixture(name, root.path());
    let train = root.path().join(if task == TaskKind::Classify {
        "train.csv"
    } else {
        "train.txt"
    });
    if task == TaskKind::Classify {
        write_csv(&train);
    } else {
        write_text(&train);
    }
    for mode in [Mode::Dense, Mode::Lora, Mode::Spt] {
        let out = root.path().join(format!("run-{mode:?}"));
        let cfg = config(&model, task, &train, &out, mode);
        let (full, mut trained, data) = run(&cfg, Resume::No);
        let l = &full.train_losses;
        assert_eq!(l.len(), 16, "{name} {mode:?}: one loss per step");
        let (first, last) = (mean(&l[..4]), mean(&l[l.len() - 4..]));
        assert!(
            last < first,
            "{name} {mode:?}: loss did not decrease ({first} -> {last}): {l:?}"
        );

        // Resume from the step-8 checkpoint into a fresh directory (a fork): same losses, bit for bit.
        let out2 = root.path().join(format!("resumed-{mode:?}"));
        let ck = out.join("checkpoints/step-00000008");
        assert!(ck.is_dir(), "{name} {mode:?}: no mid-run checkpoint");
        let mut cfg2 = cfg.clone();
        cfg2.output_dir = out2;
        let (resumed, _, _) = run(&cfg2, Resume::From(ck));
        assert_eq!(resumed.resumed_from, Some(8));
        let tail: Vec<(u64, u32)> = l[8..].iter().map(|&(s, x)| (s, x.to_bits())).collect();
        let got: Vec<(u64, u32)> = resumed
            .train_losses
            .iter()
            .map(|&(s, x)| (s, x.to_bits()))
            .collect();
        assert_eq!(
            got, tail,
            "{name} {mode:?}: resumed losses differ from the uninterrupted run"
        );

        let valid = data.validation.as_ref().unwrap_or(&data.train);
        let idx: Vec<usize> = (0..valid.len().min(8)).collect();
        let batch = valid.batch(&idx, &Device::Cpu).unwrap();

        // What eval / predict / export do: build without calibration, then restore the last
        // checkpoint (PQ codebooks, FFN unit orders, trained values): the trained model's logits.
        let ck = load_checkpoint(
            &latest_checkpoint(&out.join("checkpoints")).unwrap(),
            &Device::Cpu,
        )
        .unwrap();
        if mode == Mode::Spt {
            assert!(
                ck.extra
                    .keys()
                    .any(|k| k.starts_with(BufferKind::FfnUnitOrder.prefix())),
                "{name}: the SPT checkpoint holds no FFN unit order: {:?}",
                ck.extra.keys()
            );
        }
        let nl = data.labels.as_ref().map(|l| l.len());
        if mode == Mode::Spt {
            let pq = BufferKind::PqCodebook.prefix();
            assert!(
                ck.extra.keys().any(|k| k.starts_with(pq)),
                "{name}: k = 4 but the checkpoint holds no PQ codebook"
            );
            // Keeping every key is dense attention: no codebook is fitted, refreshed or saved.
            let every = FinetuneConfig {
                attn_k: None,
                attn_k_fraction: Some(1.0),
                ..cfg.clone()
            };
            let calib = calibration_batches(&data.train, 1, 4, cfg.seed, &Device::Cpu).unwrap();
            let mut t = ModelTask::build(&every, &model, nl, &Device::Cpu, calib).unwrap();
            assert_eq!(t.sparse_layers(), 0, "{name}: every key kept, yet sparse layers");
            let state = t.extra_state().unwrap();
            assert!(
                !state.keys().any(|k| k.starts_with(pq)) && !state.is_empty(),
                "{name}: every key kept: {:?}",
                state.keys()
            );
        }
        let restored = rebuild(&cfg, &model, nl, &ck.model, &ck.extra);
        let d = max_abs_diff(
            &restored.net.forward(&batch, false).unwrap(),
            &trained.net.forward(&batch, false).unwrap(),
        );
        assert!(
            d < 1e-5,
            "{name} {mode:?}: the restored model's logits differ by {d}"
        );
        // The step-8 checkpoint's logits are not the last one's: a restore that kept the values
        // the model was built with would not pass the check above by accident.
        let mid = load_checkpoint(&out.join("checkpoints/step-00000008"), &Device::Cpu).unwrap();
        let at8 = rebuild(&cfg, &model, nl, &mid.model, &mid.extra);
        let moved = max_abs_diff(
            &at8.net.forward(&batch, false).unwrap(),
            &trained.net.forward(&batch, false).unwrap(),
        );
        assert!(
            moved > 1e-3,
            "{name} {mode:?}: steps 8 to 16 moved the logits by only {moved}"
        );

        // Export (LoRA merged, HF names) and reload as a plain model: equal logits.
        let export = root.path().join(format!("export-{mode:?}"));
        export_hf_dir(&mut trained, &model, None, data.labels.as_ref(), &export, false).unwrap();
        // The sparse model is a training-time approximation; the export is its dense form: the
        // trained values in a LoRA model. The checkpoint holds a routed FFN's factors in its
        // regrouped unit order; put back in the pretrained order, the LoRA model computes the
        // dense function that the export (written in the regrouped order) must compute too.
        let dense_form = (mode == Mode::Spt).then(|| {
            let lora = FinetuneConfig {
                mode: Mode::Lora,
                ..cfg.clone()
            };
            let mut trained: HashMap<String, Tensor> = ck
                .model
                .iter()
                .filter(|(k, _)| !k.contains(".router."))
                .map(|(k, t)| (k.clone(), t.clone()))
                .collect();
            let order_prefix = BufferKind::FfnUnitOrder.prefix();
            for (buf, order) in ck.extra.iter().filter(|(k, _)| k.starts_with(order_prefix)) {
                let layer = &buf[order_prefix.len()..];
                let order = order.to_vec1::<u32>().unwrap();
                let mut inverse = vec![0u32; order.len()];
                for (j, &u) in order.iter().enumerate() {
                    inverse[u as usize] = j as u32;
                }
                let inverse = Tensor::new(inverse, &Device::Cpu).unwrap();
                for (name, t) in trained.iter_mut() {
                    if !name.contains(&format!(".{layer}.")) {
                        continue;
                    }
                    // fc1's B rows and fc2's A columns are hidden units.
                    if name.ends_with("lora_B.weight") && t.dim(0).unwrap() == order.len() {
                        *t = t.index_select(&inverse, 0).unwrap();
                    } else if name.ends_with("lora_A.weight") && t.dim(1).unwrap() == order.len() {
                        *t = t.index_select(&inverse, 1).unwrap();
                    }
                }
            }
            rebuild(&lora, &model, nl, &trained, &HashMap::new())
        });
        {
            let ours = match &dense_form {
                Some(t) => t.net.forward(&batch, false).unwrap(),
                None => trained.net.forward(&batch, false).unwrap(),
            };
            let theirs = match task {
                TaskKind::Classify => {
                    let (m, rep) =
                        BertForSequenceClassification::from_dir(&export, &LoadOptions::frozen(), None)
                            .unwrap();
                    assert!(
                        rep.initialised.is_empty(),
                        "{mode:?}: export lacks {:?}",
                        rep.initialised
                    );
                    m.forward_t(
                        &batch.input_ids,
                        Some(&batch.token_type_ids),
                        Some(&batch.attention_mask),
                        false,
                    )
                    .unwrap()
                }
                TaskKind::Lm => {
                    let (m, _) = GPT2LMHeadModel::from_dir(&export, &LoadOptions::frozen()).unwrap();
                    m.forward_t(&batch.input_ids, Some(&batch.attention_mask), false)
                        .unwrap()
                }
            };
            let d = max_abs_diff(&ours, &theirs);
            assert!(d < 1e-4, "{name} {mode:?}: exported logits differ by {d}");
        }
        // The exported directory is a loadable model with its tokenizer.
        assert!(export.join("tokenizer.json").is_file());
        let r = evaluate(&mut trained, valid, 8, &Device::Cpu).unwrap();
        assert!(r.loss.is_finite());
    }
}

#[test]
fn bert_classifier_dense_lora_spt() {
    check_model("tiny-bert-cls", TaskKind::Classify);
}

#[test]
fn gpt2_lm_dense_lora_spt() {
    check_model("tiny-gpt2", TaskKind::Lm);
}

#[test]
fn router_aux_weight_adds_the_balancing_loss_in_training_only() {
    let (root, model, train) = tiny_gpt2_with_text();
    let dev = Device::Cpu;
    let build = |w: f64| {
        let mut cfg = config(&model, TaskKind::Lm, &train, &root.path().join("aux"), Mode::Spt);
        cfg.router_aux_weight = w;
        cfg.router_lr_scale = Some(1.0);
        let (task, data) = build_task(&cfg, None);
        let idx: Vec<usize> = (0..8).collect();
        (task, data.train.batch(&idx, &dev).unwrap())
    };
    let loss = |task: &mut ModelTask, batch, train| -> f32 {
        let ctx = StepCtx {
            step: 0,
            micro: 0,
            seed: 3,
            train,
        };
        task.loss(batch, &ctx).unwrap().to_scalar().unwrap()
    };
    let (mut plain, batch) = build(0.0);
    let (mut aux, _) = build(0.5);
    let (p, a) = (loss(&mut plain, &batch, true), loss(&mut aux, &batch, true));
    // 0.5 × the mean Switch loss of 4 blocks, which lies in (0, 4].
    assert!(a - p > 0.0 && a - p <= 2.0 + 1e-5, "plain {p}, with aux {a}");
    let (p, a) = (loss(&mut plain, &batch, false), loss(&mut aux, &batch, false));
    assert_eq!(p, a, "evaluation must not add the balancing loss");
}

#[test]
fn router_lr_scale_zero_keeps_the_fitted_routers() {
    let (root, model, train) = tiny_gpt2_with_text();
    let trained_values = |scale: f64| {
        let mut cfg = config(&model, TaskKind::Lm, &train, &root.path().join("rl"), Mode::Spt);
        cfg.router_lr_scale = Some(scale);
        // The same calibration as `run`, without training: the routers as fitted.
        let (fitted, _) = build_task(&cfg, None);
        let (_, trained, _) = run(&cfg, Resume::No);
        let fitted: HashMap<String, Tensor> = fitted
            .trainable()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
            .collect();
        trained
            .trainable()
            .into_iter()
            .map(|(n, v)| {
                let d = max_abs_diff(v.as_tensor(), &fitted[&n]);
                (n, d)
            })
            .collect::<Vec<(String, f32)>>()
    };
    let frozen = trained_values(0.0);
    let routers: Vec<&(String, f32)> = frozen.iter().filter(|(n, _)| n.contains(".router.")).collect();
    assert!(!routers.is_empty(), "{frozen:?}");
    assert!(routers.iter().all(|(_, d)| *d == 0.0), "{routers:?}");
    assert!(
        frozen.iter().any(|(n, d)| n.contains(".lora_") && *d > 0.0),
        "the adapters did not train: {frozen:?}"
    );
    let free = trained_values(1.0);
    assert!(
        free.iter().any(|(n, d)| n.contains(".router.") && *d > 0.0),
        "at scale 1 the routers should train: {free:?}"
    );
}

#[test]
fn spt_without_adapters_trains_every_weight_through_the_sparse_layers() {
    let (root, model, train) = tiny_gpt2_with_text();
    let mut cfg = config(&model, TaskKind::Lm, &train, &root.path().join("full"), Mode::Spt);
    cfg.lora_rank = 0;
    let (summary, task, _) = run(&cfg, Resume::No);
    // Every scalar trains (base weights and routers), no LoRA factor exists, and the layers
    // are the sparse ones.
    assert_eq!(task.summary.trainable, task.summary.total, "{}", task.summary);
    let names: Vec<String> = task.trainable().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| !n.contains(".lora_")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("mlp.c_fc.weight")), "{names:?}");
    assert!(
        names.iter().any(|n| n.ends_with("mlp.router.weight")),
        "{names:?}"
    );
    // The routed FFN's own weights moved (they train through the routed op).
    let start = spt_models::WeightSource::from_dir(&model).unwrap();
    let (name, trained) = task
        .trainable()
        .into_iter()
        .find(|(n, _)| n.ends_with("h.0.mlp.c_fc.weight"))
        .unwrap();
    let initial = start
        .get(&name)
        .or_else(|| start.get(name.trim_start_matches("transformer.")))
        .unwrap();
    assert!(
        max_abs_diff(trained.as_tensor(), initial) > 0.0,
        "{name} did not train"
    );
    let report = task.sparsify_report.as_ref().expect("spt report");
    assert!(report
        .layers
        .iter()
        .all(|l| l.attention == "sparse" && l.ffn == "routed" && l.lora.is_empty()));
    let l = &summary.train_losses;
    let (first, last) = (mean(&l[..4]), mean(&l[l.len() - 4..]));
    assert!(last < first, "loss did not decrease ({first} -> {last}): {l:?}");
    // Lora mode still needs a rank.
    let mut bad = cfg.clone();
    bad.mode = Mode::Lora;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("at least 1 in lora mode"));
}

#[test]
fn corrections_restore_and_modules_to_save_train() {
    let root = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-cls", root.path());
    // A base checkpoint (like MiniLM's): no classifier, so the head is new.
    let weights = model.join("model.safetensors");
    let mut ts = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    ts.retain(|k, _| !k.starts_with("classifier."));
    candle_core::safetensors::save(&ts, &weights).unwrap();
    let train = root.path().join("train.csv");
    write_csv(&train);
    let mut cfg = config(
        &model,
        TaskKind::Classify,
        &train,
        &root.path().join("run"),
        Mode::Spt,
    );
    cfg.ffn_correction = true;
    cfg.modules_to_save = vec!["pooler".into()];
    let (_, trained, data) = run(&cfg, Resume::No);
    let names: Vec<String> = trained.trainable().into_iter().map(|(n, _)| n).collect();
    let start = spt_models::WeightSource::from_dir(&model).unwrap();
    let moved = |suffix: &str| {
        let (name, v) = trained
            .trainable()
            .into_iter()
            .find(|(n, _)| n.ends_with(suffix))
            .unwrap_or_else(|| panic!("no trainable `{suffix}` in {names:?}"));
        let initial = start
            .get(&name)
            .or_else(|| start.get(name.trim_start_matches("bert.")))
            .cloned()
            .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap());
        max_abs_diff(v.as_tensor(), &initial)
    };
    assert!(moved("pooler.dense.weight") > 0.0, "the pooler did not train");
    assert!(names.iter().any(|n| n == "classifier.weight"), "{names:?}");
    // Only the pooler joins the adapters, routers and head: the encoder's weights (and the
    // corrections, fitted constants) stay frozen.
    assert!(
        !names.iter().any(|n| n.ends_with("intermediate.dense.weight")
            || n.contains("skip")
            || n.contains("correction")),
        "{names:?}"
    );

    // Restored from the last checkpoint without calibration: the trained logits.
    let ck = load_checkpoint(
        &latest_checkpoint(&cfg.output_dir.join("checkpoints")).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let valid = data.validation.as_ref().unwrap_or(&data.train);
    let idx: Vec<usize> = (0..valid.len().min(8)).collect();
    let batch = valid.batch(&idx, &Device::Cpu).unwrap();
    let nl = data.labels.as_ref().map(|l| l.len());
    let restored = rebuild(&cfg, &model, nl, &ck.model, &ck.extra);
    let d = max_abs_diff(
        &restored.net.forward(&batch, false).unwrap(),
        &trained.net.forward(&batch, false).unwrap(),
    );
    assert!(d < 1e-5, "the restored model's logits differ by {d}");
    // The linear corrections come from the checkpoint (without them, the logits move).
    let prefix = BufferKind::FfnCorrection.prefix();
    let n = ck.extra.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(
        n,
        2,
        "one `{prefix}` tensor per routed layer: {:?}",
        ck.extra.keys()
    );
    let mut less = ck.extra.clone();
    less.retain(|k, _| !k.starts_with(prefix));
    let d = max_abs_diff(
        &rebuild(&cfg, &model, nl, &ck.model, &less)
            .net
            .forward(&batch, false)
            .unwrap(),
        &trained.net.forward(&batch, false).unwrap(),
    );
    assert!(d > 1e-4, "`{prefix}` changed nothing ({d})");
    // A checkpoint from before corrections existed (none saved) restores as the model without.
    let mut old = ck.extra.clone();
    old.retain(|k, _| !k.starts_with(prefix));
    let with = rebuild(&cfg, &model, nl, &ck.model, &old);
    let without_cfg = FinetuneConfig {
        ffn_correction: false,
        ..cfg.clone()
    };
    let without = rebuild(&without_cfg, &model, nl, &ck.model, &old);
    let d = max_abs_diff(
        &with.net.forward(&batch, false).unwrap(),
        &without.net.forward(&batch, false).unwrap(),
    );
    assert!(d == 0.0, "zero corrections changed the logits by {d}");
    // A checkpoint with skip biases (an option that was removed) is refused, naming the tensor.
    let mut removed = ck.extra.clone();
    removed.insert(
        "ffn_skip_bias.layer.1".into(),
        Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let mut task = ModelTask::build(&cfg, &model, nl, &Device::Cpu, Vec::new()).unwrap();
    let e = task
        .load_trained(&ck.model, &removed)
        .expect_err("a checkpoint with skip biases was accepted")
        .to_string();
    assert!(
        e.contains("`ffn_skip_bias.layer.1`") && e.contains("removed"),
        "{e}"
    );

    // A module name that matches nothing is an error naming it.
    cfg.modules_to_save = vec!["poolr".into()];
    let e = ModelTask::build(&cfg, &model, nl, &Device::Cpu, Vec::new())
        .err()
        .expect("unknown module accepted")
        .to_string();
    assert!(e.contains("`poolr`"), "{e}");
}

/// What predict, eval and generate run: the model frozen, the same logits, and nothing recorded
/// for a backward (the activations are freed as the forward goes), adapters and routers included.
#[test]
fn frozen_inference_gives_the_same_logits_and_records_nothing() {
    let root = tempfile::tempdir().unwrap();
    let bert = fixture("tiny-bert-cls", root.path());
    let csv = root.path().join("d.csv");
    write_csv(&csv);
    let (_lm_root, gpt2, text) = tiny_gpt2_with_text();
    let cases = [(&bert, TaskKind::Classify, &csv), (&gpt2, TaskKind::Lm, &text)];
    // spt twice: with every key kept (the presets: fused dense attention) and with PQ-selected
    // keys (k = 4), which routes the last layer's tokens otherwise.
    for ((model, kind, data), (mode, pq)) in cases.into_iter().flat_map(|c| {
        [
            (Mode::Dense, false),
            (Mode::Lora, false),
            (Mode::Spt, false),
            (Mode::Spt, true),
        ]
        .map(|m| (c, m))
    }) {
        let mut cfg = config(model, kind, data, &root.path().join("out"), mode);
        if !pq {
            cfg.attn_k = None;
        }
        let (mut task, data) = build_task(&cfg, None);
        let idx: Vec<usize> = (0..8).collect();
        let batch = data.train.batch(&idx, &Device::Cpu).unwrap();
        let before = task.net.forward(&batch, false).unwrap();
        assert!(
            before.track_op(),
            "{kind:?} {mode:?}: the trainable model records its ops"
        );
        task.net.freeze().unwrap();
        let after = task.net.forward(&batch, false).unwrap();
        assert!(
            !after.track_op(),
            "{kind:?} {mode:?}: a frozen model records nothing"
        );
        // spt: a routed FFN block that holds a single token row multiplies it by `gemv` when
        // nothing is tracked (`lora::few_rows_matmul`, the decoding path) and by gemm when the
        // row is tracked, so the last bits can differ where the routing puts one row in a block
        // (the last layer's 8 first positions with PQ-selected keys: 1.9e-9 in the logits).
        // Dense and LoRA are exact.
        let tol = if mode == Mode::Spt { 1e-6 } else { 0.0 };
        let diff = max_abs_diff(&before, &after);
        assert!(diff <= tol, "{kind:?} {mode:?} pq {pq}: {diff}");
    }
}
