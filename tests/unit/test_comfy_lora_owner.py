"""Who owns the fused LoRA set in the ComfyUI host (hosts/comfy/lora_owner.py), without ComfyUI: the
callbacks ComfyUI would fire (pre-run, cleanup, detach, the patcher's death) driven in the
orders ComfyUI fires them, on a tiny UNet. The real host is exercised in
tests/integration/test_lora_hotswap.py."""
import gc
import uuid
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from sd_accel.accel_core.hosts.comfy import lora_owner as hl
from sd_accel.accel_core.lora import LoraSpec, lora_state
from testkit.loras import make_random_lora


class Patcher:
    """The parts of a ComfyUI ModelPatcher the callbacks read."""

    def __init__(self, unet, wanted=None, patches=None, patches_uuid=None):
        self.model = SimpleNamespace(diffusion_model=unet)
        self.attachments = {hl.LORA_KEY: wanted} if wanted else {}
        self.patches = patches or {}
        self.backup = {}
        self.patches_uuid = patches_uuid or uuid.uuid4()

    def get_attachment(self, key):
        return self.attachments.get(key)

    def get_model_object(self, name):
        return getattr(self.model, name)


@pytest.fixture
def setup(unet, tmp_path):
    paths = []
    for seed in (1, 2):
        p = tmp_path / f"l{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in make_random_lora(unet, "kohya-ldm", seed=seed).items()}, str(p))
        paths.append(str(p))
    w0 = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    sets = [hl.HotSwapSet((LoraSpec(p, 1.0),)) for p in paths]
    return unet, w0, sets


def _original(unet, w0):
    return all(torch.equal(v, w0[k]) for k, v in unet.state_dict().items())


def _sampling(patcher, fn, *args):
    token = hl._sampling.set(patcher)
    try:
        return fn(*args)
    finally:
        hl._sampling.reset(token)


def test_stays_fused_until_another_clone_loads(setup):
    unet, w0, (s1, _) = setup
    h = Patcher(unet, s1)
    hl.on_pre_run(h)
    fused = dict(lora_state(unet).originals)
    hl.on_cleanup(h)
    assert fused and not _original(unet, w0)
    _sampling(h, hl.on_detach, h, False)  # load_models_gpu reloading h for its own next run
    hl.on_pre_run(h)
    now = lora_state(unet).originals
    assert all(now[k] is fused[k] for k in fused)  # nothing restored, nothing fused again
    _sampling(Patcher(unet), hl.on_detach, h, False)  # another clone loads
    assert _original(unet, w0) and lora_state(unet).owner is None


def test_unload_restores_even_during_its_own_run(setup):
    unet, w0, (s1, _) = setup
    h = Patcher(unet, s1)
    hl.on_pre_run(h)
    _sampling(h, hl.on_detach, h, True)  # model_unload: ComfyUI unpatched, weights leave the device
    assert _original(unet, w0)


def test_only_the_owner_restores(setup):
    unet, w0, (s1, s2) = setup
    h1, h2 = Patcher(unet, s1), Patcher(unet, s2)
    hl.on_pre_run(h1)
    _sampling(h2, hl.on_detach, h1, False)
    hl.on_pre_run(h2)
    fused = dict(lora_state(unet).originals)
    hl.on_detach(h1, True)  # h1 is not the owner any more
    del h1
    gc.collect()
    assert lora_state(unet).originals == fused
    del h2  # the owner dies while loaded (ComfyUI switches to its parent without a detach)
    gc.collect()
    assert _original(unet, w0) and lora_state(unet).owner is None


def test_same_set_over_same_patches_takes_over_without_writing(setup):
    unet, w0, (s1, s2) = setup
    h = Patcher(unet, s1)
    hl.on_pre_run(h)
    fused = dict(lora_state(unet).originals)
    twin = Patcher(unet, s1, patches_uuid=h.patches_uuid)  # what clone() of h gives
    _sampling(twin, hl.on_detach, h, False)
    hl.on_pre_run(twin)
    assert lora_state(unet).originals == fused
    del h
    gc.collect()
    assert lora_state(unet).originals == fused
    # other ComfyUI patches (a new patches_uuid) or another set: restored at the switch
    for other in (Patcher(unet, s1), Patcher(unet, s2, patches_uuid=twin.patches_uuid)):
        hl.on_pre_run(twin)
        _sampling(other, hl.on_detach, twin, False)
        assert _original(unet, w0)


def test_comfy_patches_on_the_same_layers_restore_at_cleanup(setup):
    unet, w0, (s1, _) = setup
    h = Patcher(unet, s1)
    hl.on_pre_run(h)
    layer = next(iter(lora_state(unet).signature))
    hl.on_cleanup(h)
    assert not _original(unet, w0)  # no ComfyUI patches: stays
    overlapping = Patcher(unet, s1, patches={f"diffusion_model.{layer}": []})
    hl.on_pre_run(overlapping)
    hl.on_cleanup(overlapping)
    assert _original(unet, w0)
    elsewhere = Patcher(unet, s1, patches={"diffusion_model.conv_in.weight": []})
    hl.on_pre_run(elsewhere)
    hl.on_cleanup(elsewhere)
    assert not _original(unet, w0)


def test_failed_pre_run_leaves_no_owner(setup, tmp_path):
    unet, w0, (s1, _) = setup
    gone = tmp_path / "gone.safetensors"
    save_file({k: v.contiguous() for k, v in make_random_lora(unet, "kohya-ldm", seed=3).items()}, str(gone))
    h = Patcher(unet, hl.HotSwapSet(s1.specs + (LoraSpec(str(gone), 1.0),)))
    gone.unlink()  # read at the node, missing at the run
    with pytest.raises(Exception, match="does not exist"):
        hl.on_pre_run(h)
    hl.on_cleanup(h)
    assert _original(unet, w0) and lora_state(unet).owner is None
