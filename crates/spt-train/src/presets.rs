//! Measured recipes: the defaults `finetune` starts from, per mode and preset.
//!
//! Resolution order: the built-in defaults, then the mode's learning rate and (spt) the preset,
//! then `--config`, then the flags. Every value here comes from runs recorded in
//! `bench/results/accuracy.json` (MiniLM on Rotten Tomatoes, one epoch, batch 16, seeds 42–45)
//! and timed in `bench/results/finetune-speed*.json` (MiniLM, B 8 × L 512):
//!
//! | recipe | accuracy (4 seeds) | step vs PyTorch full fine-tuning (same run) |
//! |---|--:|--:|
//! | dense, lr 1e-4 | 0.827 | 3.03× |
//! | lora r 8 + pooler, lr 1e-3 | 0.820 | 4.41× (4.45× PEFT) |
//! | spt `accurate` | 0.814 | 4.65× |
//! | spt `fast` | 0.797 | 6.17× (6.22× PEFT) |
//!
//! Both presets keep every key (`attn_k_fraction = 1.0`): sparse attention that keeps every key
//! runs the fused dense kernel, which on the CPU is faster than per-query PQ selection at every
//! measured length, and kept 2.4 points more accuracy than k = L/8 in `fast` (docs/results). Sparse
//! attention stays a setting (`--attn-k`, `--attn-k-fraction`, `--attn-tile`).

use crate::config::{FinetuneConfig, Mode};
use crate::data::TaskKind;
use serde::{Deserialize, Serialize};

/// A measured SPT recipe (`--preset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Every key kept, FFN 2 of 8 blocks + linear correction, pooler trained, lr 1e-3: the
    /// fastest measured setting.
    Fast,
    /// Every key kept, FFN 6 of 8 blocks + linear correction, pooler trained, lr 1e-3: the
    /// setting measured closest to dense accuracy.
    Accurate,
}

impl Preset {
    /// `(attention key fraction, FFN blocks run of 8)`.
    fn sparsity(self) -> (f64, usize) {
        match self {
            Self::Fast => (1.0, 2),
            Self::Accurate => (1.0, 6),
        }
    }
}

/// The learning rate measured to work for each mode (full fine-tuning needs a smaller one than
/// adapters).
pub fn default_lr(mode: Mode) -> f64 {
    match mode {
        Mode::Dense => 1e-4,
        Mode::Lora | Mode::Spt => 1e-3,
    }
}

/// The preset a run uses: the one asked for, else `fast` in spt mode.
pub fn effective(mode: Mode, asked: Option<Preset>) -> Option<Preset> {
    match mode {
        Mode::Spt => Some(asked.unwrap_or(Preset::Fast)),
        _ => asked,
    }
}

/// The defaults for `mode` (and, in spt mode, the preset) before `--config` and the flags.
pub fn base_config(mode: Mode, task: TaskKind, preset: Option<Preset>) -> FinetuneConfig {
    let mut c = FinetuneConfig {
        mode,
        task,
        lr: default_lr(mode),
        ..FinetuneConfig::default()
    };
    if let (Mode::Spt, Some(p)) = (mode, preset) {
        let (frac, top) = p.sparsity();
        c.preset = Some(p);
        c.attn_k = None;
        c.attn_k_fraction = Some(frac);
        c.ffn_blocks = 8;
        c.ffn_top_k = top;
        c.ffn_correction = true;
    } else {
        c.preset = preset;
    }
    // Adapters train the (BERT) classifier's pooler too: LoRA 0.820 with it, 0.741 without (one
    // seed of four collapsed to one class; records 194–197 against 166–169), and +1 point in SPT
    // (55–58). Full fine-tuning trains it anyway.
    if mode != Mode::Dense && task == TaskKind::Classify {
        c.modules_to_save = vec!["pooler".into()];
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FinetuneArgs;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FinetuneArgs,
    }

    fn resolve(argv: &[&str]) -> Result<FinetuneConfig, crate::config::ConfigError> {
        let base = ["x", "--model", "m", "--train-file", "t.csv"];
        let cli = Cli::try_parse_from(base.iter().chain(argv).copied()).unwrap();
        FinetuneConfig::from_args(&cli.args)
    }

    #[test]
    fn flags_and_files_override_the_preset() {
        let c = resolve(&["--mode", "spt"]).unwrap();
        assert_eq!(
            (c.preset, c.attn_k_fraction, c.ffn_top_k),
            (Some(Preset::Fast), Some(1.0), 2)
        );
        // --attn-k replaces the preset's fraction instead of clashing with it.
        let c = resolve(&[
            "--mode", "spt", "--preset", "accurate", "--attn-k", "64", "--lr", "5e-4",
        ])
        .unwrap();
        assert_eq!(
            (c.attn_k, c.attn_k_fraction, c.ffn_top_k, c.lr),
            (Some(64), None, 6, 5e-4)
        );
        let lora = resolve(&["--mode", "lora"]).unwrap();
        assert_eq!(
            (lora.lr, lora.modules_to_save),
            (1e-3, vec!["pooler".to_string()])
        );
        assert!(resolve(&["--mode", "dense"]).unwrap().modules_to_save.is_empty());
        // A preset alone implies spt; with another mode it is a named error.
        let c = resolve(&["--preset", "accurate"]).unwrap();
        assert_eq!(
            (c.mode, c.preset, c.ffn_top_k),
            (Mode::Spt, Some(Preset::Accurate), 6)
        );
        let e = resolve(&["--preset", "fast", "--mode", "dense"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("preset") && e.contains("dense"), "{e}");
        // A config file's keys win over the preset; its mode picks the defaults.
        let dir = std::env::temp_dir().join(format!("spt-presets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "mode = \"spt\"\npreset = \"accurate\"\nffn_top_k = 4\nattn_k = 32\n",
        )
        .unwrap();
        let c = resolve(&["--config", f.to_str().unwrap()]).unwrap();
        assert_eq!(
            (c.preset, c.ffn_top_k, c.attn_k, c.attn_k_fraction, c.lr),
            (Some(Preset::Accurate), 4, Some(32), None, 1e-3)
        );
        // A resolved config round-trips through its own file.
        let saved = dir.join("saved.toml");
        std::fs::write(&saved, toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(FinetuneConfig::load(&saved).unwrap(), c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn spt_defaults_to_fast_and_presets_differ() {
        let fast = base_config(Mode::Spt, TaskKind::Classify, effective(Mode::Spt, None));
        assert_eq!(fast.preset, Some(Preset::Fast));
        assert_eq!(
            (fast.attn_k_fraction, fast.ffn_top_k, fast.lr),
            (Some(1.0), 2, 1e-3)
        );
        assert_eq!(fast.modules_to_save, vec!["pooler".to_string()]);
        let acc = base_config(
            Mode::Spt,
            TaskKind::Classify,
            effective(Mode::Spt, Some(Preset::Accurate)),
        );
        assert_eq!(
            (acc.attn_k_fraction, acc.ffn_top_k, acc.ffn_correction),
            (Some(1.0), 6, true)
        );
        // GPT-2 has no pooler.
        let lm = base_config(Mode::Spt, TaskKind::Lm, Some(Preset::Fast));
        assert!(lm.modules_to_save.is_empty());
        assert_eq!(base_config(Mode::Dense, TaskKind::Classify, None).lr, 1e-4);
        assert_eq!(base_config(Mode::Lora, TaskKind::Classify, None).lr, 1e-3);
    }
}
