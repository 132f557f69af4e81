"""``python -m benchmarks``: the jaxdecode benchmark suite (see ``benchmarks/run.py``)."""

from benchmarks.run import main

raise SystemExit(main())
