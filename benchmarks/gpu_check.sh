#!/usr/bin/env bash
# GPU check of issue 7: one prepared script, < 8 minutes on one H100 (its parts' time limits add up to
# 465 s, plus ~30 s of set-up), nothing fetched from the network.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-smoke  # here: the same code paths, tiny sizes, on the CPU
#
# What it does, each part under its own time limit (a part that fails or runs out of
# time is reported and the next one still runs; the exit status is 1 if any failed):
#   0. installs the missing Python packages from wheels in .whl/ (pip --no-index) and
#      makes `vitmpp` importable from this checkout without installing it;
#   1. the GPU benchmark rows: objective steps mae/mpp/supervised for ViT-B/16 in bf16,
#      with and without torch.compile, FLOPs and MFU; attention path (SDPA kernel, flash);
#      transformers ViTMAE peer; memory per image, largest batch, activation checkpointing
#      (python -m vitmpp.benchmarks --device cuda --rows objectives,attention,peer,memory);
#   2. the data rows on this host's cores and end to end through pretrain/main.py
#      (--rows loader,end_to_end), on images it generates itself;
#   3. photo-like JPEG shards for the pretraining runs, generated on every core;
#   4. the host-sync audit of the real training loop, CUDA tensors only;
#   5. a 200-step MAE ViT-B/16 bf16 pretraining through pretrain/main.py on generated
#      shards: loss must fall; images/s and MFU printed.
# Everything goes to $OUT when set (else benchmarks/gpu-check-out/): gpu_check.log,
# env.txt, results-cuda.json (or results-cpu-smoke.json), syncs.json,
# pretrain_perf.jsonl, pretrain_metrics.jsonl, summary.txt (7 files, no sub-folders).
#
# Wheels it needs in .whl/ (the GPU image lacks them; it has torch, timm, accelerate,
# einops, tensorboard, safetensors, transformers, numpy, pyyaml, pillow, scikit-learn):
#   webdataset-1.0.2-py3-none-any.whl, braceexpand-0.1.7-py2.py3-none-any.whl
# Downloaded here, in the repository root (.whl/ is git-ignored), with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl webdataset==1.0.2 braceexpand==0.1.7
# The device tool call that runs it: carry [".whl"], command `bash benchmarks/gpu_check.sh`, timeout_s 560.
set -euo pipefail

MODE=gpu
case "${1:-}" in
  --cpu-smoke) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/benchmarks/gpu-check-out}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vitmpp-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export VITMPP_NO_BAR=1 PYTHONUNBUFFERED=1 VITMPP_CACHE="$WORK/cache" TOKENIZERS_PARALLELISM=false
STARTED=$(date +%s)
FAILED=()

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - STARTED ))s] $*" | tee -a "$LOG"; }

# part NAME SECONDS COMMAND...: run a part under a time limit, log its output, remember failures
part() {
  local name="$1" limit="$2"; shift 2
  log "== $name (limit ${limit}s): $*"
  local status=0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" || status=$?
  if [ "$status" -ne 0 ]; then
    log "!! $name failed (exit $status$([ "$status" -eq 124 ] && echo ', time limit'))"
    FAILED+=("$name")
  else
    log "== $name done"
  fi
}

# ---- 0. dependencies and the package
if ! "$PY" -c "import webdataset, braceexpand" 2>/dev/null; then
  if ! ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    log "error: webdataset/braceexpand are missing and there are no wheels in $REPO/.whl (see this script's header)"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$REPO"/.whl/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  log "installed from .whl: $(ls "$REPO"/.whl | tr '\n' ' ')"
fi
if ! "$PY" -c "import vitmpp.models, vitmpp.benchmarks" 2>/dev/null; then
  # vitmpp is a namespace package over the top-level folders: link them instead of pip install -e
  mkdir -p "$WORK/pkg/vitmpp"
  for d in common datasets models pretrain finetune analyze benchmarks; do
    [ -d "$REPO/$d" ] && ln -s "$REPO/$d" "$WORK/pkg/vitmpp/$d"
  done
  export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import vitmpp.models, vitmpp.datasets, vitmpp.benchmarks, webdataset" || { log "error: vitmpp cannot be imported"; exit 2; }

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "mode: $MODE"
  echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "cpu cores: $(nproc)"
  "$PY" - <<'EOF'
import torch, timm, accelerate, webdataset
print("torch", torch.__version__, "| timm", timm.__version__, "| accelerate", accelerate.__version__,
      "| webdataset", webdataset.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

if [ "$MODE" = gpu ]; then
  DEVICE=(--device cuda); RESULTS="$OUT/results-cuda.json"
  T_MODEL=200; T_DATA=120; T_SYNC=45; T_PRETRAIN=100
  PHOTOS=2048; REPEAT=25; SIZE=341x256; WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
  PRETRAIN=(--config configs/pretrain/mae_vit_b16.yaml train.global_batch=256 train.per_device_batch=256
            train.steps=200 train.epochs=null optim.warmup_steps=20 optim.warmup_epochs=null
            optim.lr=5e-4 optim.base_lr=null "data.num_workers=$WORKERS" data.shuffle_buffer=2048
            train.mixed_precision=bf16 log.log_every=10)
  SYNC_MODEL=(model.name=vit_small_patch16_224 model.img_size=224 train.global_batch=64 train.mixed_precision=bf16)
  SYNC_FLAGS=(--device-only)
else
  DEVICE=(--device cpu --quick); RESULTS="$OUT/results-cpu-smoke.json"
  T_MODEL=120; T_DATA=120; T_SYNC=120; T_PRETRAIN=180
  PHOTOS=64; REPEAT=4; SIZE=64x48; WORKERS=1
  PRETRAIN=(objective=mae model.name=vit_pico_patch4_32 model.img_size=32 mae.decoder_embed_dim=32
            mae.decoder_depth=1 mae.decoder_num_heads=2 train.global_batch=16 train.steps=24
            optim.warmup_steps=4 optim.lr=1e-3 optim.base_lr=null "data.num_workers=$WORKERS" log.log_every=4)
  SYNC_MODEL=(model.name=vit_pico_patch4_16 model.img_size=16 train.global_batch=16)
  SYNC_FLAGS=()
fi

# ---- 1. model rows (bf16; compiled and not on the GPU)
part "model rows" "$T_MODEL" "$PY" -m vitmpp.benchmarks "${DEVICE[@]}" --rows objectives,attention,peer,memory \
  --scratch "$WORK/bench" --out "$WORK/results-model.json"

# ---- 2. data rows and end to end
part "data rows" "$T_DATA" "$PY" -m vitmpp.benchmarks "${DEVICE[@]}" --rows loader,end_to_end \
  --scratch "$WORK/bench" --out "$WORK/results-data.json"

"$PY" - "$RESULTS" "$WORK/results-model.json" "$WORK/results-data.json" <<'EOF' || true
import json, sys
out, parts = sys.argv[1], [p for p in sys.argv[2:]]
merged = None
for path in parts:
    try:
        record = json.load(open(path))
    except (OSError, ValueError):
        continue
    if merged is None:
        merged = record
    else:
        merged["rows"] += record["rows"]
        merged["failed_rows"] += record["failed_rows"]
        merged["seconds"] += record["seconds"]
if merged is not None:
    json.dump(merged, open(out, "w"), indent=1)
    print("merged results:", out)
EOF

# ---- 3. generated shards for the pretraining runs (photo-like JPEGs, every core)
SHARDS=$("$PY" -m vitmpp.benchmarks.data --out "$WORK/pretrain-data" --count "$PHOTOS" --size "$SIZE" --repeat "$REPEAT" | tail -1)
log "pretraining shards: $SHARDS"

# ---- 4. no host sync inside optimizer steps (the real loop; CUDA tensors only on the GPU)
part "sync audit" "$T_SYNC" "$PY" -m vitmpp.benchmarks.syncs "${SYNC_FLAGS[@]}" --out "$OUT/syncs.json" -- \
  objective=mae "${SYNC_MODEL[@]}" "data.shards=$SHARDS" train.steps=12 data.num_workers=2 optim.warmup_steps=2 log.log_every=4 \
  log.image_every=0 log.checkpoint_every=100000 "run.output_dir=$WORK/runs" run.name=sync-audit

# ---- 5. 200-step MAE ViT-B/16 bf16 pretraining on the generated shards
part "pretraining" "$T_PRETRAIN" "$PY" -m vitmpp.benchmarks.run_pretrain --perf-out "$OUT/pretrain_perf.jsonl" -- \
  "${PRETRAIN[@]}" "data.shards=$SHARDS" log.image_every=0 log.checkpoint_every=100000 \
  "run.output_dir=$WORK/runs" run.name=pretrain-check
cp "$WORK/runs/pretrain-check/metrics.jsonl" "$OUT/pretrain_metrics.jsonl" 2>/dev/null || true

# ---- summary
"$PY" - "$OUT" "$RESULTS" <<'EOF' | tee "$OUT/summary.txt" | tee -a "$LOG" || FAILED+=("summary")
import json, statistics, sys
from pathlib import Path

out, results = Path(sys.argv[1]), Path(sys.argv[2])
ok = True
if results.exists():
    record = json.loads(results.read_text())
    print(f"benchmark rows ({record['device_name']}, torch {record['torch']}):")
    for row in record["rows"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.4g} {row['unit']}"
        print(f"  {row['section']}: {row['name']} = {value} | {row['note']}")
else:
    print("no benchmark results")
syncs = out / "syncs.json"
if syncs.exists():
    s = json.loads(syncs.read_text())
    print(f"host syncs inside {s['steps']} optimizer steps: {s['syncs_in_steps']} (at log intervals: {s['syncs_at_log_intervals']})")
    ok &= s["syncs_in_steps"] == 0
metrics = out / "pretrain_metrics.jsonl"
perf = out / "pretrain_perf.jsonl"
if metrics.exists() and perf.exists():
    losses = [json.loads(l)["loss"] for l in metrics.read_text().splitlines() if l.strip()]
    losses = [l for l in losses if l is not None]
    k = max(1, len(losses) // 10)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    intervals = [json.loads(l) for l in perf.read_text().splitlines() if l.strip()]
    steady = intervals[2:] or intervals
    ips = statistics.median(r["perf/images_per_sec"] for r in steady)
    wait = statistics.median(r["perf/data_wait_fraction"] for r in steady)
    mfu = [r["perf/mfu"] for r in steady if "perf/mfu" in r]
    mfu_text = f"{statistics.median(mfu):.1%}" if mfu else "n/a (no GPU peak)"
    falls = last < first * 0.95
    print(f"pretraining: {len(losses)} steps, loss {first:.4f} (first {k}) -> {last:.4f} (last {k}): "
          f"{'falls' if falls else 'DOES NOT FALL'}; {ips:,.0f} images/s, data wait {wait:.0%}, MFU {mfu_text}")
    ok &= falls
else:
    print("pretraining: no metrics")
    ok = False
sys.exit(0 if ok else 1)
EOF

log "finished in $(( $(date +%s) - STARTED )) s; failed parts: ${FAILED[*]:-none}"
[ "${#FAILED[@]}" -eq 0 ]
