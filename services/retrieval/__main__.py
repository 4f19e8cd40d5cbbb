"""``python -m services.retrieval [--port P] [--backend B]``: ``opea-grpc serve retrieval``."""

import sys

from opea_grpc.entry import main

raise SystemExit(main(["serve", "retrieval", *sys.argv[1:]]))
