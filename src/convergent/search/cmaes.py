"""CMA-ES (Hansen's covariance matrix adaptation evolution strategy) with a JSON-serialisable state.

A plain implementation of the (mu/mu_w, lambda)-CMA-ES of Hansen's tutorial
("The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772), default
strategy parameters, maximising a score over the unit cube [0, 1]^n (the
search space maps it to each coefficient's bounds). Candidates outside the
cube are resampled (up to 100 times) and then clipped, as the ``cmaes``
package does.

The whole state (mean, step size, covariance, evolution paths, generation and
the PCG64 generator's state) is plain JSON, so a search can be stopped and
resumed bit for bit (:mod:`convergent.search.coefficients` keeps it in the
``--state`` file). Nothing here touches a global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


class CMAES:
    name = "cmaes"

    def __init__(
        self,
        dim: int,
        seed: int,
        mean: Sequence[float] | None = None,
        sigma: float = 0.3,
        popsize: int | None = None,
    ):
        if dim < 1:
            raise ValueError("CMA-ES needs at least one dimension")
        n = dim
        self.dim = n
        self.popsize = int(popsize or 4 + int(3 * math.log(n)))
        if self.popsize < 2:
            raise ValueError("CMA-ES needs a population of at least 2")
        self.mean = np.clip(np.asarray(mean if mean is not None else [0.5] * n, dtype=np.float64), 0.0, 1.0)
        self.sigma = float(sigma)
        self.C = np.eye(n)
        self.pc = np.zeros(n)
        self.ps = np.zeros(n)
        self.generation = 0
        self.rng = _rng(seed)
        self._constants()

    def _constants(self) -> None:
        n = self.dim
        lam = self.popsize
        self.mu = lam // 2
        w = np.log((lam + 1) / 2) - np.log(np.arange(1, self.mu + 1))
        self.weights = w / w.sum()
        self.mueff = 1.0 / float(np.sum(self.weights**2))
        mueff = self.mueff
        self.cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
        self.cs = (mueff + 2) / (n + mueff + 5)
        self.c1 = 2 / ((n + 1.3) ** 2 + mueff)
        self.cmu = min(1 - self.c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
        self.damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + self.cs
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))

    def _eigen(self) -> tuple[np.ndarray, np.ndarray]:
        values, vectors = np.linalg.eigh(self.C)
        return vectors, np.sqrt(np.maximum(values, 1e-20))

    def ask(self) -> list[list[float]]:
        """One generation of candidates in [0, 1]^n."""
        b, d = self._eigen()
        out = []
        for _ in range(self.popsize):
            for _attempt in range(100):
                z = self.rng.standard_normal(self.dim)
                x = self.mean + self.sigma * (b @ (d * z))
                if np.all((x >= 0.0) & (x <= 1.0)):
                    break
            out.append([float(v) for v in np.clip(x, 0.0, 1.0)])
        return out

    def tell(self, candidates: Sequence[Sequence[float]], scores: Sequence[float]) -> None:
        """Update from one generation's candidates and their scores (higher is better)."""
        if len(candidates) != self.popsize or len(scores) != self.popsize:
            raise ValueError(f"CMA-ES expects {self.popsize} candidates and scores")
        xs = np.asarray(candidates, dtype=np.float64)
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[: self.mu]
        ys = (xs[order] - self.mean) / self.sigma
        y_w = self.weights @ ys
        b, d = self._eigen()
        inv_sqrt = b @ np.diag(1.0 / d) @ b.T
        n = self.dim
        self.mean = self.mean + self.sigma * y_w
        self.ps = (1 - self.cs) * self.ps + math.sqrt(self.cs * (2 - self.cs) * self.mueff) * (inv_sqrt @ y_w)
        norm_ps = float(np.linalg.norm(self.ps))
        denom = math.sqrt(1 - (1 - self.cs) ** (2 * (self.generation + 1)))
        hsig = 1.0 if norm_ps / denom / self.chi_n < 1.4 + 2 / (n + 1) else 0.0
        self.pc = (1 - self.cc) * self.pc + hsig * math.sqrt(self.cc * (2 - self.cc) * self.mueff) * y_w
        rank_mu = (ys.T * self.weights) @ ys
        c = (1 - self.c1 - self.cmu + (1 - hsig) * self.c1 * self.cc * (2 - self.cc)) * self.C
        c = c + self.c1 * np.outer(self.pc, self.pc) + self.cmu * rank_mu
        self.C = (c + c.T) / 2
        self.sigma = float(self.sigma * math.exp((self.cs / self.damps) * (norm_ps / self.chi_n - 1)))
        self.sigma = min(max(self.sigma, 1e-12), 1e3)
        self.generation += 1

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "dim": self.dim,
            "popsize": self.popsize,
            "mean": [float(v) for v in self.mean],
            "sigma": self.sigma,
            "C": [[float(v) for v in row] for row in self.C],
            "pc": [float(v) for v in self.pc],
            "ps": [float(v) for v in self.ps],
            "generation": self.generation,
            "rng": self.rng.bit_generator.state,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CMAES:
        self = cls(int(state["dim"]), 0, state["mean"], float(state["sigma"]), int(state["popsize"]))
        self.C = np.asarray(state["C"], dtype=np.float64)
        self.pc = np.asarray(state["pc"], dtype=np.float64)
        self.ps = np.asarray(state["ps"], dtype=np.float64)
        self.mean = np.asarray(state["mean"], dtype=np.float64)
        self.generation = int(state["generation"])
        self.rng.bit_generator.state = state["rng"]
        return self
