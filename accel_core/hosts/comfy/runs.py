"""Per-run state for a ComfyUI feature: one holder per sampling run, made from the template the node
put in the clone's transformer_options (as ComfyUI's own EasyCache does)."""
from __future__ import annotations


def run_per_sampling(executor, args, kwargs, key: str, kind: type, begin):
    """An OUTER_SAMPLE wrapper's body: a fresh copy of the `kind` holder under transformer_options[key]
    for this run, in a per-run copy of the model options (the patcher's own keeps the template),
    begun with the run's sigmas (`begin(holder, sigmas or None)`) and finished after it."""
    import comfy.model_patcher

    guider = executor.class_obj
    orig = guider.model_options
    template = orig.get("transformer_options", {}).get(key)
    if not isinstance(template, kind):
        return executor(*args, **kwargs)
    guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
    run = guider.model_options["transformer_options"][key] = template.fresh()
    begin(run, args[3] if len(args) > 3 else kwargs.get("sigmas"))
    try:
        return executor(*args, **kwargs)
    finally:
        run.finish()
        guider.model_options = orig
