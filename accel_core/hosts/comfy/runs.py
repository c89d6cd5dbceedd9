"""Per-run state for a ComfyUI feature: one holder per sampling run, made from the template the node
put in the clone's transformer_options (as ComfyUI's own EasyCache does)."""
from __future__ import annotations

FULL = (0.0, 1.0)


def _percent_of(model_sampling, sigma: float) -> float:
    """ComfyUI's percent (0: pure noise, 1: clean) of `sigma`: the inverse of the model's own
    `percent_to_sigma` (decreasing), found by bisection; its start/end percents mean the same."""
    if sigma <= 0.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(model_sampling.percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    p = round(hi, 4)
    return 0.0 if p <= 1e-4 else p


def schedule_span(model_patcher, sigmas) -> tuple[float, float]:
    """Where a run's first and last sigma lie in the model's whole denoising schedule: (0, 1) for an
    ordinary run; a part of it for KSamplerAdvanced's start/end steps (Wan 2.2 14B's high- and low-noise
    stages), denoise < 1. (0, 1) where the model's sampling offers no `percent_to_sigma` (probed)."""
    try:
        ms = model_patcher.get_model_object("model_sampling")
        if sigmas is None or not callable(getattr(ms, "percent_to_sigma", None)) or len(sigmas) < 2:
            return FULL
        first, last = float(sigmas[0]), float(sigmas[-1])
        span = (_percent_of(ms, first), _percent_of(ms, last))
    except Exception:  # a question about the schedule, never a failure of the run
        return FULL
    return span if span[0] < span[1] else FULL


def run_per_sampling(executor, args, kwargs, key: str, kind: type, begin):
    """An OUTER_SAMPLE wrapper's body: a fresh copy of the `kind` holder under transformer_options[key]
    for this run, in a per-run copy of the model options (the patcher's own keeps the template),
    begun with the run's sigmas as floats and their span of the whole schedule (`begin(holder, sigmas or None, span)`)
    and finished after it."""
    import comfy.model_patcher

    guider = executor.class_obj
    orig = guider.model_options
    template = orig.get("transformer_options", {}).get(key)
    if not isinstance(template, kind):
        return executor(*args, **kwargs)
    guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
    run = guider.model_options["transformer_options"][key] = template.fresh()
    sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
    flat = sigmas.detach().flatten().float().cpu().tolist() if sigmas is not None else None
    begin(run, flat, schedule_span(getattr(guider, "model_patcher", None), flat))
    try:
        return executor(*args, **kwargs)
    finally:
        run.finish()
        guider.model_options = orig
