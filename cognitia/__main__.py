"""``python -m cognitia``: the same as the ``cognitia`` command."""

from .cli import main

raise SystemExit(main())
