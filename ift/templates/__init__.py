"""Prompt templates in promptsource's YAML format, rendered in a Jinja sandbox.

A file ``templates/<dataset>[/<subset>]/templates.yaml`` holds promptsource ``!Template`` entries.
We read it with our own YAML loader (promptsource need not be installed), and render exactly as
promptsource's ``Template.apply`` does: same Jinja settings, filters and globals, the same
``|||`` escaping and splitting, the same 2048-character truncation of every ``{{ ... }}``.
The one deliberate difference: templates are code from strangers, so they run in a hardened
``ImmutableSandboxedEnvironment`` (no Python internals, no imports, bounded sizes).

- sandbox: the Jinja environment (``PromptSandbox``, ``ENV``) and its size limits.
- template: one template (``Template``, ``TemplateMetadata``), its rendering and render errors.
- files: templates.yaml files: where they live, reading them, appending a new entry.
- library: ``TemplateLibrary``, every reachable template folder, and resolving references.
- checks: ``validate``, the findings of ``ift templates validate``.

Imports no other ift folder: only the top-level ``ift.errors`` and ``ift.atomic``.
"""
