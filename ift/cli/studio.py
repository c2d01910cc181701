"""`ift studio`: the template studio and run viewer in the browser (the `studio` extra)."""

from __future__ import annotations

import argparse

from ift.errors import IftError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("studio", help="author, preview and validate templates on real rows; read runs (browser)",
                       description="A local web page: open a source, edit a template, see it render and tokenize, "
                                   "save it, and read a run's curves and predictions (see docs/templates.md).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0 takes a free one)")
    p.add_argument("--data", metavar="SOURCE", help="open this file, folder or Hub id[:config] first")
    p.add_argument("--split", default="train", help="its split (default: train)")
    p.add_argument("--recipe", help="open this recipe's source first (--source-index picks which)")
    p.add_argument("--source-index", type=int, default=0, help="which of the recipe's sources (default: 0)")
    p.add_argument("--data-map", metavar="FILE", default="", help="local copies standing in for Hub ids (docs/data.md)")
    p.add_argument("--templates-dir", action="append", default=[], metavar="DIR",
                   help="extra folder of <dataset>/templates.yaml files to start from (repeatable)")
    p.add_argument("--no-promptsource", action="store_true", help="leave out promptsource's P3 templates")
    p.add_argument("--save", metavar="FILE", default="", help="the templates.yaml the page saves to (editable there)")
    p.add_argument("--tokenizer", default="", help="a run folder, recipe or tokenizer folder for the token view")
    p.add_argument("--runs", default="runs", metavar="DIR", help="where the runs page looks for runs (default: runs)")
    p.add_argument("--run", default="", help="a run folder to open on the runs page")
    p.set_defaults(func=run_studio)


def run_studio(args: argparse.Namespace) -> int:
    try:
        from ift.studio.app import StudioConfig
        from ift.studio.server import serve
        from ift.studio.sources import SourceSpec
    except ImportError as err:
        raise IftError(f"ift studio needs the studio extra ({err.name} is not installed)", None,
                       'pip install "ift[studio]"') from None
    source = None
    if args.recipe:
        source = SourceSpec("recipe", recipe=args.recipe, index=args.source_index, data_map=args.data_map)
    elif args.data:
        from ift.data.sources import FORMATS, is_url
        from ift.locations import looks_local

        local = looks_local(args.data, tuple(FORMATS)) or is_url(args.data)
        path, _, config = (args.data, "", "") if local else args.data.partition(":")
        source = SourceSpec("path" if local else "hub", path=path, config=config, data_map=args.data_map)
    config = StudioConfig(templates_dirs=args.templates_dir, promptsource=not args.no_promptsource,
                          data_map=args.data_map, source=source, split=args.split, save_path=args.save,
                          runs_dir=args.runs, run=args.run, tokenizer=args.tokenizer)
    serve(config, args.host, args.port)
    return 0
