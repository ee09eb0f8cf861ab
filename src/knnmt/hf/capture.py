"""Activation capture: a forward pre-hook that keeps a module's input (the kNN key at build time, the
query at decoding time)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ActivationCapture:
    """Forward pre-hook that keeps the *input* of a module (the kNN key/query).

    Use as a context manager; the hook is removed on exit. ``last`` holds the most recent input,
    shape ``[rows, seq_len, dim]``, detached.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.last: torch.Tensor | None = None
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.last = args[0].detach()

    def __enter__(self) -> ActivationCapture:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.last = None
