"""``python -m services.embedding [flags]``: the same as ``opea-grpc serve embedding [flags]``."""

import sys

from opea_grpc.entry import main

raise SystemExit(main(["serve", "embedding", *sys.argv[1:]]))
