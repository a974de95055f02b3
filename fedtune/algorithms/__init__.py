"""The algorithm API: one extension point for every federated algorithm (see docs/algorithms.md).

Built-ins (resolved lazily by name): ``fedkseed``, ``fedkseed-pro``, ``lora-fedavg``. Outside code
registers with ``@register_algorithm`` or is named as ``"package.module:Class"`` in
``run.algorithm``.
"""

from fedtune.algorithms.base import (
    Algorithm,
    ClientAlgorithm,
    ClientError,
    EvalModel,
    NodeContext,
    NodeReply,
    Rejection,
    RoundOutcome,
    ServerAlgorithm,
    Summand,
)
from fedtune.algorithms.registry import (
    available_algorithms,
    create_algorithm,
    register_algorithm,
    resolve_algorithm,
)

__all__ = [
    "Algorithm",
    "ClientAlgorithm",
    "ClientError",
    "EvalModel",
    "NodeContext",
    "NodeReply",
    "Rejection",
    "RoundOutcome",
    "ServerAlgorithm",
    "Summand",
    "available_algorithms",
    "create_algorithm",
    "register_algorithm",
    "resolve_algorithm",
]
