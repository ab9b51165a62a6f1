"""The `ce_export::moe` custom op: one call per MoE block.

The op is what torch.export sees in place of a whole MoE block; its fake implementation gives
shapes, its CPU implementation is the reference math (moe_math.py) and its CUDA implementation
is our Triton kernels (plugins/ce_kernels) when Triton is installed and the inputs suit them.

When the CUDA implementation cannot use the kernels it runs the reference instead, and says so:
a warning, once per reason, or a `FallbackError` in strict mode (`strict_kernels()`, or the
environment variable CE_EXPORT_STRICT_KERNELS=1), which benchmarks use so that a row labelled with
our kernels never times the reference. The reference syncs with the host, so a CUDA graph that
captures it fails. `reference_math()` asks for the reference on purpose and is never reported.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings

import torch

from ce_export import moe_math

OP_NAMESPACE = "ce_export"
STRICT_ENV = "CE_EXPORT_STRICT_KERNELS"
_reference_on_cuda = False
_strict = False
_reported: set[str] = set()


class FallbackError(RuntimeError):
    """Raised in strict mode when the CUDA op would run the reference instead of the kernels."""


class KernelFallbackWarning(UserWarning):
    """The CUDA op ran the reference math instead of the Triton kernels."""


@contextlib.contextmanager
def reference_math():
    """Run the op through moe_math.py on CUDA too (the reference a benchmark compares against)."""
    global _reference_on_cuda
    previous, _reference_on_cuda = _reference_on_cuda, True
    try:
        yield
    finally:
        _reference_on_cuda = previous


@contextlib.contextmanager
def strict_kernels(enabled: bool = True):
    """Inside, the CUDA op raises FallbackError instead of running the reference in place of the kernels."""
    global _strict
    previous, _strict = _strict, enabled
    try:
        yield
    finally:
        _strict = previous


def is_strict() -> bool:
    return _strict or os.environ.get(STRICT_ENV, "") not in ("", "0")


# The op's schema is the reference's signature: one argument list, in moe_math.py.
moe = torch.library.custom_op(f"{OP_NAMESPACE}::moe", moe_math.moe_reference, mutates_args=())
_ARGUMENTS = inspect.signature(moe_math.moe_reference)


@moe.register_fake
def _moe_fake(hidden, router_logits, gate_up, down, ces, top_k, n_ce, norm_topk_prob, *variant):
    return torch.empty_like(hidden)


def why_not_kernels(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> str | None:
    """Why the CUDA op cannot run these inputs through the Triton kernels; None when it can."""
    if not hidden.dtype == gate_up.dtype == down.dtype:
        return f"mixed dtypes (hidden {hidden.dtype}, gate_up {gate_up.dtype}, down {down.dtype})"
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {hidden.dtype} (the kernels take fp32, fp16 and bf16)"
    try:
        # Imported here: Triton fixes interpreted-or-compiled mode at its first import.
        import ce_kernels  # noqa: F401
    except ImportError as error:
        return f"the Triton kernels cannot be imported ({error}; pip install triton)"
    if hidden.device.type == "cuda":
        capability = torch.cuda.get_device_capability(hidden.device)
        if hidden.dtype == torch.bfloat16 and capability < (8, 0):
            return f"bf16 on compute capability {capability[0]}.{capability[1]} (needs 8.0)"
        from ce_kernels.fused_moe import max_shared_bytes
        from ce_kernels.tile_configs import SMALL_SHARED_BYTES

        if max_shared_bytes(hidden.device) < SMALL_SHARED_BYTES:
            return f"{max_shared_bytes(hidden.device)} B of shared memory per block (the tile tables need {SMALL_SHARED_BYTES})"
    return None


def report_fallback(reason: str) -> None:
    """Raise (strict mode) or warn once per reason that the CUDA op runs the reference."""
    message = f"ce_export::moe on CUDA runs the reference math (moe_math.py), not the Triton kernels: {reason}"
    if is_strict():
        raise FallbackError(message)
    if reason not in _reported:
        _reported.add(reason)
        warnings.warn(message + ". It syncs with the host (no CUDA-graph capture) and is slow.",
                      KernelFallbackWarning, stacklevel=3)


def kernels_lack_variant(routing: str, weights_on_input: bool) -> str | None:
    """Why the Triton kernels cannot run this routing / expert variant; None when they can."""
    from ce_kernels import SUPPORTED_ROUTINGS

    if routing not in SUPPORTED_ROUTINGS:
        return f"routing {routing!r} (the kernels route {', '.join(SUPPORTED_ROUTINGS)})"
    if weights_on_input:
        return "the routing weight on the expert input (Llama 4's top-1; not in the kernels)"
    return None


@moe.register_kernel("cuda")
def _moe_cuda(*args, **kwargs):
    call = _ARGUMENTS.bind(*args, **kwargs)
    call.apply_defaults()
    if _reference_on_cuda:
        return moe_math.moe_reference(*call.args)
    hidden, gate_up, down = call.arguments["hidden"], call.arguments["gate_up"], call.arguments["down"]
    reason = (why_not_kernels(hidden, gate_up, down)
              or kernels_lack_variant(call.arguments["routing"], call.arguments["weights_on_input"]))
    if reason is not None:
        report_fallback(reason)
        return moe_math.moe_reference(*call.args)
    from ce_kernels import fused_moe

    kernel_arguments = {name: value for name, value in call.arguments.items() if name != "weights_on_input"}
    return fused_moe(**kernel_arguments)  # the kernels lack weights_on_input (checked above)
