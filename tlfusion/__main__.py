from tlfusion.cli import main

raise SystemExit(main())
