#!/usr/bin/env bash
# The GPU check: ONE command of at most ~9 minutes on one GPU (an H200 lease: ~15 minutes in all,
# 1-2 of them start-up, at most 10 minutes per command), then an optional second one:
#
#   bash scripts/gpu_check.sh OUT_DIR              # smoke, train, memory, bench (budget 540 s)
#   bash scripts/gpu_check.sh OUT_DIR2 more        # tests, train-more, bench-shapes (budget 180 s)
#
# Parts, in order, with their estimates on one H200 (seconds; none measured yet: no GPU was lent):
#   env           5   torch, CUDA, nvidia-smi, which optional packages are importable
#   smoke        15   NCCL and the launcher: run.py --num-gpus 1 --distributed, a tiny GPT-2 (eager,
#                     2 steps, AdamW under DDP); if this fails, the rest cannot work
#   train       420   the paper preset (--preset nanogpt-paper: speedrun model, bf16 embeddings and
#                     stream, flex_attention's sliding window, torch.compile, fused Adam, nccl on one
#                     GPU with --distributed), GPU_CHECK_STEPS (10) steps of two 64K-token streams,
#                     by risk:
#                       mfsgd         150  cold compile (train and eval graphs) + start-up
#                       adamw          50  the inductor cache is warm from here on
#                       mfsgd-sketch   50  memory_mode + comm sketch: hooks, overlapped all-reduces
#                       mfsgd-fsdp    120  FSDP2: new graphs (a break at each unit), bf16 units
#                       muon           50
#                     MoFaSGD with check_orthonormal 1e-3; then summarize.py over the runs so far
#   memory       40   bench_memory.py, GPT-2 small, 1 x 1024, torch.cuda.max_memory_allocated
#   bench        45   bench_optimizers.py whole-model table, fp32 and bf16 (no projector reference)
#   (sum 525 s, 8.8 min: a part starts only if its estimate fits the budget left; each is killed at
#   its limit, at most the budget left)
# The second command (`more`):
#   tests       100   python tests/test_gpu_path.py: the CUDA-only checks (flex_attention compiled
#                     without recompiles as the window grows, compiled = eager in bf16, sketch mode
#                     under FSDP on CUDA streams, one NCCL worker = plain; no pytest needed)
#   train-more  (as the budget allows) mfsgd-fsdp-sketch (150 on a cold compile cache), adamw-fsdp
#                     and galore (50 each; galore is skipped with a note when galore-torch is not
#                     importable). 180 s leaves room for tests and bench-shapes only: the train-more
#                     runs need a lease of their own (GPU_CHECK_BUDGET_S=540 ... more)
#   bench-shapes 45   the per-shape optimizer-step table
# Any part list works: bash scripts/gpu_check.sh OUT "train memory"; GPU_CHECK_RUNS="muon" picks runs.
#
# Output: OUT_DIR holds at most 8 files, none in a subfolder, each kept under 16 MiB, rewritten
# after every part so a killed call still returns what ran: progress.md (each part: estimate,
# limit, real seconds, status), env.txt, summary.md, memory.md, bench.md, logs.tar.gz (every part's
# log), runs.tar.gz (the run folders: config.json, metrics.jsonl, summary.json, workers.log,
# launches.jsonl; no checkpoints: runs use --drop-checkpoints; a file over 1 MiB keeps its first
# 256 KiB and last 768 KiB, less if an archive would still reach 15 MiB).
# Run folders and logs are written under GPU_CHECK_WORK (default $TMPDIR/gpu-check.PID) first.
# Offline: needs torch (CUDA), numpy, pyyaml (tqdm, tiktoken unused here) and the corpus: carry
# data/shakespeare (3.9 MiB, built by `make data`; GPU_CHECK_DATA=DIR for another folder of
# train_*.bin / val_*.bin shards). Exit status: the number of failed parts (skipped ones not counted).
# GPU_CHECK_DEVICE=cpu runs the same parts on CPU at toy size, the paper preset included (bf16,
# FSDP; no compile): what tests/test_gpu_path.py runs. GPU_CHECK_BUDGET_S overrides the budget.
set -u -o pipefail
PY=${PY:-python3}
OUT=${1:-results/gpu-check}
PARTS=${2:-default}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
STEPS=${GPU_CHECK_STEPS:-10}
DATA=${GPU_CHECK_DATA:-data/shakespeare}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/gpu-check.$$}
mkdir -p "$WORK/logs" "$WORK/runs"
export PYTHONUNBUFFERED=1
START=$SECONDS
failed=0
SKIPPED=()
case $PARTS in
    default) PARTS="env smoke train memory bench"; BUDGET=${GPU_CHECK_BUDGET_S:-540} ;;
    more) PARTS="env tests train-more bench-shapes"; BUDGET=${GPU_CHECK_BUDGET_S:-180} ;;
    *) BUDGET=${GPU_CHECK_BUDGET_S:-540} ;;
esac
for p in $PARTS; do
    case $p in env|smoke|train|train-more|memory|bench|bench-shapes|tests) ;;
    *) echo "unknown part '$p'; choose from: env smoke train train-more memory bench bench-shapes tests" \
            "(or default, more)" >&2; exit 2 ;;
    esac
done

if [ "${GPU_CHECK_DEVICE:-cuda}" = cpu ]; then
    DEVICE=cpu; LAUNCH=(--nproc 1 --distributed)
    BENCH=(--shapes 64x96 --ranks 4 --steps 2 --warmup 1)  # per-shape only: the hidden set is slow on CPU
    BENCH_SHAPES=("${BENCH[@]}")
    MEMORY=(--model cpu-tiny --seq-len 32 --rank 4 --steps 1 --variants "'adamw,mfsgd (sketch)'")
    # the paper preset at toy size: its speedrun model (bf16 tables and stream, value embeddings,
    # skips), stream layout and window schedule, on 128-token streams; rank 4; no compile on CPU
    # (GPU_CHECK_VOCAB: a smaller vocabulary for a corpus of small token ids: gloo sums bf16 slowly)
    SIZE='{"model": {"preset": "speedrun-tiny", "n_embd": 32, "block_size": 128, "loss_chunk_tokens": 32,
                     "vocab_size": '${GPU_CHECK_VOCAB:-50304}'},
           "data": {"seq_len": 128, "val_tokens": 256}, "train": {"compile": false}}'
    MFSGD_RANK=', "rank": 4'
else
    # --distributed: one GPU still runs NCCL, DDP, the sketch all-reduces and FSDP's collectives
    DEVICE=cuda; LAUNCH=(--num-gpus 1 --distributed)
    BENCH=(--whole-model-only --no-projector-reference)
    BENCH_SHAPES=(--steps 10 --warmup 2)
    MEMORY=(--model gpt2-small --seq-len 1024 --rank 32)
    # one GPU, the preset's layout: 2 accumulation steps of one 64K-token stream per step (a quarter
    # of the preset's batch), one 64K-token validation stream, the window schedule over the short run
    SIZE='{"data": {"val_tokens": 65536}}'
    MFSGD_RANK=''  # the preset's optimizer rank (32)
fi
# the smoke run: a tiny GPT-2, eager, without the preset
SMOKE='{"model": {"arch": "gpt2", "preset": "cpu-tiny"}, "data": {"seq_len": 64, "val_tokens": 1024},
        "train": {"batch_size": 8, "micro_batch_size": 8, "val_batch_size": 8, "compile": false}}'

export PY
ENV_REPORT='date -u; $PY - <<"PYTHON"
import importlib.util, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for m in ("numpy", "yaml", "tqdm", "tiktoken", "pytest", "galore_torch", "wandb", "triton"):
    print(m, "yes" if importlib.util.find_spec(m) else "no")
PYTHON
nvidia-smi 2>&1 || true'

note() {  # a line for progress.md and stdout
    echo "$*" | tee -a "$OUT/progress.md"
}

run_config() {  # run_config SIZE_JSON OPTIMIZER_KEYS_JSON PARALLEL STEPS: the run's --config JSON
    # plain Python (configs imports torch: seconds per run on a small CPU)
    $PY - "$1" "$2" "$3" "$4" "$DATA" <<'PYTHON'
import json, sys
size, optimizer, parallel, steps, data = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
config = {"train": {"steps": steps, "val_every": steps, "batch_size": 2, "micro_batch_size": 1, "val_batch_size": 1,
                    "ckpt_every": 0, "parallel": parallel},
          "data": {"train_files": f"{data}/train_*.bin", "val_files": f"{data}/val_*.bin"},
          "logging": {"progress": False}, "optimizer": optimizer}
for section, keys in size.items():
    config.setdefault(section, {}).update(keys)
print(json.dumps(config))
PYTHON
}

pack() {  # the work folder's logs and runs into OUT: two archives, files over 1 MiB cut to head and tail
    $PY - "$WORK" "$OUT" <<'PYTHON'
import io, os, sys, tarfile
work, out = sys.argv[1], sys.argv[2]
for name in ("logs", "runs"):
    tmp = os.path.join(out, f".{name}.tar.gz")
    for limit in (1 << 20, 1 << 18, 1 << 16):  # a file over `limit` keeps its first quarter and last 3/4 of it
        with tarfile.open(tmp, "w:gz") as tar:
            for root, dirs, files in os.walk(os.path.join(work, name)):
                dirs[:] = sorted(d for d in dirs if d != "checkpoints")  # --drop-checkpoints leaves none; never pack one
                for f in sorted(files):
                    path = os.path.join(root, f)
                    with open(path, "rb") as fh:
                        data = fh.read()
                    if len(data) > limit:
                        data = data[: limit // 4] + b"\n[... cut by gpu_check.sh ...]\n" + data[-(limit - limit // 4):]
                    info = tarfile.TarInfo(os.path.relpath(path, work))
                    info.size, info.mtime = len(data), int(os.path.getmtime(path))
                    tar.addfile(info, io.BytesIO(data))
        if os.path.getsize(tmp) < 15 << 20:  # what the lease brings back: files under 16 MiB
            break
    os.replace(tmp, os.path.join(out, f"{name}.tar.gz"))
PYTHON
}

end_leftovers() {  # a killed part's workers (torchrun's children, in sessions of their own) by PID
    $PY - "$WORK" <<'PYTHON'
import os, signal, sys
work = sys.argv[1]
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except OSError:
        continue
    if work in cmdline and int(pid) != os.getpid():  # only this check's runs: their folders are under WORK
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
PYTHON
}

part() {  # part NAME ESTIMATE_S LIMIT_S COMMAND...: run within the budget, log, time, count a failure
    local name=$1 estimate=$2 limit=$3; shift 3
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$estimate" -gt "$left" ]; then
        note "| $name | $estimate | - | - | skipped: $left s of the budget left |"
        SKIPPED+=("$name")
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local log="$WORK/logs/${name%%:*}.log" t0=$SECONDS rc=0
    echo "== $name (estimate $estimate s, limit $limit s): $*" >> "$log"
    timeout -k 15 "$limit" "$@" >> "$log" 2>&1 || rc=$?
    local status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="TIMEOUT at $limit s"
        end_leftovers
    elif [ $rc -ne 0 ]; then
        status="FAILED (exit $rc): $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200 | tr '|' '/')"
    fi
    [ "$status" = ok ] || failed=$((failed + 1))
    note "| $name | $estimate | $limit | $((SECONDS - t0)) | $status |"
    pack
}

train_run() {  # train_run NAME: one paper-preset run (NAME: optimizer[-fsdp][-sketch])
    local run=$1 keys='{}' parallel=ddp estimate=50 limit=150
    local optimizer=${run%%-*}
    case $run in
        mfsgd|mfsgd-fsdp) keys='{"check_orthonormal": 0.001'$MFSGD_RANK'}' ;;
        mfsgd-sketch) keys='{"memory_mode": "sketch", "comm": "sketch", "check_orthonormal": 0.001'$MFSGD_RANK'}' ;;
        mfsgd-fsdp-sketch) keys='{"memory_mode": "sketch", "check_orthonormal": 0.001'$MFSGD_RANK'}' ;;
        galore)
            if ! $PY -c 'import galore_torch' 2>/dev/null; then
                note "| train:galore | - | - | - | skipped: galore-torch is not importable here |"
                return 0
            fi ;;
    esac
    case $run in *-fsdp*) parallel=fsdp ;; esac
    # a run of the call's first compile (cold inductor cache), or its first under FSDP (other graphs)
    # costs more; the later ones find their kernels in the cache
    if [ $RUNS_DONE = 0 ]; then estimate=150; limit=270
    elif [ $parallel = fsdp ] && [ $FSDP_DONE = 0 ]; then estimate=120; limit=240; fi
    local config
    config=$(run_config "$SIZE" "$keys" "$parallel" "$STEPS") || { note "| train:$run | - | - | - | FAILED: config |"; failed=$((failed + 1)); return 0; }
    part "train:$run" "$estimate" "$limit" $PY run.py --optimizer "$optimizer" "${LAUNCH[@]}" --preset nanogpt-paper \
        --results-dir "$WORK/runs" --name "$run" --overwrite --drop-checkpoints --config "$config"
    RUNS_DONE=$((RUNS_DONE + 1))
    [ $parallel = fsdp ] && FSDP_DONE=$((FSDP_DONE + 1))
    [ $DEVICE = cuda ] && summarize  # after each run on a GPU (seconds there), once per part on CPU
}

summarize() {  # the table of every run so far (summarize.py's runs table: ms/step, peak memory)
    $PY -m scripts.summarize "$WORK/runs" --table runs --out "$OUT/summary.md" >> "$WORK/logs/summarize.log" 2>&1 ||
        echo "summarize.py failed: see logs.tar.gz logs/summarize.log" > "$OUT/summary.md"
}

have_data() {
    if ! ls "$DATA"/train_*.bin "$DATA"/val_*.bin > /dev/null 2>&1; then
        note "| $1 | - | - | - | FAILED: no train_*.bin / val_*.bin shards in $DATA: build them with 'make data' or carry that folder (GPU_CHECK_DATA=DIR) |"
        failed=$((failed + 1))
        return 1
    fi
}

: > "$OUT/progress.md"
note "# gpu_check $(date -u +%FT%TZ): parts '$PARTS', device $DEVICE, budget $BUDGET s, $STEPS train steps"
note ""
note "| part | estimate s | limit s | real s | status |"
note "|---|---:|---:|---:|---|"
RUNS_DONE=0 FSDP_DONE=0
for p in $PARTS; do
    case $p in
    env)
        part env 5 30 bash -c "$ENV_REPORT"
        cp "$WORK/logs/env.log" "$OUT/env.txt" 2>/dev/null || true ;;
    smoke)
        have_data smoke || continue
        part smoke 15 90 $PY run.py --optimizer adamw "${LAUNCH[@]}" --results-dir "$WORK/runs" --name smoke --overwrite \
            --drop-checkpoints --config "$(run_config "$SMOKE" '{}' ddp 2)" ;;
    train|train-more)
        have_data "$p" || continue
        if [ $p = train ]; then default_runs="mfsgd adamw mfsgd-sketch mfsgd-fsdp muon"
        else default_runs="mfsgd-fsdp-sketch adamw-fsdp galore"; fi
        for run in ${GPU_CHECK_RUNS:-$default_runs}; do
            train_run "$run"
        done
        summarize
        pack ;;
    memory)
        part memory 40 120 bash -c "set -o pipefail; $PY -m scripts.bench_memory --device $DEVICE ${MEMORY[*]} | tee '$OUT/memory.md'" ;;
    bench)
        part bench 45 120 bash -c "set -o pipefail; { $PY -m scripts.bench_optimizers --device $DEVICE ${BENCH[*]} &&
            $PY -m scripts.bench_optimizers --device $DEVICE --dtype bf16 ${BENCH[*]}; } | tee '$OUT/bench.md'" ;;
    bench-shapes)
        part bench-shapes 45 120 bash -c "set -o pipefail; $PY -m scripts.bench_optimizers --device $DEVICE ${BENCH_SHAPES[*]} | tee '$OUT/bench.md'" ;;
    tests)
        part tests 100 240 $PY tests/test_gpu_path.py ;;
    esac
done
note ""
note "total $((SECONDS - START)) s of a $BUDGET s budget; $failed failed part(s)"
if [ ${#SKIPPED[@]} -gt 0 ]; then
    note "not run (budget): ${SKIPPED[*]}: run them next, e.g. bash scripts/gpu_check.sh OUT2 more (or GPU_CHECK_RUNS=... PARTS)"
fi
pack
echo "gpu_check: $failed failed part(s); results in $OUT"
exit $failed
