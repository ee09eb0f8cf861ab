"""Quality and speed: sacreBLEU BLEU/chrF (with signatures) and target tokens/s, plain vs kNN-MT."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sacrebleu.metrics import BLEU, CHRF

from ..core.config import KNNConfig
from ..core.errors import UsageError
from .translator import KNNMT, Translation, target_tokens, timed_translate, tokens_per_second


@dataclasses.dataclass(frozen=True)
class SystemScore:
    """One system's scores on one test set."""

    name: str
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    tokens_per_second: float
    seconds: float
    sentences: int
    #: kNN-MT: distinct queries searched per target token produced (0 for the plain model; below 1
    #: where the confidence gate skips steps, above 1 with beams; the end-of-sentence step is searched
    #: too, so greedy decoding without a gate is slightly above 1)
    searched_per_token: float = 0.0
    #: kNN-MT: share of the sentences the domain gate left to the plain model (0 without a gate)
    sentences_off: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def score(
    hypotheses: Sequence[str],
    references: Sequence[str],
    name: str = "system",
    seconds: float = 0.0,
    tokens_per_s: float = float("nan"),
) -> SystemScore:
    """Corpus BLEU and chrF of ``hypotheses`` against one reference each."""
    if len(hypotheses) != len(references):
        raise UsageError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return SystemScore(
        name,
        round(b.score, 2),
        round(c.score, 2),
        str(bleu.get_signature()),
        str(chrf.get_signature()),
        tokens_per_s,
        seconds,
        len(hypotheses),
    )


def evaluate(
    knn: KNNMT,
    sources: Sequence[str],
    references: Sequence[str],
    *,
    configs: dict[str, KNNConfig | None] | None = None,
    batch_size: int = 32,
    progress: bool = False,
    **generate_kwargs: Any,
) -> tuple[list[SystemScore], dict[str, list[Translation]]]:
    """Translate ``sources`` with each named system (``None`` = plain model) and score against ``references``.

    Returns:
        scores in the order of ``configs`` (default: plain model, then kNN-MT with ``knn.config``) and the
        translations of each system.
    """
    if len(sources) != len(references):
        raise UsageError(f"{len(sources)} source sentences but {len(references)} references")
    if not sources:
        raise UsageError("nothing to evaluate: the test set has no sentences")
    configs = configs if configs is not None else {"base": None, "knn-mt": knn.config}
    scores: list[SystemScore] = []
    outputs: dict[str, list[Translation]] = {}
    for name, config in configs.items():
        translations, seconds = timed_translate(
            knn,
            sources,
            knn=config if config is not None else False,
            batch_size=batch_size,
            progress=progress,
            **generate_kwargs,
        )
        outputs[name] = translations
        result = score(
            [t.text for t in translations],
            references,
            name,
            seconds,
            tokens_per_second(translations, seconds, knn.tokenizer),
        )
        if config is not None:
            searched = knn.last_stats.get("searched", 0) / max(1, target_tokens(translations, knn.tokenizer))
            off = knn.last_stats.get("sentences_off", 0) / max(1, len(sources))
            result = dataclasses.replace(
                result, searched_per_token=round(searched, 3), sentences_off=round(off, 3)
            )
        scores.append(result)
    return scores, outputs


def format_table(scores: Sequence[SystemScore]) -> str:
    """A plain-text table of scores followed by the sacreBLEU signatures."""
    gate = any(s.sentences_off > 0 for s in scores)  # the domain-gate column only when it acted
    header = f"{'system':<14}{'BLEU':>8}{'chrF':>8}{'tok/s':>10}{'seconds':>10}{'searched/tok':>14}" + (
        f"{'plain-only':>12}" if gate else ""
    )
    lines = [header, "-" * len(header)]
    for s in scores:
        lines.append(
            f"{s.name:<14}{s.bleu:>8.2f}{s.chrf:>8.2f}{s.tokens_per_second:>10.1f}{s.seconds:>10.2f}"
            f"{s.searched_per_token:>14.2f}" + (f"{s.sentences_off:>12.0%}" if gate else "")
        )
    if scores:
        lines += [
            "",
            f"BLEU signature: {scores[0].bleu_signature}",
            f"chrF signature: {scores[0].chrf_signature}",
        ]
    return "\n".join(lines)


def format_domain_table(in_domain: Sequence[SystemScore], out_of_domain: Sequence[SystemScore]) -> str:
    """One table of the same systems on an in-domain and an out-of-domain test set: each system's BLEU
    and chrF on both, with its change from the first system (the plain model), then one line that says
    the in-domain gain and the out-of-domain cost of every other system."""
    if [s.name for s in in_domain] != [s.name for s in out_of_domain]:
        raise UsageError("the in- and out-of-domain scores must list the same systems in the same order")
    if not in_domain:
        return ""
    base_in, base_out = in_domain[0], out_of_domain[0]
    header = (
        f"{'system':<14}{'in-domain BLEU':>22}{'chrF':>8}{'out-of-domain BLEU':>24}{'chrF':>8}"
        f"{'tok/s':>10}{'plain-only (in/out)':>21}"
    )
    lines = [header, "-" * len(header)]
    for i, (a, b) in enumerate(zip(in_domain, out_of_domain, strict=True)):
        delta_in = f"({a.bleu - base_in.bleu:+.2f})" if i else ""
        delta_out = f"({b.bleu - base_out.bleu:+.2f})" if i else ""
        off = f"{a.sentences_off:.0%} / {b.sentences_off:.0%}" if i else ""
        lines.append(
            f"{a.name:<14}{a.bleu:>13.2f} {delta_in:>8}{a.chrf:>8.2f}{b.bleu:>15.2f} {delta_out:>8}"
            f"{b.chrf:>8.2f}{a.tokens_per_second:>10.1f}{off:>21}"
        )
    lines.append("")
    for a, b in zip(in_domain[1:], out_of_domain[1:], strict=True):
        gate = f" (the domain gate left {b.sentences_off:.0%} of it to the plain model)"
        lines.append(
            f"{a.name}: in-domain gain {a.bleu - base_in.bleu:+.2f} BLEU, out-of-domain cost "
            f"{b.bleu - base_out.bleu:+.2f} BLEU" + (gate if b.sentences_off else "")
        )
    lines += [
        "",
        f"BLEU signature: {in_domain[0].bleu_signature}",
        f"chrF signature: {in_domain[0].chrf_signature}",
    ]
    return "\n".join(lines)
