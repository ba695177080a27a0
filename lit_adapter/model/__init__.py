"""The one model: its ``Config``, the decoder (``gpt``), RoPE, attention kernels, heads, quantized bases, FLOPs."""
