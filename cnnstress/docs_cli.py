"""docs/cli.md, generated from the Config field metadata and the CLI's parser.

    python -m cnnstress.docs_cli docs/cli.md     # rewrite it (no argument: print it)

The flags are made from Config's fields (cnnstress.__main__.add_config_flags),
so this page is too: a new field or a changed help text shows up here on the
next regeneration, and tests/test_docs.py fails until it is regenerated.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from .__main__ import COMMAND_GROUPS, GROUP_TITLES, COMMANDS, build_parser, flag_name
from .config import GROUPS, PROFILES, Config, get_config
from .io import ENV_DATA_DIR, ENV_OUT_DIR, ENV_PROFILE, atomic_write

REGENERATE = "python -m cnnstress.docs_cli docs/cli.md"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a '|' would end the cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{command: its parser}, from the parser's subcommand action (argparse has no public accessor)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _command_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in sub._choices_actions}


def _options(command_parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in command_parser._actions if a.option_strings and a.dest != "help"]


def _flags(action: argparse.Action) -> str:
    """`--name METAVAR` (also `--alias`), for a table cell."""
    metavar = action.metavar if action.metavar is not None else (
        None if action.nargs == 0 else action.dest.upper())
    if action.nargs == "+":
        metavar = f"{metavar} [{metavar} ...]"
    first, *others = [n for n in action.option_strings if n != f"--no-{action.dest.replace('_', '-')}"]
    shown = f"`{first}{' ' + metavar if metavar else ''}`"
    if isinstance(action, argparse.BooleanOptionalAction):
        shown += f" / `--no-{action.dest.replace('_', '-')}`"
    if others:
        shown += f" (also {', '.join(f'`{n}`' for n in others)})"
    # A '|' inside a code span stays escaped in some renderers: close the span around it.
    return _cell(shown.replace("|", "`|`"))


def cli_reference() -> str:
    """The text of docs/cli.md."""
    parser = build_parser()
    parsers = _command_parsers(parser)
    helps = _command_help(parser)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    profiles = {name: get_config(name) for name in PROFILES}
    default = Config()
    lines = [
        "# Command-line reference",
        "",
        f"<!-- Generated from cnnstress.config.Config and the parser of `python -m cnnstress` by `{REGENERATE}`.",
        "     Edit those, then regenerate; tests/test_docs.py fails while this file is out of date. -->",
        "",
        "`python -m cnnstress COMMAND [options]`; `python -m cnnstress COMMAND --help` prints the same options.",
        "A bad option or value ends with one `error: ...` line and exit status 2.",
        "",
        "## Commands",
        "",
        "| command | what it does | option groups |",
        "| --- | --- | --- |",
    ]
    for command in COMMANDS:
        lines.append(f"| `{command}` | {_cell(helps[command])} | {', '.join(COMMAND_GROUPS[command])} |")
    lines += ["", "## Options of the commands", "",
              "| option | commands | what it does |", "| --- | --- | --- |"]
    # One row per option and help text: --force means something else to stress and explain.
    seen: dict[tuple[str, str], tuple[argparse.Action, list[str]]] = {}
    for command, p in parsers.items():
        for action in _options(p):
            if action.dest not in fields:
                seen.setdefault((action.dest, action.help), (action, []))[1].append(command)
    order = list(dict.fromkeys(dest for dest, _ in seen))
    for (dest, _), (action, commands) in sorted(seen.items(), key=lambda item: order.index(item[0][0])):
        lines.append(f"| {_flags(action)} | {', '.join(commands)} | {_cell(action.help)} |")
    lines += [
        "",
        "## Settings (the fields of `cnnstress.Config`)",
        "",
        "Each option sets the `Config` field of the same name (`--adv-subset` sets `adv_subset`). An option not "
        "given keeps the value of the profile (or of `--config`'s file); the columns give `Config()`'s default "
        "and each profile's value. `N|none` options take `none` for no cap.",
    ]
    for group in GROUPS:
        commands = [c for c in COMMANDS if group in COMMAND_GROUPS[c]]
        lines += ["", f"### {GROUP_TITLES[group]}", "",
                  f"Commands: {', '.join(f'`{c}`' for c in commands)}.", "",
                  f"| option | default | {' | '.join(PROFILES)} | what it sets |",
                  "| --- | --- | " + " | ".join("---" for _ in PROFILES) + " | --- |"]
        for name in Config.fields_in(group):
            action = next((a for c in commands for a in _options(parsers[c]) if a.dest == name), None)
            skipped = [c for c in commands if not any(a.dest == name for a in _options(parsers[c]))]
            note = f" Not an option of {', '.join(f'`{c}`' for c in skipped)}: the command sets it." if skipped else ""
            if name == "profile":
                values = ["(see help)"] + [f"`{p}`" for p in PROFILES]
                help_text = action.help
            else:
                values = [f"`{_value(getattr(default, name))}`"] + [
                    f"`{_value(getattr(cfg, name))}`" for cfg in profiles.values()]
                help_text = fields[name].metadata["help"]
            flags = _flags(action) if action is not None else f"`{flag_name(name)}`"
            lines.append(f"| {flags} | {' | '.join(values)} | {_cell(help_text + '.' + note)} |")
    lines += [
        "",
        "## Environment",
        "",
        "| variable | sets the default of |",
        "| --- | --- |",
        f"| `{ENV_PROFILE}` | `--profile` (else `full` on a GPU, `quick` on a CPU) |",
        f"| `{ENV_DATA_DIR}` | `--data-dir` (else `data`) |",
        f"| `{ENV_OUT_DIR}` | `--out-dir` (else `outputs`) |",
        "",
        "The notebook's setup cell reads the same variables.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    text = cli_reference()
    if not args:
        sys.stdout.write(text)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print(f"usage: {REGENERATE.replace('docs/cli.md', '[PATH]')}  (no PATH: print to stdout)", file=sys.stderr)
        return 2
    path = Path(args[0])
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
