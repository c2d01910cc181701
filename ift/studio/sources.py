"""A source opened for browsing: a local file or folder, a Hub id (with its config), or a recipe's source."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ift.data.data_map import apply_data_map
from ift.data.sources import load_source_splits
from ift.errors import IftError
from ift.recipe import DataConfig, SourceConfig, load_recipe

Origin = Literal["path", "hub", "recipe"]
MAX_LABELS = 50  # a column with more distinct values is not offered as a label column


@dataclass(frozen=True)
class SourceSpec:
    """What the page asks to open. `data_map` (a data map file) stands a local copy in for a Hub id."""

    origin: Origin = "path"
    path: str = ""  # a file or folder, or a Hub id
    config: str = ""  # the Hub config
    recipe: str = ""
    index: int = 0  # which of the recipe's sources
    data_map: str = ""

    def describe(self) -> str:
        if self.origin == "recipe":
            return f"{self.recipe}, source {self.index}"
        return self.path + (f":{self.config}" if self.config else "")


@dataclass
class OpenedSource:
    spec: SourceSpec
    config: SourceConfig  # the source as read (a data map applied)
    splits: dict[str, Any]  # split name -> datasets.Dataset
    declared: SourceConfig  # the source as a recipe names it (before the data map)
    template_refs: list[str] = field(default_factory=list)  # a recipe source's templates
    templates_dirs: list[str] = field(default_factory=list)  # a recipe's data.templates_dir

    def split(self, name: str) -> Any:
        if name in self.splits:
            return self.splits[name]
        if not name and self.splits:
            return next(iter(self.splits.values()))
        raise IftError(f"split {name!r} is not in {self.spec.describe()}", "split",
                       f"choose one of: {', '.join(self.splits)}")

    def first_split(self) -> str:
        return "train" if "train" in self.splits else next(iter(self.splits), "")

    def columns(self, split: str) -> list[tuple[str, str]]:
        """(column, its type in words) of one split."""
        ds = self.split(split)
        return [(name, describe_feature(feature)) for name, feature in ds.features.items()]

    def rows(self, split: str, start: int, count: int) -> list[tuple[int, dict[str, Any]]]:
        ds = self.split(split)
        stop = min(len(ds), max(start, 0) + count)
        start = max(0, min(start, stop))
        return list(zip(range(start, stop), ds.select(range(start, stop)).to_list()))

    def label_columns(self, split: str) -> list[str]:
        """Columns worth counting: class labels, and text or whole-number columns whose values repeat (at most
        MAX_LABELS distinct ones, and at most one per two rows among the first thousand)."""
        import datasets

        ds = self.split(split)
        head = ds.select(range(min(len(ds), 1000)))
        found = []
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.ClassLabel):
                found.append(name)
            elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "bool") or (
                    isinstance(feature, datasets.Value) and feature.dtype.startswith("int")):
                if len(set(head[name])) <= min(MAX_LABELS, max(1, len(head) // 2)):  # labels repeat
                    found.append(name)
        found.sort(key=lambda c: (c != "label", not c.endswith("label")))  # `label` first
        return found

    def label_counts(self, split: str, column: str) -> list[tuple[str, int]]:
        """How often each value of `column` occurs in the split, most frequent first (class label ids named)."""
        import datasets

        ds = self.split(split)
        if column not in ds.column_names:
            raise IftError(f"no column {column!r} in split {split!r}", "label column",
                           f"choose one of: {', '.join(ds.column_names)}")
        feature = ds.features[column]
        counts = Counter(ds[column])
        if isinstance(feature, datasets.ClassLabel):
            return [(f"{feature.int2str(v)} ({v})" if isinstance(v, int) and 0 <= v < feature.num_classes else str(v),
                     n) for v, n in counts.most_common()]
        return [("(none)" if v is None else str(v), n) for v, n in counts.most_common()]

    def dataset_keys(self) -> list[str]:
        """Template library keys this source may have templates under, most specific first."""
        name = Path(self.config.path.rstrip("/")).name if self.spec.origin == "path" else self.config.path
        stem = name.split(".")[0]
        short = self.config.path.split("/")[-1] if "/" in self.config.path else self.config.path
        keys = []
        for base in dict.fromkeys((self.config.path, short, stem)):
            if self.config.config:
                keys.append(f"{base}/{self.config.config}")
            keys.append(base)
        return list(dict.fromkeys(k for k in keys if k))


def describe_feature(feature: Any) -> str:
    """A datasets feature in a few words: `string`, `int64`, `class label (negative, neutral, positive)`."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        names = ", ".join(feature.names[:8]) + (", …" if feature.num_classes > 8 else "")
        return f"class label ({names})"
    if isinstance(feature, datasets.Value):
        return feature.dtype
    inner = getattr(feature, "feature", None)
    if inner is not None:  # List / Sequence / LargeList
        return f"list of {describe_feature(inner)}"
    if isinstance(feature, dict):
        return "struct {" + ", ".join(f"{k}: {describe_feature(v)}" for k, v in feature.items()) + "}"
    if isinstance(feature, list) and feature:
        return f"list of {describe_feature(feature[0])}"
    return type(feature).__name__


def open_source(spec: SourceSpec) -> OpenedSource:
    """Read the source's own splits with the training loader (its errors: a missing file, an unreachable Hub)."""
    refs: list[str] = []
    dirs: list[str] = []
    if spec.origin == "recipe":
        if not spec.recipe.strip():
            raise IftError("no recipe given", "recipe", "type the path of a recipe YAML, e.g. recipes/quickstart.yaml")
        recipe = load_recipe(spec.recipe.strip())
        data = recipe.data
        if spec.data_map and not data.data_map:
            data = data.model_copy(update={"data_map": spec.data_map})
        if not 0 <= spec.index < len(data.sources):
            raise IftError(f"the recipe has {len(data.sources)} source(s), no source {spec.index}", "recipe source",
                           f"choose 0 to {len(data.sources) - 1}")
        refs = list(data.sources[spec.index].templates)
        dirs = list(data.templates_dir)
        declared = data.sources[spec.index]
        src = apply_data_map(data).sources[spec.index]
    else:
        path = spec.path.strip()
        if not path:
            raise IftError("no source given", "source", "type a local file or folder, or a Hub dataset id")
        if spec.origin == "hub":
            declared = SourceConfig(path=path, config=spec.config.strip() or None)
            src = apply_data_map(DataConfig(sources=[declared], data_map=spec.data_map or None)).sources[0]
        else:
            src = declared = SourceConfig(path=path)
    splits = load_source_splits(src)
    if not splits:
        raise IftError("the source has no splits", spec.describe(), "check the path")
    return OpenedSource(spec, src, splits, declared, refs, dirs)
