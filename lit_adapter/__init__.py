"""lit-adapter: parameter-efficient fine-tuning research on LLaMA-family models with Lightning Fabric.

The package is laid out by responsibility; a reader coming from nanoGPT, torchtune or PEFT starts here:

* ``model/``: the one model (``gpt.py``: LLaMA, GPT-2, Llama 3 and the RoBERTa/BERT encoder chosen by
  ``config.Config``; ``encoder.py``: the encoder's embeddings, padding mask and head), RoPE and its
  scaling, packed rows (``packing.py``), the sparse attention kernels, classification heads, quantized bnb bases,
  FLOPs.
* ``tuners/``: one module per fine-tuning method, each a ``base.Method`` that owns its whole life (settings, how it
  attaches, what trains and is saved, its fold, its PEFT mapping, its memory terms); ``registry.py`` finds them
  and builds, loads and saves a run's model (``MethodSpec``, ``prepare_model``, ``save_adapter``,
  ``load_finetuned``).
* ``data/``: tokenizers, instruction, text, classification and preference data, the prompt template,
  truncation, the training order, and padding-free packing (``packing.py``: the packed batch format).
* ``train/``: the ``Trainer`` (``trainer.py``: ``TrainState``, one optimizer ``step()``), a run's options and
  setup (``run.py``), objectives, losses, optimizers, guards and start-up checks; ``sharding.py``: FSDP2 across
  processes and nodes, its sharded checkpoints and the consolidated ``final/``.
* ``tracking/``: experiment loggers, the run record, results and summaries.
* ``generation/``, ``evaluation/``: decoding; perplexity, classification, MMLU, lm-eval.
* ``grid/``: the comparison grid. ``memory/``: the estimator and its measurements. ``convert/``, ``export/``:
  checkpoints in and out (HF, PEFT, Meta, llama2.c). ``cli/``: the command lines' shared parts.
* ``checkpoint.py`` (reading, checking and writing checkpoint folders), ``errors.py`` (one-line user errors),
  ``runtime.py`` (device, precision and memory readings).
"""
