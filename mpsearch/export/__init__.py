"""Checkpoints for serving engines: compressed-tensors (vLLM, transformers) and torchao configs.

``export_checkpoint(model, policy, out_dir)`` writes a directory that
``AutoModelForImageTextToText.from_pretrained(out_dir)`` loads without mpsearch and
``vllm serve out_dir`` serves; ``exportable_formats("compressed-tensors")`` lists the formats it
holds exactly (see :mod:`mpsearch.export.compressed_tensors` for the mapping and why the others
are refused). :mod:`mpsearch.export.torchao` gives the same map as a torchao ``FqnToConfig``.

Example:
    >>> import mpsearch as mps
    >>> "rtn.int4g128" in mps.exportable_formats("compressed-tensors")
    True
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mpsearch.errors import MpsError
from mpsearch.export.compressed_tensors import CT_SCHEMES, exportable_formats_ct, plan_export, write_checkpoint
from mpsearch.export.torchao import (
    TORCHAO_CONFIGS,
    exportable_formats_torchao,
    torchao_config,
    torchao_config_dict,
    write_torchao_config,
)

EXPORT_FORMATS = ("compressed-tensors", "torchao")


def _check_target(format: str) -> str:
    if format not in EXPORT_FORMATS:
        raise MpsError(f"unknown export format {format!r}; valid: {', '.join(EXPORT_FORMATS)}")
    return format


def exportable_formats(format: str = "compressed-tensors") -> list[str]:
    """The mpsearch formats an export ``format`` holds (registry order).

    Example:
        >>> exportable_formats("compressed-tensors")[:3]
        ['fp32', 'bf16', 'fp16']
        >>> "bnb.nf4" in exportable_formats("compressed-tensors")
        False
    """
    if _check_target(format) == "torchao":
        return exportable_formats_torchao()
    return exportable_formats_ct()


def export_checkpoint(model: nn.Module, policy: Any, out_dir: str | Path, format: str = "compressed-tensors",
                      processor: Any = None, *, space: Any = None, overwrite: bool = False) -> Path:
    """Write ``policy`` applied to ``model`` as a checkpoint serving engines load without mpsearch.

    ``format="compressed-tensors"``: ``out_dir`` gets ``config.json`` (with
    ``quantization_config``: one config group per scheme, exact module paths as targets, the
    full-precision layers in ``ignore``), safetensors with compressed-tensors' packed codes and
    scales, the generation config and (when ``processor`` is given) the processor files. The
    checkpoint holds the weights mpsearch ran with: every layer is decompressed with
    compressed-tensors and compared bit for bit before anything is written.
    ``format="torchao"``: ``out_dir`` gets ``torchao_config.json``, the policy as a torchao
    ``FqnToConfig`` (see :func:`torchao_config_dict`); no weights.

    ``model`` is the full-precision model (each layer is quantized here exactly as
    :func:`mpsearch.apply_policy` does) or one already quantized with this policy. A layer whose
    format does not export, or a tie group (q/k/v, gate/up: ``space``'s ties, else the natural
    ones) given two schemes, raises :class:`MpsError` in one line before anything is written;
    a written export is moved into place whole. Returns ``out_dir``.

    Example:
        >>> import mpsearch as mps
        >>> model, processor = mps.load_vlm("tiny:llava")
        >>> policy = mps.Policy({"model.language_model.layers.0.mlp.down_proj": "rtn.int4g128"},
        ...                     default="rtn.int8ch", rules=[("lm_head", "fp32")])
        >>> mps.export_checkpoint(model, policy, "/tmp/tiny-ct", processor=processor, overwrite=True).name
        'tiny-ct'
    """
    if _check_target(format) == "torchao":
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
            raise MpsError(f"{out} exists and is not an empty directory; choose another -o or pass overwrite=True")
        data = torchao_config_dict(model, policy, space)  # checks before anything is written
        out.mkdir(parents=True, exist_ok=True)
        write_torchao_config(model, policy, out / "torchao_config.json", space)
        del data
        return out
    return write_checkpoint(model, policy, out_dir, processor=processor, space=space, overwrite=overwrite)


__all__ = [
    "CT_SCHEMES",
    "EXPORT_FORMATS",
    "TORCHAO_CONFIGS",
    "export_checkpoint",
    "exportable_formats",
    "plan_export",
    "torchao_config",
    "torchao_config_dict",
    "write_torchao_config",
]
