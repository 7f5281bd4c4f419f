from botbox.cli import main

raise SystemExit(main())
