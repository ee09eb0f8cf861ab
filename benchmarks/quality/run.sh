#!/usr/bin/env bash
# Issue 4 quality table: build + index the target memory with the bundled model, tune on target dev
# (with the 1,000-sentence general dev as the out-of-domain guard), decode the candidate settings on
# the dev sets, then evaluate on target and general test. Run from the repository root after
# scripts/setup.sh and scripts/make_corpora.py (general corpus). Writes runs/quality/.
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
  --ood-source $Q/general-dev.en --ood-reference $Q/general-dev.de --confirm 4 --max-new-tokens 128 --no-save \
  > $Q/tune.txt 2> $Q/tune.log
cat $Q/tune.txt
date
.venv/bin/python benchmarks/quality/sweep.py $DS dev --beam 1 --configs h5-l95,shipped,tuned,tuned-domain | tee $Q/sweep-dev.txt
.venv/bin/python benchmarks/quality/sweep.py $DS test --beam 1 --configs h5-l95,shipped,tuned,tuned-domain | tee $Q/sweep-test-beam1.txt
.venv/bin/python benchmarks/quality/sweep.py $DS test --beam 4 --configs tuned,tuned-domain,h5-l95,shipped \
  | tee $Q/sweep-test-beam4.txt
date
.venv/bin/python benchmarks/quality/domain_recall.py $DS dev --beam 4 | tee $Q/domain-recall-dev-beam4.txt
.venv/bin/python benchmarks/quality/domain_recall.py $DS test --beam 4 | tee $Q/domain-recall-test-beam4.txt
date
