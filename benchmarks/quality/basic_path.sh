#!/usr/bin/env bash
# Issue 16: the README's basic path, exactly as a user runs it, on one target domain of the bundled
# model: build, index, tune on the domain's dev set (no flags: the model directory ships its
# out-of-domain dev set, knnmt-ood-dev.tsv, which tune then uses), and evaluate on the domain's test
# set with the general test set as the out-of-domain set, then once more with the domain gate off
# (the gain the gate keeps a share of). With NO_OOD=1, tune runs with --no-ood
# (what a user of a model that ships no such set gets: the 90 % recall rule).
#
#   bash benchmarks/quality/basic_path.sh data/target runs/basic/target
#   bash benchmarks/quality/basic_path.sh data/manpages runs/basic/manpages
#
# Needs data/general/{dev,test}.tsv (python scripts/make_corpora.py --out data). Greedy; BEAM=4 for beam 4.
set -euo pipefail
cd "$(dirname "$0")/../.."
DOMAIN=${1:?domain directory with train/dev/test.tsv}
OUT=${2:?output directory}
BEAM=${BEAM:-1}
K=.venv/bin/knnmt
M=models/opus-knnmt-en-de-small
mkdir -p "$OUT"
for s in dev test; do cut -f1 "$DOMAIN/$s.tsv" > "$OUT/$s.en"; cut -f2 "$DOMAIN/$s.tsv" > "$OUT/$s.de"; done
cut -f1 data/general/test.tsv > "$OUT/general-test.en"; cut -f2 data/general/test.tsv > "$OUT/general-test.de"
DS=$OUT/ds
TUNE_FLAGS=()
[ "${NO_OOD:-0}" = 1 ] && TUNE_FLAGS=(--no-ood)
echo "== $(date -u +%FT%TZ) build"
[ -f "$DS/manifest.json" ] || /usr/bin/time -v $K -q build --model $M --corpus "$DOMAIN/train.tsv" --out "$DS" \
  > "$OUT/build.json" 2> "$OUT/build.time"
echo "== $(date -u +%FT%TZ) index"
[ -f "$DS/index/index.json" ] || /usr/bin/time -v $K -q index "$DS" > "$OUT/index.json" 2> "$OUT/index.time"
echo "== $(date -u +%FT%TZ) tune ${TUNE_FLAGS[*]:-}"
$K tune --model $M --datastore "$DS" --source "$OUT/dev.en" --reference "$OUT/dev.de" "${TUNE_FLAGS[@]}" \
  > "$OUT/tune.txt" 2> "$OUT/tune.log"
cat "$OUT/tune.txt"
echo "== $(date -u +%FT%TZ) evaluate (beam $BEAM)"
$K -q evaluate --model $M --datastore "$DS" --source "$OUT/test.en" --reference "$OUT/test.de" \
  --ood-source "$OUT/general-test.en" --ood-reference "$OUT/general-test.de" --beam "$BEAM" \
  --json "$OUT/evaluate-beam$BEAM.json" | tee "$OUT/evaluate-beam$BEAM.txt"
echo "== $(date -u +%FT%TZ) evaluate (beam $BEAM, domain gate off: the gain the gate keeps a share of)"
$K -q evaluate --model $M --datastore "$DS" --source "$OUT/test.en" --reference "$OUT/test.de" \
  --ood-source "$OUT/general-test.en" --ood-reference "$OUT/general-test.de" --beam "$BEAM" --domain-gate none \
  --json "$OUT/evaluate-beam$BEAM-nogate.json" | tee "$OUT/evaluate-beam$BEAM-nogate.txt"
echo "== $(date -u +%FT%TZ) done"
