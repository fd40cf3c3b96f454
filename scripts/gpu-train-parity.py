"""CPU vs CUDA fine-tuning with the spt-train binary on the tiny fixture models.

Run by gpu-check.sh (step 5, with gpu-build.sh --with-train). For BERT (classify) and GPT-2 (lm),
in dense, LoRA and SPT mode, the same seeded 8-step run goes once with --device cpu and once with
--device cuda (f32 both); the per-step training losses must agree:
|cuda - cpu| <= tol * (1 + |cpu|), tol 1e-3 for dense and LoRA (different GEMM and reduction
orders, compounded over 8 AdamW steps) and 2e-2 for SPT (an ADC score tie may select a different
key on the two devices).

Usage: python3 gpu-train-parity.py SPT_TRAIN FIXTURES_DIR OUT_DIR [--devices cpu,cuda] [--budget S]
Each spt-train run may take RUN_S = 25 s, less when the --budget (seconds for the whole script,
from gpu-check.sh) runs out; a case that cannot start for lack of time is recorded as skipped.
Writes OUT_DIR/train-parity.json (temporary file, then rename) at the start and after every
case: {"cases": [...], "passed": all six cases recorded and passed, "complete": all six recorded
(a case skipped for time has "skipped": true)}; exits 1 if a case fails, is skipped or cannot run.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

WORDS = ["good", "bad", "great", "awful", "movie", "film", "the", "a", "was", "very", "story", "actor"]
TOL = {"dense": 1e-3, "lora": 1e-3, "spt": 2e-2}
RUN_S = 25  # one spt-train finetune run (8 steps of a tiny model: seconds, on either device)
MIN_S = 8   # a run with less time than this left is not started


def model_dir(fixtures, name, root):
    """The fixture with a word-level tokenizer.json covering its 1000-token vocabulary."""
    dst = os.path.join(root, name)
    shutil.copytree(os.path.join(fixtures, name), dst)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<|endoftext|>"] + WORDS)}
    for i in range(len(vocab), 1000):
        vocab[f"w{i}"] = i
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    with open(os.path.join(dst, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    return dst


def data(root):
    cls = os.path.join(root, "cls.csv")
    with open(cls, "w") as f:
        f.write("text,label,movie\n")
        for i in range(60):
            w, label = [("good", "pos"), ("bad", "neg"), ("story", "neutral")][i % 3]
            f.write(f"the {w} movie was very {w},{label},m{i % 5}\n")
    lm = os.path.join(root, "lm.txt")
    with open(lm, "w") as f:
        for i in range(200):
            f.write(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + "\n")
    return cls, lm


class OutOfTime(Exception):
    pass


def losses(exe, model, task, train, mode, device, out, deadline):
    args = [exe, "-q", "finetune", "--model", model, "--task", task, "--train-file", train,
            "--output-dir", out, "--overwrite", "--mode", mode, "--max-steps", "8", "--batch-size", "8",
            "--lr", "3e-3", "--seed", "1", "--log-every", "1", "--no-progress", "--device", device,
            "--validation-split", "0.3"]
    args += ["--split-by", "movie"] if task == "classify" else ["--block-size", "16"]
    if mode == "spt":
        args += ["--attn-k", "4"]
    left = deadline - time.monotonic()
    if left < MIN_S:
        raise OutOfTime(f"skipped: {max(left, 0):.0f} s left of the budget")
    limit = min(RUN_S, left - 2)
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{mode} on {device}: timed out after {limit:.0f} s") from None
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[2:])}: exit {r.returncode}: {r.stderr.strip()[-600:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def write(out_dir, cases, ok, n_cases):
    complete = len(cases) == n_cases
    path = os.path.join(out_dir, "train-parity.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"cases": cases, "passed": ok and complete, "complete": complete}, f, indent=1, allow_nan=False)
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description="CPU vs CUDA fine-tuning of the tiny fixture models")
    ap.add_argument("exe")
    ap.add_argument("fixtures")
    ap.add_argument("out_dir")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--budget", type=float, default=float("inf"), help="seconds for the whole script")
    opts = ap.parse_args()
    exe, fixtures, out_dir, devices = opts.exe, opts.fixtures, opts.out_dir, opts.devices.split(",")
    deadline = time.monotonic() + opts.budget
    os.makedirs(out_dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="spt-train-parity.")
    cls, lm = data(root)
    runs = [("tiny-bert-cls", "classify", cls), ("tiny-gpt2", "lm", lm)]
    modes = ("dense", "lora", "spt")
    cases, ok = [], True
    write(out_dir, cases, ok, len(runs) * len(modes))
    for name, task, train in runs:
        model = model_dir(fixtures, name, root)
        for mode in modes:
            case = {"model": name, "task": task, "mode": mode, "devices": devices, "tol": TOL[mode]}
            try:
                a, b = (losses(exe, model, task, train, mode, d, os.path.join(root, f"{name}-{mode}-{i}"), deadline)
                        for i, d in enumerate(devices))
                steps = sorted(set(a) & set(b))
                # A loss that is not a finite number (null, NaN, inf) fails the case where it is:
                # max() would pass a NaN over, and NaN is not JSON.
                finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
                for dev, got in zip(devices, (a, b)):
                    bad = next((s for s in sorted(got) if not finite(got[s])), None)
                    if bad is not None:
                        raise ValueError(f"step {bad}: loss {got[bad]!r} on {dev}")
                worst = max((abs(b[s] - a[s]) / (1 + abs(a[s])), s) for s in steps) if steps else (None, None)
                case.update(steps=len(steps), max_scaled_diff=worst[0], at_step=worst[1],
                            first_loss=[a.get(1), b.get(1)], last_loss=[a.get(8), b.get(8)],
                            passed=len(steps) == 8 and worst[0] <= TOL[mode])
            except OutOfTime as e:
                case.update(passed=False, skipped=True, error=str(e))
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                case.update(passed=False, error=str(e))
            ok &= case["passed"]
            print(json.dumps(case), flush=True)
            cases.append(case)
            write(out_dir, cases, ok, len(runs) * len(modes))
    shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
