#!/usr/bin/env python3
"""Prints the coefficients of the vectorised GELU's erf (crates/spt-ops/src/gelu_simd.rs).

- Below |z| = 0.875: erf(z) = z * sum_n c_n z^(2n), the Taylor series to n = 9.
- Above: erfc(z) = exp(-z^2) * R(t), t = 1 / (1 + z / 2), R a degree-8 polynomial in t, least
  squares in relative error on z in [0.875, 10] (erfc underflows f32 beyond ~9.3).

Needs numpy: `.venv-peer/bin/python scripts/fit-erfc.py` (scripts/peer-bench.sh makes the venv).
"""
import math

import numpy as np

print("taylor", [2 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(10)])
z = np.linspace(0.875, 10.0, 40001)
r = np.array([math.erfc(v) * math.exp(v * v) for v in z])
t = 1 / (1 + 0.5 * z)
c = np.polynomial.polynomial.polyfit(t, r, 8, w=1 / r)
print("tail", c.astype(np.float32).tolist())
# The fit's relative error with f32 Horner evaluation, as the kernel does it.
c32, t32 = c.astype(np.float32), t.astype(np.float32)
y = np.float32(c32[-1])
for k in range(len(c32) - 2, -1, -1):
    y = (y * t32 + c32[k]).astype(np.float32)
print("max relative error of R in f32:", float(np.max(np.abs(y / r - 1))))
