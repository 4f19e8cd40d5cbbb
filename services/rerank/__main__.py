"""``python -m services.rerank [flags]``: the same as ``opea-grpc serve rerank [flags]``."""

import sys

from opea_grpc.entry import main

raise SystemExit(main(["serve", "rerank", *sys.argv[1:]]))
