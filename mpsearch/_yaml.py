"""Safe YAML reading with line numbers, for strict loaders that name the field and the line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mpsearch.errors import ArtifactError


def load_yaml(path: str | Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Read a YAML file with the safe loader; return the data and ``{key path: line number}``.

    Key paths are tuples of mapping keys and list indices, e.g. ``("rules", 0, "format")``.
    A missing file or a syntax error raises :class:`ArtifactError` naming the file (and line).
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{p}: not valid YAML (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ArtifactError(f"{where}: not valid YAML ({problem})") from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def _walk(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            _walk(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines)


def where(path: str | Path, lines: dict[tuple[Any, ...], int], key: tuple[Any, ...]) -> str:
    """``file:line`` of a key path (or of its nearest known parent)."""
    k = key
    while k and k not in lines:
        k = k[:-1]
    line = lines.get(k)
    return f"{path}:{line}" if line else str(path)
