"""A command's help that reads at 80 columns: ``segflow COMMAND -h`` (or ``--help``) lists
each option once with the first sentence of its help, grouped as the full help groups
them; ``segflow COMMAND --help-all`` prints the full help (every alias, default, range and
detail). Groups (``segflow -h``, ``segflow model -h``) keep their own short listing.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from typing import Any

#: The option that prints a command's full help.
HELP_ALL = "--help-all"
#: The sentence that ends a compact help page.
FOOTER = "Every option in full: {path} {flag}"

_MARKUP = re.compile(r"\[/?(bold|dim|italic|red|green|yellow|blue|cyan|magenta)\]")


def first_sentence(text: str) -> str:
    """The first sentence of a help text, without rich markup; an option's short help."""
    text = _MARKUP.sub("", " ".join((text or "").split()))
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if (
            depth == 0
            and char in ".;"
            and text[i + 1 : i + 2] == " "
            and not _abbreviation(text, i)
        ):
            return text[: i + 1] if char == "." else text[:i]
    return text


def _abbreviation(text: str, i: int) -> bool:
    """Whether the full stop at ``i`` ends an abbreviation (e.g., i.e., etc.)."""
    return text[max(0, i - 3) : i + 1].lower() in ("e.g.", "i.e.") or text[:i].endswith("etc")


def _is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "argument"


def _names(param: Any, ctx: Any) -> str:
    if _is_argument(param):
        return (param.name or "").upper()
    shorts = [o for o in param.opts if not o.startswith("--")]
    longs = [o for o in param.opts if o.startswith("--")][:1]
    names = ", ".join([*shorts, *longs])
    if param.secondary_opts:
        names += f" / {param.secondary_opts[0]}"
    if not (param.is_flag or getattr(param, "count", False)):
        names += f" {_metavar(param, ctx)}"
    return names


def _metavar(param: Any, ctx: Any) -> str:
    if param.metavar:
        return str(param.metavar)
    shown = str(param.display_type(ctx)).strip("<>")
    if "|" in shown:
        return f"[{shown}]"
    if shown.startswith("int"):
        return "N"
    if shown.startswith("float"):
        return "X"
    return "PATH" if shown == "path" else "TEXT"


def _rows(command: Any, ctx: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    """(panel title, [(names, short help)]) in the order the full help shows them."""
    panels: dict[str, list[tuple[str, str]]] = {}
    for param in command.params:
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        if _is_argument(param):
            title = "Arguments"
        else:
            title = getattr(param, "rich_help_panel", None) or "Options"
        text = getattr(param, "help", "") or ""
        short = first_sentence(text)
        if getattr(param, "required", False) and not _is_argument(param):
            short = f"{short} (required)".strip()
        panels.setdefault(title, []).append((_names(param, ctx), short))
    order = ["Arguments", "Options"]
    return [(t, panels[t]) for t in order if t in panels] + [
        (t, rows) for t, rows in panels.items() if t not in order
    ]


def compact_help(command: Any, path: str, width: int | None = None) -> str:
    """The compact help page of ``command`` (invoked as ``path``), lines ≤ ``width``."""
    width = min(width or shutil.get_terminal_size((80, 24)).columns, 100)
    ctx = command.context_class(command, info_name=path)
    arguments = [p for p in command.params if _is_argument(p)]
    usage = " ".join(["[OPTIONS]", *(_names(p, ctx) for p in arguments)])
    lines = [f"Usage: {path} {usage}", ""]
    summary = first_sentence(command.help or "")
    if summary:
        lines += [textwrap.fill(summary, width, initial_indent="  ", subsequent_indent="  "), ""]
    rows = _rows(command, ctx)
    column = min(max((len(n) for _, group in rows for n, _ in group), default=0) + 4, 30)
    for title, group in rows:
        lines.append(f"{title}:")
        for names, short in group:
            head = f"  {names}"
            if len(head) + 2 > column:  # a long name: its help on the next line
                lines.append(head)
                head = ""
            wrapped = textwrap.wrap(short, max(width - column, 20)) or [""]
            lines.append(f"{head:<{column}}{wrapped[0]}".rstrip())
            lines += [" " * column + more for more in wrapped[1:]]
        lines.append("")
    if command.epilog:
        for line in command.epilog.split("\n\n"):
            lines += _shell_lines(line.rstrip(), width)
        lines.append("")
    lines.append(FOOTER.format(path=path, flag=HELP_ALL))
    return "\n".join(lines)


def _shell_lines(line: str, width: int) -> list[str]:
    """An example command line, continued with ``\\`` where it is wider than ``width``."""
    if len(line) <= width:
        return [line]
    indent = line[: len(line) - len(line.lstrip())]
    out = [indent]
    for word in line.split():
        if out[-1].strip() and len(out[-1]) + len(word) + 3 > width:
            out[-1] += " \\"
            out.append(indent + "    ")
        out[-1] += word if not out[-1].strip() else f" {word}"
    return out


def help_request(args: list[str], root: Any) -> tuple[str, Any, bool] | None:
    """``(path, command, full)`` when ``args`` ask for a command's help: ``-h``/``--help``
    (compact) or ``--help-all`` (full); None for anything else, a group's help included."""
    path = ["segflow"]
    command = root
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-h", "--help"):
        i += 1  # the application's own options (--debug)
    while i < len(args) and args[i] in getattr(command, "commands", {}):
        command = command.commands[args[i]]
        path.append(args[i])
        i += 1
    if hasattr(command, "commands") or len(path) == 1:
        return None
    words = args[i:]
    if "--" in words:
        words = words[: words.index("--")]
    if HELP_ALL in words:
        return " ".join(path), command, True
    if "-h" in words or "--help" in words:
        return " ".join(path), command, False
    return None
