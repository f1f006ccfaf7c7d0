from taskrunner.worker.main import main; raise SystemExit(main())
