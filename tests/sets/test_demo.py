"""The README's main job: ``convergent demo`` shows identical bytes on every replica."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convergent.cli.app import app


def test_demo(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    result = CliRunner().invoke(app, ["demo", "--dir", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    assert summary["identical"] and summary["identical_after_remove"]
    assert len({r["model_sha256"] for r in summary["replicas"]}) == 1
    assert len(summary["after_remove"]) == 4
    assert summary["replicas"][0]["root"] != summary["after_remove"][0]["root"]
    assert summary["forward_logits_shape"] == [1, 5, 512]
