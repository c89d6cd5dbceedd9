"""Which of our nodes built the model being sampled, for the status events (comfy/events.py sends them).

Our nodes record themselves on the model clone they return (`track`): their UNIQUE_ID goes into
`transformer_options` (plain strings, so it survives ComfyUI's deep copy on clone and accumulates
along a chain of our nodes). A keyed OUTER_SAMPLE wrapper puts that mapping in a context variable
for the run, and a keyed SAMPLER_SAMPLE wrapper times the sampling loop and emits `run_stats`.
"""
from __future__ import annotations

import contextvars
import time

from ... import events

NODES_KEY = "sd_accel.nodes"  # transformer_options[NODES_KEY] = {kind: unique_id}
STATS_KEY = "sd_accel.stats"  # key of our OUTER_SAMPLE (node scope) and SAMPLER_SAMPLE (timing) wrappers
KINDS = ("cast", "compile", "deepcache", "lora", "lcm")

_run_nodes: contextvars.ContextVar[dict | None] = contextvars.ContextVar("sd_accel_run_nodes", default=None)


class LastRun:
    """The node mapping of the last finished run, by the sampler node that ran it: a wrapper
    outside ours (another OUTER_SAMPLE one, e.g. DeepCache's summary) emits after our scope
    closed, while ComfyUI still executes that sampler node. The one instance is LAST_RUN."""

    def __init__(self):
        self._by_sampler: dict[str, dict] = {}

    def record(self, sampler_node, nodes: dict) -> None:
        self._by_sampler = {sampler_node: nodes} if sampler_node is not None else {}

    def nodes_of(self, sampler_node) -> dict:
        return self._by_sampler.get(sampler_node, {}) if sampler_node is not None else {}


LAST_RUN = LastRun()


def _executing():
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None, None
    ctx = get_executing_context()
    return (ctx.node_id, ctx.prompt_id) if ctx is not None else (None, None)


def track(model, kind: str, unique_id, source=None):
    """Record that node `unique_id` (of `kind`) produced `model` from `source`; returns `model`.

    Only the node's own clone is marked: when the adapter passed `source` through unchanged
    (a model that is not a UNet we patch), nothing is recorded, so an input is never touched.
    """
    if unique_id is None or model is source or not hasattr(model, "add_wrapper_with_key"):
        return model
    import comfy.patcher_extension as pe

    to = model.model_options.setdefault("transformer_options", {})
    to[NODES_KEY] = {**to.get(NODES_KEY, {}), kind: str(unique_id)}
    for kind_, fn in ((pe.WrappersMP.OUTER_SAMPLE, _scope_wrapper), (pe.WrappersMP.SAMPLER_SAMPLE, _stats_wrapper)):
        model.remove_wrappers_with_key(kind_, STATS_KEY)
        model.add_wrapper_with_key(kind_, STATS_KEY, fn)
    events.emit("node_applied", kind=kind, node=str(unique_id))
    return model


def tracked_nodes(model) -> dict:
    """{kind: unique_id} recorded on `model` by our nodes."""
    return dict(model.model_options.get("transformer_options", {}).get(NODES_KEY, {}))


def _compile_report(guider) -> dict | None:
    from .compile import compile_report

    patcher = getattr(guider, "model_patcher", None)
    try:
        return compile_report(patcher) if patcher is not None else None
    except Exception:  # a model without a diffusion_model object: no report, no failure
        return None


def _scope_wrapper(executor, *args, **kwargs):
    # OUTER_SAMPLE: everything this run emits (the LoRA swap at pre-run, compiles, the
    # summaries of wrappers inside ours) is attributed to the nodes that built the model.
    opts = getattr(executor.class_obj, "model_options", {}).get("transformer_options", {})
    nodes = dict(opts.get(NODES_KEY, {}))
    token = _run_nodes.set(nodes)
    try:
        return executor(*args, **kwargs)
    finally:
        _run_nodes.reset(token)
        LAST_RUN.record(_executing()[0], nodes)


def _stats_wrapper(executor, guider, sigmas, extra_args, *args, **kwargs):
    # SAMPLER_SAMPLE wraps the sampling loop only (after the model is loaded), so the rate
    # is comparable to ComfyUI's own progress bar; it does include any compile in this run.
    before = _compile_report(guider)
    t0 = time.perf_counter()
    out = executor(guider, sigmas, extra_args, *args, **kwargs)
    seconds = time.perf_counter() - t0
    steps = max(int(sigmas.shape[-1]) - 1, 0) if hasattr(sigmas, "shape") else 0
    report = _compile_report(guider)
    compiled_in_run = (report or {}).get("compile_seconds", 0.0) - (before or {}).get("compile_seconds", 0.0)
    events.emit("run_stats", steps=steps, seconds=round(seconds, 4), its=round(steps / seconds, 4) if seconds > 0 else None,
                compile_seconds_in_run=round(compiled_in_run, 3), report=report)
    return out


__all__ = ["NODES_KEY", "STATS_KEY", "KINDS", "LastRun", "LAST_RUN", "track", "tracked_nodes"]
