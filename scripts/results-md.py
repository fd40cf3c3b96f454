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
    recs = data["records"]
    if not recs:
        return None
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


def main():
    names = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "bench", "results")) if f.endswith(".json"))
    tables = {n: table(n) for n in names}
    if "--print" in sys.argv:
        for n, t in tables.items():
            print(f"## {n}\n\n{t}\n")
        return
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    for n, t in tables.items():
        if t is None:
            continue
        pat = re.compile(rf"(<!-- results:{n} -->\n).*?(\n<!-- /results:{n} -->)", re.S)
        text = pat.sub(lambda m: m.group(1) + t + m.group(2), text)
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, readme)


if __name__ == "__main__":
    main()
