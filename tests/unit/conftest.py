import os

import pytest
import torch

# The compile cache persists by default (docs/compile-cache.md); tests that compile on the defaults
# must not fill the user's ~/.cache, and each test sees its own compiles. Tests of persistence give
# their own folders (or unset this).
os.environ.setdefault("SD_ACCEL_COMPILE_CACHE", "off")


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=8, attention_head_dim=4,
    ).eval()


def tiny_inputs(seed=1, batch=2, side=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, side, side, generator=g), torch.tensor([500] * batch),
            torch.randn(batch, 7, 16, generator=g))


@pytest.fixture
def unet():
    return tiny_unet()


@pytest.fixture
def inputs():
    return tiny_inputs()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test sees its own compiles: dynamo caches and its process-wide counters start empty.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
