"""PyTorch at exactly the shapes of our layer op benchmark (crates/spt-ops/benches/layers.rs),
forward + backward, f32, CPU:

- LM head (bench/results/linear-cross-entropy.json): `F.cross_entropy(F.linear(h, W), t)`
  (mean over rows), what transformers' GPT2LMHeadModel computes, with h needing a gradient and W
  frozen or trainable as the record's `weights`. Ids from the same fixed LCG as ours.
- LoRA (bench/results/lora-linear.json): a PEFT LoRA layer (`peft.get_peft_model` on a module
  holding one `nn.Linear(in, out)`; r and alpha = 2 r as ours, no dropout; B drawn non-zero as
  ours), x needing a gradient, loss = sum(y * u).
- Norms and activations (bench/results/norm-activation.json): `F.layer_norm` (frozen unit weight,
  zero bias, eps 1e-12), `torch.softmax(x, -1)`, `F.gelu` (erf, or tanh for `gelu_tanh`), x
  needing a gradient, backward from dy = 1 (`y.backward(torch.ones_like(y))`, as ours).

Adds `torch_s` and `vs_torch` (= ours_s / torch_s: below 1, ours is faster) to every record and
`peer_details` (runs, min, max, load average). Runs: as many as our bench times, after one
warm-up.
"""
import os

from common import loadavg, merge, peer_info, ratio, read_results, summary, timed


def _time(fn, reps):
    fn()
    return summary([timed(fn) for _ in range(reps)])


def _ids(torch, n, vocab):
    """The ids of our bench's `targets` (an LCG, upper bits)."""
    s, out = 0x2545F4914F6CDD1D, []
    for _ in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append((s >> 33) % vocab)
    return torch.tensor(out, dtype=torch.long)


def lm_head_case(torch, case, reps, quick):
    F = torch.nn.functional
    rows, d, vocab = case["rows"], case["d"], case["vocab"]
    if quick:
        rows, vocab = min(rows, 64), min(vocab, 1000)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, d, generator=g).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) * 0.02).requires_grad_(case["weights"] == "trainable")
    t = _ids(torch, rows, vocab)

    def step():
        F.cross_entropy(F.linear(h, w), t).backward()
        h.grad = w.grad = None

    return _time(step, reps), "PyTorch F.cross_entropy(F.linear(h, W), t) fwd+bwd, f32, mean over rows"


def lora_case(torch, case, reps, quick):
    import peft

    rows, d_in, d_out, r = case["rows"], case["in"], case["out"], case["rank"]
    if quick:
        rows = min(rows, 64)
    g = torch.Generator().manual_seed(0)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out)

        def forward(self, x):
            return self.proj(x)

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"])
    model = peft.get_peft_model(One(), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    x = torch.randn(rows, d_in, generator=g).requires_grad_()
    u = torch.randn(rows, d_out, generator=g)

    def step():
        (model(x) * u).sum().backward()
        x.grad = None
        model.zero_grad(set_to_none=True)

    return _time(step, reps), f"PyTorch + PEFT LoRA on nn.Linear(in, out), r = {r}, alpha = {2 * r}, fwd+bwd of sum(y * u), f32"


def norm_activation_case(torch, case, reps, quick):
    F = torch.nn.functional
    rows, d, op = case["rows"], case["d"], case["op"]
    if quick:
        rows = min(rows, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g).requires_grad_()
    ones, zeros = torch.ones(d), torch.zeros(d)
    fn = {
        "layer_norm": lambda: F.layer_norm(x, (d,), ones, zeros, 1e-12),
        "softmax": lambda: torch.softmax(x, -1),
        "gelu_erf": lambda: F.gelu(x),
        "gelu_tanh": lambda: F.gelu(x, approximate="tanh"),
    }[op]

    def step():
        y = fn()
        y.backward(torch.ones_like(y))
        x.grad = None

    return _time(step, reps), ("PyTorch F.layer_norm (frozen weight and bias) / torch.softmax / F.gelu (erf or tanh) "
                               "fwd+bwd from dy = 1, f32")


# Result file -> the function timing one of its records.
CASES = {
    "linear-cross-entropy.json": lm_head_case,
    "lora-linear.json": lora_case,
    "norm-activation.json": norm_activation_case,
}


def bench_layers(torch, results, quick=False):
    """Adds PyTorch's figures to every record of the layer benchmark's result files in `results`."""
    for name, timer in CASES.items():
        path = os.path.join(results, name)
        out = []
        for rec in read_results(path)["records"]:
            case = rec["case"]
            before = loadavg()
            t, what = timer(torch, case, rec.get("reps", 5), quick)
            fields = {
                "torch_s": t["median_s"],
                "vs_torch": ratio(rec.get("ours_s"), t["median_s"]),
                "peer_details": {
                    "what": what,
                    "runs": len(t["times_s"]),
                    "min_s": t["min_s"],
                    "max_s": t["max_s"],
                    "loadavg_before": before,
                    "loadavg_after": loadavg(),
                    **({"quick": True} if quick else {}),
                },
            }
            print(
                f"peer {name} {case}: ours {rec.get('ours_s', float('nan')):.4f} s | "
                f"torch {t['median_s']:.4f} s | ours/torch {fields['vs_torch'] or float('nan'):.3f}",
                flush=True,
            )
            out.append((case, fields))
        merge(path, out, peer_info(torch))
