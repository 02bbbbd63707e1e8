"""Mixed precision: one object that says how forward runs and how gradients are scaled.

fp32 runs as written. bf16 and fp16 keep fp32 master weights and optimizer state and run the
forward under autocast (bf16 on CPU and CUDA, fp16 on CUDA only); under FSDP the low-precision
compute comes from FSDP2's MixedPrecisionPolicy instead: `fsdp_policy()` produces it and
distributed.parallelize applies it. fp16's narrow range needs a dynamic GradScaler, which skips
steps whose gradients overflow.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from nanotrain.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 is for GPUs without bf16. torch runs fp16 autocast on CPU too, but it is slow there and bf16
# is the CPU choice; tests add "cpu" here to exercise the GradScaler path on a CPU-only machine.
FP16_DEVICE_TYPES = ("cuda",)


class Precision:
    """How the forward runs (`autocast()`) and how gradients are scaled (`scaler`) for a precision."""

    def __init__(self, name: str, device: torch.device, strategy: str):
        if name == "fp16" and device.type not in FP16_DEVICE_TYPES:
            raise ConfigError("train.precision = 'fp16' needs a CUDA device; use bf16 on CPU")
        # Without including_emulation=False torch calls a pre-Ampere GPU (V100, T4) bf16-capable
        # because it can emulate it, at a fraction of fp16's tensor-core speed.
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ConfigError(f"{torch.cuda.get_device_name(device)} has no native bf16 "
                              "(it would be emulated, slowly); use train.precision=fp16")
        self.name = name
        self.dtype = DTYPES[name]
        self.device_type = device.type
        # FSDP casts parameters itself; autocast on top would cast twice.
        self.uses_autocast = name != "fp32" and strategy != "fsdp"
        self.fsdp_param_dtype = self.dtype if name != "fp32" and strategy == "fsdp" else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self):
        """The context the forward pass (and loss) runs in."""
        if not self.uses_autocast:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def fsdp_policy(self):
        """FSDP2's MixedPrecisionPolicy for this precision, which distributed.parallelize applies.

        Parameters are gathered in the compute dtype (fp32 leaves them as stored); gradients are
        always reduced in fp32.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.fsdp_param_dtype, reduce_dtype=torch.float32)

    @property
    def kv_cache_dtype(self) -> torch.dtype | None:
        """The dtype a generation KV cache must hold, where it differs from the stored parameters'.

        FSDP computes with the parameters cast to bf16/fp16, so keys and values come out in that
        dtype; None: the parameters' dtype (autocast casts what it reads from the cache itself).
        """
        return self.fsdp_param_dtype

    def describe(self) -> str:
        if self.name == "fp32":
            return "fp32 (no autocast)"
        how = "FSDP MixedPrecisionPolicy, fp32 grad reduction" if self.fsdp_param_dtype else "autocast"
        scaler = ", dynamic GradScaler" if self.scaler.is_enabled() else ""
        return f"{self.name} compute via {how}, fp32 master weights, optimizer and loss{scaler}"
