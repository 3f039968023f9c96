"""The command on the PATH: `hptune` and its subcommands, their --help, --version, `hptune show`
on finished, interrupted and running experiments, and the layout rules the code keeps."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuning.commands.main import COMMANDS
from tuning.commands.main import main as hptune

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "results" / "example"


def hptune_bin() -> str:
    """The installed console script (pip install -e . puts it beside the interpreter)."""
    path = Path(sys.executable).parent / "hptune"
    return str(path) if path.exists() else shutil.which("hptune") or ""


def test_hptune_is_on_the_path_and_lists_its_commands():
    command = hptune_bin()
    assert command, "pip install -e . should have put hptune beside the interpreter"
    run = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and all(name in run.stdout for name in COMMANDS)
    version = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("hptune ")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help_with_readable_metavars(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hptune([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: hptune {name}")
    # every flag has a description, and no placeholder is argparse's upper-cased dest
    flags = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert all(f.rstrip(",").upper() != f.rstrip(",") for f in flags)
    assert "REDUCTION_FACTOR" not in text and "CPUS_PER_TRIAL" not in text


def test_an_unknown_command_is_one_line_and_exit_2(capsys):
    assert hptune(["serach"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'serach'" in err


def test_show_prints_the_summary_of_a_finished_experiment(capsys):
    import pandas as pd

    winner = int(pd.read_csv(EXAMPLE / "trials.csv").query("rank == 1")["number"].iloc[0])
    assert hptune(["show", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "Search example (finished): 20 of 20 trials" in out and f"Best      trial {winner:>2}" in out
    assert hptune(["show", str(EXAMPLE), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "finished" and summary["best"]["number"] == winner and summary["trials"] == 20


def test_show_tells_an_interrupted_and_a_running_experiment(tmp_path, capsys):
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("report", "ray"))
    meta = json.loads((folder / "experiment.json").read_text())
    records = [json.loads(line) for line in (folder / "journal.jsonl").read_text().splitlines()]
    last = [r for r in records if r["event"] == "trial"][-1]["trial"]
    cut = next(i for i, r in enumerate(records) if r["event"] == "epoch" and r["trial"] == last)
    # the journal as it was when the last trial had trained one epoch: it never ended
    (folder / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[: cut + 1]))
    for status, word in (("interrupted", "interrupted"), ("running", "running")):
        (folder / "experiment.json").write_text(json.dumps({**meta, "status": status}))
        assert hptune(["show", str(folder)]) == 0
        out = capsys.readouterr().out
        assert f"Search example ({status}): 20 of 20 trials" in out and f" {word})" in out
        if status == "running":
            assert "Running   trial" in out
        assert hptune(["show", str(folder), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["counts"][word] >= 1  # the last trial, and any beside it


def test_show_of_a_folder_that_is_not_an_experiment_is_one_line_exit_2(tmp_path, capsys):
    assert hptune(["show", str(tmp_path)]) == 2
    assert "not an experiment folder" in capsys.readouterr().err


# --- the layout's rules ---------------------------------------------------------------------------


def imports_of(path: Path) -> set[str]:
    """The modules `path` imports, those inside functions and `if __name__ == "__main__":` included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_trainable_imports_neither_ray_nor_tuning():
    """trainable/ is the library of one configuration; its one door to the commands in
    tuning/commands/ is `python -m trainable` (__main__.py)."""
    for path in (REPO / "trainable").glob("*.py"):
        if path.name == "__main__.py":
            continue
        bad = {m for m in imports_of(path) if m.split(".")[0] in ("ray", "tuning")}
        assert not bad, f"{path.name} imports {bad}"


def test_nothing_outside_the_commands_imports_a_command():
    """The commands sit on top: only the two delegating entry points (python -m trainable and
    python tuning/search.py) and hptune's own modules import from tuning/commands/."""
    doors = {REPO / "trainable" / "__main__.py", REPO / "tuning" / "search.py"}
    commands = REPO / "tuning" / "commands"
    found = {}
    for folder in ("trainable", "tuning", "hptune"):
        for path in (REPO / folder).rglob("*.py"):
            if commands in path.parents or path in doors:
                continue
            bad = {m for m in imports_of(path) if m.startswith("tuning.commands")}
            if bad:
                found[str(path.relative_to(REPO))] = bad
    assert not found, f"imports of a command module outside tuning/commands/: {found}"


@pytest.mark.parametrize(("old", "new"), [("trainable.bench", "hptune bench"),
                                          ("trainable.arrays_bench", "hptune bench-arrays"),
                                          ("trainable.explain", "hptune explain")])
def test_a_retired_entry_point_names_its_command(old, new):
    run = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"python -m {old}: this is now `{new}` (same flags; {new} --help)\n"


PARSER_CALLS = {"ArgumentParser", "OneLineParser", "add_argument", "add_argument_group",
                "add_mutually_exclusive_group", "add_subparsers"}


def parsers_in(path: Path) -> list[str]:
    """Where `path` imports argparse, builds a parser or declares a flag: `line: what`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
            found.append(f"{node.lineno}: import argparse")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
            found.append(f"{node.lineno}: from argparse import")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in PARSER_CALLS:
                found.append(f"{node.lineno}: {name}(...)")
    return found


def test_argparse_stops_at_the_commands():
    """Every command line is read in tuning/commands/; trainable/, the rest of tuning/ and hptune/
    take typed settings and never import argparse, build a parser or declare a flag."""
    commands = REPO / "tuning" / "commands"
    found = {}
    for folder in ("trainable", "tuning", "hptune"):
        for path in (REPO / folder).rglob("*.py"):
            if commands not in path.parents and parsers_in(path):
                found[str(path.relative_to(REPO))] = parsers_in(path)
    assert not found, f"command-line parsing outside tuning/commands/: {found}"


def test_no_import_circle_in_tuning():
    """Imports between tuning's modules form no cycle, those inside functions included: an import
    taken on use is still a dependency, and a circle through one is still a circle."""
    graph: dict[str, set[str]] = {}
    for path in (REPO / "tuning").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuning"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("tuning"))
        graph[module] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    seen: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in graph[node]:
            assert seen.get(nxt) != 1, "import circle: " + " -> ".join([*path, node, nxt])
            if nxt not in seen:
                visit(nxt, [*path, node])
        seen[node] = 2

    for module in graph:
        if module not in seen:
            visit(module, [])


def test_no_module_edits_sys_path():
    for folder in ("trainable", "tuning", "hptune"):
        for path in (REPO / folder).rglob("*.py"):
            assert "sys.path" not in path.read_text(), path
