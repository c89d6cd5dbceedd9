"""`sd-accel serve`: SD Accel on Ray Serve. `command` is the verb, `deployment` the Ray Serve replicas and
their artifacts store, `pipeline` what one replica runs (no Ray)."""
