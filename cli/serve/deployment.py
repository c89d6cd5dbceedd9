"""`sd-accel serve`: SD Accel on Ray Serve, N replicas (one GPU each) warm from one compile.

The replicas run `serve_pipeline.Pipeline`. They share compiled code through an artifacts
store, a small Ray actor: the first replica to start with nothing to import compiles (its
warm-up) and publishes its artifacts file; the others wait for it and import it, so they compile
nothing from cold. The artifacts travel through Ray's object store, or, with a shared
`cache_dir`, through that folder (the store then only says when it is ready). An artifacts file
given at start (`--artifacts`, from `sd-accel cache export`) seeds the store; a replica that
cannot use it (damaged, another torch or GPU) logs why, says so in GET /info, and compiles as
usual.

HTTP (route /): POST /  a JSON request (see serve_pipeline.parse_request) -> latent or preview
PNG, with timings; GET /info -> this replica's state (artifacts, compile counters). Errors are
JSON {"error": ...} with status 400 / 413; the replica goes on serving.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import asdict

from ...accel_core import cache_artifacts as ca
from ...accel_core.errors import SDAccelError
from .pipeline import Pipeline, RequestError, ServeConfig, parse_request

STORE = "sd_accel_artifacts"
NAMESPACE = "sd_accel"
INSTALL = "pip install 'ray[serve]' (or the pack's extra: pip install 'sd-accel[serve]')"
logger = logging.getLogger("sd_accel.serve")


def require_ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ImportError(f"SD Accel: `sd-accel serve` needs Ray Serve, which is not installed ({e}). Install it with: {INSTALL}") from None
    return ray, serve


class _Store:
    """The artifacts store (a Ray actor): a seed file, the published artifacts, who compiles."""

    def __init__(self, seed: bytes | None = None, seed_source: str = ""):
        self.seed, self.seed_source = seed, seed_source
        self.published: bytes | None = None
        self.published_by = ""
        self.folder_ready = False
        self.compiler: str | None = None
        self.refusals: dict[str, str] = {}
        self.ready = asyncio.Event()
        self.events: list[tuple[str, str]] = []  # (replica number, text): start-up progress the driver prints
        self.numbers: dict[str, str] = {}
        self.failure: str | None = None  # the first replica error (an SD Accel message): the driver stops

    def _number(self, replica: str) -> str:
        return self.numbers.setdefault(replica, str(len(self.numbers) + 1))

    def progress(self, replica: str, text: str) -> None:
        self.events.append((self._number(replica), text))

    def fail(self, replica: str, message: str) -> None:
        self.events.append((self._number(replica), "failed: " + message))
        self.failure = self.failure or message

    def poll(self, since: int) -> tuple[list[tuple[str, str]], str | None]:
        """The progress lines from index `since` on, and the first failure."""
        return self.events[since:], self.failure

    def get(self) -> tuple[bytes | None, str]:
        if self.published is not None:
            return self.published, f"the artifacts replica {self.published_by} published"
        return self.seed, self.seed_source

    def claim(self, replica: str) -> bool:
        if self.compiler is None or self.compiler == replica:
            self.compiler = replica
            return True
        return False

    def publish(self, replica: str, data: bytes | None) -> None:
        """`data`: the artifacts file; None: they are in the shared folder (or nothing could be compiled)."""
        if data is not None:
            self.published, self.published_by = data, replica
        self.folder_ready = True
        self.ready.set()

    def give_up(self, replica: str) -> None:
        if self.compiler == replica:
            self.compiler = None
        self.ready.set()  # the waiters compile themselves

    def refuse(self, replica: str, message: str) -> None:
        self.refusals[replica] = message

    async def wait(self, timeout_s: float) -> tuple[bytes | None, str]:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        return self.get()

    def status(self) -> dict:
        return {"seed": self.seed_source if self.seed is not None else None, "published_by": self.published_by or None,
                "published_bytes": len(self.published) if self.published else 0, "compiler": self.compiler, "refusals": dict(self.refusals)}


class _Replica:
    """The Serve deployment's body (wrapped by `deployment()` below)."""

    def __init__(self, config: dict, store_name: str = STORE, wait_s: float = 900.0):
        ray, serve = require_ray()
        cfg = ServeConfig(**config)
        try:
            self.name = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:
            self.name = f"pid-{__import__('os').getpid()}"
        self.pipe = None
        store = ray.get_actor(store_name, namespace=NAMESPACE)
        self.say = lambda text: store.progress.remote(self.name, text)  # fire and forget: the driver prints it
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-accel-unet")  # one thread owns the UNet
        self.started = time.time()
        try:
            self.say(f"loading the {'checkpoint ' + cfg.checkpoint if cfg.checkpoint else cfg.preset + ' model'} on {cfg.device}")
            self.pipe: Pipeline = self.pool.submit(Pipeline, cfg).result()
            self.say(f"model loaded in {self.pipe.load_s:.1f} s")
            self.role = self.pool.submit(self._warm, ray, store, cfg, wait_s).result()
        except Exception as e:  # the driver prints this one line and stops, instead of Serve retrying and logging tracebacks
            ray.get(store.fail.remote(self.name, str(e) if isinstance(e, SDAccelError) else f"{type(e).__name__}: {e}"))
            raise
        self.ready_s = time.time() - self.started
        self.say(f"ready ({self.role}) after {self.ready_s:.1f} s")

    def __del__(self):  # Serve calls it when the replica stops
        if getattr(self, "pipe", None) is not None:
            self.pipe.close()

    def _import(self, ray, store, data, source) -> bool:
        if data is None:
            return False
        try:
            self.say(f"importing the artifacts ({source})")
            msg = self.pipe.import_artifacts(data, source)
            logger.info("SD Accel serve: %s", msg)
            self.say(msg)
            return True
        except ca.ArtifactsError as e:
            logger.warning("%s", e)
            self.say(f"refused the artifacts: {e}")
            ray.get(store.refuse.remote(self.name, str(e)))
            return False

    def _warm(self, ray, store, cfg: ServeConfig, wait_s: float) -> str:
        """Import what the store has, or compile and publish, or wait for the replica that does."""
        if not cfg.compile:
            role = "eager"
        else:
            data, source = ray.get(store.get.remote())
            if self._import(ray, store, data, source):
                role = "imported"
            elif ray.get(store.claim.remote(self.name)):
                try:
                    if cfg.warmup:
                        self.say("compiling (the other replicas wait for its artifacts)")
                        self.pipe.warm_up(self.say)
                    ray.get(store.publish.remote(self.name, None if cfg.cache_dir else self.pipe.export_artifacts()))
                except BaseException:
                    ray.get(store.give_up.remote(self.name))
                    raise
                return "compiled and published"
            else:
                self.say("waiting for the replica that compiles")
                data, source = ray.get(store.wait.remote(wait_s))  # another replica is compiling: take what it publishes
                if cfg.cache_dir:
                    role = "loaded from the shared folder"
                elif self._import(ray, store, data, source):
                    role = "imported"
                else:
                    role = "compiled (nothing usable was handed out)"
        if cfg.warmup:
            self.pipe.warm_up(self.say)
        return role

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if request.method == "GET" and request.url.path.rstrip("/").endswith("/info"):
            return JSONResponse(self.info())
        if request.method != "POST":
            return JSONResponse({"error": "SD Accel serve: expected POST / with a JSON request, or GET /info."}, status_code=405)
        try:
            size = int(request.headers.get("content-length") or 0)
            if size > self.pipe.cfg.max_body_bytes:
                raise RequestError(f"SD Accel serve: the request body is {size} bytes, above the limit of {self.pipe.cfg.max_body_bytes}. "
                                   "Send the JSON settings only.", 413)
            req = parse_request(await request.body(), self.pipe.cfg, self.pipe.loras)
        except RequestError as e:
            return JSONResponse({"error": str(e), "replica": self.name}, status_code=e.status)
        result = await self.batched(req)
        status = result.pop("status", 200)
        result["replica"] = self.name
        return JSONResponse(result, status_code=status)

    async def batched(self, reqs):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, self.pipe.run_batch, reqs)
        except Exception as e:  # never seen in tests; the replica must still answer the batch
            logger.exception("SD Accel serve: a batch failed")
            return [{"error": f"SD Accel serve: the batch failed ({type(e).__name__}: {e}); the replica goes on serving.", "status": 500}] * len(reqs)

    def info(self) -> dict:
        return {"replica": self.name, "role": self.role, "ready_s": round(self.ready_s, 3), **self.pipe.info()}


def deployment(cfg: ServeConfig, replicas: int):
    """The Serve deployment class for `cfg`: `replicas` copies, one GPU each on CUDA."""
    ray, serve = require_ray()
    body = type("SDAccelServe", (_Replica,), {"batched": serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_s)(_Replica.batched)})
    actor = {"num_gpus": 1} if cfg.device == "cuda" else {"num_cpus": 1}
    return serve.deployment(body, name="SDAccelServe", num_replicas=replicas, ray_actor_options=actor,
                            max_ongoing_requests=max(8, 2 * cfg.max_batch_size), health_check_timeout_s=120)


_handles: dict = {}


def start(cfg: ServeConfig, replicas: int, artifacts: bytes | None = None, artifacts_source: str = "", port: int = 8000,
          host: str = "127.0.0.1", wait_s: float = 900.0, store_name: str = STORE, progress=None, poll_s: float = 1.0):
    """Start the store and `replicas` replicas on the connected (or a new local) Ray cluster; returns the handle.

    Blocks until every replica is warm (compiled or imported); `progress(line)` hears each replica's
    start-up steps. A replica that fails to start stops it: SDAccelError with that replica's message."""
    import threading

    ray, serve = require_ray()
    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE, include_dashboard=False, logging_level=logging.WARNING)
    store = ray.remote(num_cpus=0)(_Store).options(name=store_name, namespace=NAMESPACE, lifetime=None).remote(artifacts, artifacts_source)
    ray.get(store.status.remote())
    _handles[store_name] = store  # a named actor lives while a handle to it does
    serve.start(http_options={"host": host, "port": port})
    app = deployment(cfg, replicas).bind(asdict(cfg), store_name, wait_s)
    done: dict = {}

    def run():  # serve.run blocks until every replica is warm; the caller's thread watches the store meanwhile
        try:
            done["handle"] = serve.run(app, name="sd-accel", route_prefix="/")
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            done["error"] = e

    thread = threading.Thread(target=run, name="sd-accel-serve-start", daemon=True)
    thread.start()
    seen = 0
    while True:
        thread.join(poll_s)
        events, failure = ray.get(store.poll.remote(seen))
        seen += len(events)
        for number, text in events:
            if progress is not None:
                progress(f"replica {number}: {text}")
        if failure:
            raise SDAccelError(failure)
        if not thread.is_alive():
            break
    if "error" in done:
        first = str(done["error"]).strip().splitlines()
        raise SDAccelError(f"SD Accel serve: Ray Serve could not start the replicas ({type(done['error']).__name__}: "
                           f"{first[0] if first else ''}). Ray's logs are in its session folder (/tmp/ray/session_latest/logs).")
    return done["handle"]


def store_status(store_name: str = STORE) -> dict:
    ray, _ = require_ray()
    return ray.get(ray.get_actor(store_name, namespace=NAMESPACE).status.remote())


def stop(store_name: str = STORE) -> None:
    ray, serve = require_ray()
    serve.shutdown()
    store = _handles.pop(store_name, None)
    if store is not None:
        ray.kill(store)


__all__ = ["start", "stop", "store_status", "deployment", "require_ray", "STORE", "NAMESPACE"]
