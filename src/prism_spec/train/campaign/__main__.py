"""``python -m prism_spec.train.campaign`` (see :mod:`.cli`)."""

from .cli import main

raise SystemExit(main())
