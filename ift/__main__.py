from ift.cli import main

raise SystemExit(main())
