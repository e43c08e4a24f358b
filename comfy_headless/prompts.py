"""Run ComfyUI workflows headlessly: UI-format workflow -> API prompt, then ComfyUI's own validator and executor.

The UI-format workflow users share has no converter in ComfyUI's backend (the frontend does it), so
:func:`ui_to_api` does the frontend's part. Used by the headless runner (``scripts/generate_layers.py``) and the
test harness (``tests/comfy_host.py``); ComfyUI is booted by ``comfy_headless`` (next to this file).
"""
from __future__ import annotations

import inspect
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .boot import HarnessError, boot, call

class UnknownNodeTypeError(HarnessError):
    """A workflow uses a node type that is not registered in this ComfyUI."""


class PromptValidationError(HarnessError):
    """ComfyUI's ``validate_prompt`` refused the prompt; ``node_errors`` is ComfyUI's per-node report."""

    def __init__(self, message: str, error: dict | None, node_errors: dict):
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


class NodeExecutionError(HarnessError):
    """A node raised while ComfyUI executed the prompt; the fields mirror ComfyUI's ``execution_error`` message."""

    def __init__(self, data: dict):
        self.node_id = str(data.get("node_id"))
        self.node_type = data.get("node_type")
        self.exception_type = data.get("exception_type", "")
        self.exception_message = data.get("exception_message", "")
        self.traceback = "".join(data.get("traceback") or [])
        super().__init__(
            f"{self.node_type} (node {self.node_id}) failed: {self.exception_type}: {self.exception_message}\n"
            f"{self.traceback}"
        )


# ------------------------------------------------------------------------------------------------- UI -> API
UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_AFTER_GENERATE = frozenset({"fixed", "increment", "decrement", "randomize"})
MODE_MUTED, MODE_BYPASSED = 2, 4


def load_workflow(path: str | os.PathLike) -> dict:
    """Read a UI-format workflow JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ui_to_api(workflow: dict | str | os.PathLike, node_class_mappings: dict | None = None) -> dict:
    """Convert a UI-format workflow (what the frontend saves) into an API prompt ``{id: {class_type, inputs}}``.

    Widget values are mapped to the widget inputs in ``INPUT_TYPES`` order (required, then optional); the
    "control after generate" value that follows seed widgets is skipped; links become ``[source_id, slot]``;
    a link into a converted widget overrides the widget value. Reroutes are resolved, links from primitive nodes
    keep the widget value, muted nodes (mode 2) are dropped and bypassed nodes (mode 4) pass their input of the
    same type through, as the frontend does. ``node_class_mappings`` defaults to ComfyUI's registry.
    """
    if isinstance(workflow, (str, os.PathLike)):
        workflow = load_workflow(workflow)
    mappings = node_class_mappings if node_class_mappings is not None else _comfy_mappings()
    graph = _Graph(workflow)
    prompt = {}
    for node in workflow.get("nodes", []):
        if node.get("type") in UI_ONLY_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        cls = mappings.get(node.get("type"))
        if cls is None:
            raise UnknownNodeTypeError(_unknown_type_message(workflow, node))
        inputs = widget_inputs(cls, node.get("widgets_values"))
        inputs.update(graph.linked_inputs(node))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _unknown_type_message(workflow: dict, node: dict) -> str:
    kind = node.get("type")
    message = f"workflow node {node.get('id')} has type {kind!r}, which is not a registered node type"
    subgraphs = ((workflow.get("definitions") or {}).get("subgraphs")) or []
    if any(isinstance(g, dict) and g.get("id") == kind for g in subgraphs):
        message += " (it is a frontend subgraph; ui_to_api does not expand subgraphs)"
    return message


def _comfy_mappings() -> dict:
    boot()
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def widget_specs(cls) -> list[tuple[str, dict]]:
    """(name, options) of every widget input of node class ``cls``, in the order the frontend creates them."""
    input_types = cls.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            if not isinstance(spec, (list, tuple)) or not spec:
                continue
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_widget = isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES
            if is_widget and not options.get("forceInput"):
                specs.append((name, options))
    return specs


def widget_inputs(cls, widgets_values) -> dict:
    """Map a node's ``widgets_values`` (list, or dict in newer frontends) to its widget input names."""
    specs = widget_specs(cls)
    if isinstance(widgets_values, dict):
        return {name: widgets_values[name] for name, _ in specs if name in widgets_values}
    values = list(widgets_values or [])
    inputs, index = {}, 0
    for name, options in specs:
        if index >= len(values):
            break
        inputs[name] = values[index]
        index += 1
        if _has_control_widget(name, options) and index < len(values) and values[index] in CONTROL_AFTER_GENERATE:
            index += 1
    return inputs


def _has_control_widget(name: str, options: dict) -> bool:
    return name in ("seed", "noise_seed") or bool(options.get("control_after_generate"))


class _Graph:
    """Link lookup for :func:`ui_to_api`: resolves reroutes, primitives, muted and bypassed nodes."""

    def __init__(self, workflow: dict):
        self.nodes = {str(n["id"]): n for n in workflow.get("nodes", [])}
        self.links = {}
        for link in workflow.get("links", []) or []:
            if isinstance(link, dict):
                self.links[link["id"]] = (str(link["origin_id"]), int(link["origin_slot"]), link.get("type"))
            else:
                self.links[link[0]] = (str(link[1]), int(link[2]), link[5] if len(link) > 5 else None)

    def linked_inputs(self, node: dict) -> dict:
        inputs = {}
        for socket in node.get("inputs", []) or []:
            link_id = socket.get("link")
            if link_id is None:
                continue
            source = self.resolve(link_id, socket.get("type"))
            if source is not None:
                inputs[socket["name"]] = source
        return inputs

    def resolve(self, link_id, wanted_type, depth: int = 0):
        """``[node_id, slot]`` that really feeds ``link_id``, or None when nothing does (muted, primitive)."""
        if depth > 100 or link_id not in self.links:
            return None
        origin_id, origin_slot, _ = self.links[link_id]
        origin = self.nodes.get(origin_id)
        if origin is None:
            return None
        kind, mode = origin.get("type"), origin.get("mode", 0)
        if kind == "Reroute":
            return self._follow_input(origin, 0, wanted_type, depth)
        if kind == "PrimitiveNode" or kind in UI_ONLY_TYPES or mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASSED:
            return self._bypass(origin, origin_slot, wanted_type, depth)
        return [origin_id, origin_slot]

    def _follow_input(self, node: dict, index: int, wanted_type, depth: int):
        sockets = node.get("inputs") or []
        if index >= len(sockets) or sockets[index].get("link") is None:
            return None
        return self.resolve(sockets[index]["link"], wanted_type, depth + 1)

    def _bypass(self, node: dict, origin_slot: int, wanted_type, depth: int):
        """The frontend's bypass rule: the input at the output's index if its type matches, else the first
        input of the same type."""
        sockets = node.get("inputs") or []
        for index in [origin_slot, *range(len(sockets))]:
            if index < len(sockets) and sockets[index].get("type") == wanted_type:
                return self._follow_input(node, index, wanted_type, depth)
        return None


# ------------------------------------------------------------------------------------------------- running prompts
class FakeServer:
    """The part of ComfyUI's PromptServer that ``PromptExecutor`` uses; records every message it is sent and
    passes it to ``on_message(event, data)`` when given (e.g. to show progress)."""

    def __init__(self, on_message: Callable[[str, Any], None] | None = None):
        self.on_message = on_message
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))
        if self.on_message is not None:
            self.on_message(event, data)

    def queue_updated(self):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        self.send_sync("progress_text", {"text": text, "node": node_id})


@dataclass
class PromptRun:
    """What one :func:`run_prompt` produced."""

    prompt_id: str
    ui: dict
    messages: list
    executor: Any

    def output(self, node_id, slot: int = 0):
        """The value a node produced on output ``slot`` (a list when the node returned a list output)."""
        outputs = _executor_outputs(self.executor, str(node_id))
        if outputs is None:
            raise KeyError(f"node {node_id} produced no cached output")
        value = outputs[slot]
        return value[0] if isinstance(value, list) and len(value) == 1 else value

    def files(self, kind: str = "images") -> list[Path]:
        """Files listed in the ui outputs (e.g. SaveImage results), as paths in this session's folders."""
        import folder_paths

        paths = []
        for node_ui in self.ui.values():
            for item in node_ui.get(kind, []) or []:
                base = folder_paths.get_directory_by_type(item.get("type", "output"))
                paths.append(Path(base) / item.get("subfolder", "") / item["filename"])
        return paths


def _executor_outputs(executor, node_id: str):
    if hasattr(executor, "caches"):  # 0.3.x
        entry = executor.caches.outputs.get(node_id)
        return getattr(entry, "outputs", entry)
    return executor.outputs.get(node_id)  # 2024


def validate(api_prompt: dict, prompt_id: str | None = None) -> list[str]:
    """Validate with ComfyUI's ``execution.validate_prompt``; return the output node ids, raise if any is invalid."""
    import execution
    import nodes

    unknown = {k: v.get("class_type") for k, v in api_prompt.items() if v.get("class_type") not in nodes.NODE_CLASS_MAPPINGS}
    if unknown:
        raise PromptValidationError(f"ComfyUI refused the prompt: unregistered node types {unknown}", None, {})
    prompt_id = prompt_id or str(uuid.uuid4())
    params = inspect.signature(execution.validate_prompt).parameters
    if len(params) >= 2:  # 0.3.x: (prompt_id, prompt, partial_execution_list)
        result = call(execution.validate_prompt, prompt_id, api_prompt, None)
    else:  # 2024: (prompt)
        result = execution.validate_prompt(api_prompt)
    valid, error, good_outputs, node_errors = result[:4]
    if not valid or node_errors:
        raise PromptValidationError(_validation_message(error, node_errors), error, node_errors)
    return list(good_outputs)


def _validation_message(error: dict | None, node_errors: dict) -> str:
    lines = ["ComfyUI refused the prompt"]
    if error:
        lines.append(f"{error.get('message')}: {error.get('details')}")
    for node_id, report in (node_errors or {}).items():
        for reason in report.get("errors", []):
            lines.append(f"  {report.get('class_type')} (node {node_id}): {reason.get('message')}: {reason.get('details')}")
    return "\n".join(lines)


def run_prompt(api_prompt: dict, extra_data: dict | None = None,
               on_message: Callable[[str, Any], None] | None = None) -> PromptRun:
    """Validate and execute an API prompt with ComfyUI's own ``PromptExecutor`` (fresh executor, no cache).

    ``on_message(event, data)`` sees every message the executor sends (``executing``, ``progress``...). Returns a :class:`PromptRun` (ui outputs, recorded server messages, node outputs); raises
    :class:`PromptValidationError` or :class:`NodeExecutionError` with ComfyUI's error text.
    """
    import execution

    boot()
    prompt = {str(k): v for k, v in api_prompt.items()}
    prompt_id = str(uuid.uuid4())
    outputs = validate(prompt, prompt_id)
    server = FakeServer(on_message)
    executor = execution.PromptExecutor(server)
    extra = {"client_id": "layerdiff-headless", **(extra_data or {})}
    executor.execute(prompt, prompt_id, extra, outputs)
    _raise_on_failure(executor)
    return PromptRun(prompt_id, _ui_outputs(executor), list(server.messages), executor)


def _raise_on_failure(executor) -> None:
    for event, data in executor.status_messages:
        if event == "execution_error":
            raise NodeExecutionError(data)
        if event == "execution_interrupted":
            raise HarnessError(f"execution interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    if not executor.success:
        raise HarnessError("ComfyUI reported failure without an execution_error message")


def _ui_outputs(executor) -> dict:
    history = getattr(executor, "history_result", None)
    if history is not None:  # 0.3.x
        return dict(history.get("outputs", {}))
    return {node_id: ui for node_id, ui in executor.outputs_ui.items()}  # 2024

