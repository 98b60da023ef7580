"""Rehearse one rank of a run at full size on a CPU, before a GPU-hour is spent (issue 24).

    dsv3-launch examples/671b-2048xh800.yaml --rehearse --rank 0 [--json] [--routing maxvio=0.5]

- `rehearsal.py`: rank R of the configured world on the meta device under torch's fake process
  group, one training step with dsv3-train's own code; the table, the JSON, the verdict.
- `step.py`: the build and the step, measured; the same code on a real device for comparison.
- `tracker.py`: live device bytes by kind over the step, its peak and where it happens.
- `routing.py`: the routing assumptions the dispatcher's split sizes come from.
"""
from megatron_dsv3.rehearse.rehearsal import Rehearsal, rehearse  # noqa: F401
from megatron_dsv3.rehearse.routing import RoutingError, parse_routing  # noqa: F401
from megatron_dsv3.rehearse.tracker import KINDS, MemoryTracker, RehearsalError  # noqa: F401
