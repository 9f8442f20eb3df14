"""Memory-bandwidth roofline: the fastest a decode step can be on a known GPU.

A decode step reads every weight it uses once, so ``weight_bytes / bandwidth`` is a lower bound
on its latency (activations and the KV cache come on top). Shown beside measurements so users see
how far each format's kernel is from the limit.

Example:
    >>> round(roofline_ms(3.35e9, "NVIDIA H100 80GB HBM3"), 3)
    1.0
"""
from __future__ import annotations

from mpsearch.errors import MpsError

#: Peak DRAM bandwidth in bytes/s, matched against the device name (first match wins, so the
#: more specific names come first). Vendor data sheets.
BANDWIDTH_BYTES_PER_S: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("h200",), 4.8e12, "NVIDIA H200 (HBM3e)"),
    (("h100", "pcie"), 2.0e12, "NVIDIA H100 PCIe"),
    (("h100", "nvl"), 3.9e12, "NVIDIA H100 NVL"),
    (("h100",), 3.35e12, "NVIDIA H100 SXM (HBM3)"),
    (("a100", "40gb"), 1.555e12, "NVIDIA A100 40GB"),
    (("a100",), 2.0e12, "NVIDIA A100 80GB"),
    (("l4",), 0.3e12, "NVIDIA L4"),
    (("rtx 4090",), 1.008e12, "NVIDIA GeForce RTX 4090"),
)


def bandwidth_bytes_per_s(device_name: str) -> float | None:
    """Peak memory bandwidth of a GPU named like ``torch.cuda.get_device_name()``; None if unknown.

    Example:
        >>> bandwidth_bytes_per_s("NVIDIA A100-SXM4-40GB")
        1555000000000.0
    """
    name = device_name.lower()
    words = name.replace("-", " ").replace("_", " ")
    for needles, bw, _ in BANDWIDTH_BYTES_PER_S:
        if all(_has(words, n) for n in needles):
            return bw
    return None


def _has(words: str, needle: str) -> bool:
    # "l4" must be a word of its own (not part of "l40s"), the others may sit inside a token.
    if needle == "l4":
        return "l4" in words.split()
    return needle in words


def roofline_ms(weight_bytes: float, device_name: str, bandwidth: float | None = None) -> float:
    """Lower bound in ms of reading ``weight_bytes`` once on ``device_name`` (or at ``bandwidth`` B/s).

    Raises :class:`MpsError` for a device whose bandwidth is not known (pass ``bandwidth``).

    Example:
        >>> roofline_ms(2e9, "NVIDIA A100-SXM4-80GB")
        1.0
    """
    bw = bandwidth if bandwidth is not None else bandwidth_bytes_per_s(device_name)
    if bw is None:
        known = ", ".join(label for _, _, label in BANDWIDTH_BYTES_PER_S)
        raise MpsError(f"no memory bandwidth known for device {device_name!r} (known: {known}); pass bandwidth=")
    if weight_bytes < 0 or bw <= 0:
        raise MpsError(f"roofline needs weight_bytes >= 0 and bandwidth > 0, got {weight_bytes}, {bw}")
    return float(weight_bytes) / float(bw) * 1e3


__all__ = ["roofline_ms", "bandwidth_bytes_per_s", "BANDWIDTH_BYTES_PER_S"]
