from medfs.cli.main import main

raise SystemExit(main())
