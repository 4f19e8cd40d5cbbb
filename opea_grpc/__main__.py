from opea_grpc.entry import main

raise SystemExit(main())
