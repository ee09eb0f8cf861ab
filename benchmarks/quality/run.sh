#!/usr/bin/env bash
# Issue 4 quality table: build + index the target memory with the bundled model, tune on target dev
# (with general dev as the out-of-domain guard), evaluate on target and general test.
# Run from the repository root after scripts/setup.sh and scripts/make_corpora.py (general corpus).
# Writes runs/quality/. Then `python benchmarks/quality/sweep.py dev|test` decodes the candidate settings.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p runs/quality
for s in target/dev target/test general/test; do
  n=$(echo $s | tr / -); cut -f1 data/$s.tsv > runs/quality/$n.en; cut -f2 data/$s.tsv > runs/quality/$n.de
done
head -500 data/general/dev.tsv | cut -f1 > runs/quality/general-dev500.en
head -500 data/general/dev.tsv | cut -f2 > runs/quality/general-dev500.de
K=.venv/bin/knnmt
M=models/opus-knnmt-en-de-small
DS=runs/quality/ds
Q=runs/quality
date
[ -f $DS/index/index.json ] || { $K -q build --model $M --corpus data/target/train.tsv --out $DS --force && $K -q index $DS; }
date
$K tune --model $M --datastore $DS --source $Q/target-dev.en --reference $Q/target-dev.de \
  --ood-source $Q/general-dev500.en --ood-reference $Q/general-dev500.de --max-new-tokens 128 > $Q/tune.txt 2> $Q/tune.log
cat $Q/tune.txt
date
for beam in 1 4; do
  $K -q evaluate --model $M --datastore $DS --source $Q/target-test.en --reference $Q/target-test.de --beam $beam --max-new-tokens 128 --json $Q/target-beam$beam.json --output-dir $Q/out-target-beam$beam > $Q/target-beam$beam.txt
  cat $Q/target-beam$beam.txt; date
  $K -q evaluate --model $M --datastore $DS --source $Q/general-test.en --reference $Q/general-test.de --beam $beam --max-new-tokens 128 --json $Q/general-beam$beam.json --output-dir $Q/out-general-beam$beam > $Q/general-beam$beam.txt
  cat $Q/general-beam$beam.txt; date
done
