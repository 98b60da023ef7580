"""Files read as plain data within bounds: every YAML text the project reads (run configs, dotted
overrides, launch presets) goes through `load_yaml`, and the JSON files a checkpoint or a Hugging
Face folder carries (manifest, index, config.json) through `read_json`.

YAML. PyYAML's safe loader builds no objects, but it shares an aliased node instead of copying it:
ten nested anchors of ten aliases each (an "alias bomb") load in a millisecond as about 10^9
values, and whatever walks them next (a check, a copy, the saved run config) never finishes.
A key given twice, or a section written twice, silently keeps the last one. Here the text is
composed into nodes first, and refused with `YAMLError` naming the source and line when

- a mapping repeats a key (a top-level repeat is a repeated section);
- the values it holds, counting every alias as the copy it stands for, exceed MAX_VALUES
  (anchors and aliases within that budget are fine), or an anchor contains itself;
- it nests deeper than the parser can follow, or the text exceeds MAX_BYTES.

JSON. A file larger than the caller's bound, text that is not JSON (or nests past Python's
recursion limit) and a top level that is not an object are refused with the caller's error.

    load_yaml("train: {steps: 5}", "run.yaml")               # {"train": {"steps": 5}}
    read_json(path, "manifest.json", 16 * 2**20, ManifestError)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 4 * 2**20  # a run config is a few KB
MAX_VALUES = 100_000  # scalars, lists and mappings after expanding aliases; a run config has ~100
_MERGE = "tag:yaml.org,2002:merge"


class YAMLError(ValueError):
    """YAML that is not plain bounded data; the message names the source and the line."""


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_keys(node: yaml.MappingNode, source: str) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if key.tag == _MERGE or not isinstance(key, yaml.ScalarNode):
            continue
        if (key.tag, key.value) in seen:
            raise YAMLError(f"{source}: key {key.value!r} at line {_line(key)} repeats the one at line "
                            f"{seen[key.tag, key.value]}; the second would silently replace the first")
        seen[key.tag, key.value] = _line(key)


def _expanded_size(root: yaml.Node, source: str) -> int:
    """The number of values `root` stands for with every alias copied out, computed once per node
    (so in time linear in the text); YAMLError past MAX_VALUES or on an anchor inside itself."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if children_done:
            on_path.discard(id(node))
            size = 1 + sum(sizes[id(child)] for child in _children(node))
            if size > MAX_VALUES:
                raise YAMLError(f"{source}: the value at line {_line(node)} expands to more than {MAX_VALUES} values "
                                "(nested anchors and aliases?); write the values out")
            sizes[id(node)] = size
            continue
        if id(node) in on_path:
            raise YAMLError(f"{source}: the anchor at line {_line(node)} refers to itself")
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, source)
        on_path.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise YAMLError(f"{source}: the anchor at line {_line(child)} refers to itself")
            stack.append((child, False))
    return sizes[id(root)]


def load_yaml(text: str, source: str) -> Any:
    """The data of one YAML document, checked as above; `source` names it in messages."""
    if len(text) > MAX_BYTES:
        raise YAMLError(f"{source} is {len(text)} characters long, above the {MAX_BYTES} a config may have")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise YAMLError(f"{source} nests deeper than a config can") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise YAMLError(f"{source} is not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    finally:
        loader.dispose()


def read_json(path: str | Path, what: str, max_bytes: int, error: type[Exception] = ValueError) -> dict:
    """The JSON object in file `path` (at most `max_bytes`); `error` names `what` and the problem."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{what} is {size} bytes, more than such a file holds ({max_bytes})")
    try:
        values = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as problem:  # UnicodeDecodeError is a ValueError
        raise error(f"{what} is not JSON ({type(problem).__name__}: {str(problem)[:120]})") from None
    if not isinstance(values, dict):
        raise error(f"{what} holds a JSON {type(values).__name__}, not an object")
    return values
