"""Convert the workflow JSON the ComfyUI frontend saves into the API prompt format the executor runs.

The frontend (1.32.x, workflow ``version`` 0.4) saves a graph: ``nodes`` (each with ``id``, ``type``,
``mode``, ``inputs``, ``outputs``, ``widgets_values``) and ``links`` (``[id, origin_id, origin_slot,
target_id, target_slot, type]``). The executor wants ``{node_id: {"class_type", "inputs"}}`` where an
input is a value or ``[origin_id, origin_slot]``. The frontend does this conversion itself
(``graphToPrompt``) when it queues a prompt; this module does the same offline, from the node
definitions of the running ComfyUI, so a saved workflow runs headless:

- widget values are matched to inputs in ``INPUT_TYPES()`` order (required, then optional), the
  order in which the frontend creates widgets; the extra values the frontend stores after some
  widgets (``control_after_generate`` after seeds, its filter after combos, ``upload`` after file
  combos) are skipped;
- ``Reroute`` nodes are followed through, a ``PrimitiveNode``'s value is written into the widget it
  feeds, ``Note``/``MarkdownNote`` nodes are dropped;
- muted nodes (mode 2) are dropped and a link from one counts as unconnected; bypassed nodes
  (mode 4) pass an input of the output's type through, as the frontend does;
- subgraphs are flattened into ``"<instance id>:<inner id>"`` node ids, as the frontend does.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODE_MUTED = 2  # LGraphEventMode.NEVER: the node and its links are left out of the prompt.
MODE_BYPASS = 4  # The frontend's "bypass": each output passes an input of the same type through.

REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
FRONTEND_ONLY = frozenset({REROUTE, PRIMITIVE, *NOTE_TYPES})

# The values of the frontend's "control after generate" widget (its combo version adds "increment-wrap").
CONTROL_VALUES = frozenset({"fixed", "increment", "increment-wrap", "decrement", "randomize"})
# Inputs of these types are widgets. Besides the primitive types and combos, the frontend's core
# extensions register widgets for a few custom types; a 1.32 save also marks every widget input
# with a "widget" entry in the node's "inputs", which covers custom widgets of other packs.
WIDGET_TYPES = frozenset(
    {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "WEBCAM", "LOAD_3D", "LOAD_3D_ANIMATION", "IMAGECOMPARE"}
)
# Combo options after which the frontend adds an "upload" widget whose value it saves too.
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")
# Separator of the node ids of flattened subgraphs; the frontend uses the same ("12:5").
SUBGRAPH_ID_SEP = ":"
SUBGRAPH_INPUT_NODE = -10
SUBGRAPH_OUTPUT_NODE = -20


class WorkflowFormatError(ValueError):
    """A workflow file that cannot be converted; the message names the node id, its type and the value."""


class UnknownNodeTypeError(WorkflowFormatError):
    """A node whose class the running ComfyUI does not have (a custom node pack is missing)."""


@dataclass(frozen=True)
class WidgetSlot:
    """One value the frontend stores in a node's ``widgets_values``.

    ``kind`` is ``"input"`` for a widget that becomes an API input, or one of ``"control"``,
    ``"filter"``, ``"upload"`` for the frontend-only values stored after some widgets, which the
    frontend leaves out of the prompt and may be absent from older saves.
    """

    name: str
    kind: str = "input"
    spec: tuple = ()

    @property
    def options(self) -> dict:
        """Return the input's options dict (``{}`` when it has none)."""
        return self.spec[1] if len(self.spec) > 1 and isinstance(self.spec[1], dict) else {}


def _type_name(input_type: Any) -> Any:
    """Return a socket type as a plain value (V1 nodes use ``IO`` enum members, V3 plain strings)."""
    return input_type.value if isinstance(input_type, Enum) else input_type


def _is_widget_type(input_type: Any, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    input_type = _type_name(input_type)
    return isinstance(input_type, (list, tuple)) or (isinstance(input_type, str) and input_type in WIDGET_TYPES)


def input_specs(node_class: type) -> list[tuple[str, tuple]]:
    """Return a node class's inputs as ``[(name, spec), ...]``: required, then optional, in declared order.

    Raises:
        WorkflowFormatError: if the class's ``INPUT_TYPES()`` raises.
    """
    try:
        types = node_class.INPUT_TYPES()
    except Exception as e:  # A node's own bug; say which one instead of a bare traceback.
        raise WorkflowFormatError(f"INPUT_TYPES() of node class {node_class.__name__} raised {e!r}") from e
    specs = []
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            specs.append((name, tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)))
    return specs


def widget_slots(node_class: type, saved_inputs: list[dict] | None = None) -> list[WidgetSlot]:
    """Return the values the frontend stores in ``widgets_values`` for a node of this class, in order.

    Args:
        node_class: the ComfyUI node class.
        saved_inputs: the node's ``inputs`` list from the workflow; an input listed there with a
            ``"widget"`` entry is a widget whatever its type (a custom widget of some pack).

    Returns:
        The slots, including the frontend-only ones (control, filter, upload) after their widget.

    Raises:
        WorkflowFormatError: if the class's ``INPUT_TYPES()`` raises.
    """
    marked = {i.get("name") for i in saved_inputs or () if isinstance(i, dict) and i.get("widget")}
    marked |= {i["widget"].get("name") for i in saved_inputs or () if isinstance(i, dict) and i.get("widget")}
    slots = []
    for name, spec in input_specs(node_class):
        slot = WidgetSlot(name, "input", spec)
        input_type = _type_name(spec[0])
        if not (_is_widget_type(input_type, slot.options) or name in marked):
            continue
        slots.append(slot)
        options = slot.options
        if input_type == "INT" and options.get("control_after_generate", name in SEED_NAMES):
            slots.append(WidgetSlot(f"{name}.control_after_generate", "control"))
        elif input_type == "COMBO" or isinstance(input_type, (list, tuple)):
            if options.get("control_after_generate"):
                slots.append(WidgetSlot(f"{name}.control_after_generate", "control"))
                slots.append(WidgetSlot(f"{name}.control_filter_list", "filter"))
            if any(options.get(key) for key in UPLOAD_OPTIONS):
                slots.append(WidgetSlot(f"{name}.upload", "upload"))
    return slots


def _could_take(slot: WidgetSlot | None, value: Any) -> bool:
    """Return True if ``value`` may be the value of widget ``slot`` (a string or a combo listing it)."""
    if slot is None or not slot.spec:
        return False
    input_type = _type_name(slot.spec[0])
    if isinstance(input_type, (list, tuple)):
        return value in input_type
    if input_type == "COMBO":
        return value in (slot.options.get("options") or ())
    return input_type not in ("INT", "FLOAT", "BOOLEAN")


def _extra_accepts(slot: WidgetSlot, value: Any, surplus: int, next_input: WidgetSlot | None) -> bool:
    if slot.kind == "control":
        # A control value is skipped when the save has one value too many, or when the widget that
        # follows could not hold it anyway (a number after the seed), so short saves line up too.
        return value in CONTROL_VALUES and (surplus > 0 or not _could_take(next_input, value))
    if surplus <= 0:
        return False
    return isinstance(value, str) if slot.kind == "filter" else True


def _default(slot: WidgetSlot) -> tuple[bool, Any]:
    """Return ``(found, value)``: the widget's default, which the frontend keeps for a missing value."""
    options = slot.options
    if "default" in options:
        return True, options["default"]
    input_type = _type_name(slot.spec[0]) if slot.spec else None
    choices = input_type if isinstance(input_type, (list, tuple)) else options.get("options")
    if choices:
        return True, choices[0]
    return False, None


def widget_values(node: dict, node_class: type) -> dict[str, Any]:
    """Return ``{input name: value}`` for a saved node's widgets, as the frontend would send them.

    The frontend-only values (control after generate, its filter, upload) are skipped when the
    save holds them; a widget whose value is missing keeps its default, as in the frontend.

    Raises:
        WorkflowFormatError: if the class's ``INPUT_TYPES()`` raises.
    """
    slots = widget_slots(node_class, node.get("inputs"))
    saved = node.get("widgets_values")
    values: dict[str, Any] = {}
    if isinstance(saved, dict):
        # Some packs' nodes save an object keyed by widget name.
        for slot in slots:
            if slot.kind == "input":
                if slot.name in saved:
                    values[slot.name] = saved[slot.name]
                else:
                    found, default = _default(slot)
                    if found:
                        values[slot.name] = default
        return {k: _wrap(v) for k, v in values.items()}
    saved = list(saved or [])
    # Extra values are consumed only while the save holds more values than there are widgets (see
    # _extra_accepts), so a save without them (older frontends, hand-written files) lines up as well.
    surplus = len(saved) - sum(slot.kind == "input" for slot in slots)
    pos = 0
    for index, slot in enumerate(slots):
        if slot.kind != "input":
            next_input = next((s for s in slots[index + 1 :] if s.kind == "input"), None)
            if pos < len(saved) and _extra_accepts(slot, saved[pos], surplus, next_input):
                pos += 1
                surplus -= 1
            continue
        if pos < len(saved):
            values[slot.name] = saved[pos]
            pos += 1
        else:
            found, default = _default(slot)
            if found:
                values[slot.name] = default
    if pos < len(saved):
        log.debug("node %s (%s): %d widget values left over", node.get("id"), node.get("type"), len(saved) - pos)
    return {k: _wrap(v) for k, v in values.items()}


def _wrap(value: Any) -> Any:
    # A list in an API prompt means a link; the frontend wraps list values as the executor expects.
    return {"__value__": value} if isinstance(value, list) else value


@dataclass
class _Link:
    id: Any
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int
    type: Any = None


def _parse_links(raw_links: list | None, where: str) -> dict[Any, _Link]:
    links = {}
    for raw in raw_links or ():
        if raw is None:
            continue
        if isinstance(raw, dict):
            link = _Link(
                raw["id"], raw["origin_id"], raw["origin_slot"], raw["target_id"], raw["target_slot"], raw.get("type")
            )
        elif isinstance(raw, (list, tuple)) and len(raw) >= 5:
            link = _Link(*raw[:6])
        else:
            raise WorkflowFormatError(
                f"{where}: a link is neither [id, origin, slot, target, slot, type] nor an object: {raw!r}"
            )
        links[link.id] = link
    return links


@dataclass
class _Graph:
    """One graph level: the root workflow or a subgraph definition, instantiated under a node-id prefix."""

    nodes: dict[Any, dict]
    links: dict[Any, _Link]
    prefix: str = ""
    # For a subgraph instance: the instance node and the graph holding it.
    instance: dict | None = None
    parent: _Graph | None = None
    children: dict[Any, _Graph] = field(default_factory=dict)

    def api_id(self, node_id: Any) -> str:
        return f"{self.prefix}{node_id}"

    def describe(self, node: dict) -> str:
        return f"node {self.api_id(node.get('id'))} ({node.get('type')})"


# A resolved source: ("link", api_id, slot), ("value", v, None) or None for unconnected.
_Source = tuple


class _Converter:
    def __init__(self, workflow: dict, node_classes: Mapping[str, type]):
        self.workflow = workflow
        self.node_classes = node_classes
        self.subgraphs = {
            sg["id"]: sg for sg in (workflow.get("definitions") or {}).get("subgraphs") or () if "id" in sg
        }

    def convert(self) -> dict:
        root = self._graph(self.workflow.get("nodes") or [], self.workflow.get("links"), "", None, None)
        prompt: dict[str, dict] = {}
        self._emit(root, prompt, depth=0)
        return prompt

    def _graph(self, nodes: list, links: list | None, prefix: str, instance: dict | None, parent: _Graph | None):
        where = f"subgraph instance {prefix.rstrip(SUBGRAPH_ID_SEP)}" if prefix else "workflow"
        by_id = {}
        for node in nodes:
            if not isinstance(node, dict) or "id" not in node or "type" not in node:
                raise WorkflowFormatError(f"{where}: a node without id or type: {str(node)[:200]}")
            by_id[node["id"]] = node
        return _Graph(by_id, _parse_links(links, where), prefix, instance, parent)

    def _emit(self, graph: _Graph, prompt: dict, depth: int) -> None:
        if depth > 32:
            raise WorkflowFormatError(
                f"subgraphs nested more than 32 deep at {graph.prefix!r} (a subgraph inside itself?)"
            )
        for node in graph.nodes.values():
            node_type = node["type"]
            if node_type in FRONTEND_ONLY or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
                continue
            if node_type in self.subgraphs:
                child = self._child(graph, node)
                self._emit(child, prompt, depth + 1)
                continue
            node_class = self._class(graph, node)
            inputs = widget_values(node, node_class)
            for index, saved_input in enumerate(node.get("inputs") or ()):
                name = saved_input.get("name")
                if saved_input.get("link") is None or not name:
                    continue
                source = self._resolve_input(graph, node, index)
                if source is None:
                    continue  # Unconnected (muted or empty upstream): a widget keeps its own value.
                kind, value, slot = source
                inputs[name] = [value, slot] if kind == "link" else _wrap(value)
            prompt[graph.api_id(node["id"])] = {
                "inputs": inputs,
                "class_type": node_type,
                "_meta": {"title": node.get("title") or node_type},
            }

    def _class(self, graph: _Graph, node: dict) -> type:
        node_class = self.node_classes.get(node["type"])
        if node_class is None:
            raise UnknownNodeTypeError(
                f"{graph.describe(node)}: node type {node['type']!r} is not known to this ComfyUI; "
                "is the custom node installed?"
            )
        return node_class

    def _child(self, graph: _Graph, node: dict) -> _Graph:
        child = graph.children.get(node["id"])
        if child is None:
            definition = self.subgraphs[node["type"]]
            prefix = f"{graph.api_id(node['id'])}{SUBGRAPH_ID_SEP}"
            child = self._graph(definition.get("nodes") or [], definition.get("links"), prefix, node, graph)
            child.definition = definition  # type: ignore[attr-defined]
            graph.children[node["id"]] = child
        return child

    def _link(self, graph: _Graph, node: dict, index: int) -> _Link | None:
        inputs = node.get("inputs") or []
        if index >= len(inputs) or index < 0:
            return None
        link_id = inputs[index].get("link")
        if link_id is None:
            return None
        link = graph.links.get(link_id)
        if link is None:
            raise WorkflowFormatError(
                f"{graph.describe(node)}: input {inputs[index].get('name')!r} names link {link_id}, "
                "which is not in the workflow's links"
            )
        return link

    def _resolve_input(self, graph: _Graph, node: dict, index: int, seen: frozenset = frozenset()) -> _Source | None:
        link = self._link(graph, node, index)
        if link is None:
            return None
        return self._resolve_output(graph, link, node, seen)

    def _resolve_output(self, graph: _Graph, link: _Link, target: dict, seen: frozenset) -> _Source | None:
        """Follow a link upstream through reroutes, bypassed nodes and subgraph borders to a real output."""
        key = (graph.prefix, link.id)
        if key in seen:
            raise WorkflowFormatError(f"{graph.describe(target)}: link {link.id} loops through reroutes or bypasses")
        seen = seen | {key}
        if link.origin_id == SUBGRAPH_INPUT_NODE and graph.instance is not None:
            # Into the parent graph through the instance node's input of the same name.
            name = self._subgraph_input_name(graph, link.origin_slot)
            instance_inputs = graph.instance.get("inputs") or []
            index = next((i for i, inp in enumerate(instance_inputs) if inp.get("name") == name), None)
            source = None if index is None else self._resolve_input(graph.parent, graph.instance, index, seen)
            if source is None:
                source = self._instance_widget(graph, name)
            return source
        origin = graph.nodes.get(link.origin_id)
        if origin is None:
            raise WorkflowFormatError(
                f"{graph.describe(target)}: link {link.id} comes from node {graph.api_id(link.origin_id)}, "
                "which is not in the workflow"
            )
        origin_type = origin["type"]
        if origin.get("mode") == MODE_MUTED or origin_type in NOTE_TYPES:
            return None
        if origin_type == PRIMITIVE:
            values = origin.get("widgets_values") or []
            return ("value", values[0], None) if values else None
        if origin_type == REROUTE:
            return self._resolve_input(graph, origin, 0, seen)
        if origin.get("mode") == MODE_BYPASS:
            index = _bypass_input_index(origin, link.origin_slot, link.type)
            return None if index is None else self._resolve_input(graph, origin, index, seen)
        if origin_type in self.subgraphs:
            child = self._child(graph, origin)
            inner = [
                lk
                for lk in child.links.values()
                if lk.target_id == SUBGRAPH_OUTPUT_NODE and lk.target_slot == link.origin_slot
            ]
            if not inner:
                return None
            return self._resolve_output(child, inner[0], target, seen)
        self._class(graph, origin)
        return ("link", graph.api_id(origin["id"]), link.origin_slot)

    def _subgraph_input_name(self, graph: _Graph, slot: int) -> str | None:
        inputs = graph.definition.get("inputs") or []  # type: ignore[attr-defined]
        return inputs[slot].get("name") if 0 <= slot < len(inputs) else None

    def _instance_widget(self, graph: _Graph, name: str | None) -> _Source | None:
        """Return the value a subgraph instance holds for an unconnected input shown as a widget.

        The instance saves the values of its widgets in ``widgets_values``, in the order of
        ``properties.proxyWidgets`` (``["-1", input name]`` for the subgraph's own inputs) when the
        frontend wrote that list, else in the order of the subgraph's widget-typed inputs. ``None``
        (the inner widget keeps its own value) when neither names the input.
        """
        instance = graph.instance
        values = instance.get("widgets_values") or []
        if isinstance(values, dict):
            return ("value", values[name], None) if name in values else None
        proxies = (instance.get("properties") or {}).get("proxyWidgets")
        if isinstance(proxies, list) and proxies:
            names = [
                p[1] if str(p[0]) == "-1" else None for p in proxies if isinstance(p, (list, tuple)) and len(p) == 2
            ]
        else:
            definition_inputs = graph.definition.get("inputs") or []  # type: ignore[attr-defined]
            names = [i.get("name") for i in definition_inputs if _type_name(i.get("type")) in WIDGET_TYPES]
        if name in names and names.index(name) < len(values) and len(names) == len(values):
            return ("value", values[names.index(name)], None)
        return None


def _types_match(a: Any, b: Any) -> bool:
    if a in ("*", "", None) or b in ("*", "", None):
        return True
    a_set = set(str(a).split(",")) if not isinstance(a, (list, tuple)) else {"COMBO"}
    b_set = set(str(b).split(",")) if not isinstance(b, (list, tuple)) else {"COMBO"}
    return bool(a_set & b_set)


def _bypass_input_index(node: dict, slot: int, link_type: Any) -> int | None:
    """Return which input a bypassed node passes to its output ``slot``, as the frontend chooses it.

    The input at the same index if its type fits, else the first input of exactly the output's
    type, else the first input whose type fits; ``None`` if no input fits.
    """
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    out_type = outputs[slot].get("type") if slot < len(outputs) else link_type
    if out_type in ("*", "", None):
        return slot if slot < len(inputs) else (0 if inputs else None)
    if slot < len(inputs) and _types_match(inputs[slot].get("type"), out_type):
        return slot
    for index, saved in enumerate(inputs):
        if saved.get("type") == out_type:
            return index
    for index, saved in enumerate(inputs):
        if _types_match(saved.get("type"), out_type):
            return index
    return None


def is_api_format(data: Any) -> bool:
    """Return True for an API prompt: a non-empty dict of ``id -> {"class_type", "inputs"}``."""
    return (
        isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "class_type" in v for v in data.values())
    )


def is_ui_format(data: Any) -> bool:
    """Return True for a workflow as the frontend saves it (top-level ``nodes`` and ``links``)."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def ui_to_api(workflow: dict, node_classes: Mapping[str, type]) -> dict:
    """Convert a frontend-format workflow to an API prompt, using the running ComfyUI's node classes.

    Args:
        workflow: the saved workflow (``nodes``, ``links``, ``widgets_values``; version 0.4 or 1).
        node_classes: ComfyUI's ``NODE_CLASS_MAPPINGS`` (core and custom nodes).

    Returns:
        ``{node_id: {"inputs": {...}, "class_type": str, "_meta": {"title": str}}}`` with string ids
        (``"<instance>:<inner>"`` inside subgraphs).

    Raises:
        UnknownNodeTypeError: a node's type is not among ``node_classes``.
        WorkflowFormatError: a link names a node or link that is not in the workflow, or the file
            is malformed.
    """
    if not is_ui_format(workflow):
        raise WorkflowFormatError("not a frontend workflow: it has no top-level 'nodes' and 'links'")
    return _Converter(workflow, node_classes).convert()


def load_workflow(source: str | os.PathLike | dict, node_classes: Mapping[str, type]) -> dict:
    """Read a workflow in either format and return it as an API prompt.

    Args:
        source: a path to a JSON file, or the already parsed JSON.
        node_classes: ComfyUI's ``NODE_CLASS_MAPPINGS``.

    Returns:
        The API prompt with string node ids (a copy; an API-format input is returned as is otherwise).

    Raises:
        FileNotFoundError: the path does not exist.
        WorkflowFormatError: the JSON is invalid, in neither format, or cannot be converted
            (see ``ui_to_api``).
    """
    if isinstance(source, dict):
        data, where = source, "workflow"
    else:
        path = Path(source)
        where = str(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise WorkflowFormatError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict) and is_api_format(data.get("prompt")) and not is_ui_format(data):
        data = data["prompt"]  # The body of a POST /prompt request.
    if is_ui_format(data):
        return ui_to_api(data, node_classes)
    if is_api_format(data):
        return {str(k): json.loads(json.dumps(v)) for k, v in data.items()}
    raise WorkflowFormatError(
        f"{where}: neither an API prompt ({{id: {{class_type, inputs}}}}) nor a frontend workflow (nodes and links)"
    )
