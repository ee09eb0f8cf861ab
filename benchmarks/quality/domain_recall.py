"""How the domain gate's in-domain recall trades in-domain gain against out-of-domain loss.

    python benchmarks/quality/domain_recall.py DATASTORE dev|test [--beam 4]

Decodes each set (target and general, dev or test) once with the plain model and once with kNN-MT
(``--config``, default the shipped ``data/target/knn.json``, without its domain gate), then, for each
recall, sets the gate from the *target dev* sources
(:func:`knnmt.pipeline.domain_gate.threshold_for_recall`), and for "separate" at the best split of
target dev from general dev sources (:func:`knnmt.pipeline.domain_gate.threshold_separating`, what
``knnmt tune --domain-recall auto`` picks with an out-of-domain dev set), and scores the per-sentence
mix (kNN-MT output where the similarity passes, plain output elsewhere). The mix is
exactly what decoding with the gate gives, because a sentence's translation does not depend on the
rest of its batch (the batch-1-equals-batch-N oracle test). DATASTORE needs its dense sentence index
(``knnmt index DATASTORE --subset --sentence-search dense``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sweep import ROOT, arguments, pairs  # the same directory: python benchmarks/quality/...

from knnmt.core.config import KNNConfig
from knnmt.pipeline.domain_gate import threshold_for_recall, threshold_separating
from knnmt.pipeline.evaluation import score
from knnmt.pipeline.translator import KNNMT

RECALLS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--config", default=str(ROOT / "data" / "target" / "knn.json"),
                        help="the kNN-MT setting (its domain gate is replaced by each rule's)")
    args = parser.parse_args()
    knn = KNNMT.load(str(ROOT / "models" / "opus-knnmt-en-de-small"), args.datastore)
    config = dataclasses.replace(KNNConfig.load(args.config), domain_gate=None)
    print(f"setting: {config}", flush=True)
    gen = {"num_beams": args.beam, "max_new_tokens": 128, "batch_size": 32}
    in_domain = knn.source_similarity(pairs("target/dev.tsv")[0])
    out_of_domain = knn.source_similarity(pairs("general/dev.tsv")[0])
    decoded = {}
    for corpus in ("target", "general"):
        sources, references = pairs(f"{corpus}/{args.split}.tsv")
        plain = [t.text for t in knn.translate(sources, knn=False, **gen)]
        retrieved = [t.text for t in knn.translate(sources, knn=config, **gen)]
        decoded[corpus] = (references, plain, retrieved, knn.source_similarity(sources))
        print(f"{corpus} {args.split} beam {args.beam}: plain BLEU {score(plain, references).bleu:.2f}, "
              f"kNN-MT without the gate {score(retrieved, references).bleu:.2f}", flush=True)  # fmt: skip
    print(f"| gate | threshold | target dev kept | general dev kept | target {args.split} | "
          f"general {args.split} (plain-only) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    rules = [(f"recall {r:.2f}", threshold_for_recall(in_domain, r)) for r in RECALLS]
    separating = threshold_separating(in_domain, out_of_domain)
    if separating is not None:
        rules.append(("separate", separating))
    for name, threshold in sorted(rules, key=lambda rule: rule[1]):
        cells = []
        for corpus, (references, plain, retrieved, similarity) in decoded.items():
            on = similarity >= threshold
            mixed = [r if o else p for r, p, o in zip(retrieved, plain, on, strict=True)]
            bleu = score(mixed, references).bleu
            gain = bleu - score(plain, references).bleu
            off = f" ({np.mean(~on):.0%})" if corpus == "general" else ""
            cells.append(f"{bleu:.2f} ({gain:+.2f}){off}")
        kept_in, kept_out = np.mean(in_domain >= threshold), np.mean(out_of_domain >= threshold)
        print(f"| {name} | {threshold:.4f} | {kept_in:.0%} | {kept_out:.0%} | {cells[0]} | {cells[1]} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
