"""PyTorch's full fine-tuning step at the setting of scripts/demo.sh, timed on this machine, so
the demo can print it beside SPT's and dense's step times measured in the same run.

all-MiniLM-L6-v2 (transformers BertForSequenceClassification from the local checkpoint, 2
labels) on Rotten Tomatoes reviews (the CSV the demo trains on, fresh/rotten rows), tokenized by
the checkpoint's own tokenizer, truncated to --max-length. Batches are formed as spt-train forms
training batches (crates/spt-train/src/data/batch.rs): seeded shuffle, sorted by length within
windows of 50 batches, the batches shuffled, each padded to its longest row. They are batches of
the same kind, not the identical batches (spt-train also holds out 10 % by movie). A step:
forward + cross-entropy, backward, gradient-norm clip at 1.0, AdamW (lr 1e-4, weight decay
0.01) and zero_grad, in train mode (dropout on) -- as spt-train's dense mode does. Prints one
JSON line: the median of the steps after --warmup, the step times and the peak RSS.

    .venv-peer/bin/python bench/peer/demo_step.py [--steps 40] [--warmup 5]
"""
import argparse
import csv
import json
import os
import random
import resource
import time

from common import ROOT, median, setup_torch


def batches(lengths, batch_size, seed, bucket_batches=50):
    """Index batches of one epoch, length-bucketed like spt-train's training batches."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * bucket_batches
    for start in range(0, len(idx), window):
        idx[start:start + window] = sorted(idx[start:start + window], key=lambda i: lengths[i])
    out = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=os.path.join(ROOT, "third_party", "all-MiniLM-L6-v2"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "rt", "rotten_tomatoes_corpus_full.csv"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="timed steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch = setup_torch()
    import transformers

    transformers.logging.disable_progress_bar()
    with open(args.data, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] != "plot"]
    labels = {name: i for i, name in enumerate(sorted({r["category"] for r in rows}))}
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    enc = tok([r["text"] for r in rows], truncation=True, max_length=args.max_length)["input_ids"]
    order = batches([len(e) for e in enc], args.batch_size, args.seed)

    torch.manual_seed(args.seed)
    model = transformers.BertForSequenceClassification.from_pretrained(
        args.model_dir, num_labels=len(labels), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    times, padded = [], []
    for step, idx in enumerate(order[: args.warmup + args.steps]):
        t0 = time.perf_counter()
        b = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
        y = torch.tensor([labels[rows[i]["category"]] for i in idx])
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            padded.append(b["input_ids"].shape[1])
    print(json.dumps({
        "median_step_s": median(times),
        "steps": len(times),
        "warmup": args.warmup,
        "step_times_s": times,
        "mean_padded_length": sum(padded) / max(len(padded), 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "loss": loss.item(),
    }))


if __name__ == "__main__":
    main()
