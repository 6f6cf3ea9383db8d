"""A YAML loader for documents psft did not write: safe tags only, bounded, unambiguous.

On top of yaml.SafeLoader it refuses, as a yaml.MarkedYAMLError with the line:
- a mapping that names a key twice (YAML says keys are unique; PyYAML keeps the last);
- nesting deeper than MAX_DEPTH (PyYAML's composer recurses: a RecursionError otherwise);
- a document of more than MAX_VALUES values once aliases are expanded (a "billion laughs"
  document is a few hundred bytes that expand to 10**9 values in whatever walks them), or
  an alias inside the node it names;
- a scalar its tag cannot hold (`!!int` of 5000 digits, a date 2024-13-45): a ValueError
  otherwise.
It is the pure-Python loader: libyaml's composer cannot be bounded from Python, and spec
files are small (MAX_SPEC_BYTES in psft.workflows.spec_file).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from psft.workflows.errors import shown

MAX_DEPTH = 64
"""Nesting levels a document may have; a PSFTJob has about six."""
MAX_VALUES = 100_000
"""Values (scalars, lists, mappings) a document may hold, each use of an alias counted in
full; a PSFTJob has a few hundred."""

MERGE_TAG = "tag:yaml.org,2002:merge"


class SafeLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, too_deep(), self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Node) -> Any:
        _measure(node, 1, {}, set())
        return super().construct_document(node)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError):
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise ConstructorError(
                None, None, f"cannot read {shown(node.value)} as {tag}", node.start_mark
            ) from None

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue  # `<<: *base` then a key of base: an override YAML allows
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error names it
            if earlier is not None:
                raise ConstructorError(
                    None,
                    None,
                    f"key {shown(key)} appears twice in the same mapping (first on line "
                    f"{earlier}); keep one",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def too_deep() -> str:
    return (
        f"nested more than {MAX_DEPTH} levels deep; a PSFTJob has about six: is this the "
        "right file?"
    )


def too_many_values() -> str:
    return (
        f"holds more than {MAX_VALUES} values once its aliases (*name) are expanded; a PSFTJob "
        "has a few hundred: remove the aliases or the extra data"
    )


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _measure(node: Node, depth: int, known: dict[int, tuple[int, int]], open_: set[int]) -> int:
    """Values under `node` (itself included) with aliases expanded; raises past the bounds.

    Aliases make the node graph a DAG whose expansion can be exponential: each node is
    measured once (`known`: id -> (values, height)), so this costs the graph, not its
    expansion. `open_` holds the nodes being measured: meeting one again is a cycle."""
    if id(node) not in known:
        if id(node) in open_:
            raise ComposerError(
                None,
                None,
                "this node refers to itself through an alias (*name); remove that alias",
                node.start_mark,
            )
        if depth > MAX_DEPTH:
            raise ComposerError(None, None, too_deep(), node.start_mark)
        open_.add(id(node))
        values, height = 1, 1
        for child in _children(node):
            values += _measure(child, depth + 1, known, open_)
            height = max(height, known[id(child)][1] + 1)
            if values > MAX_VALUES:
                raise ComposerError(None, None, too_many_values(), node.start_mark)
        open_.discard(id(node))
        known[id(node)] = (values, height)
    values, height = known[id(node)]
    if depth + height - 1 > MAX_DEPTH:
        raise ComposerError(None, None, too_deep(), node.start_mark)
    return values


def load(text: str) -> Any:
    """The single document in `text`; yaml.YAMLError (marked with the line) when refused."""
    loader = SafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
