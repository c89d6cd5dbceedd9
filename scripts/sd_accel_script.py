"""SD Accel for stable-diffusion-webui (AUTOMATIC1111) and Forge: the "SD Accel" accordion in txt2img and img2img.

Thin glue: options come from the accordion (or the XYZ plot), everything is applied by
`accel_core.hosts.webui` (the A1111 and Forge installers behind it). Each image's infotext
records what was applied, and pasting it back restores the accordion.
"""
import functools
import importlib
import importlib.util
import os
import sys

import gradio as gr

from modules import script_callbacks, scripts, shared


def _pack():
    """This extension's folder imported as the package `sd_accel`.

    A unique name: Forge leaves every extension root on sys.path, so a bare `accel_core`
    could meet another extension's module of the same name.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mod = sys.modules.get("sd_accel")
    if mod is None or os.path.dirname(os.path.abspath(getattr(mod, "__file__", "") or "")) != root:
        spec = importlib.util.spec_from_file_location("sd_accel", os.path.join(root, "__init__.py"), submodule_search_locations=[root])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sd_accel"] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module("sd_accel.accel_core.hosts.webui")


webui = _pack()
SECTION = ("sd_accel", "SD Accel")
# Labels, defaults, choices and slider ranges come from the options' declarations (the same in
# the accordion and on the Settings page): webui.UI_OPTIONS, name -> Option.
OPTIONS = webui.UI_OPTIONS


def _widget(name, value, **kw):
    """The gradio component for one option: a Dropdown, Slider or Checkbox with its declared choices or range."""
    opt = OPTIONS[name]
    if opt.kind == "COMBO":
        return gr.Dropdown(list(opt.choices), value=value, label=opt.label, **kw)
    if opt.kind in ("INT", "FLOAT"):
        return gr.Slider(opt.min, opt.max, step=opt.step, value=value, label=opt.label, **kw)
    return gr.Checkbox(value=value, label=opt.label, **kw)


def _option_key(name):
    return f"sd_accel_{name}"


def _defaults() -> "webui.WebuiOptions":
    """The accordion's defaults: the webui Settings page (SD Accel section) over SD Accel's own."""
    base = webui.WebuiOptions()
    values = {}
    for name in webui.SETTINGS_FIELDS:
        v = shared.opts.data.get(_option_key(name)) if getattr(shared, "opts", None) is not None else None
        if v is not None:
            values[name] = v
    try:
        return webui.options_from_args([values.get(n, getattr(base, n)) for n in webui.UI_FIELDS], base)
    except webui.SDAccelError as e:
        print(f"{e} (from Settings > SD Accel; using SD Accel's defaults)")
        return base


def _lora_names():
    return [webui.NO_LORA] + sorted(webui.lora_files(_lora_dirs()))


def _lora_dirs():
    """The webui's LoRA folders: --lora-dir, then Forge Neo's --lora-dirs (a list)."""
    first = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(shared.models_path, "Lora")
    return [first, *(getattr(shared.cmd_opts, "lora_dirs", None) or [])]


class SDAccelScript(scripts.Script):
    sorting_priority = 20

    def title(self):
        return "SD Accel"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from modules.ui_components import InputAccordion

        d = _defaults()
        missing = webui.feature_status()

        def field(name):  # one option's widget, with its default and element id
            return _widget(name, getattr(d, name), elem_id=self.elem_id(f"sd_accel_{name}"))

        with InputAccordion(d.enabled, label="SD Accel", elem_id=self.elem_id("sd_accel")) as enabled:
            with gr.Row():
                backend, mode, attention = field("backend"), field("mode"), field("attention")
            with gr.Row():
                dtype, channels_last = field("dtype"), field("channels_last")
            with gr.Row():
                dc_interval, dc_depth = field("deepcache_interval"), field("deepcache_depth")
                dc_start, dc_end = field("deepcache_start"), field("deepcache_end")
            with gr.Row(visible=_runs_dits()):  # DiT models only: Forge Neo's Flux, Chroma, Qwen-Image, Wan
                sc_mode, sc_front, sc_back, sc_threshold = field("stepcache_mode"), field("stepcache_front"), field("stepcache_back"), field("stepcache_threshold")
            with gr.Row():
                lcm_lora = gr.Dropdown(_lora_names(), value=d.lcm_lora, label=OPTIONS["lcm_lora"].label, allow_custom_value=True, elem_id=self.elem_id("sd_accel_lcm_lora"))
                lcm_strength = field("lcm_strength")
            loras = gr.Textbox(value=webui.format_loras(d.loras), label=OPTIONS["loras"].label, placeholder="my_style:0.8, detail:0.5",
                               elem_id=self.elem_id("sd_accel_loras"))
            notes = [m for m in missing.values() if m]
            if notes:
                gr.Markdown("Unavailable here: " + " ".join(notes))
        components = [enabled, backend, mode, dtype, channels_last, attention, dc_interval, dc_depth, dc_start, dc_end, lcm_lora, lcm_strength, loras,
                      sc_mode, sc_front, sc_back, sc_threshold]
        # Same function objects in both tabs, so "Send to img2img" carries the values across.
        self.infotext_fields = [(c, webui.infotext_field(n)) for c, n in zip(components, webui.UI_FIELDS)]
        self.paste_field_names = [webui.infotext_field(n) for n in webui.UI_FIELDS]
        return components

    # -- processing ------------------------------------------------------------------------
    def _options(self, p, args):
        opts = webui.options_from_args(args)
        return webui.with_overrides(opts, getattr(p, "sd_accel_overrides", None))

    def process(self, p, *args):
        webui.finish_generation()  # a generation that was interrupted never reached postprocess
        p.sd_accel_applied = None
        try:
            opts = self._options(p, args)
        except webui.SDAccelError as e:
            self._error(p, e)
            p.sd_accel_options = None
            return
        p.sd_accel_options = opts
        p.sd_accel_lora_dirs = _lora_dirs()
        p.extra_generation_params.update(webui.to_infotext(opts, dit=webui.is_dit(p.sd_model)))  # a DiT's cache is the Step Cache
        if opts.lcm_on and webui.takes_lcm(p.sd_model):  # on a DiT model the LCM-LoRA is refused with a note (forge_dit)
            _use_lcm_sampler(p)

    @staticmethod
    def _error(p, e):
        print(e)
        p.extra_generation_params[webui.K_STATUS] = f"error: {e}"

    def _apply(self, p):
        opts = getattr(p, "sd_accel_options", None)
        if opts is None or not opts.active:
            webui.A1111.undo()
            return
        progress = functools.partial(_denoiser_progress, p)
        try:
            if webui.is_forge(p.sd_model):
                unet, applied = webui.apply_forge(p.sd_model.forge_objects.unet, opts, lora_dirs=p.sd_accel_lora_dirs, progress=progress)
                p.sd_model.forge_objects.unet = unet
            else:
                applied = webui.A1111.apply(p.sd_model, opts, lora_dirs=p.sd_accel_lora_dirs, progress=progress)
        except webui.SDAccelError as e:
            webui.finish_generation()
            self._error(p, e)
            return
        p.sd_accel_applied = applied

    def process_batch(self, p, *args, **kwargs):
        # A1111 before 1.10 has no process_before_every_sampling; applying is idempotent.
        if not webui.is_forge(p.sd_model):
            self._apply(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        # Forge rebuilds forge_objects.unet right before this call, for every pass (hires fix too).
        self._apply(p)

    def postprocess_batch(self, p, *args, **kwargs):
        applied = getattr(p, "sd_accel_applied", None)
        status = applied.status() if applied is not None else None
        if status:
            p.extra_generation_params[webui.K_STATUS] = status

    def postprocess(self, p, processed, *args):
        stats = webui.finish_generation()
        p.sd_accel_deepcache_runs = stats["deepcache"]
        for run in stats["deepcache"]:
            print(f"SD Accel DeepCache: reused deep features on {run['hits']}/{run['hits'] + run['full']} UNet calls "
                  f"(interval {run['interval']}, depth {run['depth']}){'; off: ' + run['disabled'] if run.get('disabled') else ''}")
        p.sd_accel_stepcache_runs = stats["stepcache"]
        for run in stats["stepcache"]:
            print(f"SD Accel Step Cache: cached {run['cached']}/{run['calls']} model calls ({run['mode']}); "
                  f"{100 * run['block_fraction']:.0f}% of block evaluations ran")


def _runs_dits() -> bool:
    """Whether this webui runs DiT models (Forge's `backend`, imported before the UI is built): the Step Cache's controls show there only."""
    return "backend.memory_management" in sys.modules


def _denoiser_progress(p):
    """(step, total) of the webui's CFGDenoiser for the running pass (the counter its skip-early-cond option uses)."""
    den = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
    if den is None or not getattr(den, "total_steps", None):
        return None
    return den.step, den.total_steps


def _use_lcm_sampler(p):
    """LCM-LoRA needs the LCM sampler and a low CFG; switch the sampler (recorded in the infotext as usual)."""
    from modules import sd_samplers

    if "LCM" in getattr(sd_samplers, "all_samplers_map", {}) and p.sampler_name != "LCM":
        print(f"SD Accel: LCM-LoRA is on, so the sampler is LCM for this generation (was {p.sampler_name}).")
        p.sampler_name = "LCM"
    if p.cfg_scale > 2.5:
        print(f"SD Accel: LCM-LoRA works at CFG 1-2; this generation uses {p.cfg_scale}.")


# --- settings, XYZ plot, lifecycle ------------------------------------------------------------------

def on_ui_settings():
    from modules.options import OptionInfo  # shared.OptionInfo on both hosts; imported where it is defined

    d = webui.WebuiOptions()
    for name in webui.SETTINGS_FIELDS:
        opt, label = OPTIONS[name], f"Default: {OPTIONS[name].label}"
        if opt.kind == "COMBO":
            info = OptionInfo(getattr(d, name), label, gr.Dropdown, {"choices": list(opt.choices)}, section=SECTION)
        elif opt.kind in ("INT", "FLOAT"):
            info = OptionInfo(getattr(d, name), label, gr.Slider, {"minimum": opt.min, "maximum": opt.max, "step": opt.step}, section=SECTION)
        else:
            info = OptionInfo(getattr(d, name), label, gr.Checkbox, section=SECTION)
        if hasattr(info, "info"):  # the help line under the setting (OptionInfo.info, webui 1.6+)
            info = info.info(opt.help)
        shared.opts.add_option(_option_key(name), info)


def _override(field, cast):
    def apply(p, x, xs):
        overrides = dict(getattr(p, "sd_accel_overrides", None) or {})
        overrides[field] = cast(x)
        p.sd_accel_overrides = overrides
    return apply


def _add_xyz_axes():
    """SD Accel options as XYZ plot axes (they set per-image overrides that `process` reads)."""
    xyz = next((d.module for d in scripts.scripts_data if d.script_class.__module__ in ("xyz_grid.py", "xy_grid.py")), None)
    if xyz is None:
        return
    casts = {"COMBO": str, "INT": int, "FLOAT": float}

    def label(opt):  # the axis name: the label without its hint ("DeepCache interval (1 = off)" -> "DeepCache interval")
        return f"[SD Accel] {opt.label.split(' (')[0]}"

    axes = [
        *(xyz.AxisOption(label(opt), str, _override(n, str), choices=lambda opt=opt: list(opt.choices)) for n, opt in OPTIONS.items() if opt.kind == "COMBO"),
        *(xyz.AxisOption(label(OPTIONS[n]), casts[OPTIONS[n].kind], _override(n, casts[OPTIONS[n].kind]))
          for n in ("deepcache_interval", "deepcache_depth", "lcm_strength", "stepcache_front", "stepcache_back", "stepcache_threshold")),
        xyz.AxisOption(label(OPTIONS["loras"]), str, _override("loras", str)),
    ]
    known = {a.label for a in xyz.axis_options}
    xyz.axis_options.extend(a for a in axes if a.label not in known)


def _on_model_loaded(sd_model):
    webui.finish_generation()


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_before_ui(_add_xyz_axes)
script_callbacks.on_model_loaded(_on_model_loaded)
script_callbacks.on_script_unloaded(webui.finish_generation)
