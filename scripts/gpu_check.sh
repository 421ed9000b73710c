#!/usr/bin/env bash
# The GPU checks, in parts sized for a short lease of one GPU. Run them as three commands of at
# most ~5 minutes each (estimates; each train run compiles the 278M-parameter model once):
#
#   bash scripts/gpu_check.sh OUT_DIR "bench memory"   # the optimizer-step and memory tables
#   bash scripts/gpu_check.sh OUT_DIR train-a          # AdamW and MoFaSGD on the paper preset
#   bash scripts/gpu_check.sh OUT_DIR train-b          # Muon, MoFaSGD sketch modes, GaLore
#   bash scripts/gpu_check.sh OUT_DIR train-fsdp       # AdamW and MoFaSGD under train.parallel fsdp
#
# OUT_DIR (default results/gpu-check) gets every table and log; each part adds to it, and the
# summary table after a train part covers every run in OUT_DIR/runs so far. PARTS, in order:
#   bench   optimizer-step table on CUDA: the 72-matrix GPT-2-small hidden set, fp32 (with the
#           projector-forming reference) and bf16 parameters, MoFaSGD r=32 vs AdamW foreach/fused
#   memory  bench_memory.py on CUDA (torch.cuda.max_memory_allocated), GPT-2 small, 1 x 1024
#   train-a, train-b, train (both), train-fsdp (AdamW and MoFaSGD under FSDP2: compare their peak
#           memory and ms/step with train-a's DDP runs in the summary table)
#           shortened runs of the paper preset (its model, 64K-token document-masked streams with the
#           sliding window (flex_attention), bf16 embeddings and stream, torch.compile,
#           fused Adam for the non-hidden groups, nccl on one GPU with --distributed: DDP, the sketch
#           all-reduces and the shard all-gathers run for real): train-a AdamW and MoFaSGD, train-b
#           Muon, MoFaSGD with sketch memory + sketch all-reduce (overlapped with backward) and,
#           when galore-torch is importable, GaLore; then one summary table (median ms/step, peak memory)
#
# Data: the embedded corpus (`make data` here; a machine without internet needs data/shakespeare
# copied over), so the train part measures speed and memory, not the paper's losses.
# Every part logs to OUT_DIR/*.log as it goes; a failing part does not stop the next one, and the
# exit status is the number of failed parts. GPU_CHECK_STEPS (default 20) sets the train steps,
# GPU_CHECK_RUNS (default: the part's runs) the train runs, GPU_CHECK_DATA
# (default data/shakespeare) the folder of train_*.bin / val_*.bin shards they read.
# GPU_CHECK_DEVICE=cpu runs the same commands on CPU at toy size (what tests/test_scripts.py does).
set -u -o pipefail  # pipefail: a part's status is its command's, not tee's
OUT=${1:-results/gpu-check}
PARTS=${2:-bench memory train}
PY=${PY:-python3}
STEPS=${GPU_CHECK_STEPS:-20}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=0

part() {  # part NAME COMMAND...: run, tee the log, count a failure
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/$name.log"
    if ! "$@" 2>&1 | tee -a "$OUT/$name.log"; then
        echo "== $name FAILED" | tee -a "$OUT/$name.log"
        failed=$((failed + 1))
    fi
}

if [ "${GPU_CHECK_DEVICE:-cuda}" = cpu ]; then
    DEVICE=cpu; LAUNCH=(--nproc 1); PRESET=()
    BENCH=(--shapes 64x96 --ranks 4 --steps 2 --warmup 1)  # per-shape table only: the hidden set is slow on CPU
    MEMORY=(--model cpu-tiny --seq-len 32 --rank 4 --steps 1)
    SIZE='{"model": {"arch": "speedrun", "preset": "speedrun-tiny"}, "data": {"seq_len": 64, "val_tokens": 512},
           "train": {"batch_size": 8, "micro_batch_size": 8, "val_batch_size": 8}}'
else
    # --distributed: one GPU still runs NCCL, DDP, the sketch all-reduces and the shard all-gathers
    DEVICE=cuda; LAUNCH=(--num-gpus 1 --distributed); PRESET=(--preset nanogpt-paper)
    BENCH=(--whole-model-only)
    MEMORY=(--model gpt2-small --seq-len 1024 --rank 32)
    # one GPU, the preset's layout: 2 accumulation steps of one 64K-token stream per step (a quarter
    # of the preset's batch), one 64K-token validation stream, the window schedule over the short run
    SIZE='{"data": {"val_tokens": 65536}, "train": {"batch_size": 2}}'
fi

run_config() {  # run_config OPTIMIZER_KEYS_JSON PARALLEL: SIZE + the short-run keys + the optimizer keys
    $PY - "$SIZE" "$STEPS" "$1" "${GPU_CHECK_DATA:-data/shakespeare}" "$2" <<'PYTHON'
import json, sys
sys.path.insert(0, ".")
from configs import deep_merge
size, steps, optimizer, data = json.loads(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
short = {"train": {"steps": steps, "val_every": steps, "ckpt_every": 0, "parallel": sys.argv[5]},
         "data": {"train_files": f"{data}/train_*.bin", "val_files": f"{data}/val_*.bin"},
         "logging": {"progress": False}, "optimizer": optimizer}
print(json.dumps(deep_merge(size, short)))
PYTHON
}

{ date; $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'; nvidia-smi || true; } \
    > "$OUT/env.log" 2>&1

for p in $PARTS; do
    case $p in
    bench)
        part bench $PY -m scripts.bench_optimizers --device $DEVICE "${BENCH[@]}"
        part bench $PY -m scripts.bench_optimizers --device $DEVICE --dtype bf16 --no-projector-reference "${BENCH[@]}"
        ;;
    memory)
        part memory $PY -m scripts.bench_memory --device $DEVICE "${MEMORY[@]}"
        ;;
    train|train-a|train-b|train-fsdp)
        case $p in
            train-a) default_runs="adamw mfsgd" ;;
            train-b) default_runs="muon mfsgd-sketch galore" ;;
            train-fsdp) default_runs="adamw-fsdp mfsgd-fsdp" ;;
            *) default_runs="adamw mfsgd muon mfsgd-sketch galore" ;;
        esac
        data=${GPU_CHECK_DATA:-data/shakespeare}
        if ! ls "$data"/train_*.bin "$data"/val_*.bin > /dev/null 2>&1; then
            echo "== train FAILED: no train_*.bin / val_*.bin shards in $data: build them with 'make data' (needs" \
                 "the package registry) or carry that folder to this machine (GPU_CHECK_DATA=DIR)" | tee -a "$OUT/train.log"
            failed=$((failed + 1))
            continue
        fi
        RUNS=()
        for run in ${GPU_CHECK_RUNS:-$default_runs}; do
            if [ "$run" = galore ] && ! $PY -c 'import galore_torch' 2>/dev/null; then
                echo "galore-torch not importable here: GaLore skipped" | tee -a "$OUT/train.log"
            else
                RUNS+=("$run")
            fi
        done
        for run in "${RUNS[@]}"; do
            keys='{}'
            # MoFaSGD's factors checked for orthonormality after every update (CUDA's QR/SVD paths)
            parallel=ddp
            [ "${run%-fsdp}" != "$run" ] && parallel=fsdp
            [ "${run%-fsdp}" = mfsgd ] && keys='{"check_orthonormal": 0.001}'
            [ "$run" = mfsgd-sketch ] && keys='{"memory_mode": "sketch", "comm": "sketch", "check_orthonormal": 0.001}'
            optimizer=${run%-sketch}
            part train $PY run.py --optimizer "${optimizer%-fsdp}" "${LAUNCH[@]}" "${PRESET[@]}" \
                --results-dir "$OUT/runs" --name "$run" --overwrite --config "$(run_config "$keys" $parallel)"
        done
        part train $PY -m scripts.summarize "$OUT/runs" --out "$OUT/summary.md"
        cat "$OUT/summary.md" 2>/dev/null
        ;;
    *)
        echo "unknown part '$p'; choose from: bench memory train-a train-b train train-fsdp" >&2; exit 2 ;;
    esac
done
echo "gpu_check: $failed failed part(s); logs in $OUT"
exit $failed
