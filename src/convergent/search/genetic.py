"""A real-coded genetic algorithm with a JSON-serialisable state.

Maximises a score over the unit cube [0, 1]^n. Generation 0 is the starting
point plus ``popsize - 1`` uniform random individuals. Each later generation
keeps the ``elite`` best individuals (their scores are remembered, never
re-evaluated) and breeds ``popsize - elite`` children: two parents by
tournament selection (size ``tournament``), BLX-alpha blend crossover
(alpha 0.5) per gene, then Gaussian mutation of each gene with probability
``mutation_rate`` (default 1/n) and standard deviation
``mutation_sigma * mutation_decay^generation``, clipped to [0, 1].

The state (population with scores, generation, PCG64 generator state) is plain
JSON, so a search resumes bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class Genetic:
    name = "genetic"

    def __init__(
        self,
        dim: int,
        seed: int,
        mean: Sequence[float] | None = None,
        popsize: int | None = None,
        elite: int = 2,
        tournament: int = 3,
        mutation_rate: float | None = None,
        mutation_sigma: float = 0.15,
        mutation_decay: float = 0.93,
        alpha: float = 0.5,
    ):
        if dim < 1:
            raise ValueError("the genetic search needs at least one dimension")
        self.dim = dim
        self.popsize = int(popsize or max(10, 2 * (4 + int(3 * np.log(dim)))))
        self.elite = min(int(elite), self.popsize - 1)
        if self.popsize < 3:
            raise ValueError("the genetic search needs a population of at least 3")
        self.tournament = max(1, int(tournament))
        self.mutation_rate = float(mutation_rate if mutation_rate is not None else 1.0 / dim)
        self.mutation_sigma = float(mutation_sigma)
        self.mutation_decay = float(mutation_decay)
        self.alpha = float(alpha)
        self.start = [float(v) for v in np.clip(np.asarray(mean if mean is not None else [0.5] * dim), 0.0, 1.0)]
        self.population: list[tuple[list[float], float]] = []
        self.generation = 0
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def _select(self) -> list[float]:
        picks = self.rng.integers(0, len(self.population), size=self.tournament)
        best = min(picks, key=lambda i: (-self.population[int(i)][1], int(i)))
        return self.population[int(best)][0]

    def ask(self) -> list[list[float]]:
        if not self.population:
            rest = self.rng.random((self.popsize - 1, self.dim))
            return [list(self.start)] + [[float(v) for v in row] for row in rest]
        sigma = self.mutation_sigma * self.mutation_decay**self.generation
        children = []
        for _ in range(self.popsize - self.elite):
            a = np.asarray(self._select())
            b = np.asarray(self._select())
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            span = hi - lo
            child = self.rng.uniform(lo - self.alpha * span, hi + self.alpha * span)
            mutate = self.rng.random(self.dim) < self.mutation_rate
            child = child + mutate * self.rng.standard_normal(self.dim) * sigma
            children.append([float(v) for v in np.clip(child, 0.0, 1.0)])
        return children

    def _ranked(self) -> list[tuple[list[float], float]]:
        order = sorted(range(len(self.population)), key=lambda i: (-self.population[i][1], i))
        return [self.population[i] for i in order]

    def tell(self, candidates: Sequence[Sequence[float]], scores: Sequence[float]) -> None:
        new = [([float(v) for v in x], float(s)) for x, s in zip(candidates, scores)]
        if not self.population:
            self.population = new
        else:
            self.population = self._ranked()[: self.elite] + new
        self.generation += 1

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "dim": self.dim,
            "popsize": self.popsize,
            "elite": self.elite,
            "tournament": self.tournament,
            "mutation_rate": self.mutation_rate,
            "mutation_sigma": self.mutation_sigma,
            "mutation_decay": self.mutation_decay,
            "alpha": self.alpha,
            "start": self.start,
            "population": [[x, s] for x, s in self.population],
            "generation": self.generation,
            "rng": self.rng.bit_generator.state,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Genetic:
        self = cls(
            int(state["dim"]),
            0,
            state["start"],
            int(state["popsize"]),
            int(state["elite"]),
            int(state["tournament"]),
            float(state["mutation_rate"]),
            float(state["mutation_sigma"]),
            float(state["mutation_decay"]),
            float(state["alpha"]),
        )
        self.population = [([float(v) for v in x], float(s)) for x, s in state["population"]]
        self.generation = int(state["generation"])
        self.rng.bit_generator.state = state["rng"]
        return self
