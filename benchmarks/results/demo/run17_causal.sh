#!/usr/bin/env bash
# Run 17: runs 16b and 16c trained on (their validation loss was still falling), on run 16's VAE; the folders
# .run/c17/r16b and .run/c17/r16c are the shipped demo-causal with run 16's VAE and each run's transformer and text
# encoder. Side by side on one GPU; the choice is made on training combinations (select_causal.py).
run() {
  name=$1; from=$2; shift 2
  timeout -s INT 470 python -m training.train --out /tmp/$name --init-from engine/weights/demo \
    --init-from $from --phases causal --phase-minutes 0,0,6.3 --budget-minutes 7.6 \
    --reserve-seconds 40 --seed 17 --set causal_max_blocks=16 --set sweep=false --set eval_backgrounds=0 \
    --set stream_check_seconds=0 "$@" > /tmp/$name.log 2>&1
  echo "$name exit $?"
  grep -v DEBUG /tmp/$name.log > /tmp/$name/train.log
  tar czf $OUT/$name.tgz -C /tmp/$name export/demo-causal/transformer export/demo-causal/text_encoder \
    losses.json train.log
}
run r17a .run/c17/r16b --set causal_lr=2e-4 &
run r17b .run/c17/r16c --set causal_lr=2e-4 --set latent_object_weight=10 &
run r17c .run/c17/r16b --set causal_lr=1e-4 &
wait
grep -h "validation\|exit" /tmp/r17?.log | grep -v DEBUG | tail -45
