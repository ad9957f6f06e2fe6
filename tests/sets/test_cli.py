"""The merge-set commands, driven as a script would: --store and --json everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convergent.cli.app import app
from convergent.errors import ConvergentError

runner = CliRunner()


def run(*args: str, ok: bool = True) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    if not ok:
        assert result.exit_code != 0
        return {"exception": result.exception}
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout) if "--json" in args else {"output": result.stdout}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    from tests.sets.util import save_family

    return save_family(tmp_path_factory.mktemp("models"), 3)


def test_cli_walkthrough(tmp_path: Path, family: tuple[Path, list[Path]]) -> None:
    base, fts = family
    a, b = tmp_path / "a", tmp_path / "b"
    created = run(
        "create",
        "demo",
        "--strategy",
        "ties",
        "--base",
        base,
        "--param",
        "density=0.5",
        "--dtype",
        "bfloat16",
        "--store",
        a,
        "--json",
    )
    set_id = created["set_id"]
    assert created["params"] == {"density": 0.5}
    key = run("keygen", tmp_path / "me.key", "--json")
    c1 = run("add", "demo", fts[0], "--weight", "2", "--meta", "who=alice", "--store", a, "--json")
    c2 = run("add", set_id[:10], fts[1], "--key", tmp_path / "me.key", "--param", "density=0.7", "--store", a, "--json")
    assert c2["signer"] == key["public_key"]
    status = run("status", "demo", "--store", a, "--json")
    assert [c["id"] for c in status["live"]] == sorted([c1["contribution"], c2["contribution"]])
    assert status["root"] == c2["root"] and all(c["bytes"] > 0 for c in status["live"])
    listing = run("status", "--store", a, "--json")
    assert listing["sets"][0]["id"] == set_id and listing["sets"][0]["live"] == 2
    exported = run("export", "demo", tmp_path / "full.tar", "--store", a, "--json")
    assert exported["root"] == status["root"]
    imported = run("import", tmp_path / "full.tar", "--store", b, "--json")
    assert imported["learnt_set"] and imported["root_after"] == status["root"]
    # b adds the third fine-tune; a removes the first; each ships a delta
    c3 = run("add", "demo", fts[2], "--store", b, "--json")
    run("export", "demo", tmp_path / "b-delta.tar", "--since", status["root"], "--store", b, "--json")
    removed = run("remove", "demo", c1["contribution"][:12], "--store", a, "--json")
    assert removed["tombstones"] == 1
    run("export", "demo", tmp_path / "a-delta.tar", "--since", status["root"], "--store", a, "--json")
    run("import", tmp_path / "b-delta.tar", "--store", a, "--json")
    run("import", tmp_path / "a-delta.tar", "--store", b, "--json")
    sa = run("status", "demo", "--store", a, "--json")
    sb = run("status", "demo", "--store", b, "--json")
    assert sa["root"] == sb["root"]
    assert {c["id"] for c in sa["live"]} == {c2["contribution"], c3["contribution"]}
    ra = run("resolve", "demo", tmp_path / "out-a", "--threads", "1", "--store", a, "--json")
    rb = run("resolve", "demo", tmp_path / "out-b", "--threads", "3", "--store", b, "--json")
    assert ra["files"] == rb["files"] and ra["digest"] == rb["digest"] and ra["root"] == sa["root"]
    assert run("resolve", "demo", tmp_path / "out-a", "--store", a, "--json")["cached"]
    log = run("log", "demo", "--store", a, "--json")["log"]
    assert [e["op"] for e in log] == ["create", "add", "add", "remove", "join"]
    assert run("fsck", "--store", a, "--json")["ok"]
    human = run("status", "demo", "--store", a)["output"]
    assert sa["root"] in human
    assert "model.safetensors" in run("resolve", "demo", tmp_path / "out-a", "--store", a)["output"]


def test_cli_recipe_and_errors(tmp_path: Path, family: tuple[Path, list[Path]]) -> None:
    base, fts = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {base}\nparameters:\n  density: 0.5\ndtype: bfloat16\nmodels:\n"
        f"  - model: {base}\n  - model: {fts[0]}\n    parameters:\n      weight: 0.7\n"
        f"  - model: {fts[1]}\n"
    )
    made = run("create", "fromrecipe", "--recipe", recipe, "--store", tmp_path / "s", "--json")
    assert len(made["contributions"]) == 2 and made["params"] == {"density": 0.5}
    status = run("status", "fromrecipe", "--store", tmp_path / "s", "--json")
    assert sorted(c["weight"] for c in status["live"]) == [0.7, 1.0]
    for args in (
        ("status", "nope", "--store", tmp_path / "s"),
        ("status", "x", "--store", tmp_path / "empty"),
        ("create", "x", "--base", base, "--store", tmp_path / "s"),
        ("create", "x", "--strategy", "ties", "--base", base, "--param", "density", "--store", tmp_path / "s"),
        ("remove", "fromrecipe", "deadbeef", "--store", tmp_path / "s"),
        ("create", "sig", "--strategy", "linear", "--base", base, "--require-signed", "--store", tmp_path / "s"),
        ("import", tmp_path / "missing.tar", "--store", tmp_path / "s"),
    ):
        res = run(*args, ok=False)
        assert isinstance(res["exception"], ConvergentError), (args, res)
    assert not (tmp_path / "empty").exists()
    bad = run("fsck", "--store", tmp_path / "s", "--json")
    assert bad["ok"]
