"""`ift validate RECIPE`: every recipe error at once — keys, types, templates, data sources — without loading a
model. Local data files are read as training reads them (the same errors; datasets caches them for the run);
Hub datasets are checked from their metadata, without a download."""

from __future__ import annotations

import argparse

from ift.errors import IftError, IftErrors


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a recipe, its templates and data sources without loading a model")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")
    p.set_defaults(func=run)


def check(recipe_path: str, overrides: list[str]) -> list[IftError]:
    from ift.recipe import load_recipe

    try:
        recipe = load_recipe(recipe_path, overrides)
    except IftError as err:
        return [err] if not isinstance(err, IftErrors) else err.errors
    # imported only now: recipe mistakes are reported without loading the data stack
    from ift.data.prepare import check_sources
    from ift.templates.library import TemplateLibrary

    library = TemplateLibrary(dirs=tuple(recipe.data.templates_dir))
    return check_sources(recipe.data, library)


def run(args: argparse.Namespace) -> int:
    problems = check(args.recipe, args.overrides)
    if problems:
        raise IftErrors(problems)
    print(f"{args.recipe}: ok")
    return 0
