#!/usr/bin/env python3
"""Re-runs the README's headline accuracy records from the settings they store.

    python3 scripts/accuracy-runs.py                      every headline row, seeds 42-45
    python3 scripts/accuracy-runs.py --rows dense,fast    some rows (dense, lora, fast, accurate,
                                                          lora-bf16, fast-bf16)
    python3 scripts/accuracy-runs.py --seeds 42 --dry-run print the configs and commands only
    python3 scripts/accuracy-runs.py --rows lora --set 'lora.modules_to_save=["pooler"]' \
        --variant "r = 8, pooler trained"                 a changed recipe, as new records

Each headline accuracy record (scripts/results-md.py's HEADLINE) keeps its run's resolved
`finetune.toml` as `settings`. This script writes that config back out (output_dir moved to a
temporary folder), runs `target/release/spt-train finetune --config` on it from the repository
root, and appends the new result to bench/results/accuracy.json as a record of the same case and
variant. The record it re-ran is marked `superseded` (pointing at the new one), so the README
takes the new figure; then run `python3 scripts/results-md.py`. accuracy.json is rewritten
through a temporary file after each run, so an interrupted session keeps the runs it finished.

With `--set SECTION.KEY=JSON` (repeatable) the runs change those settings, and `--variant` names
the changed recipe: the new records carry that variant and supersede nothing, so the README keeps
its row until results-md's HEADLINE selects the new variant.

The step times of these runs are kept only as each run's median (`median_step_s`) with the load
average around it: they are not the README's step times, which come from `spt-train bench`.
Builds the release binary first (the records name HEAD) and needs the assets
(`scripts/fetch-assets.sh`). A dirty work tree is refused: a record names the commit it ran.
Standard library only.
"""
import argparse
import copy
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCURACY = os.path.join(ROOT, "bench", "results", "accuracy.json")
BIN = os.path.join(ROOT, "target", "release", "spt-train")
ROWS = {"dense": "dense", "lora": "PEFT-style LoRA", "fast": "SPT fast", "accurate": "SPT accurate",
        "lora-bf16": "PEFT-style LoRA, bf16", "fast-bf16": "SPT fast, bf16"}


def results_md():
    spec = importlib.util.spec_from_file_location("results_md", os.path.join(ROOT, "scripts", "results-md.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def toml_value(v, where):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string takes JSON's escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x, where) for x in v) + "]"
    raise SystemExit(f"accuracy-runs: setting {where} is {v!r}, which this script cannot write as TOML")


def to_toml(settings):
    """The config in sections, as spt-train writes finetune.toml: scalars first, then tables."""
    lines = []

    def table(d, path):
        plain = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
        subs = [(k, v) for k, v in d.items() if isinstance(v, dict)]
        if path and (plain or not subs):
            lines.append(f"[{'.'.join(path)}]")
        for k, v in plain:
            lines.append(f"{k} = {toml_value(v, '.'.join(path + [k]))}")
        for k, v in subs:
            table(v, path + [k])

    table(settings, [])
    return "\n".join(lines) + "\n"


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def write_atomic(path, data):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".accuracy-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    ap.add_argument("--seeds", default=None, help="comma-separated (default: results-md's SEEDS)")
    ap.add_argument("--dry-run", action="store_true", help="print each config and command, run nothing")
    ap.add_argument("--added-by", default=None, help="the new records' added_by (default: the date)")
    ap.add_argument("--note", default="", help="appended to each new record's note")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                    help="change a stored setting, e.g. optim.lr=5e-4 (needs --variant)")
    ap.add_argument("--variant", default=None, help="the new records' variant, for --set")
    a = ap.parse_args()
    if bool(a.set) != bool(a.variant):
        raise SystemExit("accuracy-runs: --set and --variant go together (a changed recipe is a new variant)")
    changes = []
    for item in a.set:
        path, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"accuracy-runs: --set {item!r}: expected SECTION.KEY=JSON")
        try:
            changes.append((path.split("."), json.loads(value)))
        except json.JSONDecodeError as e:
            raise SystemExit(f"accuracy-runs: --set {item!r}: the value is not JSON ({e})")

    rm = results_md()
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(rm.SEEDS)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"accuracy-runs: unknown row {r!r} (expected one of {', '.join(ROWS)})")
    by_recipe = {h["recipe"]: h for h in rm.HEADLINE}
    if not a.dry_run:
        # accuracy.json itself may hold an earlier invocation's new records.
        if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results/accuracy.json"):
            raise SystemExit("accuracy-runs: the work tree has uncommitted changes; commit them first "
                             "(each record names the commit it ran)")
        # The records name HEAD: the binary must be built from it.
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "spt-train", "--bin", "spt-train"], cwd=ROOT,
                       check=True)
    build = git("rev-parse", "--short", "HEAD")
    added_by = a.added_by or f"scripts/accuracy-runs.py, {datetime.date.today().isoformat()}"

    # The records to re-run, chosen exactly as the README chooses them.
    todo = []
    for r in rows:
        h = by_recipe[ROWS[r]]
        for i, rec in rm.select("accuracy", h["accuracy"], f"HEADLINE {h['recipe']!r}"):
            if rec.get("seed") in seeds:
                if a.variant is not None and a.variant == rec.get("variant"):
                    raise SystemExit(f"accuracy-runs: --variant {a.variant!r} is record #{i}'s own: a changed "
                                     "recipe needs a name of its own")
                todo.append((r, i))
    if not todo:
        raise SystemExit("accuracy-runs: no headline record matches those rows and seeds")

    with tempfile.TemporaryDirectory(prefix="spt-accuracy-") as tmp:
        # A private copy of the binary: a cargo build during the runs must not change what runs.
        binary = os.path.join(tmp, "spt-train")
        if not a.dry_run:
            shutil.copy2(BIN, binary)
        for n, (row, i) in enumerate(todo, 1):
            with open(ACCURACY) as f:
                data = json.load(f)
            old = data["records"][i]
            stored = copy.deepcopy(old["settings"])  # what the new record keeps
            for keys, value in changes:
                d = stored
                for k in keys[:-1]:
                    d = d.get(k) if isinstance(d.get(k), dict) else None
                    if d is None:
                        raise SystemExit(f"accuracy-runs: --set {'.'.join(keys)}: record #{i} has no section {k!r}")
                if keys[-1] not in d:
                    # A setting newer than the record (its default then); a misspelt one is
                    # refused by spt-train, whose config takes no unknown keys.
                    print(f"accuracy-runs: --set {'.'.join(keys)}: record #{i} has no such setting; adding it",
                          flush=True)
                d[keys[-1]] = value
            settings = copy.deepcopy(stored)
            settings["output_dir"] = os.path.join(tmp, f"{row}-{old['seed']}")
            settings["overwrite"] = True
            cfg = os.path.join(tmp, f"{row}-{old['seed']}.toml")
            with open(cfg, "w") as f:
                f.write(to_toml(settings))
            cmd = [binary, "-q", "finetune", "--config", cfg, "--no-progress"]
            print(f"accuracy-runs: [{n}/{len(todo)}] {row}, seed {old['seed']} (re-runs record #{i})", file=sys.stderr)
            if a.dry_run:
                print(f"# {' '.join(cmd)}\n{to_toml(settings)}")
                continue
            load_before = load_average()
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"accuracy-runs: {row} seed {old['seed']} failed ({out.returncode}):\n{out.stderr[-4000:]}")
            summary = json.loads(out.stdout.strip().splitlines()[-1])
            e = summary.get("eval") or {}
            if e.get("accuracy") is None:
                raise SystemExit(f"accuracy-runs: {row} seed {old['seed']}: the run printed no accuracy: {summary}")
            times = summary.get("step_times_s") or []
            new = {k: v for k, v in old.items() if k not in ("superseded",)}
            # The record's own copies of settings follow the settings it ran with (--set may change them).
            for key, path in (("epochs", ("optim", "epochs")), ("batch_size", ("optim", "batch_size")),
                              ("max_length", ("data", "max_length")), ("lora_rank", ("lora", "rank")),
                              ("seed", ("seed",))):
                v = stored
                for k in path:
                    v = v.get(k) if isinstance(v, dict) else None
                if key in new and v is not None:
                    new[key] = v
            new["case"] = {**old["case"], "mode": stored.get("mode", old["case"].get("mode"))}
            new.update({
                "settings": stored,
                "lr": stored["optim"]["lr"],
                "variant": a.variant or old["variant"],
                "accuracy": e["accuracy"],
                "macro_f1": e.get("macro_f1"),
                "eval_loss": e.get("loss"),
                "validation_examples": e.get("examples"),
                "steps": summary.get("step"),
                "trainable_params": summary.get("trainable_params"),
                "median_step_s": statistics.median(times) if times else None,
                "eval_history": [[summary.get("eval_step"), round(e["accuracy"], 4)]],
                "build": build,
                "added_by": added_by,
                "load_average": {"before": load_before, "after": load_average()},
                "note": (f"record #{i}'s settings with {', '.join(a.set)}, by scripts/accuracy-runs.py" if a.set
                         else f"re-run of record #{i} from its stored settings by scripts/accuracy-runs.py")
                        + (f"; {a.note}" if a.note else ""),
            })
            with open(ACCURACY) as f:  # re-read: nothing else may have changed it meanwhile
                data = json.load(f)
            data["records"].append(new)
            j = len(data["records"]) - 1
            if not a.set:
                data["records"][i]["superseded"] = (f"re-run as #{j} at build {build} "
                                                    f"(accuracy {old['accuracy']:.4f} -> {e['accuracy']:.4f})")
            else:
                # An earlier run of the same changed recipe (an interrupted session's) gives way.
                for r in data["records"][:j]:
                    if (not r.get("superseded") and r.get("variant") == new["variant"] and r.get("seed") == new["seed"]
                            and r.get("lr") == new["lr"] and r["case"].get("mode") == new["case"]["mode"]):
                        r["superseded"] = f"re-run as #{j} at build {build} (accuracy {r['accuracy']:.4f} -> {e['accuracy']:.4f})"
            write_atomic(ACCURACY, data)
            print(f"accuracy-runs: {row} seed {old['seed']}: accuracy {old['accuracy']:.4f} -> {e['accuracy']:.4f} "
                  f"(record #{len(data['records']) - 1})", file=sys.stderr)
    if not a.dry_run:
        print("accuracy-runs: done; now run python3 scripts/results-md.py", file=sys.stderr)


if __name__ == "__main__":
    main()
