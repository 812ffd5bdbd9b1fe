"""Packaging glue: maps `services/` to `braid.services` and compiles `proto/` before the build.

The generated gRPC modules land in `braid/rpc/` (git-ignored), so `pip install .` and
`pip install -e .` both produce them with no manual step and nobody edits them.
"""

from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"


def compile_protos() -> None:
    from grpc_tools import protoc  # build requirement, see pyproject.toml

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out = ROOT
    for package_dir in {Path(s).parent for s in sources}:
        init = out / package_dir / "__init__.py"
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text('"""Generated from proto/ at build time; do not edit."""\n')
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *sources,
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")


class BuildWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


class OptionalBuildExt(build_ext):
    """The compiled forwarding path is optional: without a compiler or OpenSSL headers Braid still installs and
    forwards on the pure-Python path (the media node says which one it runs at start)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler or headers missing, or the compile failed
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        print(f"WARNING: the compiled forwarding path was not built ({exc}); Braid will use the pure-Python path")


FASTPATH = Extension(
    "braid.services.media.fastpath._fastpath",
    sources=["services/media/fastpath/_fastpath.c", "services/media/fastpath/_twcc.c"],
    depends=["services/media/fastpath/_twcc.h"],
    libraries=["crypto"],
    extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE", "-Wno-deprecated-declarations"],
    optional=True,
)


def _packages() -> list[str]:
    braid = find_packages(where=".", include=["braid", "braid.*"])
    services = ["braid.services"] + [
        "braid.services." + p for p in find_packages(where="services")
    ]
    return braid + services


# setuptools validates the package list before any command runs, so generate first.
compile_protos()

setup(
    packages=_packages(),
    package_dir={"braid": "braid", "braid.services": "services"},
    package_data={"braid": ["rpc/*.pyi", "py.typed", "web/**/*"]},
    ext_modules=[FASTPATH],
    cmdclass={"build_py": BuildWithProtos, "build_ext": OptionalBuildExt},
)
