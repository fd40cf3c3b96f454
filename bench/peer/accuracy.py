"""PyTorch's accuracy at the README's headline recipes: transformers full fine-tuning and PEFT
LoRA of all-MiniLM-L6-v2 on Rotten Tomatoes, on exactly the rows, batches and schedule that
spt-train uses, so that our dense and LoRA accuracies have a PyTorch figure beside them.

What is the same as `spt-train finetune` (the headline records' settings):
- the rows: the CSV without its `plot` rows, held out 10 % by movie as spt-train does (its
  SplitMix64 shuffle of the sorted movie names, seeded by --seed; crates/spt-train/src/data/read.rs);
- the batches and their order: spt-train's `epoch_batches` (shuffle, sort by length within windows
  of 50 batches, shuffle the batches; crates/spt-train/src/data/batch.rs), each padded to its
  longest row, tokenized by the checkpoint's own tokenizer, truncated to 64 tokens;
- the schedule: lr · (s + 1) / W for the first W = ⌈0.1 · steps⌉ updates, then linear to 0
  (crates/spt-train/src/optim/mod.rs), AdamW (β 0.9 / 0.999, ε 1e-8, weight decay 0.01 except on
  biases and LayerNorm weights, as HF Trainer), gradient norm clipped at 1.0, dropout on;
- evaluation: accuracy and macro-F1 on the held-out rows after the epoch.
What differs: the new classifier's initial weights and the dropout masks come from torch's RNG
(seeded with --seed), not ours, so single seeds differ; compare means over seeds.

Modes: `full` (every weight, lr 1e-4) and `lora` (PEFT r 8, alpha 16 on q, k, v, o, fc1, fc2,
the classifier and, with `--modules-to-save pooler`, the pooler trained in full, lr 1e-3), the
settings of our `dense` and `lora` headline rows (the latter with `--modules-to-save pooler`). Appends one record per run to
bench/results/accuracy.json (case mode `pytorch-full` / `pytorch-lora`; an earlier record of that
mode, variant, seed and lr is marked superseded), through a temporary file and a rename, after
each run.

    .venv-peer/bin/python bench/peer/accuracy.py --mode full --seeds 42,43,44,45
"""
import argparse
import csv
import datetime
import json
import math
import os
import resource
import time

from common import ROOT, loadavg, setup_torch

MASK = (1 << 64) - 1
LORA_TARGETS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
                r"|attention\.output\.dense|intermediate\.dense|output\.dense)")
DATASET = "rotten_tomatoes (fresh vs rotten, 10% validation split by movie_name, seed {})"


class SplitMix64:
    """crates/spt-train/src/rng.rs, bit for bit."""

    def __init__(self, seed):
        self.state = seed & MASK

    @classmethod
    def derive(cls, seed, stream):
        r = cls(seed ^ ((stream * 0xD1B54A32D192ED03) & MASK))
        r.next_u64()
        return r

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n):
        zone = MASK - (MASK % n)
        while True:
            x = self.next_u64()
            if x < zone:
                return x % n

    def shuffle(self, xs):
        for i in range(len(xs) - 1, 0, -1):
            j = self.below(i + 1)
            xs[i], xs[j] = xs[j], xs[i]


def split_by_group(groups, fraction, seed):
    """spt-train's `split_train_validation` with `by_group`: a boolean per row, True = held out."""
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    # Rust sorts the names as UTF-8 bytes; Python's str order (code points) is the same order.
    keys = sorted(members)
    SplitMix64.derive(seed, 0x5EED5B11).shuffle(keys)
    want = math.ceil(len(groups) * fraction)
    held, taken = [False] * len(groups), 0
    for k in keys[:-1]:
        if taken >= want:
            break
        for i in members[k]:
            held[i] = True
        taken += len(members[k])
    return held


def epoch_batches(lengths, batch_size, seed, epoch=0, bucket_batches=50):
    """spt-train's training batch order (BatchOrder::TRAIN)."""
    idx = list(range(len(lengths)))
    rng = SplitMix64.derive(seed, epoch + 1)
    rng.shuffle(idx)
    window = batch_size * bucket_batches
    for s in range(0, len(idx), window):
        idx[s:s + window] = sorted(idx[s:s + window], key=lambda i: lengths[i])  # stable, as Rust's
    out = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    rng.shuffle(out)
    return out


def macro_f1(preds, labels):
    classes = sorted(set(preds) | set(labels))
    f1 = []
    for c in classes:
        tp = sum(p == c and l == c for p, l in zip(preds, labels))
        fp = sum(p == c and l != c for p, l in zip(preds, labels))
        fn = sum(p != c and l == c for p, l in zip(preds, labels))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1) / len(f1)


def run(args, seed, torch, transformers, rows, labels, tok):
    held = split_by_group([r["movie_name"] for r in rows], 0.1, seed)
    train = [r for r, h in zip(rows, held) if not h]
    valid = [r for r, h in zip(rows, held) if h]
    enc = lambda rs: tok([r["text"] for r in rs], truncation=True, max_length=args.max_length)["input_ids"]
    train_ids, valid_ids = enc(train), enc(valid)
    order = epoch_batches([len(e) for e in train_ids], args.batch_size, seed)
    total = len(order)
    if args.smoke:  # a pipeline check: 3 steps, 64 validation rows
        order, valid, valid_ids = order[:3], valid[:64], valid_ids[:64]
    warmup = math.ceil(0.1 * total)
    lr = args.lr if args.lr is not None else (1e-4 if args.mode == "full" else 1e-3)

    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(
        args.model_dir, num_labels=len(labels), dtype=torch.float32)
    if args.mode == "lora":
        import peft
        # SEQ_CLS adds the classifier to modules_to_save; `pooler` matches bert.pooler as our
        # `--modules-to-save pooler` does.
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
            modules_to_save=list(args.modules_to_save) or None))  # a copy: PEFT appends to it
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
    opt = torch.optim.AdamW([
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": 0.01},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(total - warmup, 1)))
    model.train()
    t0 = time.perf_counter()
    for idx in order:
        b = tok.pad({"input_ids": [train_ids[i] for i in idx]}, return_tensors="pt")
        y = torch.tensor([labels[train[i]["category"]] for i in idx])
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0

    model.eval()
    preds, gold, loss_sum = [], [], 0.0
    by_len = sorted(range(len(valid)), key=lambda i: len(valid_ids[i]))
    with torch.no_grad():
        for s in range(0, len(by_len), 32):
            idx = by_len[s:s + 32]
            b = tok.pad({"input_ids": [valid_ids[i] for i in idx]}, return_tensors="pt")
            y = torch.tensor([labels[valid[i]["category"]] for i in idx])
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=y)
            loss_sum += out.loss.item() * len(idx)
            preds += out.logits.argmax(-1).tolist()
            gold += y.tolist()
    acc = sum(p == g for p, g in zip(preds, gold)) / len(gold)
    return {
        "accuracy": acc,
        "macro_f1": macro_f1(preds, gold),
        "eval_loss": loss_sum / len(gold),
        "validation_examples": len(valid),
        "train_examples": len(train),
        "steps": total,
        "warmup_steps": warmup,
        "lr": lr,
        "train_s": train_s,
        "trainable_params": sum(p.numel() for _, p in named),
    }


def run_settings(args, seed, lr):
    """What re-runs a record: the command and every setting it used."""
    return {
        "command": f"bench/peer/accuracy.py --mode {args.mode} --seeds {seed} --lr {lr:g}"
                   + (f" --modules-to-save {','.join(args.modules_to_save)}" if args.modules_to_save else ""),
        "model": os.path.relpath(args.model_dir, ROOT), "train_file": os.path.relpath(args.data, ROOT),
        "drop_labels": ["plot"], "text_column": "text", "label_column": "category",
        "validation_split": 0.1, "split_by": "movie_name", "seed": seed,
        "batch_size": args.batch_size, "max_length": args.max_length, "epochs": 1, "lr": lr,
        "warmup_ratio": 0.1, "schedule": "linear", "weight_decay": 0.01, "adam_betas": [0.9, 0.999],
        "adam_eps": 1e-8, "max_grad_norm": 1.0,
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": LORA_TARGETS,
                 "modules_to_save": "classifier (PEFT's SEQ_CLS default)"
                 + "".join(f", {m}" for m in args.modules_to_save)} if args.mode == "lora" else None,
    }


def append_record(rec):
    """Appends `rec`; an earlier live record of the same mode, variant, seed and lr is marked
    superseded."""
    path = os.path.join(ROOT, "bench", "results", "accuracy.json")
    with open(path) as f:
        data = json.load(f)
    data["records"].append(rec)
    i = len(data["records"]) - 1
    for old in data["records"][:i]:
        if old["case"].get("mode") == rec["case"]["mode"] and old.get("variant") == rec["variant"] \
                and old.get("seed") == rec["seed"] and old.get("lr") == rec["lr"] and not old.get("superseded"):
            old["superseded"] = f"re-run as #{i} (accuracy {old['accuracy']:.4f} -> {rec['accuracy']:.4f})"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)  # accuracy.json's own layout
        f.write("\n")
    os.replace(tmp, path)
    return i


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("full", "lora"), required=True)
    ap.add_argument("--seeds", default="42,43,44,45")
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-4 full, 1e-3 lora")
    ap.add_argument("--model-dir", default=os.path.join(ROOT, "third_party", "all-MiniLM-L6-v2"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "rt", "rotten_tomatoes_corpus_full.csv"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--modules-to-save", default="",
                    help="lora: comma-separated modules trained in full besides the classifier (e.g. pooler)")
    ap.add_argument("--added-by", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the split and batch counts, train nothing")
    ap.add_argument("--smoke", action="store_true", help="3 steps, 64 validation rows, print, record nothing")
    args = ap.parse_args()
    args.modules_to_save = [m.strip() for m in args.modules_to_save.split(",") if m.strip()]
    if args.modules_to_save and args.mode != "lora":
        ap.error("--modules-to-save is for --mode lora (full fine-tuning trains every module)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Accuracy, not speed, is measured here, and an epoch takes minutes: OpenMP's spinning
    # threads slow torch ~15x (6 s instead of 0.35 s a step) whenever anything else runs (a
    # cargo build), which passive waiting avoids.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch = setup_torch()
    import transformers

    transformers.logging.disable_progress_bar()
    with open(args.data, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"].strip() != "plot"]
    for r in rows:
        r["category"] = r["category"].strip()
    labels = {name: i for i, name in enumerate(sorted({r["category"] for r in rows}))}
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    for seed in [int(s) for s in args.seeds.split(",")]:
        if args.dry_run:
            held = split_by_group([r["movie_name"] for r in rows], 0.1, seed)
            n_train = len(rows) - sum(held)
            print(json.dumps({"seed": seed, "validation_examples": sum(held), "train_examples": n_train,
                              "steps": math.ceil(n_train / args.batch_size)}))
            continue
        before = loadavg()
        res = run(args, seed, torch, transformers, rows, labels, tok)
        if args.smoke:
            print(json.dumps({"seed": seed, **res}))
            continue
        variant = "PyTorch full fine-tuning" if args.mode == "full" else "PyTorch + PEFT LoRA r = 8" + "".join(
            f", {m} trained" for m in args.modules_to_save)
        rec = {
            "case": {"model": "all-MiniLM-L6-v2", "dataset": DATASET.format(seed), "mode": f"pytorch-{args.mode}"},
            "variant": variant,
            **{k: res[k] for k in ("accuracy", "macro_f1", "eval_loss", "validation_examples", "steps", "lr",
                                   "trainable_params")},
            "epochs": 1, "batch_size": args.batch_size, "max_length": args.max_length, "seed": seed,
            "median_step_s": None,
            "train_s": res["train_s"],
            "peer": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": __import__("peft").__version__ if args.mode == "lora" else None,
                     "threads": torch.get_num_threads()},
            "added_by": args.added_by or f"bench/peer/accuracy.py, {datetime.date.today().isoformat()}",
            "loadavg_before": before, "loadavg_after": loadavg(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "note": "bench/peer/accuracy.py: spt-train's rows, split, batches, schedule and AdamW groups; "
                    "torch's own head initialisation and dropout",
            "settings": run_settings(args, seed, res["lr"]),
        }
        i = append_record(rec)
        print(json.dumps({"record": i, "seed": seed, "mode": args.mode, "accuracy": res["accuracy"],
                          "macro_f1": res["macro_f1"], "train_s": round(res["train_s"], 1)}), flush=True)


if __name__ == "__main__":
    main()
