"""DPO against TRL as the oracle: TRL 1.16's ``DPOTrainer._compute_loss`` (its fused-head log-probabilities, its
losses, PEFT's adapter switched off as the reference) on the same batch gives our loss and gradients to 1e-6 in
float64, and our own model with the method switched off reproduces it in float32. Also: every method switched off is
the base model, the reference shares the policy's storage, bad records are one line, and a real run on stories260K
logs the reward metrics.

The preference data is built from Dolly (chosen: the record's own response; rejected: a response from another
category): a pipeline check, not a preference result."""

import json
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from lit_adapter.tuners import registry as methods
from lit_adapter.model.config import Config
from lit_adapter.convert import lit_to_hf_name, lit_to_hf_state_dict
from lit_adapter.train.dpo import DPOArgs, DPOObjective, dolly_preferences, finetune_dpo, preference_loss, sequence_logps
from lit_adapter.errors import UserError
from lit_adapter.tuners.registry import METHODS, MethodSpec
from lit_adapter.model.gpt import GPT
from lit_adapter.data.preferences import PreferenceData, load_pairs, tokenize_pair
from lit_adapter.data.tokenizer import Tokenizer
from lit_adapter.train.run import EvalArgs, FabricArgs, LoggerArgs, TrainArgs
from lit_adapter.tuners.lora import LoRAConfig, LoRALinear
from lit_adapter.tuners.wrapping import wrapped_layers

LOSSES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("ipo", 0.0)]


def _hf_lora(base: GPT, r=4, alpha=8, dtype=torch.float32):
    """HF LlamaForCausalLM on ``base``'s weights, TRL's fused head added, wrapped in a PEFT LoRA on q and v."""
    import peft
    import transformers
    from trl.trainer.utils import add_fused_lm_head

    c = base.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
        tie_word_embeddings=c.tie_embeddings, attn_implementation="eager"))
    hf.load_state_dict(lit_to_hf_state_dict(base.state_dict()))
    hf = hf.to(dtype)
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as DPOTrainer does
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    return peft.get_peft_model(hf, config)


class _Float64LogProbs(torch.nn.Module):
    """An HF causal LM answering TRL's ``fused_lm_head=True`` call with TRL's own ``selective_log_softmax`` and
    ``entropy_from_logits`` on its float64 logits (TRL's fused head computes in float32, which would cap the check at
    float32 rounding); with ``switched_off`` it runs with PEFT's adapter disabled (TRL's ``ref_model``)."""

    is_gradient_checkpointing = False

    def __init__(self, peft_model, switched_off: bool = False) -> None:
        super().__init__()
        self.peft_model, self.switched_off = peft_model, switched_off

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=True, use_cache=False):
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        with self.peft_model.disable_adapter() if self.switched_off else nullcontext():
            logits = self.peft_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        return SimpleNamespace(
            log_probs=selective_log_softmax(logits, targets.clamp(min=0)).masked_fill(~mask, 0),
            entropy=entropy_from_logits(logits), mean_logits=logits.mean(-1),
            is_top1=logits.argmax(-1) == targets)


def _trl_loss(model, input_ids, labels, args: DPOArgs, swap=False, ref_model=None):
    """TRL's DPO loss code itself (``DPOTrainer._compute_loss``), driven with the trainer state it reads.

    ``model`` is a PEFT model (TRL then disables its adapter for the reference) or, with ``ref_model``, any model.
    """
    from trl import DPOTrainer

    if swap:  # the same pairs with chosen and rejected exchanged
        B = input_ids.shape[0] // 2
        input_ids, labels = torch.cat([input_ids[B:], input_ids[:B]]), torch.cat([labels[B:], labels[:B]])
    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=model, ref_model=ref_model, precompute_ref_logps=False, aux_loss_enabled=False, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=[args.loss_type], loss_weights=[1.0], beta=args.beta,
        label_smoothing=args.label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list),
                                                                              "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=SimpleNamespace(device=input_ids.device, gather=identity, gather_for_metrics=identity,
                                    unwrap_model=identity, autocast=nullcontext),
    )
    inputs = {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(),
              "completion_mask": (labels != -100).long()}
    return DPOTrainer._compute_loss(trainer, model, inputs, False), trainer._metrics["train"]


def _batch(vocab, B=3, T=14, seed=0):
    """``(2B, T)`` token ids and labels: chosen rows first, prompts of different lengths masked, right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2 * B, T), generator=g)
    labels = ids.clone()
    for row in range(2 * B):
        prompt, length = 3 + row % 3, T - (row * 2) % 5
        labels[row, :prompt] = -100
        ids[row, length:], labels[row, length:] = 0, -100
    return ids, labels


def _our_loss(policy_logits, ref_logits, labels, args):
    B = labels.shape[0] // 2
    logps, tokens = sequence_logps(policy_logits, labels)
    ref, _ = sequence_logps(ref_logits, labels)
    losses, chosen, rejected = preference_loss(logps[:B], logps[B:], ref[:B], ref[B:], args, tokens[:B], tokens[B:])
    return losses.mean(), chosen, rejected


def _lora_grads(peft_model):
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("loss_type, eps", LOSSES)
def test_loss_and_gradients_equal_trl_in_float64(loss_type, eps):
    torch.manual_seed(0)
    base = GPT(Config.from_name("tiny"))
    base.init_weights()
    model = _hf_lora(base, dtype=torch.float64).train()
    ids, labels = _batch(base.config.vocab_size)
    args = DPOArgs(beta=0.5, loss_type=loss_type, label_smoothing=eps)
    trl = lambda a, swap=False: _trl_loss(_Float64LogProbs(model), ids, labels, a, swap,  # noqa: E731
                                          ref_model=_Float64LogProbs(model, switched_off=True))
    if loss_type == "sigmoid" and eps:  # conservative DPO = (1 - eps) TRL-DPO + eps TRL-DPO on the swapped pairs
        clean, _ = trl(DPOArgs(beta=0.5))
        flipped, _ = trl(DPOArgs(beta=0.5), swap=True)
        theirs, metrics = (1 - eps) * clean + eps * flipped, None
    else:
        theirs, metrics = trl(args)
    theirs.backward()
    trl_grads = _lora_grads(model)
    model.zero_grad()

    mask = (ids != 0).long()
    with model.disable_adapter(), torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
    ours, chosen, rejected = _our_loss(model(input_ids=ids, attention_mask=mask).logits, ref_logits, labels, args)
    ours.backward()
    assert ours.dtype == theirs.dtype == torch.float64
    assert abs(ours.item() - theirs.item()) < 1e-6 * max(1.0, abs(theirs.item()))
    assert theirs.item() > 0.01
    for name, grad in _lora_grads(model).items():
        assert (grad - trl_grads[name]).abs().max() < 1e-6 * max(1.0, trl_grads[name].abs().max().item()), name
    if metrics is not None:  # the rewards we log are TRL's
        assert chosen.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-9)
        assert (chosen > rejected).double().mean().item() == pytest.approx(metrics["rewards/accuracies"][0], abs=1e-6)  # TRL: .float()
        assert (chosen - rejected).mean().item() == pytest.approx(metrics["rewards/margins"][0], abs=1e-9)


def _lit_lora(base: GPT, peft_model) -> GPT:
    model = methods.build_model(MethodSpec("lora", LoRAConfig(r=4, alpha=8, dropout=0.0)), base.config)
    model.load_state_dict({**base.state_dict()}, strict=False)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in wrapped_layers(model, LoRALinear).items():
            hf_layer = lit_to_hf_name(name + ".weight")[: -len(".weight")]
            layer.lora_A.copy_(params[f"base_model.model.{hf_layer}.lora_A.default.weight"])
            layer.lora_B.copy_(params[f"base_model.model.{hf_layer}.lora_B.default.weight"])
    methods.mark_trainable(model, MethodSpec("lora"))
    return model


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("ipo", 0.0)])
def test_our_model_with_lora_switched_off_gives_trls_loss(loss_type, eps):
    torch.manual_seed(1)
    base = GPT(Config.from_name("tiny-gqa"))
    base.init_weights()
    peft_model = _hf_lora(base).train()
    ids, labels = _batch(base.config.vocab_size, seed=1)
    args = DPOArgs(beta=0.3, loss_type=loss_type, label_smoothing=eps)
    theirs, _ = _trl_loss(peft_model, ids, labels, args)
    theirs.backward()

    model = _lit_lora(base, peft_model).train()
    objective = DPOObjective([], [], {}, args)
    objective.attach(model, MethodSpec("lora"), "cross_entropy")
    ours, pairs = objective.forward_loss(model, {"input_ids": ids, "labels": labels})
    ours.backward()
    assert pairs == 3 and abs(ours.item() - theirs.item()) < 1e-5 * max(1.0, abs(theirs.item()))
    params = dict(peft_model.named_parameters())
    for name, layer in wrapped_layers(model, LoRALinear).items():
        hf_layer = lit_to_hf_name(name + ".weight")[: -len(".weight")]
        for matrix in ("lora_A", "lora_B"):
            theirs_grad = params[f"base_model.model.{hf_layer}.{matrix}.default.weight"].grad
            ours_grad = getattr(layer, matrix).grad
            assert (ours_grad - theirs_grad).abs().max() < 1e-4 * theirs_grad.abs().max(), (name, matrix)
    metrics = objective.metrics(None, "train")
    assert set(metrics) >= {"reward_accuracy", "rewards_chosen", "rewards_rejected", "reward_margin"}


def _perturb(model: torch.nn.Module, spec: MethodSpec) -> None:
    """Moves every trained tensor away from its initial value, so a switched-off method is visible if it leaks."""
    keep = methods.trainable_filter(spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if keep(name, param) and param.is_floating_point():
                param.add_(0.05 * torch.randn_like(param))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_switched_off_is_the_base(method, stories260k):
    spec = MethodSpec(method)
    config = Config.from_checkpoint_dir(stories260k)
    model = methods.prepare_model(spec, config, stories260k, torch.device("cpu"), torch.float32).eval()  # no dropout
    base = methods.prepare_model(MethodSpec("full"), config, stories260k, torch.device("cpu"), torch.float32)
    objective = DPOObjective([], [], {}, DPOArgs())
    if not spec.definition.can_switch_off:  # the prompt methods: refused in one line, a reference_dir is needed
        with pytest.raises(UserError, match="reference_dir"):
            objective.attach(model, spec, "cross_entropy")
        return
    objective.attach(model, spec, "cross_entropy")
    _perturb(model, spec)
    idx = torch.tensor([[1, 70, 80, 90, 100, 110]])
    with torch.no_grad():
        assert (model(idx) - base(idx)).abs().max() > 1e-4  # the method changes the function ...
        reference = objective.reference.logits(model, idx)
        assert (reference - base(idx)).abs().max() < 1e-5  # ... and switched off it is the base again
        trained = model(idx)
    assert (trained - model(idx)).abs().max() == 0  # leaving the reference pass restores the method exactly
    copies = sum(t.numel() for t in objective.reference.tensors())
    in_place = {n for n, p in model.named_parameters() if methods.trainable_filter(spec)(n, p)
                and not methods.is_added(spec)(n)}
    # no duplicated weights: only tensors the method trains in place are copied (Adapter v2's norms; all for full)
    assert copies == sum(p.numel() for n, p in model.named_parameters() if n in in_place)
    assert (copies == 0) == (method not in ("adapter_v2", "full"))


def test_the_reference_shares_the_policys_storage(stories260k):
    spec = MethodSpec("lora", quantize="bnb.nf4")
    model = methods.prepare_model(spec, Config.from_checkpoint_dir(stories260k), stories260k, torch.device("cpu"),
                                  torch.float32)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    objective = DPOObjective([], [], {}, DPOArgs())
    objective.attach(model, spec, "cross_entropy")
    assert objective.reference.tensors() == [] and objective.reference.separate is None
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.update(
        p.untyped_storage().data_ptr() for p in mod.parameters(recurse=False))) for m in model.modules()]
    objective.reference.logits(model, torch.tensor([[1, 20, 30]]))
    for hook in hooks:
        hook.remove()
    assert seen and seen <= storages  # every tensor the reference pass touched is the policy's own


def test_a_separate_reference_checkpoint(stories260k):
    spec = MethodSpec("full")
    model = methods.prepare_model(spec, Config.from_checkpoint_dir(stories260k), stories260k, torch.device("cpu"),
                                  torch.float32)
    objective = DPOObjective([], [], {}, DPOArgs(reference_dir=stories260k))
    objective.attach(model, spec, "cross_entropy")
    _perturb(model, spec)
    idx = torch.tensor([[1, 5, 60, 70]])
    with torch.no_grad():
        base = methods.load_finetuned(stories260k, None, torch.device("cpu"), torch.float32)[1]
        assert torch.equal(objective.reference.logits(model, idx), base(idx))


def test_bad_preference_records_are_one_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(UserError, match=r"prefs.jsonl, line 2: the preference record has no 'rejected'"):
        load_pairs(PreferenceData(source=str(path), val_size=1))
    path.write_text(json.dumps({"prompt": "a", "chosen": [{"role": "user"}], "rejected": "c"}) + "\n")
    with pytest.raises(UserError, match="line 1: chosen must be text"):
        load_pairs(PreferenceData(source=str(path), val_size=1))
    with pytest.raises(UserError, match="label_smoothing"):
        DPOArgs(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(UserError, match="ipo"):
        DPOArgs(loss_type="ipo", label_smoothing=0.1)


def test_preference_pairs_from_a_hub_dataset(monkeypatch):
    import datasets

    rows = {"prompt": [f"q{i}" for i in range(5)], "chosen": ["good"] * 5, "rejected": ["bad"] * 5}
    fake = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                 "test": datasets.Dataset.from_dict({k: v[:2] for k, v in rows.items()})})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args: fake)
    train, val, source = load_pairs(PreferenceData(source="someone/prefs"))
    assert (len(train), len(val), source) == (5, 2, "hub: someone/prefs")


def test_a_real_dpo_run_logs_the_rewards(stories260k, shared_data, tmp_path):
    pairs = dolly_preferences(shared_data / "dolly", 24, seed=0)
    path = tmp_path / "dolly_prefs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokenizer = Tokenizer.from_checkpoint_dir(stories260k)
    example = tokenize_pair(tokenizer, pairs[0], "plain")
    n_prompt = int((example["labels"] == -100).sum())
    assert torch.equal(example["input_ids"][:n_prompt], example["rejected_input_ids"][:n_prompt])
    assert example["input_ids"][-1] == tokenizer.eos_id
    result = finetune_dpo(
        MethodSpec("lora", LoRAConfig(r=4, alpha=8, dropout=0.0)), checkpoint_dir=stories260k, model_name=None,
        out_dir=tmp_path / "run", data=PreferenceData(source=str(path), val_size=8, max_seq_length=384),
        dpo=DPOArgs(beta=0.1), train=TrainArgs(global_batch_size=4, micro_batch_size=4, max_steps=3, warmup_steps=1,
                                               learning_rate=2e-2, seed=1),
        eval=EvalArgs(interval=3), fabric_args=FabricArgs(accelerator="cpu", precision="32-true"),
        logger=LoggerArgs())
    assert result.status == "completed"
    # before training the policy is the reference: every reward is 0, the loss log 2
    assert result.initial_val_loss == pytest.approx(0.693147, abs=1e-5)
    header, *rows = next((tmp_path / "run" / "logs").rglob("metrics.csv")).read_text().splitlines()
    for name in ("train_reward_accuracy", "train_reward_margin", "val_reward_accuracy", "val_rewards_chosen"):
        assert name in header.split(","), name
    hparams = json.loads((tmp_path / "run" / "hparams.json").read_text())
    assert hparams["objective"]["name"] == "dpo" and (tmp_path / "run" / "final" / "adapter.safetensors").is_file()


def test_the_command_names_the_line_of_a_bad_record(stories260k, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" for _ in range(3))
                    + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    proc = subprocess.run([sys.executable, str(repo / "finetune" / "dpo.py"), "lora", "--checkpoint_dir",
                           str(stories260k), "--data.source", str(path), "--out_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=repo, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {path}, line 4: the preference record has no 'rejected'"


def test_a_method_that_cannot_be_switched_off_is_refused(stories260k, monkeypatch):
    spec = MethodSpec("lora")
    model = methods.prepare_model(spec, Config.from_checkpoint_dir(stories260k), stories260k, torch.device("cpu"),
                                  torch.float32)
    monkeypatch.setattr(LoRALinear, "peft_enabled", None)  # as a method module that does not switch off
    with pytest.raises(UserError, match="cannot be switched off for DPO's reference"):
        DPOObjective([], [], {}, DPOArgs()).attach(model, spec, "cross_entropy")
