from opea_grpc.cli import main

raise SystemExit(main())
