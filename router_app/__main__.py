from router_app.cli import main

raise SystemExit(main())
