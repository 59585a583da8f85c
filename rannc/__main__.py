"""`python -m rannc ...` runs the `rannc` command (e.g. under torchrun: `torchrun --nproc-per-node 8 -m rannc
calibrate --out gpu.json`)."""

import sys

from .cli import main

sys.exit(main())
