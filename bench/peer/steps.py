"""Whole fine-tuning steps in PyTorch + transformers (+ PEFT), at the shapes of our
`spt-train bench` records (bench/results/finetune-speed*.json), for the peer columns there.

For each (model, B, L) of the records, four configurations, each timed in a fresh process so
that its peak RSS is its own (ours are measured the same way, one process per mode):

- "full": every parameter trains (AdamW over all of them);
- "lora": PEFT LoRA with our defaults (rank 8, alpha 16, dropout 0; FinetuneConfig::default in
  crates/spt-train/src/config.rs) on the same linears as ours (crates/spt-train/src/tasks.rs):
  BERT's query, key, value, attention output dense, intermediate dense and output dense of every
  layer (not the pooler); GPT-2's c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj. The BERT
  classifier head trains too (PEFT's SEQ_CLS task saves it), as ours;
- each of the two again with the forward and loss under `torch.autocast("cpu", bfloat16)`,
  what transformers' Trainer runs with `bf16=True` on a CPU (f32 weights and optimiser, bf16
  matmuls: oneDNN runs them on AMX where the CPU has it). Ours run as each record says (f32, or
  bf16 products in finetune-speed-bf16.json); these columns say how much of our lead a user keeps
  against PyTorch's fastest setting on the same machine.

The model comes from the directory our command names with `--model` (its config.json decides:
BERT -> BertForSequenceClassification with 2 labels, GPT-2 -> GPT2LMHeadModel), from the
checkpoint when the directory has one (MiniLM), else randomly initialised (gpt2-small), as ours.
The batch is the same kind as ours (crates/spt-train/src/bench.rs): B random token-id sequences
of full length L, no padding; random 0/1 labels and cross-entropy for BERT, the next-token LM
loss for GPT-2. A step is forward + backward + AdamW step (lr 1e-5, as ours) + zero_grad, in
train mode (dropout on, as ours). As many timed steps and warm-up steps as the record says.

    python3 steps.py child --model-dir DIR --batch 8 --seq-len 512 --kind full --steps 5 --warmup 1 [--bf16]

prints one JSON line (median_s, step_times_s, peak_rss_bytes, parameter counts); `bench_steps`
runs those children and merges their figures into the records (`torch_full_s`,
`torch_full_bytes`, `torch_lora_s`, `torch_lora_bytes`, `speedup_vs_torch_full` =
torch_full_s / ours_s, `speedup_vs_torch_lora`, `memory_vs_torch_full` = ours_bytes /
torch_full_bytes, `memory_vs_torch_lora`, and the same with `_bf16` after `full` / `lora` for
the autocast runs).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from common import ROOT, loadavg, median, merge, peer_info, ratio, read_results

LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.0
# Full-match regex over BERT module names: our six linears per layer, not pooler.dense.
BERT_LORA_TARGETS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
                     r"|attention\.output\.dense|intermediate\.dense|output\.dense)")
GPT2_LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]
LR = 1e-5


def offline_env():
    """The environment for transformers: no hub (it is not reachable, and must not be needed)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def build_model(torch, model_dir, kind):
    """The model in `model_dir` (checkpoint or random init) for `kind` ("full" or "lora")."""
    import transformers

    transformers.logging.disable_progress_bar()
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        model_type = json.load(f)["model_type"]
    has_weights = os.path.exists(os.path.join(model_dir, "model.safetensors"))
    torch.manual_seed(7)
    if model_type == "bert":
        cls, task = transformers.BertForSequenceClassification, "SEQ_CLS"
        config = transformers.BertConfig.from_json_file(config_path)
        config.num_labels = 2
    elif model_type == "gpt2":
        cls, task = transformers.GPT2LMHeadModel, "CAUSAL_LM"
        config = transformers.GPT2Config.from_json_file(config_path)
    else:
        raise ValueError(f"{config_path}: model_type {model_type!r} (expected bert or gpt2)")
    if has_weights:
        model = cls.from_pretrained(model_dir, config=config, dtype=torch.float32)
    else:
        model = cls(config)
    if kind == "lora":
        import peft

        targets = BERT_LORA_TARGETS if model_type == "bert" else GPT2_LORA_TARGETS
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type=task, r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
            target_modules=targets, fan_in_fan_out=model_type == "gpt2"))
    return model, model_type, has_weights


def synthetic_batch(torch, model_type, vocab, b, l):
    """B random full-length sequences (ids below the vocabulary size), as our bench's batch."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (b, l), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones(b, l, dtype=torch.long)}
    if model_type == "bert":
        batch["token_type_ids"] = torch.zeros(b, l, dtype=torch.long)
        batch["labels"] = torch.randint(0, 2, (b,), generator=g)
    else:
        batch["labels"] = ids  # transformers shifts them: next-token loss
    return batch


def child(args):
    """Times one configuration in this process and prints its JSON line."""
    import resource

    from common import setup_torch

    torch = setup_torch()
    model, model_type, has_weights = build_model(torch, args.model_dir, args.kind)
    model.train()
    batch = synthetic_batch(torch, model_type, model.config.vocab_size, args.batch, args.seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    times = []
    for s in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= args.warmup:
            times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({
        "median_s": median(times),
        "step_times_s": times,
        "peak_rss_bytes": rss,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "weights": "checkpoint" if has_weights else "random init",
        "loss": loss.item(),
        "autocast": "bfloat16" if args.bf16 else None,
    }))


def model_dir_of(doc, name):
    """The directory our commands passed as `--model` for model `name` (the records' case.model
    is its last path component); else third_party/NAME or bench/configs/NAME."""
    commands = doc.get("command", [])
    for cmd in [commands] if isinstance(commands, str) else commands:
        words = shlex.split(cmd)
        for flag, value in zip(words, words[1:]):
            if flag == "--model" and os.path.basename(value.rstrip("/")) == name:
                return os.path.join(ROOT, value)
    for folder in ("third_party", "bench/configs"):
        if os.path.isdir(os.path.join(ROOT, folder, name)):
            return os.path.join(ROOT, folder, name)
    raise FileNotFoundError(f"no model directory for {name!r} (run scripts/fetch-assets.sh minilm?)")


# (record key, --kind, autocast to bf16): every configuration timed per (model, B, L).
CONFIGS = (("full", "full", False), ("lora", "lora", False),
           ("full_bf16", "full", True), ("lora_bf16", "lora", True))


def run_child(model_dir, kind, b, l, steps, warmup, bf16):
    cmd = [sys.executable, os.path.abspath(__file__), "child", "--model-dir", model_dir,
           "--kind", kind, "--batch", str(b), "--seq-len", str(l),
           "--steps", str(steps), "--warmup", str(warmup)] + (["--bf16"] if bf16 else [])
    p = subprocess.run(cmd, capture_output=True, text=True, env=offline_env())
    if p.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_steps(torch, paths, quick=False):
    """Measures every (model, B, L) found in the records of `paths` once per configuration and
    adds the figures to each of those records, in every file."""
    docs = {p: read_results(p) for p in paths}
    measured = {}
    for path, doc in docs.items():
        for rec in doc["records"]:
            c = rec["case"]
            key = (c["model"], c["B"], c["L"])
            if key in measured:
                continue
            b, l = key[1:]
            steps, warmup = rec.get("steps", 5), rec.get("warmup", 1)
            if quick:
                b, l, steps, warmup = min(b, 2), min(l, 64), 2, 1
            model_dir = model_dir_of(doc, c["model"])
            before = loadavg()
            runs = {}
            for key_, kind, bf16 in CONFIGS:
                print(f"peer steps: {c['model']} B{b}xL{l} {key_} ...", flush=True)
                runs[key_] = run_child(model_dir, kind, b, l, steps, warmup, bf16)
                print(f"peer steps: {key_}: median {runs[key_]['median_s']:.3f} s/step, "
                      f"peak RSS {runs[key_]['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
            measured[key] = {"runs": runs, "loadavg_before": before, "loadavg_after": loadavg(),
                             "steps": steps, "warmup": warmup, "B": b, "L": l}
    for path, doc in docs.items():
        out = []
        for rec in doc["records"]:
            c = rec["case"]
            m = measured[(c["model"], c["B"], c["L"])]
            runs = m["runs"]
            ours_s, ours_b = rec.get("ours_s"), rec.get("ours_bytes")
            details = {
                "what": "PyTorch + transformers: full fine-tuning (AdamW over all parameters) and "
                        f"PEFT LoRA r = {LORA_RANK}, alpha = {LORA_ALPHA} on our target linears, each "
                        "in f32 and under bf16 autocast (`_bf16`); peak RSS of a fresh Python process "
                        "(torch import included)",
                "steps": m["steps"],
                "warmup": m["warmup"],
                "loadavg_before": m["loadavg_before"],
                "loadavg_after": m["loadavg_after"],
            }
            figures = {}
            for key_, _, _ in CONFIGS:
                r = runs[key_]
                details[key_] = {k: r[k] for k in ("step_times_s", "trainable_params", "total_params",
                                                     "attn_implementation", "weights", "autocast")}
                figures[f"torch_{key_}_s"] = r["median_s"]
                figures[f"torch_{key_}_bytes"] = r["peak_rss_bytes"]
                figures[f"speedup_vs_torch_{key_}"] = ratio(r["median_s"], ours_s)
                figures[f"memory_vs_torch_{key_}"] = ratio(ours_b, r["peak_rss_bytes"])
            if quick:
                details["quick_shape"] = {"B": m["B"], "L": m["L"]}
            out.append((c, {**figures, "peer_details": details}))
            print(f"peer steps {c}: ours {ours_s or float('nan'):.3f} s | "
                  + " | ".join(f"torch {k} {runs[k]['median_s']:.3f} s" for k, _, _ in CONFIGS), flush=True)
        merge(path, out, peer_info(torch))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child", help="time one configuration in this process")
    c.add_argument("--model-dir", required=True)
    c.add_argument("--kind", choices=("full", "lora"), required=True)
    c.add_argument("--batch", type=int, required=True)
    c.add_argument("--seq-len", type=int, required=True)
    c.add_argument("--steps", type=int, default=5)
    c.add_argument("--warmup", type=int, default=1)
    c.add_argument("--bf16", action="store_true", help="forward and loss under torch.autocast(cpu, bfloat16)")
    args = ap.parse_args()
    if args.cmd == "child":
        child(args)


if __name__ == "__main__":
    main()
