from netsetup.cli import main

raise SystemExit(main())
