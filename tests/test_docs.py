"""The docs: the README stays a front page; the command reference generated from the Typer app names every
command and option; the API page lists every verb.  (``make test`` also runs ``mkdocs build --strict``.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 8192
    head = text.splitlines()[:15]
    assert "make demo" in "\n".join(head) and "make test" in "\n".join(head)
    assert "../shared" not in text and "/work/" not in text


def test_cli_reference_names_every_command_and_option():
    from kagglecmr.cli import app

    ref = _hook("cli_reference")
    page = ref.render_cli_reference()
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")  # a click Group (typer may bundle its own click)
    expected = []
    for name, cmd in group.commands.items():
        expected.append(f"kagglecmr {name}")
        for param in cmd.params:
            if param.param_type_name == "option":
                expected += list(param.opts) + list(param.secondary_opts)
    missing = [e for e in expected if e not in page]
    assert not missing, missing
    assert len(group.commands) >= 11 and not ref.check_cli_reference(page)


def test_python_api_page_lists_every_verb():
    from kagglecmr import api

    text = (ROOT / "docs" / "python-api.md").read_text()
    verbs = [v for v in api.__all__ if v[0].islower()]
    missing = [v for v in verbs if v not in text]
    assert not missing, missing
