"""Bad inputs give clear convergent errors; the stats command writes a usable file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from convergent.cli.app import app
from convergent.errors import CheckpointError, ConvergentError, OutputError
from convergent.stats import DataError, StatisticsError, compute_fisher, compute_statistics, load_texts
from tests.stats import tiny


def test_missing_and_empty_data(llama_pair, tmp_path):
    model = llama_pair[1][0]
    with pytest.raises(DataError, match="not found"):
        compute_statistics(model, tmp_path / "nope.txt", "fisher")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="has no examples"):
        load_texts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1"}\n{"label": 2}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no string 'text'"):
        load_texts(bad)
    with pytest.raises(StatisticsError, match="unknown statistics kind"):
        compute_statistics(model, tmp_path / "nope.txt", "hessian")


def test_fisher_needs_a_head_and_long_enough_examples(llama_pair, tmp_path):
    from transformers import BertConfig, BertModel

    bare = tiny.save(BertModel(BertConfig(**{**tiny.config("bert").to_dict(), "architectures": None})), tmp_path / "b")
    with pytest.raises(StatisticsError, match="no output head"):
        compute_fisher(bare, ["w1 w2"])
    with pytest.raises(DataError, match="at least 2 tokens"):
        compute_fisher(llama_pair[1][0], ["w1", "w2"])


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        compute_fisher(tmp_path, ["w1 w2"])


def test_cli_stats_writes_file_and_refuses_overwrite(llama_pair, data_file, tmp_path):
    out = tmp_path / "f.safetensors"
    args = ["stats", str(llama_pair[1][1]), "--data", str(data_file), "--kind", "fisher", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--max-samples", "3", "--max-length", "8", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples"] == 3 and summary["metadata"]["kind"] == "fisher" and out.exists()
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, OutputError)
    missing = CliRunner().invoke(app, ["stats", str(llama_pair[1][1]), "--data", "nope.txt", "--kind", "gram"])
    assert isinstance(missing.exception, ConvergentError) and "nope.txt not found" in missing.exception.message
