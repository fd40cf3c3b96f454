#!/usr/bin/env python3
"""Renders bench/results/*.json into the README's result tables (between marker comments).

Usage: python3 scripts/results-md.py            # rewrite README.md in place
       python3 scripts/results-md.py --print    # print the tables only
Each table sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in README.md.
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mib(b):
    return f"{b / 2**20:.1f} MiB" if b is not None else "–"


def case_str(case, keys):
    return [str(case.get(k, "")) for k in keys]


def table(name):
    path = os.path.join(ROOT, "bench", "results", f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    recs = data.get("records") or []
    if not recs:
        return None
    if "ours_s" not in recs[0]:
        return quality_table(data)
    keys = list(recs[0]["case"].keys())
    head = keys + ["ours (s)", "baseline (s)", "speedup", "ours bytes", "baseline bytes", "bytes ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in recs:
        ob, bb = r.get("ours_bytes"), r.get("baseline_bytes")
        ratio = f"{ob / bb:.3f}" if ob and bb else "–"
        row = case_str(r["case"], keys) + [
            f"{r['ours_s']:.4f}",
            f"{r['baseline_s']:.4f}",
            f"{r['speedup']:.2f}×",
            mib(ob),
            mib(bb),
            ratio,
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"Machine: {data.get('machine', '?')}. Re-run: `{data.get('command', '?')}`.")
    if recs[0].get("bytes_kind"):
        lines.append(f"Bytes: {recs[0]['bytes_kind']}.")
    return "\n".join(lines)


def quality_table(data):
    """Accuracy / perplexity records: the case, the metric and how it was trained."""
    shown = [r for r in data["records"] if not r.get("superseded")]
    hidden = len(data["records"]) - len(shown)
    recs = shown
    keys = list(recs[0]["case"].keys())
    extra = [k for k in ("variant", "accuracy", "macro_f1", "perplexity", "lr", "steps", "epochs", "median_step_s") if any(k in r for r in recs)]
    lines = ["| " + " | ".join(keys + extra) + " |", "|" + "---|" * (len(keys) + len(extra))]
    for r in recs:
        vals = []
        for k in extra:
            v = r.get(k)
            vals.append("–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(case_str(r["case"], keys) + vals) + " |")
    lines.append("")
    if hidden:
        lines.append(f"{hidden} earlier records in the JSON are not shown (each says why under `superseded`).")
    lines.append(f"Machine: {data.get('machine', '?')}. Re-run: `{data.get('command', '?')}`.")
    return "\n".join(lines)


def speed_chart(name):
    """A small SVG bar chart of step time per mode, next to the JSON (linked from the README)."""
    path = os.path.join(ROOT, "bench", "results", f"{name}.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        recs = json.load(f).get("records") or []
    rows = [(f"{r['case'].get('model')} {r['case'].get('B')}x{r['case'].get('L')} {r['case'].get('mode')}", r["ours_s"], r.get("ours_bytes")) for r in recs if "ours_s" in r]
    if not rows:
        return
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
    tmp = os.path.join(ROOT, "bench", "results", f"{name}.svg.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(out) + "\n")
    os.replace(tmp, os.path.join(ROOT, "bench", "results", f"{name}.svg"))


def main():
    names = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "bench", "results")) if f.endswith(".json"))
    tables = {n: table(n) for n in names}
    if "--print" in sys.argv:
        for n, t in tables.items():
            print(f"## {n}\n\n{t}\n")
        return
    speed_chart("finetune-speed")
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    for n, t in tables.items():
        if t is None:
            continue
        pat = re.compile(rf"(<!-- results:{n} -->\n)(?:.*?\n)?(<!-- /results:{n} -->)", re.S)
        text = pat.sub(lambda m: m.group(1) + t + "\n" + m.group(2), text)
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, readme)


if __name__ == "__main__":
    main()
