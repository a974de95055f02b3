"""Export a FedKSeed run as an ordinary Hugging Face checkpoint.

The run folder holds only the accumulator (K floats); the tuned weights are rebuilt by replaying
it onto the pretrained model, then saved as safetensors that ``from_pretrained`` loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtune.config import RunConfig


def export_run(run_dir: Path, out_dir: Path) -> Path:
    cfg_path, state = run_dir / "config.toml", run_dir / "checkpoint" / "server_state.npz"
    if cfg_path.is_file() and RunConfig.load(cfg_path).run.algorithm == "lora-fedavg":
        raise ValueError(
            f"{run_dir} is a lora-fedavg run: its adapter is {run_dir / 'adapter.npz'}; "
            "export rebuilds FedKSeed runs only"
        )
    if not cfg_path.is_file() or not state.is_file():
        raise ValueError(
            f"{run_dir} is not a FedKSeed run folder (needs config.toml and checkpoint/server_state.npz)"
        )
    cfg = RunConfig.load(cfg_path)
    from fedtune.fedkseed.replica import build_replica

    replica = build_replica(cfg)
    with np.load(state) as data:
        accumulator = data["accumulator"].astype(np.float64)
    if accumulator.shape != (cfg.fedkseed.num_seeds,):
        raise ValueError(f"accumulator has shape {accumulator.shape}; config says K={cfg.fedkseed.num_seeds}")
    replica.client.sync_to(accumulator)
    out_dir.mkdir(parents=True, exist_ok=True)
    replica.model.save_pretrained(out_dir, safe_serialization=True)
    replica.tokenizer.save_pretrained(out_dir)
    return out_dir
