"""model.device: the spec's form (config), its resolution to a torch device, errors that name the fix."""

from __future__ import annotations

import pytest
import torch

from fedtune.assets.device import resolve_device
from fedtune.config import ModelSection, RunConfig, is_device_spec

GOOD = ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:12"]
BAD = ["gpu", "cuda:x", "cuda:", "cuda:-1", "CUDA", " cpu", "cpu:0", "mps", "", "cuda:1.0", "cuda:\u0661"]


@pytest.mark.parametrize("spec", GOOD)
def test_device_specs_accepted(spec: str) -> None:
    assert is_device_spec(spec)
    assert ModelSection(device=spec).device == spec


@pytest.mark.parametrize("spec", BAD)
def test_malformed_device_specs_name_the_fix(spec: str) -> None:
    assert not is_device_spec(spec)
    with pytest.raises(ValueError, match=r"model.device = .* use auto, cpu, cuda or cuda:N"):
        ModelSection(device=spec)
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_device_key_defaults_to_auto_and_travels_as_a_dotted_key() -> None:
    assert RunConfig().model.device == "auto"
    assert RunConfig().to_flat()["model.device"] == "auto"
    cfg = RunConfig.from_flat({"model.device": "cpu"})
    assert cfg.model.device == "cpu"
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    with pytest.raises(ValueError, match=r"model\.device = 'gpu'"):
        RunConfig.from_flat({"model.device": "gpu"})


def test_cpu_and_auto_resolve_here() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_names_both_fixes(spec: str) -> None:
    with pytest.raises(ValueError, match="install a CUDA build of torch") as err:
        resolve_device(spec)
    assert 'model.device = "cpu"' in str(err.value)
    assert repr(spec) in str(err.value)


def test_cuda_index_is_checked_against_the_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: pretend this process sees two GPUs (torch.device objects need no GPU to exist).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # Execute / Assert
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"sees 2 GPU\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
