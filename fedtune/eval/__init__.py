"""Held-out evaluation: answer loss and Rouge-L of greedy generations."""

from fedtune.eval.heldout import EvalResult, HeldoutEvaluator, rouge_l

__all__ = ["EvalResult", "HeldoutEvaluator", "rouge_l"]
