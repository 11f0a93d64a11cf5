#!/usr/bin/env bash
# Run 20: the choice among run 19's causal models (each with run 18's stream-trained VAE, .run/s20) and the shipped
# demo-causal, on training combinations only (select_causal.py, fp32 on the GPU, all candidates in this one run).
# Then the held-out prompts score the chosen one once, as a preview (the recorded figures are the CPU's).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
args=(shipped=engine/weights/demo-causal)
for r in a b c d; do
  F=/tmp/cand/r19$r; mkdir -p $F; cp -r engine/weights/demo-causal/. $F/; rm -rf $F/vae $F/transformer $F/text_encoder
  cp -r .run/s20/vae .run/s20/r19$r/transformer .run/s20/r19$r/text_encoder $F/
  args+=(r19$r=$F)
done
timeout 420 python benchmarks/results/demo/select_causal.py $OUT/select20.json "${args[@]}" --device cuda 2>&1 | grep -v Warn
chosen=$(python -c "import json; print(json.load(open('$OUT/select20.json'))['chosen'])")
echo "chosen $chosen"
F=/tmp/cand/$chosen; [ "$chosen" = shipped ] && F=engine/weights/demo-causal
timeout 150 python -m training.evaluate --model $F --device cuda --dtype fp32 --seeds 2 --batch 24 --stream-seconds 60 \
  --out $OUT/heldout20_gpu.json 2>&1 | grep -v Warn | tail -5
