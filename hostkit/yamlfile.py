"""Reading `inventory.yaml` as untrusted input: bounded in size, aliases, depth and expansion.

The file is at most `MAX_INVENTORY_BYTES` of UTF-8 text. Its YAML events are counted before any
document is built, so aliases (`*name`), nesting and the size with aliases expanded stay within
`MAX_ALIASES`, `MAX_DEPTH` and `MAX_VALUES`: a crafted file (a nested alias bomb, a thousand
brackets, a cycle) is one line naming the file and the line, never minutes of expansion. Then
YAML's safe loader (libyaml's when present) builds plain data, with a key given twice refused
instead of silently winning. The file is data, never code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from hostkit.errors import InventoryError, first_line, shown

__all__ = ["load_yaml_file", "MAX_INVENTORY_BYTES", "MAX_ALIASES", "MAX_DEPTH", "MAX_VALUES"]

# Limits on the file, far above what a fleet needs (5,000 boards fit in 1 MiB with 20 values each).
MAX_INVENTORY_BYTES = 1 << 20
MAX_ALIASES = 32
MAX_DEPTH = 16
MAX_VALUES = 200_000


def load_yaml_file(path: Path) -> Any:
    """The file's one YAML document as plain data, or InventoryError naming the file (and line)."""
    return _load_yaml(_read_text(path), path)


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_INVENTORY_BYTES + 1)
    except OSError as exc:
        raise InventoryError(f"cannot read inventory file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_INVENTORY_BYTES:
        raise InventoryError(f"{path}: larger than {MAX_INVENTORY_BYTES >> 20} MiB; an inventory "
                             "is a short YAML file (is this the right file?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InventoryError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                             f"{exc.start}); an inventory is a YAML text file") from exc


class _Refused(Exception):
    """The file breaks one of the limits, or repeats a key; `line` is where (1-based)."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def _load_yaml(text: str, path: Path) -> Any:
    import yaml

    loader = _strict_loader()
    try:
        _check_events(yaml.parse(text, Loader=loader))
        return yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader, see _strict_loader)
    except _Refused as exc:
        raise InventoryError(f"{path} line {exc.line}: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise InventoryError(f"{path}{line}: not valid YAML: "
                             f"{getattr(exc, 'problem', None) or first_line(exc)}") from exc
    except (ValueError, OverflowError) as exc:  # a date or an integer Python will not build
        reason = first_line(exc).split("; use sys.set_int_max_str_digits")[0]
        raise InventoryError(f"{path}: holds a value edgekit cannot read: {reason}") from exc


def _check_events(events: Iterator[Any]) -> None:
    """What building the document would cost, counted on YAML's events before it is built.

    Aliases are counted, an alias inside the collection it names is refused (a cycle), and each
    node's expanded size and depth are added up with aliases expanded, which is what a nested
    alias bomb multiplies.
    """
    import yaml

    done: dict[str, tuple[int, int]] = {}  # anchor -> (values, depth) of its finished node
    stack: list[list[Any]] = []  # open collections: [anchor, values, depth]
    aliases = 0
    for event in events:
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append([event.anchor, 1, 1])
            if len(stack) > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", line)
            continue
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _Refused(f"more than {MAX_ALIASES} aliases (*name); an inventory needs few "
                               "or none: share settings through groups or defaults", line)
            if any(open_[0] == event.anchor for open_ in stack):
                raise _Refused(f"alias *{event.anchor} sits inside the value it names", line)
            anchor, (values, depth) = None, done.get(event.anchor or "", (1, 1))
        elif isinstance(event, yaml.ScalarEvent):
            anchor, values, depth = event.anchor, 1, 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, values, depth = stack.pop()
        else:
            continue  # stream and document boundaries
        if anchor is not None:
            done[anchor] = (values, depth)
        if stack:
            top = stack[-1]
            top[1] += values
            top[2] = max(top[2], depth + 1)
            if top[1] > MAX_VALUES:
                raise _Refused(f"expands to more than {MAX_VALUES} values (aliases counted "
                               "expanded); an inventory needs far fewer", line)
            if len(stack) + depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", line)


def _strict_loader() -> type:
    """yaml's safe loader (libyaml's when present), but a key given twice is an error instead of
    silently winning."""
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class StrictLoader(base):  # type: ignore[misc, valid-type]
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: the base's keys, which yaml merges below
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # a list or mapping as a key: yaml's own check refuses it
                if duplicate:
                    raise _Refused(f"duplicate key {shown(key)}; each device, group and setting "
                                   "may appear once", key_node.start_mark.line + 1)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader
