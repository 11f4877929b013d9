"""`python -m tlfusion`: the `tlfusion` command."""

from tlfusion.cli import main

raise SystemExit(main())
