"""`evaluate` modules named in evaluation.metrics, computed on the generated answers.

An entry of evaluation.metrics that is not loss / accuracy / rouge names an `evaluate` module: a Hub id
(`sacrebleu`, `chrf`, `bertscore`, `evaluate-metric/sacrebleu`) or a local module (a .py file defining an
`evaluate.Metric` subclass, or the folder holding `<folder name>.py`). Each is loaded once per process and
computed on the rows the model answered by generation (the predictions ift saves), with the predictions and the
targets as `compute(predictions=..., references=...)`; over all of them and again per source and per template.

What is recorded, as `<module>.<key>` beside the built-in figures: every number the module returns, and the mean
of every list of numbers as long as the predictions (per-pair scores such as BERTScore's precision / recall / f1);
other values (sacreBLEU's n-gram counts, version strings) are left out.

ROUGE stays ift's own (`ift.evaluation.text_metrics`, on rouge_score): its tokens are widened to every script, and
tests hold it equal to rouge_score; the `evaluate` ROUGE module would drop non-Latin text.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

from ift.errors import IftError
from ift.metrics import evaluate_modules, module_name

_LOADED: dict[str, Any] = {}


def load_modules(entries: Sequence[str]) -> dict[str, Any]:
    """{figure prefix: loaded module} of the evaluate modules among `entries` (each loaded once per process)."""
    out = {}
    for entry in evaluate_modules(entries):
        key = str(Path(entry).expanduser().resolve()) if Path(entry).expanduser().exists() else entry
        if key not in _LOADED:
            _LOADED[key] = _load(entry, key)
        out[module_name(entry)] = _LOADED[key]
    return out


def _load(entry: str, path: str):
    try:
        import evaluate
    except ImportError:
        raise IftError(f"evaluation.metrics names the evaluate module {entry!r}, but the evaluate library is not "
                       "installed", "evaluation.metrics", "pip install 'ift[evaluate]' (or pip install evaluate)") \
            from None
    try:
        return evaluate.load(path)
    except (FileNotFoundError, ConnectionError) as err:
        local = Path(entry).expanduser().exists()
        fix = ("check that the file defines an evaluate.Metric subclass, or that the folder holds "
               f"{module_name(entry)}.py" if local else
               f"download it where the Hugging Face Hub is reachable (git clone https://huggingface.co/spaces/"
               f"{entry if '/' in entry else 'evaluate-metric/' + entry}) and set evaluation.metrics to the local "
               f"folder or its {module_name(entry)}.py; the built-in metrics are loss, accuracy and rouge")
        raise IftError(f"cannot load the evaluate module {entry!r}: {_first_line(err)}", "evaluation.metrics", fix) \
            from None
    except ImportError as err:  # evaluate lists the script's missing imports: "... dependencies['sacrebleu'] ..."
        listed = re.search(r"\[([^\]]*)\]", str(err))
        missing = [m.strip(" '\"") for m in listed.group(1).split(",")] if listed else [getattr(err, "name", None)]
        missing = [m for m in missing if m]
        if not missing:
            raise IftError(f"the evaluate module {entry!r} cannot be imported: {_first_line(err)}",
                           "evaluation.metrics", "install what it imports") from None
        raise IftError(f"the evaluate module {entry!r} needs {', '.join(missing)}, not installed",
                       "evaluation.metrics", f"pip install {' '.join(missing)}") from None


def module_scores(modules: dict[str, Any], predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """`<module>.<key>` figures of every module on paired predictions and references ({} without pairs)."""
    if not predictions:
        return {}
    out: dict[str, float] = {}
    for name, module in modules.items():
        try:
            result = module.compute(predictions=list(predictions), references=list(references))
        except Exception as err:  # a module's own failure, named with the module that raised it
            raise IftError(f"the evaluate module {name!r} failed on {len(predictions)} predictions: "
                           f"{type(err).__name__}: {_first_line(err)}", "evaluation.metrics",
                           "check that the module scores text predictions against one text reference each, or "
                           "remove it") from None
        for key, value in (result or {}).items():
            number = _figure(value, len(predictions))
            if number is not None:
                out[f"{name}.{key}"] = number
    return out


def _figure(value: Any, n: int) -> float | None:
    if isinstance(value, bool):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (list, tuple)) and len(value) == n and n > 0 \
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return sum(value) / n
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
