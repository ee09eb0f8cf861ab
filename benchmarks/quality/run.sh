#!/usr/bin/env bash
# Issue 4 quality table (docs/BENCHMARKS.md, "Quality"): build + index the target memory with the
# bundled model, let `knnmt tune` choose the setting on target dev (with the 1,000-sentence general dev
# as the out-of-domain guard, which also places the domain gate), then decode the test sets once with
# the plain model and once with that setting, greedy and beam 4, and score every domain-gate rule on
# them. Run from the repository root after scripts/setup.sh and scripts/make_corpora.py (general
# corpus). Writes runs/quality/; `cp runs/quality/ds/knn.json data/target/knn.json` ships the choice.
set -euo pipefail
cd "$(dirname "$0")/../.."
Q=runs/quality
mkdir -p $Q
for s in target/dev target/test general/dev general/test; do
  n=$(echo $s | tr / -); cut -f1 data/$s.tsv > $Q/$n.en; cut -f2 data/$s.tsv > $Q/$n.de
done
K=.venv/bin/knnmt
M=models/opus-knnmt-en-de-small
DS=$Q/ds
date
[ -f $DS/index/index.json ] || { $K -q build --model $M --corpus data/target/train.tsv --out $DS --force && $K -q index $DS; }
[ -d $DS/subset/dense ] || $K -q index $DS --subset --sentence-search dense   # what the domain gate reads
date
$K tune --model $M --datastore $DS --source $Q/target-dev.en --reference $Q/target-dev.de \
  --ood-source $Q/general-dev.en --ood-reference $Q/general-dev.de --confirm 4 --max-new-tokens 128 \
  > $Q/tune.txt 2> $Q/tune.log
cat $Q/tune.txt
date
# the test sets, after the choice: plain and kNN-MT decoded once per beam size, every gate rule scored
for beam in 1 4; do
  .venv/bin/python benchmarks/quality/domain_recall.py $DS test --beam $beam --config $DS/knn.json \
    | tee $Q/domain-test-beam$beam.txt
  date
done
