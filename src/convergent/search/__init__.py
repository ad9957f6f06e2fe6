"""Finding merge coefficients: evolutionary search against a user evaluation, and data-driven merges.

* :mod:`~convergent.search.coefficients`: CMA-ES / genetic search over a recipe's coefficients
  (``convergent search``), seeded and resumable from a JSON state file;
* :mod:`~convergent.search.adamerging`: AdaMerging, entropy minimisation on unlabelled inputs;
* :mod:`~convergent.search.frank_wolfe`: FW-Merging with a differentiable user loss;
* :mod:`~convergent.search.surgery`: representation surgery, a per-task module on the merged features.
"""

from convergent.search.coefficients import SearchError, SearchResult, optimize, search
from convergent.search.evaluate import CallableEvaluator, CommandEvaluator, EvaluationError

__all__ = [
    "CallableEvaluator",
    "CommandEvaluator",
    "EvaluationError",
    "SearchError",
    "SearchResult",
    "optimize",
    "search",
]
