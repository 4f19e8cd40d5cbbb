"""``python -m services.chat [flags]``: the same as ``opea-grpc serve chat [flags]``."""

import sys

from opea_grpc.entry import main

raise SystemExit(main(["serve", "chat", *sys.argv[1:]]))
