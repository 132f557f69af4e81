"""``python -m jaxdecode``: the command-line interface (see jaxdecode._cli)."""

from ._cli import main

raise SystemExit(main())
