"""Bad inputs, each refused the same way: exit code 2, exactly one `error: what (where) — fix` line naming the
file, key or row and how to fix it, no traceback, nothing half-written. Then SIGKILL during checkpoint writes:
the previous checkpoint stays usable and the resumed run ends exactly as an uninterrupted one.

Each case runs the real command: `ift train` in a subprocess (as users hit it), the other commands through
`ift.cli.main` in this process (the same code, without paying an interpreter start per case). Every case
snapshots its folder before and after: a refused command leaves no file behind and changes none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import yaml

from test_train import assert_same_weights, final_weights, toy_recipe

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------- the world the cases damage


class World:
    """A tiny toy task (train/validation/test .jsonl, one template) and a 4-step recipe on it."""

    def __init__(self, root: Path):
        self.root = root
        self.recipe = toy_recipe(root, max_steps=4, save_steps=2, eval_steps=4, logging_steps=2)
        raw = yaml.safe_load(self.recipe.read_text())
        raw["evaluation"] = {"metrics": ["loss"], "max_new_tokens": 4}  # loss only: quick evaluations
        self.recipe.write_text(yaml.safe_dump(raw))
        self.raw = raw
        self.data = root / "toy"
        self.templates = root / "templates"
        self.train_lines = self.data.joinpath("train.jsonl").read_text().splitlines(keepends=True)

    def recipe_with(self, tmp: Path, name: str, edit) -> Path:
        raw = json.loads(json.dumps(self.raw))
        edit(raw)
        path = tmp / name
        path.write_text(yaml.safe_dump(raw))
        return path

    def data_with(self, tmp: Path, train: bytes, name: str = "train.jsonl") -> Path:
        """A copy of the toy folder whose training file is `train`."""
        folder = tmp / "data"
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("validation", "test"):
            shutil.copy(self.data / f"{split}.jsonl", folder / f"{split}.jsonl")
        (folder / name).write_bytes(train)
        return folder

    def templates_with(self, tmp: Path, text: bytes) -> Path:
        folder = tmp / "templates"
        (folder / "toy").mkdir(parents=True, exist_ok=True)
        (folder / "toy" / "templates.yaml").write_bytes(text)
        return folder


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("bad_inputs"))


def _ift(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ift", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def base_run(w: World) -> Path:
    """The uninterrupted run: checkpoints at steps 2 and 4, final/. Cases copy it; fault tests compare to it."""
    proc = _ift("train", w.recipe)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return w.root / "run"


def copy_run(base: Path, tmp: Path, final: bool = False) -> Path:
    run = tmp / "run"
    shutil.copytree(base, run, ignore=None if final else shutil.ignore_patterns("final"))
    return run


# ---------------------------------------------------------------- the corpus

CASES = []


def case(name: str, *, sub: bool = False, needs_run: bool = False, marks=()):
    """Register a case: fn(w, tmp[, run]) -> (argv, strings the error line must hold)."""
    def register(fn):
        CASES.append(pytest.param(fn, sub, needs_run, id=name, marks=marks))
        return fn
    return register


def out(tmp: Path) -> str:
    return f"training.output_dir={tmp / 'run'}"


# -- recipes

@case("recipe-not-found", sub=True)
def _(w, tmp):
    return ["train", tmp / "nope.yaml"], [str(tmp / "nope.yaml"), "recipe file not found"]


@case("recipe-yaml-syntax", sub=True)
def _(w, tmp):
    (tmp / "r.yaml").write_text("model: {init: scratch\n  config: [\n")
    return ["train", tmp / "r.yaml", out(tmp)], [f"{tmp / 'r.yaml'}, line 2", "YAML syntax error"]


@case("recipe-empty")
def _(w, tmp):
    (tmp / "r.yaml").write_text("")
    return ["validate", tmp / "r.yaml"], [str(tmp / "r.yaml"), "empty"]


@case("recipe-not-a-mapping", sub=True)
def _(w, tmp):
    (tmp / "r.yaml").write_text("- model\n- data\n")
    return ["train", tmp / "r.yaml", out(tmp)], [str(tmp / "r.yaml"), "mapping"]


@case("recipe-wrong-encoding", sub=True)
def _(w, tmp):
    latin1 = "# caf\xe9\n  output_dir:".encode("latin-1")  # a comment in Latin-1, not UTF-8
    (tmp / "r.yaml").write_bytes(w.recipe.read_bytes().replace(b"output_dir:", latin1))
    return ["train", tmp / "r.yaml", out(tmp)], [str(tmp / "r.yaml"), "UTF-8"]


@case("recipe-unknown-key", sub=True)
def _(w, tmp):
    r = w.recipe_with(tmp, "r.yaml", lambda raw: raw["training"].update(lerning_rate=1e-3))
    return ["train", r, out(tmp)], ["training.lerning_rate", "did you mean 'learning_rate'"]


@case("recipe-wrong-type")
def _(w, tmp):
    r = w.recipe_with(tmp, "r.yaml", lambda raw: raw["training"].update(max_steps="many"))
    return ["validate", r], [f"{r}: training.max_steps", "'many'"]


@case("recipe-out-of-range", sub=True)
def _(w, tmp):
    r = w.recipe_with(tmp, "r.yaml", lambda raw: raw["training"].update(learning_rate=-1))
    return ["train", r, out(tmp)], ["training.learning_rate", "out of range"]


@case("recipe-invalid-choice")
def _(w, tmp):
    r = w.recipe_with(tmp, "r.yaml", lambda raw: raw["adapter"].update(method="lora2"))
    return ["validate", r], ["adapter.method", "'lora2'", "'qlora'"]


@case("recipe-secret", sub=True)
def _(w, tmp):
    r = w.recipe_with(tmp, "r.yaml", lambda raw: raw.update(hub={"token": "hf_not_a_real_token"}))
    return ["train", r, out(tmp)], ["hub.token", "HF_TOKEN"]


@case("override-wrong-type", sub=True)
def _(w, tmp):
    return ["train", w.recipe, out(tmp), "training.max_steps=abc"], ["training.max_steps", "'abc'"]


@case("override-without-equals", sub=True)
def _(w, tmp):
    return ["train", w.recipe, out(tmp), "stray"], ["'stray'", "key.path=value"]


@case("override-no-such-list-item", sub=True)
def _(w, tmp):
    return ["train", w.recipe, out(tmp), "data.sources.5.path=x"], ["'5'", "data.sources", "index from 0 to 0"]


@case("override-attention-unavailable", sub=True)
def _(w, tmp):
    return ["train", w.recipe, out(tmp), "model.attn_implementation=flash_attention_2"], \
        ["model.attn_implementation", "flash_attention_2", "flash-attn"]


# -- templates

@case("template-unknown-ref")
def _(w, tmp):
    return ["data", "stats", w.recipe, "data.sources.0.templates=[toy/nope]"], \
        ["data.sources.0.templates.0", "toy/nope", "word_class"]


@case("template-file-yaml-syntax")
def _(w, tmp):
    t = w.templates_with(tmp, b"dataset: toy\ntemplates:\n  - [\n")
    return ["validate", w.recipe, f"data.templates_dir=[{t}]"], \
        ["data.sources.0.templates.0", f"{t / 'toy' / 'templates.yaml'}:4", "YAML syntax error"]


@case("template-jinja-syntax", sub=True)
def _(w, tmp):
    text = (w.templates / "toy" / "templates.yaml").read_bytes().replace(b"{{word}}", b"{{ word ")
    t = w.templates_with(tmp, text)
    return ["train", w.recipe, out(tmp), f"data.templates_dir=[{t}]"], \
        [f"{t / 'toy' / 'templates.yaml'}:3", "Jinja syntax error"]


@case("template-file-wrong-encoding")
def _(w, tmp):
    text = (w.templates / "toy" / "templates.yaml").read_text().replace("Words:", "Wörds:").encode("latin-1")
    t = w.templates_with(tmp, text)
    return ["validate", w.recipe, f"data.templates_dir=[{t}]"], [str(t / "toy" / "templates.yaml"), "UTF-8"]


@case("template-without-jinja")
def _(w, tmp):
    text = b"".join(l for l in (w.templates / "toy" / "templates.yaml").read_bytes().splitlines(True)
                    if b"jinja:" not in l)
    t = w.templates_with(tmp, text)
    return ["templates", "validate", t, "--no-promptsource"], [f"{t / 'toy' / 'templates.yaml'}:3", "no jinja"]


@case("template-reads-a-missing-column")
def _(w, tmp):
    (tmp / "news.jsonl").write_text('{"headline": "Profit up", "label": 1}\n')
    return ["templates", "preview", "toy/word_class", "--data", tmp / "news.jsonl", "--templates-dir", w.templates,
            "--no-promptsource"], ["'word'", str(tmp / "news.jsonl"), "headline, label"]


@case("template-show-unknown")
def _(w, tmp):
    return ["templates", "show", "toy/word_clas", "--templates-dir", w.templates, "--no-promptsource"], \
        ["toy/word_clas", "toy/word_class"]


@case("template-new-broken-jinja")
def _(w, tmp):
    t = w.templates_with(tmp, (w.templates / "toy" / "templates.yaml").read_bytes())
    return ["templates", "new", "toy", "--name", "broken", "--jinja", "{{ word ||| x", "--templates-dir", t], \
        [str(t / "toy" / "templates.yaml"), "Jinja syntax error"]


# -- data files: the same file fails the same way in training, `ift data`, `ift validate` and `ift templates`

def preview(w: World, data: Path, *more: str) -> list:
    return ["templates", "preview", "toy/word_class", "--data", data, "--templates-dir", w.templates,
            "--no-promptsource", *more]


@case("data-empty-file-preview")  # was: IndexError from the preview's own loader
def _(w, tmp):
    (tmp / "empty.jsonl").write_text("")
    return preview(w, tmp / "empty.jsonl"), [f"data file {tmp / 'empty.jsonl'} is empty", "--data"]


@case("data-empty-file-train", sub=True)
def _(w, tmp):
    d = w.data_with(tmp, b"")
    return ["train", w.recipe, out(tmp), f"data.sources.0.path={d}"], \
        [f"data file {d / 'train.jsonl'} is empty", "data.sources.0.path"]


@case("data-empty-file-validate")
def _(w, tmp):
    d = w.data_with(tmp, b"")
    return ["validate", w.recipe, f"data.sources.0.path={d}"], \
        [f"data file {d / 'train.jsonl'} is empty", "data.sources.0.path"]


def truncated(w: World) -> bytes:
    return "".join(w.train_lines).encode() + b'{"word": "saw old big", "lab'


@case("data-truncated-line-train", sub=True)
def _(w, tmp):
    d = w.data_with(tmp, truncated(w))
    return ["train", w.recipe, out(tmp), f"data.sources.0.path={d}"], \
        [str(d / "train.jsonl"), f"line {len(w.train_lines) + 1} is not valid JSON", "truncated", "data.sources.0.path"]


@case("data-truncated-line-validate")  # was: ok (only the first lines were read)
def _(w, tmp):
    d = w.data_with(tmp, truncated(w))
    return ["validate", w.recipe, f"data.sources.0.path={d}"], \
        [str(d / "train.jsonl"), f"line {len(w.train_lines) + 1} is not valid JSON", "data.sources.0.path"]


@case("data-truncated-line-preview")
def _(w, tmp):
    d = w.data_with(tmp, truncated(w))
    return preview(w, d), [str(d / "train.jsonl"), f"line {len(w.train_lines) + 1} is not valid JSON", "--data"]


def latin1(w: World) -> bytes:
    return "".join(w.train_lines).encode() + '{"word": "café cat red", "label": 1}\n'.encode("latin-1")


@case("data-wrong-encoding-stats")  # was: UnicodeDecodeError traceback
def _(w, tmp):
    d = w.data_with(tmp, latin1(w))
    return ["data", "stats", w.recipe, f"data.sources.0.path={d}"], \
        [str(d / "train.jsonl"), f"not UTF-8 text (byte 0xe9 at line {len(w.train_lines) + 1}", "iconv"]


@case("data-wrong-encoding-preview")  # was: UnicodeDecodeError traceback
def _(w, tmp):
    d = w.data_with(tmp, latin1(w))
    return preview(w, d), [str(d / "train.jsonl"), f"byte 0xe9 at line {len(w.train_lines) + 1}", "--data"]


@case("data-utf16-train", sub=True)
def _(w, tmp):
    d = w.data_with(tmp, "".join(w.train_lines).encode("utf-16"))
    return ["train", w.recipe, out(tmp), f"data.sources.0.path={d}"], \
        [str(d / "train.jsonl"), "UTF-16", "iconv -f utf-16"]


def mixed_types(w: World) -> bytes:  # one row's text is a list: datasets loads the column as JSON
    return "".join(w.train_lines).encode() + b'{"word": ["saw", "old"], "label": 0}\n'


@case("data-column-of-wrong-type-train", sub=True)  # was: trained on the text "['saw', 'old']"
def _(w, tmp):
    d = w.data_with(tmp, mixed_types(w))
    return ["train", w.recipe, out(tmp), f"data.sources.0.path={d}"], \
        ["column 'word' mixes types", f"{d / 'train.jsonl'}, row {len(w.train_lines)}", "one type in every row"]


@case("data-column-of-wrong-type-templates-validate")  # was: ok
def _(w, tmp):
    d = w.data_with(tmp, mixed_types(w))
    return ["templates", "validate", w.templates, "--data", d, "--no-promptsource"], \
        ["column 'word' mixes types", f"{d / 'train.jsonl'}, row {len(w.train_lines)}"]


def huge(w: World) -> bytes:
    lines = list(w.train_lines)
    lines.insert(3, json.dumps({"word": "x" * 10_000_001, "label": 0}) + "\n")
    return "".join(lines).encode()


@case("data-huge-row-stats")  # was: blamed the template ("templates may not build huge strings")
def _(w, tmp):
    d = w.data_with(tmp, huge(w))
    return ["data", "stats", w.recipe, f"data.sources.0.path={d}"], \
        ["row 3 has a 10,000,001-character value in column 'word'", str(d / "train.jsonl"), "shorten or drop"]


@case("data-huge-row-validate")  # was: ok
def _(w, tmp):
    d = w.data_with(tmp, huge(w))
    return ["validate", w.recipe, f"data.sources.0.path={d}"], ["row 3", "column 'word'", str(d / "train.jsonl")]


@case("data-broken-csv-validate")  # was: ok (only the header was read)
def _(w, tmp):
    d = w.data_with(tmp, b'word,label\n"cat red big,1\n', name="train.csv")
    for split in ("validation", "test"):
        (d / f"{split}.jsonl").unlink()
    return ["validate", w.recipe, f"data.sources.0.path={d / 'train.csv'}"], \
        [str(d / "train.csv"), "as csv", "closed quotes"]


@case("data-corrupt-parquet")
def _(w, tmp):
    (tmp / "train.parquet").write_bytes(b"PAR1 cut short")
    return ["data", "stats", w.recipe, f"data.sources.0.path={tmp / 'train.parquet'}"], \
        [str(tmp / "train.parquet"), "as parquet", "write it again"]


@case("data-folder-without-data-files")
def _(w, tmp):
    (tmp / "d").mkdir()
    (tmp / "d" / "notes.md").write_text("no rows here")
    return ["validate", w.recipe, f"data.sources.0.path={tmp / 'd'}"], [str(tmp / "d"), "notes.md"]


@case("data-missing-file-preview")
def _(w, tmp):
    return preview(w, tmp / "missing.jsonl"), [str(tmp / "missing.jsonl"), "not found", "--data"]


# -- checkpoints (a copy of the finished 4-step run, final/ removed: as if it had died after step 4)

@case("checkpoint-resume-not-a-checkpoint", sub=True, needs_run=True)
def _(w, tmp, run):
    (tmp / "elsewhere").mkdir()
    return ["train", w.recipe, out(tmp), "--resume", tmp / "elsewhere"], \
        [str(tmp / "elsewhere"), "training.resume", "not a complete ift checkpoint"]


@case("checkpoint-truncated-weights", sub=True, needs_run=True)
def _(w, tmp, run):
    weights = run / "checkpoints" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["train", w.recipe, out(tmp), "--resume", run / "checkpoints" / "step-4"], \
        [str(run / "checkpoints" / "step-4"), "model.safetensors has 100 bytes", "older checkpoint"]


@case("checkpoint-missing-file", sub=True, needs_run=True)
def _(w, tmp, run):
    (run / "checkpoints" / "step-4" / "optimizer.bin").unlink()
    return ["train", w.recipe, out(tmp), "--resume", run / "checkpoints" / "step-4"], \
        [str(run / "checkpoints" / "step-4"), "optimizer.bin is missing"]


@case("checkpoint-every-one-damaged", sub=True, needs_run=True)
def _(w, tmp, run):
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text("{}")
    return ["train", w.recipe, out(tmp), "--resume"], [str(run / "checkpoints"), "is complete", "--resume"]


@case("checkpoint-from-another-model", sub=True, needs_run=True)
def _(w, tmp, run):
    return ["train", w.recipe, out(tmp), "model.config.hidden_size=64", "--resume"], \
        [str(run / "checkpoints" / "step-4"), "does not load", "move it away"]


@case("run-folder-already-finished", sub=True, needs_run=True)
def _(w, tmp, run):
    shutil.copytree(w.root / "run" / "final", run / "final")
    return ["train", w.recipe, out(tmp)], [str(run), "already holds a run", "training.output_dir", "--resume"]


# -- command-line arguments

@case("cli-unknown-command")
def _(w, tmp):
    return ["trian", w.recipe], ["'trian'", "(ift)", "ift --help"]


@case("cli-recipe-missing", sub=True)
def _(w, tmp):
    return ["train"], ["required: recipe (ift train)", "ift train --help"]


@case("cli-unknown-flag", sub=True)
def _(w, tmp):
    return ["train", w.recipe, out(tmp), "--bogus"], ["--bogus", "(ift train)"]


@case("cli-not-an-integer")
def _(w, tmp):
    return preview(w, w.data, "--n", "five"), ["--n", "'five'", "(ift templates preview)"]


@case("cli-invalid-choice")
def _(w, tmp):
    return ["data", "preview", w.recipe, "--split", "dev"], ["--split", "'dev'", "(ift data preview)"]


@case("cli-bad-memory-size")
def _(w, tmp):
    return ["estimate", w.recipe, "--gpu-memory", "lots"], ["'lots'", "--gpu-memory", "24GB"]


@case("cli-eval-no-such-run")
def _(w, tmp):
    return ["eval", tmp / "no-run"], [str(tmp / "no-run"), "check the path"]


# ---------------------------------------------------------------- the checks


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under the folder with its checksum (empty folders are not output)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_command(argv: list, sub: bool, capsys) -> tuple[int, str, str]:
    argv = [str(a) for a in argv]
    if sub:
        proc = _ift(*argv)
        return proc.returncode, proc.stdout, proc.stderr
    from ift.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - what a user would see as a traceback
        code = None
        print(traceback.format_exc(), file=sys.stderr)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code, stdout: str, stderr: str, expected: list[str]) -> str:
    assert "Traceback" not in stdout + stderr, (stdout + stderr)[-4000:]
    assert code == 2, (code, (stdout + stderr)[-3000:])
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    line = lines[0]
    what, dash, fix = line.partition(" — ")
    assert dash and fix.strip() and what.strip() != "error:", line  # what, then the fix after ' — '
    for text in expected:
        assert text in line, (text, line)
    return line


@pytest.mark.parametrize(("make", "sub", "needs_run"), CASES)
def test_bad_input_is_refused_with_one_error_line(make, sub, needs_run, w, tmp_path, capsys, request):
    args = (w, tmp_path)
    if needs_run:
        args += (copy_run(request.getfixturevalue("base_run"), tmp_path),)
    argv, expected = make(*args)
    before = snapshot(tmp_path)
    code, stdout, stderr = run_command(argv, sub, capsys)
    assert_refused(code, stdout, stderr, expected)
    assert snapshot(tmp_path) == before  # nothing half-written, nothing changed


def test_the_corpus_covers_every_kind_of_bad_input():
    names = [p.id for p in CASES]
    assert len(names) >= 30 and len(set(names)) == len(names)
    for kind in ("recipe-", "override-", "template-", "data-", "checkpoint-", "cli-"):
        assert any(n.startswith(kind) for n in names), kind
    for kind in ("empty", "truncated", "encoding", "wrong-type", "huge", "missing-file", "another-model"):
        assert any(kind in n for n in names), kind


# ---------------------------------------------------------------- faults: SIGKILL while a checkpoint is written

LAUNCHER = '''
"""ift/train.py, killed (SIGKILL) during the N-th checkpoint write of this process, at one of two points."""
import os, signal, sys

sys.path.insert(0, {repo!r})
where, nth = sys.argv[1], int(sys.argv[2])
seen = {{"n": 0}}


def maybe_die():
    seen["n"] += 1
    if seen["n"] == nth:
        os.kill(os.getpid(), signal.SIGKILL)


if where == "between-files":  # inside Accelerate's save: the weights written, the optimizer state not yet
    import accelerate.checkpointing as checkpointing

    real_save = checkpointing.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.bin"):
            maybe_die()
        return real_save(obj, f, *args, **kwargs)

    checkpointing.save = save
else:  # every file written, the manifest (written last) not yet
    from ift.run import RunDir

    real_manifest = RunDir.write_manifest

    def write_manifest(self, folder):
        maybe_die()
        return real_manifest(self, folder)

    RunDir.write_manifest = write_manifest

from ift.train import main

sys.exit(main(sys.argv[3:]))
'''


def _killed(tmp: Path, where: str, nth: int, *args) -> subprocess.CompletedProcess:
    launcher = tmp / "launch.py"
    launcher.write_text(LAUNCHER.format(repo=str(REPO)))
    return subprocess.run([sys.executable, str(launcher), where, str(nth), *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


def steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_sigkill_during_checkpoint_writes_keeps_the_previous_one_and_resume_is_exact(w, base_run, tmp_path):
    run, where = tmp_path / "run", f"training.output_dir={tmp_path / 'run'}"
    # 1. killed inside the second checkpoint's save, between two of its files
    proc = _killed(tmp_path, "between-files", 2, w.recipe, where)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    assert steps(run) == ["step-2", "step-4.tmp"] and not (run / "final").exists()
    # 2. resumed from step 2, and killed again once step 4's files are all written but not its manifest
    proc = _killed(tmp_path, "manifest", 1, w.recipe, where, "--resume")
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-2'} at step 2" in proc.stdout
    assert steps(run) == ["step-2", "step-4.tmp"] and not (run / "final").exists()
    # 3. resumed again: the run ends exactly as the uninterrupted one
    proc = _ift("train", w.recipe, where, "--resume")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-2'} at step 2" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert_same_weights(final_weights(base_run), final_weights(run))
    assert steps(run) == ["step-2", "step-4"] and not (run / "run.lock").exists()


def test_sigkill_during_the_first_checkpoint_write_then_resume_starts_over_exactly(w, base_run, tmp_path):
    run, where = tmp_path / "run", f"training.output_dir={tmp_path / 'run'}"
    proc = _killed(tmp_path, "between-files", 1, w.recipe, where)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    assert steps(run) == ["step-2.tmp"]
    proc = _ift("train", w.recipe, where, "--resume")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert_same_weights(final_weights(base_run), final_weights(run))
