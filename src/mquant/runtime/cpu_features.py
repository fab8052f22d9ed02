"""What the CPU offers for int8 products: the model and its dot-product instruction sets (AMX,
AVX-512 VNNI, AVX-VNNI, AVX2, ARM dot-product), read once per process."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    amx: bool
    avx512: bool
    avx512_vnni: bool
    avx512_bf16: bool
    avx_vnni: bool
    avx2: bool
    arm_dotprod: bool

    def flags(self) -> list[str]:
        return [name for name in ("amx", "avx512", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx2", "arm_dotprod")
                if getattr(self, name)]

    def describe(self) -> str:
        return f"{self.model} ({', '.join(self.flags()) or 'no int8 dot-product instructions'})"


def _cpuinfo_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags |= set(value.split())
    return model, flags


@functools.cache
def cpu_features() -> CpuFeatures:
    model, flags = _cpuinfo_flags()
    cpu = torch.cpu
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: "amx_tile" in flags)()
    avx512 = getattr(cpu, "_is_avx512_supported", lambda: "avx512f" in flags)()
    return CpuFeatures(
        model=model, amx=bool(amx), avx512=bool(avx512),
        avx512_vnni="avx512_vnni" in flags or (avx512 and getattr(cpu, "_is_vnni_supported", lambda: False)()),
        avx512_bf16=bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: "avx512_bf16" in flags)()),
        avx_vnni="avx_vnni" in flags, avx2=bool(getattr(cpu, "_is_avx2_supported", lambda: "avx2" in flags)()),
        arm_dotprod="asimddp" in flags)
