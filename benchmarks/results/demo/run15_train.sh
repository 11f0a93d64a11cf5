#!/usr/bin/env bash
# Run 15: four causal fine-tunes from the shipped demo-causal (run 13) with the object-weighted latent loss
# (latent_object_weight), side by side on one GPU (each process is launch-bound). The end of each run scores two
# held-out prompts only (eval_backgrounds=0, no stream check): the choice among them is made on training combinations
# (select_causal.py), and the held-out prompts are scored once, for the chosen one.
run() {
  name=$1; shift
  timeout -s INT 555 python -m training.train --out /tmp/$name --init-from engine/weights/demo \
    --init-from engine/weights/demo-causal --phases causal --phase-minutes 0,0,7.4 --budget-minutes 8.9 \
    --reserve-seconds 50 --seed 15 --set causal_max_blocks=16 --set sweep=false --set eval_backgrounds=0 \
    --set stream_check_seconds=0 "$@" > /tmp/$name.log 2>&1
  echo "$name exit $?"
  grep -v DEBUG /tmp/$name.log > /tmp/$name/train.log
  tar czf $OUT/$name.tgz -C /tmp/$name export/demo-causal/transformer export/demo-causal/text_encoder \
    losses.json train.log
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
run r15a --set causal_lr=1.5e-4 --set latent_object_weight=4 &
run r15b --set causal_lr=1.5e-4 --set latent_object_weight=10 &
run r15c --set causal_lr=1.5e-4 --set latent_object_weight=10 --set focus_share=0.3 \
  --set 'focus_colours=["red","green","orange","blue","purple"]' &
run r15d --set causal_lr=2e-4 --set latent_object_weight=20 &
wait
grep -h "causal step\|validation\|exit" /tmp/r15?.log | grep -v DEBUG | tail -40
