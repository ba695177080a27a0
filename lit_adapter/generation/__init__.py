"""Decoding with the KV cache and sampling."""
