"""MkDocs hook: the configuration and CLI reference pages, generated at build time.

They are written from the pydantic schema and the typer app themselves (plus the hand-kept notes
in docs/config_notes.yaml), never copied by hand, so they cannot drift from the code. Run as a
script, it prints both pages (`python docs/hooks/reference.py config|cli`).
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

DOCS = Path(__file__).resolve().parents[1]
NOTES = DOCS / "config_notes.yaml"
CONFIG_PAGE = "reference/configuration.md"
CLI_PAGE = "reference/cli.md"


def _registry_names() -> tuple[str, ...]:
    """Algorithm names are validated against the registry, not a Literal: ask it."""
    import declora.algorithms  # noqa: F401  (registers every algorithm)
    from declora.algorithms.registry import names

    return names()


# Keys whose accepted values a validator looks up at run time rather than the type spelling.
CHOICES: dict[str, Callable[[], tuple[str, ...]]] = {
    "algorithm.name": _registry_names,
    "baselines": _registry_names,
}


def leaf_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every key of the config, dotted, in schema order (sections are walked, not listed)."""
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f


def sections(model: type[BaseModel]) -> list[tuple[str, type[BaseModel] | None]]:
    """Top-level keys first (section None), then one entry per section."""
    out: list[tuple[str, type[BaseModel] | None]] = [("", None)]
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append((name, ann))
    return out


def type_name(ann: Any) -> str:
    """A reader's spelling of a type: `int or null`, `list of str`, `one of the values`."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        kinds = sorted({type(a).__name__ for a in args})
        return " or ".join(kinds)
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    return getattr(ann, "__name__", str(ann))


def literal_values(ann: Any) -> list[Any]:
    """Every value a Literal inside `ann` accepts (through unions, lists and Annotated)."""
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return list(typing.get_args(ann))
    return [v for a in typing.get_args(ann) for v in literal_values(a)]


def bounds(f: FieldInfo) -> list[str]:
    """Numeric and length constraints from the field's metadata (annotated_types)."""
    out = []
    for m in f.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "min_length", None) is not None:
            out.append(f"at least {m.min_length} item(s)")
    return out


def default_of(f: FieldInfo) -> Any:
    if f.default_factory is not None:
        return f.default_factory()  # type: ignore[call-arg]
    return f.default


def yaml_value(v: Any) -> str:
    """A default as it is written in a YAML config."""
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json")
    return json.dumps(v) if not isinstance(v, str) else v


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def key_rows(model: type[BaseModel] | None = None) -> list[dict[str, Any]]:
    """One row per config key: key, type, default, accepted values, description, note, paper."""
    from declora.config.schema import RunConfig

    model = model or RunConfig
    notes = yaml.safe_load(NOTES.read_text(encoding="utf-8")) or {}
    rows = []
    for key, f in leaf_fields(model):
        values = list(CHOICES[key]()) if key in CHOICES else literal_values(f.annotation)
        accepted = ", ".join(f"`{yaml_value(v)}`" for v in values) if values else ""
        limits = ", ".join(bounds(f))
        note = notes.get(key, {}) or {}
        rows.append(
            {
                "key": key,
                "type": type_name(f.annotation),
                "default": yaml_value(default_of(f)),
                "accepted": "; ".join(x for x in (accepted, limits) if x),
                "description": f.description or "",
                "note": note.get("note", ""),
                "paper": note.get("paper", ""),
            }
        )
    return rows


def config_reference() -> str:
    """The configuration reference page (Markdown)."""
    from declora.config.schema import RunConfig

    rows = {r["key"]: r for r in key_rows()}
    out = [
        "# Configuration reference",
        "",
        "Generated from the configuration schema (`declora.config.schema.RunConfig`) each time the",
        "site is built: every key, its type, its default (the demo job), the values it accepts and",
        "what it does. `config.yaml` in every run directory holds the fully resolved set, and",
        "`declora run --config runs/demo/config.yaml` reruns it. On the command line any key is",
        "set with `--set key=value` (the value is read as YAML), e.g.",
        "`--set topology.kind=er --set topology.p=0.4 --set baselines=[]`.",
        "",
    ]
    for name, section in sections(RunConfig):
        prefix = f"{name}." if name else ""
        keys = [k for k in rows if (k.startswith(prefix) if name else "." not in k)]
        out.append(f"## `{name}`" if name else "## Top-level keys")
        out.append("")
        doc = (section.__doc__ or "").strip() if section is not None else ""
        if doc:
            out += [" ".join(doc.split()), ""]
        out += [
            "| key | type | default | accepted | what it does | paper's term |",
            "|---|---|---|---|---|---|",
        ]
        for k in keys:
            r = rows[k]
            what = r["note"] or r["description"]  # a note, where written, says more
            out.append(
                f"| `{k}` | {r['type']} | `{_cell(r['default'])}` | {_cell(r['accepted'])} "
                f"| {_cell(what)} | {_cell(r['paper'])} |"
            )
        out.append("")
    return "\n".join(out)


def cli_reference() -> str:
    """The command-line reference page, from the typer app's own commands and options."""
    import typer

    from declora.cli import app

    group = typer.main.get_command(app)  # typer ships its own click: use it through the objects
    out = [
        "# Command-line reference",
        "",
        "Generated from the `declora` command itself each time the site is built.",
        "",
        f"{' '.join((group.help or '').split())}",
        "",
    ]
    ctx = group.context_class(group, info_name="declora")
    for name in group.list_commands(ctx):  # type: ignore[attr-defined]
        cmd = group.get_command(ctx, name)  # type: ignore[attr-defined]
        sub = cmd.context_class(cmd, info_name=name, parent=ctx)
        help_text = (cmd.help or "").strip()
        hints = typing.get_type_hints(cmd.callback, include_extras=True)  # the declared types
        out += [f"## `declora {name}`", "", "```text", cmd.get_usage(sub), "```", ""]
        if help_text:
            out += [help_text, ""]
        out += ["| option | type | default | help |", "|---|---|---|---|"]
        for p in cmd.params:
            if p.param_type_name == "argument":
                names = f"`{(p.metavar or p.name or '').upper()}` (argument)"
            else:
                names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            kind = "flag" if getattr(p, "is_flag", False) else type_name(hints.get(p.name))
            kind = kind.removesuffix(" or null")  # an option left out is simply not given
            if getattr(p, "multiple", False) or p.nargs == -1:
                kind = kind.removeprefix("list of ") + ", repeatable"
            default = "" if p.default in (None, ()) or callable(p.default) else str(p.default)
            required = " (required)" if p.required else ""
            helptext = _cell(getattr(p, "help", None) or "")
            out.append(f"| {names}{required} | {kind} | {_cell(default)} | {helptext} |")
        out.append("")
    return "\n".join(out)


def on_files(files: Any, config: Any) -> Any:
    """MkDocs event: add the generated pages to the site (they are not files in docs/)."""
    from mkdocs.structure.files import File

    for path, text in ((CONFIG_PAGE, config_reference()), (CLI_PAGE, cli_reference())):
        files.append(File.generated(config, path, content=text))
    return files


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "config"
    print(config_reference() if which == "config" else cli_reference())
