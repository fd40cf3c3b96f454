"""Text generation in PyTorch + transformers at the cases of our generation benchmark
(crates/spt-train/benches/generate.rs, bench/results/generate.json): GPT-2 small from
bench/configs/gpt2-small, randomly initialised (as ours: the time does not depend on the values),
batch 1, f32 (under bf16 autocast for our records with `matmul_precision: bf16`), eval mode, no
gradients. Our dense records against the plain model; our LoRA and
SPT records against a PEFT LoRA model (r 8, alpha 16 on c_attn, c_proj, c_fc: the targets of
bench/peer/steps.py, unmerged, as PEFT runs a trained adapter), what a PyTorch user fine-tunes
with adapters and then generates from.

The same fixed tokens as ours (the LCG below), fed as HF's `generate` feeds them with its KV
cache: the prompt in one call, then one token per call with the returned `cache`, and
`logits_to_keep=1` (the head for the last position only, as `generate` asks). Times: the whole
generation, median of as many runs as ours after one warm-up, and the median time of one new
token over those runs. Memory: this process's peak RSS after the case's runs (torch imported,
weights included; the cases run shortest first, as ours).

Adds `torch_s`, `torch_token_s`, `torch_bytes` and `vs_torch` (= ours_s / torch_s: below 1,
ours is faster) to every record, and `peer_details`.
"""
import os
import resource
import time

from common import ROOT, loadavg, median, merge, peer_info, ratio, read_results


def tokens(n, vocab):
    """Our bench's token ids: the upper bits of a 64-bit LCG."""
    s, out = 0x2545F4914F6CDD1D, []
    for _ in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append((s >> 33) % vocab)
    return out


def generation(torch, model, ids, prompt):
    """One cached generation: (total seconds, seconds of each new token)."""
    t0 = time.perf_counter()
    out = model(input_ids=torch.tensor([ids[:prompt]]), use_cache=True, logits_to_keep=1)
    out.logits[0, -1].tolist()  # the sampler reads the logits, as ours does
    past, per_token = out.cache, []
    for i in ids[prompt:]:
        t = time.perf_counter()
        out = model(input_ids=torch.tensor([[i]]), cache=past, use_cache=True, logits_to_keep=1)
        out.logits[0, -1].tolist()
        past = out.cache
        per_token.append(time.perf_counter() - t)
    return time.perf_counter() - t0, per_token


def build(torch, config, lora):
    """GPT-2 small, randomly initialised; with a PEFT LoRA adapter (B non-zero) when `lora`."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    if lora:
        import peft
        from steps import GPT2_LORA_TARGETS, LORA_ALPHA, LORA_RANK

        cfg = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                              target_modules=GPT2_LORA_TARGETS, fan_in_fan_out=True)
        model = peft.get_peft_model(model, cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
    return model.eval()


def run_mode(lora, cases, quick, bf16=False):
    """The records' cases of one model, in this (fresh) process: a list of (case, fields); under
    bf16 autocast (torch.autocast('cpu', dtype=torch.bfloat16)) with `bf16`."""
    import contextlib
    import transformers
    from common import setup_torch

    torch = setup_torch()
    transformers.logging.disable_progress_bar()
    config = transformers.GPT2Config.from_pretrained(os.path.join(ROOT, "bench", "configs", "gpt2-small"))
    if quick:
        config.n_layer = 2
    model = build(torch, config, lora)
    out = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for case, reps, ours_s in cases:
            prompt, new = case["prompt"], case["new_tokens"]
            if quick:
                new = min(new, 16)
            ids = tokens(prompt + new, config.vocab_size)
            before = loadavg()
            generation(torch, model, ids[: prompt + 8], prompt)  # warm-up
            totals, per_token = [], []
            for _ in range(reps):
                t, p = generation(torch, model, ids, prompt)
                totals.append(t)
                per_token += p
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            total = median(totals)
            print(f"peer: generate {case}: {total:.3f} s ({median(per_token) * 1e3:.2f} ms / token)", flush=True)
            out.append((case, {
                "torch_s": total,
                "torch_token_s": median(per_token),
                "torch_bytes": rss,
                "vs_torch": ratio(ours_s, total),
                "peer_details": {
                    "what": ("PyTorch + transformers GPT2LMHeadModel" + (" + PEFT LoRA r 8 (unmerged)" if lora else "")
                             + ", KV cache (its `cache`), logits_to_keep=1, eval mode, torch.no_grad(), "
                             + ("bf16 autocast" if bf16 else "f32") + "; "
                             "peak RSS of a process per model (torch import included)"),
                    "runs_s": totals,
                    "loadavg_before": before,
                    "loadavg_after": loadavg(),
                    **({"quick": True} if quick else {}),
                },
            }))
    return out


def bench_generate(torch, path, quick=False):
    """Adds PyTorch's figures to every record of `path`; each model in a fresh process (spawned),
    so that its peak RSS is its own, as ours are."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    groups = {}
    for rec in read_results(path)["records"]:
        lora = rec["case"].get("mode", "dense") != "dense"
        bf16 = rec["case"].get("matmul_precision") == "bf16"
        groups.setdefault((lora, bf16), []).append((rec["case"], rec.get("reps", 3), rec.get("ours_s")))
    fields = []
    for (lora, bf16), cases in groups.items():
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ex:
            fields += ex.submit(run_mode, lora, cases, quick, bf16).result()
    merge(path, fields, peer_info(torch))
