//! [`FinetuneConfig::validate`] (a finetune run) and [`FinetuneConfig::validate_model`] (the model
//! part, for every subcommand): ranges and combinations, each error naming the setting.

use super::{invalid, ConfigError, FinetuneConfig, Mode};

impl FinetuneConfig {
    /// Checks ranges and combinations; errors name the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.trim().is_empty() {
            return Err(invalid("model", "required: a local directory or a hub id"));
        }
        if self.train_files.is_empty() {
            return Err(invalid("train_files", "required: at least one --train-file"));
        }
        if let Some(pair) = &self.text_pair_column {
            // The same column twice, or the label fed in as input text, trains on nonsense.
            if *pair == self.text_column || *pair == self.label_column {
                return Err(invalid(
                    "text_pair_column",
                    format!(
                        "`{pair}` is already the {} column; the pair column holds the second text",
                        if *pair == self.text_column {
                            "text"
                        } else {
                            "label"
                        }
                    ),
                ));
            }
        }
        // finetune.toml stores every setting, and a TOML integer is an i64: a larger value would
        // train, then make the run impossible to resume or evaluate.
        if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(self) {
            if let Some((k, v)) = m
                .iter()
                .find(|(_, v)| v.as_u64().is_some_and(|n| n > i64::MAX as u64))
            {
                return Err(invalid(
                    k,
                    format!("must be at most {} (a TOML integer), got {v}", i64::MAX),
                ));
            }
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", "batch size must be at least 1, got 0"));
        }
        if self.eval_batch_size == Some(0) {
            return Err(invalid("eval_batch_size", "batch size must be at least 1, got 0"));
        }
        if self.grad_accum == 0 {
            return Err(invalid("grad_accum", "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid("lr", format!("must be positive, got {}", self.lr)));
        }
        if !(0.0..1.0).contains(&self.validation_split) {
            return Err(invalid(
                "validation_split",
                format!("must be in [0, 1), got {}", self.validation_split),
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(invalid(
                "warmup_ratio",
                format!("must be in [0, 1], got {}", self.warmup_ratio),
            ));
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            return Err(invalid("epochs", "must be at least 1 (or set max_steps)"));
        }
        if self.max_steps == Some(0) {
            return Err(invalid("max_steps", "must be at least 1"));
        }
        if self.max_length == Some(0) {
            return Err(invalid("max_length", "must be at least 1"));
        }
        if self.block_size < 2 {
            return Err(invalid(
                "block_size",
                format!("must be at least 2, got {}", self.block_size),
            ));
        }
        self.validate_model()?;
        if !(self.router_aux_weight.is_finite() && self.router_aux_weight >= 0.0) {
            return Err(invalid("router_aux_weight", "must be ≥ 0"));
        }
        let router_lr = self.router_lr_scale();
        if !(router_lr.is_finite() && router_lr >= 0.0) {
            return Err(invalid(
                "router_lr_scale",
                format!("must be finite and ≥ 0, got {router_lr}"),
            ));
        }
        if self.mode == Mode::Spt && self.router_aux_weight > 0.0 && router_lr == 0.0 {
            return Err(invalid(
                "router_aux_weight",
                "the balancing loss trains only the routers, which are frozen (router_lr_scale 0, \
                 the default with adapters): set --router-lr-scale > 0 as well",
            ));
        }
        for (name, b) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(invalid(name, format!("must be in [0, 1), got {b}")));
            }
        }
        for (name, v, what) in [
            (
                "max_grad_norm",
                self.max_grad_norm,
                "finite and ≥ 0 (0 turns clipping off)",
            ),
            ("weight_decay", self.weight_decay, "finite and ≥ 0"),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(name, format!("must be {what}, got {v}")));
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return Err(invalid(
                "adam_eps",
                format!(
                    "must be finite and > 0 (it keeps the update's denominator away from 0), got {}",
                    self.adam_eps
                ),
            ));
        }
        if self.warmup_steps.is_some() && self.warmup_ratio > 0.0 {
            return Err(invalid(
                "warmup_steps",
                format!(
                    "give warmup_steps or warmup_ratio, not both (got {} steps and ratio {})",
                    self.warmup_steps.unwrap_or(0),
                    self.warmup_ratio
                ),
            ));
        }
        if !(self.device == "cpu"
            || self.device == "cuda"
            || self
                .device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok()))
        {
            return Err(invalid(
                "device",
                format!("expected cpu, cuda or cuda:N, got `{}`", self.device),
            ));
        }
        if self.matmul_precision == spt_ops::MatmulPrecision::Bf16 && self.device != "cpu" {
            return Err(invalid(
                "matmul_precision",
                format!(
                    "bf16 is a setting of the CPU kernels, and the device is `{}`: use f32 there",
                    self.device
                ),
            ));
        }
        Ok(())
    }

    /// The checks of what builds the model (mode, sparsity, LoRA): the part of
    /// [`validate`](Self::validate) that every subcommand needs, including those that restore a
    /// run's model without training it (`ModelTask::build` calls it).
    pub fn validate_model(&self) -> Result<(), ConfigError> {
        if self.attn_k.is_some() && self.attn_k_fraction.is_some() {
            return Err(invalid("attn_k", "give attn_k or attn_k_fraction, not both"));
        }
        if self.attn_tile == Some(0) {
            return Err(invalid("attn_tile", "block mode needs tiles of at least 1 token"));
        }
        if self.attn_k == Some(0) {
            return Err(invalid("attn_k", "must be at least 1"));
        }
        if let Some(f) = self.attn_k_fraction {
            if !(f > 0.0 && f <= 1.0) {
                return Err(invalid("attn_k_fraction", format!("must be in (0, 1], got {f}")));
            }
        }
        if self.ffn_blocks == 0 || self.ffn_top_k == 0 || self.ffn_top_k > self.ffn_blocks {
            return Err(invalid(
                "ffn_top_k",
                format!(
                    "need 1 ≤ ffn_top_k ≤ ffn_blocks, got {} of {}",
                    self.ffn_top_k, self.ffn_blocks
                ),
            ));
        }
        if self.mode == Mode::Lora && self.lora_rank == 0 {
            return Err(invalid(
                "lora_rank",
                "must be at least 1 in lora mode (spt mode takes 0: no adapters, every weight trains)",
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(invalid(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            ));
        }
        if self.mode == Mode::Spt && self.calibration_batches == 0 {
            return Err(invalid("calibration_batches", "must be at least 1 in spt mode"));
        }
        let scale = self.lora_alpha / self.lora_rank.max(1) as f64;
        if self.lora_rank > 0 && !(self.lora_alpha > 0.0 && scale <= f32::MAX as f64) {
            return Err(invalid(
                "lora_alpha",
                format!(
                    "must be > 0 with alpha / rank (the adapter's scale) within f32's range, got {}",
                    self.lora_alpha
                ),
            ));
        }
        Ok(())
    }
}
