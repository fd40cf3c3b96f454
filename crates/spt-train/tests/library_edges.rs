//! Edge cases of the public spt-train library API: checkpoints, resuming, metrics files, AdamW,
//! batches and loading a trained model. Each was wrong before a fix (the comments say how).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};
use spt_train::checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint, CheckpointData, FsIo};
use spt_train::config::{FinetuneConfig, Mode};
use spt_train::data::EncodedDataset;
use spt_train::data::{make_batch, Batch, EncodedItem, TaskKind};
use spt_train::metrics::{MetricRecord, MetricsWriter};
use spt_train::optim::{AdamW, AdamWConfig};
use spt_train::presets::base_config;
use spt_train::tasks::ModelTask;
use spt_train::trainer::{check_settings, Resume, StepCtx, TrainTask, Trainer, TrainerConfig};

fn cpu() -> Device {
    Device::Cpu
}

fn var(vals: &[f32]) -> Var {
    Var::from_tensor(&Tensor::new(vals, &cpu()).unwrap()).unwrap()
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A checkpoint's data with one model tensor `w`.
fn ck(step: u64, w: &[f32]) -> CheckpointData {
    let mut model = BTreeMap::new();
    model.insert("w".to_string(), Tensor::new(w, &cpu()).unwrap());
    CheckpointData {
        step,
        model,
        ..Default::default()
    }
}

fn quad_grads(w: &Var) -> Result<candle_core::backprop::GradStore> {
    let target = Tensor::new(&[3.0f32, -1.0], &cpu())?;
    (w.as_tensor() - target)?.sqr()?.sum_all()?.backward()
}

// ---------------------------------------------------------------------------------------------
// checkpoint.rs
// ---------------------------------------------------------------------------------------------

/// Before the fix: keep_last pruning (checkpoint.rs save_checkpoint, `cut = all[len-keep_last]`) ranks
/// by step number and can delete the checkpoint it has just written; save_checkpoint then returns
/// the path of a folder that no longer exists.
#[test]
fn keep_last_never_prunes_the_checkpoint_just_written() {
    let d = tmp();
    let dir = d.path().join("checkpoints");
    save_checkpoint(&dir, &ck(9, &[9.0]), 0, &FsIo).unwrap();
    let p = save_checkpoint(&dir, &ck(3, &[3.0]), 1, &FsIo).unwrap();
    assert!(
        p.join("manifest.json").is_file(),
        "save_checkpoint returned {} but pruned it itself",
        p.display()
    );
    load_checkpoint(&p, &cpu()).unwrap();
}

/// Before the fix: list_checkpoints (used by keep_last) counts any `step-N/` folder holding a file
/// named manifest.json, even one spt-train did not write; such a folder takes a keep_last slot, so
/// fewer real checkpoints than keep_last are kept (here step 1 is deleted with keep_last = 2).
#[test]
fn keep_last_counts_only_real_checkpoints() {
    let d = tmp();
    let dir = d.path().join("checkpoints");
    let foreign = dir.join("step-00000050");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("manifest.json"), b"my own notes, not a checkpoint").unwrap();
    let p1 = save_checkpoint(&dir, &ck(1, &[1.0]), 2, &FsIo).unwrap();
    let p2 = save_checkpoint(&dir, &ck(2, &[2.0]), 2, &FsIo).unwrap();
    assert!(p2.join("manifest.json").is_file());
    assert!(
        p1.join("manifest.json").is_file(),
        "keep_last = 2 with two real checkpoints removed one of them (a foreign folder took its slot)"
    );
    // The foreign folder is untouched.
    assert!(foreign.join("manifest.json").is_file());
}

/// A checkpoint of ours whose manifest was cut short (disk damage) is still listed, so that
/// loading the latest names the damage instead of an older checkpoint being used in silence;
/// a `manifest.json` that is whole JSON of another kind is someone else's.
#[test]
fn a_damaged_manifest_is_named_not_skipped() {
    let d = tmp();
    let dir = d.path().join("checkpoints");
    save_checkpoint(&dir, &ck(1, &[1.0]), 0, &FsIo).unwrap();
    let p2 = save_checkpoint(&dir, &ck(2, &[2.0]), 0, &FsIo).unwrap();
    let m = p2.join("manifest.json");
    let text = std::fs::read(&m).unwrap();
    std::fs::write(&m, &text[..text.len() / 2]).unwrap();
    assert_eq!(latest_checkpoint(&dir).unwrap(), p2);
    let e = load_checkpoint(&p2, &cpu()).unwrap_err().to_string();
    assert!(e.contains("step-00000002") && e.contains("manifest.json"), "{e}");
    std::fs::write(&m, br#"{"format": "someone-else", "step": 2}"#).unwrap();
    assert_ne!(latest_checkpoint(&dir).unwrap(), p2);
}

/// A checkpoint copied under another step's name (a user's backup) is no checkpoint of the run:
/// taken as its latest, a resume went back to the copy's step and wrote over the checkpoints
/// after it.
#[test]
fn a_checkpoint_copied_under_another_name_is_not_the_latest() {
    let d = tmp();
    let dir = d.path().join("checkpoints");
    let p1 = save_checkpoint(&dir, &ck(1, &[1.0]), 0, &FsIo).unwrap();
    let p2 = save_checkpoint(&dir, &ck(2, &[2.0]), 0, &FsIo).unwrap();
    let copy = dir.join("step-00000050");
    std::fs::create_dir(&copy).unwrap();
    for f in std::fs::read_dir(&p1).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    assert_eq!(latest_checkpoint(&dir).unwrap(), p2);
    let e = load_checkpoint(&copy, &cpu()).unwrap_err().to_string();
    assert!(e.contains("step 1") && e.contains("step 50"), "{e}");
    // Not pruned either.
    save_checkpoint(&dir, &ck(3, &[3.0]), 1, &FsIo).unwrap();
    assert!(copy.join("manifest.json").is_file());
    // Nor replaced by a save at the step its name says: that save is refused.
    let before = std::fs::read(copy.join("model.safetensors")).unwrap();
    let e = save_checkpoint(&dir, &ck(50, &[5.0]), 0, &FsIo)
        .unwrap_err()
        .to_string();
    assert!(e.contains("did not write"), "{e}");
    assert_eq!(std::fs::read(copy.join("model.safetensors")).unwrap(), before);
}

/// A checkpoint whose manifest is damaged cannot vouch for its files: removing it (a resume's
/// `--overwrite`) is refused before anything goes, and pruning passes it by. It was reported
/// removed, and nothing was.
#[test]
fn a_damaged_checkpoint_is_not_removed_as_if_it_were_whole() {
    let d = tmp();
    let dir = d.path().join("checkpoints");
    let p1 = save_checkpoint(&dir, &ck(1, &[1.0]), 0, &FsIo).unwrap();
    let p2 = save_checkpoint(&dir, &ck(2, &[2.0]), 0, &FsIo).unwrap();
    let m = p1.join("manifest.json");
    let text = std::fs::read(&m).unwrap();
    std::fs::write(&m, &text[..text.len() / 3]).unwrap();
    let e = spt_train::checkpoint::remove_checkpoints(&dir, |_| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("step-00000001") && e.contains("yourself"), "{e}");
    assert!(p1.join("model.safetensors").is_file() && p2.join("manifest.json").is_file());
    let p3 = save_checkpoint(&dir, &ck(3, &[3.0]), 1, &FsIo).unwrap();
    assert!(p1.join("model.safetensors").is_file() && !p2.exists() && p3.is_dir());
}

/// Before the fix: save_checkpoint writes non-finite weights that load_checkpoint then refuses as
/// "corrupt or incomplete" (checkpoint.rs load: all_finite check exists only on load); with
/// keep_last it first prunes the last good checkpoint, leaving none that loads.
#[test]
fn save_checkpoint_never_leaves_only_an_unloadable_checkpoint() {
    let d = tmp();
    let dir = d.path().join("checkpoints");
    save_checkpoint(&dir, &ck(1, &[1.0]), 1, &FsIo).unwrap();
    let res = save_checkpoint(&dir, &ck(2, &[f32::NAN]), 1, &FsIo);
    let e = res.as_ref().expect_err("NaN weights were saved").to_string();
    assert!(
        e.contains("`w`") && e.contains("step 2"),
        "the error should name the tensor and step: {e}"
    );
    let latest = latest_checkpoint(&dir).unwrap();
    load_checkpoint(&latest, &cpu()).unwrap_or_else(|e| {
        panic!("save_checkpoint accepted NaN weights ({res:?}) and the newest checkpoint does not load: {e}")
    });
}

// ---------------------------------------------------------------------------------------------
// trainer/run.rs
// ---------------------------------------------------------------------------------------------

struct TwoVars {
    a: Var,
    b: Var,
}

impl TrainTask for TwoVars {
    fn loss(&mut self, _batch: &Batch, _ctx: &StepCtx) -> Result<Tensor> {
        (self.a.as_tensor().sum_all()? + self.b.as_tensor().sum_all()?)?.sqr()
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        vec![
            ("a.weight".into(), self.a.clone()),
            ("b.weight".into(), self.b.clone()),
        ]
    }
}

/// Before the fix: Trainer::check_resume (run.rs restore) copies each checkpoint tensor into the
/// task's variables before it has checked the rest (unknown extra tensors, optimizer state): a
/// refused checkpoint leaves the task half-restored, and a caller that then starts fresh trains
/// from the refused checkpoint's weights.
#[test]
fn a_refused_resume_leaves_the_task_untouched() {
    let d = tmp();
    let ckdir = d.path().join("checkpoints");
    // A checkpoint whose model tensors fit, but that has no optimizer state (another tool's,
    // or a damaged one): the resume must be refused.
    let mut model = BTreeMap::new();
    model.insert("a.weight".to_string(), Tensor::new(&[5f32, 5.0], &cpu()).unwrap());
    model.insert("b.weight".to_string(), Tensor::new(&[6f32, 6.0], &cpu()).unwrap());
    let p = save_checkpoint(
        &ckdir,
        &CheckpointData {
            step: 4,
            model,
            ..Default::default()
        },
        0,
        &FsIo,
    )
    .unwrap();
    let task = TwoVars {
        a: var(&[0.5, 0.5]),
        b: var(&[0.25, 0.25]),
    };
    let cfg = TrainerConfig {
        output_dir: d.path().to_path_buf(),
        progress: false,
        ..Default::default()
    };
    let mut trainer = Trainer::new(task, cfg, cpu());
    let err = trainer.check_resume(&Resume::From(p)).unwrap_err();
    assert!(err.to_string().contains("exp_avg"), "{err}");
    let a = trainer.task().a.as_tensor().to_vec1::<f32>().unwrap();
    let b = trainer.task().b.as_tensor().to_vec1::<f32>().unwrap();
    assert_eq!(
        (a, b),
        (vec![0.5, 0.5], vec![0.25, 0.25]),
        "the refused checkpoint's weights were loaded into the task"
    );
}

/// Before the fix: check_settings (run.rs, called by Trainer::train) accepts max_steps = Some(0),
/// which FinetuneConfig::validate refuses ("max_steps: must be at least 1"): the trainer then runs
/// no step and writes an untrained `step-00000000` checkpoint as if the run had finished.
#[test]
fn zero_max_steps_is_refused_by_the_trainer_too() {
    let item = EncodedItem {
        input_ids: vec![1, 2, 3],
        token_type_ids: vec![0, 0, 0],
        label: Some(1),
    };
    let train = EncodedDataset {
        task: TaskKind::Classify,
        items: vec![item.clone(), item],
        pad_id: 0,
    };
    let cfg = TrainerConfig {
        max_steps: Some(0),
        batch_size: 1,
        progress: false,
        ..Default::default()
    };
    let res = check_settings(&cfg, &train);
    assert!(res.is_err(), "max_steps = 0 was accepted: a run of no updates");
    assert!(res.unwrap_err().to_string().contains("max_steps"));
}

// ---------------------------------------------------------------------------------------------
// metrics.rs
// ---------------------------------------------------------------------------------------------

fn rec(step: u64) -> MetricRecord {
    MetricRecord {
        step,
        epoch: 0.5,
        split: "train".into(),
        loss: 1.25,
        lr: Some(1e-3),
        values: BTreeMap::new(),
    }
}

/// Before the fix: MetricsWriter::append opens the file O_APPEND and writes the line as is; after an
/// append cut short (kill, full disk) left a line without its `\n`, the next record is glued onto
/// that fragment, so the new record itself becomes unreadable.
#[test]
fn append_after_a_torn_line_starts_a_new_line() {
    let d = tmp();
    let path = d.path().join("metrics.jsonl");
    let w = MetricsWriter::new(&path);
    w.append(&rec(1)).unwrap();
    // An append cut short.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"step\":2,\"epoch\":0.5,\"spl");
    std::fs::write(&path, &text).unwrap();
    w.append(&rec(3)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let last = text.lines().last().unwrap();
    let got: std::result::Result<MetricRecord, _> = serde_json::from_str(last);
    assert_eq!(
        got.ok(),
        Some(rec(3)),
        "the appended record was glued onto the torn line: {last:?}"
    );
    // The fragment, now mid-file, is skipped by every reader (a resume, the loss plot).
    assert_eq!(w.read_all().unwrap(), vec![rec(1), rec(3)]);
    w.truncate_after(3).unwrap();
    assert_eq!(w.read_all().unwrap(), vec![rec(1), rec(3)]);
    // A complete line that is not a record is still an error naming it.
    std::fs::write(&path, "{\"step\": 1}\n").unwrap();
    let e = w.read_all().unwrap_err().to_string();
    assert!(e.contains("line 1"), "{e}");
}

/// Before the fix: MetricsWriter::truncate_after (what Trainer::train calls on every resume) fails on
/// a torn last line (no trailing newline) that an interrupted append leaves, so the run can never
/// be resumed; such an unfinished final line should be dropped, the complete records kept.
#[test]
fn truncate_after_drops_an_unfinished_last_line() {
    let d = tmp();
    let path = d.path().join("metrics.jsonl");
    let w = MetricsWriter::new(&path);
    w.append(&rec(1)).unwrap();
    w.append(&rec(2)).unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"step\":3,\"epoch\":0.5,\"split\":\"tr");
    std::fs::write(&path, &text).unwrap();
    w.truncate_after(2).unwrap();
    assert_eq!(w.read_all().unwrap(), vec![rec(1), rec(2)]);
}

// ---------------------------------------------------------------------------------------------
// optim/mod.rs
// ---------------------------------------------------------------------------------------------

/// Before the fix: AdamW::step / step_scaled take any lr (optim/mod.rs step_scaled): a NaN or
/// infinite lr (e.g. from an LrSchedule with such a base_lr) silently turns every parameter into
/// NaN and advances the step counts, and a negative one climbs the loss; scale_lr refuses the
/// same values for a scale.
#[test]
fn adamw_step_refuses_a_non_finite_or_negative_lr() {
    for lr in [f64::NAN, f64::INFINITY, -0.1] {
        let w = var(&[0.1, 0.2]);
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
        let res = opt.step(&quad_grads(&w).unwrap(), lr);
        let after = w.as_tensor().to_vec1::<f32>().unwrap();
        assert!(res.is_err(), "lr {lr}: accepted; the parameter became {after:?}");
        assert_eq!(after, vec![0.1, 0.2], "lr {lr}: the parameter changed");
        assert_eq!(opt.step_count(), 0, "lr {lr}: the step count advanced");
    }
}

/// Before the fix: AdamW::load passes load_state_dict's errors on without the file's path
/// (optim/mod.rs load), so "missing `v.exp_avg`" does not say which file was read.
#[test]
fn adamw_load_errors_name_the_file() {
    let d = tmp();
    let path = d.path().join("opt-state.safetensors");
    let w = var(&[1.0, 2.0]);
    let opt = AdamW::new(vec![("w".into(), w)], AdamWConfig::default()).unwrap();
    opt.save(&path).unwrap();
    let v = var(&[1.0, 2.0]);
    let mut other = AdamW::new(vec![("v".into(), v)], AdamWConfig::default()).unwrap();
    let e = other.load(&path).unwrap_err().to_string();
    assert!(e.contains("v.exp_avg"), "{e}");
    assert!(
        e.contains("opt-state.safetensors"),
        "the error does not name the file it read: {e}"
    );
}

/// Before the fix: load_state_dict checks the moments for NaN / infinity before converting them to
/// f32 (optim/mod.rs load_state_dict), so f64 moments beyond f32's range load as infinities, and
/// the next update writes -inf / NaN into the parameter.
#[test]
fn load_state_dict_refuses_moments_that_overflow_f32() {
    let w = var(&[0.1, 0.2]);
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
    let mut sd: HashMap<String, Tensor> = opt.state_dict().unwrap().into_iter().collect();
    sd.insert(
        "w.exp_avg".into(),
        Tensor::new(&[1e300f64, 1e300], &cpu()).unwrap(),
    );
    sd.insert("w.step".into(), Tensor::new(3i64, &cpu()).unwrap());
    let res = opt.load_state_dict(&sd);
    if res.is_ok() {
        opt.step(&quad_grads(&w).unwrap(), 1e-3).unwrap();
        let after = w.as_tensor().to_vec1::<f32>().unwrap();
        panic!("f64 moments of 1e300 were accepted; one update later the parameter is {after:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// data/batch.rs
// ---------------------------------------------------------------------------------------------

/// Before the fix: make_batch's "a classification batch needs a label on every example" does not
/// say which example lacks it (its token_type_ids error names `batch example {r}`).
#[test]
fn make_batch_names_the_unlabelled_example() {
    let labelled = EncodedItem {
        input_ids: vec![1, 2],
        token_type_ids: vec![0, 0],
        label: Some(0),
    };
    let unlabelled = EncodedItem {
        label: None,
        ..labelled.clone()
    };
    let e = make_batch(
        &[&labelled, &labelled, &unlabelled],
        0,
        TaskKind::Classify,
        &cpu(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("example 2"),
        "the error does not name the example: {e}"
    );
}

// ---------------------------------------------------------------------------------------------
// tasks.rs
// ---------------------------------------------------------------------------------------------

fn tiny_bert_task() -> ModelTask {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../spt-models/tests/fixtures/tiny-bert-cls");
    let cfg = FinetuneConfig {
        model: dir.display().to_string(),
        ..base_config(Mode::Dense, TaskKind::Classify, None)
    };
    ModelTask::build(&cfg, &dir, Some(3), &cpu(), Vec::new()).unwrap()
}

fn values(task: &ModelTask) -> HashMap<String, Tensor> {
    task.trainable()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect()
}

/// Before the fix: ModelTask::load_trained indexes `t.dims()[0]` (tasks.rs, the classifier shape
/// message) on the checkpoint's tensor, so a scalar `classifier.bias` (a foreign or damaged
/// checkpoint) panics with an index out of bounds instead of returning the shape error.
#[test]
fn load_trained_reports_a_scalar_classifier_tensor_without_panicking() {
    let mut task = tiny_bert_task();
    let mut model = values(&task);
    assert!(model.contains_key("classifier.bias"));
    model.insert("classifier.bias".into(), Tensor::new(0f32, &cpu()).unwrap());
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        task.load_trained(&model, &HashMap::new())
            .map_err(|e| e.to_string())
    }));
    match res {
        Err(_) => panic!("load_trained panicked on a scalar `classifier.bias`"),
        Ok(r) => {
            let e = r.unwrap_err();
            assert!(e.contains("classifier.bias"), "{e}");
        }
    }
}

/// Before the fix: ModelTask::load_trained (tasks.rs) sets every matching variable before it checks
/// for tensors the model does not have: a refused checkpoint still overwrites the model's weights.
#[test]
fn load_trained_refusal_leaves_the_weights_untouched() {
    let mut task = tiny_bert_task();
    let before = values(&task);
    let mut model: HashMap<String, Tensor> = before
        .iter()
        .map(|(n, t)| (n.clone(), (t + 1.0).unwrap()))
        .collect();
    model.insert(
        "some.other.model.weight".into(),
        Tensor::zeros(4, DType::F32, &cpu()).unwrap(),
    );
    let e = task
        .load_trained(&model, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("some.other.model.weight"), "{e}");
    let after = values(&task);
    let w0 = before["classifier.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let w1 = after["classifier.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        w0 == w1,
        "the refused checkpoint's weights were loaded: classifier.weight[..3] {:?} became {:?}",
        &w0[..3],
        &w1[..3]
    );
}
