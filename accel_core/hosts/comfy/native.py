"""ComfyUI's own compilation, probed per MODEL: its per-block CUDA graphs and its model compiler.

0.33 captures a CUDA graph per unit DynamicVRAM loaded (`prefetch_queue_pop(..., core, enable_graph)`,
`--disable-cuda-graphs`); the Comfy Compiler (0.34+, read in 0.38.1) adds comfy-aimdo's memory plan per
block (`malloc_graph_*`, `malloc_scope=`, `--disable-comfy-compiler`) with those graphs as its subfeature.
A model opts in from its own forward; neither has a per-model switch, and SD Accel never flips the
process-wide flags. Where ComfyUI's compilation acts, a colliding feature steps aside with one log line
naming the flag that hands the model to SD Accel. What was read where: docs/comfyui-versions.md.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass

from ...log import logger

# Words a model's own code uses when it opts in (call keywords and attribute names, read from bytecode).
_GRAPH_WORDS = frozenset({"enable_graph"})
_COMPILER_WORDS = frozenset({"malloc_graph_begin", "malloc_graph_scope", "malloc_scope"})


@dataclass(frozen=True)
class NativeState:
    """What ComfyUI itself will do to this MODEL's forward in this process."""
    cuda_graphs: bool = False  # its per-block CUDA graphs capture the model's units
    comfy_compiler: bool = False  # its memory compiler records the model's forward
    note: str = ""  # one line for logs and the compile report ("" when ComfyUI does neither)

    def to_dict(self) -> dict:  # for the compile report
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    step_aside: bool
    note: str = ""  # "" when ComfyUI does nothing SD Accel needs to mention


def _code_words(code) -> set:
    words = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, str):
            words.add(c)
        elif isinstance(c, tuple):  # keyword names of a call: ("core", "enable_graph")
            words.update(x for x in c if isinstance(x, str))
        elif inspect.iscode(c):  # nested functions (the `core` closures)
            words |= _code_words(c)
    return words


@functools.lru_cache(maxsize=128)
def class_words(cls) -> frozenset:
    """Names the methods of `cls` (and its bases, torch's own left out) refer to."""
    words: set = set()
    for klass in cls.__mro__:
        if klass is object or klass.__module__.split(".")[0] == "torch":
            continue
        for value in vars(klass).values():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None:
                words |= _code_words(code)
    return frozenset(words)


def _host():
    try:
        import comfy.model_prefetch as prefetch
        from comfy.cli_args import args
    except Exception:  # no model_prefetch before ~0.2x; import errors of a broken tree are not ours to raise
        return None, None
    return prefetch, args


def _quiet(fn, *args) -> bool:
    try:  # a probe that raises means "no"; the host's own errors are not ours to raise here
        return bool(fn(*args))
    except Exception:
        return False


def _declares_units(model) -> bool:
    # DynamicVRAM's load gives a unit the `_v_block` a graph is keyed on only when the model names its
    # units (`get_dynamic_vram__units`); text encoders name none unless their graph switch is on.
    units = getattr(getattr(model, "model", None), "get_dynamic_vram__units", None)
    return callable(units) and _quiet(lambda: units()[0])


def native_compile_state(model) -> NativeState:
    """Capability probes (never version numbers): will ComfyUI's CUDA graphs / compiler act on `model`?"""
    prefetch, args = _host()
    if prefetch is None:
        return NativeState()
    dm = model.get_model_object("diffusion_model")
    words = class_words(type(dm))
    device = getattr(model, "load_device", None)
    enabled = getattr(prefetch, "malloc_graph_enabled", None)
    compiler = callable(enabled) and bool(words & _COMPILER_WORDS) and _quiet(enabled, device)
    takes_graphs = _quiet(lambda: "enable_graph" in inspect.signature(prefetch.prefetch_queue_pop).parameters)
    graphs = (takes_graphs and bool(words & _GRAPH_WORDS) and not getattr(args, "disable_cuda_graphs", False)
              and getattr(device, "type", None) == "cuda" and _quiet(getattr(model, "is_dynamic", bool)) and _declares_units(model)
              and (compiler or not callable(enabled)))  # with a compiler in the host, graphs are its subfeature
    name = type(dm).__name__
    note = {(True, True): f"ComfyUI's model compiler and its CUDA graphs already compile {name}",
            (True, False): f"ComfyUI's model compiler (a memory plan per block) already records {name}",
            (False, True): f"ComfyUI already captures {name}'s blocks in CUDA graphs"}.get((compiler, graphs), "")
    return NativeState(graphs, compiler, note)


# Which of ComfyUI's own features each SD Accel feature yields to, and why.
_YIELDS = {
    # Compiling the same blocks twice: nested CUDA graph capture, and Triton kernels inside an aimdo
    # malloc graph are reported to fail ("aimdo memory compile error"); ComfyUI's path keeps DynamicVRAM.
    "compile": ("cuda_graphs", "comfy_compiler"),
    # A cached step skips blocks: the allocation pattern the compiler recorded changes every other step
    # (graph breaks, crashes in MallocGraph.pop reported), and a captured unit always runs its block.
    "deepcache": ("cuda_graphs", "comfy_compiler"),
    # These change values or dtypes before the run, on SD Accel's regular copy: nothing is captured twice.
    "lora": (), "cast": (), "lcm": (),
}
_FLAGS = {"cuda_graphs": "--disable-cuda-graphs", "comfy_compiler": "--disable-comfy-compiler"}


def decide(feature: str, state: NativeState) -> Decision:
    """Step aside (with the note to log and report) or run, for one SD Accel feature on this model."""
    if feature not in _YIELDS:
        raise ValueError(f"SD Accel: expected one of {sorted(_YIELDS)} as the feature, found {feature!r}")
    hit = [k for k in _YIELDS[feature] if getattr(state, k)]
    if not hit:
        return Decision(False, state.note and f"{state.note}; SD Accel runs beside it")
    flag = _FLAGS["comfy_compiler" if "comfy_compiler" in hit else "cuda_graphs"]  # the compiler's flag also stops its graphs
    return Decision(True, f"{state.note}; SD Accel leaves it to ComfyUI (start ComfyUI with {flag} to use SD Accel's instead)")


def step_aside(feature: str, model, node: str) -> bool:
    """True (after one log line) when `node` should pass `model` through for ComfyUI's own compilation."""
    d = decide(feature, native_compile_state(model))
    if d.note:
        (logger.warning if d.step_aside else logger.info)("SD Accel %s: %s.", node, d.note)
    return d.step_aside

