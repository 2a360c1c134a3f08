"""Typed configuration: a dataclass, named recipe files, and `--key=value` overrides.

A run's settings come from three layers, later ones winning:
  1. the dataclass defaults,
  2. an optional recipe: a TOML file holding only its deltas from the defaults, given by name
     (`nanogpt/recipes/NAME.toml`) or by path, as the first positional argument,
  3. `--key=value` (or `--key value`) overrides on the command line.
Unknown keys and values of the wrong type fail loudly, naming the key and the valid choices.
No `exec`: recipes are data.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


class ConfigError(ValueError):
    """A bad setting: unknown key, wrong type, missing recipe or an invalid combination."""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _unwrap_optional(tp):
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _describe(tp) -> str:
    base, optional = _unwrap_optional(tp)
    name = getattr(base, "__name__", str(base))
    return f"{name} or None" if optional else name


def coerce(key: str, value, tp):
    """Convert `value` (a string from the command line, or a TOML value) to the field type `tp`."""
    base, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key}: None is not allowed (expected {_describe(tp)})")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():  # accepts 1e6 and 524_288
                return int(number)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: unsupported field type {tp!r}")
    raise ConfigError(f"{key}: {value!r} is not a valid {_describe(tp)}")


def field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}.{hint} Valid keys: {', '.join(sorted(valid))}")


def resolve_recipe(name_or_path: str, recipe_dir: Path = RECIPE_DIR) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return path
    candidate = recipe_dir / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in recipe_dir.glob("*.toml"))
    raise ConfigError(f"recipe {name_or_path!r} not found (neither a .toml file nor one of: {', '.join(known)})")


def load_recipe(path: Path, types_by_key: dict) -> dict:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    values = {}
    for key, value in raw.items():
        if key not in types_by_key:
            raise _unknown_key(key, list(types_by_key), str(path))
        values[key] = coerce(f"{path.name}: {key}", value, types_by_key[key])
    return values


def parse_overrides(args: list[str], types_by_key: dict) -> dict:
    """Parse `--key=value` / `--key value` into typed values."""
    values, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: settings are given as --key=value")
        key, sep, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types_by_key:
            raise _unknown_key(key, list(types_by_key), "the command line")
        if not sep:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                base, _ = _unwrap_optional(types_by_key[key])
                if base is not bool:
                    raise ConfigError(f"--{key} needs a value (--{key}=...)")
                value = "true"  # a bare --flag switches a boolean on
            else:
                i += 1
                value = args[i]
        values[key] = coerce(f"--{key}", value, types_by_key[key])
        i += 1
    return values


def parse_config(cls, argv: list[str] | None, recipe_dir: Path = RECIPE_DIR):
    """Build `cls` from [RECIPE] --key=value ... ; returns (config, recipe_path or None)."""
    argv = list(argv or [])
    types_by_key = field_types(cls)
    recipe_path = None
    values: dict = {}
    if argv and not argv[0].startswith("--"):
        recipe_path = resolve_recipe(argv.pop(0), recipe_dir)
        values.update(load_recipe(recipe_path, types_by_key))
    values.update(parse_overrides(argv, types_by_key))
    return cls(**values), recipe_path


def field_comments(cls) -> dict[str, str]:
    """Each field's help text from the dataclass's source: the comment at the end of its line, else the comment
    lines right above it (the settings are documented where they are declared)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = comments.get(node.lineno)
            row = node.lineno - 1
            above = []
            while text is None and row >= 1 and lines[row - 1].lstrip().startswith("#") and row in comments:
                above.insert(0, comments[row])
                row -= 1
            if text is None and above and not above[0].startswith("---"):
                text = " ".join(above)
            found[node.target.id] = text or ""
    return found


def config_help(cls) -> str:
    """One line per setting: name, default and type, then its description (the comment beside its declaration)."""
    lines = []
    docs = field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        doc = f.metadata.get("help") or docs.get(f.name, "")
        lines.append(f"  --{f.name}={default!r}  ({_describe(field_types(cls)[f.name])})" + (f"\n      {doc}" if doc else ""))
    return "\n".join(lines)
