"""SD Accel for stable-diffusion-webui (AUTOMATIC1111) and Forge: the "SD Accel" tab.

Backend availability, what the last generation applied, the compile cache, and the same
benchmark as `sd-accel bench` (baseline and each acceleration side by side, one process).
"""
import importlib
import importlib.util
import os
import queue
import sys
import threading

import gradio as gr

from modules import script_callbacks, shared


def _pack():
    """This extension's folder imported as the package `sd_accel` (see sd_accel_script.py for why)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mod = sys.modules.get("sd_accel")
    if mod is None or os.path.dirname(os.path.abspath(getattr(mod, "__file__", "") or "")) != root:
        spec = importlib.util.spec_from_file_location("sd_accel", os.path.join(root, "__init__.py"), submodule_search_locations=[root])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sd_accel"] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module("sd_accel.accel_core.hosts.webui")


webui = _pack()
SOURCES = ("loaded checkpoint", "tiny (built-in, seeded random weights)")
_bench_lock = threading.Lock()


def _loaded_checkpoint():
    """(path, preset) of the webui's loaded checkpoint, or (None, reason)."""
    model = getattr(shared, "sd_model", None)
    info = getattr(model, "sd_checkpoint_info", None)
    path = getattr(info, "filename", None)
    if not path or not os.path.isfile(path):
        return None, "no checkpoint is loaded"
    if not path.endswith(".safetensors"):
        return None, f"{os.path.basename(path)} is not a .safetensors file (the benchmark reads safetensors only)"
    return path, "sdxl-1024" if getattr(model, "is_sdxl", False) else "sd15-512"


def status_text() -> str:
    applied = webui.last_applied()
    lines = ["Last generation: " + (applied.describe() if applied is not None else "SD Accel off (nothing applied)")]
    for name, why in webui.feature_status().items():
        if why:
            lines.append(f"unavailable: {why}")
    return "\n".join(lines)


def cache_text() -> str:
    state = webui.cache_state()
    if not state:
        return "Nothing compiled or cast yet."
    out = []
    for entry in state:
        out.append(entry["module"])
        out += [f"  {c['config']}: {c['summary']}" for c in entry["compiled"]]
        if entry["cast_copy"]:
            out.append("  holds a cast copy of this UNet")
    return "\n".join(out)


def clear_cache():
    n = webui.clear_caches()
    return f"Cleared SD Accel's compiled callables and cast copies of {n} UNet(s) (and torch.compile's caches).", cache_text()


def run_benchmark(source, device, steps, rows):
    """Generator for the Benchmark button: progress lines, then the table, chart and JSON path."""
    from sd_accel.cli.bench.run import bench_config, run_bench
    from sd_accel.accel_core.errors import SDAccelError

    if not _bench_lock.acquire(blocking=False):
        yield "A benchmark is already running.", None, None, None
        return
    try:
        checkpoint, preset = None, "tiny"
        if source == SOURCES[0]:
            checkpoint, preset = _loaded_checkpoint()
            if checkpoint is None:
                yield f"Cannot benchmark the loaded model: {preset}. Load a .safetensors checkpoint, or pick the tiny model.", None, None, None
                return
        out_dir = os.path.join(shared.data_path, "outputs", "sd-accel-bench") if hasattr(shared, "data_path") else "sd-accel-bench"
        try:
            cfg = bench_config(device=device, preset=preset, steps=int(steps) or None, checkpoint=checkpoint, rows=rows, out_dir=out_dir)
        except SDAccelError as e:
            yield str(e), None, None, None
            return
        log = queue.Queue()
        result = {}

        def work():
            try:
                result["r"] = run_bench(cfg, progress=lambda name: log.put(f"measured: {name}"))
            except Exception as e:  # shown in the tab, not only in the console
                result["e"] = e
            finally:
                log.put(None)

        lines = [f"Benchmark: {checkpoint or 'tiny model'} ({preset}) on {device}, {cfg.steps or 'preset'} steps. "
                 "The first run of each compiled row includes compilation."]
        threading.Thread(target=work, daemon=True).start()
        yield "\n".join(lines), None, None, None
        while True:
            item = log.get()
            if item is None:
                break
            lines.append(item)
            yield "\n".join(lines), None, None, None
        if "e" in result:
            yield "\n".join(lines + [f"failed: {type(result['e']).__name__}: {result['e']}"]), None, None, None
            return
        r = result["r"]
        table = [[x.name, round(x.ms_per_step, 2), round(x.speedup, 2), round(x.rel_err, 4),
                  None if x.peak_mem_mb is None else round(x.peak_mem_mb), round(x.compile_s, 1), x.note] for x in r.rows]
        lines.append(r.table())
        yield "\n".join(lines), table, r.png_path, r.json_path
    finally:
        _bench_lock.release()


def on_ui_tabs():
    import torch

    devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("## SD Accel\nCompile, cast, DeepCache, LoRA hot-swap and LCM-LoRA are set per generation in the "
                    "**SD Accel** accordion of txt2img / img2img; defaults are under Settings > SD Accel.")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Backends")
                gr.Dataframe(value=webui.backend_table(), headers=["backend", "CUDA", "CPU", "missing (install with)"],
                             interactive=False, elem_id="sd_accel_backends")
                status = gr.Textbox(value=status_text(), label="Applied now", lines=6, interactive=False, elem_id="sd_accel_status")
                cache = gr.Textbox(value=cache_text(), label="Compile cache", lines=6, interactive=False, elem_id="sd_accel_cache")
                with gr.Row():
                    refresh = gr.Button("Refresh", elem_id="sd_accel_refresh")
                    clear = gr.Button("Clear compile cache", elem_id="sd_accel_clear")
            with gr.Column():
                gr.Markdown("### Benchmark (same as `sd-accel bench`)\nRuns its own copy of the UNet next to the webui's: "
                            "SD1.5 needs about 2 GB of extra GPU memory, SDXL about 6 GB.")
                source = gr.Radio(list(SOURCES), value=SOURCES[0] if devices[0] == "cuda" else SOURCES[1], label="Model", elem_id="sd_accel_bench_source")
                with gr.Row():
                    device = gr.Dropdown(devices, value=devices[0], label="Device", elem_id="sd_accel_bench_device")
                    steps = gr.Number(value=0, precision=0, label="Steps (0 = preset)", elem_id="sd_accel_bench_steps")
                rows = gr.Textbox(value="", label="Rows (prefixes, comma separated; empty = all)", elem_id="sd_accel_bench_rows")
                run = gr.Button("Run benchmark", variant="primary", elem_id="sd_accel_bench_run")
                log = gr.Textbox(label="Progress", lines=8, interactive=False, elem_id="sd_accel_bench_log")
                table = gr.Dataframe(headers=["configuration", "ms/step", "speed-up", "rel err", "peak MB", "compile s", "note"],
                                     interactive=False, elem_id="sd_accel_bench_table")
                chart = gr.Image(label="Speed-up", interactive=False, elem_id="sd_accel_bench_chart")
                json_path = gr.Textbox(label="JSON", interactive=False, elem_id="sd_accel_bench_json")
        refresh.click(fn=lambda: (status_text(), cache_text()), inputs=[], outputs=[status, cache])
        clear.click(fn=clear_cache, inputs=[], outputs=[status, cache])
        run.click(fn=run_benchmark, inputs=[source, device, steps, rows], outputs=[log, table, chart, json_path])
    return [(tab, "SD Accel", "sd_accel_tab")]


script_callbacks.on_ui_tabs(on_ui_tabs)
