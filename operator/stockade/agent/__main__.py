"""`python -m stockade.agent ...`: the agent alone (the same as `stockade agent ...`)."""

from stockade.agent.command import main

raise SystemExit(main())
