from __future__ import annotations

from pathlib import Path

import pytest

from tests.stats import tiny


@pytest.fixture(scope="session")
def llama_pair() -> tuple[Path, list[Path]]:
    return tiny.cached_family("llama")


@pytest.fixture(scope="session")
def bert_pair() -> tuple[Path, list[Path]]:
    return tiny.cached_family("bert")


@pytest.fixture()
def data_file(tmp_path) -> Path:
    path = tmp_path / "data.txt"
    path.write_text("\n".join(tiny.texts(12)) + "\n")
    return path
