"""TemplateLibrary: every reachable template folder, and resolving template references."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from ift.errors import IftError
from ift.templates import files  # files.repo_templates_dir is read at call time (tests monkeypatch it)
from ift.templates.files import TemplateFile, find_template_files, promptsource_templates_dir, read_file
from ift.templates.template import PROMPTSOURCE_PREFIX, Template

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


class TemplateLibrary:
    """All templates we can reach: user folders, the repo's templates/, promptsource's P3 collection.

    References: `name` (with `dataset=`), `dataset/name`, `dataset/subset/name`,
    `promptsource:dataset[/subset]/name`, or a template id (uuid). User folders come first, so a
    user's template shadows a shipped one of the same dataset and name.
    """

    def __init__(self, dirs: Iterable[str | Path] = (), promptsource: bool = True):
        self.dirs: list[Path] = []
        for d in dirs:
            path = Path(d)
            if not path.is_dir():
                raise IftError("templates folder not found", str(d), "pass an existing folder to --templates-dir")
            self.dirs.append(path)
        repo = files.repo_templates_dir()
        if repo.is_dir() and all(repo.resolve() != d.resolve() for d in self.dirs):
            self.dirs.append(repo)
        self.promptsource_dir = promptsource_templates_dir() if promptsource else None
        self._local: dict[str, list[Path]] = {}
        for root in self.dirs:
            for key, path in find_template_files(root).items():
                if key:  # a templates.yaml directly in the folder: key from its header
                    self._local.setdefault(key, []).append(path)
                else:
                    self._local.setdefault(read_file(path).key, []).append(path)
        self._promptsource: dict[str, Path] = (
            find_template_files(self.promptsource_dir) if self.promptsource_dir else {}
        )
        self._files: dict[Path, TemplateFile] = {}

    # -- reading -------------------------------------------------------------------------------
    def _file(self, path: Path, key: str, source: str) -> TemplateFile:
        file = self._files.get(path)
        if file is None:
            file = self._files[path] = read_file(path, key, source)
            if file.problems and source == "local":
                raise file.problems[0]
        return file

    def _templates(self, key: str, source: str) -> list[Template]:
        if source == "promptsource":
            path = self._promptsource.get(key)
            return self._file(path, key, source).templates if path else []
        return [t for path in self._local.get(key, []) for t in self._file(path, key, source).templates]

    def datasets(self) -> list[str]:
        """Dataset keys: local ones, then promptsource's (prefixed `promptsource:`)."""
        return sorted(self._local) + [PROMPTSOURCE_PREFIX + k for k in sorted(self._promptsource)]

    def list(self, dataset: str | None = None) -> list[Template]:
        """Templates of one dataset (`key` or `promptsource:key`), or of every dataset."""
        if dataset is None:
            return [t for key in self.datasets() for t in self._templates(*_split_source(key))]
        key, source = _split_source(dataset.strip("/"))
        if key not in (self._promptsource if source == "promptsource" else self._local):
            raise IftError(f"no templates for dataset {dataset!r}", None, self._dataset_hint(dataset))
        return self._templates(key, source)

    def _dataset_hint(self, dataset: str) -> str:
        if dataset in self._promptsource:
            return f"promptsource has it: use 'promptsource:{dataset}'"
        close = difflib.get_close_matches(dataset, self.datasets(), n=5, cutoff=0.5)
        if close:
            return "did you mean: " + ", ".join(close)
        return "known datasets: " + (", ".join(sorted(self._local)) or "none") + (
            f" (and {len(self._promptsource)} promptsource datasets)" if self._promptsource else "")

    # -- references ----------------------------------------------------------------------------
    def get(self, ref: str, dataset: str | None = None) -> Template:
        """Resolve a template reference (see the class docstring). Unknown: IftError with close matches."""
        ref = ref.strip()
        body, source = _split_source(ref)
        sources = [source] if ref.startswith(PROMPTSOURCE_PREFIX) else ["local"]
        if _UUID_RE.match(body):
            found = self._by_id(body)
            if found:
                return found
        if dataset is not None:
            key, source = _split_source(dataset.strip("/"))
            found = self._named(key, source, body)
        else:
            found = next((t for s in sources for t in self._by_path(body, s)), None) or self._by_bare_name(body, sources[0])
        if found is None:
            raise IftError(f"unknown template {ref!r}" + (f" for dataset {dataset!r}" if dataset else ""),
                           None, self._ref_hint(ref, dataset))
        return found

    def _named(self, key: str, source: str, name: str) -> Template | None:
        return next((t for t in self._templates(key, source) if _same_name(t.name, name)), None)

    def _by_path(self, body: str, source: str) -> Iterator[Template]:
        """`a/b/c/name`: try the longest dataset key first (names may contain '/')."""
        keys = self._promptsource if source == "promptsource" else self._local
        candidates = sorted((k for k in keys if body.startswith(k + "/")), key=len, reverse=True)
        for key in candidates:
            found = self._named(key, source, body[len(key) + 1:])
            if found:
                yield found

    def _by_bare_name(self, name: str, source: str) -> Template | None:
        if source != "local":
            return None
        matches = [t for key in self._local for t in self._templates(key, "local") if _same_name(t.name, name)]
        if len(matches) > 1:
            raise IftError(f"template name {name!r} is ambiguous", None,
                           "use one of: " + ", ".join(t.ref for t in matches))
        return matches[0] if matches else None

    def _by_id(self, template_id: str) -> Template | None:
        for key in self._local:
            found = next((t for t in self._templates(key, "local") if t.id == template_id), None)
            if found:
                return found
        for key in self._promptsource:
            found = next((t for t in self._templates(key, "promptsource") if t.id == template_id), None)
            if found:
                return found
        return None

    def _ref_hint(self, ref: str, dataset: str | None) -> str:
        if dataset is not None:
            try:
                names = [t.name.strip() for t in self.list(dataset)]
            except IftError as err:
                return err.fix or ""
            close = difflib.get_close_matches(ref, names, n=5, cutoff=0.4)
            return ("did you mean: " + ", ".join(close)) if close else ("available: " + ", ".join(names))
        body, source = _split_source(ref)
        keys = self._promptsource if source == "promptsource" else self._local
        key = max((k for k in keys if body.startswith(k + "/")), key=len, default=None)
        if key is not None:  # a known dataset: suggest among its names
            names = [t.name.strip() for t in self._templates(key, source)]
            close = difflib.get_close_matches(body[len(key) + 1:], names, n=5, cutoff=0.6)
            prefix = (PROMPTSOURCE_PREFIX if source == "promptsource" else "") + key + "/"
            return ("did you mean: " + ", ".join(prefix + n for n in close)) if close else \
                f"templates of {prefix[:-1]}: " + ", ".join(names)
        refs = [t.ref for t in self.list()]
        close = difflib.get_close_matches(ref, refs, n=5, cutoff=0.5)
        if not close and not ref.startswith(PROMPTSOURCE_PREFIX):
            close = difflib.get_close_matches(PROMPTSOURCE_PREFIX + ref, refs, n=5, cutoff=0.5)
        if close:
            return "did you mean: " + ", ".join(close)
        local = [r for r in refs if not r.startswith(PROMPTSOURCE_PREFIX)]
        return "available: " + (", ".join(local[:20]) or "none") + (" ..." if len(local) > 20 else "") + \
            "; `ift templates list` shows them all"


def _same_name(name: str, wanted: str) -> bool:
    """A template name as users write it: surrounding spaces do not count. Some of promptsource's names end in a
    space (`imdb/Sentiment with choices `), which a YAML recipe or a shell argument drops; both spellings match."""
    return name.strip() == wanted.strip()


def _split_source(ref: str) -> tuple[str, str]:
    if ref.startswith(PROMPTSOURCE_PREFIX):
        return ref[len(PROMPTSOURCE_PREFIX):], "promptsource"
    return ref, "local"
