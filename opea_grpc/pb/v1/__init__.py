"""Generated from protos/ by ``python -m opea_grpc.codegen``. Do not edit."""
