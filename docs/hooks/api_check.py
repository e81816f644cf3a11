"""MkDocs hook: the Python API page documents every public function of ``kagglecmr.api``.

``docs/python-api.md`` renders ``::: kagglecmr.api`` with an explicit ``members:`` list (mkdocstrings). A listed
name the module does not have is skipped by mkdocstrings without a word, and a new function would be left out, so
this hook warns (``mkdocs build --strict`` then fails) when a public function of the module is not listed or has
no docstring; listed names the module lacks are reported at INFO level.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re

API_MODULE = "kagglecmr.api"
PAGE = "python-api.md"
log = logging.getLogger("mkdocs.hooks.api_check")


def public_functions(module_name: str = API_MODULE) -> dict[str, object]:
    """``{name: function}`` of the module's public functions (defined in it, no leading underscore)."""
    module = importlib.import_module(module_name)
    return {name: fn for name, fn in inspect.getmembers(module, inspect.isfunction)
            if not name.startswith("_") and fn.__module__ == module.__name__}


def listed_members(markdown: str, module_name: str = API_MODULE) -> list[str] | None:
    """Names in the ``members:`` list of the page's ``::: module`` block (None: no such list)."""
    lines = markdown.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == f"::: {module_name}")
    except StopIteration:
        return None
    names, in_members = [], False
    for line in lines[start + 1:]:
        if line and not line[0].isspace():
            break  # the end of the block's indented options
        if line.strip() == "members:":
            in_members = True
        elif in_members:
            m = re.fullmatch(r"\s+-\s*(\w+)\s*", line)
            if not m:
                break
            names.append(m.group(1))
    return names if in_members else None


def api_problems(markdown: str) -> tuple[list[str], list[str]]:
    """``(warnings, notes)`` about the page's member list against the module."""
    listed = listed_members(markdown)
    if listed is None:
        return [], []
    functions = public_functions()
    warnings = [f"api_check: {API_MODULE}.{name} is public but not listed in {PAGE}"
                for name in functions if name not in listed]
    warnings += [f"api_check: {API_MODULE}.{name} has no docstring" for name in listed
                 if name in functions and not inspect.getdoc(functions[name])]
    notes = [f"api_check: {PAGE} lists {name}, which {API_MODULE} does not have (skipped)"
             for name in listed if name not in functions]
    return warnings, notes


def on_config(config):
    import sys
    from pathlib import Path

    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:  # document the checkout being built, before any installed copy
        sys.path.insert(0, root)
    return config


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == PAGE:
        warnings, notes = api_problems(markdown)
        for text in warnings:
            log.warning(text)
        for text in notes:
            log.info(text)
    return markdown
