"""Shared pieces of the PyTorch peer benchmarks in bench/peer/: thread setup, timing helpers,
the machine's load average, and the in-place merge of PyTorch figures into our result files.

Our benchmarks (Rust) write bench/results/*.json. The peer scripts only add fields to those
records, matched by their `case`, keep every field already there, and write the file through a
temporary file and a rename, so a crash never leaves a half-written result file.
"""
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cores():
    """CPUs this process may run on (the thread count our benchmarks use too)."""
    return len(os.sched_getaffinity(0))


def setup_torch():
    """Imports torch with one intra-op thread per core and returns the module."""
    import torch

    torch.set_num_threads(cores())
    return torch


def peer_info(torch):
    """The `peer` object written at a result file's top level: versions, threads, date."""
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    for name in ("transformers", "peft", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def loadavg():
    """The 1, 5 and 15-minute load averages, as our benchmarks record them."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def timed(fn):
    """Seconds one call of `fn` takes (wall clock)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs):
    return statistics.median(xs) if xs else None


def summary(times):
    """Median, min, max and the raw times of a list of seconds."""
    return {"median_s": median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def read_results(path):
    with open(path) as f:
        return json.load(f)


def write_results(path, doc):
    """Writes `doc` as our Rust benches do (pretty JSON, sorted keys) via temp file + rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge(path, fields_by_case, peer):
    """Adds `fields_by_case[i][1]` to the record of `path` whose case equals
    `fields_by_case[i][0]`, and `peer` as the file's top-level `peer` object.

    The file is re-read just before writing, so records another process added meanwhile stay.
    Existing fields are overwritten only by the same names; nothing is removed.
    """
    doc = read_results(path)
    missing = []
    for case, fields in fields_by_case:
        matches = [r for r in doc.get("records", []) if r.get("case") == case]
        if not matches:
            missing.append(case)
        for r in matches:
            r.update(fields)
    doc["peer"] = peer
    write_results(path, doc)
    if missing:
        print(f"peer: {os.path.relpath(path, ROOT)}: no record for {missing} (skipped)", flush=True)


def ratio(a, b):
    """a / b, or None where either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b
