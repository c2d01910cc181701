"""`ift studio`: author, preview and validate templates on real rows, and read a run's results, in the browser.

- sources: a source opened for browsing (a file, a folder, a Hub id, a recipe's source): splits, columns and
  their types, rows, label counts.
- drafts: the template being edited, built from the page's fields, rendered on rows and checked as
  `ift templates validate` checks it (the same `Template` and `validate`, so the same Jinja sandbox).
- tokens: the tokenized view of rendered rows, the tokens that carry loss marked, encoded as `ift data preview`
  encodes them (`ift.data.reports.preview_rows`).
- saving: the draft written into a templates.yaml (its id kept), the file validated, the recipe snippet.
- runs: a run folder, read-only: curves, base vs fine-tuned, predictions filtered by template, label, outcome.
- app: the Starlette app: pages and the fragments htmx swaps in; every error is shown in the page.
- server: binding (127.0.0.1 unless told otherwise) and serving with uvicorn.

pages/ holds the page templates (Jinja, autoescaped; the user's templates never render there), static/ the
stylesheet and htmx 2.0.11 (0BSD, vendored: the studio works offline). Needs the `studio` extra (starlette,
uvicorn, python-multipart). May import ift.templates, ift.data, ift.modeling, ift.evaluation, ift.recipe,
ift.run and ift.errors; never ift.cli.
"""
