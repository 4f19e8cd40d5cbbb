"""``python -m gateway [flags]`` is ``opea-grpc serve gateway [flags]``."""

import sys

from opea_grpc.entry import main

raise SystemExit(main(["serve", "gateway", *sys.argv[1:]]))
