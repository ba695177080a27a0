"""Rotary position embeddings (Su et al. 2021) and their scaling past the pretrained window.

The model rotates each query and key head by its position (``model.apply_rope``); this module builds the cos/sin
tables it uses. ``Config.rope_scaling`` (field names as in HF ``config.json``'s ``rope_scaling``) stretches the
pretrained window ``original_max_position_embeddings`` by ``factor``:

* ``linear``: position interpolation (Chen et al. 2023, https://arxiv.org/abs/2306.15595; kaiokendev): every
  frequency divided by ``factor``, i.e. position ``p`` is rotated as ``p / factor`` would have been.
* ``dynamic``: dynamic NTK-aware scaling (bloc97, emozilla): the base grows with the length ``L`` of the sequence
  seen, ``base * (factor * L / original - (factor - 1)) ** (hs / (hs - 2))``, and is unchanged up to the original
  window. ``L`` is the longest position of the call plus one (see :func:`dynamic_length`).
* ``yarn``: YaRN (Peng et al. 2023, https://arxiv.org/abs/2309.00071): high frequencies (more than ``beta_fast``
  rotations over the original window) kept, low ones (fewer than ``beta_slow``) interpolated, a linear ramp in
  between, and cos/sin multiplied by the attention factor ``0.1 ln(factor) + 1`` (or ``attention_factor``, or the
  ``mscale`` / ``mscale_all_dim`` ratio).
* ``llama3``: Llama 3.1's scaling: wavelengths shorter than ``original / high_freq_factor`` kept, longer than
  ``original / low_freq_factor`` divided by ``factor``, a smooth interpolation in between.

The formulas follow ``transformers.modeling_rope_utils`` operation for operation (float32 where it computes in
float32), so the tables agree with HF's to the last bit and the logits agree at positions far past the window
(``tests/test_rope.py``). A scaled config's ``block_size`` is the scaled window (``Config.with_rope_scaling``
sets it to ``factor * original``); the rope_scaling dict always records ``original_max_position_embeddings``.

Dynamic NTK and HF: per call, both compute the frequencies from ``max(position) + 1``. HF's rotary module also
*remembers* the longest length it has seen and keeps those frequencies for later, shorter calls above the
original window (until a call shorter than the original window resets it); here a forward depends on its input
only. The two agree on a freshly built HF model and whenever the calls' lengths never decrease. In KV-cache
decoding both rotate each new key with the frequencies of its own step and keep the cached keys as they were, so
beyond the original window incremental decoding differs (slightly) from one full forward over the same tokens, in
HF as here.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from lit_adapter.errors import UserError

RopeCache = Tuple[torch.Tensor, torch.Tensor]
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
ORIGINAL = "original_max_position_embeddings"
_COMMON = ("rope_type", "factor", ORIGINAL)
_OPTIONAL = {
    "linear": (),
    "dynamic": (),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
}
_REQUIRED = {"linear": (), "dynamic": (), "yarn": (), "llama3": ("low_freq_factor", "high_freq_factor")}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_rope_scaling(scaling: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """A checked copy of an HF-style ``rope_scaling`` dict, ``None`` for none; bad input is one ``UserError`` line.

    ``type`` is accepted for ``rope_type`` (older ``config.json`` files); type ``default`` means no scaling.
    ``original_max_position_embeddings`` may be missing here (:func:`check_rope_scaling` requires it).
    """
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise UserError(f"rope_scaling must be a JSON object such as {{\"type\": \"linear\", \"factor\": 4}}, "
                        f"got {scaling!r}")
    out = dict(scaling)
    if "type" in out:
        kind = out.pop("type")
        if out.setdefault("rope_type", kind) != kind:
            raise UserError(f"rope_scaling gives two types: type={kind!r} and rope_type={out['rope_type']!r}")
    kind = out.get("rope_type")
    if kind in (None, "default") and set(out) <= {"rope_type"}:
        return None
    if kind not in ROPE_TYPES:
        raise UserError(f"rope_scaling: unknown type {kind!r}; choose one of {', '.join(ROPE_TYPES)}")
    unknown = sorted(set(out) - set(_COMMON) - set(_OPTIONAL[kind]))
    if unknown:
        raise UserError(f"rope_scaling: {kind} does not take {', '.join(unknown)} (it takes factor, "
                        f"{', '.join(_OPTIONAL[kind] + (ORIGINAL,))})")
    missing = [k for k in ("factor",) + _REQUIRED[kind] if out.get(k) is None]
    if missing:
        raise UserError(f"rope_scaling: {kind} needs {', '.join(missing)}")
    factor = out["factor"]
    if not _number(factor) or factor <= 1:
        raise UserError(f"rope_scaling factor must be a number > 1 (the window grows by it), got {factor!r}")
    out["factor"] = float(factor)
    original = out.get(ORIGINAL)
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 2):
        raise UserError(f"rope_scaling {ORIGINAL} must be a whole number of tokens >= 2, got {original!r}")
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor",
                "high_freq_factor"):
        if out.get(key) is not None and (not _number(out[key]) or out[key] <= 0):
            raise UserError(f"rope_scaling {key} must be a number > 0, got {out[key]!r}")
    if kind == "yarn" and (out.get("beta_fast") or 32) <= (out.get("beta_slow") or 1):
        raise UserError("rope_scaling: yarn's beta_fast must exceed beta_slow (defaults 32 and 1)")
    if kind == "yarn" and not isinstance(out.get("truncate", True), bool):
        raise UserError(f"rope_scaling truncate must be true or false, got {out['truncate']!r}")
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise UserError("rope_scaling: llama3's high_freq_factor must exceed low_freq_factor")
    return out


def check_rope_scaling(scaling: Optional[Mapping[str, Any]], block_size: int) -> Optional[Dict[str, Any]]:
    """:func:`parse_rope_scaling` plus what a whole config needs: the original window, inside ``block_size``."""
    out = parse_rope_scaling(scaling)
    if out is None:
        return None
    original = out.get(ORIGINAL)
    if original is None:
        raise UserError(f"rope_scaling: {out['rope_type']} needs {ORIGINAL} (the pretrained window; "
                        "--model.rope_scaling fills it in from the checkpoint)")
    if original > block_size:
        raise UserError(f"rope_scaling {ORIGINAL}={original} exceeds block_size={block_size}: block_size is the "
                        "scaled window, at least the original one")
    return out


def describe_window(block_size: int, scaling: Optional[Mapping[str, Any]]) -> str:
    """``"2048 tokens (linear x4 of the pretrained 512)"`` or ``"512 tokens"``."""
    if not scaling:
        return f"{block_size} tokens"
    return f"{block_size} tokens ({scaling['rope_type']} x{scaling['factor']:g} of the pretrained {scaling[ORIGINAL]})"


def context_error(block_size: int, scaling: Optional[Mapping[str, Any]], length: int, what: str) -> str:
    """The one line that refuses ``length`` tokens past the window and says how to extend it."""
    if not scaling:
        factor = max(2, math.ceil(length / block_size))
        return (f"{what}={length} exceeds the model's window, block_size={block_size}; extend it with RoPE "
                f"position interpolation, e.g. --model.rope_scaling '{{\"type\": \"linear\", \"factor\": "
                f"{factor}}}', and fine-tune at the new length")
    factor = math.ceil(length / scaling[ORIGINAL])
    return (f"{what}={length} exceeds the scaled window, block_size={block_size} ({scaling['rope_type']} "
            f"x{scaling['factor']:g} of the pretrained {scaling[ORIGINAL]}); raise the factor, e.g. "
            f"--model.rope_scaling '{{\"type\": \"{scaling['rope_type']}\", \"factor\": {factor}}}'")


# ----------------------------------------------------------------------------------------------------------------------
# frequencies


def _default_inv_freq(base: Any, dim: int, device=None) -> torch.Tensor:
    """``1 / base^(2i / dim)`` for ``i < dim / 2``, in float32 (``base`` a float or a 0-d float32 tensor)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def dynamic_length(scaling: Optional[Mapping[str, Any]], seq_len: int) -> Optional[int]:
    """The sequence length dynamic NTK scales for: ``seq_len`` past the original window, else ``None``.

    ``None`` means the fixed table serves (every type but ``dynamic``, and ``dynamic`` within the window, where its
    frequencies are the unscaled ones).
    """
    if not scaling or scaling["rope_type"] != "dynamic" or seq_len <= scaling[ORIGINAL]:
        return None
    return seq_len


def inverse_frequencies(
    head_size: int, base: float, scaling: Optional[Mapping[str, Any]] = None, seq_len: Optional[int] = None,
    device=None,
) -> Tuple[torch.Tensor, float]:
    """``(inv_freq (head_size / 2,) float32, attention_factor)``: the rotation speed of each pair of channels and the
    factor cos and sin are multiplied by (YaRN's; 1 otherwise). ``seq_len`` is dynamic NTK's length seen."""
    dim = head_size
    if not scaling:
        return _default_inv_freq(base, dim, device), 1.0
    kind, factor, original = scaling["rope_type"], scaling["factor"], scaling[ORIGINAL]
    if kind == "linear":
        inv_freq = _default_inv_freq(base, dim, device)
        return inv_freq / factor, 1.0  # dividing the frequencies = dividing the positions
    if kind == "dynamic":
        if seq_len is None or seq_len <= original:
            return _default_inv_freq(base, dim, device), 1.0
        # HF passes the length as a 0-d int64 tensor, which makes this arithmetic float32: the same here, bit for bit
        length = torch.tensor(seq_len, dtype=torch.int64, device=device)
        grown = base * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(grown, dim, device), 1.0
    if kind == "yarn":
        return _yarn(dim, base, scaling, device)
    return _llama3(dim, base, factor, scaling, device)


def _yarn(dim: int, base: float, scaling: Mapping[str, Any], device) -> Tuple[torch.Tensor, float]:
    factor, original = scaling["factor"], scaling[ORIGINAL]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def channel_pair(rotations: float) -> float:
        # the pair index whose wavelength fits ``rotations`` times into the original window
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = channel_pair(beta_fast), channel_pair(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: the pair keeps its pretrained frequency; 0: it is interpolated
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def _llama3(dim: int, base: float, factor: float, scaling: Mapping[str, Any], device) -> Tuple[torch.Tensor, float]:
    inv_freq = _default_inv_freq(base, dim, device)
    low_factor, high_factor, original = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling[ORIGINAL]
    low_wavelen, high_wavelen = original / low_factor, original / high_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long wavelengths: interpolated
    smooth = (original / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def build_rope_cache(
    seq_len: int, n_elem: int, base: float, device=None, scaling: Optional[Mapping[str, Any]] = None,
    dynamic_seq_len: Optional[int] = None,
) -> RopeCache:
    """cos and sin tables (seq_len, n_elem) in float32, the frequencies repeated for both halves ("rotate half").

    ``dynamic_seq_len``: the length dynamic NTK scales for (:func:`dynamic_length`).
    """
    inv_freq, attention_factor = inverse_frequencies(n_elem, base, scaling, dynamic_seq_len, device)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # (seq_len, n_elem / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (seq_len, n_elem)
    if attention_factor == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rope_table_rows(block_size: int, scaling: Optional[Mapping[str, Any]], seq_len: int) -> int:
    """Rows of the table a forward of ``seq_len`` tokens builds (for the memory estimate)."""
    return dynamic_length(scaling, seq_len) or block_size
