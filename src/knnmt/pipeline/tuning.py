"""``knnmt tune``: choose k, λ, τ (and the adaptive-λ half distance and confidence gate) on a dev set.

1. Teacher-force the dev pairs once: queries, ``log p_MT`` of every reference token and of the model's
   most likely token.
2. Retrieve the neighbours once, with the largest k of the grid.
3. Score the whole (k, τ, λ, half distance, gate) grid on token-level log-likelihood of the references,
   which needs no decoding: for the first ``k`` neighbours ``log p_kNN(y_t)`` is a log-sum-exp over
   those voting for ``y_t``, and ``log P(y_t) = logaddexp(log(1-λ) + log p_MT, log λ + log p_kNN)``
   (``log p_MT`` alone where the gate skips retrieval, or nothing was retrieved): the functions of
   :mod:`knnmt.knn.distribution` that generation uses, over all λ at once.
4. Confirm the best few settings by decoding the dev set (and the out-of-domain dev set, when given)
   and scoring BLEU; the best one that keeps the out-of-domain loss within bounds wins.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..core.config import KNNConfig
from ..core.errors import UsageError
from ..hf.teacher_forcing import encode_for_model, teacher_force
from ..knn.distribution import knn_log_prob, log_total, mix, mixture_log_weights, neighbour_logits
from .domain_gate import RECALL, SEPARATE, threshold_for_recall, threshold_separating
from .evaluation import score
from .translator import KNNMT

logger = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_TEMPERATURES: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(round(x, 2) for x in np.linspace(0.0, 1.0, 21))
#: confidence gates tried by default (``None``: retrieve at every step)
DEFAULT_GATES: tuple[float | None, ...] = (None, 0.5, 0.7, 0.8, 0.9, 0.95)
#: padded (source + target) tokens per teacher-forced batch of the dev set
TEACHER_FORCING_TOKENS = 4096


class ReferenceStats(NamedTuple):
    """What the grid needs of every reference token ``t`` of a dev set (``T`` tokens in all)."""

    #: ``[T]`` log-probability of the reference token under the model
    log_p_mt: np.ndarray
    #: ``[T, k_max]`` squared distances of the neighbours (``inf`` where missing)
    distances: np.ndarray
    #: ``[T, k_max]`` bool: the neighbour's value is the reference token
    match: np.ndarray
    #: ``[T]`` log-probability of the model's most likely token (what the confidence gate looks at)
    log_p_max: np.ndarray


@dataclasses.dataclass
class TuningResult:
    """The grid of mean token log-likelihoods and the decoded confirmation of the best settings."""

    ks: list[int]
    temperatures: list[float]
    lambdas: list[float]
    half_distances: list[float | None]
    gates: list[float | None]
    #: ``[len(ks), len(temperatures), len(lambdas), len(half_distances), len(gates)]`` mean
    #: log-likelihood per reference token.
    log_likelihood: np.ndarray
    tokens: int
    base_log_likelihood: float
    confirmed: list[dict[str, Any]]
    best: KNNConfig
    #: the same grid on the out-of-domain dev set, when one was given
    ood_log_likelihood: np.ndarray | None = None
    ood_base_log_likelihood: float | None = None
    #: BLEU of the plain model on the out-of-domain dev set, when one was given
    ood_base_bleu: float | None = None
    #: the share of dev sources the domain gate keeps (``None``: no domain gate)
    domain_recall: float | None = None
    #: how the domain gate's threshold was set: ``"recall"`` (a share of the in-domain dev sources) or
    #: ``"separate"`` (the best split of in-domain from out-of-domain dev sources)
    domain_rule: str | None = None
    #: the share of out-of-domain dev sources the domain gate keeps, when there are some
    ood_domain_kept: float | None = None
    #: dev sentence sides (in-domain and out-of-domain) longer than the model's maximum, truncated for
    #: the log-likelihood grid (the BLEU confirmation scores against the full references)
    truncated: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["log_likelihood"] = self.log_likelihood.round(5).tolist()
        if self.ood_log_likelihood is not None:
            data["ood_log_likelihood"] = self.ood_log_likelihood.round(5).tolist()
        data["best"] = self.best.to_dict()
        return data


def reference_statistics(
    knn: KNNMT,
    sources: Sequence[str],
    references: Sequence[str],
    k_max: int,
    max_tokens: int = TEACHER_FORCING_TOKENS,
    name: str = "dev",
) -> ReferenceStats:
    """Teacher-force ``references`` and retrieve ``k_max`` neighbours for every target position
    (all ``T`` target tokens of the dev set; see :class:`ReferenceStats`).

    Sides longer than the model's maximum are truncated to it (logged with their count; their tokens
    beyond it are not scored). ``name`` names the set in that warning.
    """
    return _reference_statistics(knn, sources, references, k_max, max_tokens, name)[0]


@torch.inference_mode()
def _reference_statistics(
    knn: KNNMT,
    sources: Sequence[str],
    references: Sequence[str],
    k_max: int,
    max_tokens: int = TEACHER_FORCING_TOKENS,
    name: str = "dev",
) -> tuple[ReferenceStats, int]:
    """:func:`reference_statistics` and how many sentence sides were truncated."""
    rows = [(i, i + 1, s, r) for i, (s, r) in enumerate(zip(sources, references, strict=True))]
    encoded, truncated = encode_for_model(
        knn.model, knn.tokenizer, rows, paths=name, source_prefix=knn.source_prefix
    )
    log_mt: list[np.ndarray] = []
    log_max: list[np.ndarray] = []
    dists: list[np.ndarray] = []
    matches: list[np.ndarray] = []
    forced_batches = teacher_force(
        knn.model,
        knn.tokenizer,
        encoded,
        key_layer=knn.key_layer,
        max_tokens=max_tokens,
        log_probs=True,
        prepare=knn.prepare_batch,  # sentence-dependent retrievers (Subset kNN-MT) select subsets first
    )
    for forced in forced_batches:
        assert forced.log_probs is not None
        q = torch.cat(forced.keys).float().numpy()
        distances, ids = knn.retriever.search(q, k_max, forced.groups)  # groups: the sentence of each query
        values = np.where(ids >= 0, knn.datastore.values[np.clip(ids, 0, None)], -1)
        gold = [torch.tensor(p.target_ids, dtype=torch.long) for p in forced.pairs]
        log_mt.append(
            torch.cat(
                [
                    lp.gather(1, g.unsqueeze(1)).squeeze(1)
                    for lp, g in zip(forced.log_probs, gold, strict=True)
                ]
            ).numpy()
        )
        log_max.append(torch.cat([lp.max(dim=-1).values for lp in forced.log_probs]).numpy())
        dists.append(np.where(ids >= 0, distances, np.inf).astype(np.float64))
        matches.append(values == torch.cat(gold).numpy()[:, None])
    stats = ReferenceStats(
        np.concatenate(log_mt), np.concatenate(dists), np.concatenate(matches), np.concatenate(log_max)
    )
    return stats, truncated


def grid_log_likelihood(
    log_p_mt: np.ndarray,
    distances: np.ndarray,
    match: np.ndarray,
    ks: Sequence[int],
    temperatures: Sequence[float],
    lambdas: Sequence[float],
    half_distances: Sequence[float | None] = (None,),
    gates: Sequence[float | None] = (None,),
    log_p_max: np.ndarray | None = None,
) -> np.ndarray:
    """Mean ``log P(y_t)`` of the references for every (k, τ, λ, half_distance, confidence gate).

    ``None`` in ``half_distances`` is the constant λ of the paper's formula, ``None`` in ``gates``
    retrieves at every step (see :class:`KNNConfig`). A gate ``g`` keeps ``log p_MT(y_t)`` at the
    tokens where ``log_p_max`` (``[T]``, the model's most likely token) is ``>= log g``.

    Returns:
        ``[len(ks), len(temperatures), len(lambdas), len(half_distances), len(gates)]``.
    """
    if any(g is not None for g in gates) and log_p_max is None:
        raise UsageError("confidence gates need log_p_max, the model's top log-probability per token")
    out = np.zeros((len(ks), len(temperatures), len(lambdas), len(half_distances), len(gates)))
    n = len(log_p_mt)
    # per gate: which tokens are still searched, and the plain model's share of the sum elsewhere
    kept = [np.ones(n, dtype=bool) if g is None else _gate_mask(g, np.asarray(log_p_max)) for g in gates]
    plain_sum = [float(log_p_mt[~keep].sum()) for keep in kept]
    # the formula of generation (knnmt.knn.distribution), in float64 and over all λ at once
    lam = torch.tensor(lambdas, dtype=torch.float64)  # [L]
    log_mt = torch.from_numpy(np.asarray(log_p_mt, dtype=np.float64))[:, None]  # [T, 1]
    dist = torch.from_numpy(np.asarray(distances, dtype=np.float64))
    valid = torch.isfinite(dist)  # missing neighbours have inf distances
    hits = torch.from_numpy(np.asarray(match, dtype=bool))
    for (i, k), (j, tau) in itertools.product(enumerate(ks), enumerate(temperatures)):
        logits = neighbour_logits(dist[:, :k], valid[:, :k], tau)  # [T, k]
        total = log_total(logits)[:, None]  # [T, 1] log S
        log_knn = knn_log_prob(logits, hits[:, :k])[:, None]  # [T, 1] log p_kNN(y_t)
        for h, half in enumerate(half_distances):
            log_w, log_1mw = mixture_log_weights(total, lam, tau, half)  # [T, L]
            mixed = mix(log_mt, log_knn, log_w, log_1mw).numpy()  # [T, L]
            for g, keep in enumerate(kept):
                out[i, j, :, h, g] = (mixed[keep].sum(axis=0) + plain_sum[g]) / n
    return out


def auto_half_distances(distances: np.ndarray) -> list[float | None]:
    """Candidate ``half_distance`` values from the data: ``None`` (constant λ) and the 10th, 25th,
    50th, 75th and 90th percentiles of the dev set's nearest-neighbour squared distance."""
    nearest = distances[:, 0][np.isfinite(distances[:, 0])]
    if not len(nearest):
        return [None]
    values = sorted({float(f"{v:.3g}") for v in np.percentile(nearest, [10, 25, 50, 75, 90])})
    return [None, *values]


def tune(
    knn: KNNMT,
    sources: Sequence[str],
    references: Sequence[str],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    half_distances: Sequence[float | None] | None = None,
    gates: Sequence[float | None] = DEFAULT_GATES,
    ood_sources: Sequence[str] = (),
    ood_references: Sequence[str] = (),
    confirm: int = 3,
    k_tolerance: float = 0.005,
    max_ood_loss: float = 0.5,
    domain_recall: float | None = None,
    separate_domains: bool = False,
    batch_size: int = 32,
    **generate_kwargs: Any,
) -> TuningResult:
    """Grid-search k, τ, λ, ``half_distance`` and ``confidence_gate`` on ``(sources, references)``;
    the best few settings by log-likelihood are decoded and the best by dev BLEU is returned (not saved).

    ``half_distances=None`` tries :func:`auto_half_distances`. With ``ood_sources``/``ood_references``
    (out-of-domain *dev* text, which retrieval should leave alone) the grid is ranked by the mean of
    the in-domain and the out-of-domain log-likelihood, every confirmed setting also decodes the
    out-of-domain dev set, and the winner is the best in-domain BLEU among the settings that lose at
    most ``max_ood_loss`` BLEU there against the plain model (the least loss if none does).
    Retrieval's cost grows with k, so only settings with k up to the smallest k whose best mean
    log-likelihood is within ``k_tolerance`` (nats per token) of the grid's best are confirmed
    (0 = always the most likely k). The ``confirm`` settings decoded are the best cells of distinct
    (half-distance, gate) pairs, so that the decoding sees really different settings.

    ``domain_recall`` (e.g. 0.9) adds a sentence-level domain gate (:mod:`knnmt.pipeline.domain_gate`;
    it reads the datastore's stored sentence vectors): its threshold keeps retrieval on for that share of
    the dev sources, and every confirmed setting is decoded with it. ``separate_domains`` sets the gate
    instead to the similarity that best separates the in-domain from the out-of-domain dev sources
    (:func:`~knnmt.pipeline.domain_gate.threshold_separating`; needs ``ood_sources``).
    """
    if not sources or len(sources) != len(references):
        raise UsageError(
            f"tuning needs aligned dev data: {len(sources)} sources, {len(references)} references"
        )
    if len(ood_sources) != len(ood_references):
        raise UsageError(
            "out-of-domain dev data is not aligned: "
            f"{len(ood_sources)} sources, {len(ood_references)} references"
        )
    if min(ks) < 1 or min(temperatures) <= 0 or not all(0 <= x <= 1 for x in lambdas):
        raise UsageError("ks must be >= 1, temperatures > 0 and lambdas in [0, 1]")
    if not all(g is None or 0 < g <= 1 for g in gates) or not gates:
        raise UsageError(f"confidence gates must be probabilities in (0, 1] or None, got {list(gates)}")
    if confirm < 1:
        raise UsageError(f"confirm must be >= 1, got {confirm}")
    if separate_domains and not ood_sources:
        raise UsageError("separating the domains needs out-of-domain dev sources")
    if separate_domains and domain_recall is not None:
        raise UsageError("give either domain_recall or separate_domains, not both")
    domain_gate: float | None = None
    domain_rule: str | None = None
    ood_kept: float | None = None
    if domain_recall is not None or separate_domains:
        similarity = knn.source_similarity(sources)
        ood_similarity = knn.source_similarity(ood_sources) if ood_sources else None
        if separate_domains:
            assert ood_similarity is not None
            domain_gate, domain_rule = threshold_separating(similarity, ood_similarity), SEPARATE
            if domain_gate is None:
                logger.warning(
                    "no domain gate: the similarity to the memory does not separate the dev sources from "
                    "the out-of-domain ones"
                )
                domain_rule = None
        else:
            assert domain_recall is not None
            domain_gate, domain_rule = threshold_for_recall(similarity, domain_recall), RECALL
        if domain_gate is not None:
            domain_recall = float(np.mean(similarity >= domain_gate))
            if ood_similarity is not None:
                ood_kept = float(np.mean(ood_similarity >= domain_gate))
            logger.info(
                "domain gate %.4f keeps retrieval on for %.0f%% of the dev sources%s",
                domain_gate,
                100 * domain_recall,
                "" if ood_kept is None else f" and {100 * ood_kept:.0f}% of the out-of-domain ones",
            )
    stats, truncated = _reference_statistics(knn, sources, references, max(ks))
    ood: ReferenceStats | None = None
    halves = list(half_distances) if half_distances is not None else auto_half_distances(stats.distances)

    def score_grid(st: ReferenceStats) -> np.ndarray:
        return grid_log_likelihood(
            st.log_p_mt, st.distances, st.match, ks, temperatures, lambdas, halves, gates, st.log_p_max
        )

    grid = score_grid(stats)
    objective = grid
    ood_grid: np.ndarray | None = None
    ood_base: float | None = None
    if ood_sources:
        ood, ood_truncated = _reference_statistics(
            knn, ood_sources, ood_references, max(ks), name="out-of-domain dev"
        )
        truncated += ood_truncated
        ood_grid = score_grid(ood)
        ood_base = float(ood.log_p_mt.mean())
        objective = (grid + ood_grid) / 2
    # search cost grows with k: the smallest k within ``k_tolerance`` of the best likelihood wins
    best_per_k = objective.reshape(len(ks), -1).max(axis=1)
    k_limit = min(
        k for k, value in zip(ks, best_per_k, strict=True) if value >= best_per_k.max() - k_tolerance
    )
    # gates that skip the same dev tokens (e.g. none and a gate no token reaches) behave alike: decode one
    every_max = np.concatenate([st.log_p_max for st in (stats, ood) if st is not None])
    masks = [_gate_mask(gate, every_max) for gate in gates]
    same_gate = [
        next(a for a in range(len(gates)) if np.array_equal(masks[a], masks[b])) for b in range(len(gates))
    ]
    candidates: list[tuple[KNNConfig, tuple[int, ...]]] = []
    seen: set[tuple[Any, ...]] = set()
    for flat in np.argsort(objective, axis=None, kind="stable")[::-1]:
        cell = tuple(int(x) for x in np.unravel_index(flat, grid.shape))
        i, j, m, h, g = cell
        behaviour = ("plain",) if lambdas[m] == 0 else (h, same_gate[g])  # λ = 0 is the plain model
        if ks[i] > k_limit or behaviour in seen:
            continue
        seen.add(behaviour)
        config = KNNConfig(
            k=int(ks[i]),
            temperature=float(temperatures[j]),
            lambda_=float(lambdas[m]),
            half_distance=halves[h],
            confidence_gate=gates[g],
            domain_gate=domain_gate,
        )
        candidates.append((config, cell))
        if len(candidates) == confirm:
            break
    ood_plain_bleu: float | None = None
    if ood_sources:
        plain = knn.translate(ood_sources, knn=False, batch_size=batch_size, **generate_kwargs)
        ood_plain_bleu = score([h.text for h in plain], ood_references, name="plain").bleu
        logger.info("out-of-domain dev BLEU of the plain model: %.2f", ood_plain_bleu)
    confirmed = []
    for config, cell in candidates:
        hyps = knn.translate(sources, knn=config, batch_size=batch_size, **generate_kwargs)
        result = score([h.text for h in hyps], references, name=str(config))
        row = {
            **config.to_dict(),
            "bleu": result.bleu,
            "chrf": result.chrf,
            "log_likelihood": float(grid[cell]),
        }
        if ood_grid is not None and ood_plain_bleu is not None:
            row["ood_log_likelihood"] = float(ood_grid[cell])
            ood_hyps = knn.translate(ood_sources, knn=config, batch_size=batch_size, **generate_kwargs)
            row["ood_bleu"] = score([h.text for h in ood_hyps], ood_references, name=str(config)).bleu
            row["ood_bleu_loss"] = ood_plain_bleu - row["ood_bleu"]
            if domain_gate is not None:
                row["ood_sentences_off"] = knn.last_stats.get("sentences_off", 0) / len(ood_sources)
        confirmed.append(row)
        logger.info("dev BLEU %.2f chrF %.2f for %s", result.bleu, result.chrf, config)
    best_row = _choose(confirmed, max_ood_loss)
    best = KNNConfig.from_dict({f.name: best_row[f.name] for f in dataclasses.fields(KNNConfig)})
    return TuningResult(
        list(ks),
        [float(t) for t in temperatures],
        [float(x) for x in lambdas],
        halves,
        list(gates),
        grid,
        len(stats.log_p_mt),
        float(stats.log_p_mt.mean()),
        confirmed,
        best,
        ood_grid,
        ood_base,
        ood_plain_bleu,
        domain_recall,
        domain_rule,
        ood_kept,
        truncated,
    )


def _gate_mask(gate: float | None, log_p_max: np.ndarray) -> np.ndarray:
    """``[T]`` bool: the tokens ``gate`` leaves to retrieval (the model's top log-probability below
    ``log gate``)."""
    return np.ones(len(log_p_max), dtype=bool) if gate is None else np.asarray(log_p_max) < math.log(gate)


def _choose(confirmed: list[dict[str, Any]], max_ood_loss: float) -> dict[str, Any]:
    """The best dev BLEU (ties: likelihood) among the confirmed settings that lose at most
    ``max_ood_loss`` out-of-domain BLEU; without such a setting, the one that loses least there."""
    if not all("ood_bleu_loss" in row for row in confirmed):
        return max(confirmed, key=lambda r: (r["bleu"], r["log_likelihood"]))
    allowed = [r for r in confirmed if r["ood_bleu_loss"] <= max_ood_loss]
    if allowed:
        return max(allowed, key=lambda r: (r["bleu"], r["log_likelihood"]))
    least = min(confirmed, key=lambda r: (r["ood_bleu_loss"], -r["bleu"]))
    logger.warning(
        "every confirmed setting loses more than %.2f BLEU out of domain; taking the one that loses least "
        "(%.2f)",
        max_ood_loss,
        least["ood_bleu_loss"],
    )
    return least


def plot_grid(result: TuningResult, path: str | Path) -> Path:
    """Heatmap of the best-over-λ mean log-likelihood for each (k, τ), best cell marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best_over_lambda = result.log_likelihood.max(axis=(2, 3, 4))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    image = ax.imshow(best_over_lambda, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(result.temperatures)), [f"{t:g}" for t in result.temperatures])
    ax.set_yticks(range(len(result.ks)), [str(k) for k in result.ks])
    ax.set_xlabel("temperature τ")
    ax.set_ylabel("k")
    ax.set_title(
        f"dev token log-likelihood (best λ, half-distance, gate per cell); plain "
        f"{result.base_log_likelihood:.3f}",
        fontsize=9,
    )
    i, j = result.ks.index(result.best.k), result.temperatures.index(result.best.temperature)
    half = result.best.half_distance
    gate = result.best.confidence_gate
    label = (
        f"chosen: λ={result.best.lambda_:g}"
        + (f", half-distance {half:g}" if half is not None else "")
        + (f", gate {gate:g}" if gate is not None else "")
    )
    ax.scatter([j], [i], marker="*", s=160, c="red", label=label)
    for (r, c), value in np.ndenumerate(best_over_lambda):
        ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


#: A model directory may ship a dev set of the text it was trained on (TSV ``source<TAB>target``):
#: ``knnmt tune`` then measures what a memory costs there without being asked.
MODEL_OOD_DEV = "knnmt-ood-dev.tsv"


def shipped_ood_dev(model: str | Path) -> tuple[Path, list[str], list[str]] | None:
    """``(path, sources, references)`` of the out-of-domain dev set a local model directory ships
    (:data:`MODEL_OOD_DEV`), or ``None`` (a Hub name, or a directory without one)."""
    from ..store.corpus import CorpusSpec, inspect_corpus, iter_pairs

    path = Path(model) / MODEL_OOD_DEV
    if not path.is_file():
        return None
    spec = CorpusSpec((str(path),), "tsv")
    inspect_corpus(spec, skip_empty=True)
    pairs = [(p.source, p.target) for p in iter_pairs(spec) if p.source.strip() and p.target.strip()]
    return path, [s for s, _ in pairs], [t for _, t in pairs]


def tuning_note(
    result: TuningResult, chosen: dict[str, Any] | None, dev: str, ood_dev: str | None
) -> dict[str, Any]:
    """What ``knnmt tune`` saves about its choice in ``knn.json`` (``about``): the dev sets, and the
    out-of-domain cost measured on the out-of-domain dev set, or a plain statement that it was not."""
    import datetime as _dt

    note: dict[str, Any] = {
        "chosen_by": "knnmt tune",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dev": dev,
        "domain_gate_rule": result.domain_rule,
        "dev_sources_kept_by_domain_gate": result.domain_recall,
    }
    if chosen is not None and ood_dev is not None:
        note.update(
            ood_dev=ood_dev,
            out_of_domain=(
                f"measured on {ood_dev}: dev BLEU {result.ood_base_bleu:.2f} plain -> "
                f"{chosen['ood_bleu']:.2f} with this setting ({-chosen['ood_bleu_loss']:+.2f})"
            ),
            ood_bleu_change=round(-float(chosen["ood_bleu_loss"]), 2),
        )
    else:
        guard = (
            f"the domain gate, which keeps retrieval on for {result.domain_recall:.0%} of the dev sources, "
            "is the only guard"
            if result.domain_rule and result.domain_recall is not None
            else "nothing guards it (no domain gate)"
        )
        note["out_of_domain"] = (
            "out-of-domain cost NOT measured: no out-of-domain dev set was given, so what this memory does "
            f"to other text is unknown and {guard}. Measure it with `knnmt tune ... --ood-source OTHER.src "
            "--ood-reference OTHER.ref` (a dev set of the other text your users send) or `knnmt evaluate "
            "... --ood-source ... --ood-reference ...`"
        )
    return note
