"""Megatron-LM's training package as the megatron-core wheels (and a checkout beside one) run it.

`initialize_megatron` compiles Megatron-Core's dataset helpers on rank 0 with
`make -C <megatron/core/datasets>` (`_compile_dependencies` -> `datasets.utils.compile_helpers`).
The wheels ship those helpers compiled (`helpers_cpp.*.so`) and no Makefile, so the build fails
and the rank exits (seen with megatron-core 0.19.2's `megatron.training`, GPU or not). Inside
`prebuilt_dataset_helpers()`, compile_helpers does nothing when the compiled module imports; a
source tree without it still compiles.

    with prebuilt_dataset_helpers():
        pretrain(...)
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
from typing import Iterator

from megatron_dsv3.compat.active import mark, unmark

NAME = "megatron.core.datasets.utils:compile_helpers(prebuilt)"


@contextlib.contextmanager
def prebuilt_dataset_helpers() -> Iterator[None]:
    from megatron.core.datasets import utils

    original = utils.compile_helpers
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        yield
        return

    @functools.wraps(original)
    def compile_helpers() -> None:
        """The compiled helpers are already there."""

    utils.compile_helpers = compile_helpers
    mark(NAME)
    try:
        yield
    finally:
        utils.compile_helpers = original
        unmark(NAME)
