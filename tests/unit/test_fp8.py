"""FP8 option: who may use it, and how layers are converted (CPU: torch._scaled_mm runs there too)."""
import pytest
import torch
from torch import nn

from sd_accel.accel_core import CastConfig, SDAccelError, cast
from sd_accel.accel_core import fp8
from sd_accel.accel_core.fp8 import FP8Config, FP8Linear, fp8_support_error, refresh, to_fp8


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_cpu_is_refused_with_what_to_pick_and_the_model_untouched(unet):
    reason = fp8_support_error("cpu")
    assert "compute capability 8.9" in reason and "cpu" in reason and "fp16" in reason
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(SDAccelError, match="fp8 tensor cores"):
        cast(unet, CastConfig(dtype="fp8"), device_type="cpu")
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("cap,ok", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((12, 0), True)])
def test_gpus_without_fp8_tensor_cores_are_refused(monkeypatch, cap, ok):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA Test GPU")
    reason = fp8_support_error("cuda")
    if ok:
        assert reason is None
    else:
        assert f"NVIDIA Test GPU with compute capability {cap[0]}.{cap[1]}" in reason and "8.9" in reason
        with pytest.raises(SDAccelError, match="left unchanged"):
            fp8.check_fp8_device("cuda:0", "SD Accel FP16 Cast")


def test_linear_layers_convert_and_keep_their_parameters(unet, inputs):
    ref_params = dict(unet.named_parameters())
    keys = set(unet.state_dict())
    x, t, c = inputs
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=c).sample
    report = to_fp8(unet)
    converted = {n: m for n, m in unet.named_modules() if isinstance(m, FP8Linear)}
    assert report.converted == len(converted) > 0
    assert not any("time_embed" in n for n in converted)  # embeddings stay in the compute dtype
    assert set(unet.state_dict()) == keys  # the fp8 copies are not state: LoRA names and checkpoints are unchanged
    for name, mod in converted.items():
        assert mod.weight is ref_params[f"{name}.weight"]  # the same Parameter: in-place patchers reach it
        assert mod.weight_fp8.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        got = unet(x, t, encoder_hidden_states=c).sample
    assert torch.isfinite(got).all()
    assert 0 < _rel(got, ref) < 0.1


def test_only_matmul_shaped_layers_convert():
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 20), nn.Conv2d(48, 32, 1), nn.Conv2d(32, 32, 3, padding=1),
                          nn.Conv2d(32, 32, 1, stride=2))
    report = to_fp8(model)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["FP8Linear", "Linear", "FP8Linear", "Conv2d", "Conv2d"]  # 20 outputs: not a multiple of 16
    assert (report.converted, report.kept) == (2, 3)
    assert to_fp8(nn.Sequential(nn.Conv2d(48, 32, 1)), FP8Config(convs=False)).converted == 0


def test_1x1_conv_matches_in_both_layouts():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 1)
    x = torch.randn(2, 32, 6, 5)
    with torch.no_grad():
        ref = conv(x)
        q = FP8Linear(conv)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = q(inp)
            assert out.shape == ref.shape
            assert _rel(out, ref) < 0.08


def test_refresh_requantizes_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    to_fp8(model)
    layer = model[0]
    ptr, before = layer.weight_fp8.data_ptr(), layer.weight_fp8.float().clone()
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight) * 3)  # a host patched the weight in place
    assert torch.equal(layer.weight_fp8.float(), before)  # nothing re-quantizes behind the host's back
    assert refresh(model) == 1
    assert not torch.equal(layer.weight_fp8.float(), before)
    assert layer.weight_fp8.data_ptr() == ptr  # captured graphs keep reading the same memory
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert _rel(layer(x), x @ layer.weight.t() + layer.bias) < 0.08


def test_requantize_param_refreshes_only_that_layer():
    from sd_accel.accel_core.fp8 import requantize_param

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    to_fp8(model)
    before = [m.weight_fp8.float().clone() for m in model]
    with torch.no_grad():
        model[1].weight.add_(1.0)
    requantize_param(model, "1.weight")
    assert torch.equal(model[0].weight_fp8.float(), before[0])
    assert not torch.equal(model[1].weight_fp8.float(), before[1])


def test_cast_config_accepts_fp8_and_cudnn():
    assert CastConfig(dtype="fp8", attention="cudnn").dtype == "fp8"
    from sd_accel.accel_core.casting import sdpa_backends
    from torch.nn.attention import SDPBackend

    assert sdpa_backends("cudnn") == [SDPBackend.CUDNN_ATTENTION]
