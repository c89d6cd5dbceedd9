"""ComfyUI node classes: thin, no logic (that lives in accel_core)."""
