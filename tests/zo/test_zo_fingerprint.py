from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from transformers import LlamaForCausalLM

from fedtune.zo.fingerprint import Fingerprint, IncompatibleModelError, check_compatible, zo_check_report
from fedtune.zo.params import ParamSelection, select_parameters

ALL = ParamSelection()


def _fingerprint(model: LlamaForCausalLM, selection: ParamSelection = ALL, **kw: object) -> Fingerprint:
    args: dict[str, object] = {"kind": "rademacher", "run_seed": 1, **kw}
    return Fingerprint.of(select_parameters(model, selection), **args)  # type: ignore[arg-type]


def test_json_round_trip(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    fingerprint = _fingerprint(tiny_model())
    again = Fingerprint.from_json(fingerprint.to_json())
    assert again == fingerprint
    check_compatible(fingerprint, again)
    assert again.z_checksum(3) == fingerprint.z_checksum(3)
    with pytest.raises(ValueError, match="not a Fingerprint"):
        Fingerprint.from_json(json.dumps({"names": []}))


def test_shape_mismatch_names_the_tensor(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    local = _fingerprint(tiny_model())
    shapes = list(local.shapes)
    shapes[1] = (32, 64)
    remote = Fingerprint.from_json(json.dumps({**json.loads(local.to_json()), "shapes": shapes}))
    with pytest.raises(IncompatibleModelError, match=r"shape of model\.layers\.0\.self_attn\.q_proj\.weight"):
        check_compatible(local, remote)


def test_kind_and_seed_mismatch(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    model = tiny_model()
    local = _fingerprint(model)
    with pytest.raises(IncompatibleModelError, match="kind: 'rademacher' locally vs 'gaussian'") as info:
        check_compatible(local, _fingerprint(model, kind="gaussian", run_seed=2))
    assert "run_seed: 1 locally vs 2 remotely" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_selection_mismatch_lists_missing_tensors(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    model = tiny_model()
    local = _fingerprint(model)
    remote = _fingerprint(model, ParamSelection(mode="no-embeddings"))
    with pytest.raises(
        IncompatibleModelError, match=r"tuned only locally: \['model\.embed_tokens\.weight'\]"
    ):
        check_compatible(local, remote)


def test_order_mismatch(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    local = _fingerprint(tiny_model())
    raw = json.loads(local.to_json())
    raw["names"][1], raw["names"][2] = raw["names"][2], raw["names"][1]
    with pytest.raises(IncompatibleModelError, match="tensor order differs from position 1"):
        check_compatible(local, Fingerprint.from_json(json.dumps(raw)))


def test_zo_check_report_is_json_and_tracks_seed(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    model = tiny_model()
    report = zo_check_report(model, ParamSelection(), run_seed=4, kind="gaussian", seed_index=9)
    assert json.loads(json.dumps(report)) == report
    assert report["num_elements"] == sum(p.numel() for p in model.parameters())
    assert report["kind"] == "gaussian" and report["seed_index"] == 9
    again = zo_check_report(tiny_model(seed=5), ParamSelection(), run_seed=4, kind="gaussian", seed_index=9)
    assert again["z_checksum"] == report["z_checksum"]  # z depends on shapes, never on weight values
    other = zo_check_report(model, ParamSelection(), run_seed=4, kind="gaussian", seed_index=10)
    assert other["z_checksum"] != report["z_checksum"]
