"""Build ep_kernels and the independent reference ep_reference. Two ways, chosen by whether
torch can be imported here:

- ``pip install .`` (build isolation: pip builds in a fresh environment without torch). The
  wheel holds the C++/CUDA sources (``csrc/``, installed as ``ep_kernels/_csrc``) and no
  binary; ``ep_kernels`` compiles them on first use, against whichever torch runs, into a
  cache (``ep_kernels/_build.py``).
- ``pip install --no-build-isolation .`` (torch importable): the extension is compiled now,
  against the installed torch, whose version is recorded in ``ep_kernels/_build_info.py``; at
  run time the package refuses the compiled ops under another torch (``ep_kernels/_ext.py``).

What is compiled, with which flags, and whether the CUDA kernels are, is decided in one place,
``ep_kernels/_build.py``, which this file loads by path (the package itself cannot be imported
before it is built).
"""
import importlib.util
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join("ep_kernels", "_build_info.py")


def load_build_module():
    path = os.path.join(HERE, "ep_kernels", "_build.py")
    spec = importlib.util.spec_from_file_location("_ep_kernels_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def torch_importable():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def write_build_info(torch, spec):
    with open(os.path.join(HERE, BUILD_INFO), "w") as f:
        f.write("# Written by setup.py at build time; do not edit.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA = {torch.version.cuda!r}\n")
        f.write(f"CUDA_KERNELS = {spec.with_cuda!r}\n")


def ahead_of_time(_build):
    """(ext_modules, cmdclass) compiling the ops now, against the importable torch."""
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    spec = _build.ops_spec(csrc="csrc")  # relative: setuptools wants sources relative to setup.py
    if spec.with_cuda:
        print(f"ep_kernels: building the CPU and CUDA kernels: {spec.cuda_reason}; TORCH_CUDA_ARCH_LIST="
              f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(unset: the visible GPUs, or all)')}")
    else:
        print(f"ep_kernels: building the CPU kernels only; CUDA kernels skipped: {spec.cuda_reason}")
    args = {"cxx": list(spec.cflags), "nvcc": list(spec.cuda_cflags)}
    ext = (CUDAExtension if spec.with_cuda else CppExtension)(
        name="ep_kernels._C", sources=list(spec.sources), include_dirs=list(spec.include_dirs),
        extra_compile_args=args if spec.with_cuda else {"cxx": args["cxx"]},
        extra_link_args=list(spec.ldflags))

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """Appends the nvidia wheels' include folders after those CUDAExtension added (the
        toolkit's), so a full toolkit's headers win."""

        def build_extensions(self):
            for e in self.extensions:
                e.include_dirs = list(e.include_dirs) + [d for d in spec.cuda_include_dirs if d not in e.include_dirs]
            super().build_extensions()
            for e in self.extensions:
                _build.check_links_shared_libstdcxx(self.get_ext_fullpath(e.name))

    write_build_info(torch, spec)
    return [ext], {"build_ext": BuildExt}


class SourcesOnlyBuildPy(build_py):
    """build_py for the first-use build: leaves out a ``_build_info.py`` left in the source tree
    by an earlier ahead-of-time build, which would make the package look for a ``_C`` binary."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "ep_kernels" and m[1] == "_build_info")]


def build_mode(_build):
    """(ext_modules, cmdclass): compile now when torch is importable, else ship the sources."""
    if torch_importable():
        return ahead_of_time(_build)
    print("ep_kernels: torch is not importable at build time (pip's build isolation): installing the "
          "C++/CUDA sources, which compile on first use (about 1.5 min with 2 cores, once per torch version)")
    return [], {"build_py": SourcesOnlyBuildPy}


EXT_MODULES, CMDCLASS = build_mode(load_build_module())
SOURCE_GLOBS = [f"{d}*{ext}" for d in ("", "cpu/", "cuda/") for ext in (".cpp", ".h", ".cu", ".cuh")]
TRAIN = ["numpy", "tqdm", "matplotlib", "scikit-learn"]

setup(
    name="ep_kernels",
    version="0.1.0",
    description="Fused kernels and drop-in layers for Equilibrium Propagation in PyTorch",
    packages=find_packages(include=["ep_kernels", "ep_kernels.*"]) + ["ep_reference", "ep_kernels._csrc"],
    # csrc/ stays at the top of the repository; in the wheel it is the package data ep_kernels/_csrc
    package_dir={"ep_reference": "python/ep_reference", "ep_kernels._csrc": "csrc"},
    package_data={"ep_kernels._csrc": SOURCE_GLOBS, "ep_kernels.app": ["datasets/*.npz", "datasets/README.md"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    python_requires=">=3.9",
    # The library (layers, network, ops) needs torch, and ninja for the first-use build.
    install_requires=["torch>=2.4", "ninja"],
    extras_require={
        # the application ep_kernels.app (ep-train, ep-gradcheck, datasets); tests/test_layout.py holds it apart
        "train": TRAIN,
        # triton: the Triton kernels' tests run under its interpreter on CPU (3.6 is the GPU machines' version)
        "test": ["pytest", "pytest-benchmark", "triton==3.6.0"] + TRAIN,
    },
    entry_points={
        "console_scripts": [
            "ep-train=ep_kernels.app.train:main",
            "ep-gradcheck=ep_kernels.app.gradcheck:main",
        ]
    },
    zip_safe=False,
)
