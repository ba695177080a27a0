"""Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) on the one loop.

For a prompt ``x`` with a preferred response ``y_w`` (chosen) and a dispreferred one ``y_l`` (rejected), the policy
``pi`` and a frozen reference ``pi_ref`` give the implicit rewards ``r = beta * (log pi(y|x) - log pi_ref(y|x))``
(log-probabilities summed over the response's tokens, the prompt masked) and the margin
``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``. The losses (``--dpo.loss_type``):

* ``sigmoid`` (DPO): ``-log sigmoid(beta h)``; with ``label_smoothing`` eps the conservative DPO of the original
  implementation (Mitchell 2023): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, i.e. each label
  flipped with probability eps;
* ``robust`` (rDPO, Chowdhury et al. 2024): ``(-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)``,
  an unbiased loss under labels flipped with probability eps (TRL's ``robust``);
* ``ipo`` (Azar et al. 2023, Eq. 17): ``(h' - 1 / (2 beta))^2``, ``h'`` the margin of the log-ratios averaged per
  response token (TRL's length normalisation, which the IPO authors confirmed).

The reference is the model itself with the method switched off (:meth:`Method.switched_off`), so no second copy of
the weights exists: LoRA, QLoRA, IA³, BitFit, LLaMA-Adapter and the bottleneck adapters add tensors to a frozen base,
which switched off *is* the reference. What a method trains in place (Adapter v2's RMSNorm weights, full
fine-tuning's every weight) is kept as a frozen copy of just those tensors and swapped in for the reference pass;
for full fine-tuning that copy is the whole model, which cannot be helped. ``--dpo.reference_dir`` loads a separate
reference checkpoint instead (e.g. the SFT model DPO starts from). The reference pass runs first, without a graph.

Logged (``train_*`` per logging step, ``val_*`` per validation): the reward accuracy (share of pairs with
``r_w > r_l``), the mean chosen and rejected rewards, their margin and the policy's log-probabilities. The loss
and its gradients equal TRL's ``DPOTrainer`` loss code on the same batch (tests/test_dpo.py).
"""

from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_adapter.errors import UserError
from lit_adapter.train.losses import next_token_targets
from lit_adapter.train.objectives import MetricSums, Objective, phase

LOSS_TYPES = ("sigmoid", "robust", "ipo")


@dataclass
class DPOArgs:
    """The preference loss."""

    beta: float = 0.1
    """Strength of the pull towards the reference (the KL penalty's weight; IPO's tau)."""
    loss_type: Literal["sigmoid", "robust", "ipo"] = "sigmoid"
    """sigmoid (DPO), robust (rDPO, for noisy labels) or ipo (IPO, length-normalised)."""
    label_smoothing: float = 0.0
    """The probability that a preference label is flipped: conservative DPO with sigmoid, rDPO with robust (< 0.5);
    0 for ipo."""
    reference_dir: Optional[Path] = None
    """A separate reference checkpoint folder; default: the base with the method switched off (no second copy)."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise UserError(f"dpo.beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"dpo.loss_type {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        eps = self.label_smoothing
        if not 0 <= eps <= 0.5 or (self.loss_type == "robust" and eps == 0.5):  # rDPO divides by 1 - 2 eps
            raise UserError(f"dpo.label_smoothing must lie in [0, 0.5{')' if self.loss_type == 'robust' else ']'} "
                            f"for {self.loss_type}, got {eps}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise UserError("dpo.label_smoothing has no meaning for the ipo loss; leave it at 0")


# ----------------------------------------------------------------------------------------------------------------------
# the loss


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` summed log-probabilities of each row's unmasked label tokens, and ``(N,)`` how many there are.

    ``logits`` ``(N, T, V)``, ``labels`` ``(N, T)`` unshifted with ``-100`` on the prompt and padding: position t
    scores token t + 1, as in the next-token loss.
    """
    targets, _ = next_token_targets(labels)  # (N, T)
    N, T, V = logits.shape
    rows = logits.reshape(N * T, V).to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
    token_logps = -F.cross_entropy(rows, targets.reshape(-1), ignore_index=-100, reduction="none").view(N, T)
    return token_logps.sum(-1), (targets != -100).sum(-1)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, args: DPOArgs, chosen_tokens: Optional[torch.Tensor] = None,
                    rejected_tokens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``(B,)`` and the (detached) chosen and rejected rewards ``(B,)`` from summed log-probs.

    ``chosen_tokens`` / ``rejected_tokens`` (response lengths) are needed by ``ipo`` only.
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected  # (B,)
    beta, eps = args.beta, args.label_smoothing
    if args.loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the response lengths")
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        margin = chosen_ratio - rejected_ratio
        clean, flipped = -F.logsigmoid(beta * margin), -F.logsigmoid(-beta * margin)
        if args.loss_type == "sigmoid":
            losses = (1 - eps) * clean + eps * flipped
        else:  # robust
            losses = ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ----------------------------------------------------------------------------------------------------------------------
# the reference policy


class ReferencePolicy:
    """The frozen reference: the policy model with its method switched off (and in-place-trained tensors swapped for
    their frozen copies), or a separate model loaded from a checkpoint."""

    def __init__(self, model, spec, separate=None) -> None:
        from lit_adapter.tuners import registry as methods

        self.spec, self.separate = spec, separate
        self.in_place: List[torch.nn.Parameter] = []
        self.copies: List[torch.Tensor] = []
        if separate is None:
            trains, added, seen = methods.trainable_filter(spec), methods.is_added(spec), set()
            named = list(methods.unwrap(model).named_parameters())
            for name, param in named:
                if trains(name, param) and not added(name) and id(param) not in seen:
                    seen.add(id(param))  # a tied head and embedding are one tensor: one copy
                    self.in_place.append(param)
                    self.copies.append(param.detach().clone())
            # every added tensor that trains must sit in a module that switches off, or the "reference" would
            # silently be the policy (a tensor outside the method's TunerLayers, which alone switch off)
            with spec.definition.switched_off(methods.unwrap(model)) as switched:
                owners = {id(p) for module in switched for p in module.parameters()}
            stuck = [name for name, p in named if trains(name, p) and added(name) and id(p) not in owners]
            if stuck:
                raise UserError(f"{spec.method} cannot be switched off for DPO's reference ({stuck[0]} is in no module "
                                "that switches off); pass --dpo.reference_dir with a reference checkpoint")

    @contextlib.contextmanager
    def active(self, model):
        """Inside (and without a graph), ``model`` computes the reference policy."""
        from lit_adapter.tuners.registry import unwrap

        trained = [p.data for p in self.in_place]
        try:
            with torch.no_grad(), self.spec.definition.switched_off(unwrap(model)):
                for param, copy in zip(self.in_place, self.copies):
                    param.data = copy
                yield
        finally:
            for param, data in zip(self.in_place, trained):
                param.data = data

    def logits(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        if self.separate is not None:
            with torch.no_grad():
                return self.separate(input_ids)
        with self.active(model):
            return model(input_ids)

    def tensors(self) -> List[torch.Tensor]:
        """What the reference holds beyond the policy model: the frozen copies (or the separate model's weights)."""
        if self.separate is not None:
            return list(self.separate.parameters())
        return list(self.copies)


# ----------------------------------------------------------------------------------------------------------------------
# the objective


class DPOObjective(Objective):
    """Pairs ``{input_ids, labels, rejected_input_ids, rejected_labels}`` batched as ``(2B, T)``, chosen rows first."""

    name = "dpo"

    def __init__(self, train: List[Dict[str, Any]], val: List[Dict[str, Any]], metadata: Dict[str, Any],
                 args: DPOArgs, checkpoint_dir: Optional[Path] = None) -> None:
        self.train, self.val, self.metadata, self.args = train, val, metadata, args
        self.checkpoint_dir = checkpoint_dir
        self.reference: Optional[ReferencePolicy] = None
        self.sums = MetricSums()

    def load_examples(self, data_dir):
        return self.train, self.val, self.metadata

    def truncate(self, examples, max_len: int):
        cut, kept = 0, []
        for e in examples:
            cut += len(e["input_ids"]) > max_len or len(e["rejected_input_ids"]) > max_len
            e = {k: v[:max_len] for k, v in e.items()}
            if (e["labels"] != -100).sum() > 1 and (e["rejected_labels"] != -100).sum() > 1:
                kept.append(e)  # a pair whose response was cut away entirely teaches nothing
        if len(kept) < len(examples):
            print(f"dropped {len(examples) - len(kept)} pairs whose prompt fills the {max_len}-token context",
                  file=sys.stderr)
        return kept, cut

    packing_refusal = ("it scores each chosen row against its rejected row of a padded (2B, T) batch "
                       "and the reference pass runs on the same rows")

    def count(self, batch) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0] // 2)  # one item per pair

    def collate(self, batch, pad_id: int):
        rows = [(e["input_ids"], e["labels"]) for e in batch] + [(e["rejected_input_ids"], e["rejected_labels"])
                                                                   for e in batch]
        longest = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (2B, T)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)  # (2B, T)
        for row, (ids, target) in enumerate(rows):
            input_ids[row, : len(ids)], labels[row, : len(target)] = ids, target
        return {"input_ids": input_ids, "labels": labels}

    def attach(self, model, spec, loss: str) -> None:
        if loss != "cross_entropy":
            raise UserError(f"train.loss={loss} chooses how the next-token loss is computed; DPO computes sequence "
                            "log-probabilities its own way: leave train.loss at cross_entropy")
        if spec.head is not None:
            raise UserError("DPO trains the language-model head's log-probabilities; a classification head has none")
        separate = None
        if self.args.reference_dir is None and not spec.definition.can_switch_off:
            raise UserError(f"{spec.method} cannot be switched off in place to give DPO's reference policy (its "
                            "virtual tokens move every position); pass --dpo.reference_dir with the base checkpoint")
        if self.args.reference_dir is not None:
            from lit_adapter.tuners.registry import load_finetuned

            weight = next(p for p in model.parameters() if p.is_floating_point())
            _, separate, _ = load_finetuned(Path(self.args.reference_dir), None, weight.device, weight.dtype)
            separate.requires_grad_(False)
        self.reference = ReferencePolicy(model, spec, separate)
        if self.reference.in_place:
            count = sum(t.numel() for t in self.reference.copies)
            print(f"DPO reference: {spec.method} trains {count:,} base values in place; a frozen copy of them is "
                  "swapped in for the reference pass", file=sys.stderr)

    def forward_loss(self, model, batch, loss: str = "cross_entropy",
                     autocast: Callable = contextlib.nullcontext) -> Tuple[torch.Tensor, int]:
        if self.reference is None:
            raise RuntimeError("DPOObjective.attach(model, spec, loss) must run before the first batch")
        input_ids, labels = batch["input_ids"], batch["labels"]  # (2B, T)
        B = input_ids.shape[0] // 2
        ref_logps, _ = sequence_logps(self.reference.logits(model, input_ids), labels)  # (2B,), first: no graph
        logps, tokens = sequence_logps(model(input_ids), labels)  # (2B,)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], self.args, tokens[:B], tokens[B:])
        self.sums.add(phase(model), pairs=torch.tensor(float(B)), correct=(chosen_rewards > rejected_rewards).sum(),
                      chosen=chosen_rewards.sum(), rejected=rejected_rewards.sum(),
                      logps_chosen=logps[:B].detach().sum(), logps_rejected=logps[B:].detach().sum())
        return losses.mean(), B

    def metrics(self, fabric, phase: str) -> Dict[str, float]:
        sums = self.sums.pop(phase, fabric)
        if "pairs" not in sums:
            return {}
        n = float(sums["pairs"])
        return {"reward_accuracy": float(sums["correct"]) / n, "rewards_chosen": float(sums["chosen"]) / n,
                "rewards_rejected": float(sums["rejected"]) / n,
                "reward_margin": float(sums["chosen"] - sums["rejected"]) / n,
                "logps_chosen": float(sums["logps_chosen"]) / n, "logps_rejected": float(sums["logps_rejected"]) / n}

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "beta": self.args.beta, "loss_type": self.args.loss_type,
                "label_smoothing": self.args.label_smoothing,
                "reference": str(self.args.reference_dir) if self.args.reference_dir else "base, method switched off"}


# ----------------------------------------------------------------------------------------------------------------------
# preference data


def dolly_preferences(dolly_dir: Path, n: int, seed: int = 0) -> List[Dict[str, str]]:
    """A pipeline-check preference set from Dolly-15k: the prompt is the record's Alpaca prompt, chosen its own
    response, rejected the response of a (seeded) record of another category. Not human preferences."""
    import json

    from lit_adapter.data.prompts import generate_prompt

    records = []
    for path in sorted(Path(dolly_dir).glob("*.json")):
        records += json.loads(path.read_text(encoding="utf-8"))
    if not records:
        raise UserError(f"no Dolly records (*.json) in {dolly_dir}")
    if not 1 <= n <= len(records):
        raise UserError(f"--n {n}: {dolly_dir} holds {len(records)} records; choose 1 to {len(records)}")
    categories = {record.get("category") for record in records}
    if len(categories) < 2:  # each rejected response comes from another category: there would be none to draw
        raise UserError(f"every record in {dolly_dir} has the category {categories.pop()!r}; a rejected response "
                        "is drawn from another category, so at least two are needed")
    rng = random.Random(seed)
    picked = rng.sample(records, n)
    out = []
    for record in picked:
        other = rng.choice(records)
        while other["category"] == record["category"]:
            other = rng.choice(records)
        out.append({"prompt": generate_prompt(record), "chosen": record["response"], "rejected": other["response"]})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the entry point


def finetune_dpo(spec, *, checkpoint_dir: Optional[Path], model_name: Optional[str], out_dir: Path, data,
                 dpo: DPOArgs, train, eval, fabric_args, logger, resume: bool = False, dry_run: bool = False,
                 overwrite: bool = False, model=None):
    """Trains ``spec`` with the DPO objective on the pairs of ``data`` (a ``PreferenceData``) with the one loop."""
    from lit_adapter.data.preferences import load_pairs, tokenize_pair
    from lit_adapter.data.tokenizer import Tokenizer
    from lit_adapter.train.run import DataArgs, finetune

    common = dict(checkpoint_dir=checkpoint_dir, model_name=model_name, out_dir=out_dir, train=train, eval=eval,
                  fabric_args=fabric_args, logger=logger, resume=resume, overwrite=overwrite, model=model)
    if dry_run or checkpoint_dir is None:
        return finetune(spec, data=DataArgs(max_seq_length=data.max_seq_length), dry_run=dry_run, **common)
    train_pairs, val_pairs, source = load_pairs(data)
    tokenizer = Tokenizer.from_checkpoint_dir(checkpoint_dir)
    tokenized = [[tokenize_pair(tokenizer, r, data.template) for r in part] for part in (train_pairs, val_pairs)]
    print(f"{source}: {len(train_pairs)} training and {len(val_pairs)} validation pairs", file=sys.stderr)
    metadata = {"source": source, "tokenizer": {"vocab_size": tokenizer.vocab_size}}
    for part in tokenized:  # the loop checks input_ids against the vocabulary; the rejected rows too, here
        largest = max((int(e["rejected_input_ids"].max()) for e in part), default=-1)
        if largest >= tokenizer.vocab_size:
            raise UserError(f"{source}: token id {largest} outside the tokenizer's {tokenizer.vocab_size}")
    if dpo.reference_dir is not None:
        check_reference_tokenizer(tokenizer, Path(dpo.reference_dir), train_pairs, data.template)
    objective = DPOObjective(tokenized[0], tokenized[1], metadata, dpo, Path(checkpoint_dir))
    return finetune(spec, data=DataArgs(data_dir=Path(source), max_seq_length=data.max_seq_length),
                    objective=objective, **common)


def check_reference_tokenizer(tokenizer, reference_dir: Path, pairs: List[Dict[str, str]], template: str) -> None:
    """The reference scores the same token ids as the same text: its tokenizer encodes the training pairs as the
    policy's does (a vocabulary of the same size can still map ids to other pieces)."""
    from lit_adapter.data.preferences import tokenize_pair
    from lit_adapter.data.tokenizer import Tokenizer, has_tokenizer

    if not has_tokenizer(reference_dir):
        return  # a bare weights folder: its loader names what it lacks
    reference = Tokenizer(reference_dir)
    for index, record in enumerate(pairs[:64]):
        ours, theirs = tokenize_pair(tokenizer, record, template), tokenize_pair(reference, record, template)
        if reference.vocab_size != tokenizer.vocab_size or any(not torch.equal(ours[k], theirs[k]) for k in ours):
            raise UserError(f"--dpo.reference_dir {reference_dir} has another tokenizer than --checkpoint_dir "
                            f"(training pair {index + 1} encodes differently): the reference would score other "
                            "text; pass a reference with the base's tokenizer")


def command(method: str):
    """The ``finetune/dpo.py <method>`` command: the method's options plus ``--data.*`` (pairs) and ``--dpo.*``."""
    from lit_adapter.cli.finetune import EntryPoint, make_finetune_command
    from lit_adapter.data.preferences import PreferenceData

    return make_finetune_command(method, EntryPoint(
        run=finetune_dpo, data=PreferenceData(), data_help="The preference pairs (prompt, chosen, rejected).",
        summary=("Direct Preference Optimization (Rafailov et al. 2023) of this method's tensors on prompt/chosen/"
                 "rejected pairs, the reference being the base with the method switched off (or --dpo.reference_dir)."),
        extra=[("dpo", DPOArgs(), "The preference loss (beta, sigmoid/robust/ipo, label smoothing, reference).")],
        out_prefix="out/dpo"))
