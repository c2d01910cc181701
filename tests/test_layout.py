"""The tree shows the pipeline: each folder of ift/ is one stage and imports only the stages before it
(docs/architecture.md draws the same order). The library never imports the CLI."""

import ast
import re
import subprocess
from pathlib import Path

IFT = Path(__file__).resolve().parents[1] / "ift"

# A stage may import itself and any stage with a lower rank; the CLI and the training entry point sit on top.
RANKS = {
    "errors": 0, "atomic": 0, "metrics": 0, "locations": 0, "arguments": 0, "recipe": 1, "run": 1,
    "templates": 2, "data": 3, "modeling": 4, "estimate": 5, "evaluation": 5,
    "inference": 6, "training": 6, "publish": 7, "train": 8, "studio": 8, "cli": 9, "__main__": 10, "__init__": 0,
}


def _stage(module: str) -> str:
    """`ift.data.splits` -> data; `ift.train` -> train."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _module_name(path: Path) -> str:
    parts = path.relative_to(IFT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "ift":  # `from ift import atomic`
                found |= {f"ift.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "ift" or m.startswith("ift.")}


def _modules() -> list[Path]:
    return sorted(p for p in IFT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_belongs_to_a_known_stage():
    unknown = {_stage(_module_name(p)) for p in _modules()} - set(RANKS)
    assert not unknown, f"add the new folders {unknown} to RANKS and to docs/architecture.md"


def test_stages_import_only_earlier_stages():
    wrong = []
    for path in _modules():
        here = _stage(_module_name(path))
        for target in _imports(path):
            there = _stage(target) if target != "ift" else "__init__"
            if there != here and RANKS.get(there, 99) >= RANKS[here]:
                wrong.append(f"{path.relative_to(IFT.parent)} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_the_library_never_imports_the_cli():
    wrong = [str(p.relative_to(IFT.parent)) for p in _modules()
             if _stage(_module_name(p)) not in ("cli", "__main__") and any(_stage(t) == "cli" for t in _imports(p))]
    assert not wrong


def test_the_layout_test_sees_a_violation(tmp_path, monkeypatch):
    """The check itself bites: a data module importing training (and the CLI) is reported."""
    bad = tmp_path / "ift" / "data" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from ift.training.loss import CompletionLoss\nimport ift.cli\n")
    monkeypatch.setitem(globals(), "IFT", tmp_path / "ift")
    try:
        test_stages_import_only_earlier_stages()
    except AssertionError as err:
        assert "ift/data/bad.py (data) imports ift.training.loss (training)" in str(err)
        assert "ift/data/bad.py (data) imports ift.cli (cli)" in str(err)
    else:
        raise AssertionError("the violation was not reported")


# The project speaks of itself alone: no work-round labels or tracker numbers in what it ships. The two words are
# joined at run time so that this file does not match its own pattern.
_HISTORY_LABEL = re.compile("sess" + r"ion [0-9]|" + "iss" + r"ue #?[0-9]+", re.IGNORECASE)
_SHIPPED = ("README.md", "docs", "ift", "tests", "bench", "recipes")


def _shipped_files(root: Path) -> list[Path]:
    """Tracked and new (not ignored) files under _SHIPPED; outside a git checkout, every file under them."""
    files = None
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                                  *_SHIPPED], cwd=root, capture_output=True, check=True).stdout.decode()
            files = [root / rel for rel in out.split("\0") if rel]
        except (OSError, subprocess.CalledProcessError):  # no git program: walk the folders instead
            pass
    if files is None:
        files = [p for top in _SHIPPED for p in ([root / top] if (root / top).is_file() else (root / top).rglob("*"))]
    return sorted({p for p in files if p.is_file() and "__pycache__" not in p.parts})


def _history_labels(files: list[Path], root: Path) -> list[str]:
    hits = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data:  # binary (plots, weights)
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if _HISTORY_LABEL.search(line):
                hits.append(f"{path.relative_to(root)}:{number}: {line.strip()[:100]}")
    return hits


def test_no_work_round_labels_or_tracker_numbers():
    """README, docs, code, tests, bench and recipes say what the code does and what was measured (with its date
    and host), not which work round or tracker entry it came from."""
    root = IFT.parent
    hits = _history_labels(_shipped_files(root), root)
    assert not hits, "say it in the code's own terms (or date the measurement):\n" + "\n".join(hits)


def test_the_label_check_sees_a_label(tmp_path):
    """The check itself bites, in a folder that is not a git checkout."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("fine\nmeasured in " + "Sess" + "ion 12\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "b.py").write_text("# see " + "iss" + "ue #15\n")
    (tmp_path / "bench" / "plot.png").write_bytes(b"\0" + ("iss" + "ue 3").encode())
    hits = _history_labels(_shipped_files(tmp_path), tmp_path)
    assert [h.split(": ")[0] for h in hits] == ["bench/b.py:1", "docs/page.md:2"]


def _private_imports(root: Path) -> list[str]:
    """`from ift.x import _name` and `module._name` (module an imported ift module) in the library: a module's
    underscored names are its insides, and another module reaching for one has found an interface not yet named."""
    found = []
    for path in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ift") and node.level == 0:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno} imports {node.module}.{a.name}")
                    aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name.startswith("ift.") and a.asname}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    assert not _private_imports(IFT), "make the name public where it is defined:\n" + "\n".join(_private_imports(IFT))


def test_the_private_name_check_sees_one(tmp_path):
    pkg = tmp_path / "ift" / "data"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from ift.data.b import _inner, outer\nimport ift.data.c as c\nc._hidden()\n")
    assert _private_imports(tmp_path / "ift") == ["ift/data/a.py:1 imports ift.data.b._inner",
                                                  "ift/data/a.py:3 uses c._hidden"]


def _import_cycles(root: Path) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (imports inside functions and under
    TYPE_CHECKING count too: each hides a dependency the reader must hold in mind)."""
    modules = {_module_name(p): p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        # a package's __init__ is not a dependency of its own modules (Python runs it first, it holds only a docstring)
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    cycles, done = [], set()
    for start in graph:  # every module from which a path leads back to itself, grouped with the loop's others
        if start in done or start not in _reachable(graph, start):
            continue
        group = sorted(m for m in _reachable(graph, start) if start in _reachable(graph, m))
        done |= set(group)
        cycles.append(group)
    return cycles


def _reachable(graph: dict, start: str) -> set:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_no_import_cycles_between_files():
    assert not _import_cycles(IFT)


def test_the_cycle_check_sees_one(tmp_path, monkeypatch):
    pkg = tmp_path / "ift" / "data"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from ift.data.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from ift.data.a import y\n")
    (pkg / "c.py").write_text("from ift.data.a import z\n")
    monkeypatch.setitem(globals(), "IFT", tmp_path / "ift")
    assert _import_cycles(tmp_path / "ift") == [["ift.data.a", "ift.data.b"]]
