"""The merge engine: plan, stream and write merges (``run_merge``)."""

from convergent.engine.execute import plan_merge, run_merge
from convergent.engine.job import MergeJob, MergeResult, ModelInput, OutputTensor, constant

__all__ = ["MergeJob", "MergeResult", "ModelInput", "OutputTensor", "constant", "plan_merge", "run_merge"]
