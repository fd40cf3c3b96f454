"""Loads an adapter written by `spt-train export --format peft` with PEFT itself, and compares
its outputs with transformers on the merged export of the same run (`spt-train export`).

    .venv-peer/bin/python bench/peer/peft_adapter.py --base MODEL_DIR --adapter ADAPTER_DIR \
        --merged MERGED_DIR [--task classify|lm]

`PeftModel.from_pretrained(base, adapter)` must load every tensor of the adapter (no missing or
unexpected keys) and give the merged export's logits on a few texts, to float32 rounding. Prints
one JSON line; exits 1 when either check fails. The CI test (tests/cli_export_peft.rs) checks the
same files against the merged export's weights without torch.
"""
import argparse
import json
import os
import sys

from common import setup_torch

TEXTS = ["a wonderful, moving film", "the plot was thin and the acting worse",
         "it is neither good nor bad", "the good movie was very good"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the model the run started from")
    ap.add_argument("--adapter", required=True, help="spt-train export --format peft")
    ap.add_argument("--merged", required=True, help="spt-train export (the same run, merged)")
    ap.add_argument("--task", choices=("classify", "lm"), default="classify")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch = setup_torch()
    import peft
    import transformers
    from safetensors.torch import load_file

    auto = (transformers.AutoModelForSequenceClassification if a.task == "classify"
            else transformers.AutoModelForCausalLM)
    merged = auto.from_pretrained(a.merged, dtype=torch.float32).eval()
    extra = {"num_labels": merged.config.num_labels} if a.task == "classify" else {}
    base = auto.from_pretrained(a.base, dtype=torch.float32, **extra)
    model = peft.PeftModel.from_pretrained(base, a.adapter).eval()

    # Every adapter tensor is now a parameter of the PEFT model, equal to the file's.
    saved = load_file(os.path.join(a.adapter, "adapter_model.safetensors"))
    live = peft.get_peft_model_state_dict(model)
    missing = sorted(set(saved) - set(live))
    unexpected = sorted(set(live) - set(saved))
    value_diff = max((saved[k] - live[k]).abs().max().item() for k in set(saved) & set(live))

    tok = transformers.AutoTokenizer.from_pretrained(a.merged)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        want = merged(**batch).logits
        got = model(**batch).logits
    logit_diff = (want - got).abs().max().item()
    out = {"task": a.task, "tensors": len(saved), "missing": missing, "unexpected": unexpected,
           "max_tensor_diff": value_diff, "max_logit_diff": logit_diff,
           "logit_scale": want.abs().max().item(), "peft": peft.__version__,
           "transformers": transformers.__version__}
    print(json.dumps(out))
    ok = not missing and not unexpected and value_diff == 0.0 and logit_diff <= a.tol
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
