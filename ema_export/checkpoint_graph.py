"""Read a checkpoint's object graph and line it up with live Python objects.

A TF2 checkpoint stores `_CHECKPOINTABLE_OBJECT_GRAPH`: nodes with named children, and per variable the checkpoint
key and `full_name` (the variable's name when it was saved). Walking that graph and the model's own trackable
children side by side by local name is exactly how `tf.train.Checkpoint` matches values to objects, so it tells,
before anything is restored, which checkpoint entry each model variable will receive.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_VALUE = "VARIABLE_VALUE"


@dataclass(frozen=True)
class GraphVariable:
    """One variable entry of a checkpoint's object graph."""

    node_id: int
    path: tuple[str, ...]
    checkpoint_key: str
    full_name: str


def read_object_graph(reader: tf.train.CheckpointReader) -> trackable_object_graph_pb2.TrackableObjectGraph | None:
    """The object graph proto, or None for a name-based (TF1 Saver) checkpoint."""
    if not reader.has_tensor(OBJECT_GRAPH_KEY):
        return None
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
    return graph


def walk(
    graph: trackable_object_graph_pb2.TrackableObjectGraph, start: int = 0
) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Every node reachable from node `start`, once, with its breadth-first path of local names.

    Breadth-first is the order TensorFlow names checkpoint keys by, so a node's path here is the path in its key. This
    is the one object-graph walker: every other lookup by path is built on it.
    """
    seen = {start}
    queue: deque[tuple[int, tuple[str, ...]]] = deque([(start, ())])
    while queue:
        node_id, path = queue.popleft()
        yield node_id, path
        for child in graph.nodes[node_id].children:
            if child.node_id not in seen:
                seen.add(child.node_id)
                queue.append((child.node_id, path + (child.local_name,)))


def node_paths(graph: trackable_object_graph_pb2.TrackableObjectGraph, start: int = 0) -> dict[int, tuple[str, ...]]:
    """Node id -> breadth-first path from `start`, for every node reachable from it."""
    return dict(walk(graph, start))


def value_attribute(
    graph: trackable_object_graph_pb2.TrackableObjectGraph, node_id: int
) -> trackable_object_graph_pb2.TrackableObjectGraph.TrackableObject.SerializedTensor | None:
    """The node's saved variable value (checkpoint key and full name), or None when the node is no variable."""
    return next((a for a in graph.nodes[node_id].attributes if a.name == VARIABLE_VALUE), None)


def iter_variables(graph: trackable_object_graph_pb2.TrackableObjectGraph, start: int = 0) -> Iterator[GraphVariable]:
    """Every variable below node `start`, once, by breadth-first path (the path TensorFlow used for its key)."""
    for node_id, path in walk(graph, start):
        for attribute in graph.nodes[node_id].attributes:
            if attribute.name == VARIABLE_VALUE:
                yield GraphVariable(node_id, path, attribute.checkpoint_key, attribute.full_name)


def children_of(obj: Any) -> dict[str, Any]:
    """The trackable children of an object, as the checkpoint machinery sees them."""
    try:
        return dict(tf.train.TrackableView.children(obj))
    except (AttributeError, TypeError):
        return {}


def match_objects(
    graph: trackable_object_graph_pb2.TrackableObjectGraph, start: int, root: Any
) -> dict[int, tuple[Any, Any, str]]:
    """Map graph nodes below `start` to objects below `root`, following children by local name.

    Returns:
        node id -> (object, parent object, local name in parent); the start node's parent is None.
    """
    matched: dict[int, tuple[Any, Any, str]] = {start: (root, None, "")}
    queue = deque([start])
    while queue:
        node_id = queue.popleft()
        obj = matched[node_id][0]
        children = children_of(obj)
        for child in graph.nodes[node_id].children:
            if child.node_id in matched or child.local_name not in children:
                continue
            matched[child.node_id] = (children[child.local_name], obj, child.local_name)
            queue.append(child.node_id)
    return matched


def variable_identity(variable: Any) -> int:
    """One identity for a variable whether we hold the Keras wrapper or the `tf.Variable` inside it."""
    inner = getattr(variable, "value", None)
    if isinstance(inner, tf.Variable) and not isinstance(variable, tf.Variable):
        return id(inner)
    return id(variable)
