//! End-to-end tests of the training loop with a tiny model defined here: a bag-of-embeddings
//! classifier (embedding → masked mean → dropout → linear) on synthetic token data.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use spt_train::checkpoint::{list_checkpoints, DiskFullIo};
use spt_train::data::{Batch, EncodedDataset, EncodedItem, TaskKind};
use spt_train::optim::{AdamWConfig, ScheduleKind};
use spt_train::rng::SplitMix64;
use spt_train::trainer::{EvalOutput, Resume, StepCtx, TrainSummary, TrainTask, Trainer, TrainerConfig};

const VOCAB: usize = 32;
const DIM: usize = 8;
const CLASSES: usize = 2;

fn uniform(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        .collect()
}

struct BagClassifier {
    emb: Var,
    w: Var,
    b: Var,
    dropout: f32,
    /// A loss cut off from the parameters (a task bug the trainer must name).
    detach_loss: bool,
    /// A per-example loss `[B]` rather than a scalar (another task bug).
    vector_loss: bool,
    /// Set the flag when the forward of update `stop_at_step` (0-based) runs: simulates Ctrl-C.
    stop: Option<(u64, Arc<AtomicBool>)>,
    /// Evaluation gives NaN logits (training does not): a run diverging on held-out rows.
    nan_eval: bool,
}

impl BagClassifier {
    fn new(seed: u64, dropout: f32) -> Result<Self> {
        let dev = Device::Cpu;
        let mut rng = SplitMix64::new(seed);
        let emb = Tensor::from_vec(uniform(&mut rng, VOCAB * DIM, 0.5), (VOCAB, DIM), &dev)?;
        let w = Tensor::from_vec(uniform(&mut rng, CLASSES * DIM, 0.5), (CLASSES, DIM), &dev)?;
        Ok(Self {
            emb: Var::from_tensor(&emb)?,
            w: Var::from_tensor(&w)?,
            b: Var::zeros(CLASSES, DType::F32, &dev)?,
            dropout,
            detach_loss: false,
            vector_loss: false,
            stop: None,
            nan_eval: false,
        })
    }

    fn logits(&self, batch: &Batch, seed: Option<u64>) -> Result<Tensor> {
        let (bsz, len) = batch.input_ids.dims2()?;
        let e = self
            .emb
            .as_tensor()
            .embedding(&batch.input_ids.flatten_all()?)?
            .reshape((bsz, len, DIM))?;
        let mask = batch.attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let mut h = e.broadcast_mul(&mask)?.sum(1)?.broadcast_div(&mask.sum(1)?)?;
        if let (Some(seed), true) = (seed, self.dropout > 0.0) {
            let mut rng = SplitMix64::new(seed);
            let keep = 1.0 - self.dropout;
            let m: Vec<f32> = (0..bsz * DIM)
                .map(|_| {
                    if (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 >= self.dropout {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect();
            h = (h * Tensor::from_vec(m, (bsz, DIM), &Device::Cpu)?)?;
        }
        h.matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())
    }

    fn params(&self) -> Vec<Vec<u32>> {
        [&self.emb, &self.w, &self.b]
            .iter()
            .map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    }
}

impl TrainTask for BagClassifier {
    fn loss(&mut self, batch: &Batch, ctx: &StepCtx) -> Result<Tensor> {
        if let Some((at, flag)) = &self.stop {
            if ctx.step == *at {
                flag.store(true, Ordering::SeqCst);
            }
        }
        let logits = self.logits(batch, ctx.train.then_some(ctx.seed))?;
        let loss = candle_nn::loss::cross_entropy(&logits, &batch.labels)?;
        if self.vector_loss {
            return loss.broadcast_as(batch.size)?.contiguous();
        }
        Ok(if self.detach_loss { loss.detach() } else { loss })
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        vec![
            ("embeddings.word_embeddings.weight".into(), self.emb.clone()),
            ("classifier.weight".into(), self.w.clone()),
            ("classifier.bias".into(), self.b.clone()),
        ]
    }

    fn eval_batch(&mut self, batch: &Batch) -> Result<EvalOutput> {
        let mut logits = self.logits(batch, None)?;
        if self.nan_eval {
            logits = (logits * f64::NAN)?;
        }
        let loss = candle_nn::loss::cross_entropy(&logits, &batch.labels)?.to_scalar::<f32>()? as f64;
        let preds = logits.argmax(1)?.to_vec1::<u32>()?;
        Ok(EvalOutput {
            loss_sum: loss * batch.size as f64,
            count: batch.size as f64,
            predictions: Some(preds),
        })
    }

    fn extra_state(&mut self) -> Result<BTreeMap<String, Tensor>> {
        // Stands in for PQ codebooks: round-trips through the checkpoint.
        let mut m = BTreeMap::new();
        m.insert(
            "codebook.layer0".into(),
            Tensor::full(7f32, (2, 3), &Device::Cpu)?,
        );
        Ok(m)
    }
}

/// Class 0 draws tokens from 1..12, class 1 from 12..24, both with noise tokens 24..32.
fn synthetic(n: usize, seed: u64) -> EncodedDataset {
    let mut rng = SplitMix64::new(seed);
    let items = (0..n)
        .map(|_| {
            let label = rng.below(2) as u32;
            let len = 3 + rng.below(10) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    if rng.below(4) == 0 {
                        24 + rng.below(8) as u32
                    } else {
                        1 + label * 11 + rng.below(11) as u32
                    }
                })
                .collect();
            EncodedItem {
                token_type_ids: vec![0; ids.len()],
                input_ids: ids,
                label: Some(label),
            }
        })
        .collect();
    EncodedDataset {
        task: TaskKind::Classify,
        items,
        pad_id: 0,
    }
}

fn config(dir: &Path) -> TrainerConfig {
    TrainerConfig {
        epochs: 3,
        max_steps: None,
        batch_size: 8,
        eval_batch_size: 16,
        grad_accum: 2,
        lr: 0.05,
        warmup_steps: 3,
        schedule: ScheduleKind::Cosine,
        max_grad_norm: 1.0,
        seed: 11,
        eval_every: 4,
        save_every: 3,
        keep_last: 2,
        log_every: 2,
        output_dir: dir.to_path_buf(),
        progress: false,
        bucket_batches: 3,
        run_config: serde_json::json!({"test": true}),
        ..Default::default()
    }
}

fn bits(s: &TrainSummary) -> Vec<(u64, u32)> {
    s.train_losses.iter().map(|(st, l)| (*st, l.to_bits())).collect()
}

#[test]
fn loss_decreases_and_eval_improves() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let train = synthetic(240, 1);
    let valid = synthetic(80, 2);
    let cfg = TrainerConfig {
        epochs: 4,
        grad_accum: 1,
        eval_every: 0,
        save_every: 0,
        ..config(tmp.path())
    };
    let mut t = Trainer::new(BagClassifier::new(3, 0.0)?, cfg, Device::Cpu);
    let before = t.evaluate(&valid)?;
    let s = t.train(&train, Some(&valid), &Resume::No)?;
    assert_eq!(s.steps, 4 * 30);
    let first: f32 = s.train_losses[..10].iter().map(|x| x.1).sum::<f32>() / 10.0;
    let last: f32 = s.train_losses[s.train_losses.len() - 10..]
        .iter()
        .map(|x| x.1)
        .sum::<f32>()
        / 10.0;
    assert!(last < 0.5 * first, "first {first} last {last}");
    let (_, after) = s.evals.last().expect("a final eval");
    assert!(after.loss < before.loss, "{} -> {}", before.loss, after.loss);
    assert!(after.accuracy.unwrap() > 0.9, "{after:?}");
    assert!(after.macro_f1.unwrap() > 0.9, "{after:?}");
    assert!(tmp.path().join("metrics.jsonl").is_file());
    assert!(std::fs::read_to_string(tmp.path().join("loss.svg"))?.contains("<svg"));
    assert_eq!(list_checkpoints(&tmp.path().join("checkpoints"))?.len(), 1);
    Ok(())
}

/// Gradient accumulation as transformers' Trainer does it: a step never spans two epochs (an
/// epoch's last step takes what is left), and each micro-batch weighs by its items, so that
/// batches of 8 + 8 + 4 accumulated train as one batch of 20 (equal weights gave the 4 rows of
/// the short batch the weight of 8).
#[test]
fn accumulated_micro_batches_train_as_one_batch() -> anyhow::Result<()> {
    let train = synthetic(20, 7);
    let run = |batch_size: usize, grad_accum: usize| -> anyhow::Result<(TrainSummary, Vec<Vec<f32>>)> {
        let dir = tempfile::tempdir()?;
        let cfg = TrainerConfig {
            epochs: 2,
            batch_size,
            grad_accum,
            eval_every: 0,
            save_every: 0,
            ..config(dir.path())
        };
        assert_eq!(spt_train::trainer::planned_steps(&cfg, train.len()), 2);
        let mut t = Trainer::new(BagClassifier::new(3, 0.0)?, cfg, Device::Cpu);
        let s = t.train(&train, None, &Resume::No)?;
        let params = t
            .task()
            .params()
            .iter()
            .map(|p| p.iter().map(|b| f32::from_bits(*b)).collect())
            .collect();
        Ok((s, params))
    };
    let (whole, whole_params) = run(20, 1)?;
    let (accumulated, acc_params) = run(8, 3)?;
    assert_eq!(accumulated.steps, 2);
    for ((_, a), (_, b)) in whole.train_losses.iter().zip(&accumulated.train_losses) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step loss {a} against {b}");
    }
    for (a, b) in whole_params.iter().flatten().zip(acc_params.iter().flatten()) {
        assert!((a - b).abs() <= 1e-5, "{a} against {b}");
    }
    // 3 batches an epoch in steps of 2: 2 steps an epoch (the second of one batch), not
    // ceil(3 epochs * 3 / 2) = 5 with steps across epoch ends.
    let dir = tempfile::tempdir()?;
    let cfg = TrainerConfig {
        epochs: 3,
        eval_every: 0,
        save_every: 0,
        ..config(dir.path())
    };
    assert_eq!(spt_train::trainer::planned_steps(&cfg, train.len()), 6);
    let s = Trainer::new(BagClassifier::new(3, 0.0)?, cfg, Device::Cpu).train(&train, None, &Resume::No)?;
    assert_eq!(s.steps, 6);
    Ok(())
}

/// A run resumed with another grad_accum makes the updates the rest of the data makes from the
/// checkpoint's position, and ends there (planned from the start with the new setting, it
/// stopped 2 updates short of the data, its learning rate never decayed to 0 and its last step
/// was never logged).
#[test]
fn a_resume_with_another_grad_accum_ends_at_the_end_of_the_data() -> anyhow::Result<()> {
    let train = synthetic(50, 5); // 7 batches per epoch, 3 epochs
    let dir = tempfile::tempdir()?;
    let flag = Arc::new(AtomicBool::new(false));
    let mut task = BagClassifier::new(3, 0.0)?;
    task.stop = Some((1, flag.clone())); // after 2 updates of 2 batches: batch 4 of epoch 0
    let s = Trainer::new(task, config(dir.path()), Device::Cpu)
        .with_stop_flag(flag)
        .train(&train, None, &Resume::No)?;
    assert_eq!(s.steps, 2);
    let cfg = TrainerConfig {
        grad_accum: 1,
        log_every: 5,
        ..config(dir.path())
    };
    assert_eq!(spt_train::trainer::planned_steps(&cfg, train.len()), 21);
    let s =
        Trainer::new(BagClassifier::new(3, 0.0)?, cfg, Device::Cpu).train(&train, None, &Resume::Latest)?;
    // 3 batches left in epoch 0, then 2 epochs of 7.
    assert_eq!(s.steps, 2 + 3 + 14);
    let recs = spt_train::metrics::MetricsWriter::new(dir.path().join("metrics.jsonl")).read_all()?;
    let last = recs.iter().rfind(|r| r.split == "train").unwrap();
    assert_eq!(last.step, 19);
    assert!(
        last.lr.unwrap() < 0.05 * 0.05,
        "the schedule ends at step 19: lr {:?}",
        last.lr
    );
    Ok(())
}

#[test]
fn resume_after_stop_equals_uninterrupted_run_bit_exactly() -> anyhow::Result<()> {
    let train = synthetic(50, 5); // 7 batches per epoch: each epoch's last step takes one
    let valid = synthetic(20, 6);
    // Uninterrupted.
    let a_dir = tempfile::tempdir()?;
    let mut a = Trainer::new(BagClassifier::new(3, 0.2)?, config(a_dir.path()), Device::Cpu);
    let sa = a.train(&train, Some(&valid), &Resume::No)?;
    assert_eq!(sa.steps, 12); // 3 epochs * ceil(7 batches / 2)
                              // Interrupted: the stop flag (what Ctrl-C sets) is raised during update 5 (index 4).
    let b_dir = tempfile::tempdir()?;
    let flag = Arc::new(AtomicBool::new(false));
    let mut task = BagClassifier::new(3, 0.2)?;
    task.stop = Some((4, flag.clone()));
    let mut b = Trainer::new(task, config(b_dir.path()), Device::Cpu).with_stop_flag(flag);
    let sb = b.train(&train, Some(&valid), &Resume::No)?;
    assert!(sb.stopped);
    assert_eq!(sb.steps, 5);
    let saved: Vec<u64> = list_checkpoints(&b_dir.path().join("checkpoints"))?
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(saved, vec![3, 5]);
    // Resume in a fresh process-alike: new task with different initial values.
    let mut c = Trainer::new(BagClassifier::new(99, 0.2)?, config(b_dir.path()), Device::Cpu);
    let sc = c.train(&train, Some(&valid), &Resume::Latest)?;
    assert_eq!(sc.resumed_from, Some(5));
    assert_eq!(sc.steps, 12);
    let mut joined = bits(&sb);
    joined.extend(bits(&sc));
    assert_eq!(joined, bits(&sa));
    assert_eq!(c.task().params(), a.task().params());
    // Same evaluations at the shared steps, and metrics.jsonl has no repeated train step.
    assert_eq!(sc.evals.last(), sa.evals.last());
    let recs = spt_train::metrics::MetricsWriter::new(b_dir.path().join("metrics.jsonl")).read_all()?;
    let train_steps: Vec<u64> = recs
        .iter()
        .filter(|r| r.split == "train")
        .map(|r| r.step)
        .collect();
    assert_eq!(train_steps, vec![2, 4, 6, 8, 10, 12]);
    // Resuming the finished run trains, evaluates and records nothing more.
    let mut d = Trainer::new(BagClassifier::new(7, 0.2)?, config(b_dir.path()), Device::Cpu);
    let sd = d.train(&train, Some(&valid), &Resume::Latest)?;
    assert_eq!((sd.resumed_from, sd.steps), (Some(12), 12));
    let again = spt_train::metrics::MetricsWriter::new(b_dir.path().join("metrics.jsonl")).read_all()?;
    let steps = |r: &[spt_train::metrics::MetricRecord]| {
        r.iter().map(|r| (r.step, r.split.clone())).collect::<Vec<_>>()
    };
    assert_eq!(steps(&again), steps(&recs));
    assert_eq!(
        recs.iter().filter(|r| r.step == 12 && r.split == "eval").count(),
        1
    );
    Ok(())
}

#[test]
fn settings_and_tasks_that_would_train_nothing_or_nan_are_refused() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let train = synthetic(40, 5);
    let base = TrainerConfig {
        max_steps: Some(1),
        ..config(tmp.path())
    };
    let err = |cfg: TrainerConfig, task: BagClassifier, eval: Option<&EncodedDataset>| {
        Trainer::new(task, cfg, Device::Cpu)
            .train(&train, eval, &Resume::No)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // Optimizer settings that made every weight NaN after one step (FinetuneConfig::validate
    // guards the command line; a library user's TrainerConfig went unchecked).
    let adam = AdamWConfig::default();
    for (adamw, want) in [
        (AdamWConfig { beta1: 1.0, ..adam }, "beta1"),
        (
            AdamWConfig {
                beta2: f64::NAN,
                ..adam
            },
            "beta2",
        ),
        (AdamWConfig { eps: 0.0, ..adam }, "eps"),
        (
            AdamWConfig {
                weight_decay: -1.0,
                ..adam
            },
            "weight_decay",
        ),
    ] {
        let e = err(
            TrainerConfig {
                adamw,
                ..base.clone()
            },
            BagClassifier::new(3, 0.0)?,
            None,
        );
        assert!(e.contains(want), "{want}: {e}");
    }
    let e = err(
        TrainerConfig {
            max_grad_norm: f64::NAN,
            ..base.clone()
        },
        BagClassifier::new(3, 0.0)?,
        None,
    );
    assert!(e.contains("max_grad_norm"), "{e}");
    let e = err(
        TrainerConfig {
            lr_scales: vec![("classifier".into(), f64::INFINITY)],
            ..base.clone()
        },
        BagClassifier::new(3, 0.0)?,
        None,
    );
    assert!(e.contains("lr scale") && e.contains("classifier"), "{e}");
    // An empty evaluation set: its NaN loss was written to metrics.jsonl as null, which a
    // resume could not read.
    let empty = EncodedDataset {
        items: Vec::new(),
        ..synthetic(1, 1)
    };
    let e = err(base.clone(), BagClassifier::new(3, 0.0)?, Some(&empty));
    assert!(e.contains("evaluation set is empty"), "{e}");
    let e = spt_train::trainer::evaluate(&mut BagClassifier::new(3, 0.0)?, &empty, 4, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty"), "{e}");
    // A loss cut off from the parameters trained nothing and returned Ok.
    let mut detached = BagClassifier::new(3, 0.0)?;
    detached.detach_loss = true;
    let e = err(base.clone(), detached, None);
    assert!(e.contains("no trainable variable received a gradient"), "{e}");
    // A loss per example stopped with candle's "unexpected number of dims", naming no loss.
    let mut per_example = BagClassifier::new(3, 0.0)?;
    per_example.vector_loss = true;
    let e = err(base.clone(), per_example, None);
    assert!(
        e.contains("TrainTask::loss gave a tensor of shape [8]") && e.contains("scalar"),
        "{e}"
    );
    // A label id of u32::MAX in evaluation sized the macro-F1 counters by it and aborted.
    let mut odd = synthetic(8, 6);
    odd.items[0].label = Some(u32::MAX);
    let rep = spt_train::trainer::evaluate(&mut BagClassifier::new(3, 0.0)?, &odd, 4, &Device::Cpu)?;
    assert!(rep.macro_f1.is_some_and(|f| (0.0..=1.0).contains(&f)), "{rep:?}");
    // NaN logits: the loss is NaN and the argmax arbitrary; an accuracy was reported anyway.
    let nan = BagClassifier::new(3, 0.0)?;
    nan.w.set(&Tensor::full(f32::NAN, nan.w.shape(), &Device::Cpu)?)?;
    let e = spt_train::trainer::evaluate(&mut { nan }, &synthetic(8, 6), 4, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is NaN") && e.contains("not finite"), "{e}");
    // In a run, the step whose evaluation failed is saved before the run stops with the error.
    let dir = tempfile::tempdir()?;
    let mut diverging = BagClassifier::new(3, 0.0)?;
    diverging.nan_eval = true;
    let e = err(config(dir.path()), diverging, Some(&synthetic(8, 6)));
    assert!(e.contains("not finite") && e.contains("step 4 saved to"), "{e}");
    let steps: Vec<u64> = list_checkpoints(&dir.path().join("checkpoints"))?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    // Step 3's (saved before it diverged) is kept too, whatever --keep-last.
    assert_eq!(steps, [3, 4]);
    Ok(())
}

#[test]
fn corrupt_checkpoint_on_resume_is_a_clear_error() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let train = synthetic(40, 5);
    let cfg = TrainerConfig {
        max_steps: Some(3),
        ..config(tmp.path())
    };
    Trainer::new(BagClassifier::new(3, 0.0)?, cfg.clone(), Device::Cpu).train(&train, None, &Resume::No)?;
    let (_, last) = list_checkpoints(&tmp.path().join("checkpoints"))?
        .pop()
        .expect("a checkpoint");
    let f = last.join("model.safetensors");
    let bytes = std::fs::read(&f)?;
    std::fs::write(&f, &bytes[..bytes.len() - 7])?;
    let err = Trainer::new(BagClassifier::new(3, 0.0)?, cfg, Device::Cpu)
        .train(&train, None, &Resume::Latest)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corrupt") && err.contains("step-00000003") && err.contains("model.safetensors"),
        "{err}"
    );
    // A valid checkpoint whose data position was edited to the last epoch: named, where the
    // epoch count wrapped to 0 (and a debug build panicked on the overflow).
    let good = tempfile::tempdir()?;
    let cfg = TrainerConfig {
        max_steps: Some(3),
        ..config(good.path())
    };
    Trainer::new(BagClassifier::new(3, 0.0)?, cfg.clone(), Device::Cpu).train(&train, None, &Resume::No)?;
    let ckpts = good.path().join("checkpoints");
    let (_, last) = list_checkpoints(&ckpts)?.pop().expect("a checkpoint");
    let c = spt_train::checkpoint::load_checkpoint(&last, &Device::Cpu)?;
    let edited = spt_train::checkpoint::CheckpointData {
        step: 4,
        data: spt_train::checkpoint::DataPosition {
            epoch: u64::MAX,
            batch: u64::MAX,
        },
        rng_state: c.manifest.rng_state,
        config: c.manifest.config,
        extra_json: c.manifest.extra,
        model: c.model.into_iter().collect(),
        optimizer: c.optimizer.into_iter().collect(),
        extra: c.extra.into_iter().collect(),
    };
    spt_train::checkpoint::save_checkpoint(&ckpts, &edited, 0, &spt_train::checkpoint::FsIo)?;
    let more = TrainerConfig {
        max_steps: Some(6),
        ..cfg
    };
    let err = Trainer::new(BagClassifier::new(3, 0.0)?, more, Device::Cpu)
        .train(&train, None, &Resume::Latest)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot advance"), "{err}");
    Ok(())
}

#[test]
fn disk_full_during_save_keeps_the_previous_checkpoint() -> anyhow::Result<()> {
    let train = synthetic(40, 5);
    // Measure one checkpoint's size.
    let probe = tempfile::tempdir()?;
    let cfg = TrainerConfig {
        max_steps: Some(3),
        save_every: 3,
        ..config(probe.path())
    };
    Trainer::new(BagClassifier::new(3, 0.0)?, cfg, Device::Cpu).train(&train, None, &Resume::No)?;
    let (_, ck) = list_checkpoints(&probe.path().join("checkpoints"))?
        .pop()
        .expect("a checkpoint");
    let size: u64 = std::fs::read_dir(&ck)?
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // Room for one and a half checkpoints: the save at step 3 fits, the one at step 6 does not.
    let tmp = tempfile::tempdir()?;
    let cfg = TrainerConfig {
        max_steps: Some(6),
        save_every: 3,
        ..config(tmp.path())
    };
    let err = Trainer::new(BagClassifier::new(3, 0.0)?, cfg, Device::Cpu)
        .with_checkpoint_io(Box::new(DiskFullIo::new(size + size / 2)))
        .train(&train, None, &Resume::No)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("os error 28") || err.contains("No space left"),
        "{err}"
    );
    let dir = tmp.path().join("checkpoints");
    let names: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["step-00000003".to_string()]);
    // The loss curve was drawn at step 3's checkpoint, so the failed run still has one.
    let svg = std::fs::read_to_string(tmp.path().join("loss.svg"))?;
    assert!(svg.contains("<svg") && svg.contains("train"), "{svg}");
    let ck = spt_train::checkpoint::load_checkpoint(&dir.join("step-00000003"), &Device::Cpu)?;
    assert_eq!(ck.manifest.step, 3);
    assert_eq!(
        ck.extra["codebook.layer0"].to_vec2::<f32>()?,
        vec![vec![7.0; 3]; 2]
    );
    // With room again, the run resumes from that checkpoint and finishes.
    let cfg = TrainerConfig {
        max_steps: Some(6),
        save_every: 3,
        ..config(tmp.path())
    };
    let summary =
        Trainer::new(BagClassifier::new(3, 0.0)?, cfg, Device::Cpu).train(&train, None, &Resume::Latest)?;
    assert_eq!((summary.resumed_from, summary.steps), (Some(3), 6));
    assert_eq!(
        list_checkpoints(&dir)?
            .into_iter()
            .map(|(s, _)| s)
            .collect::<Vec<_>>(),
        vec![3, 6]
    );
    Ok(())
}

#[test]
fn zero_batch_size_is_an_error() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = TrainerConfig {
        batch_size: 0,
        ..config(tmp.path())
    };
    let err = Trainer::new(BagClassifier::new(3, 0.0)?, cfg, Device::Cpu)
        .train(&synthetic(10, 1), None, &Resume::No)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("batch_size must be at least 1"), "{err}");
    let cfg = TrainerConfig {
        eval_batch_size: 0,
        ..config(tmp.path())
    };
    let err = Trainer::new(BagClassifier::new(3, 0.0)?, cfg, Device::Cpu)
        .train(&synthetic(10, 1), None, &Resume::No)
        .unwrap_err()
        .to_string();
    assert!(err.contains("eval_batch_size must be at least 1"), "{err}");
    Ok(())
}

/// Was a defect: a new run or a fork through the library into a folder holding another run's
/// checkpoints put its own beside them, and keep_last pruned them (the CLI refused it first).
#[test]
fn a_new_run_or_a_fork_into_another_runs_checkpoints_is_refused() -> anyhow::Result<()> {
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let train = synthetic(50, 5);
    let cfg = |d: &Path, steps: u64| TrainerConfig {
        max_steps: Some(steps),
        save_every: 2,
        keep_last: 1,
        eval_every: 0,
        ..config(d)
    };
    let steps = |d: &Path| -> anyhow::Result<Vec<u64>> {
        Ok(list_checkpoints(&d.join("checkpoints"))?
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    };
    Trainer::new(BagClassifier::new(3, 0.2)?, cfg(a.path(), 4), Device::Cpu).train(
        &train,
        None,
        &Resume::No,
    )?;
    Trainer::new(BagClassifier::new(3, 0.2)?, cfg(b.path(), 2), Device::Cpu).train(
        &train,
        None,
        &Resume::No,
    )?;
    assert_eq!((steps(a.path())?, steps(b.path())?), (vec![4], vec![2]));
    // A fork of a's step 4 into b would save step 6 there and prune b's step 2 (keep_last 1).
    let from_a = a.path().join("checkpoints/step-00000004");
    let e = Trainer::new(BagClassifier::new(3, 0.2)?, cfg(b.path(), 6), Device::Cpu)
        .train(&train, None, &Resume::From(from_a.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a fork") && e.contains("another run's checkpoints (step-00000002)"),
        "{e}"
    );
    // A new run into a would write step 2 and prune a's step 4.
    let e = Trainer::new(BagClassifier::new(3, 0.2)?, cfg(a.path(), 2), Device::Cpu)
        .train(&train, None, &Resume::No)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a new run") && e.contains("another run's checkpoints (step-00000004)"),
        "{e}"
    );
    assert_eq!(
        (steps(a.path())?, steps(b.path())?),
        (vec![4], vec![2]),
        "nothing written or removed"
    );
    // Into an empty folder the fork goes on from a's step.
    let c = tempfile::tempdir()?;
    let s = Trainer::new(BagClassifier::new(3, 0.2)?, cfg(c.path(), 6), Device::Cpu).train(
        &train,
        None,
        &Resume::From(from_a),
    )?;
    assert_eq!((s.resumed_from, steps(c.path())?), (Some(4), vec![6]));
    Ok(())
}

/// Were defects: a library resume from an earlier checkpoint went on beside the later ones of
/// the abandoned run (the newest of them then taken for the run's latest), and `check_resume`
/// followed by `train` from elsewhere (or afresh) trained on from the restored weights.
#[test]
fn resuming_is_refused_beside_later_checkpoints_or_another_restored_one() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let train = synthetic(50, 5);
    let cfg = || TrainerConfig {
        max_steps: Some(6),
        save_every: 2,
        keep_last: 0,
        eval_every: 0,
        ..config(tmp.path())
    };
    Trainer::new(BagClassifier::new(3, 0.2)?, cfg(), Device::Cpu).train(&train, None, &Resume::No)?;
    let ckpts = tmp.path().join("checkpoints");
    let step2 = ckpts.join("step-00000002");
    let mut t = Trainer::new(BagClassifier::new(3, 0.2)?, cfg(), Device::Cpu);
    let e = t
        .train(&train, None, &Resume::From(step2.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("later checkpoints (step-00000004, step-00000006)"),
        "{e}"
    );
    let steps = |d: &Path| -> anyhow::Result<Vec<u64>> {
        Ok(list_checkpoints(d)?.into_iter().map(|(s, _)| s).collect())
    };
    assert_eq!(steps(&ckpts)?, [2, 4, 6], "nothing removed");
    // Each checkpoint records the order its steps took the rows in (a resume under another
    // warns that its data position reads another order).
    let order = spt_train::trainer::DataRecord::of(&step2).and_then(|r| r.order);
    let want = spt_train::trainer::DataOrder {
        seed: 11,
        batch_size: 8,
        grad_accum: 2,
        bucket_batches: 3,
    };
    assert_eq!(order, Some(want));

    let mut t = Trainer::new(BagClassifier::new(3, 0.2)?, cfg(), Device::Cpu);
    t.check_resume(&Resume::Latest)?;
    let e = t.train(&train, None, &Resume::No).unwrap_err().to_string();
    assert!(
        e.contains("check_resume restored") && e.contains("step-00000006"),
        "{e}"
    );

    // With the later ones removed (as `spt-train finetune --resume CKPT --overwrite` does), the
    // run goes on from step 2.
    spt_train::checkpoint::remove_checkpoints(&ckpts, |s| s > 2)?;
    let s = Trainer::new(BagClassifier::new(3, 0.2)?, cfg(), Device::Cpu).train(
        &train,
        None,
        &Resume::From(step2),
    )?;
    assert_eq!((s.resumed_from, s.steps), (Some(2), 6));
    assert_eq!(steps(&ckpts)?, [2, 4, 6]);
    Ok(())
}
