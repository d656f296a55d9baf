"""``python -m fuzz``: the runner's command line."""

from fuzz.runner import main

raise SystemExit(main())
