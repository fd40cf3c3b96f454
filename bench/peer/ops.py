"""PyTorch at exactly the shapes of our op benchmarks, forward + backward, f32, CPU:

- attention (crates/spt-ops/benches/attention.rs, bench/results/attention.json): q, k, v of
  [B, H, L, d] that need gradients, loss = sum(o * w) with a fixed random w, scale 1/sqrt(d),
  through `F.scaled_dot_product_attention` (SDPA: PyTorch's fused kernel) and through eager
  attention (matmul, softmax, matmul: what a plain model does). Mask: "none", "causal", or
  "padding" with the case's `valid` (real keys per sequence; our bench defines no padding
  case yet). Adds `torch_sdpa_s`, `torch_eager_s`, `torch_s` (= SDPA) and `vs_torch_sdpa` /
  `vs_torch_eager` (= ours_s / torch figure: below 1, ours is faster).
- FFN (crates/spt-ops/benches/ffn.rs, bench/results/ffn.json): the dense FFN
  `fc2(gelu(fc1(x)))` (GELU with erf, as ours) on `tokens` x d inputs that need gradients,
  loss = sum(y * u). "frozen": base weights without gradients plus the trainable LoRA factors of
  the record's `lora_rank` (alpha = 2 r), as our bench's baseline for `frozen_lora` records;
  "trainable": every weight needs a gradient. Adds `torch_frozen_s`, `torch_trainable_s`,
  `torch_s` (the one of the record's `weights` kind) and `vs_torch` = ours_s / torch_s.

Times are medians of as many runs as our bench makes (after one warm-up), with the two PyTorch
variants interleaved run by run as ours interleaves its variants. PyTorch does not depend on the
routed FFN's block size or kept fraction, so each FFN shape is measured once and its figures go
to every record of that shape. Run details (min, max, load average; for frozen records also
the frozen FFN without adapters, `frozen_no_lora_s`) go to `peer_details`.
"""
import math

from common import loadavg, merge, peer_info, ratio, summary, timed


def mem_available():
    """MemAvailable from /proc/meminfo, in bytes (0 where unreadable: nothing large runs)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _interleaved(fns, reps):
    """One warm-up call of each function, then `reps` rounds calling each once; seconds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: summary(ts) for name, ts in times.items()}


def attention_case(torch, case, quick):
    """Times SDPA and eager attention fwd+bwd at `case`; returns the fields for its record."""
    F = torch.nn.functional
    B, H, L, d = case["B"], case["H"], case["L"], case["d"]
    if quick:
        L = min(L, 256)
    mask = case.get("mask", "none")
    scale = 1.0 / math.sqrt(d)
    keep = None  # boolean [B, 1, 1|L, L], True = attend
    if mask == "causal":
        keep = torch.ones(L, L, dtype=torch.bool).tril().view(1, 1, L, L)
    elif mask == "padding":
        if "valid" not in case:
            raise ValueError("mask 'padding' needs the case's `valid` (real keys per sequence)")
        keep = torch.zeros(B, 1, 1, L, dtype=torch.bool)
        keep[..., : min(case["valid"], L)] = True
    elif mask != "none":
        raise ValueError(f"unknown mask {mask!r}")

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, d, generator=g).requires_grad_() for _ in range(3))
    w = torch.randn(B, H, L, d, generator=g)

    def backward(o):
        (o * w).sum().backward()
        q.grad = k.grad = v.grad = None

    def sdpa():
        # is_causal uses the fused kernel's own causal path; other masks go in as attn_mask.
        causal = mask == "causal"
        backward(F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal else keep, is_causal=causal, scale=scale))

    def eager():
        s = (q @ k.transpose(-2, -1)) * scale
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        backward(torch.softmax(s, dim=-1) @ v)

    reps = 3 if L > 4096 else 5 if L >= 4096 else 7  # as our bench
    # Eager keeps [B, H, L, L] scores, probabilities and their gradient: skipped where that
    # would not fit in half the free memory (12 GiB each at L = 16384).
    fns = {"sdpa": sdpa}
    eager_bytes = 3 * B * H * L * L * 4
    if eager_bytes < mem_available() / 2:
        fns["eager"] = eager
    before = loadavg()
    t = _interleaved(fns, reps)
    e = t.get("eager", {})
    fields = {
        "torch_sdpa_s": t["sdpa"]["median_s"],
        "torch_eager_s": e.get("median_s"),
        "torch_s": t["sdpa"]["median_s"],
        "peer_details": {
            "what": "PyTorch fwd+bwd of sum(o * w), f32: SDPA and eager (matmul, softmax, matmul)",
            "runs": reps,
            "sdpa_min_s": t["sdpa"]["min_s"],
            "sdpa_max_s": t["sdpa"]["max_s"],
            "eager_min_s": e.get("min_s"),
            "eager_max_s": e.get("max_s"),
            "loadavg_before": before,
            "loadavg_after": loadavg(),
        },
    }
    if "eager" not in fns:
        fields["peer_details"]["eager_skipped"] = (
            f"needs ~{eager_bytes / 2**30:.0f} GiB for [B, H, L, L] scores, probabilities and gradient")
    if quick:
        fields["peer_details"]["quick_L"] = L
    return fields


def bench_attention(torch, path, quick=False):
    """Adds PyTorch's attention figures to every record of `path` (attention.json)."""
    from common import read_results

    out = []
    timed_shapes = {}  # records of one shape and mask (per query, blocks) share one timing
    for rec in read_results(path)["records"]:
        case = rec["case"]
        shape = tuple(case.get(k) for k in ("B", "H", "L", "d", "mask", "valid"))
        try:
            if shape not in timed_shapes:
                timed_shapes[shape] = attention_case(torch, case, quick)
            fields = dict(timed_shapes[shape])
        except (ValueError, RuntimeError) as e:  # an undefined mask, out of memory, ...
            print(f"peer attention {case}: {e}", flush=True)
            out.append((case, {"peer_details": {"error": str(e)[:300]}}))
            continue
        fields["vs_torch_sdpa"] = ratio(rec.get("ours_s"), fields["torch_sdpa_s"])
        fields["vs_torch_eager"] = ratio(rec.get("ours_s"), fields["torch_eager_s"])
        eager = fields["torch_eager_s"]
        print(
            f"peer attention {case}: ours {rec.get('ours_s', float('nan')):.4f} s | "
            f"torch SDPA {fields['torch_sdpa_s']:.4f} s | eager "
            f"{'skipped' if eager is None else f'{eager:.4f} s'} | "
            f"ours/SDPA {fields['vs_torch_sdpa'] or float('nan'):.3f}",
            flush=True,
        )
        out.append((case, fields))
    merge(path, out, peer_info(torch))


def ffn_shape(torch, tokens, d, d_ff, rank, reps):
    """Times the dense FFN fwd+bwd with frozen base weights (+ LoRA of `rank`), with every
    weight trainable and, when `rank` > 0, frozen without adapters, interleaved; returns
    {"frozen": summary, "trainable": summary, "frozen_no_lora": summary}."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    w1, b1 = randn(d_ff, d, std=d ** -0.5), randn(d_ff, std=0.02)
    w2, b2 = randn(d, d_ff, std=d_ff ** -0.5), randn(d, std=0.02)
    x = randn(tokens, d).requires_grad_()
    u = randn(tokens, d)
    # Trainable LoRA factors for the frozen case (non-zero B, as our bench).
    a1, lb1 = randn(rank, d, std=0.02).requires_grad_(), randn(d_ff, rank, std=0.01).requires_grad_()
    a2, lb2 = randn(rank, d_ff, std=0.02).requires_grad_(), randn(d, rank, std=0.01).requires_grad_()
    lora_scale = 2.0  # alpha / r with alpha = 2 r
    trainable = [p.clone().requires_grad_() for p in (w1, b1, w2, b2)]

    def step(y, params):
        (y * u).sum().backward()
        for p in [x] + params:
            p.grad = None

    def frozen():
        h = F.linear(x, w1, b1)
        if rank:
            h = h + lora_scale * F.linear(F.linear(x, a1), lb1)
        h = F.gelu(h)
        y = F.linear(h, w2, b2)
        if rank:
            y = y + lora_scale * F.linear(F.linear(h, a2), lb2)
        step(y, [a1, lb1, a2, lb2])

    def plain():
        step(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), [])

    def full():
        tw1, tb1, tw2, tb2 = trainable
        step(F.linear(F.gelu(F.linear(x, tw1, tb1)), tw2, tb2), trainable)

    fns = {"frozen": frozen, "trainable": full}
    if rank:
        fns["frozen_no_lora"] = plain
    return _interleaved(fns, reps)


def bench_ffn(torch, path, quick=False):
    """Adds PyTorch's dense-FFN figures to every record of `path` (ffn.json)."""
    from common import read_results

    records = read_results(path)["records"]
    measured = {}  # (tokens, d, d_ff) -> fields shared by that shape's records
    out = []
    for rec in records:
        case = rec["case"]
        tokens = rec.get("tokens", 4096)
        if quick:
            tokens = min(tokens, 256)
        key = (tokens, case["d"], case["d_ff"])
        if key not in measured:
            # The LoRA rank of this shape's frozen records (our bench: 16).
            rank = max((r.get("lora_rank", 0) for r in records
                        if (r["case"]["d"], r["case"]["d_ff"]) == key[1:]), default=0)
            reps = 7 if case["d"] >= 768 else 15  # as our bench (crates/spt-ops/benches/ffn.rs)
            before = loadavg()
            t = ffn_shape(torch, *key, rank, reps)
            measured[key] = {
                "torch_frozen_s": t["frozen"]["median_s"],
                "torch_trainable_s": t["trainable"]["median_s"],
                "peer_details": {
                    "what": "PyTorch dense FFN fwd+bwd of sum(y * u), f32, GELU (erf); frozen = "
                            f"base weights without gradients + LoRA r = {rank}, alpha = {2 * rank}",
                    "runs": reps,
                    "tokens": tokens,
                    "frozen_min_s": t["frozen"]["min_s"],
                    "frozen_max_s": t["frozen"]["max_s"],
                    "trainable_min_s": t["trainable"]["min_s"],
                    "trainable_max_s": t["trainable"]["max_s"],
                    # The frozen FFN without adapters: what the LoRA factors cost in PyTorch.
                    "frozen_no_lora_s": t.get("frozen_no_lora", {}).get("median_s"),
                    "loadavg_before": before,
                    "loadavg_after": loadavg(),
                },
            }
        fields = dict(measured[key])
        fields["torch_s"] = fields["torch_trainable_s" if case["weights"] == "trainable" else "torch_frozen_s"]
        fields["vs_torch"] = ratio(rec.get("ours_s"), fields["torch_s"])
        print(
            f"peer ffn {case}: ours {rec.get('ours_s', float('nan')):.4f} s | torch "
            f"{fields['torch_s']:.4f} s ({case['weights']}) | ours/torch {fields['vs_torch'] or float('nan'):.3f}",
            flush=True,
        )
        out.append((case, fields))
    merge(path, out, peer_info(torch))
