#!/usr/bin/env python3
"""Prints the coefficients of the vectorised GELU's erf (crates/spt-ops/src/gelu_simd.rs).

erfc(z) = exp(-z^2) * R(t), t = 1 / (1 + z / 2), R a degree-9 polynomial in t fitted in
relative error on z in [0, 10] (erfc underflows f32 beyond ~9.3): least squares on a grid
uniform in t, reweighted towards the largest errors (Lawson's iteration, towards minimax), the
best of 60 rounds by its error under f32 Horner evaluation, as the kernel evaluates it.

Needs numpy: `.venv-peer/bin/python scripts/fit-erfc.py` (scripts/peer-bench.sh makes the venv).
"""
import math

import numpy as np

DEGREE = 9


def horner_f32(c, t):
    c32, t32 = c.astype(np.float32), t.astype(np.float32)
    y = np.float32(c32[-1])
    for k in range(len(c32) - 2, -1, -1):
        y = (y * t32 + c32[k]).astype(np.float32)
    return y


t = np.linspace(1 / 6, 1.0, 60001)
z = 2 * (1 / t - 1)
r = np.array([math.erfc(v) * math.exp(v * v) for v in z])
w = np.ones_like(t)
best = None
for _ in range(60):
    c = np.polynomial.polynomial.polyfit(t, r, DEGREE, w=w / r)
    e = np.polynomial.polynomial.polyval(t, c) / r - 1
    w = w * (np.abs(e) / np.abs(e).max() + 1e-3) ** 0.5
    w /= w.max()
    err = float(np.max(np.abs(horner_f32(c, t) / r - 1)))
    if best is None or err < best[0]:
        best = (err, c)
err, c = best
print("erfc", c.astype(np.float32).tolist())
print("max relative error of R in f32:", err)
