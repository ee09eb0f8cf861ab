"""Deterministic, hash-based train/dev/test splits by group (catalog, package or help file).

Whole groups go to one split, so near-copies inside a group (the same message with a different
context, two versions of one help page) cannot leak from train into dev/test. Group order is the
SHA-256 of ``salt + group``: stable across runs, machines and Python versions (unlike ``hash()``),
and independent of the input order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_SALT = "knnmt-v1"


def stable_hash(text: str, salt: str = DEFAULT_SALT) -> int:
    """A 64-bit integer from SHA-256 of ``salt + "\\0" + text`` (deterministic everywhere)."""
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def dedupe_by(items: Iterable[T], key: Callable[[T], Hashable]) -> list[T]:
    """Keep the first item for every distinct ``key(item)``, preserving order."""
    seen: set[Hashable] = set()
    out: list[T] = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


@dataclasses.dataclass
class GroupSplit(Generic[T]):
    """Result of :func:`split_by_group`.

    ``splits`` maps ``"train"`` and every held-out split name to its items; ``groups`` maps each
    held-out split name to the groups assigned to it; ``discarded`` holds items of held-out groups
    that were not selected (over the requested size, over ``max_per_group`` or ineligible): they are
    in no split, so that no group is ever shared between train and a held-out split.
    """

    splits: dict[str, list[T]]
    groups: dict[str, list[str]]
    discarded: list[T]


def split_by_group(
    items: Sequence[T],
    group_of: Callable[[T], str],
    sizes: Sequence[tuple[str, int]],
    key_of: Callable[[T], str],
    salt: str = DEFAULT_SALT,
    max_per_group: int | None = None,
    max_group_size: int | None = None,
    eligible: Callable[[T], bool] | None = None,
) -> GroupSplit[T]:
    """Split ``items`` into train plus held-out splits of exact ``sizes``, assigning whole groups.

    Groups are visited in :func:`stable_hash` order. Each held-out split (in the order given by
    ``sizes``, e.g. ``[("test", 1000), ("dev", 1000)]``) takes groups until it has enough eligible
    items; from each of its groups it takes at most ``max_per_group`` eligible items, chosen in
    hash order of ``key_of(item)`` and never two with the same key in one split (so pass e.g. the
    source sentence as key to get one reference per source); items of the last group beyond the
    exact size are discarded.
    Groups with more than ``max_group_size`` items are never held out (so one huge catalog does not
    make up a whole test set). Everything else is train, in input order.

    Raises:
        ValueError: when there are not enough eligible items for the requested sizes.
    """
    by_group: dict[str, list[T]] = {}
    for item in items:
        by_group.setdefault(group_of(item), []).append(item)
    order = sorted(by_group, key=lambda g: (stable_hash(g, salt), g))

    assigned: dict[str, str] = {}
    selected: dict[str, list[T]] = {name: [] for name, _ in sizes}
    groups: dict[str, list[str]] = {name: [] for name, _ in sizes}
    used: dict[str, set[str]] = {name: set() for name, _ in sizes}
    discarded: list[T] = []
    it = iter(order)
    for name, size in sizes:
        while len(selected[name]) < size:
            group = next(it, None)
            if group is None:
                have = len(selected[name])
                raise ValueError(f"not enough eligible items for split {name!r} ({have}/{size})")
            members = by_group[group]
            if max_group_size is not None and len(members) > max_group_size:
                continue
            ok = [m for m in members if eligible is None or eligible(m)]
            if not ok:
                continue
            assigned[group] = name
            groups[name].append(group)
            ok.sort(key=lambda m: (stable_hash(key_of(m), salt), key_of(m)))
            limit = min(size - len(selected[name]), max_per_group or len(ok))
            take: list[T] = []
            for m in ok:
                if len(take) >= limit:
                    break
                if key_of(m) not in used[name]:
                    used[name].add(key_of(m))
                    take.append(m)
            selected[name].extend(take)
            taken = {id(m) for m in take}
            discarded.extend(m for m in members if id(m) not in taken)
    train = [item for item in items if group_of(item) not in assigned]
    splits: dict[str, list[T]] = {"train": train, **selected}
    log.info(
        "split: %s; %d held-out-group items discarded",
        ", ".join(f"{k}={len(v)}" for k, v in splits.items()),
        len(discarded),
    )
    return GroupSplit(splits, groups, discarded)
