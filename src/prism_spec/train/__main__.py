"""``python -m prism_spec.train``: the ``prism train`` command, standalone.

This entry point is what multi-process launchers run::

    accelerate launch --num_processes 2 -m prism_spec.train --recipe prism --data d.jsonl --output-dir runs/p
    torchrun --nproc_per_node 2 -m prism_spec.train --recipe prism --data d.jsonl --output-dir runs/p
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
