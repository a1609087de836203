#!/usr/bin/env bash
# GPU check of issue 7: one prepared script, < 9 minutes on one H100 (its parts' time limits add up to
# 510 s, plus ~30 s of set-up), nothing fetched from the network.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-smoke  # here: the same code paths, tiny sizes, on the CPU
#   bash benchmarks/gpu_check.sh --fsdp       # only part 6 (FSDP), < 3 minutes; with --cpu-smoke: 2 CPU processes
#                                             (device call: command `bash benchmarks/gpu_check.sh --fsdp`, timeout_s 240)
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
#      (--rows loader,end_to_end), on images it generates itself; then JPEGs decoded on the GPU
#      (data.decode=gpu, LoaderSpec(decode_on="device"), issue 15): images/s delivered by a loader
#      decoding with nvJPEG against the worker-decode loader, and their pixel difference on the same
#      batches (the boxes are the same: any difference is the decoders');
#   3. photo-like JPEG shards for the pretraining runs, generated on every core;
#   4. the host-sync audit of the real training loop, CUDA tensors only;
#   5. a 200-step MAE ViT-B/16 bf16 pretraining through pretrain/main.py on generated
#      shards: loss must fall; images/s and MFU printed;
#   6. FSDP2 (configs/accelerate/fsdp.yaml): 6 tiny steps, sharded checkpoints, SIGKILL after
#      the checkpoint of step 2, --resume auto, the gathered export (1 process on the GPU); only
#      with --fsdp, which runs part 0 and this alone (limit 150 s, its own device call: with parts
#      1-5 it would not fit one 600 s call); its output goes to gpu_check.log and env.txt.
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
FSDP_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=cpu ;;
    --fsdp) FSDP_ONLY=1 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke] [--fsdp]" >&2; exit 2 ;;
  esac
done

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
  T_MODEL=200; T_DATA=120; T_DECODE=45; T_SYNC=45; T_PRETRAIN=100
  DECODE=(cuda 1024 256)  # device, photos (those of the loader rows, made once), batch
  PHOTOS=2048; REPEAT=25; SIZE=341x256; WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
  PRETRAIN=(--config configs/pretrain/mae_vit_b16.yaml train.global_batch=256 train.per_device_batch=256
            train.steps=200 train.epochs=null optim.warmup_steps=20 optim.warmup_epochs=null
            optim.lr=5e-4 optim.base_lr=null "data.num_workers=$WORKERS" data.shuffle_buffer=2048
            train.mixed_precision=bf16 log.log_every=10)
  SYNC_MODEL=(model.name=vit_small_patch16_224 model.img_size=224 train.global_batch=64 train.mixed_precision=bf16)
  SYNC_FLAGS=(--device-only)
else
  DEVICE=(--device cpu --quick); RESULTS="$OUT/results-cpu-smoke.json"
  T_MODEL=120; T_DATA=120; T_DECODE=60; T_SYNC=120; T_PRETRAIN=180
  DECODE=(cpu 8 4)
  PHOTOS=64; REPEAT=4; SIZE=64x48; WORKERS=1
  PRETRAIN=(objective=mae model.name=vit_pico_patch4_32 model.img_size=32 mae.decoder_embed_dim=32
            mae.decoder_depth=1 mae.decoder_num_heads=2 train.global_batch=16 train.steps=24
            optim.warmup_steps=4 optim.lr=1e-3 optim.base_lr=null "data.num_workers=$WORKERS" log.log_every=4)
  SYNC_MODEL=(model.name=vit_pico_patch4_16 model.img_size=16 train.global_batch=16)
  SYNC_FLAGS=()
fi

# ---- 6. (only with --fsdp, instead of 1-5) FSDP2 end to end (configs/accelerate/fsdp.yaml): a few
# steps, sharded checkpoints, SIGKILL of the process tree after a checkpoint, --resume auto, the gathered export. On the one GPU: 1 process
# (NCCL refuses two ranks on one device), which runs the CUDA side (fully_shard over a 1-GPU mesh, bf16
# MixedPrecisionPolicy, sharded save/load, full-state gathering); splitting across ranks is checked on
# 2 CPU processes by tests/distributed/test_fsdp.py and here by --cpu-smoke. docs/distributed.md, "FSDP".
if [ "$MODE" = gpu ]; then FSDP_PROCS=1; FSDP_PRECISION=bf16; T_FSDP=150; else FSDP_PROCS=2; FSDP_PRECISION=no; T_FSDP=240; fi
if [ "$FSDP_ONLY" = 1 ]; then
cat >"$WORK/fsdp_check.py" <<'EOF'
import json, os, signal, subprocess, sys, time
from pathlib import Path

procs, precision, runs = sys.argv[1], sys.argv[2], Path(sys.argv[3])
launch = [sys.executable, "-m", "vitmpp.common.launcher", "--use_fsdp", "--config_file", "configs/accelerate/fsdp.yaml",
          "--num_processes", procs, "--mixed_precision", precision, "--main_process_port", "29731", "pretrain/main.py",
          "model.name=vit_pico_patch4_16", "model.img_size=16", "train.global_batch=32", "data.num_workers=0",
          "train.steps=6", "log.checkpoint_every=2", "log.log_every=1", "log.image_every=0",
          f"run.output_dir={runs}"] + ([f"train.mixed_precision={precision}"] if precision != "no" else [])
tolerance = 1e-2 if precision == "bf16" else 1e-6  # bf16 GPU kernels need not be bitwise deterministic


def must(ok, what):
    print(("ok: " if ok else "FAILED: ") + what, flush=True)
    if not ok:
        sys.exit(1)


def rows(name):
    return [json.loads(l) for l in (runs / name / "metrics.jsonl").read_text().splitlines() if l.strip()]


straight = subprocess.run(launch + ["run.name=straight"], capture_output=True, text=True)
print(straight.stdout[-1500:], straight.stderr[-3000:], flush=True)
must(straight.returncode == 0, "uninterrupted FSDP run")
must(any(l.startswith("FSDP2: ") for l in straight.stdout.splitlines()), "parameters are DTensors (the FSDP2 line)")
ckpt = runs / "straight" / "checkpoints" / "step-0000006"
names = sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").iterdir())
must(names == [".metadata"] + [f"__{r}_0.distcp" for r in range(int(procs))], f"sharded checkpoint layout {names}")
must(not (ckpt / "model.safetensors").exists(), "no full-model file in the checkpoint")

proc = subprocess.Popen(launch + ["run.name=killed", "debug.step_delay_s=1"], start_new_session=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
killed, deadline = runs / "killed", time.monotonic() + 120
while not ((killed / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
           and (killed / "metrics.jsonl").is_file() and len((killed / "metrics.jsonl").read_text().splitlines()) >= 3):
    if proc.poll() is not None or time.monotonic() > deadline:
        must(False, "the run to kill reaches step 3 after the checkpoint of step 2")
    time.sleep(0.1)
tree, frontier = [proc.pid], [proc.pid]  # the launcher, its agent and every rank (each in a session of its own)
while frontier:
    children = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True).stdout.split()
    tree += [int(c) for c in children]
    frontier += [int(c) for c in children]
for pid in tree:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
proc.wait()
resumed = subprocess.run(launch + ["run.name=killed", "--resume", "auto"], capture_output=True, text=True)
print(resumed.stdout[-1500:], resumed.stderr[-3000:], flush=True)
must(resumed.returncode == 0 and "resumed from" in resumed.stdout, "--resume auto after SIGKILL")
a, b = rows("straight"), rows("killed")
must([r["step"] for r in b] == list(range(1, 7)), "each step logged once")
diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
must(diff < tolerance, f"resumed losses match the uninterrupted run (max diff {diff:.3g})")

from safetensors.torch import load_file

wa, wb = (load_file(str(runs / name / "encoder.safetensors")) for name in ("straight", "killed"))
must(wa.keys() == wb.keys() and len(wa) > 0, f"one full encoder.safetensors ({len(wa)} tensors)")
wdiff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
must(wdiff < tolerance, f"exported encoders agree (max abs diff {wdiff:.3g})")
must((killed / "transformers" / "model.safetensors").is_file() and (killed / "README.md").is_file(),
     "transformers folder and model card written")
EOF
part "fsdp" "$T_FSDP" "$PY" "$WORK/fsdp_check.py" "$FSDP_PROCS" "$FSDP_PRECISION" "$WORK/fsdp-runs"
  log "finished in $(( $(date +%s) - STARTED )) s; failed parts: ${FAILED[*]:-none}"
  [ "${#FAILED[@]}" -eq 0 ]; exit
fi

# ---- 1. model rows (bf16; compiled and not on the GPU)
part "model rows" "$T_MODEL" "$PY" -m vitmpp.benchmarks "${DEVICE[@]}" --rows objectives,attention,peer,memory \
  --scratch "$WORK/bench" --out "$WORK/results-model.json"

# ---- 2. data rows and end to end
part "data rows" "$T_DATA" "$PY" -m vitmpp.benchmarks "${DEVICE[@]}" --rows loader,end_to_end \
  --scratch "$WORK/bench" --out "$WORK/results-data.json"

# JPEGs decoded on the device in one nvJPEG call per batch (decode_on="device") against the decode-only
# workers (decode_on="worker"), 224 px crops of 500 x 375 photo-like JPEGs: images/s delivered (an epoch
# after a warm-up one, workers kept) and the pixel difference on the same batches (same boxes and flips)
cat >"$WORK/gpu_decode.py" <<'EOF'
import sys, time
from pathlib import Path

import torch

from vitmpp.benchmarks.data import shards_from_folder, write_photo_folder
from vitmpp.datasets import LoaderSpec, open_loader, pretrain_transform, read_manifest
from vitmpp.datasets.loader import close_idle_workers

device, count, batch, workers, scratch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
photos = write_photo_folder(scratch / f"photos-500x375-{count}", count, (500, 375))  # the loader rows' own
shards = shards_from_folder(photos, scratch / f"photo-shards-{count}")
manifest, transform = read_manifest(shards), pretrain_transform(224)


def epochs(decode_on):
    spec = LoaderSpec(shards=str(shards), manifest=manifest, batch_size=batch, transform=transform, training=True,
                      num_workers=workers, shuffle_buffer=2 * batch, batches_per_epoch=count // batch,
                      augment_on="device", device=device, decode_on=decode_on)
    list(open_loader(spec, epoch=0))  # warm-up: worker start, CUDA and nvJPEG set-up
    start = time.perf_counter()
    batches = [(b.indices, b.images) for b in open_loader(spec, epoch=1)]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    close_idle_workers()
    print(f"decode on the {decode_on}: {len(batches) * batch / seconds:,.0f} images/s delivered "
          f"({len(batches)} batches of {batch}, {workers} workers, device {device})", flush=True)
    return batches


worker, on_device = epochs("worker"), epochs("device")
same = all(torch.equal(a[0], b[0]) for a, b in zip(worker, on_device))
difference = torch.cat([(a[1].float() - b[1].float()).abs().flatten() for a, b in zip(worker, on_device)])
print(f"same samples: {same}; pixel difference device vs worker decode: max {difference.max():.0f}, "
      f"mean {difference.mean():.3f}, share > 1 level {(difference > 1).float().mean():.2%}", flush=True)
sys.exit(0 if same and difference.mean() < 2 else 1)  # a wrong box or flip differs by tens of levels
EOF
part "gpu decode" "$T_DECODE" "$PY" "$WORK/gpu_decode.py" "${DECODE[@]}" "$WORKERS" "$WORK/bench"

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
    ips = statistics.median(r["system/pretrain/images_per_sec"] for r in steady)
    wait = statistics.median(r["system/pretrain/data_wait_fraction"] for r in steady)
    mfu = [r["system/pretrain/mfu"] for r in steady if "system/pretrain/mfu" in r]
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
