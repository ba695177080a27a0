"""The one training entry point behind every ``finetune/*.py`` script: its options, their checks, and a run's setup
(data, model, optimizer, schedule) around the :class:`~lit_adapter.train.trainer.Trainer`, whose ``fit`` is the loop.

What differs between methods (which parameters exist, which train, what is saved) lives in
:mod:`lit_adapter.tuners.registry`; everything here is shared, so a comparison between methods differs only in the method.

Units, so nothing is counted in the wrong one: a *step* is one optimizer step over ``global_batch_size``
examples; it is made of ``global_batch_size / (micro_batch_size * world_size)`` micro-batches per device.
Warmup, evaluation, logging and checkpoint intervals are all in steps. The data order is a pure function of
``(seed, step)``, which is what makes ``--resume`` exact.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Literal, Optional

import torch
from torch.utils.data import DataLoader

from lit_adapter.tuners import registry as methods
from lit_adapter.model.config import ModelArgs
from lit_adapter.data.instructions import UNKNOWN_CATEGORY, InstructionDataset, category_sample
from lit_adapter.data.order import CategoryWeightedSampler, StepBatchSampler, category_mix
from lit_adapter.data.packing import PackedStepBatchSampler, example_lengths, padding_share
from lit_adapter.errors import UserError
from lit_adapter.train.guards import LossNotFinite  # noqa: F401  (re-exported: callers catch training.LossNotFinite)
from lit_adapter.tracking.loggers import LoggerArgs, build_logger, close_logger, logger_supports_hparams, logger_summary
from lit_adapter.memory.estimate import print_memory_estimate
from lit_adapter.tuners.registry import MethodSpec
from lit_adapter.train.objectives import Objective, resolve as resolve_objective
from lit_adapter.train.preflight import check_fabric_args, check_parts_fit, claim_out_dir
from lit_adapter.train.resume_check import check_resume
from lit_adapter.tracking.results import RunResult, summarize, to_jsonable
from lit_adapter.generation.eval_prompts import answer_prompts, check_prompt_settings
from lit_adapter.tracking.run_record import RunRecord
from lit_adapter.runtime import compile_blocks, default_precision, weights_dtype
from lit_adapter.train.trainer import CHECKPOINT_NAME, RunPlan, Trainer, TrainState, method_optimizer, resume_state


@dataclass
class DataArgs:
    """Where the prepared instruction data are (``scripts/prepare_dolly.py`` writes them)."""

    data_dir: Path = Path("data/dolly")
    """Folder with train.pt, val.pt and metadata.json from scripts/prepare_dolly.py or prepare_alpaca.py."""
    max_seq_length: Optional[int] = None
    """Cut longer examples to this many tokens (counted and reported); default: the model's window (block_size).
    Longer than the window is refused: extend it with --model.rope_scaling."""
    packing: Optional[bool] = None
    """Padding-free packing: a micro-batch lays its examples end to end (no padding), each with its own positions
    and attention (lit_adapter.data.packing); a step trains on the same examples either way. Default: on for
    objectives that pack (instruction fine-tuning), off for those that do not (classification, DPO)."""
    category_weights: Optional[Dict[str, float]] = None
    """Sampling weight per task category of the training split, e.g. '{"creative_writing": 4, "open_qa": 0.5}':
    each example of a category is drawn with its weight (categories not named keep 1; 0 leaves one out), so a
    category's share is n_c*w_c / sum(n_k*w_k); epochs become draws with replacement. Default: the data's natural
    mix, every example once per epoch. hparams.json records the resulting mix (category_mix)."""


@dataclass
class TrainArgs:
    """Optimisation settings. Every interval and count here is in optimizer steps."""

    global_batch_size: int = 64
    """Examples per optimizer step, over all devices (gradient accumulation makes up the difference)."""
    micro_batch_size: int = 4
    """Examples per forward/backward pass on one device (on average, with data.packing: a step's examples are
    spread over its micro-batches by tokens)."""
    micro_batch_tokens: Optional[int] = None
    """With data.packing: the most tokens one micro-batch holds (default micro_batch_size x the context)."""
    epochs: int = 3
    """Passes over the training split (ignored when max_steps is set)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps instead of after ``epochs``."""
    learning_rate: float = 9e-3
    """Peak learning rate, reached after the warmup."""
    min_learning_rate: float = 0.0
    """Floor of the cosine decay."""
    warmup_steps: int = 100
    """Linear warmup length in optimizer steps (capped at the run's length)."""
    weight_decay: float = 0.02
    """AdamW's decoupled weight decay (applied to every trainable tensor)."""
    beta1: float = 0.9
    """AdamW's decay rate of the first moment (the gradient's running mean)."""
    beta2: float = 0.95
    """AdamW's decay rate of the second moment (the squared gradient's running mean)."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~30% more compute."""
    compile: bool = False
    """torch.compile each transformer block (runtime.compile_blocks): faster steps after a compilation counted in
    the first step's time (seconds with a warm inductor cache, up to about two minutes cold on a 2-core CPU;
    docs/throughput.md)."""
    seed: int = 1337
    """Seeds the initialisation of the method's tensors, dropout and the data order (a pure function of seed and
    step, so --resume continues exactly)."""
    log_interval: int = 1
    """Log training metrics every this many steps."""
    save_interval: Optional[int] = None
    """Write a resumable checkpoint every this many steps (and always at the end)."""
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (moments in uint8 for tensors of 4096+ values: a quarter of
    the state; worth it for full fine-tuning, negligible for adapters) and its paged variant (CUDA: state can
    spill to host memory under pressure; CPU falls back to unpaged)."""
    loss: Literal["cross_entropy", "chunked", "chunked_head"] = "cross_entropy"
    """How the cross-entropy is computed; same value and gradient, different memory (docs/memory.md).
    cross_entropy: over all (B, T, vocab) logits in float32, the backward reusing the saved log-probabilities;
    chunked: 256 positions at a time, no float32 copy of all logits; chunked_head: the head too runs 256
    positions at a time (recomputed in the backward), so the logits never exist whole: the least memory, one
    extra head matmul per step (not with fsdp)."""


@dataclass
class EvalArgs:
    """Validation settings."""

    interval: int = 100
    """Compute the validation loss every this many optimizer steps (and before and after training)."""
    max_batches: Optional[int] = None
    """Use at most this many validation micro-batches per evaluation (default: the whole split)."""
    initial: bool = True
    """Also evaluate the model before the first step (the frozen model, for adapters and LoRA)."""
    save_best: bool = True
    """Keep out_dir/best/ (same format as final/): the trained tensors at the lowest validation loss after step 0."""
    prompts: List[str] = field(default_factory=list)
    """Fixed instructions the final model answers at the end of a completed run (the instruction template, greedy,
    prompt_max_new_tokens tokens): written to out_dir/generations.jsonl and logged as a WandB table."""
    prompt_max_new_tokens: int = 64
    """Tokens generated at most per answer to eval.prompts."""
    prompts_per_category: int = 0
    """Also answer this many validation examples of each task category (the first ones of the seeded validation
    split: the same for every run on the same data), from their own prompt, beside their reference response in
    generations.jsonl and the WandB table."""


@dataclass
class FabricArgs:
    """Hardware and numerics, passed to Lightning Fabric."""

    accelerator: str = "auto"
    """cpu, cuda (or gpu), mps, or auto (a GPU when there is one)."""
    devices: int = 1
    """Devices (GPUs or CPU processes) to train on; the global batch is split across them."""
    strategy: Literal["auto", "ddp", "fsdp", "ddp_spawn"] = "auto"
    """How several devices share the work: ddp (replicas, gradients averaged), fsdp (FSDP2: weights, gradients and
    optimizer state sharded, each block its own unit; CPU or CUDA; docs/distributed.md), ddp_spawn."""
    num_nodes: int = 1
    """Machines the run spans (each with ``devices`` processes); launch it on every node (docs/distributed.md)."""
    precision: Optional[str] = None
    """32-true, bf16-true, bf16-mixed, 16-true, 16-mixed or 64-true (train.preflight.PRECISIONS); default: bf16-true on
    GPUs that support it, else 32-true."""


def validate_args(train: TrainArgs, eval: EvalArgs, fabric: FabricArgs) -> int:
    """Checks the hyper-parameters together; returns the gradient-accumulation factor."""
    if isinstance(fabric.devices, bool) or not isinstance(fabric.devices, int) or fabric.devices < 1:
        raise UserError(f"fabric.devices must be a whole number >= 1, got {fabric.devices!r}")
    for name in ("global_batch_size", "micro_batch_size", "log_interval"):
        if getattr(train, name) < 1:
            raise UserError(f"train.{name} must be >= 1, got {getattr(train, name)}")
    if train.epochs < 1 and train.max_steps is None:
        raise UserError(f"train.epochs must be >= 1, got {train.epochs}")
    if train.max_steps is not None and train.max_steps < 1:
        raise UserError(f"train.max_steps must be >= 1, got {train.max_steps}")
    if not train.learning_rate > 0 or not math.isfinite(train.learning_rate):
        raise UserError(f"train.learning_rate must be a positive number, got {train.learning_rate}")
    if train.min_learning_rate < 0 or train.min_learning_rate > train.learning_rate:
        raise UserError("train.min_learning_rate must lie between 0 and train.learning_rate")
    if train.warmup_steps < 0 or train.weight_decay < 0:
        raise UserError("train.warmup_steps and train.weight_decay must be >= 0")
    if not (0 <= train.beta1 < 1 and 0 <= train.beta2 < 1):
        raise UserError("train.beta1 and train.beta2 must lie in [0, 1)")
    if train.max_grad_norm is not None and train.max_grad_norm <= 0:
        raise UserError(f"train.max_grad_norm must be > 0 (or null), got {train.max_grad_norm}")
    if train.save_interval is not None and train.save_interval < 1:
        raise UserError(f"train.save_interval must be >= 1, got {train.save_interval}")
    if eval.interval < 1 or (eval.max_batches is not None and eval.max_batches < 1):
        raise UserError("eval.interval and eval.max_batches must be >= 1")
    check_prompt_settings(eval.prompts, eval.prompt_max_new_tokens, eval.prompts_per_category)
    if isinstance(fabric.num_nodes, bool) or not isinstance(fabric.num_nodes, int) or fabric.num_nodes < 1:
        raise UserError(f"fabric.num_nodes must be a whole number >= 1, got {fabric.num_nodes!r}")
    if train.loss == "chunked_head" and fabric.strategy == "fsdp":
        raise UserError("train.loss=chunked_head calls the head outside the model's forward, which FSDP does not "
                        "allow (the head's weights are sharded there); use train.loss=chunked with fsdp")
    per_step = train.micro_batch_size * fabric.devices * fabric.num_nodes
    if train.global_batch_size % per_step:
        nodes = f" x {fabric.num_nodes} nodes" if fabric.num_nodes > 1 else ""
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"micro_batch_size x devices{nodes} = {train.micro_batch_size} x {fabric.devices}{nodes}"
        )
    return train.global_batch_size // per_step


def lr_at(step: int, total_steps: int, train: TrainArgs) -> float:
    """Linear warmup over ``warmup_steps`` optimizer steps, then cosine decay to ``min_learning_rate``."""
    warmup = min(train.warmup_steps, total_steps)
    if step < warmup:
        return train.learning_rate * (step + 1) / warmup
    decay_steps = max(total_steps - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_learning_rate + (train.learning_rate - train.min_learning_rate) * cosine


def finetune(
    spec: MethodSpec,
    *,
    checkpoint_dir: Optional[Path],
    model_name: Optional[str],
    out_dir: Path,
    data: DataArgs,
    train: TrainArgs,
    eval: EvalArgs,
    fabric_args: FabricArgs,
    logger: LoggerArgs,
    resume: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    model: Optional[ModelArgs] = None,
    objective: Optional[Objective] = None,
) -> Optional[RunResult]:
    """Fine-tunes with ``spec`` and returns the run's summary (``None`` for a dry run).

    ``model.rope_scaling`` scales the base's RoPE for this run (its window becomes ``factor x`` the pretrained one);
    it is recorded in ``hparams.json`` and ``final/adapter_config.json``, from which evaluation and generation
    rebuild the same window. ``objective`` (:mod:`lit_adapter.train.objectives`) says what is optimised on which
    examples; the default is next-token cross-entropy on the prepared data in ``data.data_dir``.
    """
    from lit_adapter.train.fabric_setup import is_first_process, make_fabric  # imports Lightning: not for --help

    accum = validate_args(train, eval, fabric_args)
    if data.max_seq_length is not None and data.max_seq_length < 2:
        raise UserError(f"data.max_seq_length must be >= 2 (or null for the model's window), got {data.max_seq_length}")
    model = model or ModelArgs()
    config = model.apply(methods.resolve_config(checkpoint_dir, model_name))
    seq_len = context_length(data, config, spec)  # past the window: one line that names --model.rope_scaling
    spec.validate(config)
    packing = packs(data, spec, resolve_objective(objective))
    budget = micro_batch_tokens(train, seq_len)
    precision = fabric_args.precision or default_precision(fabric_args.accelerator)
    check_fabric_args(fabric_args.accelerator, fabric_args.devices, precision)
    if fabric_args.strategy == "fsdp" and fabric_args.devices * fabric_args.num_nodes > 1:
        spec.check_shardable()
    if dry_run:
        methods.dry_run(spec, config)
        print(f"context: {seq_len} tokens per sequence, of a window of {config.describe_window()}")
        print_memory_estimate(spec, config, seq_len, train, fabric_args.accelerator, precision,
                              budget if packing else None,
                              shards=fabric_args.devices * fabric_args.num_nodes
                              if fabric_args.strategy == "fsdp" else 1)
        print_padding_share(data, train, seq_len, packing, budget)
        return None
    if checkpoint_dir is None:
        raise UserError("--checkpoint_dir is required for training (only --dry_run works from --model_name alone)")

    out_dir = Path(out_dir)
    # Lightning's DDP launcher runs this script again for ranks 1..n-1 (LOCAL_RANK set), and every node of several
    # starts it: the first process of the run owns the folder, the others only join its run.
    launched_rank = 0 if is_first_process() else 1
    objective = resolve_objective(objective)
    hparams = dict(method=spec, checkpoint_dir=checkpoint_dir, model=model, rope_scaling=config.rope_scaling,
                   block_size=config.block_size, out_dir=out_dir, data=replace(data, packing=packing), train=train,
                   eval=eval, fabric=fabric_args, logger=logger, precision=precision, objective=objective.describe())
    if resume and launched_rank == 0 and not overwrite:  # with the other start-up checks, before the model
        check_resume(out_dir, hparams, spec.definition.settings_group)
    lock = claim_out_dir(out_dir, resume, overwrite) if launched_rank == 0 else None
    record = None
    try:
        fabric = make_fabric(fabric_args.accelerator, fabric_args.devices, fabric_args.strategy, precision,
                             loggers=[build_logger(logger, out_dir, resume)], num_nodes=fabric_args.num_nodes)
        fabric.launch()
        record = RunRecord(fabric.logger, logger, hparams).open()
        return _main(fabric, spec, config, checkpoint_dir, out_dir, data, train, eval, accum, precision, resume,
                     hparams=hparams, objective=objective, record=record, packing=packing and budget)
    except BaseException as err:  # failed or OOM cells are runs too, with their status (a no-op once ended)
        if record is not None:
            record.fail(err)
        raise
    finally:
        if lock is not None:
            lock.release()


def packs(data: DataArgs, spec: MethodSpec, objective: Objective) -> bool:
    """Whether this run packs (``data.packing``, default: whenever the objective and the method can); asked for
    where they cannot, one line naming which and why."""
    refusals = [(f"the {objective.name} objective", objective.packing_refusal),
                (f"the {spec.method} method", spec.definition.packing_refusal(spec.settings))]
    for who, why in refusals:
        if why is not None:
            if data.packing:
                raise UserError(f"--data.packing true: {who} does not pack ({why}); set --data.packing false")
            return False
    return data.packing is not False


def micro_batch_tokens(train: TrainArgs, seq_len: int) -> int:
    """The packed micro-batch's token budget: ``--train.micro_batch_tokens``, default micro_batch_size x context."""
    budget = train.micro_batch_tokens if train.micro_batch_tokens is not None else train.micro_batch_size * seq_len
    if budget < 1:
        raise UserError(f"train.micro_batch_tokens must be >= 1, got {budget}")
    return budget


def print_padding_share(data: DataArgs, train: TrainArgs, seq_len: int, packing: bool, budget: int) -> None:
    """``--dry_run``: how much of padded training's compute would be padding on the prepared data (when
    ``data.data_dir`` holds them), and so what packing saves; an estimate from the first epoch's order."""
    from lit_adapter.data.instructions import load_prepared

    try:
        examples = load_prepared(data.data_dir)[0]
        lengths = [min(n, seq_len) for n in example_lengths(examples)]
    except UserError:
        print(f"data: no prepared data at {data.data_dir}, so no padding share (estimated from the data)")
        return
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(train.seed)).tolist()
    share = padding_share([lengths[i] for i in order], train.micro_batch_size)
    print(f"data: {len(lengths)} training examples, {sum(lengths) / len(lengths):.0f} tokens on average; padded to "
          f"the longest of each micro-batch of {train.micro_batch_size}, {100 * share:.1f}% of the computed positions "
          f"would be padding (estimated, epoch 1's order)")
    if packing:
        print(f"packing (data.packing, up to {budget} tokens per micro-batch): computes only the real tokens, "
              f"saving an estimated {100 * share:.1f}% of the per-position compute (more of attention's)")
    else:
        print("packing is off: set --data.packing true to skip that padding")


def context_length(data: DataArgs, config, spec: Optional[MethodSpec] = None) -> int:
    """Tokens per training sequence: ``--data.max_seq_length``, by default the model's window less the positions the
    method puts before the real tokens (the prompt methods' virtual tokens); past that (the scaled window with RoPE
    scaling) it is a one-line error naming the fix, never a silent cap."""
    reserved = spec.definition.reserved_positions(spec.settings) if spec is not None else 0
    room = config.block_size - reserved
    if data.max_seq_length is not None and data.max_seq_length > room:
        what = "--data.max_seq_length" + (f" (plus {reserved} virtual tokens)" if reserved else "")
        raise UserError(config.window_error(data.max_seq_length + reserved, what))
    return data.max_seq_length or room


def _main(fabric, spec, config, checkpoint_dir, out_dir, data, train, eval, accum, precision, resume, hparams,
          record: RunRecord, objective: Optional[Objective] = None, packing: Optional[int] = None):
    """One run: the data, the model and its optimizer, a :class:`~lit_adapter.train.trainer.Trainer` and its loop, and the
    run's end (summary, answers to ``eval.prompts``, the logger)."""
    fabric.seed_everything(train.seed)
    objective = resolve_objective(objective)
    train_examples, val_examples, max_seq_length, metadata = _load_examples(fabric, spec, config, checkpoint_dir,
                                                                            data, train, objective)
    # chat data: generation and evaluation must prompt with the template the data were rendered with
    chat_template = metadata.get("chat_template") if isinstance(metadata, dict) else None
    if chat_template:
        hparams = {**hparams, "chat_template": chat_template}
    spec.attention = spec.attention.resolve(max_seq_length)  # e.g. the shifted pattern's group size
    model, optimizer, trainable, (n_trainable, n_total) = _build_model(fabric, spec, config, checkpoint_dir, train,
                                                                       precision, objective)
    steps_per_epoch = len(train_examples) // train.global_batch_size
    total_steps = train.max_steps if train.max_steps is not None else train.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total_steps, train) / train.learning_rate
    )
    checkpoint_path = out_dir / CHECKPOINT_NAME
    state = (resume_state(fabric, checkpoint_path, model, optimizer, scheduler, spec) if resume else TrainState())
    mix = category_mix([ex.get("category", UNKNOWN_CATEGORY) for ex in train_examples], data.category_weights or {})
    hparams = to_jsonable({**hparams, "trainable_params": n_trainable, "total_params": n_total,
                           "category_mix": mix})
    if fabric.global_rank == 0:
        (out_dir / "hparams.json").write_text(json.dumps(hparams, indent=2) + "\n")
    if logger_supports_hparams(fabric.logger):
        fabric.logger.log_hyperparams(hparams)
    record.track(state, spec.describe(), n_trainable, n_total, fabric.device)

    train_loader, val_loader = _loaders(fabric, train_examples, val_examples, train, accum, state.step, total_steps,
                                        objective, packing, data.category_weights)
    trainer = Trainer(fabric, model, optimizer, train_loader, scheduler=scheduler, accum=accum, objective=objective,
                      loss=train.loss, max_grad_norm=train.max_grad_norm, trainable=trainable, state=state)
    plan = RunPlan(total_steps=total_steps, steps_per_epoch=steps_per_epoch, val_loader=val_loader, spec=spec,
                   config=config, checkpoint_dir=checkpoint_dir, out_dir=out_dir, eval=eval,
                   log_interval=train.log_interval, save_interval=train.save_interval, resumed=resume,
                   adapter_record={"chat_template": chat_template} if chat_template else {},
                   categories=validation_categories(val_examples))
    status = trainer.fit(plan)

    result = summarize(fabric, spec, status, state, n_trainable, n_total, out_dir)
    samples = category_sample(val_examples, eval.prompts_per_category) if eval.prompts_per_category else []
    answers = (answer_prompts(fabric, model, checkpoint_dir, eval.prompts, eval.prompt_max_new_tokens,
                              state.step, out_dir, objective, samples, chat_template) if status == "completed" else [])
    record.finish(result, answers, out_dir)
    summary = logger_summary(fabric.logger)
    fabric.logger.finalize("success" if status == "completed" else "aborted")
    close_logger(fabric.logger)
    if summary and fabric.global_rank == 0:
        fabric.print(summary)
    if status == "interrupted":
        fabric.print(f"stopped at step {state.step}; resume with the same command and --resume true")
        raise SystemExit(130)
    return result


def _load_examples(fabric, spec, config, checkpoint_dir, data, train, objective):
    """The objective's training and validation examples, checked against the model and cut to the context;
    returns them, the context length and the data's metadata."""
    train_examples, val_examples, metadata = objective.load_examples(data.data_dir)
    check_parts_fit(config, checkpoint_dir, data.data_dir, metadata,
                    {"training": train_examples, "validation": val_examples},
                    needs_tokenizer=spec.definition.final_is_checkpoint)
    max_seq_length = context_length(data, config, spec)
    if config.rope_scaling:
        fabric.print(f"RoPE scaled: sequences of up to {max_seq_length} tokens, window {config.describe_window()}")
    train_examples, cut_train = objective.truncate(train_examples, max_seq_length)
    empty_train = getattr(objective, "emptied", 0)
    val_examples, cut_val = objective.truncate(val_examples, max_seq_length)
    empty_val = getattr(objective, "emptied", 0)
    prepared_for = metadata.get("max_seq_length")  # prepared (or packed) data say for how long; pairs and texts don't
    if (cut_train or cut_val) and data.max_seq_length is None and prepared_for:
        # never a silent cap: the data were prepared for longer sequences than this model's window holds
        raise UserError(f"{cut_train} training and {cut_val} validation examples of {data.data_dir} are longer than "
                        f"the model's {max_seq_length}-token window (the data were prepared for {prepared_for} "
                        "tokens); "
                        f"prepare them again with --max_seq_length {max_seq_length}, pass --data.max_seq_length "
                        f"{max_seq_length} to cut them here, or extend the window with --model.rope_scaling")
    if cut_train or cut_val:
        # the data were prepared for longer sequences: this cut is at the end, not the preparation's policy
        fabric.print(f"truncated {cut_train} training and {cut_val} validation examples to {max_seq_length} tokens "
                     f"(the data in {data.data_dir} were prepared for longer ones)")
        if empty_train or empty_val:
            fabric.print(f"warning: {empty_train} training and {empty_val} validation examples lost every target "
                         f"token to that cut; prepare the data with --max_seq_length {max_seq_length} instead, so "
                         "their context is shortened and their response kept")
    needed = train.global_batch_size
    if len(train_examples) < needed:
        raise UserError(
            f"the training split has {len(train_examples)} examples, fewer than one global batch of {needed}"
        )
    if not val_examples:
        raise UserError(f"the validation split in {data.data_dir} is empty")
    check_category_weights(data.category_weights, train_examples, data.data_dir)
    return train_examples, val_examples, max_seq_length, metadata


def check_category_weights(weights: Optional[Dict[str, float]], examples, data_dir) -> None:
    """One line for weights that name no category of the data, are negative, or leave nothing to sample."""
    if not weights:
        return
    present = sorted({ex.get("category", UNKNOWN_CATEGORY) for ex in examples})
    unknown = sorted(set(weights) - set(present))
    if unknown:
        raise UserError(f"data.category_weights names {', '.join(unknown)}, not a category of the training split "
                        f"in {data_dir} (its categories: {', '.join(present)})")
    bad = [name for name, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)]
    if bad:
        raise UserError(f"data.category_weights must be numbers >= 0; {', '.join(bad)} is not")
    if all(weights.get(name, 1.0) == 0 for name in present):
        raise UserError("data.category_weights gives every category weight 0: nothing would be trained on")


def validation_categories(examples) -> tuple:
    """The validation split's categories, most examples first: the per-category losses' names (none when the
    split has a single category, whose loss is the overall one)."""
    counts: Dict[str, int] = {}
    for ex in examples:
        if "category" in ex:
            counts[ex["category"]] = counts.get(ex["category"], 0) + 1
    return tuple(sorted(counts, key=lambda name: (-counts[name], name))) if len(counts) > 1 else ()


def _build_model(fabric, spec, config, checkpoint_dir, train, precision, objective):
    """The model with the method attached and its optimizer over the method's parameter groups, both set up by
    Fabric; also the trainable tensors and the (trainable, total) parameter counts."""
    t0 = time.perf_counter()
    model = methods.prepare_model(spec, config, checkpoint_dir, device=fabric.device, dtype=weights_dtype(precision),
                                  sharded=shards_model(fabric))
    model.gradient_checkpointing = train.activation_checkpointing
    if train.compile:
        fabric.print(f"torch.compile: {compile_blocks(model)} blocks (compiled in the first step)")
    objective.attach(model, spec, train.loss)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = methods.count_parameters(model, requires_grad=True)
    n_total = methods.count_parameters(model)
    fabric.print(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.4f}%)")
    fabric.print(f"model ready in {time.perf_counter() - t0:.2f}s ({spec.describe()})")
    make_optimizer = lambda module: method_optimizer(  # noqa: E731
        module, spec, train.optimizer, lr=train.learning_rate, weight_decay=train.weight_decay,
        betas=(train.beta1, train.beta2))
    if shards_model(fabric):
        # FSDP2 replaces every parameter by its shard (a DTensor): the optimizer and the trained list follow it
        model = fabric.setup_module(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = fabric.setup_optimizers(make_optimizer(methods.unwrap(model)))
    else:
        model, optimizer = fabric.setup(model, make_optimizer(model))
    return model, optimizer, trainable, (n_trainable, n_total)


def shards_model(fabric) -> bool:
    """Whether the Fabric shards the model (``--fabric.strategy fsdp``)."""
    return type(fabric.strategy).__name__ == "ModelParallelStrategy"


def _all_rows(collate):
    """``collate`` without the head's target rows (``losses.target_rows``)."""
    def without(batch):
        collated = collate(batch)
        collated.pop("target_rows", None)
        return collated
    return without


def _loaders(fabric, train_examples, val_examples, train, accum, start_step, total_steps, objective,
             packing: Optional[int] = None, category_weights=None):
    """The training loader (the step-indexed order from ``start_step`` on, weighted by category when asked; with
    ``packing``, the token budget, its micro-batches are packed rows) and the validation loader, whose batches stay
    one example a row (its loss is token-weighted either way, and the per-category split takes rows)."""
    pad_id = 0
    padded = lambda batch: objective.collate(batch, pad_id=pad_id)  # noqa: E731
    order = None
    if category_weights:
        names = [ex.get("category", UNKNOWN_CATEGORY) for ex in train_examples]
        order = CategoryWeightedSampler(names, category_weights, train.micro_batch_size, accum, fabric.world_size,
                                        0 if packing else fabric.global_rank, train.seed, start_step, total_steps)
    if packing:
        sampler = PackedStepBatchSampler(example_lengths(train_examples), train.micro_batch_size, accum,
                                         fabric.world_size, fabric.global_rank, train.seed, start_step, total_steps,
                                         budget=packing, order=order)
        collate = objective.collate_packed
    else:
        sampler = order or StepBatchSampler(len(train_examples), train.micro_batch_size, accum, fabric.world_size,
                                            fabric.global_rank, train.seed, start_step, total_steps)
        collate = padded
    # Loaders draw their iterator seeds from their own generator, not the global RNG: otherwise creating an
    # iterator (at resume, or for each validation) would shift the dropout masks and break exact resumption.
    if fabric.world_size > 1 or shards_model(fabric):
        # Fabric refuses a DDP or FSDP model's head called outside its forward: the head runs on every position
        padded, collate = _all_rows(padded), _all_rows(collate)
    train_loader = fabric.setup_dataloaders(
        DataLoader(InstructionDataset(train_examples), batch_sampler=sampler, collate_fn=collate,
                   generator=torch.Generator().manual_seed(train.seed)),
        use_distributed_sampler=False,
    )
    val_loader = fabric.setup_dataloaders(
        DataLoader(InstructionDataset(val_examples), batch_size=train.micro_batch_size, shuffle=False,
                   collate_fn=padded, generator=torch.Generator().manual_seed(train.seed)),
        use_distributed_sampler=False,
    )
    return train_loader, val_loader
