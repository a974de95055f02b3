"""prepare_assets verifies every builtin asset; format_report renders them."""

from __future__ import annotations

from pathlib import Path

from fedtune.asset_report import AssetInfo, format_report, prepare_assets


def test_prepare_assets_covers_every_builtin(smollm_tokenizer: object) -> None:
    # smollm_tokenizer makes sure the conversion already happened (session fixture).
    infos = prepare_assets()
    by_name = {i.name: i for i in infos}
    assert {i.kind for i in infos} == {"causal-lm", "gguf", "encoder", "dataset"}
    assert {"smollm2-135m", "minilm-l6", "rotten-tomatoes", "chatterbot-qa"} <= set(by_name)
    assert all(i.path.exists() and i.size_bytes > 0 for i in infos)
    assert by_name["smollm2-135m"].size_bytes > 500e6  # fp32 safetensors
    assert "134.5M params" in by_name["smollm2-135m"].detail
    assert "12752 rows" in by_name["rotten-tomatoes"].detail
    assert "2188 rows" in by_name["chatterbot-qa"].detail


def test_format_report_is_a_table() -> None:
    infos = [
        AssetInfo("dataset", "a", Path("/x/a"), 2_500_000, "3 rows"),
        AssetInfo("encoder", "longer-name", Path("/x/b"), 1, "d"),
    ]
    text = format_report(infos)
    lines = text.splitlines()
    assert lines[0].split() == ["kind", "name", "size", "MB", "detail", "path"]
    assert set(lines[1]) <= {"-", " "}
    assert "2.5" in lines[2] and "/x/a" in lines[2]
    assert lines[2].index("/x/a") == lines[3].index("/x/b")  # columns aligned
