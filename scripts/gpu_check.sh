#!/usr/bin/env bash
# One prepared check of everything that only a CUDA GPU can run, written to ONE report file.
#
#   bash scripts/gpu_check.sh [REPORT]      # default report: gpu_check_report.txt
#
# Runs the CUDA tests (pytest -m cuda: quantized kernels at the real head sizes, codes read back
# from the CUDA layouts, save/reload from CUDA, GPTQ on the GPU, graphed decode == eager, ...),
# every `cbx bench` mode on the full-size random model (T3 tokens/s batch 1 and batched, RTF per
# stage, int4/int8/fp8 vs bf16, graphed vs eager, student vs teacher, scorer, throughput of
# batched synthesis in audio s per wall s), and `cbx run` on random:original for int8, int4 RTN
# and GPTQ, fp8 and a CFM student (a short distill first).
# Budget: under 9 minutes on one H100-class GPU: each step has its own timeout and the
# timeouts add up to 9 minutes (tests/test_gpu_check.py holds them to that).
# Without CUDA it says so and exits 0. Exit status 1 when a step failed (the report says which).
#
# To add a check: append one line to STEPS below: "name|timeout seconds|command" (the command
# runs with bash in the repository root; $CBX is the cbx entry point, $PY the python, $WORK a
# scratch folder). Keep each step short: the whole list shares the 9-minute budget.
set -u
cd "$(dirname "$0")/.."
REPORT="${1:-gpu_check_report.txt}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
CBX="$PY -m cbx.cli"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check."
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cbx-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export CBX PY WORK

# The cbx run step: every compression on the full-size random model, one utterance each,
# beside its baseline (same bf16 compute dtype), then the leaderboard.
cat > "$WORK/distill.yaml" <<EOF
teacher: {model: "random:original", steps: 10, cfg_rate: 0.7}
data: {voices: [synthetic], prompt_seconds: 0.24, tokens: random, min_tokens: 16, max_tokens: 24,
       n_train: 8, n_heldout: 2, shard_size: 8, batch_size: 4, trajectory: false}
student: {eval_steps: [2], default_steps: 2}
objective: {name: endpoint, params: {steps: [2], loss: l1}}
train: {out_dir: "$WORK/distill", max_steps: 4, batch_size: 4, lr: 0.0001, mixed_precision: "no",
        device: auto, eval_every: 0, save_every: 4}
tracking: {backend: none}
EOF
cat > "$WORK/runs.yaml" <<EOF
sweep:
  base:
    name: gpu-check
    model: "random:original"
    device: cuda
    synth: {max_speech_tokens: 50, batch_size: 4}
    eval: {set: offline, limit: 1, samples: 0}
    tracking: none
  variants:
    - {name: int8, steps: [{transform: int8_weight_only}]}
    - {name: int4-rtn, steps: [{transform: int4_weight_only, params: {group_size: 128}}]}
    - {name: int4-gptq, steps: [{transform: int4_weight_only, params: {group_size: 128, method: gptq, calib_texts: 2, calib_max_speech_tokens: 50}}]}
    - {name: fp8, steps: [{transform: fp8_cfm}]}
    - {name: student, steps: [{transform: cfm_student, params: {checkpoint: "$WORK/distill/student", steps: 2}}]}
EOF

STEPS=(
    "environment|15|nvidia-smi; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), \"sm\", torch.cuda.get_device_capability(0))'"
    "pytest -m cuda|100|$PY -m pytest -q -m cuda tests -p no:cacheprovider"
    "bench engine, batch 1, graphed vs eager|60|$CBX bench engine --model full --device cuda --tokens 100 --batch 1 --repeats 2 --compile cudagraphs"
    "bench engine, batch 8|40|$CBX bench engine --model full --device cuda --tokens 100 --batch 8 --repeats 1"
    "bench quant (int8/int4/fp8 vs bf16; libraries: pytest -m cuda)|60|$CBX bench quant --model full --device cuda --repeats 3 --no-libraries"
    "bench student|30|$CBX bench student --model full --device cuda --dtype bf16 --repeats 2"
    "bench scorer|25|$CBX bench scorer --n 4"
    "distill a short student (random:original)|40|$CBX distill $WORK/distill.yaml"
    "bench throughput: 32 utterances, batch 16, graphed decode, bf16 HiFT/encoder|60|$CBX bench throughput --model full --device cuda --utterances 32 --batch 16 --tokens 100 --s3gen-bf16"
    "cbx run: int8, int4 rtn/gptq, fp8, student on random:original|110|$CBX run $WORK/runs.yaml --results $WORK/runs && $CBX leaderboard --results $WORK/runs"
)

{
    echo "# cbx gpu_check report"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo
} > "$REPORT"
failed=0
summary=()
t_all=$(date +%s)
for step in "${STEPS[@]}"; do
    name="${step%%|*}"; rest="${step#*|}"; limit="${rest%%|*}"; cmd="${rest#*|}"
    echo "gpu_check: $name ..."
    t0=$(date +%s)
    { echo "## $name"; echo "\$ $cmd"; } >> "$REPORT"
    timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$REPORT" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then status=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT (${limit} s)"; failed=1; else status="FAILED (exit $rc)"; failed=1; fi
    echo "-> $status in ${dt} s" >> "$REPORT"; echo >> "$REPORT"
    summary+=("$(printf '%-62s %-18s %5s s' "$name" "$status" "$dt")")
done
{
    echo "## summary (total $(( $(date +%s) - t_all )) s)"
    printf '%s\n' "${summary[@]}"
} >> "$REPORT"
printf '%s\n' "${summary[@]}"
echo "gpu_check: report written to $REPORT"
exit $failed
