//! The trainer on a toy model, to see the progress bar, logs, checkpoints, Ctrl-C and resuming
//! without a real checkpoint:
//!
//! ```text
//! cargo run -p spt-train --release --example toy_trainer -- /tmp/toy-run        # Ctrl-C midway
//! cargo run -p spt-train --release --example toy_trainer -- /tmp/toy-run resume # continues
//! ```
//!
//! The model is a bag-of-embeddings classifier (embedding → masked mean → linear) on synthetic
//! token sequences whose class decides which half of the vocabulary they draw from.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use spt_train::data::{Batch, EncodedDataset, EncodedItem, TaskKind};
use spt_train::losses::{classification_eval, classification_loss};
use spt_train::optim::ScheduleKind;
use spt_train::output_dir::prepare_run_dir;
use spt_train::rng::SplitMix64;
use spt_train::trainer::{
    install_ctrlc_handler, EvalOutput, Resume, StepCtx, TrainTask, Trainer, TrainerConfig,
};

const VOCAB: usize = 2000;
const DIM: usize = 256;

struct Toy {
    emb: Var,
    w: Var,
    b: Var,
}

impl Toy {
    fn new() -> Result<Self> {
        let dev = Device::Cpu;
        Ok(Self {
            emb: Var::from_tensor(&(Tensor::randn(0f32, 1.0, (VOCAB, DIM), &dev)? * 0.1)?)?,
            w: Var::from_tensor(&(Tensor::randn(0f32, 1.0, (2, DIM), &dev)? * 0.1)?)?,
            b: Var::zeros(2, DType::F32, &dev)?,
        })
    }

    fn logits(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let (bsz, len) = batch.input_ids.dims2()?;
        let e = self
            .emb
            .as_tensor()
            .embedding(&batch.input_ids.flatten_all()?)?
            .reshape((bsz, len, DIM))?;
        let mask = batch.attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let h = e.broadcast_mul(&mask)?.sum(1)?.broadcast_div(&mask.sum(1)?)?;
        h.matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())
    }
}

impl TrainTask for Toy {
    fn loss(&mut self, batch: &Batch, _ctx: &StepCtx) -> candle_core::Result<Tensor> {
        classification_loss(&self.logits(batch)?, batch)
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![
            ("embeddings.word_embeddings.weight".into(), self.emb.clone()),
            ("classifier.weight".into(), self.w.clone()),
            ("classifier.bias".into(), self.b.clone()),
        ]
    }
    fn eval_batch(&mut self, batch: &Batch) -> candle_core::Result<EvalOutput> {
        classification_eval(&self.logits(batch)?, batch)
    }
    fn extra_state(&mut self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        Ok(BTreeMap::new())
    }
}

fn synthetic(n: usize, seed: u64) -> EncodedDataset {
    let mut rng = SplitMix64::new(seed);
    let half = (VOCAB / 2) as u64;
    let items = (0..n)
        .map(|_| {
            let label = rng.below(2) as u32;
            let len = 16 + rng.below(240) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    if rng.below(3) == 0 {
                        rng.below(VOCAB as u64) as u32
                    } else {
                        (label as u64 * half + rng.below(half)) as u32
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

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "toy-run".into()));
    let resume = if args.next().as_deref() == Some("resume") {
        Resume::Latest
    } else {
        Resume::No
    };
    let _lock = prepare_run_dir(&out, true, resume != Resume::No)?;
    let cfg = TrainerConfig {
        epochs: 3,
        batch_size: 32,
        lr: 3e-3,
        warmup_steps: 20,
        schedule: ScheduleKind::Cosine,
        eval_every: 100,
        save_every: 100,
        log_every: 50,
        output_dir: out.clone(),
        ..Default::default()
    };
    let stop = install_ctrlc_handler()?;
    let mut trainer = Trainer::new(Toy::new()?, cfg, Device::Cpu).with_stop_flag(stop);
    let s = trainer
        .train(&synthetic(8000, 1), Some(&synthetic(1000, 2)), &resume)
        .context("training")?;
    println!(
        "steps {} stopped {} last eval {:?} checkpoint {:?}",
        s.steps,
        s.stopped,
        s.evals.last(),
        s.last_checkpoint
    );
    Ok(())
}
