"""Pretrain DeepSeek-V3 with Megatron-LM's own loop: `torchrun ... pretrain_dsv3.py <flags>`.

The same flags as Megatron-LM's pretrain_gpt.py, plus --dsv3-preset NAME (the architecture flags
of a megatron_dsv3 preset) and --pipeline-schedule {1f1b,interleaved,dualpipe,dualpipev}.
docs/megatron-lm.md has the commands per Megatron-LM release.
"""
import sys

from megatron_dsv3.megatron_lm.main import main

if __name__ == "__main__":
    sys.exit(main())
