from taskrunner.cli.main import main; raise SystemExit(main())
