"""Regenerate the Python code for the contracts in ``protos/``.

Run from a checkout::

    python -m opea_grpc.codegen            # rewrite opea_grpc/pb/
    python -m opea_grpc.codegen --out DIR  # write elsewhere (the staleness test does)

protoc writes ``opea/v1/x_pb2.py`` importing ``from opea.v1 import ...``; the files are moved
to ``opea_grpc/pb/v1/`` and those imports rewritten, so the package needs no ``sys.path`` tricks.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "opea_grpc.pb"
DEFAULT_OUT = ROOT / "opea_grpc" / "pb"

# Only import statements are rewritten: the serialized descriptors also contain "opea.v1".
_IMPORT = re.compile(r"^(from|import) opea\.v(\d+)(\b)", re.MULTILINE)
_HEADER = '"""Generated from protos/ by ``python -m opea_grpc.codegen``. Do not edit."""\n'


def _plugin(name: str) -> str:
    exe = shutil.which(name) or str(Path(sysconfig.get_path("scripts")) / name)
    if not Path(exe).exists():
        raise SystemExit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return exe


def generate(out: Path) -> list[Path]:
    """Generate every ``protos/**/*.proto`` into ``out``; returns the files written."""
    from grpc_tools import protoc  # a build tool: imported only when generating

    protos = sorted(PROTOS.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTOS}: run from a checkout of the repository")
    include = str(Path(protoc.__file__).parent / "_proto")
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            *(str(p.relative_to(PROTOS)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        generated = Path(tmp) / "opea"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "__init__.py").write_text(_HEADER)
        for version_dir in sorted(p for p in generated.iterdir() if p.is_dir()):
            target = out / version_dir.name
            target.mkdir()
            (target / "__init__.py").write_text(_HEADER)
            written.append(target / "__init__.py")
            for src in sorted(version_dir.iterdir()):
                text = _IMPORT.sub(rf"\1 {PACKAGE}.v\2\3", src.read_text())
                dst = target / src.name
                dst.write_text(text)
                written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opea_grpc.codegen", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    files = generate(args.out)
    print(f"wrote {len(files)} files to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
