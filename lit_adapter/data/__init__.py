"""Data: tokenizers, instruction/text/classification/preference records, prompts, truncation and order."""
