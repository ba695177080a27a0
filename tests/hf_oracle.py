"""HF transformers' LlamaForCausalLM on our converted weights: the model HF PEFT wraps as the tests' oracle."""

from lit_adapter.convert import lit_to_hf_state_dict
from lit_adapter.model.gpt import GPT


def hf_llama(base: GPT):
    """HF ``LlamaForCausalLM`` (eager attention, float32) holding ``base``'s converted weights."""
    import transformers

    c = base.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
        tie_word_embeddings=c.tie_embeddings, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config)
    hf.load_state_dict(lit_to_hf_state_dict(base.state_dict()))
    return hf


def peft_param_name(lit_layer: str, tensor: str) -> str:
    """PEFT's parameter name of our layer ``lit_layer``'s tensor ``tensor`` (``lora_A``, ``lora_B``,
    ``lora_magnitude_vector``) under the adapter ``default``."""
    from lit_adapter.convert import lit_to_hf_name

    hf_layer = lit_to_hf_name(lit_layer + ".weight")[: -len(".weight")]
    return f"base_model.model.{hf_layer}.{tensor}.default.weight"
