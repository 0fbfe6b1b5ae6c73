"""`python -m stockade.control [options]`: the operator without the rest of the CLI."""

from stockade.control.command import main

raise SystemExit(main())
