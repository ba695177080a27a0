"""final/ and best/ folders written before a method's modules moved into the model's hook slots still load: the
method renames their tensors (``Method.current_name``), and a name it does not know is still one error line."""

import re

import pytest
import torch

from lit_adapter.errors import UserError
from lit_adapter.model.config import Config
from lit_adapter.tuners import registry as methods

OLD_NAMES = {
    # LLaMA-Adapter's prompts and gates sat on the attention itself
    "adapter": lambda n: n.replace(".attn.adapter.", ".attn."),
    "adapter_v2": lambda n: n.replace(".attn.adapter.", ".attn."),
    # bottleneck adapters sat in forward hooks, as ``bottleneck`` children of the sublayer or block
    "houlsby": lambda n: re.sub(r"\.(attn|mlp)_adapter\.", r".\1.bottleneck.", n),
    "pfeiffer": lambda n: n.replace(".out_adapter.", ".bottleneck."),
}


def _trained(method: str, seed: int):
    spec = methods.MethodSpec(method)
    if hasattr(spec.settings, "start_layer"):
        spec.settings.start_layer = 1  # the tiny model has 2 layers
    torch.manual_seed(seed)
    model = methods.build_model(spec, Config.from_name("tiny"))
    methods.mark_trainable(model, spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return spec, model, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", sorted(OLD_NAMES))
def test_tensors_saved_under_the_old_names_load(method):
    spec, _, tensors = _trained(method, seed=1)
    old = {OLD_NAMES[method](n): t for n, t in tensors.items()}
    assert set(old) != set(tensors)  # the renaming is real
    _, fresh, _ = _trained(method, seed=2)
    methods.load_trained_tensors(fresh, old, spec, "an older final/")
    loaded = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)


def test_an_unknown_name_is_still_one_line():
    spec, model, tensors = _trained("adapter", seed=1)
    tensors["transformer.h.1.attn.something_else"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"1 unexpected keys: transformer.h.1.attn.something_else"):
        methods.load_trained_tensors(model, tensors, spec, "final")
