#!/usr/bin/env bash
# Run 18: the latent space of run 16 (every latent frame carries the object's colour) with a decoder trained as a
# stream decodes, and causal fine-tunes from run 13 on that latent space, all in one call on one GPU.
# 1. demo-causal's VAE, encoder and decoder, with the fresh-tail loss (training.decoder --encoder --tail-weight).
# 2. Side by side: the decoder alone trained block by block on 321-frame clips (--stream-frames: the steady state
#    past the first frame's reach, where run 16's decoder still flipped colours), and four causal fine-tunes from
#    run 13 on the new latents (they need only the encoder, which step 2 leaves as it is).
# The choice is made afterwards on training combinations (select_causal.py); held-out prompts are scored once.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
mkdir -p /tmp/v18 && cp -r engine/weights/demo-causal /tmp/v18/demo-causal
timeout -s INT 250 python -m training.decoder --model /tmp/v18/demo-causal --frames 33 --batch 32 --minutes 2.8 \
  --encoder --tail-weight 1 --val-clips 16 --check-frames 161 --force --report $OUT/vae18.json 2>&1 | grep -v Warn
cp -r /tmp/v18/demo-causal /tmp/v18/stream
decoder() {
  timeout -s INT 310 python -m training.decoder --model /tmp/v18/stream --frames 33 --stream-frames 321 --batch 16 \
    --minutes 4.1 --lr 1e-4 --val-clips 8 --check-frames 321 --force --report $OUT/vae18s.json > /tmp/d18.log 2>&1
  echo "decoder exit $?"; grep -v Warn /tmp/d18.log | tail -8
  tar czf $OUT/vae18s.tgz -C /tmp/v18/stream vae
  tar czf $OUT/vae18.tgz -C /tmp/v18/demo-causal vae
}
run() {
  name=$1; shift
  timeout -s INT 320 python -m training.train --out /tmp/$name --init-from engine/weights/demo \
    --init-from /tmp/v18/demo-causal --phases causal --phase-minutes 0,0,3.9 --budget-minutes 5.2 \
    --reserve-seconds 40 --seed 18 --set causal_max_blocks=16 --set sweep=false --set eval_backgrounds=0 \
    --set stream_check_seconds=0 "$@" > /tmp/$name.log 2>&1
  echo "$name exit $?"
  grep -v DEBUG /tmp/$name.log > /tmp/$name/train.log
  tar czf $OUT/$name.tgz -C /tmp/$name export/demo-causal/transformer export/demo-causal/text_encoder \
    losses.json train.log
}
decoder &
run r18a --set causal_lr=3e-4 &
run r18b --set causal_lr=3e-4 --set latent_object_weight=10 &
run r18c --set causal_lr=3e-4 --set latent_object_weight=10 --set focus_share=0.3 \
  --set 'focus_colours=["red","green","orange","blue","purple"]' &
run r18d --set causal_lr=4e-4 --set latent_object_weight=4 &
wait
grep -h "validation\|exit" /tmp/r18?.log | grep -v DEBUG | tail -30
