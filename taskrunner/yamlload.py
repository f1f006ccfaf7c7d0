"""YAML as taskrun reads it: PyYAML enters taskrun here (`load_yaml`, used by taskfile.py for front
matter and by config.py for .taskrun.yaml), so its exceptions are translated in one place, with line and
column. Strict: a key given twice in one mapping is refused, and so are nesting past MAX_YAML_DEPTH and
alias expansions past MAX_YAML_VALUES. PyYAML itself is imported by the first YAML parsed
(`taskrun status` with records alone never does).
"""

from __future__ import annotations

from typing import Any

from taskrunner.errors import ConfigError, TaskFileError
from taskrunner.lazymodule import lazy

yaml = lazy("yaml")



def _strict_loader() -> Any:
    """The SafeLoader subclass that refuses a key given twice in one mapping, made on first use (PyYAML is
    imported only by what parses YAML: `taskrun status` with records alone never does).

    Plain safe_load keeps the last value silently; a Task or configuration
    that says two things about one key is ambiguous, so it is refused.
    """
    global _loader
    if _loader is not None:
        return _loader

    class StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # (yaml is a lazy stand-in: Any)
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                # `<<` merge keys may repeat and legitimately override; skip them.
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key '{key_node.value}'",
                        key_node.start_mark,
                    )
                seen.add(ident)
            return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]

    _loader = StrictLoader
    return _loader


_loader: Any = None


#: Deepest nesting of lists and mappings a Task file or the configuration may have.
MAX_YAML_DEPTH = 64
#: Most values a document may hold with its aliases (`*name`) expanded: a "billion laughs" (each anchor
#: a list of aliases of the one before) holds more than memory wherever anything walks it (repr, JSON).
MAX_YAML_VALUES = 100_000


def _check_shape(text: str, file: str, error: type[TaskFileError] | type[ConfigError], first_line: int) -> None:
    """Refuse nesting past MAX_YAML_DEPTH and expansions past MAX_YAML_VALUES before anything is built
    (PyYAML's event parser neither recurses nor expands: cheap where the composer recurses and fails)."""
    sizes: dict[str, int] = {}  # anchor -> values it expands to
    open_: list[tuple[str | None, int]] = [(None, 0)]  # (anchor, values so far) per open collection
    for event in yaml.parse(text, Loader=_strict_loader()):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_) > MAX_YAML_DEPTH:  # the same words as the composer's RecursionError below
                raise error(file, "invalid YAML: nested too deeply")
            open_.append((event.anchor, 1))
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, size = open_.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, size = None, sizes.get(event.anchor or "", 1)
        else:
            continue
        if anchor is not None:
            sizes[anchor] = size
        parent, total = open_[-1]
        open_[-1] = (parent, total + size)
        if total + size > MAX_YAML_VALUES:
            where = f"line {event.start_mark.line + first_line}, column {event.start_mark.column + 1}"
            raise error(file, f"invalid YAML at {where}: more than {MAX_YAML_VALUES} values, each alias "
                              "(*name) counted as what it stands for")


def load_yaml(
    text: str,
    file: str,
    error: type[TaskFileError] | type[ConfigError],
    first_line: int = 1,
) -> object:
    """Parse YAML text, raising `error(file, reason)` with line and column.

    `first_line` is the file line the text starts on, so that positions in
    front matter point into the Task file rather than into the snippet. Any PyYAML failure is `error`.
    """
    try:
        _check_shape(text, file, error, first_line)
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is None:
            raise error(file, f"invalid YAML: {problem}") from exc
        where = f"line {mark.line + first_line}, column {mark.column + 1}"
        raise error(file, f"invalid YAML at {where}: {problem}") from exc
    except yaml.reader.ReaderError as exc:  # control characters: a position, no mark
        line = text.count("\n", 0, exc.position) + first_line
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        reason = f"character #x{exc.character:04x} is not allowed"
        raise error(file, f"invalid YAML at line {line}, column {column}: {reason}") from exc
    except yaml.YAMLError as exc:
        raise error(file, f"invalid YAML: {exc}") from exc
    except RecursionError as exc:  # PyYAML's composer recurses per nesting level
        raise error(file, "invalid YAML: nested too deeply") from exc
    except (ValueError, OverflowError, TypeError) as exc:
        # PyYAML's constructors call int() and datetime() unguarded: 5000 digits, 2001-13-40, a zone of -99:99.
        raise error(file, f"invalid YAML: a value cannot be read: {exc}") from exc
