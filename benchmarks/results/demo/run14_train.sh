#!/usr/bin/env bash
# Three causal fine-tunes from the shipped demo-causal (run 13), side by side on one GPU (each is launch-bound).
run() {
  name=$1; shift
  timeout -s INT 575 python -m training.train --out /tmp/$name --init-from engine/weights/demo \
    --init-from engine/weights/demo-causal --phases causal --phase-minutes 0,0,7.6 --budget-minutes 9.0 \
    --reserve-seconds 60 --seed 14 --set causal_max_blocks=16 --set sweep=false "$@" > /tmp/$name.log 2>&1
  echo "$name exit $?"
  grep -v DEBUG /tmp/$name.log > /tmp/$name/train.log
  tar czf $OUT/$name.tgz -C /tmp/$name export/demo-causal/transformer export/demo-causal/text_encoder \
    export/demo-causal/sana_video.json losses.json final_eval.json train.log
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run r14a --set causal_lr=1e-4 --set focus_share=0.5 &
run r14b --set causal_lr=1.5e-4 --set focus_share=0.3 --set 'focus_colours=["red","green","orange","blue","purple"]' &
run r14c --set causal_lr=1e-4 &
wait
grep -h "causal: step\|val\|held-out\|stream" /tmp/r14?.log | grep -v DEBUG | tail -60
