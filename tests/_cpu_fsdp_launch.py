"""Run a training script with Accelerate's FSDP enabled on CPU (for tests only).

Accelerate 1.15 turns ``--fsdp`` into plain data parallel on CPU (``MULTI_CPU``): it enables FSDP
only for accelerator device types. FSDP2 itself (``fully_shard``) runs on CPU with gloo, so this
wrapper reports the process state as multi-device before Accelerate decides, then runs the
script unchanged: ``torchrun --nproc_per_node 2 tests/_cpu_fsdp_launch.py SCRIPT ARGS...``.
"""

from __future__ import annotations

import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

_init = PartialState.__init__


def _init_as_multi_device(self: PartialState, *args: object, **kwargs: object) -> None:
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU  # AcceleratorState then enables FSDP


PartialState.__init__ = _init_as_multi_device  # type: ignore[method-assign]

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
