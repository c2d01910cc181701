"""`ift templates list|show|new|preview|validate`: author and check prompt templates."""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

from ift.errors import IftError, IftErrors
from ift.templates.checks import validate
from ift.templates.files import TemplateFile, add_template, find_template_files, read_file, repo_templates_dir
from ift.templates.library import TemplateLibrary
from ift.templates.template import PROMPTSOURCE_PREFIX, Template, render_row

def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("templates", help="list, show, create, preview and validate prompt templates",
                            description="Prompt templates in promptsource's YAML format (see docs/templates.md).")
    parser.set_defaults(func=lambda args: _print_help(parser))
    actions = parser.add_subparsers(dest="templates_command", metavar="ACTION")

    p = actions.add_parser("list", help="templates of a dataset (or all local ones): names, ids, choices")
    p.add_argument("dataset", nargs="?", help="dataset key, e.g. financial_phrasebank or promptsource:glue/sst2")
    _library_args(p)
    p.set_defaults(func=run_list)

    p = actions.add_parser("show", help="one template in full")
    p.add_argument("ref", help="dataset/name, promptsource:dataset[/subset]/name, or an id")
    _library_args(p)
    p.set_defaults(func=run_show)

    p = actions.add_parser("new", help="add a template (fresh uuid) to templates/<dataset>/templates.yaml")
    p.add_argument("dataset", help="dataset key: name or name/subset")
    p.add_argument("--name", required=True, help="template name, unique within the dataset")
    p.add_argument("--jinja", help="prompt ||| target, in Jinja (default: a starter to edit)")
    p.add_argument("--choices", help="answer choices, e.g. 'negative ||| neutral ||| positive'")
    p.add_argument("--templates-dir", type=Path, default=None,
                   help="folder holding <dataset>/templates.yaml (default: the repo's templates/)")
    p.add_argument("--original-task", action="store_true", help="the template asks for the dataset's own task")
    p.add_argument("--metrics", nargs="+", help="e.g. Accuracy, ROUGE (default: Accuracy with choices, else ROUGE)")
    p.add_argument("--reference", default="", help="author or paper the template comes from")
    p.set_defaults(func=run_new)

    p = actions.add_parser("preview", help="render real rows with a template")
    p.add_argument("ref", help="template reference")
    _data_args(p, default_n=5)
    _library_args(p)
    p.set_defaults(func=run_preview)

    p = actions.add_parser("validate", help="check template files, or one template, optionally against data")
    p.add_argument("target", nargs="?", help="a templates.yaml, a folder of them, or a template reference "
                                             "(default: the repo's templates/)")
    _data_args(p, default_n=1000, required=False)
    _library_args(p)
    p.set_defaults(func=run_validate)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _library_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--templates-dir", action="append", default=[], metavar="DIR",
                   help="extra folder of <dataset>/templates.yaml files (repeatable)")
    p.add_argument("--no-promptsource", action="store_true", help="leave out promptsource's P3 templates")


def _data_args(p: argparse.ArgumentParser, default_n: int, required: bool = True) -> None:
    p.add_argument("--data", required=required, metavar="SOURCE",
                   help="local json/jsonl/csv/parquet/txt file, folder of them or save_to_disk folder, "
                        "or a Hub dataset id[:config]")
    p.add_argument("--split", default="train", help="split to read (default: train)")
    p.add_argument("--n", type=int, default=default_n, help=f"rows to use, 0 = all (default: {default_n})")


def _library(args: argparse.Namespace) -> TemplateLibrary:
    return TemplateLibrary(dirs=args.templates_dir, promptsource=not args.no_promptsource)


# --------------------------------------------------------------------------------------------
# list / show / new
# --------------------------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    lib = _library(args)
    if args.dataset:
        templates = lib.list(args.dataset)
    else:  # P3 has 2000+ templates: list the local ones, count the rest
        templates = [t for key in lib.datasets() if not key.startswith(PROMPTSOURCE_PREFIX) for t in lib.list(key)]
    rows = [(t.ref, t.id, _yes_no(t.metadata.original_task), t.answer_choices_jinja or "-") for t in templates]
    _print_table(("TEMPLATE", "ID", "ORIGINAL_TASK", "ANSWER_CHOICES"), rows)
    if not args.dataset:
        p3 = [k for k in lib.datasets() if k.startswith(PROMPTSOURCE_PREFIX)]
        if p3:
            print(f"\n+ promptsource: {len(p3)} datasets; `ift templates list promptsource:DATASET` lists them")
    return 0


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    # plain aligned columns: readable in a terminal, and stable when piped or grepped
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]).rstrip())


def run_show(args: argparse.Namespace) -> int:
    tpl = _library(args).get(args.ref)
    md = tpl.metadata
    fields = [
        ("ref", tpl.ref), ("id", tpl.id), ("dataset", tpl.dataset), ("file", tpl.location),
        ("answer_choices", tpl.answer_choices_jinja or "-"), ("original_task", _yes_no(md.original_task)),
        ("choices_in_prompt", _yes_no(md.choices_in_prompt)), ("metrics", ", ".join(md.metrics or []) or "-"),
        ("languages", ", ".join(md.languages or []) or "-"), ("reference", tpl.reference or "-"),
        ("variables", ", ".join(sorted(tpl.variables())) or "-"),
    ]
    for key, value in fields:
        print(f"{key + ':':<19}{value}")
    print("jinja:")
    print(textwrap.indent(tpl.jinja, "  "))
    return 0


def run_new(args: argparse.Namespace) -> int:
    jinja_text = args.jinja
    if jinja_text is None:  # a starter to edit: obvious column names, the target after '|||'
        jinja_text = "{{text}}\n|||\n" + ("{{answer_choices[label]}}" if args.choices else "{{label}}")
    tpl = add_template(args.dataset, args.name, jinja_text, args.choices, templates_dir=args.templates_dir,
                       original_task=args.original_task, metrics=args.metrics, reference=args.reference)
    print(f"added {tpl.ref} (id {tpl.id}) to {tpl.location}")
    print(f"check it on real rows: ift templates preview {tpl.ref} --data PATH"
          + (f" --templates-dir {args.templates_dir}" if args.templates_dir else ""))
    return 0


# --------------------------------------------------------------------------------------------
# preview / validate
# --------------------------------------------------------------------------------------------


def run_preview(args: argparse.Namespace) -> int:
    from ift.data.sources import load_preview_rows  # the loader training uses: the same file fails the same way

    tpl = _library(args).get(args.ref)
    rows, columns = load_preview_rows(args.data, args.split, args.n, sorted(tpl.variables()))
    missing = sorted(tpl.variables() - set(columns))
    if missing:
        raise IftError(f"template {tpl.ref!r} uses {', '.join(map(repr, missing))}, not a column of the data",
                       args.data, f"available columns: {', '.join(columns)}")
    split = "" if Path(args.data).is_file() else f" ({args.split})"  # a single file has no splits
    print(f"{tpl.ref} on {len(rows)} rows of {args.data}{split}")
    for i, row in enumerate(rows):
        pair = render_row(tpl, row, i)
        print(f"\n--- row {i} " + "-" * 40)
        if pair is None:
            print("(skipped: the template renders an empty prompt or target for this row)")
            continue
        print(f"[prompt]\n{pair[0]}\n[target]\n{pair[1]}")
        choices = tpl.answer_choices(row)
        if choices is not None:
            print(f"[answer_choices] {' | '.join(choices)}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    templates, files, findings, what = _targets(args)
    rows = columns = None
    if args.data:
        from ift.data.sources import load_preview_rows

        used = sorted({v for t in templates for v in t.variables()})
        rows, columns = load_preview_rows(args.data, args.split, args.n, used)
        what += f", against {len(rows)} rows of {args.data}"
    findings += validate(templates, rows, columns, files)
    if findings:
        print(f"{what}: {len(findings)} problem(s)")
        raise IftErrors(findings)
    print(f"ok: {what}")
    return 0


def _targets(args: argparse.Namespace) -> tuple[list[Template], list[TemplateFile], list[IftError], str]:
    """The templates to check: from a file, a folder, or a reference."""
    target = args.target
    if target is None:
        target = repo_templates_dir()
        if not target.is_dir():
            raise IftError("no templates/ folder next to the ift package", None, "pass a file or folder to validate")
    path = Path(target)
    if not path.exists():
        if "/" not in str(target) and os.sep not in str(target) and not str(target).startswith(PROMPTSOURCE_PREFIX):
            raise IftError(f"no such file, folder or template: {target!r}", None,
                           "pass a templates.yaml, a folder of them, or dataset/name")
        tpl = _library(args).get(str(target))
        return [tpl], [], [], f"1 template ({tpl.ref})"
    paths = {"": path} if path.is_file() else find_template_files(path)
    if not paths:
        raise IftError(f"no {'templates.yaml'} files under {target}", None, "point at a folder of <dataset>/templates.yaml")
    files, findings = [], []
    for key, file_path in sorted(paths.items()):
        try:
            files.append(read_file(file_path, key or None))
        except IftError as err:  # a broken file is one finding; keep checking the others
            findings.append(err)
    templates = [t for f in files for t in f.templates]
    return templates, files, findings, f"{len(templates)} templates in {len(paths)} file(s)"
