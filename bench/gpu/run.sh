#!/usr/bin/env bash
# The GPU run (issue 13), for a lent device machine with no package index: ≤ 6 minutes.
#   run with the kit beside the repo copy:  bash bench/gpu/run.sh dist/gpu-kit-cp312.tar.xz
# 1. installs the offline kit (scripts/build_gpu_kit.py) into a venv that sees the image's torch;
# 2. trains gpt2-124m through Ray Train on 1 GPU (NCCL, bf16) with ZeRO-2 and ZeRO-3 on the real
#    loop, 30 steps each, and exports the ZeRO-2 run;
# 3. serves it (`modelfleet serve`, replica num_gpus 1) and checks /v1/models says cuda and
#    /v1/completions answers;
# 4. runs bench/gpu_mfu.py (engine-only MFU) on the same GPU;
# 5. runs bench/paged_engine.py --quick on the GPU (the paged serving engine's figures).
# Everything it measures goes to $OUT (or bench/results/gpu-run) for docs/benchmarks.md.
set -euo pipefail
KIT=${1:?usage: run.sh GPU_KIT.tar.xz}
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
W=$(mktemp -d -t mf-gpu-XXXXXX)
exec > >(tee "$OUT/run.log") 2>&1
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
tar -xJf "$KIT" -C "$W"
(cd "$W/gpu-kit" && sha256sum --check --strict --quiet SHA256SUMS)   # every wheel as built
python3 -m venv --system-site-packages "$W/venv"   # the image's torch and packages, plus the kit
PIP_CONFIG_FILE=/dev/null "$W/venv/bin/python" -m pip install -q --no-index --find-links "$W/gpu-kit" modelfleet
export PATH="$W/venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0
unset DS_ACCELERATOR
S="$W/storage"
COMMON=(--preset gpt2-124m --set storage.path="$S" --set train.num_workers=1 --set train.max_steps=30
        --set train.eval_every=30 --set train.checkpoint_every=30 --set train.log_every=10)
t0=$(date +%s)
modelfleet prepare --preset gpt2-124m --set storage.path="$S"
for stage in 2 3; do
  modelfleet train "${COMMON[@]}" --set deepspeed.zero_stage=$stage --set storage.run_name=z$stage \
    $( [ $stage = 3 ] && echo --no-export ) | tee "$OUT/train-z$stage.log"
done
echo "train: $(( $(date +%s) - t0 )) s"
cat > "$W/serve.yaml" <<YAML
preset: gpt2-124m
storage: {path: $S}
serve:
  models:
    - {name: gpt2, artifact: gpt2-124m, ray_actor_options: {num_cpus: 1, num_gpus: 1}}
YAML
modelfleet serve "$W/serve.yaml" > "$OUT/serve.log" 2>&1 &   # owns a local cluster until killed
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null || true' EXIT
python3 - "$OUT" <<'PY'
import json, sys, time, urllib.request
out = sys.argv[1]
for _ in range(180):
    try:
        models = json.load(urllib.request.urlopen("http://127.0.0.1:8000/v1/models", timeout=5))
        break
    except Exception:
        time.sleep(1)
req = urllib.request.Request("http://127.0.0.1:8000/v1/completions", method="POST",
                             data=json.dumps({"prompt": "def main(", "max_tokens": 32}).encode(),
                             headers={"content-type": "application/json"})
t = time.perf_counter(); r = json.load(urllib.request.urlopen(req, timeout=60)); dt = time.perf_counter() - t
# The paged engine's prefix cache on the GPU: the same 60-token prompt twice, the second cached.
long = urllib.request.Request("http://127.0.0.1:8000/v1/completions", method="POST",
                              data=json.dumps({"prompt": "# gpu prefix probe\n" + "def main(x):\n" * 3,
                                               "max_tokens": 8, "temperature": 0}).encode(),
                              headers={"content-type": "application/json"})
cold, warm = (json.load(urllib.request.urlopen(long, timeout=60)) for _ in range(2))
cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
json.dump({"models": models, "completion": r, "seconds": dt, "prefix": [cold, warm]}, open(f"{out}/serve.json", "w"), indent=1)
print("serve: prefix cache", cached, "of", warm["usage"]["prompt_tokens"], "prompt tokens cached on the repeat")
assert cached >= 16 and warm["choices"][0]["text"] == cold["choices"][0]["text"], (cold, warm)
print("serve:", models["data"][0]["device"], models["data"][0]["dtype"], f"{dt * 1000:.0f} ms", repr(r["choices"][0]["text"][:60]))
assert models["data"][0]["device"].startswith("cuda"), models
PY
kill $SERVE_PID; wait $SERVE_PID || true
python3 bench/gpu_mfu.py --presets gpt2-124m --stages 2 3 --steps 10 --out "$OUT/gpu_mfu.json"
# The paged engine on the GPU (same code as on CPU): decode step, prefix hit, KV use, HF batched.
python3 bench/paged_engine.py --quick --device cuda && cp bench/results/paged_engine.json "$OUT/paged_engine_gpu.json"
echo "done in $(( $(date +%s) - t0 )) s"
