#!/usr/bin/env bash
# Run 19: runs 18a-18d trained on, on run 18's latent space (their validation loss was still falling). The folders
# are the shipped demo-causal with run 18's encoder-tuned VAE (.run/g19/base) and each run's transformer and text
# encoder (.run/g19/r18?). Side by side on one GPU; the choice is made on training combinations (select_causal.py).
set -u
for r in a b c d; do cp -r .run/g19/base /tmp/c19_r18$r && cp -r .run/g19/r18$r/* /tmp/c19_r18$r/; done
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
run() {
  name=$1; from=$2; shift 2
  timeout -s INT 555 python -m training.train --out /tmp/$name --init-from engine/weights/demo \
    --init-from $from --phases causal --phase-minutes 0,0,7.5 --budget-minutes 8.9 \
    --reserve-seconds 45 --seed 19 --set causal_max_blocks=16 --set sweep=false --set eval_backgrounds=0 \
    --set stream_check_seconds=0 "$@" > /tmp/$name.log 2>&1
  echo "$name exit $?"
  grep -v DEBUG /tmp/$name.log > /tmp/$name/train.log
  tar czf $OUT/$name.tgz -C /tmp/$name export/demo-causal/transformer export/demo-causal/text_encoder \
    losses.json train.log
}
run r19a /tmp/c19_r18a --set causal_lr=2e-4 &
run r19b /tmp/c19_r18b --set causal_lr=2e-4 --set latent_object_weight=10 &
run r19c /tmp/c19_r18c --set causal_lr=2e-4 --set latent_object_weight=10 --set focus_share=0.3 \
  --set 'focus_colours=["red","green","orange","blue","purple"]' &
run r19d /tmp/c19_r18d --set causal_lr=2.5e-4 --set latent_object_weight=4 &
wait
grep -h "validation\|exit" /tmp/r19?.log | grep -v DEBUG | tail -24
