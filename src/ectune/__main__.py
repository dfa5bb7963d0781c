from ectune.cli import main

raise SystemExit(main())
