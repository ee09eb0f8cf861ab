"""How the domain gate's in-domain recall trades in-domain gain against out-of-domain loss.

    python benchmarks/quality/domain_recall.py DATASTORE dev|test [--beam 4]

Decodes each set (target and general, dev or test) once with the plain model and once with kNN-MT
without a domain gate (the shipped ``data/target/knn.json`` otherwise), then, for each recall, sets
the gate from the *target dev* sources (:func:`knnmt.domain_gate.threshold_for_recall`) and scores
the per-sentence mix (kNN-MT output where the similarity passes, plain output elsewhere). The mix is
exactly what decoding with the gate gives, because a sentence's translation does not depend on the
rest of its batch (the batch-1-equals-batch-N oracle test). DATASTORE needs its dense sentence index
(``knnmt index DATASTORE --subset --sentence-search dense``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sweep import ROOT, arguments, pairs  # the same directory: python benchmarks/quality/...

from knnmt.config import KNNConfig
from knnmt.domain_gate import threshold_for_recall
from knnmt.evaluation import score
from knnmt.translator import KNNMT

RECALLS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)


def main() -> None:
    args = arguments(__doc__).parse_args()
    knn = KNNMT.load(str(ROOT / "models" / "opus-knnmt-en-de-small"), args.datastore)
    config = dataclasses.replace(KNNConfig.load(ROOT / "data" / "target" / "knn.json"), domain_gate=None)
    gen = {"num_beams": args.beam, "max_new_tokens": 128, "batch_size": 32}
    in_domain = knn.source_similarity(pairs("target/dev.tsv")[0])
    decoded = {}
    for corpus in ("target", "general"):
        sources, references = pairs(f"{corpus}/{args.split}.tsv")
        plain = [t.text for t in knn.translate(sources, knn=False, **gen)]
        retrieved = [t.text for t in knn.translate(sources, knn=config, **gen)]
        decoded[corpus] = (references, plain, retrieved, knn.source_similarity(sources))
    print(f"| recall | threshold | target {args.split} | general {args.split} (plain-only) |")
    print("|---:|---:|---:|---:|")
    for recall in RECALLS:
        threshold = threshold_for_recall(in_domain, recall)
        cells = []
        for corpus, (references, plain, retrieved, similarity) in decoded.items():
            on = similarity >= threshold
            mixed = [r if o else p for r, p, o in zip(retrieved, plain, on, strict=True)]
            gain = score(mixed, references).bleu - score(plain, references).bleu
            cells.append(f"{gain:+.2f}" + (f" ({np.mean(~on):.0%})" if corpus == "general" else ""))
        print(f"| {recall:.2f} | {threshold:.4f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
