"""Export a run's tuned model from its checkpoint, for any algorithm.

The checkpoint holds the server state (for FedKSeed only the K-vector accumulator); the
algorithm rebuilds its global model from it and writes what users load: a Hugging Face
checkpoint (FedKSeed) or a peft adapter folder (LoRA-FedAvg).
"""

from __future__ import annotations

from pathlib import Path

from fedtune.config import RunConfig
from fedtune.runtime.checkpoint import load_checkpoint
from fedtune.runtime.loop import build_run


def export_run(run_dir: Path, out_dir: Path) -> Path:
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise ValueError(f"{run_dir} is not a fedtune run folder (needs config.toml and a checkpoint)")
    cfg = RunConfig.load(cfg_path)
    ckpt = load_checkpoint(run_dir)
    server = build_run(cfg).server
    server.load_state_dict(ckpt.server_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    server.export(out_dir)
    return out_dir
