"""DeepSeek-V3 in Megatron-LM's own training loop (`megatron.training.pretrain`), the way
Megatron-LM's `pretrain_gpt.py` runs GPT: `examples/megatron_lm/pretrain_dsv3.py` calls `main`.

    arguments.py  the flags it adds (--pipeline-schedule, --dsv3-preset) and the defaults it gives Megatron's
    model.py      the model provider: GPTModel chunks from this project's specs, placed for the schedule
    step.py       forward step, loss, datasets, embedding ranks
    main.py       the entry point: parse, shims on a CPU, pretrain()

Needs Megatron-LM's `megatron.training`: shipped by the megatron-core wheels from 0.17, and by a
Megatron-LM checkout (on PYTHONPATH) for 0.16. docs/megatron-lm.md has the command per release.
"""
