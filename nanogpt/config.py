"""Typed configuration: a dataclass, named recipe files, and `--key=value` overrides (DESIGN.md, contract 1).

One command-line grammar for every entry point of both trainers (nanogpt.train, modded_nanogpt.train_gpt, the
samplers):   python -m PACKAGE.MODULE [RECIPE] [--key=value | --key value | --flag] ...
A run's settings come from these layers, later ones winning:
  1. the dataclass defaults,
  2. an optional recipe: a TOML file holding only its deltas from the defaults, given by name
     (`<package>/recipes/NAME.toml`) or by path, as the first argument (`--recipe=NAME` is the older
     spelling, still accepted),
  3. settings a trainer takes from the environment (the speedrun's DISABLE_FP8),
  4. `--key=value` (or `--key value`; a bare `--flag` sets a boolean) on the command line.
Unknown keys and values of the wrong type fail loudly, naming the key and the valid choices.
No `exec`: recipes are data. Lists of integers are comma-separated (`--layers=0,2`; `none` = empty).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
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


def _is_int_list(tp) -> bool:
    return typing.get_origin(tp) is list and typing.get_args(tp) == (int,)


def _describe(tp) -> str:
    base, optional = _unwrap_optional(tp)
    name = "list[int]" if _is_int_list(base) else getattr(base, "__name__", str(base))
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
    elif _is_int_list(base):
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        if isinstance(value, str):
            text = value.strip().strip("[]").strip()
            if text.lower() in ("", "none"):
                return []
            try:
                return [int(v) for v in text.split(",")]
            except ValueError:
                pass
    else:
        raise ConfigError(f"{key}: unsupported field type {tp!r}")
    raise ConfigError(f"{key}: cannot read {value!r} as {_describe(tp)}")


def field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown setting {key} {where}{hint} (valid: {', '.join(sorted(valid))})")


def resolve_recipe(name_or_path: str, recipe_dir: Path = RECIPE_DIR) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return path
    candidate = recipe_dir / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in recipe_dir.glob("*.toml"))
    raise ConfigError(f"no recipe {name_or_path!r} (not a .toml file, nor a recipe of {recipe_dir}; known recipes: "
                      f"{', '.join(known)})")


def split_recipe(argv: list[str]) -> tuple[str | None, list[str]]:
    """(RECIPE or None, the other arguments): the recipe is the first argument when it is not an option, or
    `--recipe=NAME` / `--recipe NAME` anywhere (the older spelling); two recipes are an error."""
    rest, found = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if i == 0 and not arg.startswith("-"):
            found.append(arg)
        elif arg == "--recipe":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError("--recipe needs a value (--recipe=NAME, or the recipe as the first argument)")
            i += 1
            found.append(argv[i])
        elif arg.startswith("--recipe="):
            found.append(arg.partition("=")[2])
        else:
            rest.append(arg)
        i += 1
    if len(found) > 1:
        raise ConfigError(f"two recipes given ({', '.join(map(repr, found))}): give one, as the first argument")
    if found and not found[0]:
        raise ConfigError("--recipe= is empty: give a recipe name or a .toml path")
    return (found[0] if found else None), rest


def load_recipe(path: Path, types_by_key: dict) -> dict:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    values = {}
    for key, value in raw.items():
        if key not in types_by_key:
            raise _unknown_key(key, list(types_by_key), f"in {path}")
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
            raise _unknown_key(f"--{key}", list(types_by_key), "on the command line")
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


def parse_config(cls, argv: list[str] | None, recipe_dir: Path = RECIPE_DIR, environment: dict | None = None):
    """Build `cls` from [RECIPE] --key=value ... (the module docstring's layers; `environment` holds the
    settings a trainer takes from environment variables); returns (config, recipe_path or None)."""
    recipe, overrides = split_recipe(list(argv or []))
    types_by_key = field_types(cls)
    recipe_path = None
    values: dict = {}
    if recipe is not None:
        recipe_path = resolve_recipe(recipe, recipe_dir)
        values.update(load_recipe(recipe_path, types_by_key))
    values.update(environment or {})
    values.update(parse_overrides(overrides, types_by_key))
    return cls(**values), recipe_path


def field_comments(cls) -> dict[str, str]:
    """Each field's help text from the dataclass's source: the comment at the end of its line, else the comment
    lines right above it (the settings are documented where they are declared). A field a dataclass inherits has
    the text of the class that declares it last."""
    found = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and "__dataclass_fields__" in vars(klass):
            found |= {name: text for name, text in _own_field_comments(klass).items() if text or name not in found}
    return found


def _own_field_comments(cls) -> dict[str, str]:
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


def usage(doc: str, cls) -> str:
    """--help of an entry point: its docstring (the commands), then every setting with default and description."""
    return f"{doc.strip()}\n\nsettings (RECIPE first, then --key=value; defaults shown):\n{config_help(cls)}"


def exit_status(main, exit_statuses: dict[type, int]) -> int:
    """Run an entry point's main() (no arguments: a closure over argv) as its command line does: an error of a
    type in `exit_statuses` is one line on stderr, "error: ...", and that status, without a traceback; 0 when
    main() returns. Every entry point of both trainers and of the reports ends this way."""
    try:
        main()
    except tuple(exit_statuses) as e:
        print(f"error: {e}", file=sys.stderr)
        return next(status for kind, status in exit_statuses.items() if isinstance(e, kind))
    return 0


def trainer_exit_status(main, exit_statuses: dict[type, int]) -> int:
    """exit_status() for a trainer's main(): a bad setting or bad data is 2, a run directory that cannot be
    written 1; Ctrl-C before the training loop, or twice in it, is 130 (nothing more was saved)."""
    try:
        return exit_status(main, exit_statuses)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): stopped without a checkpoint; checkpoints already written stay, and the same "
              "command resumes from the newest", file=sys.stderr)
        return 130
