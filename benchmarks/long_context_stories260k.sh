#!/usr/bin/env bash
# The measurements of docs/long_context.md: stories260K (512-token window) extended 4x to 2048 by position
# interpolation, LongLoRA-style fine-tuning on packed C4 with dense and with shifted attention, and wikitext-2
# perplexity at 512- and 2048-token windows; then passkey retrieval and perplexity against context length
# (evaluate/long_context.py). One thread per process, one process at a time (about 10 CPU minutes; the evaluations
# took about 25 more on the shared machine of docs/long_context.md's re-measurement).
#   bash benchmarks/long_context_stories260k.sh [work_dir] [shared_data_dir]
set -u
W=${1:-out/long_context}
DATA=${2:-../shared/data}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
mkdir -p "$W"
log() { echo "== $*" | tee -a "$W/commands.log"; }
run() { log "$*"; local t0=$SECONDS; "$@" > "$W/last.out" 2> "$W/last.err"; local rc=$?
        tail -n 4 "$W/last.out"; grep '^error:' "$W/last.err"; echo "   rc=$rc, $((SECONDS - t0)) s" | tee -a "$W/commands.log"; }

run $PY scripts/convert_llama2c_checkpoint.py --checkpoint_path "$DATA/checkpoints/stories260K/stories260K.bin" \
    --tokenizer_path "$DATA/checkpoints/stories260K/tok512.bin" --output_dir "$W/stories260K"
C4="$DATA/c4/c4-train.00000-of-01024.first1000.json.gz"
run $PY scripts/prepare_text.py --checkpoint_dir "$W/stories260K" --source "$C4" --destination_path "$W/c4-2048" --seq_length 2048
run $PY scripts/prepare_text.py --checkpoint_dir "$W/stories260K" --source "$C4" --destination_path "$W/c4-512" --seq_length 512

TRAIN=(finetune/lora.py --config configs/long_context_stories260k.yaml --checkpoint_dir "$W/stories260K" --overwrite true)
run $PY "${TRAIN[@]}" --data.data_dir "$W/c4-2048" --attention.pattern dense --out_dir "$W/lora_plus_dense"
run $PY "${TRAIN[@]}" --data.data_dir "$W/c4-2048" --attention.pattern shifted --out_dir "$W/lora_plus_shifted"
# the control: the same recipe and tokens at the pretrained 512 (no scaling): what the C4 text alone teaches
run $PY "${TRAIN[@]}" --data.data_dir "$W/c4-512" --data.max_seq_length 512 --model.rope_scaling null \
    --attention.pattern dense --train.global_batch_size 8 --train.micro_batch_size 8 --out_dir "$W/lora_plus_512"

# wikitext-2 test, the same first 65,536 tokens at both windows (128 x 512, 32 x 2048)
PPL=($PY evaluate/perplexity.py --checkpoint_dir "$W/stories260K" --datasets wikitext2 --data_dir "$DATA" --progress false)
PI='{"type": "linear", "factor": 4}'
for T in 512 2048; do
  N=$((65536 / T))
  run "${PPL[@]}" --seqlen $T --max_windows $N --out_dir "$W/eval/base_$T"
  run "${PPL[@]}" --seqlen $T --max_windows $N --model.rope_scaling "$PI" --out_dir "$W/eval/base_pi_$T"
  run "${PPL[@]}" --seqlen $T --max_windows $N --adapter_dir "$W/lora_plus_dense/final" --out_dir "$W/eval/dense_$T"
  run "${PPL[@]}" --seqlen $T --max_windows $N --adapter_dir "$W/lora_plus_shifted/final" --out_dir "$W/eval/shifted_$T"
  run "${PPL[@]}" --seqlen $T --max_windows $N --adapter_dir "$W/lora_plus_shifted/final" --attention.pattern dense \
      --out_dir "$W/eval/shifted_dense_$T"
  run "${PPL[@]}" --seqlen $T --max_windows $N --adapter_dir "$W/lora_plus_512/final" --out_dir "$W/eval/control_$T"
done
# the analytic estimates of the two 2048-token training cells (and their trainable counts)
run $PY "${TRAIN[@]}" --data.data_dir "$W/c4-2048" --attention.pattern dense --dry_run true
cat "$W/last.out" > "$W/dry_run_dense.txt"
run $PY "${TRAIN[@]}" --data.data_dir "$W/c4-2048" --attention.pattern shifted --dry_run true
cat "$W/last.out" > "$W/dry_run_shifted.txt"
git rev-parse --short HEAD > "$W/commit.txt"; date -u +%Y-%m-%dT%H:%MZ > "$W/date.txt"
grep -m1 'model name' /proc/cpuinfo > "$W/cpu.txt"; nproc >> "$W/cpu.txt"

# issue 26: passkey retrieval and perplexity against context length (evaluate/long_context.py), the same models
# (the trained runs with full attention at inference, as LongLoRA infers; the base at its own 512 and with PI x4)
LC=($PY evaluate/long_context.py)
PK=(--depths '[0.0, 0.25, 0.5, 0.75, 1.0]' --trials 4 --distractors 4 --progress false)
CV=(--datasets wikitext2,c4 --data_dir "$DATA" --scored 128 --segments 16)
for M in base base_pi shifted dense control; do
  case $M in
    base) ARGS=() ;;
    base_pi) ARGS=(--model.rope_scaling "$PI") ;;
    shifted) ARGS=(--adapter_dir "$W/lora_plus_shifted/final" --attention.pattern dense) ;;
    dense) ARGS=(--adapter_dir "$W/lora_plus_dense/final") ;;
    control) ARGS=(--adapter_dir "$W/lora_plus_512/final") ;;
  esac
  run "${LC[@]}" passkey --checkpoint_dir "$W/stories260K" "${ARGS[@]}" "${PK[@]}" --out_dir "$W/long_eval/$M"
  run "${LC[@]}" curve --checkpoint_dir "$W/stories260K" "${ARGS[@]}" "${CV[@]}" --out_dir "$W/long_eval/$M"
done
# past the unscaled window: refused in one line
run "${LC[@]}" passkey --checkpoint_dir "$W/stories260K" --lengths '[2048]' "${PK[@]}"
J=(base base_pi shifted dense control)
run "${LC[@]}" plot --reports "[$(printf "$W/long_eval/%s/passkey.json," "${J[@]}" | sed 's/,$//')]" --out "$W/long_eval/passkey.png"
run "${LC[@]}" plot --reports "[$(printf "$W/long_eval/%s/context_length.json," "${J[@]}" | sed 's/,$//')]" \
    --out "$W/long_eval/context_length.png"
