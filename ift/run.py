"""The run folder's one owner: its layout, atomic writes, the metrics schema, evaluation records, the lock,
and checkpoint manifests. Every stage that writes into a run folder goes through `RunDir`.

    runs/x/
      recipe.yaml            resolved recipe (no secrets)
      metrics.json           {"history", "best", "validation" (at the best step: what final/ holds),
                              "test", "base": {"test"}, "evaluations": [record, ...]}
      data_report.json, tokenizer/, predictions/<name>.jsonl, checkpoints/step-N/ (+ manifest.json),
      final/, merged/, README.md (card), plots/, logs/, run.lock (while a process owns the folder)

An *evaluation record* says exactly what a figure measured: which weights (fine-tuned final/, the base, a
merged model), on which split, how many rows (and the limit), in which dtype and quantization, when, and
where its predictions are. Training writes one for its test evaluation; `ift eval` writes one per call and
never touches the training figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ift import atomic
from ift.errors import IftError

MANIFEST = "manifest.json"
LOCK = "run.lock"
# files up to this size are hashed too (states, RNG, scheduler); weights and optimizer states are checked by
# size, which is what a full disk or a killed copy changes, without reading gigabytes at every save
HASH_LIMIT = 16 * 2**20


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> "RunDir":
        """The run folder a checkpoint (`RUN/checkpoints/step-N`) belongs to."""
        return cls(Path(checkpoint).parent.parent)

    # ------------------------------------------------------------ layout

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def data_report(self) -> Path:
        return self.path / "data_report.json"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def card(self) -> Path:
        return self.path / "README.md"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def exports(self) -> Path:
        """`ift export` GGUF files (and Ollama Modelfiles) by default."""
        return self.path / "export"

    @property
    def predictions_dir(self) -> Path:
        return self.path / "predictions"

    @property
    def hub_staging(self) -> Path:
        """Weights written for an upload and removed after it."""
        return self.path / "hub-staging"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def predictions(self, name: str) -> Path:
        return self.predictions_dir / f"{name}.jsonl"

    # ------------------------------------------------------------ writes

    def write_json(self, path: Path, data: Any) -> Path:
        return atomic.write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=_plain) + "\n")

    # ------------------------------------------------------------ metrics

    def metrics(self) -> dict:
        path = self.metrics_file
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IftError(f"metrics file is not valid JSON: {exc}", str(path),
                           "repair it or move it away (training and evaluation rewrite it)") from None
        if not isinstance(data, dict):
            raise IftError("metrics file does not hold a JSON object", str(path), "move it away and evaluate again")
        return data

    def record_training(self, *, history: list[dict], best: dict | None = None, **sections: Any) -> dict:
        """The training run's own figures (history, best, validation at the best step, test, base test);
        evaluation records written by `ift eval` are kept. Returns metrics.json's content as written."""
        data = self.metrics()
        data["history"] = history
        if best is not None:
            data["best"] = best
        for key, value in sections.items():
            if value is not None:
                data[key] = value
        self.write_json(self.metrics_file, data)
        return data

    def add_evaluation(self, *, model: str, split: str, metrics: dict, rows: int, limit: int | None,
                       weights: str, dtype: str, quantization: str | None, predictions: Path | None,
                       by: str) -> dict:
        """Append an evaluation record; returns it (with its id)."""
        data = self.metrics()
        records = data.setdefault("evaluations", [])
        record = {
            "id": f"{by}-{model}-{split}-{len(records) + 1}",
            "by": by,  # "train" (the run's own test evaluation) or "ift eval"
            "model": model,  # fine-tuned | base | merged
            "weights": weights,
            "split": split,
            "rows": rows,
            "limit": limit,
            "dtype": dtype,
            "quantization": quantization,
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "predictions": str(predictions.relative_to(self.path)) if predictions else None,
            "metrics": metrics,
        }
        records.append(record)
        self.write_json(self.metrics_file, data)
        return record

    def latest_evaluation(self, model: str, split: str, *, full: bool = True) -> dict | None:
        """The newest record for (model, split); `full`: only evaluations of every row (no --limit)."""
        for record in reversed(self.metrics().get("evaluations") or []):
            if record.get("model") == model and record.get("split") == split and \
                    not (full and record.get("limit")):
                return record
        return None

    # ------------------------------------------------------------ the lock

    def lock(self) -> "RunLock":
        return RunLock(self.path / LOCK)

    # ------------------------------------------------------------ checkpoints

    def write_manifest(self, folder: Path) -> None:
        """Every file of a checkpoint with its size (and sha256 when small): what verify() checks on resume."""
        files = {}
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
            entry: dict[str, Any] = {"size": file.stat().st_size}
            if entry["size"] <= HASH_LIMIT:
                entry["sha256"] = _sha256(file)
            files[str(file.relative_to(folder))] = entry
        self.write_json(folder / MANIFEST, {"files": files})

    def verify(self, folder: Path) -> str | None:
        """None when the checkpoint is complete as its manifest says; otherwise what is wrong."""
        manifest = folder / MANIFEST
        if not manifest.is_file():
            return "it has no manifest.json (written last, so the save did not finish)"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return "its manifest.json is unreadable"
        for name, entry in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != entry.get("size"):
                return f"{name} has {size:,} bytes, the manifest says {entry.get('size'):,}"
            if "sha256" in entry and _sha256(path) != entry["sha256"]:
                return f"{name} does not match its checksum"
        return None

    def checkpoint_steps(self) -> list[int]:
        folder = self.checkpoints
        if not folder.is_dir():
            return []
        return sorted(int(p.name.split("-", 1)[1]) for p in folder.iterdir()
                      if p.is_dir() and p.name.startswith("step-") and p.name.split("-", 1)[1].isdigit())

    def newest_valid_checkpoint(self, say=print) -> Path | None:
        """The newest checkpoint that verifies; every newer one that does not is named and skipped."""
        for step in reversed(self.checkpoint_steps()):
            folder = self.checkpoint(step)
            problem = self.verify(folder)
            if problem is None:
                return folder
            if not (folder / MANIFEST).exists() and (folder / "trainer_state.json").exists():
                # written by an ift before manifests: an unfinished save is never renamed to step-N, so a
                # step-N with its state file but no manifest is complete as far as anyone can tell
                say(f"warning: checkpoint {folder} has no manifest (an older ift wrote it): not verified")
                return folder
            say(f"warning: skipping checkpoint {folder}: {problem}")
        return None


class RunLock:
    """One process owns a run folder: `run.lock` holds its pid and host; a lock whose process is gone is stale
    and taken over (saying so)."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    def acquire(self, say=print) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise IftError(f"{self.path.parent} is in use by process {owner.get('pid')} on "
                                   f"{owner.get('host')}", str(self.path),
                                   "wait for that run to finish, or choose another training.output_dir") from None
                say(f"taking over the stale lock {self.path} of process {owner.get('pid') if owner else '?'} "
                    "(no longer running)")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise IftError(f"could not take the lock {self.path}", str(self.path), "remove the file and try again")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, so never steal it
    import psutil

    pid = owner.get("pid")
    return isinstance(pid, int) and psutil.pid_exists(pid) and pid != os.getpid()


def free_space(path: Path) -> str:
    """Free bytes on the file system holding `path`, for error messages."""
    for p in (path, *path.parents):
        if p.exists():
            return f"{shutil.disk_usage(p).free / 2**30:.1f} GiB free"
    return "free space unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """JSON for numpy/torch scalars and paths."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
