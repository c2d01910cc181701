"""What fine-tuning cost elsewhere: lm-evaluation-harness tasks on the base and the fine-tuned model.

`evaluation.benchmarks` lists lm-eval task names (`hellaswag`, `arc_easy`) or task YAML files (local data: a task
whose `dataset_path: json` reads local files). Both models run through lm-eval's own API (`simple_evaluate` on an
`HFLM` wrapping the in-memory model and ift's tokenizer), with the same tasks, shots, limit, batch size and seeds, so
the figures are the harness's own; the difference and each side's standard error (the harness's) are recorded in
metrics.json under `benchmarks`:

    {"settings": {tasks, num_fewshot, limit, batch_size, lm_eval},
     "tasks": {task: {"n": rows, "metrics": {metric: {"base", "base_stderr", "fine-tuned", "fine-tuned_stderr",
                                                      "delta", "higher_is_better"}}}}}

A metric of a filtered task is named `<metric>,<filter>` (e.g. `exact_match,strict-match`), as lm-eval names it.
lm-eval is an optional extra: `pip install 'ift[benchmarks]'`.

Relative paths in a task file (`dataset_kwargs.data_files` and `data_dir` of a local-files task such as
`dataset_path: json`, or a `dataset_path` folder) are read against the folder of the YAML file that states them,
whatever the working directory: lm-eval hands them to `datasets.load_dataset`, which would read them against the
working directory. Such a task runs from a stand-in YAML that includes the file and states those paths absolute.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from ift.errors import IftError

MODELS = ("base", "fine-tuned")
# `datasets` builders that read the files `data_files` names (a relative path there is a local file, not a file
# inside a Hub dataset)
FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "xml", "webdataset", "imagefolder",
                           "audiofolder", "videofolder"})


def is_task_file(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


def run_tasks(model, tokenizer, entries: Sequence[str], *, kind: str = "causal", batch_size: int = 16,
              limit: int | None = None, num_fewshot: int | None = None) -> dict[str, dict]:
    """{task: {"n": rows, "metrics": {metric: {"value", "stderr", "higher_is_better"}}}} of one model."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise IftError("evaluation.benchmarks needs lm-evaluation-harness, which is not installed",
                       "evaluation.benchmarks", "pip install 'ift[benchmarks]' (or pip install lm-eval)") from None
    files = [e for e in entries if is_task_file(e)]
    for entry in files:
        if not Path(entry).is_file():
            raise IftError(f"the task file {entry!r} does not exist", "evaluation.benchmarks",
                           "give an lm-eval task name or an existing task YAML file")
    include = sorted({str(Path(e).resolve().parent) for e in files}) or None
    manager = TaskManager(include_path=include, include_defaults=len(files) < len(entries))
    was_training = model.training  # HFLM puts the model in eval mode; it is put back below
    try:
        with tempfile.TemporaryDirectory(prefix="ift-tasks-") as stand_ins:
            tasks = [str(with_local_paths(Path(e), Path(stand_ins) / str(k))) if is_task_file(e) else e
                     for k, e in enumerate(entries)]
            # lm-eval pads with the tokenizer and may set its pad token: a copy keeps ift's own as it is
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                      backend="seq2seq" if kind == "seq2seq" else "causal")
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot,
                                              limit=limit, log_samples=False)
    except KeyError as err:  # lm-eval's "Spec '...' is not a registered task/group/tag name or valid YAML path"
        raise IftError(f"lm-eval does not know the task: {err.args[0] if err.args else err}",
                       "evaluation.benchmarks", "give an lm-eval task name (lm-eval ls tasks) or a task YAML file")
    except FileNotFoundError as err:  # datasets: a task's data file is not there
        raise IftError(f"a benchmark task's data is missing: {err}", "evaluation.benchmarks",
                       "fix the task file's data_files (relative paths are read against the task file's folder)")
    finally:
        model.train(was_training)
    return parse_results(results)


def with_local_paths(path: Path, folder: Path) -> Path:
    """The task file to hand lm-eval: `path` itself, or, where it states relative local paths, a stand-in written
    in `folder` that includes it and states them absolute (against the folder of the file that states them)."""
    path = path.resolve()
    try:
        cfg, origin = task_config(path)
    except (OSError, yaml.YAMLError, ValueError) as err:
        raise IftError(f"the task file cannot be read: {err}", str(path), "give a valid lm-eval task YAML") from None
    if not isinstance(cfg.get("task"), str):  # a group: its tasks are files or names of their own
        return path
    overrides: dict[str, Any] = {}
    source = cfg.get("dataset_path")
    if isinstance(source, str) and not Path(source).is_absolute() and "://" not in source:
        local = origin["dataset_path"].parent / source
        if source.startswith(".") or local.exists():
            overrides["dataset_path"] = source = str(local.resolve())
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and (source in FILE_BUILDERS or "dataset_path" in overrides):
        base = origin["dataset_kwargs"].parent
        resolved = {k: _absolute(v, base) if k in ("data_files", "data_dir") else v for k, v in kwargs.items()}
        if resolved != kwargs:
            overrides["dataset_kwargs"] = resolved
    if not overrides:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    stand_in = folder / path.name
    stand_in.write_text(yaml.safe_dump({"include": str(path), **overrides}, sort_keys=False), encoding="utf-8")
    return stand_in


def task_config(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Path]]:
    """A task YAML's keys over those of the files it includes (its own win, as lm-eval merges them), and for each
    key the file that states it. `!function` and other tags are read as nothing: only data keys matter here."""
    if path in seen:
        raise ValueError(f"include cycle at {path}")
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TagBlindLoader)  # noqa: S506 (a safe loader)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a mapping")
    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    includes = cfg.pop("include", None)
    for inc in includes if isinstance(includes, list) else [includes] if includes else []:
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        inc_cfg, inc_origin = task_config(inc_path.resolve(), (*seen, path))
        merged.update(inc_cfg)
        origin.update(inc_origin)
    merged.update(cfg)
    origin.update({k: path for k in cfg})
    return merged, origin


class _TagBlindLoader(yaml.SafeLoader):
    """yaml's safe loader that reads any tagged node (lm-eval's `!function module.name`) as None."""


_TagBlindLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _absolute(value: Any, base: Path) -> Any:
    """Relative local paths in `value` (a path, a list of them, or a split -> paths mapping) made absolute."""
    if isinstance(value, str):
        return value if Path(value).is_absolute() or "://" in value else str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    return value


def base_and_fine_tuned(tuned, tokenizer, kind: str, cfg, *, load_base=None, say=print) -> dict[str, Any]:
    """The `benchmarks` section for evaluation config `cfg`: its tasks on `tuned`, then on the base model with the
    same settings: the adapter switched off, else `load_base()` (a full fine-tune's base, loaded again)."""
    entries = list(cfg.benchmarks)
    kwargs = dict(kind=kind, batch_size=cfg.batch_size, limit=cfg.benchmark_limit,
                  num_fewshot=cfg.benchmark_num_fewshot)
    say(f"benchmarks ({', '.join(entries)}): fine-tuned model")
    tuned_figures = run_tasks(tuned, tokenizer, entries, **kwargs)
    say(f"benchmarks ({', '.join(entries)}): base model")
    if hasattr(tuned, "disable_adapter"):
        with tuned.disable_adapter():
            base_figures = run_tasks(tuned, tokenizer, entries, **kwargs)
    else:
        if load_base is None:
            raise ValueError("a model without an adapter needs load_base for its base")
        base = load_base()
        base_figures = run_tasks(base, tokenizer, entries, **kwargs)
        del base
    return compare(base_figures, tuned_figures, settings(entries, limit=cfg.benchmark_limit,
                                                         num_fewshot=cfg.benchmark_num_fewshot,
                                                         batch_size=cfg.batch_size))


def parse_results(results: dict) -> dict[str, dict]:
    """The per-task figures of a `simple_evaluate` result: value, the harness's standard error, which way is
    better, and the rows it scored."""
    out: dict[str, dict] = {}
    better = results.get("higher_is_better") or {}
    samples = results.get("n-samples") or {}
    for task, figures in (results.get("results") or {}).items():
        metrics: dict[str, dict] = {}
        for key, value in figures.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            number = _number(value)
            if number is None:
                continue
            name = metric if filt == "none" else key
            metrics[name] = {"value": number, "stderr": _number(figures.get(f"{metric}_stderr,{filt}")),
                             "higher_is_better": (better.get(task) or {}).get(metric, True)}
        n = (samples.get(task) or {}).get("effective")
        out[task] = {"n": n if isinstance(n, int) else figures.get("sample_len"), "metrics": metrics}
    return out


def compare(base: dict[str, dict], tuned: dict[str, dict], settings: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json `benchmarks` section: base → fine-tuned per task and metric, with the difference."""
    tasks: dict[str, dict] = {}
    for task in dict.fromkeys([*tuned, *base]):
        b, t = base.get(task, {}), tuned.get(task, {})
        metrics = {}
        for metric in dict.fromkeys([*t.get("metrics", {}), *b.get("metrics", {})]):
            bm, tm = b.get("metrics", {}).get(metric, {}), t.get("metrics", {}).get(metric, {})
            bv, tv = bm.get("value"), tm.get("value")
            metrics[metric] = {"base": bv, "base_stderr": bm.get("stderr"), "fine-tuned": tv,
                               "fine-tuned_stderr": tm.get("stderr"),
                               "delta": tv - bv if bv is not None and tv is not None else None,
                               "higher_is_better": tm.get("higher_is_better", bm.get("higher_is_better", True))}
        tasks[task] = {"n": t.get("n", b.get("n")), "metrics": metrics}
    return {"settings": settings, "tasks": tasks}


def settings(entries: Sequence[str], *, limit: int | None, num_fewshot: int | None, batch_size: int) -> dict:
    try:
        from importlib.metadata import version

        lm_eval = version("lm_eval")
    except Exception:  # not installed: run_tasks says so
        lm_eval = None
    return {"tasks": list(entries), "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
            "lm_eval": lm_eval}


def rows(section: Any) -> list[dict]:
    """Flat rows (task, metric, n, base, base_stderr, fine-tuned, fine-tuned_stderr, delta) of a `benchmarks`
    section, for tables; [] when there is none."""
    tasks = section.get("tasks") if isinstance(section, dict) else None
    out = []
    for task, entry in (tasks.items() if isinstance(tasks, dict) else ()):
        for metric, f in ((entry or {}).get("metrics") or {}).items():
            if isinstance(f, dict):
                out.append({"task": task, "metric": metric, "n": entry.get("n"), **{k: f.get(k) for k in (
                    "base", "base_stderr", "fine-tuned", "fine-tuned_stderr", "delta")}})
    return out


def fmt_value(value: Any, stderr: Any, digits: int = 4) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:.{digits}f}" + (f" ± {stderr:.{digits}f}" if isinstance(stderr, (int, float)) else "")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
