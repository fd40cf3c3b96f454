"""Classification inference in PyTorch + transformers at the cases of our inference benchmark
(crates/spt-train/benches/predict.rs, bench/results/predict.json): all-MiniLM-L6-v2 from
third_party/ with a 2-label head (BertForSequenceClassification, what a PyTorch user serves
after fine-tuning; a LoRA or SPT run exports to it too), eval mode, torch.inference_mode(), f32,
and for our records with `matmul_precision: bf16` under bf16 autocast.

The same texts (the first reviews of data/rt, `plot` rows dropped, file order), tokenised by
transformers' tokenizer from the same tokenizer.json to at most 64 tokens, and the same batches
as ours (the record's `batch_texts`), each padded to its longest. The token count is checked
against ours. Times: the forward, the softmax and `.tolist()` of every batch (tokenisation
excluded, as in ours), median of as many runs as ours after one warm-up. Memory: this process's
peak RSS after the cases (torch imported, weights included).

Our records of every mode are compared with the one PyTorch model; adds `torch_s`,
`torch_bytes` and `vs_torch` (= ours_s / torch_s: below 1, ours is faster) to every record, and
`peer_details`.
"""
import csv
import os
import resource
import time

from common import ROOT, loadavg, median, merge, peer_info, ratio, read_results

MODEL = os.path.join(ROOT, "third_party", "all-MiniLM-L6-v2")
CSV = os.path.join(ROOT, "data", "rt", "rotten_tomatoes_corpus_full.csv")
MAX_LENGTH = 64


def reviews(n):
    """The first `n` texts whose category is not `plot`, in file order (as ours reads them)."""
    csv.field_size_limit(1 << 30)
    out = []
    with open(CSV, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] != "plot":
                out.append(row["text"])
                if len(out) == n:
                    break
    return out


def run(torch, model, encoded, bf16=False):
    """Every batch once, in f32 or under bf16 autocast (what transformers' `bf16=True` runs and a
    PyTorch user serves with on a CPU with AMX); seconds."""
    import contextlib
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        for enc in encoded:
            logits = model(**enc).logits
            torch.softmax(logits.float(), dim=-1).tolist()
    return time.perf_counter() - t0


def run_cases(cases, quick):
    """Every distinct case (its batches), in this (fresh) process: a list of (key, fields)."""
    import transformers
    from common import setup_torch

    torch = setup_torch()
    transformers.logging.disable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(MODEL, num_labels=2).eval()
    texts = reviews(max(i for _, batches, _, _ in cases for b in batches for i in b) + 1)
    out = []
    with torch.inference_mode():
        for key, batches, reps, tokens in cases:
            bf16 = key[2] == "bf16"
            if quick:
                batches, reps = batches[:2], 1
            encoded = [tok([texts[i] for i in b], padding=True, truncation=True, max_length=MAX_LENGTH,
                           return_tensors="pt") for b in batches]
            ours_tokens = sum(int(e["attention_mask"].sum()) for e in encoded)
            if not quick and ours_tokens != tokens:
                raise SystemExit(f"peer: predict {key}: {ours_tokens} tokens, ours had {tokens}: the texts differ")
            before = loadavg()
            run(torch, model, encoded, bf16)  # warm-up
            times = [run(torch, model, encoded, bf16) for _ in range(reps)]
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(f"peer: predict {key}: {median(times):.3f} s", flush=True)
            out.append((key, {"torch_s": median(times), "torch_bytes": rss, "runs_s": times,
                              "loadavg_before": before, "loadavg_after": loadavg()}))
    return out


def bench_predict(torch, path, quick=False):
    """Adds PyTorch's figures to every record of `path`, measured in a fresh process (spawned)
    so that its peak RSS is its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    records = read_results(path)["records"]
    cases = {}
    key_of = lambda c: (c["batches"], c["batch_size"], c.get("matmul_precision", "f32"))
    for rec in records:
        key = key_of(rec["case"])
        cases.setdefault(key, (key, rec["batch_texts"], rec.get("reps", 5), rec["tokens"]))
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ex:
        measured = dict(ex.submit(run_cases, list(cases.values()), quick).result())
    fields = []
    for rec in records:
        m = measured[key_of(rec["case"])]
        bf16 = key_of(rec["case"])[2] == "bf16"
        fields.append((rec["case"], {
            "torch_s": m["torch_s"],
            "torch_bytes": m["torch_bytes"],
            "vs_torch": ratio(rec.get("ours_s"), m["torch_s"]),
            "peer_details": {
                "what": ("PyTorch + transformers BertForSequenceClassification (all-MiniLM-L6-v2, 2 labels), "
                         "eval mode, torch.inference_mode(), "
                         + ("bf16 autocast (torch.autocast('cpu', dtype=torch.bfloat16))" if bf16 else "f32")
                         + ", the same batches padded to their longest; "
                         "peak RSS of its process after every case (torch import included)"),
                "runs_s": m["runs_s"],
                "loadavg_before": m["loadavg_before"],
                "loadavg_after": m["loadavg_after"],
                **({"quick": True} if quick else {}),
            },
        }))
    merge(path, fields, peer_info(torch))
