"""GPU kinds the planner knows by name (peak dense bf16 FLOP/s and memory per GPU, each with its source), and
cluster specs like "8xH100" or "16xMI300X"; any other GPU is given by its numbers."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    peak_bf16: float  # dense (no sparsity) bf16 tensor FLOP/s
    memory_gib: float
    source: str


# Vendors' data sheets; dense figures (the sparsity figures are twice these).
GPUS = {
    "H100": GPU("H100 SXM5 80GB", 989e12, 80, "NVIDIA H100 Tensor Core GPU data sheet: BF16 1,979 TFLOPS with "
                "sparsity, half of it dense; 80 GB HBM3"),
    "H200": GPU("H200 SXM 141GB", 989e12, 141, "NVIDIA H200 data sheet: BF16 1,979 TFLOPS with sparsity, half of it "
                "dense; 141 GB HBM3e"),
    "A100": GPU("A100 SXM4 80GB", 312e12, 80, "NVIDIA A100 data sheet: BF16 312 TFLOPS (624 with sparsity); 80 GB "
                "HBM2e"),
    "MI300X": GPU("AMD Instinct MI300X", 1307.4e12, 192, "AMD Instinct MI300X data sheet: BF16 1,307.4 TFLOPS dense "
                  "(2,614.9 with sparsity); 192 GB HBM3"),
    "L40S": GPU("L40S 48GB", 362.05e12, 48, "NVIDIA L40S data sheet: BF16 362.05 TFLOPS (733 with sparsity); 48 GB "
                "GDDR6"),
    "A10": GPU("A10 24GB", 125e12, 24, "NVIDIA A10 data sheet: BF16 125 TFLOPS (250 with sparsity); 24 GB GDDR6"),
}
ALIASES = {"H100-SXM": "H100", "H100SXM": "H100", "A100-80GB": "A100", "A100-80G": "A100", "MI300": "MI300X"}


def peak_by_device_name(name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of a device by a kind in its name (longest kind first: A100 before A10), else None."""
    for kind in sorted(GPUS, key=len, reverse=True):
        if name and kind in name.upper():
            return GPUS[kind].peak_bf16
    return None


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu: GPU

    @property
    def label(self) -> str:
        return f"{self.gpus} x {self.gpu.name}"


def parse_cluster(spec: str, peak_tflops: float | None = None, memory_gib: float | None = None) -> Cluster:
    """"8xH100" (a known kind), or "8" / "8xMYGPU" with `peak_tflops` and `memory_gib` given; ValueError naming
    an unknown kind or an impossible number."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*([A-Za-z0-9_.-]+))?\s*", str(spec))
    if not m:
        raise ValueError(f"cluster {spec!r}: expected COUNTxKIND, e.g. 8xH100 (kinds: {sorted(GPUS)})")
    count, kind = int(m.group(1)), (m.group(2) or "").upper()
    if count < 1:
        raise ValueError(f"cluster {spec!r}: a cluster needs at least one GPU")
    kind = ALIASES.get(kind, kind)
    if peak_tflops is not None or memory_gib is not None:
        if peak_tflops is None or memory_gib is None or peak_tflops <= 0 or memory_gib <= 0:
            raise ValueError(f"a GPU given by its numbers needs both peak_tflops > 0 and memory_gib > 0 (got "
                             f"{peak_tflops}, {memory_gib})")
        known = GPUS.get(kind)
        return Cluster(count, GPU(kind or "custom GPU", peak_tflops * 1e12, memory_gib,
                                  "given" + (f" (data sheet: {known.peak_bf16 / 1e12:g} TFLOP/s)" if known else "")))
    if kind not in GPUS:
        raise ValueError(f"unknown GPU kind {m.group(2)!r} in {spec!r}; known: {sorted(GPUS)}, or give "
                         "--peak-tflops and --gpu-memory")
    return Cluster(count, GPUS[kind])
