import pytest
import torch

from sd_accel.accel_core import CastConfig, SDAccelError, cast
from sd_accel.accel_core.casting import resolve_dtype


def _state(m):
    return {k: (v.dtype, v.data_ptr(), v.clone()) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32),
                                        ("auto", resolve_dtype("auto", "cpu"))])
def test_cast_dtypes_and_input_untouched(unet, inputs, name, dtype):
    before = _state(unet)
    out = cast(unet, CastConfig(dtype=name, channels_last=True))
    assert out is not unet
    assert {p.dtype for p in out.parameters()} == {dtype}
    conv = out.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for k, (dt, ptr, val) in before.items():  # the input model is unchanged
        v = unet.state_dict()[k]
        assert v.dtype == dt and v.data_ptr() == ptr and torch.equal(v, val)
    x, t, c = inputs
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=c).sample
        got = out(x.to(dtype), t, encoder_hidden_states=c.to(dtype)).sample.float()
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


def test_auto_dtype_per_device(monkeypatch):
    import sys

    cast_mod = sys.modules[resolve_dtype.__module__]  # the module (accel_core.casting the name is the verb)

    assert resolve_dtype("auto", "cuda") == torch.float16
    monkeypatch.setattr(cast_mod, "cpu_bf16_is_fast", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16  # AMX: measured faster
    monkeypatch.setattr(cast_mod, "cpu_bf16_is_fast", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32  # AVX512-BF16 alone measured 0.80x: fp32


def test_bf16_on_the_cpu_only_with_amx():
    from sd_accel.accel_core.casting import cpu_bf16_is_fast

    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    assert cpu_bf16_is_fast() == (" amx_bf16" in flags)


@pytest.mark.parametrize("kw", [{"dtype": "int8"}, {"attention": "xformers"}])
def test_bad_cast_options(kw):
    with pytest.raises(SDAccelError, match="expected one of"):
        CastConfig(**kw)


def test_attention_context_limits_sdpa_for_the_call_only():
    from sd_accel.accel_core.casting import attention_context

    q = torch.randn(1, 2, 8, 4)
    with attention_context("math"):
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    b = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(a, b)


def _cpu_runs(attention: str) -> bool:
    """Whether this CPU build runs SDPA under `attention` (efficient attention has no CPU kernel)."""
    from sd_accel.accel_core.casting import attention_context

    q = torch.randn(1, 2, 4, 8)
    try:
        with attention_context(attention):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("attention", ["auto", "flash", "efficient", "math", "cudnn"])
def test_attention_choice_compiles_into_one_graph(attention):
    # The kernel choice runs inside compiled code (ComfyUI's per-model attention override): a
    # graph break there splits the model at every attention layer (cudnn did: 129 graphs on SD1.5).
    from sd_accel.accel_core.casting import attention_context

    if not _cpu_runs(attention):
        pytest.skip(f"this CPU build has no SDPA kernel for attention={attention}")

    def attend(q, k, v):
        with attention_context(attention):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v) * 2

    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    explained = torch._dynamo.explain(attend)(q, k, v)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1
    compiled = torch.compile(attend, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v))


def test_bf16_models_stay_bf16_under_auto_and_fp8_on_cuda():
    # Flux & co. ship in bf16: fp16 overflows their activations, and the layers fp8 keeps in the
    # compute dtype met fp16 inputs (a crash on Flux.1-dev, H100).
    from sd_accel.accel_core.casting import resolve_dtype

    assert resolve_dtype("fp8", "cuda", torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", "cuda", torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("fp8", "cuda", torch.float16) == torch.float16
    assert resolve_dtype("auto", "cuda", torch.float32) == torch.float16
    assert resolve_dtype("fp16", "cuda", torch.bfloat16) == torch.float16  # an explicit choice is kept
