"""MkDocs hook: the command reference, generated from the Typer app ``kagglecmr.cli:app``.

Every page under ``docs/commands/`` may hold a marker line ``<!-- cli:NAME -->``: the hook replaces it with
the usage, description and option table of command ``NAME``; ``<!-- cli:summary -->`` becomes a table of all
commands linking to their pages.  A command without a page of its own gets a generated one (and a nav entry),
and a marker naming a command the app does not have fails the build, so the reference always lists exactly
the commands and options the installed CLI has.

For tests (no MkDocs needed)::

    from cli_reference import render_cli_reference, cli_option_names
    page = render_cli_reference()
    assert all(f"`{name}`" in page for name in cli_option_names())

Works with Typer on click and with Typer's own vendored click (only attributes both share are used).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CLI_MODULE = "kagglecmr.cli"
PROG = "kagglecmr"
PAGES_DIR = "commands"  # docs/commands/<command>.md
MARKER = re.compile(r"^<!--\s*cli:([\w-]+)\s*-->[ \t]*$", re.MULTILINE)


# ------------------------------------------------------------------------------------------------ the app
def _root_command():
    """The click (or Typer-click) group behind ``kagglecmr.cli:app``."""
    import importlib

    import typer

    app = importlib.import_module(CLI_MODULE).app
    return typer.main.get_command(app)


def _context(command, name: str, parent=None):
    return command.context_class(command, info_name=name, parent=parent)


def _commands() -> list[tuple[str, object, object]]:
    """``[(name, command, context)]`` in the order the app lists them (hidden commands left out)."""
    root = _root_command()
    root_ctx = _context(root, PROG)
    out = []
    names = list(getattr(root, "commands", {})) or root.list_commands(root_ctx)  # definition order, not sorted
    for name in names:
        cmd = root.get_command(root_ctx, name)
        if cmd is None or getattr(cmd, "hidden", False):
            continue
        out.append((name, cmd, _context(cmd, name, root_ctx)))
    return out


def command_names() -> list[str]:
    """Names of the app's commands, in the app's order."""
    return [name for name, _, _ in _commands()]


def _visible_params(cmd) -> list:
    return [p for p in cmd.params if not getattr(p, "hidden", False)]


def _is_argument(param) -> bool:
    return getattr(param, "param_type_name", "") == "argument"


def cli_option_names() -> dict[str, list[str]]:
    """``{command: [every option string (--full, --no-full, -f, ...) and every argument's NAME]}``."""
    names = {}
    for name, cmd, _ in _commands():
        opts: list[str] = []
        for p in _visible_params(cmd):
            if _is_argument(p):
                opts.append(_argument_label(p))
            else:
                opts.extend([*p.opts, *getattr(p, "secondary_opts", [])])
        names[name] = opts
    return names


# ----------------------------------------------------------------------------------------------- rendering
def _argument_label(param) -> str:
    label = (param.name or "").upper()
    return f"{label}..." if getattr(param, "nargs", 1) == -1 else label


def _type_label(param, ctx) -> str:
    if getattr(param, "is_flag", False) and not getattr(param, "count", False):
        return "flag"
    ptype = getattr(param, "type", None)
    if ptype is not None and getattr(ptype, "name", None):  # click
        label = ptype.name.lower()
        lo, hi = getattr(ptype, "min", None), getattr(ptype, "max", None)
    else:  # Typer's vendored click: "<int range>", "<list[Path]>"
        try:
            label = str(param.display_type(ctx)).strip("<>")
        except Exception:  # an API we do not know: the option table still lists the option
            label = ""
        lo, hi = getattr(param, "min", None), getattr(param, "max", None)
    label = label.replace(" range", "")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    label = {"str": "text", "string": "text", "integer": "int", "boolean": "bool"}.get(label.lower(), label.lower())
    bounds = ([f"≥ {lo}"] if lo is not None else []) + ([f"≤ {hi}"] if hi is not None else [])
    return ", ".join([label, *bounds]) if label else ", ".join(bounds)


def _default_label(param) -> str:
    if getattr(param, "required", False):
        return "required"
    default = getattr(param, "default", None)
    if callable(default):
        return "(computed)"
    if getattr(param, "secondary_opts", None) and isinstance(default, bool):  # --full/--no-full
        return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
    if getattr(param, "is_flag", False) and default is False:
        return "off"
    if default is None or default == [] or default == ():
        return "—"
    if isinstance(default, (list, tuple)):
        return ", ".join(f"`{d}`" for d in default)
    return f"`{default}`"


def _cell(text: str) -> str:
    """Table-cell safe: one line, pipes escaped, ``<``/``>`` as entities outside code spans."""
    text = " ".join(str(text).split())
    parts = re.split(r"(`[^`]*`)", text)
    parts = [p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in parts]
    return "".join(parts).replace("|", "\\|")


def _help_text(param) -> str:
    text = getattr(param, "help", None) or ""
    if getattr(param, "multiple", False) and "repeat" not in text:
        text += " Repeatable."
    return text


def _usage(name: str, cmd) -> str:
    params = _visible_params(cmd)
    args = [_argument_label(p) if getattr(p, "required", False) else f"[{_argument_label(p)}]"
            for p in params if _is_argument(p)]
    return " ".join([PROG, name, *(["[OPTIONS]"] if any(not _is_argument(p) for p in params) else []), *args])


def _command_help(cmd) -> str:
    return (getattr(cmd, "help", None) or "").strip()


def render_command(name: str, heading_level: int = 0) -> str:
    """Markdown for one command: usage line, description, arguments and options tables.

    ``heading_level`` > 0 starts with a heading of that level naming the command."""
    found = {cname: (cmd, ctx) for cname, cmd, ctx in _commands()}
    if name not in found:
        raise KeyError(f"{PROG} has no command {name!r} (commands: {', '.join(found)})")
    cmd, ctx = found[name]
    out = []
    if heading_level:
        out += [f"{'#' * heading_level} {PROG} {name}", ""]
    out += ["```text", _usage(name, cmd), "```", ""]
    help_text = _command_help(cmd)
    if help_text:
        out += [_escape_prose(help_text), ""]
    params = _visible_params(cmd)
    args = [p for p in params if _is_argument(p)]
    opts = [p for p in params if not _is_argument(p)]
    if args:
        out += ["| argument | type | | description |", "|---|---|---|---|"]
        for p in args:
            out.append(f"| `{_argument_label(p)}` | {_cell(_type_label(p, ctx))} | "
                       f"{'required' if getattr(p, 'required', False) else 'optional'} | {_cell(_help_text(p))} |")
        out.append("")
    if opts:
        out += ["| option | type | default | description |", "|---|---|---|---|"]
        for p in opts:
            names = ", ".join(f"`{o}`" for o in [*p.opts, *getattr(p, "secondary_opts", [])])
            out.append(f"| {names} | {_cell(_type_label(p, ctx))} | {_cell(_default_label(p))} | "
                       f"{_cell(_help_text(p))} |")
        out.append("")
    return "\n".join(out)


def _escape_prose(text: str) -> str:
    """Command help as Markdown: option names as code, lines kept as one paragraph."""
    text = " ".join(text.split())
    text = text.replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"(?<![\w`-])(--[a-z][\w-]*)", r"`\1`", text)


def render_summary(link: bool = True) -> str:
    """A table of every command with the first sentence of its help (linked to its page)."""
    out = ["| command | what it does |", "|---|---|"]
    for name, cmd, _ in _commands():
        label = f"[`{PROG} {name}`]({name}.md)" if link else f"`{PROG} {name}`"
        first = _command_help(cmd).split("\n")[0]
        out.append(f"| {label} | {_cell(first)} |")
    return "\n".join(out) + "\n"


def render_cli_reference() -> str:
    """The whole reference as one Markdown page: the summary table, then one section per command."""
    parts = [f"# {PROG} command reference", "", render_summary(link=False)]
    parts += [render_command(name, heading_level=2) for name in command_names()]
    return "\n".join(parts)


def check_cli_reference(page: str | None = None) -> list[str]:
    """Option names (and argument names) of the app missing from ``page`` (default: the rendered reference)."""
    page = render_cli_reference() if page is None else page
    return [f"{cmd} {opt}" for cmd, opts in cli_option_names().items() for opt in opts if f"`{opt}`" not in page]


# ------------------------------------------------------------------------------------------------ MkDocs
def _generated_page(name: str) -> str:
    return f"# kagglecmr {name}\n\n<!-- cli:{name} -->\n"


def _nav_commands(nav) -> list | None:
    """The nav list holding ``commands/index.md`` (None when the nav has no such section)."""
    if isinstance(nav, list):
        for item in nav:
            if isinstance(item, dict):
                for value in item.values():
                    if isinstance(value, list):
                        if any(isinstance(x, (str, dict)) and f"{PAGES_DIR}/index.md" in (
                                [x] if isinstance(x, str) else list(x.values())) for x in value):
                            return value
                        found = _nav_commands(value)
                        if found is not None:
                            return found
    return None


def on_config(config):
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:  # document the checkout being built, before any installed copy
        sys.path.insert(0, root)
    section = _nav_commands(config.nav)
    if section is not None:
        listed = {str(v) for x in section for v in ([x] if isinstance(x, str) else x.values())}
        for name in command_names():
            if f"{PAGES_DIR}/{name}.md" not in listed:
                section.append({name: f"{PAGES_DIR}/{name}.md"})
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for name in command_names():
        uri = f"{PAGES_DIR}/{name}.md"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=_generated_page(name)))
    return files


def on_page_markdown(markdown, page, config, files):
    def replace(match):
        name = match.group(1)
        if name == "summary":
            return render_summary()
        try:
            return render_command(name)
        except KeyError as exc:
            from mkdocs.exceptions import PluginError

            raise PluginError(f"{page.file.src_uri}: marker <!-- cli:{name} -->: {exc.args[0]}") from None

    return MARKER.sub(replace, markdown)


if __name__ == "__main__":  # python docs/hooks/cli_reference.py > reference.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    missing = check_cli_reference()
    if missing:
        sys.exit("missing from the reference: " + ", ".join(missing))
    print(render_cli_reference())
