#!/usr/bin/env python3
"""Writes the result tables of README.md and docs/results/*.md from bench/results/*.json.

    python3 scripts/results-md.py           rewrite every generated region (and finetune-speed.svg)
    python3 scripts/results-md.py --check   exit 1, naming each region that differs from the JSON
    python3 scripts/results-md.py --print   print every region to stdout

A generated region sits between `<!-- results:NAME begin -->` and `<!-- results:NAME end -->`;
REGIONS below says which file holds each NAME. Text outside the markers is never touched, so the
findings written around a table stay as written. CI runs `--check` (.ci/run), so a change to
bench/results/*.json needs a run of this script in the same commit. Standard library only.

Quoted figures. Hand-written text that quotes a headline figure (the CLI's help, presets.rs,
docs/cli.md, the README's summary) is listed in QUOTES; the script sets those numbers from the
records too, and --check fails when one differs or its sentence no longer matches. What those
sentences say in words ("within 1 point of dense") is in CLAIMS, and fails when the records stop
supporting it.

Headline records. README.md shows one table, built only from the records that HEADLINE (below)
names: per row, the accuracy records (one per seed in SEEDS, from accuracy.json, each storing
its run's `settings`) and one step-time record (a file and its `case`). Every other record goes to docs/results/*.md. To
change what the README shows, edit HEADLINE; a selector that matches no record, or a seed twice,
is an error that names the row. PyTorch figures (`torch_full_s`, `torch_full_bytes`,
`torch_lora_s`, `torch_lora_bytes`, and the same with `_bf16` for bf16 autocast) are taken from the step-time record, else from another record
of the same model and B x L (same file first); without one the cell says "not measured yet".
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

SEEDS = (42, 43, 44, 45)
MINILM = "all-MiniLM-L6-v2"
MINILM_B8_L512 = {"model": MINILM, "B": 8, "L": 512}

# The README's rows. `accuracy`: fields every record must match (case fields or top-level
# fields; superseded records never match), None = not measured. `speed`: (file, case fields).
# `torch`: the PyTorch peer of the row (fields of the speed records). `torch_accuracy` (optional):
# (selector, label) of PyTorch's accuracy records for the same recipe, one per seed, shown in
# brackets beside ours.
HEADLINE = [
    {
        "recipe": "dense",
        "what": "full fine-tuning, lr 1e-4",
        "accuracy": {"model": MINILM, "mode": "dense", "variant": "full fine-tuning", "lr": 1e-4, "epochs": 1},
        "torch_accuracy": ({"model": MINILM, "mode": "pytorch-full", "lr": 1e-4, "epochs": 1}, "PyTorch"),
        "speed": ("finetune-speed", dict(MINILM_B8_L512, mode="dense")),
        "torch": ("torch_full_s", "torch_full_bytes", "PyTorch full fine-tuning"),
    },
    {
        "recipe": "PEFT-style LoRA",
        "what": "r = 8 on q, k, v, o, fc1, fc2; head and pooler trained; lr 1e-3",
        "accuracy": {"model": MINILM, "mode": "lora", "variant": "r = 8, pooler trained", "lr": 1e-3, "epochs": 1},
        "torch_accuracy": ({"model": MINILM, "mode": "pytorch-lora", "variant": "PyTorch + PEFT LoRA r = 8, pooler trained",
                            "lr": 1e-3, "epochs": 1}, "PEFT"),
        "speed": ("finetune-speed", dict(MINILM_B8_L512, mode="lora")),
        "torch": ("torch_lora_s", "torch_lora_bytes", "PyTorch + PEFT LoRA"),
    },
    {
        "recipe": "SPT fast",
        "what": "`--preset fast`: every key kept (fused dense attention), FFN 2 of 8 + linear correction, pooler trained, LoRA r = 8, lr 1e-3",
        "accuracy": {
            "model": MINILM,
            "mode": "spt",
            "preset": "fast",
            "variant": "preset fast: every key kept (attention runs the fused dense kernel), FFN 2/8 clustered units, "
            "routers frozen at their fit, pooler trained, linear correction",
            "lr": 1e-3,
            "epochs": 1,
        },
        "speed": ("finetune-speed", dict(MINILM_B8_L512, mode="spt")),
        "torch": ("torch_full_s", "torch_full_bytes", "PyTorch full fine-tuning"),
    },
    {
        "recipe": "SPT accurate",
        "what": "`--preset accurate`: every key kept (fused dense attention), FFN 6 of 8 + linear correction, pooler trained, LoRA r = 8, lr 1e-3",
        "accuracy": {
            "model": MINILM,
            "mode": "spt",
            "preset": "accurate",
            "variant": "preset accurate: every key kept (attention runs the fused dense kernel), FFN 6/8 clustered units, "
            "routers frozen at their fit, pooler trained, linear correction",
            "lr": 1e-3,
            "epochs": 1,
        },
        "speed": (
            "finetune-speed-accuracy-setting",
            dict(MINILM_B8_L512, mode="spt", setting="spt k = 512, FFN 6/8, linear correction"),
        ),
        "torch": ("torch_full_s", "torch_full_bytes", "PyTorch full fine-tuning"),
    },
    # The same recipes with bf16 products on AMX (`--matmul-precision bf16`), against PyTorch
    # under bf16 autocast (transformers' `bf16=True`), its fastest setting on this CPU.
    {
        "recipe": "PEFT-style LoRA, bf16",
        "what": "as PEFT-style LoRA, `--matmul-precision bf16`",
        "accuracy": {"model": MINILM, "mode": "lora", "variant": "r = 8, pooler trained, bf16 products", "lr": 1e-3,
                     "epochs": 1},
        "speed": ("finetune-speed-bf16", dict(MINILM_B8_L512, mode="lora", matmul_precision="bf16")),
        "torch": ("torch_lora_bf16_s", "torch_lora_bf16_bytes", "PEFT LoRA, bf16 autocast"),
    },
    {
        "recipe": "SPT fast, bf16",
        "what": "as SPT fast, `--matmul-precision bf16`",
        "accuracy": {
            "model": MINILM,
            "mode": "spt",
            "preset": "fast",
            "variant": "preset fast: every key kept (attention runs the fused dense kernel), FFN 2/8 clustered units, "
            "routers frozen at their fit, pooler trained, linear correction, bf16 products",
            "lr": 1e-3,
            "epochs": 1,
        },
        "speed": ("finetune-speed-bf16", dict(MINILM_B8_L512, mode="spt", matmul_precision="bf16")),
        "torch": ("torch_full_bf16_s", "torch_full_bf16_bytes", "PyTorch full fine-tuning, bf16 autocast"),
    },
]

# The demo's last run (docs/results/accuracy.md): SPT from accuracy.json, dense from demo-dense.json.
DEMO = {"model": MINILM, "added_by": "demo-2"}

# Known wrong text inside records (the JSON is fixed by whoever owns it; until then the table
# marks the cell and says what is right). (substring of `variant`, correction).
ERRATA = [
    ("output-norm, the new default)",
     "output-norm never became the default: the routers' default target stayed activation norm."),
]

# Which file holds each region. Files in bench/results/ that no region names are rendered
# generically into the `other` region, so a new result file shows up in docs at once.
REGIONS = {
    "README.md": ["headline", "cuda-status"],
    "docs/results/speed.md": [
        "attention",
        "attention-fidelity",
        "ffn",
        "finetune-speed",
        "finetune-speed-accuracy-setting",
        "finetune-speed-bf16",
        "lora-linear",
        "linear-cross-entropy",
        "norm-activation",
        "generate",
        "predict",
        "gpu-attention",
        "gpu-ffn",
        "other",
    ],
    "docs/results/accuracy.md": ["demo", "accuracy-minilm", "accuracy-gpt2", "accuracy-superseded", "accuracy-settings"],
}
KNOWN_FILES = {"accuracy", "attention", "attention-fidelity", "demo", "demo-dense", "ffn", "finetune-speed", "finetune-speed-accuracy-setting", "finetune-speed-bf16", "generate", "gpu-h200", "predict", "linear-cross-entropy", "lora-linear", "norm-activation"}


class Stale(Exception):
    pass


# ---------------------------------------------------------------- loading and matching

_cache = {}


def load(name):
    if name not in _cache:
        path = os.path.join(RESULTS, f"{name}.json")
        if not os.path.exists(path):
            raise SystemExit(f"results-md: bench/results/{name}.json is missing")
        with open(path) as f:
            _cache[name] = json.load(f)
    return _cache[name]


def result_names():
    return sorted(f[:-5] for f in os.listdir(RESULTS) if f.endswith(".json"))


def field(rec, key):
    case = rec.get("case") or {}
    return case[key] if key in case else rec.get(key)


def same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    return a == b


def matches(rec, sel):
    return all(same(field(rec, k), v) for k, v in sel.items())


def select(name, sel, what):
    recs = [(i, r) for i, r in enumerate(load(name).get("records") or []) if not r.get("superseded") and matches(r, sel)]
    if not recs:
        raise SystemExit(f"results-md: {what}: no record in bench/results/{name}.json matches {sel}")
    return recs


# ---------------------------------------------------------------- formatting

def mib(b):
    return "–" if b is None else f"{b / 2**20:.1f} MiB"


def gib(b):
    return "–" if b is None else f"{b / 2**30:.2f} GiB"


def num(v, fmt="{:.4g}"):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


def sci(v):
    """1e-4, 5e-4, 0.5: a learning rate as one writes it on the command line."""
    if v is None:
        return "–"
    if v == 0 or 1e-2 <= abs(v) < 1e3:
        return f"{v:g}"
    m, e = f"{v:e}".split("e")
    m = m.rstrip("0").rstrip(".")
    return f"{m}e{int(e)}"


def row(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def head(cells, align=None):
    align = align or ["---"] * len(cells)
    return [row(cells), "|" + "|".join(align) + "|"]


def cpu_name(data):
    """The CPU a result file was measured on, short ("Intel Xeon"), or "CPU" where it is not recorded."""
    cpu = (data.get("machine") or {}).get("cpu") if isinstance(data.get("machine"), dict) else None
    if not cpu or cpu == "unknown":
        return "CPU"
    cpu = re.sub(r"\((R|TM|tm)\)", "", cpu)
    cpu = re.sub(r"\b(Processor|CPU)\b.*$", "", cpu)
    return " ".join(cpu.split()) or "CPU"


def machine_str(m):
    if isinstance(m, dict):
        return ", ".join(f"{k} {v}" for k, v in m.items())
    return str(m)


def command_lines(cmd):
    cmds = cmd if isinstance(cmd, list) else [cmd]
    if len(cmds) == 1:
        return [f"Re-run: `{cmds[0]}`."]
    return ["Re-run:", ""] + [f"- `{c}`" for c in cmds]


def footer(data, recs):
    out = ["", f"Machine: {machine_str(data.get('machine', '?'))}."]
    kinds = sorted({r.get("bytes_kind") for r in recs if r.get("bytes_kind")})
    if kinds:
        out.append(f"Bytes: {'; '.join(kinds)}.")
    if data.get("note"):
        out.append(f"Note: {data['note']}")
    peer = data.get("peer")
    if isinstance(peer, dict) and peer.get("torch"):
        whats = sorted({(r.get("peer_details") or {}).get("what") for r in recs} - {None})
        out.append(f"PyTorch (`torch_*` columns): torch {peer['torch']}, {peer.get('threads')} threads, measured "
                   f"{peer.get('measured')} by `scripts/peer-bench.sh`" + "".join(f"; {w}" for w in whats) + ".")
    out += command_lines(data.get("command", "?"))
    return out


TORCH_ORDER = ["torch_s", "torch_sdpa_s", "torch_eager_s", "torch_full_s", "torch_full_bytes", "torch_lora_s", "torch_lora_bytes",
               "torch_full_bf16_s", "torch_full_bf16_bytes", "torch_lora_bf16_s", "torch_lora_bf16_bytes"]


def torch_keys(recs):
    keys = sorted({k for r in recs for k in r if k.startswith("torch_")})
    return sorted(keys, key=lambda k: (TORCH_ORDER.index(k) if k in TORCH_ORDER else len(TORCH_ORDER), k))


def torch_cell(r, k):
    v = r.get(k)
    if v is None:
        return "–"
    if k.endswith("_bytes"):
        return mib(v)
    if isinstance(v, (int, float)):
        return f"{v:.4f}"
    return str(v)


# ---------------------------------------------------------------- speed tables

def speed_table(name):
    """Records with ours_s / baseline_s: one row each, the case's fields first, PyTorch last."""
    data = load(name)
    recs = data.get("records") or []
    keys = []
    for r in recs:
        for k in r.get("case") or {}:
            if k not in keys:
                keys.append(k)
    tk = torch_keys(recs)
    # Attention records also time our fused dense op (flash_attention) in the same run.
    fused = any("fused_dense_s" in r for r in recs)
    # Step records also time the model's build (calibration included) before the first step.
    build = any("build_s" in r for r in recs)
    # Generation records also time one new token.
    token = any("ours_token_s" in r for r in recs)
    extra = (["fused dense (s)"] if fused else []) + (["build (s)"] if build else []) + (["ours per token (s)"] if token else [])
    out = head(keys + ["ours (s)", "baseline (s)"] + extra + ["speedup", "ours bytes", "baseline bytes", "bytes ratio"] + tk)
    for r in recs:
        ob, bb = r.get("ours_bytes"), r.get("baseline_bytes")
        out.append(row(
            [num((r.get("case") or {}).get(k)) for k in keys]
            + [num(r.get("ours_s"), "{:.4f}"), num(r.get("baseline_s"), "{:.4f}")]
            + ([num(r.get("fused_dense_s"), "{:.4f}")] if fused else [])
            + ([num(r.get("build_s"), "{:.1f}")] if build else [])
            + ([num(r.get("ours_token_s"), "{:.4f}")] if token else [])
            + ["–" if r.get("speedup") is None else f"{r['speedup']:.2f}×",
               mib(ob), mib(bb), f"{ob / bb:.3f}" if ob and bb else "–"]
            + [torch_cell(r, k) for k in tk]
        ))
    if data.get("baseline"):
        out += ["", f"Baseline: {data['baseline']}."]
    if data.get("ours"):
        out += [f"Ours: {data['ours']}."]
    if data.get("fused_dense"):
        out += [f"Fused dense: {data['fused_dense']}."]
    return "\n".join(out + footer(data, recs))


def predict_table():
    """Inference records: ours and PyTorch on the same batches, their time ratio and peak RSS."""
    data = load("predict")
    recs = data.get("records") or []
    out = head(["mode", "precision", "batches", "batch size", "texts", "tokens (padded)", "ours (s)", "PyTorch (s)",
                "ours / PyTorch", "ours peak RSS", "PyTorch peak RSS"],
               ["---", "---", "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:"])
    for r in recs:
        c = r.get("case") or {}
        vs = r.get("vs_torch")
        out.append(row([c.get("mode"), c.get("matmul_precision", "f32"), c.get("batches"), c.get("batch_size"), c.get("texts"),
                        f"{r.get('tokens')} ({r.get('padded_tokens')})", num(r.get("ours_s"), "{:.3f}"),
                        num(r.get("torch_s"), "{:.3f}"), "–" if vs is None else f"{vs:.2f}×",
                        mib(r.get("ours_bytes")), mib(r.get("torch_bytes"))]))
    if data.get("ours"):
        out += ["", f"Ours: {data['ours']}."]
    return "\n".join(out + footer(data, recs))


def attention_fidelity():
    f = load("attention-fidelity")
    summary = f.get("summary") or []
    recs = f.get("records") or []
    tiles = sorted({int(k.split("_")[1]) for s in summary for k in s if re.fullmatch(r"blocks_\d+", k)})
    # Summaries before the GPT-2 part have no model: they are the first record's.
    model_of = lambda s: s.get("model") or (recs[0].get("model") if recs else "?")
    models = list(dict.fromkeys(model_of(s) for s in summary))
    short = {m: m.split(" (")[0] for m in models}
    out = head(["model", "L", "keys per query k", "exact top-k", "per-query (PQ)"]
               + [f"blocks, tile {t}" for t in tiles] + [f"blocks, tile {t}, upper-bound score" for t in tiles],
               ["---", "--:"] + ["--:"] * (3 + 2 * len(tiles)))
    for s in summary:
        m = model_of(s)
        L = s.get("L") or next((r.get("L") for r in recs if r.get("model") == m), "?")
        out.append(row([short[m], L, s["k"], f"{s['exact_topk']:.3f}", f"{s['per_query']:.3f}"]
                       + [f"{s.get(f'blocks_{t}', float('nan')):.3f}" for t in tiles]
                       + [f"{s.get(f'blocks_{t}_upper_bound_score', float('nan')):.3f}" for t in tiles]))
    out.append("")
    for m in models:
        mr = [r for r in recs if r.get("model") == m]
        r0 = mr[0] if mr else {}
        out.append(f"- {short[m]}: mean over its {len({r['layer'] for r in mr})} layers; {m} on "
                   f"{r0.get('data')}, B = {r0.get('B')}, L = {r0.get('L')}, mask {r0.get('mask', 'none')}.")
    out += ["", f"Mass: {f.get('what')}. Per-layer figures are in the JSON. Re-run: `{f.get('command')}`."]
    return "\n".join(out)


def gpu_attention():
    g = load("gpu-h200")
    out = [f"{g.get('device', '?')}, {g.get('date', '?')}: `{g.get('bench', '?')}`. Code: {g.get('code', '?')}.", ""]
    out += head(["dtype", "L", "k", "select", "sparse fwd", "sparse fwd+bwd", "fwd+bwd+select", "ours dense fwd+bwd", "SDPA fwd+bwd"],
                ["---", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:"])
    ms = lambda v: "–" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")
    for a in g.get("attention", []):
        sp, de, sd = a.get("sparse") or {}, a.get("dense") or {}, a.get("sdpa") or {}
        out.append(row([a["dtype"], a["L"], a["k"], ms(sp.get("select_ms")), ms(sp.get("fwd_ms")), ms(sp.get("fwd_bwd_ms")),
                        ms(sp.get("fwd_bwd_plus_select_ms")), ms(de.get("fwd_bwd_ms")), ms(sd.get("fwd_bwd_ms"))]))
    a0 = (g.get("attention") or [{}])[0]
    out += ["", f"ms; B = {a0.get('B')}, H = {a0.get('H')}, d = {a0.get('d')}, causal, k = L/8, PQ "
            f"{(a0.get('pq') or {}).get('n_subspaces')} subspaces × {(a0.get('pq') or {}).get('n_codewords')} codewords. "
            f"Timing: {g.get('timing', '?')}."]
    return "\n".join(out)


def gpu_ffn():
    g = load("gpu-h200")
    out = head(["dtype", "kept", "dense", "routed", "ratio", "routing alone", "routed forward"],
               ["---", "--:", "--:", "--:", "--:", "--:", "--:"])
    for f in g.get("routed_ffn", []):
        out.append(row([f["dtype"], f"{f['top_k']}/{f['n_blocks']}", f"{f['dense_fwd_bwd_ms']:.2f}", f"{f['routed_fwd_bwd_ms']:.2f}",
                        f"{f['ratio']:.2f}×", f"{f['routed_routing_only_ms']:.2f}", f"{f['routed_fwd_ms']:.2f}"]))
    f0 = (g.get("routed_ffn") or [{}])[0]
    out += ["", f"ms, forward + backward to x; {f0.get('tokens')} tokens, d = {f0.get('d')}, d_ff = {f0.get('d_ff')}, "
            f"{f0.get('n_blocks')} blocks. {g.get('routed_ffn_note', '')}"]
    return "\n".join(out)


def other_results():
    names = [n for n in result_names() if n not in KNOWN_FILES]
    if not names:
        return "No other result files."
    out = []
    for n in names:
        out.append(f"#### `bench/results/{n}.json`")
        out.append("")
        try:
            recs = load(n).get("records") or []
            if recs and all("ours_s" in r and "case" in r for r in recs):
                out.append(speed_table(n))
            else:
                out.append(f"{len(recs)} records; not in a table format this script knows: read the JSON.")
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            out.append(f"Not rendered ({type(e).__name__}: {e}): read the JSON.")
        out.append("")
    return "\n".join(out).rstrip()


# ---------------------------------------------------------------- accuracy tables

def seed_label(r):
    return r.get("seed")


def length(r):
    if r.get("epochs"):
        return f"{r['epochs']} epoch" + ("s" if r["epochs"] != 1 else "")
    if r.get("steps"):
        return f"{r['steps']} steps"
    return "eval only"


def variant_text(v, notes):
    for sub, note in ERRATA:
        if sub in v:
            if note not in notes:
                notes.append(note)
            v += f" [{notes.index(note) + 1}]"
    return v


def groups(recs):
    """Records that differ only in seed, in order of first appearance."""
    out, index = [], {}
    for i, r in recs:
        key = (r["case"].get("model"), r["case"].get("mode"), r.get("variant"), r.get("lr"), length(r))
        if key not in index:
            index[key] = len(out)
            out.append((key, []))
        out[index[key]][1].append((i, r))
    return out


def quality_table(model_pred, metric, fmt):
    data = load("accuracy")
    recs = [(i, r) for i, r in enumerate(data["records"]) if not r.get("superseded") and model_pred(r["case"].get("model", ""))]
    seeds = sorted({seed_label(r) for _, r in recs if seed_label(r) is not None})
    notes = []
    cols = ["records", "mode", "variant", "lr", "length"] + [f"seed {s}" for s in seeds] + ["mean", "eval loss (mean)"]
    out = head(cols, ["---"] * 5 + ["--:"] * (len(seeds) + 2))
    for (model, mode, variant, lr, ln), members in groups(recs):
        cells = {s: [] for s in seeds}
        for _, r in members:
            if r.get(metric) is not None:
                cells.setdefault(seed_label(r), []).append(r[metric])
        # Mean over seeds of each seed's mean (a seed run twice counts once).
        per_seed = [sum(cells[s]) / len(cells[s]) for s in seeds if cells[s]]
        losses = [r["eval_loss"] for _, r in members if r.get("eval_loss") is not None]
        mean = "–" if len(per_seed) < 2 else fmt.format(sum(per_seed) / len(per_seed)) + (
            "" if len(per_seed) == len(seeds) else f" ({len(per_seed)} seeds)")
        out.append(row(
            [", ".join(str(i) for i, _ in members), mode, variant_text(variant or "", notes), sci(lr), ln]
            + [" / ".join(fmt.format(v) for v in cells[s]) or "–" for s in seeds]
            + [mean, "–" if not losses else f"{sum(losses) / len(losses):.3f}"]
        ))
    models = []
    for _, r in recs:
        dataset = re.sub(r", seed [0-9]+\)$", ")", r["case"].get("dataset", ""))
        m = f"{r['case'].get('model')} on {dataset}"
        if m not in models:
            models.append(m)
    out += ["", "Model and data: " + "; ".join(models) + "."]
    out += [f"[{n + 1}] {note}" for n, note in enumerate(notes)]
    return "\n".join(out)


def accuracy_superseded():
    data = load("accuracy")
    recs = [(i, r) for i, r in enumerate(data["records"]) if r.get("superseded")]
    out = head(["record", "model", "mode", "variant", "seed", "accuracy / perplexity", "why superseded"])
    for i, r in recs:
        m = r.get("accuracy") if r.get("accuracy") is not None else r.get("perplexity")
        out.append(row([i, r["case"].get("model", "").split(" (")[0], r["case"].get("mode"), r.get("variant"), r.get("seed"),
                        num(m, "{:.4g}"), r["superseded"]]))
    return "\n".join(out)


# Records from this index on must store `settings` (the run's finetune.toml): the convention
# since the runs that introduced it; older records keep the fields they stored.
SETTINGS_FROM = 125


def accuracy_settings():
    data = load("accuracy")
    recs = data["records"]
    bare = [i for i, r in enumerate(recs) if i >= SETTINGS_FROM and not r.get("settings")]
    if bare:
        raise SystemExit(f"results-md: accuracy.json records #{', #'.join(map(str, bare))} store no `settings` "
                         "(the run's finetune.toml): every record from #125 on must")
    n = len(recs)
    with_settings = sum(1 for r in recs if r.get("settings"))
    stored = ["case", "variant", "seed", "lr", "steps", "epochs", "batch_size", "max_length", "block_size", "lora_rank",
              "sparsity", "router_lr_scale", "build"]
    counts = [(k, sum(1 for r in recs if not r.get("settings") and r.get(k) is not None)) for k in stored]
    lines = [f"{with_settings} of {n} records store `settings` (the run's resolved `finetune.toml`)."]
    if with_settings < n:
        lines.append(
            f"The other {n - with_settings} (older records) store only: "
            + ", ".join(f"`{k}` ({c})" for k, c in counts if c)
            + ". `case` holds the model, the dataset with its split seed, and the mode; `variant` is prose."
            " To re-run one, start from its command below and add the flags its variant names; every"
            " setting not named was the default of the commit that ran it (`added_by` tags the batch of runs)."
        )
    lines += ["", f"Machine: {machine_str(data.get('machine', '?'))}", ""] + command_lines(data.get("command", "?"))
    return "\n".join(lines)


def demo():
    if "demo" in result_names():
        return demo_run()
    [(i, spt)] = select("accuracy", DEMO, "DEMO")[-1:]
    dense = load("demo-dense")
    out = head(["mode", "accuracy", "macro-F1", "s/step", "record"], ["---", "--:", "--:", "--:", "---"])
    out.append(row(["spt", num(spt.get("accuracy"), "{:.4f}"), num(spt.get("macro_f1"), "{:.4f}"), num(spt.get("median_step_s"), "{:.3f}"),
                    f"accuracy.json #{i}: {spt.get('variant')}, lr {sci(spt.get('lr'))}"]))
    out.append(row(["dense", num(dense.get("accuracy"), "{:.4f}"), num(dense.get("macro_f1"), "{:.4f}"), num(dense.get("median_step_s"), "{:.3f}"),
                    "demo-dense.json"]))
    if spt.get("median_step_s") and dense.get("median_step_s"):
        out += ["", f"SPT's step: {dense['median_step_s'] / spt['median_step_s']:.2f}× faster than dense. "
                f"SPT: {spt.get('note', '')}. Dense: {dense.get('note', '')}."]
    return "\n".join(out)


def demo_run():
    """The demo's last recorded run (DEMO_RECORD=bench/results/demo.json scripts/demo.sh): every
    s/step of one run on one machine."""
    d = load("demo")
    out = head(["mode", "accuracy", "macro-F1", "s/step", "where from"], ["---", "--:", "--:", "--:", "---"])
    spt, dense, torch = d["spt"], d["dense"], d.get("torch")
    out.append(row(["spt", num(spt.get("accuracy"), "{:.4f}"), num(spt.get("macro_f1"), "{:.4f}"),
                    num(spt.get("median_step_s"), "{:.3f}"), f"measured in the run ({d.get('what')})"]))
    acc_from = "measured in the run" if d.get("dense_mode") == "run" else "accuracy saved from a full run (demo-dense.json)"
    out.append(row(["dense (spt-train)", num(dense.get("accuracy"), "{:.4f}"), num(dense.get("macro_f1"), "{:.4f}"),
                    num(dense.get("median_step_s"), "{:.3f}"), f"{acc_from}; s/step measured in the run"]))
    if torch:
        out.append(row(["PyTorch full", "-", "-", num(torch.get("median_step_s"), "{:.3f}"),
                        f"s/step measured in the run (torch {torch.get('torch')}, transformers {torch.get('transformers')})"]))
    s_ = spt.get("median_step_s")
    ratios = []
    for name, r in [("dense (spt-train)", dense), ("PyTorch full fine-tuning", torch)]:
        if s_ and r and r.get("median_step_s"):
            x = r["median_step_s"] / s_
            ratios.append(f"{x:.2f}× faster than {name}" if x >= 1 else f"{1 / x:.2f}× slower than {name}")
    out += ["", f"SPT's step: {'; '.join(ratios)}. Measured {d.get('measured')} on the 2-core machine "
            f"(load average {d.get('loadavg')}); s/step is the median after the warm-up steps."]
    return "\n".join(out)


# ---------------------------------------------------------------- README

def torch_figures(name, rec, keys):
    """(seconds, bytes, where) of the PyTorch peer for rec: the record, the file, then any file."""
    ks, kb, _ = keys
    same_shape = {k: rec["case"].get(k) for k in ("model", "B", "L")}
    order = [(name, [rec])]
    order.append((name, [r for r in load(name).get("records") or [] if matches(r, same_shape)]))
    for n in result_names():
        if n != name and n not in ("accuracy", "demo-dense", "gpu-h200"):
            recs = load(n).get("records") or []
            order.append((n, [r for r in recs if isinstance(r, dict) and "case" in r and matches(r, same_shape)]))
    for n, recs in order:
        for r in recs:
            if r.get(ks) is not None:
                return r[ks], r.get(kb), n
    return None, None, None


def seed_mean(sel, what, need_settings):
    """Mean accuracy over SEEDS of the accuracy records matching `sel` (exactly one per seed), and
    their indices. `need_settings`: each must store its run's settings (our runs do; PyTorch's
    runs are re-run by bench/peer/accuracy.py instead)."""
    recs = select("accuracy", sel, what)
    by_seed = {}
    for i, r in recs:
        by_seed.setdefault(r.get("seed"), []).append(i)
    bad = {s: ix for s, ix in by_seed.items() if len(ix) != 1}
    missing = [s for s in SEEDS if s not in by_seed]
    if bad or missing:
        raise SystemExit(f"results-md: {what}: want one accuracy record per seed {SEEDS}; "
                         f"duplicates {bad}, missing {missing}: make the selector exact")
    bare = [i for i, r in recs if r.get("seed") in SEEDS and not r.get("settings")]
    if need_settings and bare:
        raise SystemExit(f"results-md: {what}: records #{', #'.join(map(str, bare))} store no "
                         "`settings` (the run's finetune.toml): a headline figure must be re-runnable from its record")
    vals = [r["accuracy"] for _, r in recs if r.get("seed") in SEEDS]
    return sum(vals) / len(vals), [i for i, r in recs if r.get("seed") in SEEDS]


def headline_figures(h):
    """The README row's figures for a HEADLINE entry: accuracy (mean over SEEDS, or None), its
    record indices, the step-time file, record index and record, and the PyTorch peer's figures
    for the kind of training in h["torch"] (seconds, bytes, the file they came from)."""
    acc, acc_idx = None, []
    if h["accuracy"] is not None:
        acc, acc_idx = seed_mean(h["accuracy"], f"HEADLINE {h['recipe']!r}", need_settings=True)
    name, sel = h["speed"]
    found = select(name, sel, f"HEADLINE {h['recipe']!r} speed")
    if len(found) != 1:
        raise SystemExit(f"results-md: HEADLINE {h['recipe']!r}: {len(found)} records in bench/results/{name}.json "
                         f"match {sel} (#{', #'.join(str(i) for i, _ in found)}): make the selector exact")
    [(si, sr)] = found
    return acc, acc_idx, name, si, sr, torch_figures(name, sr, h["torch"])


def indices(ix):
    """Record indices as `#a–#b` where consecutive, else `#a, #b`."""
    if len(ix) > 2 and list(ix) == list(range(ix[0], ix[0] + len(ix))):
        return f"#{ix[0]}–#{ix[-1]}"
    return "#" + ", #".join(str(i) for i in ix)


def headline():
    out = head(["recipe", "setting", "vs PyTorch (same run)", "accuracy", "s/step", "vs dense", "peak RSS"],
               ["---", "---", "---", "--:", "--:", "--:", "--:"])
    notes, sources = [], []
    for h in HEADLINE:
        accv, acc_idx, name, si, sr, (ts, tb, where) = headline_figures(h)
        if accv is None:
            acc, src = "not measured yet", ""
        else:
            acc = f"{accv:.3f}"
            src = f"accuracy.json {indices(acc_idx)} and "
        if h.get("torch_accuracy"):
            sel, peer = h["torch_accuracy"]
            tv, t_idx = seed_mean(sel, f"HEADLINE {h['recipe']!r} torch_accuracy", need_settings=False)
            acc += f" ({peer} {tv:.3f})"
            src = f"{peer}: accuracy.json {indices(t_idx)}; " + src
        ob, bb = sr.get("ours_bytes"), sr.get("baseline_bytes")
        rss = gib(ob) + (f" ({100 * ob / bb:.0f} %)" if ob and bb else "")
        if ts is None:
            vs = "not measured yet"
        else:
            vs = f"{ts / sr['ours_s']:.2f}× ({h['torch'][2]}: {ts:.2f} s" + (f", {gib(tb)}" if tb else "") + ")"
            if where != name:
                vs += " †"
                note = f"† PyTorch measured in another run (bench/results/{where}.json)."
                if note not in notes:
                    notes.append(note)
        out.append(row([f"**{h['recipe']}**", h["what"], vs, acc, f"{sr['ours_s']:.2f}", f"{sr['speedup']:.2f}×", rss]))
        sources.append(f"{h['recipe']}: {src}{name}.json #{si}")
    seeds = "–".join(str(s) for s in (SEEDS[0], SEEDS[-1]))
    out += [
        "",
        f"Accuracy: MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes, one epoch, batch 16, ≤ 64 tokens, mean of seeds {seeds}; "
        "in brackets, transformers (+ PEFT) on the same rows, batches and schedule (bench/peer/accuracy.py). "
        f"Step time and peak RSS: MiniLM, B 8 × L 512, one synthetic batch, 2-core {cpu_name(load('finetune-speed'))}, median of 5 steps; "
        "\"vs dense\": against our dense full fine-tuning in the same run (bf16 rows: bf16 too); "
        "\"vs PyTorch\": PyTorch's step time over ours for the same kind of training. "
        "SPT, LoRA and PEFT steps without the pooler trained (one 384 × 384 layer).",
    ]
    out += notes
    out += ["", "Records: " + "; ".join(sources) + "."]
    return "\n".join(out)


def cuda_status():
    g = load("gpu-h200")
    p = g.get("parity", {})
    t = [x for x in g.get("target_L4096", []) if x.get("dtype") in ("bfloat16", "bf16")]
    f = [x for x in g.get("routed_ffn", []) if x.get("dtype") == "bf16" and abs(x.get("kept", 0) - 0.5) < 1e-9]
    parts = [f"On an {g.get('device', 'GPU')} ({g.get('date', '?')}): {p.get('passed', '?')} of "
             f"{p.get('passed', 0) + p.get('failed', 0)} CUDA-vs-CPU parity tests pass (f32 and bf16)."]
    if t:
        x = t[0]
        parts.append(f"Targets missed: sparse attention fwd+bwd with selection at L = {x['L']}, bf16, takes "
                     f"{x['sparse_fwd_bwd_plus_select_ms']:.1f} ms against PyTorch SDPA's {x['sdpa_fwd_bwd_ms']:.2f} ms "
                     f"({1 / x['speedup_vs_sdpa']:.0f}× slower)")
    if f:
        parts[-1] += f"; the routed FFN at 50 % kept takes {f[0]['ratio']:.1f}× the dense FFN."
    return "\n".join(parts)


# ---------------------------------------------------------------- figures quoted in prose and code

# The presets' figures are quoted by hand-written text as well as by the README's table: the
# CLI's help, presets.rs, docs/cli.md and the README's summary. Each quote is a template in which
# `{}` stands for a number, with what each number is: (HEADLINE recipe, quantity, format).
# Quantities: "accuracy" (mean over SEEDS), "torch_accuracy" (PyTorch's mean over SEEDS for the
# recipe, HEADLINE's `torch_accuracy`), "dense_gap" / "torch_gap" (points below our dense's /
# transformers' full fine-tuning's accuracy), "full_speed" / "lora_speed" (PyTorch full / PEFT
# LoRA step time over ours; "fullbf16_speed" / "lorabf16_speed" the same under bf16 autocast), "full_rss" (our peak RSS over PyTorch full's, in %). The script
# rewrites the numbers in place; --check names any that differ, and any template that no longer
# matches exactly once (so an edit of the prose cannot silently drop a quote from the check).
QUOTES = [
    ("crates/spt-train/src/bin/spt-train/main.rs",
     "accuracy {} (dense {}); step {}x PyTorch full fine-tuning's speed",
     [("SPT fast", "accuracy", "{:.3f}"), ("dense", "accuracy", "{:.3f}"), ("SPT fast", "full_speed", "{:.1f}")]),
    ("crates/spt-train/src/bin/spt-train/main.rs",
     "accuracy {}, {} points below dense; {}x",
     [("SPT accurate", "accuracy", "{:.3f}"), ("SPT accurate", "dense_gap", "{:.1f}"),
      ("SPT accurate", "full_speed", "{:.1f}")]),
    ("crates/spt-train/src/presets.rs", "| dense, lr 1e-4 | {} | {}× |",
     [("dense", "accuracy", "{:.3f}"), ("dense", "full_speed", "{:.2f}")]),
    ("crates/spt-train/src/presets.rs", "| lora r 8 + pooler, lr 1e-3 | {} | {}× ({}× PEFT) |",
     [("PEFT-style LoRA", "accuracy", "{:.3f}"), ("PEFT-style LoRA", "full_speed", "{:.2f}"),
      ("PEFT-style LoRA", "lora_speed", "{:.2f}")]),
    ("crates/spt-train/src/presets.rs", "| spt `accurate` | {} | {}× |",
     [("SPT accurate", "accuracy", "{:.3f}"), ("SPT accurate", "full_speed", "{:.2f}")]),
    ("crates/spt-train/src/presets.rs", "| spt `fast` | {} | {}× ({}× PEFT) |",
     [("SPT fast", "accuracy", "{:.3f}"), ("SPT fast", "full_speed", "{:.2f}"), ("SPT fast", "lora_speed", "{:.2f}")]),
    ("docs/cli.md", "| 1e-3 | {} (dense: {}) | {}× faster, {} % of its peak RSS |",
     [("SPT fast", "accuracy", "{:.3f}"), ("dense", "accuracy", "{:.3f}"), ("SPT fast", "full_speed", "{:.2f}"),
      ("SPT fast", "full_rss", "{:.0f}")]),
    ("docs/cli.md", "| 6 of 8 | on | pooler | 1e-3 | {} | {}× faster, {} % of its peak RSS |",
     [("SPT accurate", "accuracy", "{:.3f}"), ("SPT accurate", "full_speed", "{:.2f}"),
      ("SPT accurate", "full_rss", "{:.0f}")]),
    ("README.md",
     "**SPT fast** takes {}× less time per step than PyTorch full fine-tuning ({}× PEFT LoRA) at {} % of its peak RSS, "
     "{} points below dense accuracy",
     [("SPT fast", "full_speed", "{:.2f}"), ("SPT fast", "lora_speed", "{:.2f}"), ("SPT fast", "full_rss", "{:.0f}"),
      ("SPT fast", "dense_gap", "{:.1f}")]),
    ("README.md",
     "**SPT accurate** is {} points below dense at {}× PyTorch's speed ({} % of its RSS); our **dense** "
     "mode is {}× PyTorch's speed and LoRA {}× PEFT's",
     [("SPT accurate", "dense_gap", "{:.1f}"), ("SPT accurate", "full_speed", "{:.2f}"), ("SPT accurate", "full_rss", "{:.0f}"),
      ("dense", "full_speed", "{:.2f}"), ("PEFT-style LoRA", "lora_speed", "{:.2f}")]),
    ("README.md", "The paper's ≥ 2.2× within 1 point of dense holds against transformers' full fine-tuning on "
     "the same rows (SPT accurate: {} points below it), not against our own dense ({} below)",
     [("SPT accurate", "torch_gap", "{:.1f}"), ("SPT accurate", "dense_gap", "{:.1f}")]),
    ("README.md", "SPT fast takes {}× less time than PyTorch full fine-tuning under bf16 autocast, its fastest "
     "setting here, and GPT-2's SPT {}×",
     [("SPT fast, bf16", "fullbf16_speed", "{:.2f}"), ("GPT-2 SPT bf16", "fullbf16_speed", "{:.2f}")]),
    ("README.md", "GPT-2 small gains less (SPT {}× PyTorch at {} % of its RSS, 2.4–3.9× over 38 runs; our dense {}×)",
     [("GPT-2 SPT", "full_speed", "{:.2f}"), ("GPT-2 SPT", "full_rss", "{:.0f}"), ("GPT-2 dense", "full_speed", "{:.2f}")]),
    ("README.md", "with GPT-2 small (KV cache, batch 1) takes {}× PyTorch's time dense, {}× PEFT's with LoRA "
     "and {}× with SPT's routed FFN",
     [("generate dense", "gen_time", "{:.2f}"), ("generate LoRA", "gen_time", "{:.2f}"),
      ("generate SPT", "gen_time", "{:.2f}")]),
    ("README.md", "Classifying with MiniLM (batches of 32) takes {}× PyTorch's time dense, {}× with SPT",
     [("predict dense", "gen_time", "{:.2f}"), ("predict SPT", "gen_time", "{:.2f}")]),
    ("README.md", "With `--matmul-precision bf16`, against PyTorch's bf16 autocast: classifying {}× dense, "
     "{}× SPT ({}× one text at a time), generating {}× dense",
     [("predict dense bf16", "gen_time", "{:.2f}"), ("predict SPT bf16", "gen_time", "{:.2f}"),
      ("predict one dense bf16", "gen_time", "{:.2f}"), ("generate dense bf16", "gen_time", "{:.2f}")]),
    ("docs/results/speed.md", "(**{}×** its time for 128 tokens), LoRA against PEFT **{}×**, SPT against PEFT **{}×**",
     [("generate dense", "gen_time", "{:.2f}"), ("generate LoRA", "gen_time", "{:.2f}"),
      ("generate SPT", "gen_time", "{:.2f}")]),
]

PEER_KEYS = {
    "full": ("torch_full_s", "torch_full_bytes", ""),
    "lora": ("torch_lora_s", "torch_lora_bytes", ""),
    # The same under bf16 autocast (transformers' `bf16=True`; bench/peer/steps.py).
    "fullbf16": ("torch_full_bf16_s", "torch_full_bf16_bytes", ""),
    "lorabf16": ("torch_lora_bf16_s", "torch_lora_bf16_bytes", ""),
    # Generation and inference records hold one peer each: transformers (+ PEFT for generation's
    # LoRA / SPT records).
    "gen": ("torch_s", "torch_bytes", ""),
}

# What the quotes' sentences say in words about the records, checked on every run: (recipe,
# quantity, test, the claim). A record that breaks one is an error until the words change.
CLAIMS = [
    ("SPT accurate", "dense_gap", lambda v: v > 1.0,
     "the paper's >= 2.2x within 1 point of dense is not reached against our dense (README summary)"),
    ("SPT accurate", "torch_gap", lambda v: v <= 1.0,
     "SPT accurate is within 1 point of transformers' full fine-tuning (README summary)"),
    ("SPT accurate", "full_speed", lambda v: v >= 2.2,
     "SPT accurate is at least 2.2x PyTorch full fine-tuning's speed (README summary)"),
    # Issue #17's target was 4x: met in most runs (4.99x in the records), missed (3.45x) in the
    # twenty-fourth session's second (docs/results/speed.md says so). The README states no 4x.
    ("SPT fast", "full_speed", lambda v: v >= 3.0,
     "SPT fast takes at least 3x less time per step than PyTorch full fine-tuning (README summary)"),
    # The README's bf16 bullet: "accuracy as in f32", and bf16 autocast is PyTorch's "fastest
    # setting here" (its step faster than in f32: our speed-up against it is the smaller).
    ("SPT fast, bf16", "accuracy", lambda v: abs(v - quoted_value("SPT fast", "accuracy")) <= 0.005,
     "SPT fast's bf16 accuracy is within half a point of its f32 accuracy (README summary)"),
    ("PEFT-style LoRA, bf16", "accuracy",
     lambda v: abs(v - quoted_value("PEFT-style LoRA", "accuracy")) <= 0.005,
     "LoRA's bf16 accuracy is within half a point of its f32 accuracy (README summary)"),
    ("SPT fast", "fullbf16_speed", lambda v: v < quoted_value("SPT fast", "full_speed"),
     "PyTorch's full fine-tuning step is faster under bf16 autocast than in f32 (README summary)"),
]

# The README's size limit, in bytes.
README_BYTES = 10_000

# Step records that QUOTES names beside HEADLINE's recipes: name -> (file, case fields).
QUOTED_RECORDS = {
    "GPT-2 SPT": ("finetune-speed", {"model": "gpt2-small", "B": 4, "L": 512, "mode": "spt"}),
    "GPT-2 dense": ("finetune-speed", {"model": "gpt2-small", "B": 4, "L": 512, "mode": "dense"}),
    "GPT-2 SPT bf16": ("finetune-speed-bf16", {"model": "gpt2-small", "B": 4, "L": 512, "mode": "spt",
                                               "matmul_precision": "bf16"}),
    "generate dense": ("generate", {"model": "gpt2-small", "mode": "dense", "new_tokens": 128,
                                    "matmul_precision": None}),
    "generate LoRA": ("generate", {"model": "gpt2-small", "mode": "lora", "new_tokens": 128}),
    "generate SPT": ("generate", {"model": "gpt2-small", "mode": "spt", "new_tokens": 128,
                                  "matmul_precision": None}),
    "generate dense bf16": ("generate", {"model": "gpt2-small", "mode": "dense", "new_tokens": 128,
                                         "matmul_precision": "bf16"}),
    "generate SPT bf16": ("generate", {"model": "gpt2-small", "mode": "spt", "new_tokens": 128,
                                       "matmul_precision": "bf16"}),
    "predict dense": ("predict", {"model": "all-MiniLM-L6-v2", "mode": "dense", "batches": "sorted",
                                  "matmul_precision": None}),
    "predict SPT": ("predict", {"model": "all-MiniLM-L6-v2", "mode": "spt", "batches": "sorted",
                                "matmul_precision": None}),
    "predict dense bf16": ("predict", {"model": "all-MiniLM-L6-v2", "mode": "dense", "batches": "sorted",
                                       "matmul_precision": "bf16"}),
    "predict SPT bf16": ("predict", {"model": "all-MiniLM-L6-v2", "mode": "spt", "batches": "sorted",
                                     "matmul_precision": "bf16"}),
    "predict one dense bf16": ("predict", {"model": "all-MiniLM-L6-v2", "mode": "dense", "batches": "single",
                                           "matmul_precision": "bf16"}),
}


def quoted_value(recipe, quantity):
    if recipe in QUOTED_RECORDS:
        name, sel = QUOTED_RECORDS[recipe]
        found = select(name, sel, f"QUOTED_RECORDS {recipe!r}")
        if len(found) != 1:
            raise SystemExit(f"results-md: QUOTED_RECORDS {recipe!r}: {len(found)} records in bench/results/{name}.json "
                             f"match {sel}: make the selector exact")
        [(si, sr)] = found
        acc, h = None, None
    else:
        h = next((h for h in HEADLINE if h["recipe"] == recipe), None)
        if h is None:
            raise SystemExit(f"results-md: QUOTES names recipe {recipe!r}, which HEADLINE lacks")
        acc, _, name, si, sr, _ = headline_figures(h)
    if quantity == "torch_accuracy":
        # PyTorch's mean accuracy for the recipe (HEADLINE's `torch_accuracy` records).
        if not (h and h.get("torch_accuracy")):
            raise SystemExit(f"results-md: QUOTES quotes PyTorch's accuracy for {recipe!r}, which HEADLINE lacks")
        return seed_mean(h["torch_accuracy"][0], f"QUOTES {recipe!r} torch_accuracy", need_settings=False)[0]
    if quantity in ("accuracy", "dense_gap", "torch_gap"):
        if acc is None:
            raise SystemExit(f"results-md: QUOTES quotes the accuracy of {recipe!r}, which has no records")
        # dense_gap / torch_gap: how far below our dense's / transformers' full fine-tuning's
        # accuracy on the same rows, in points.
        if quantity == "accuracy":
            return acc
        ref = quoted_value("dense", "accuracy" if quantity == "dense_gap" else "torch_accuracy")
        return 100 * (ref - acc)
    kind, what = quantity.split("_")
    ts, tb, _ = torch_figures(name, sr, PEER_KEYS[kind])
    if ts is None or (what == "rss" and not tb):
        raise SystemExit(f"results-md: QUOTES: no PyTorch {kind} figure for {recipe!r} ({name}.json #{si})")
    if what == "time":  # ours over PyTorch's: below 1, ours is faster
        return sr["ours_s"] / ts
    return ts / sr["ours_s"] if what == "speed" else 100 * sr["ours_bytes"] / tb


def quote_pattern(template):
    """The template as a regex: a number group per `{}`, any whitespace where it has a space."""
    parts = [re.sub(r"\\ ", r"\\s+", re.escape(p)) for p in template.split("{}")]
    return re.compile(r"(\d+(?:\.\d+)?)".join(parts))


def rewrite_quotes(path, text):
    """Returns text with every quoted figure of `path` set from the records, the quotes whose
    figures changed, and the templates that do not match exactly once."""
    changed, problems = [], []
    for qpath, template, values in QUOTES:
        if qpath != path:
            continue
        found = list(quote_pattern(template).finditer(text))
        if len(found) != 1:
            problems.append(f"{path}: the quote {template!r} matches {len(found)} times, not once (QUOTES)")
            continue
        m = found[0]
        new = [fmt.format(quoted_value(recipe, q)) for recipe, q, fmt in values]
        if [m.group(i + 1) for i in range(len(new))] != new:
            changed.append(template)
            for i in reversed(range(len(new))):
                text = text[: m.start(i + 1)] + new[i] + text[m.end(i + 1):]
    return text, changed, problems


# ---------------------------------------------------------------- the chart

def speed_chart(name="finetune-speed"):
    """A small SVG bar chart of step time per mode (docs/results/speed.md shows it)."""
    recs = load(name).get("records") or []
    rows = [(f"{r['case'].get('model')} {r['case'].get('B')}x{r['case'].get('L')} {r['case'].get('mode')}", r["ours_s"], r.get("ours_bytes")) for r in recs if "ours_s" in r]
    if not rows:
        return None
    width, bar_h, left = 760, 22, 330
    top = max(v for _, v, _ in rows)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{40 + bar_h * len(rows)}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="18" font-weight="bold">{name}: seconds per fine-tuning step (median; shorter is better)</text>']
    for i, (label, v, b) in enumerate(rows):
        y = 30 + i * bar_h
        w = (width - left - 120) * v / top
        colour = "#d95f02" if label.endswith("dense") else ("#7570b3" if label.endswith("lora") else "#1b9e77")
        mem = f", {b / 2**30:.1f} GiB" if b else ""
        out.append(f'<text x="10" y="{y + 15}">{label}</text>')
        out.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{bar_h - 6}" fill="{colour}"/>')
        out.append(f'<text x="{left + w + 5:.1f}" y="{y + 15}">{v:.2f} s{mem}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- regions

RENDER = {
    "headline": headline,
    "cuda-status": cuda_status,
    "attention": lambda: speed_table("attention"),
    "attention-fidelity": attention_fidelity,
    "ffn": lambda: speed_table("ffn"),
    "finetune-speed": lambda: speed_table("finetune-speed"),
    "finetune-speed-accuracy-setting": lambda: speed_table("finetune-speed-accuracy-setting"),
    "finetune-speed-bf16": lambda: speed_table("finetune-speed-bf16"),
    "lora-linear": lambda: speed_table("lora-linear"),
    "linear-cross-entropy": lambda: speed_table("linear-cross-entropy"),
    "norm-activation": lambda: speed_table("norm-activation"),
    "generate": lambda: speed_table("generate"),
    "predict": predict_table,
    "gpu-attention": gpu_attention,
    "gpu-ffn": gpu_ffn,
    "other": other_results,
    "demo": demo,
    "accuracy-minilm": lambda: quality_table(lambda m: m == MINILM, "accuracy", "{:.3f}"),
    "accuracy-gpt2": lambda: quality_table(lambda m: m.startswith("gpt2"), "perplexity", "{:.0f}"),
    "accuracy-superseded": accuracy_superseded,
    "accuracy-settings": accuracy_settings,
}

MARKER = re.compile(r"<!-- results:([A-Za-z0-9_.-]+) (begin|end) -->")


def rewrite(path, text, names):
    """Returns text with every region replaced, and the regions whose content changed."""
    found = [m.group(1) for m in MARKER.finditer(text) if m.group(2) == "begin"]
    problems = []
    for n in found:
        if n not in names:
            problems.append(f"{path}: region '{n}' is not one this script writes there (REGIONS)")
    for n in names:
        if n not in found:
            problems.append(f"{path}: region '{n}' is missing (add <!-- results:{n} begin --> … <!-- results:{n} end -->)")
    changed = []
    for n in names:
        pat = re.compile(rf"(<!-- results:{re.escape(n)} begin -->\n)(.*?)(<!-- results:{re.escape(n)} end -->)", re.S)
        m = pat.search(text)
        if not m:
            continue
        body = RENDER[n]() + "\n"
        if m.group(2) != body:
            changed.append(n)
            text = text[: m.start(2)] + body + text[m.end(2):]
    return text, changed, problems


def main():
    args = set(sys.argv[1:])
    unknown = args - {"--check", "--print"}
    if unknown:
        raise SystemExit(f"results-md: unknown option {' '.join(sorted(unknown))} (expected --check or --print)")
    if "--print" in args:
        for path, names in REGIONS.items():
            for n in names:
                print(f"## {path}: {n}\n\n{RENDER[n]()}\n")
        return 0
    check = "--check" in args
    stale, problems = [], []
    paths = list(REGIONS) + [q[0] for q in QUOTES if q[0] not in REGIONS]
    for path in dict.fromkeys(paths):
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            problems.append(f"{path} is missing")
            continue
        with open(full) as f:
            text = f.read()
        new, changed, probs = rewrite(path, text, REGIONS.get(path, []))
        problems += probs
        stale += [f"{path}: region '{n}'" for n in changed]
        new, changed, probs = rewrite_quotes(path, new)
        problems += probs
        stale += [f"{path}: the figures of {t!r}" for t in changed]
        if not check and new != text:
            tmp = full + ".tmp"
            with open(tmp, "w") as f:
                f.write(new)
            os.replace(tmp, full)
    svg = speed_chart()
    svg_path = os.path.join(RESULTS, "finetune-speed.svg")
    if svg is not None:
        old = open(svg_path).read() if os.path.exists(svg_path) else None
        if old != svg:
            stale.append("bench/results/finetune-speed.svg")
            if not check:
                with open(svg_path + ".tmp", "w") as f:
                    f.write(svg)
                os.replace(svg_path + ".tmp", svg_path)
    for recipe, quantity, holds, claim in CLAIMS:
        v = quoted_value(recipe, quantity)
        if not holds(v):
            problems.append(f"the records no longer support the claim '{claim}': {recipe} {quantity} = {v:.2f}")
    # The README is a front door: what a newcomer needs and the headline results, within 10 KB.
    readme = os.path.getsize(os.path.join(ROOT, "README.md"))
    if readme > README_BYTES:
        problems.append(f"README.md is {readme} bytes, over {README_BYTES}: move detail into docs/")
    for p in problems:
        print(f"results-md: {p}", file=sys.stderr)
    if check:
        for s in stale:
            print(f"results-md: {s} differs from bench/results/*.json", file=sys.stderr)
        if stale or problems:
            print("results-md: run `python3 scripts/results-md.py` and commit the result", file=sys.stderr)
            return 1
        print(f"results-md: every generated region matches bench/results ({sum(len(v) for v in REGIONS.values())} regions, "
              f"{len(QUOTES)} quotes, {len(CLAIMS)} claims)")
        return 0
    for s in stale:
        print(f"results-md: rewrote {s}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
