"""Speed, measured side by side (`vitmpp.benchmarks`; issue 7).

    python -m vitmpp.benchmarks [--device cpu|cuda] [--quick] [--out PATH] [--rows ...]
    bash benchmarks/gpu_check.sh [--cpu-smoke]

Modules, one per group of rows (docs/benchmarks.md has the tables):

* `objectives`: step throughput of mae / mpp / supervised on one encoder, FLOPs per
  image, MFU on GPU, MAE/supervised speed ratio against the FLOP ratio; which
  attention kernel each objective runs and fused vs unfused speed;
* `peer`: our MAE step against `transformers.ViTMAEForPreTraining`, alternating A/B;
* `memory`: activation bytes per image, largest batch on an 80 GB GPU, activation
  checkpointing's memory and speed;
* `loader`: shard loader vs torchvision ImageFolder on the same JPEGs, decode+crop
  per core, worker scaling, measured levers;
* `pretrain_runs`: the real pretraining stage (what `pretrain/main.py` runs) on shards vs in-memory batches, and
  1 vs 2 processes (through `run_pretrain`, a child that records the engine's own
  throughput);
* `syncs`: host-device synchronisations in the training loop, on any device;
* `harness`, `steps`, `data`: settings, interleaved timing, the training step, and the
  images the rows generate (nothing is downloaded).
"""
