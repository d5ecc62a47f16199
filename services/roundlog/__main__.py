"""``python -m roundlog``: the same CLI as the ``roundlog`` console script."""

from roundlog.cli import main

raise SystemExit(main())
