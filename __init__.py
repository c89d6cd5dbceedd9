"""SD Accel: ComfyUI entry point.

ComfyUI imports this folder as a package; the nodes (and through them the host adapter)
are imported only when ComfyUI is there, so tools and tests can import `accel_core`
without a host.
"""
import importlib.util

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import cast as _cast, compile as _compile, deepcache as _deepcache, lcm as _lcm, lora as _lora, stepcache as _stepcache

    for _m in (_compile, _cast, _deepcache, _stepcache, _lora, _lcm):
        NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
        NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)

    # Status events (compiling, fell back, it/s) go to the browser tab; web/sdaccel.js shows them.
    if importlib.util.find_spec("server") is not None:
        from .accel_core.hosts.comfy import events as _comfy_events

        _comfy_events.install()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
