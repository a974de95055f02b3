"""fedtune/_proto must be exactly what scripts/gen_proto.py produces from proto/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_proto.py"


def _check(repo_root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--repo-root", str(repo_root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """proto/ and fedtune/_proto copied to a scratch root, so drift can be provoked safely."""
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    shutil.copytree(
        REPO / "fedtune" / "_proto",
        tmp_path / "fedtune" / "_proto",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return tmp_path


def test_committed_generated_code_matches_proto() -> None:
    result = _check(REPO)
    assert result.returncode == 0, f"run `python scripts/gen_proto.py`:\n{result.stderr}"
    assert "matches" in result.stdout


def test_check_passes_on_faithful_copy(repo_copy: Path) -> None:
    assert _check(repo_copy).returncode == 0


def test_check_fails_when_a_field_is_added(repo_copy: Path) -> None:
    proto = repo_copy / "proto" / "fedtune" / "v1" / "fedkseed.proto"
    text = proto.read_text()
    edited = text.replace("  string fingerprint = 11;", "  string fingerprint = 11;\n  uint32 extra = 99;")
    assert edited != text, "fixture edit did not apply; update the anchor string"
    proto.write_text(edited)

    result = _check(repo_copy)

    assert result.returncode == 1
    assert "differs: v1/fedkseed_pb2.py" in result.stderr
    assert "gen_proto.py" in result.stderr  # the fix is named


def test_check_fails_on_missing_and_stale_files(repo_copy: Path) -> None:
    generated = repo_copy / "fedtune" / "_proto" / "v1"
    (generated / "split_pb2.pyi").unlink()
    (generated / "old_pb2.py").write_text("# left over from a deleted .proto\n")

    result = _check(repo_copy)

    assert result.returncode == 1
    assert "missing from fedtune/_proto: v1/split_pb2.pyi" in result.stderr
    assert "stale file in fedtune/_proto (no .proto produces it): v1/old_pb2.py" in result.stderr
